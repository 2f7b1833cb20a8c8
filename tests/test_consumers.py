"""Real consumers read what fp8conv writes: transformers (FP8 loader, dequantizing on CPU) and
compressed-tensors. Skipped where those packages are not installed."""

from __future__ import annotations

import logging

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file
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
