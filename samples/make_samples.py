"""Build the bundled sample checkpoints deterministically (seeded; no downloads).

  deepseek-tiny-fp8/  DeepSeek-V3 layout: 3 shards + index, quantization_config, tokenizer files, a
                      scale stored in another shard than its weight, ragged edge tiles (200x300,
                      576x320), stacked experts, non-float tensors, a sub-folder.
  llama-tiny-bf16/    a tiny LlamaForCausalLM (an architecture transformers knows), one bf16 shard.
  llama-tiny-fp8/     the same model quantized to block FP8 (transformers' `quant_method: fp8`), 2 shards.
Run: python samples/make_samples.py [OUTDIR]   (default: this folder)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from fp8conv.checkpoint.safetensors_io import save_file
from fp8conv.convert.plan import native_fp8_config
from fp8conv.kernels.reference import weight_quant_torch

HERE = Path(__file__).resolve().parent
META = {"format": "pt"}
TOKENIZER_CONFIG = {
    "model_max_length": 4096,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
}


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _tokenizer(vocab: int) -> dict:
    """A word-level tokenizer.json that the tokenizers library can load."""
    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab):
        words[f"w{i}"] = i
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    }


def _write_sharded(root: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    n = len(shards)
    weight_map = {}
    total = 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, root / name, META)
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    _write_json(
        root / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weight_quant_torch(w.float())


def deepseek_tiny(root: Path) -> None:
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    hidden, inter, vocab = 320, 200, 256
    t = {}
    t["model.embed_tokens.weight"] = rnd(vocab, hidden).bfloat16()
    t["model.layers.0.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    q, s = _fp8(rnd(576, hidden))  # kv_a_proj_with_mqa-like: 576 rows -> 5 scale rows (ragged)
    t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] = q
    t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] = s
    q, s = _fp8(rnd(inter, 300))  # ragged in both dims: 200 x 300 -> 2 x 3
    t["model.layers.0.mlp.down_proj.weight"] = q
    down_scale = s  # stored in the next shard: a scale apart from its weight
    t["model.layers.0.mlp.gate.weight"] = rnd(8, hidden).bfloat16()  # MoE router, kept bf16
    shard1 = dict(t)
    t = {}
    t["model.layers.0.mlp.down_proj.weight_scale_inv"] = down_scale
    q, s = _fp8(rnd(4, 256, hidden))  # stacked experts [E, rows, cols]
    t["model.layers.0.mlp.experts.gate_up_proj"] = q
    t["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] = s
    t["model.layers.0.mlp.gate.e_score_correction_bias"] = rnd(8).float()
    t["model.layers.0.self_attn.rotary.inv_freq"] = torch.arange(16, dtype=torch.float32)
    t["model.position_ids"] = torch.arange(64, dtype=torch.int64).reshape(1, 64)
    t["model.attn_mask"] = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    t["model.codebook_u8"] = torch.randint(0, 255, (32,), generator=g, dtype=torch.uint8)
    t["model.codebook_i8"] = torch.randint(-128, 127, (32,), generator=g, dtype=torch.int8)
    shard2 = t
    t = {}
    q, s = _fp8(rnd(hidden, 256))
    t["model.layers.0.self_attn.o_proj.weight"] = q
    t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = s
    t["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    t["lm_head.weight"] = rnd(vocab, hidden).bfloat16()
    shard3 = t
    root.mkdir(parents=True)
    _write_sharded(root, [shard1, shard2, shard3])
    _write_json(
        root / "config.json",
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "vocab_size": vocab,
            "num_hidden_layers": 1,
            "torch_dtype": "bfloat16",
            "quantization_config": native_fp8_config(),
        },
    )
    _write_json(root / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    _write_json(root / "tokenizer.json", _tokenizer(vocab))
    _write_json(root / "tokenizer_config.json", TOKENIZER_CONFIG)
    (root / "assets").mkdir()
    (root / "assets" / "NOTICE.txt").write_text("A sub-folder that must arrive in the output unchanged.\n")


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def llama_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    c = LLAMA_CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]

    def lin(o, n):
        return (torch.randn(o, n, generator=g) / n**0.5).bfloat16()

    t = {"model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.5).bfloat16()}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).bfloat16()
        t[p + "self_attn.q_proj.weight"] = lin(h, h)
        t[p + "self_attn.k_proj.weight"] = lin(kv, h)
        t[p + "self_attn.v_proj.weight"] = lin(kv, h)
        t[p + "self_attn.o_proj.weight"] = lin(h, h)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).bfloat16()
        t[p + "mlp.gate_proj.weight"] = lin(i, h)
        t[p + "mlp.up_proj.weight"] = lin(i, h)
        t[p + "mlp.down_proj.weight"] = lin(h, i)
    t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    t["lm_head.weight"] = lin(v, h)
    return t


def llama_files(root: Path) -> None:
    _write_json(root / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    _write_json(root / "tokenizer.json", _tokenizer(LLAMA_CONFIG["vocab_size"]))
    _write_json(root / "tokenizer_config.json", TOKENIZER_CONFIG)


def llama_bf16(root: Path) -> None:
    root.mkdir(parents=True)
    save_file(llama_tensors(), root / "model.safetensors", META)
    _write_json(root / "config.json", LLAMA_CONFIG)
    llama_files(root)


def llama_fp8(root: Path) -> None:
    """Quantized with the torch reference (independent of the pipeline that converts it back)."""
    root.mkdir(parents=True)
    out = {}
    for k, v in llama_tensors().items():
        if k.endswith("_proj.weight"):
            q, s = _fp8(v)
            out[k], out[k + "_scale_inv"] = q, s
        else:
            out[k] = v
    names = list(out)
    half = names.index("model.layers.1.input_layernorm.weight")
    _write_sharded(root, [{k: out[k] for k in names[:half]}, {k: out[k] for k in names[half:]}])
    cfg = dict(LLAMA_CONFIG)
    cfg["quantization_config"] = native_fp8_config(skipped=["lm_head"])
    _write_json(root / "config.json", cfg)
    llama_files(root)


def main(out: Path = HERE) -> None:
    for name, fn in (
        ("deepseek-tiny-fp8", deepseek_tiny),
        ("llama-tiny-bf16", llama_bf16),
        ("llama-tiny-fp8", llama_fp8),
    ):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        fn(target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
