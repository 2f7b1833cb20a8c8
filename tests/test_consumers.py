"""Real consumers read what fp8conv writes: transformers (FP8 loader, dequantizing on CPU) and
compressed-tensors. Skipped where those packages are not installed."""

from __future__ import annotations

import logging

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file, save_file
from fp8conv.cli import app

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

runner = CliRunner()
PROMPT = torch.tensor([[1, 17, 42, 99, 123, 256, 300, 511, 7, 64]])
# Logits of the FP8 model vs the bf16 one: e4m3 weights carry ~2.5-3% relative error per matrix, which
# a 2-layer model passes to the logits at about the same relative size; 8% leaves room for bf16 compute.
LOGITS_REL_BOUND = 0.08
# compressed-tensors also quantizes activations per 1x128 group on the fly (dynamic e4m3), a second
# ~3% error of the same size: the bounds add.
CT_LOGITS_REL_BOUND = 0.12
# compressed-tensors casts a float32 weight_scale to the model dtype (bf16) when it loads: one rounding
# of the scale (2^-9 relative) plus one of the product, so 2 bf16 ulps of relative difference per element.
CT_REL_BOUND = 2 * 2.0**-8


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def load_model(path):
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits.float()


def test_transformers_dequantizes_the_fp8_sample_to_our_bytes(sample, tmp_path):
    src = sample("llama-tiny-fp8")
    cli("dequantize", src, tmp_path / "bf16", "-q")
    ours = load_file(tmp_path / "bf16" / "model-00001-of-00002.safetensors")
    ours.update(load_file(tmp_path / "bf16" / "model-00002-of-00002.safetensors"))
    theirs = load_model(src).state_dict()
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert theirs[k].dtype == torch.bfloat16
        assert torch.equal(theirs[k], v), k


def test_transformers_runs_the_quantized_model(sample, tmp_path):
    src = sample("llama-tiny-bf16")
    cli("quantize", src, tmp_path / "fp8", "-q")
    ref = logits(load_model(src))
    got = logits(load_model(tmp_path / "fp8"))
    rel = float((got - ref).norm() / ref.norm())
    assert rel < LOGITS_REL_BOUND, rel
    assert rel > 0  # the FP8 model really is a different model
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_compressed_tensors_output_loads_and_agrees(sample, tmp_path):
    pytest.importorskip("compressed_tensors")
    src = sample("llama-tiny-bf16")
    cli("quantize", src, tmp_path / "ct", "--format", "compressed-tensors", "-q")
    model = load_model(tmp_path / "ct")
    rel = float((logits(model) - logits(load_model(src))).norm() / logits(load_model(src)).norm())
    assert rel < CT_LOGITS_REL_BOUND, rel
    # compressed-tensors' own decompression against fp8conv dequantize of the same files
    cli("dequantize", tmp_path / "ct", tmp_path / "back", "-q")
    ours = load_file(tmp_path / "back" / "model.safetensors")
    theirs = model.state_dict()
    for k, v in ours.items():
        t = theirs[k].float()
        diff = (t - v.float()).abs()
        assert float((diff / v.float().abs().clamp_min(1e-30)).max()) <= CT_REL_BOUND or torch.equal(
            t, v.float()
        ), k


# ------------------------------------------------------------------ families read by their own consumers
def _tensors(root):
    out = {}
    for p in sorted(root.glob("*.safetensors")):
        out.update(load_file(p))
    return out


@pytest.mark.parametrize("name", ["ct-fp8-dynamic", "ct-fp8-static", "ct-compression-config", "ct-mxfp8"])
def test_compressed_tensors_decompresses_each_format_to_our_bytes(name, tmp_path):
    """compressed-tensors' own compressor for the checkpoint's format (float-quantized: tensor and
    channel scales; mxfp8-quantized: uint8 exponents) decompresses every weight to fp8conv's bytes."""
    pytest.importorskip("compressed_tensors")
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from tests.fixtures_formats import build

    f = build(name, tmp_path)
    cli("dequantize", f.root, tmp_path / "out", "-q")
    ours, src = _tensors(tmp_path / "out"), _tensors(f.root)
    cfg = json.loads((f.root / "config.json").read_text())
    qc = cfg.get("quantization_config") or cfg["compression_config"]
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    weights = [k for k, v in src.items() if v.dtype == torch.float8_e4m3fn]
    assert weights
    for k in weights:
        theirs = compressor.decompress({"weight": src[k], "weight_scale": src[k + "_scale"]}, scheme)[
            "weight"
        ]
        assert torch.equal(theirs.to(torch.bfloat16), ours[k]), k


def test_transformers_dequantizes_gpt_oss_mxfp4_to_our_bytes_and_loads_our_output(tmp_path):
    """transformers' MXFP4 loader (Mxfp4Config(dequantize=True), integrations/mxfp4.py) and fp8conv give
    the same bf16 gpt-oss, tensor for tensor; and transformers loads fp8conv's output as a bf16 gpt-oss."""
    import json

    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    )
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for k, v in GptOssForCausalLM(cfg).to(torch.bfloat16).state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, cols, rows = v.shape  # bf16 [E, in, out]; MXFP4 blocks [E, out, in/32, 16]
            tensors[k + "_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g).to(
                torch.uint8
            )
            tensors[k + "_scales"] = torch.randint(118, 136, (e, rows, cols // 32), generator=g).to(
                torch.uint8
            )
        else:
            tensors[k] = v.contiguous()
    src = tmp_path / "src"
    src.mkdir()
    save_file(tensors, src / "model.safetensors", {"format": "pt"})
    config = cfg.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (src / "config.json").write_text(json.dumps(config))
    cli("dequantize", src, tmp_path / "out", "-q")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).state_dict()
    assert set(ours) == set(theirs)
    assert not any(k.endswith(("_blocks", "_scales")) for k in ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k].contiguous().view(torch.uint8), v.view(torch.uint8)), k
    back = load_model(tmp_path / "out").state_dict()
    for k, v in ours.items():
        assert torch.equal(back[k], v), k
