"""verify and inspect on every published layout family (fixtures of tests/fixtures_formats.py, built
from each family's public facts): the FP8 source passes with its scales checked, inspect names the
family, scheme and encodings, the dequantized output passes on its own and bit for bit against the
source, and a planted scale fault or leftover fails naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file, read_header, save_file
from fp8conv.cli import app
from fp8conv.verify import inspect_checkpoint
from tests.fixtures_formats import FAMILIES, build

runner = CliRunner()
FP4 = {"gpt-oss"}  # packed FP4 only: no FP8 weight for the data checks


def verify(*args) -> tuple[int, dict | None, str]:
    r = runner.invoke(app, ["verify", *map(str, args), "--device", "cpu", "--json", "-", "-q"])
    try:
        return r.exit_code, json.loads(r.stdout), r.output
    except ValueError:
        return r.exit_code, None, r.output


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_source_output_and_comparison(name, tmp_path):
    f = build(name, tmp_path)
    info = inspect_checkpoint(f.root)
    assert info["ok"] and info["family"] == f.family, (info["family"], info["detect_error"])
    assert not [o for o in info["odd"] if not o["kind"].startswith("warning:")], info["odd"]
    code, report, out = verify(f.root)
    assert code == 0, out
    fp8 = [t for t in report["tensors"] if t["role"] == "fp8_weight"]
    if name not in FP4:
        assert fp8 and info["schemes"] and info["scale_encodings"]
        for t in fp8:
            assert t["checks"]["scale"]["status"] in ("pass", "warn"), t["checks"]
            assert t["checks"]["scale_values"]["status"] == "pass", t
            assert t["checks"]["nan_codes"]["status"] == "pass", t
    dst = tmp_path / "out"
    r = runner.invoke(app, ["dequantize", str(f.root), str(dst), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    code, report, out = verify(dst)
    assert code == 0, out
    code, report, out = verify(dst, "--reference", f.root)
    assert code == 0, out
    deq = [t for t in report["tensors"] if t["role"] == "dequantized_weight"]
    if name not in FP4:
        assert deq and all("bit-identical" in t["checks"]["reference"]["message"] for t in deq)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in FP4])
def test_family_zero_scale_fails(name, tmp_path):
    f = build(name, tmp_path)
    info = inspect_checkpoint(f.root)
    code, report, _ = verify(f.root)
    [w] = [t for t in report["tensors"] if t["role"] == "fp8_weight"][:1]
    scale = w["metrics"]["scale"]
    path = next(p for p in f.root.glob("*.safetensors") if scale in read_header(p).tensors)
    t = load_file(path)
    if t[scale].dtype in (torch.uint8, torch.float8_e8m0fnu):
        t[scale].view(torch.uint8).view(-1)[0] = 0xFF  # the NaN exponent byte
    else:
        t[scale] = t[scale] * 0
    save_file(t, path, {"format": "pt"})
    code, report, out = verify(f.root)
    assert code == 1, out
    [bad] = [t for t in report["tensors"] if t["name"] == w["name"]]
    assert bad["checks"]["scale_values"]["status"] == "fail", (info["family"], bad)
