"""`quantize --like REF`: a BF16 model goes back to exactly the reference's layout (tensor set, dtypes,
shapes, quantization_config); a model that is not the reference's is refused with the differences."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import read_header
from fp8conv.cli import app
from tests.conftest import model_bytes

runner = CliRunner()


def cli(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def layout(folder) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's dtype and shape (the shards are the source's, not the reference's)."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        for name, info in read_header(p).tensors.items():
            out[name] = (info.dtype, tuple(info.shape))
    return out


def qc(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_like_reproduces_the_deepseek_release_layout(sample, tmp_path):
    ref = sample("deepseek-tiny-fp8")
    cli("dequantize", ref, tmp_path / "bf16", "-q")
    out = tmp_path / "again"
    # --scheme mxfp8 is overridden by the reference's scheme
    cli("quantize", tmp_path / "bf16", out, "--like", ref, "--scheme", "mxfp8", "-q")
    assert layout(out) == layout(ref)
    assert qc(out) == qc(ref)


def test_like_a_compressed_tensors_channel_reference(sample, tmp_path):
    src = sample("llama-tiny-bf16")
    ref = tmp_path / "ref"
    cli(
        "quantize",
        src,
        ref,
        "--scheme",
        "fp8-channel",
        "--format",
        "compressed-tensors",
        "--skip",
        "*o_proj*",
        "-q",
    )
    out = tmp_path / "like"
    cli("quantize", src, out, "--like", ref, "-q")
    assert layout(out) == layout(ref)
    assert qc(out) == qc(ref)
    # the same model bytes (each shard's fp8conv.job names its own options and source)
    assert model_bytes(out / "model.safetensors") == model_bytes(ref / "model.safetensors")


def test_like_refuses_a_different_model(sample, tmp_path):
    r = cli(
        "quantize", sample("llama-tiny-bf16"), tmp_path / "x", "--like", sample("deepseek-tiny-fp8"), code=3
    )
    assert (
        "not the reference's" in r.output
        and "only in the model" in r.output
        and "only in the reference" in r.output
    )
    assert not (tmp_path / "x").exists()
