"""`fp8conv convert --target` on the GPU writes the CPU's bytes: the weights kept bf16 go through the
dequantize job, which runs on the device (run by `make test-gpu`)."""

from __future__ import annotations

import json

import pytest
import torch

from fp8conv.checkpoint.safetensors_io import save_file
from tests.gpu.test_convert_gpu import assert_same, convert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def llama_8640(root):
    """One Llama layer with intermediate size 8640 (ragged 128 x 128 tiles, K = 8640 for down_proj)."""
    g = torch.Generator().manual_seed(3)
    hidden, inter = 256, 8640

    def lin(o, n):
        return (torch.randn(o, n, generator=g) / n**0.5).bfloat16()

    p = "model.layers.0."
    t = {
        "model.embed_tokens.weight": lin(512, hidden),
        p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": lin(hidden, hidden),
        p + "self_attn.k_proj.weight": lin(128, hidden),
        p + "self_attn.v_proj.weight": lin(128, hidden),
        p + "self_attn.o_proj.weight": lin(hidden, hidden),
        p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "mlp.gate_proj.weight": lin(inter, hidden),
        p + "mlp.up_proj.weight": lin(inter, hidden),
        p + "mlp.down_proj.weight": lin(hidden, inter),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": lin(512, hidden),
    }
    root.mkdir(parents=True)
    save_file(t, root / "model.safetensors", {"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_hidden_layers": 1,
        "vocab_size": 512,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize(
    "extra", [["--target", "transformers"], ["--format", "compressed-tensors", "--target", "vllm"]]
)
def test_convert_target_on_gpu_writes_the_cpus_bytes(tmp_path, extra):
    src = llama_8640(tmp_path / "bf16")
    convert("quantize", src, tmp_path / "fp8", "--device", "cpu", "-q")
    convert("convert", tmp_path / "fp8", tmp_path / "cpu", "--device", "cpu", "-q", *extra)
    convert("convert", tmp_path / "fp8", tmp_path / "gpu", "--device", "cuda", "-q", *extra)
    assert_same(tmp_path / "cpu", tmp_path / "gpu")
