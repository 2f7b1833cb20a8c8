"""`fp8conv verify --device cuda`: the GEMM check through the Triton kernels (run: `make test-gpu`).

Good checkpoints must pass with the GPU bound (1e-3 relative Frobenius error, docs/verify.md) and the
same reference numbers as on the CPU; a planted NaN code must fail on the GPU too.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv import QuantizeOptions, quantize
from fp8conv.checkpoint.safetensors_io import read_header
from fp8conv.cli import app
from fp8conv.verify import VerifyOptions, verify_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SAMPLES = Path(__file__).resolve().parent.parent.parent / "samples"
runner = CliRunner()


def _verify(*args) -> tuple[int, dict, str]:
    target = Path(str(args[0])).parent / "verify-report.json"
    r = runner.invoke(app, ["verify", *map(str, args), "--device", "cuda", "--json", str(target), "-q"])
    return r.exit_code, json.loads(target.read_text()), r.output


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_quantized_sample_passes_on_cuda(tmp_path, fmt):
    src = SAMPLES / "llama-tiny-bf16"
    quantize(src, tmp_path / "q", QuantizeOptions(format=fmt, device="cpu"))
    code, report, out = _verify(tmp_path / "q", "--reference", src, "--reference-mode", "statistical")
    assert code == 0, out
    assert report["device"].startswith("cuda")
    fp8 = [t for t in report["tensors"] if t["role"] == "fp8_weight"]
    assert len(fp8) == 14
    for t in fp8:
        assert t["checks"]["gemm"]["status"] == "pass", t
        assert t["metrics"]["gemm_bound"] == 1e-3
        assert t["metrics"]["gemm_rel_err"] < 1e-3
        assert t["metrics"]["sqnr_db"] > 28
    # the default (auto) takes the exact re-quantization for an output fp8conv wrote
    code, report, out = _verify(tmp_path / "q", "--reference", src)
    assert code == 0 and report["reference_mode"] == "exact", out


@pytest.mark.parametrize("rows", [33, 256])
def test_deepseek_sample_passes_on_cuda(tmp_path, rows):
    """Ragged tiles (200x300, 576x320) and stacked experts through the Triton GEMM; 256 rows take the
    tensor-core (wgmma) tiles, whose accumulation is the imprecise one (about 2**-13)."""
    ckpt = tmp_path / "ds"
    shutil.copytree(SAMPLES / "deepseek-tiny-fp8", ckpt)
    code, report, out = _verify(ckpt, "--rows", rows)
    assert code == 0, out
    gemm = {t["name"]: t["metrics"] for t in report["tensors"] if t["role"] == "fp8_weight"}
    assert len(gemm) == 4 and all(m["gemm_rel_err"] < 1e-3 for m in gemm.values())
    assert gemm["model.layers.0.mlp.experts.gate_up_proj"]["experts_checked"] == 4


def test_cpu_and_cuda_agree_on_everything_but_the_gemm(tmp_path):
    src = SAMPLES / "llama-tiny-bf16"
    quantize(src, tmp_path / "q", QuantizeOptions(device="cpu"))
    reports = {
        dev: verify_checkpoint(
            tmp_path / "q", VerifyOptions(reference=str(src), device=dev, reference_mode="statistical")
        )
        for dev in ("cpu", "cuda")
    }
    assert all(r.ok for r in reports.values())
    cpu = {t.name: t.metrics for t in reports["cpu"].tensors}
    for t in reports["cuda"].tensors:
        for k in ("sqnr_db", "min_tile_sqnr_db"):
            if k in t.metrics:
                assert t.metrics[k] == cpu[t.name][k]
        # the cosine's float64 dot products are summed band by band in each device's own order: equal
        # to the last few ulps (seen on an H200: 0.999669685635282 against 0.9996696856352822)
        if "output_cosine" in t.metrics:
            assert math.isclose(t.metrics["output_cosine"], cpu[t.name]["output_cosine"], rel_tol=1e-12)


def test_nan_code_fails_on_cuda(tmp_path):
    src = SAMPLES / "llama-tiny-bf16"
    quantize(src, tmp_path / "q", QuantizeOptions(device="cpu"))
    path = tmp_path / "q" / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    info = read_header(path).tensors[name]
    with open(path, "r+b") as f:
        f.seek(info.start + 5)
        f.write(b"\x7f")
    code, report, out = _verify(tmp_path / "q")
    assert code == 1
    t = next(t for t in report["tensors"] if t["name"] == name)
    assert t["checks"]["nan_codes"]["status"] == "fail"
    assert t["checks"]["gemm"]["status"] == "fail"


def test_exact_reference_mode_on_cuda(tmp_path):
    """An output written on the CPU re-quantizes bit for bit through the Triton weight_quant (the
    quantizer gives the same bytes on both); one code off by one step fails there too."""
    src = SAMPLES / "llama-tiny-bf16"
    quantize(src, tmp_path / "q", QuantizeOptions(device="cpu"))
    code, report, out = _verify(tmp_path / "q", "--reference", src)
    assert code == 0 and report["reference_mode"] == "exact", out
    path = tmp_path / "q" / "model.safetensors"
    name = "model.layers.0.mlp.gate_proj.weight"
    info = read_header(path).tensors[name]
    with open(path, "r+b") as f:
        f.seek(info.start)
        raw = bytearray(f.read(256))
        j = next(i for i, b in enumerate(raw) if 0 < b < 0x7E)
        f.seek(info.start + j)
        f.write(bytes([raw[j] + 1]))
    code, report, out = _verify(tmp_path / "q", "--reference", src)
    assert code == 1 and report["reference_mode"] == "exact"
    t = next(t for t in report["tensors"] if t["name"] == name)
    assert "1 of 131072 code(s) differ" in t["checks"]["reference"]["message"]


def test_families_on_cuda(tmp_path):
    """Every published family: the source passes on the GPU, and its CPU-dequantized output is bit
    equal to the source through the GPU's checks as well."""
    from fp8conv import DequantizeOptions, dequantize
    from tests.fixtures_formats import FAMILIES, build

    for name in FAMILIES:
        f = build(name, tmp_path / name)
        code, _, out = _verify(f.root)
        assert code == 0, (name, out)
        dst = tmp_path / name / "out"
        dequantize(f.root, dst, DequantizeOptions(device="cpu"))
        code, report, out = _verify(dst, "--reference", f.root)
        assert code == 0, (name, out)
