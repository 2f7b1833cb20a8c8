"""The Python API: a light `import fp8conv`, dry_run that writes nothing and returns the plan,
fp8conv.verify / fp8conv.inspect at top level, typed options, tqdm progress with an opt-out, and
outputs read back by safetensors (an independent reader) bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fp8conv
from fp8conv import DequantizeOptions, QuantizeOptions
from fp8conv.errors import InvalidCheckpoint, UsageError
from tests.conftest import tree_digest

ROOT = Path(__file__).resolve().parent.parent
LLAMA = "llama-tiny-bf16"
DS = "deepseek-tiny-fp8"


def test_import_is_light_and_the_package_is_typed():
    code = (
        "import sys, fp8conv\n"
        "o = fp8conv.QuantizeOptions(format='compressed-tensors', block_size='128x64')\n"
        "d = fp8conv.DequantizeOptions(dtype='fp16')\n"
        "print('torch' in sys.modules, o.block_size, callable(fp8conv.verify), callable(fp8conv.inspect))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "(128,", "64)", "True", "True"]
    assert (ROOT / "fp8conv" / "py.typed").is_file()


def test_options_validate_their_choices():
    with pytest.raises(UsageError, match="--format must be one of fp8, compressed-tensors"):
        QuantizeOptions(format="int4")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--dtype must be one of bf16, fp16, fp32"):
        DequantizeOptions(dtype="fp64")  # type: ignore[arg-type]
    assert QuantizeOptions(skip="*.gate.*").skip == ("*.gate.*",)  # one pattern, not its characters
    assert DequantizeOptions(dtype="fp16").torch_dtype is torch.float16


def test_quantize_dry_run_returns_the_plan_and_writes_nothing(sample, tmp_path):
    src = sample(LLAMA)
    before = tree_digest(src)
    plan = fp8conv.quantize(src, tmp_path / "out", QuantizeOptions(dry_run=True))
    assert isinstance(plan, fp8conv.Plan)
    assert sum(j.action == "quant" for j in plan.jobs()) == 14
    assert "lm_head" in plan.modules_to_not_convert
    assert not (tmp_path / "out").exists()
    assert not src.with_name(f"{src.name}-fp8").exists()
    assert tree_digest(src) == before
    plan = fp8conv.dequantize(sample(DS), options=DequantizeOptions(dry_run=True))
    assert sum(j.action == "dequant" for j in plan.jobs()) == 4
    assert not sample(DS).with_name(f"{DS}-bf16").exists()


def test_quantize_then_verify_and_inspect_from_python(sample, tmp_path):
    src = sample(LLAMA)
    s = fp8conv.quantize(src, tmp_path / "fp8", progress=False)
    assert isinstance(s, fp8conv.Summary) and s.tensors_converted == 14 and s.complete
    report = fp8conv.verify(tmp_path / "fp8", reference=src, progress=False, sample=3, seed=1)
    assert isinstance(report, fp8conv.VerifyReport) and report.ok, report.failures
    assert report.options["sample"] == 3 and report.options["reference"] == str(src)
    info = fp8conv.inspect(tmp_path / "fp8")
    assert info["by_role"]["fp8_weight"]["tensors"] == 14
    # Still the subpackage, too.
    from fp8conv.verify import verify_checkpoint

    assert fp8conv.verify.verify_checkpoint is verify_checkpoint


def test_outputs_read_back_by_safetensors_bit_for_bit(sample, tmp_path):
    src = sample(LLAMA)
    fp8conv.quantize(src, tmp_path / "fp8", progress=False)
    fp8conv.dequantize(tmp_path / "fp8", tmp_path / "bf16", progress=False)
    orig = load_file(src / "model.safetensors")
    q = load_file(tmp_path / "fp8" / "model.safetensors")
    back = load_file(tmp_path / "bf16" / "model.safetensors")
    w = "model.layers.0.mlp.down_proj.weight"
    assert q[w].dtype == torch.float8_e4m3fn and q[w + "_scale_inv"].dtype == torch.float32
    # The quantized tensor is the torch reference's bytes, and the round trip its dequantization.
    from fp8conv.kernels.reference import weight_dequant_torch, weight_quant_torch

    codes, scale = weight_quant_torch(orig[w])
    assert torch.equal(q[w].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(q[w + "_scale_inv"], scale)
    expect = weight_dequant_torch(codes, scale, out_dtype=torch.bfloat16)
    assert torch.equal(back[w].view(torch.int16), expect.view(torch.int16))
    # Kept tensors are byte-identical, and shard metadata survives (beside fp8conv's own record of
    # the job and the content checksum, which reruns and verify read).
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(q[name].view(torch.int16), orig[name].view(torch.int16)), name
    with (
        safe_open(src / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "fp8" / "model.safetensors", "pt") as b,
    ):
        mine = {k: v for k, v in b.metadata().items() if k.startswith("fp8conv.")}
        assert set(mine) == {"fp8conv.job", "fp8conv.checksum"}
        assert {k: v for k, v in b.metadata().items() if k not in mine} == a.metadata()


def test_progress_uses_tqdm_and_can_be_turned_off(sample, tmp_path, capsys):
    src = sample(DS)
    fp8conv.dequantize(src, tmp_path / "a", DequantizeOptions(device="cpu"))
    err = capsys.readouterr().err
    assert "dequantize on cpu" in err and "3/3 shards" in err and "B/s" in err
    fp8conv.dequantize(src, tmp_path / "b", DequantizeOptions(device="cpu"), progress=False)
    assert capsys.readouterr().err == ""


def test_default_dst_and_refusals_from_python(sample, monkeypatch, tmp_path):
    src = sample(LLAMA)
    s = fp8conv.quantize(src, options=QuantizeOptions(format="compressed-tensors"), progress=False)
    assert Path(s.dst) == src.with_name(f"{src.name}-fp8-ct")
    with pytest.raises(InvalidCheckpoint, match="no FP8 weights to dequantize") as e:
        fp8conv.dequantize(src, tmp_path / "o", progress=False)
    assert e.value.exit_code == 3 and "fp8conv quantize" in e.value.hint
    with pytest.raises(InvalidCheckpoint, match=r"--only '\*\.nope\.\*' matches no tensor"):
        fp8conv.quantize(src, tmp_path / "o", QuantizeOptions(only=("*.nope.*",)), progress=False)
    assert not (tmp_path / "o").exists()
    monkeypatch.chdir(tmp_path)
    assert fp8conv.convert.default_dst("deepseek-ai/DeepSeek-V3", "bf16") == Path("DeepSeek-V3-bf16")


def test_cpu_install_needs_no_triton(sample, tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in meta["dependencies"])
    assert any(d.startswith("triton") for d in meta["optional-dependencies"]["gpu"])
    assert meta["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().split()[:3] == [
        "Apache",
        "License",
        "Version",
    ]
    # A conversion, a check and the kernels' CPU path with `import triton` failing, as on a CPU box.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import fp8conv\n"
        f"s = fp8conv.quantize({str(sample(LLAMA))!r}, {str(tmp_path / 'o')!r}, progress=False)\n"
        f"r = fp8conv.verify({str(tmp_path / 'o')!r}, progress=False)\n"
        "print(s.tensors_converted, r.ok)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["14", "True"]


def test_tqdm_rate_leaves_out_resumed_bytes(capsys):
    from fp8conv.convert.progress import TqdmProgress

    p = TqdmProgress("dequantize")
    p.start(3000, 3, "cpu")
    p.advance(1000)
    p.shard_done("model-00001-of-00003.safetensors", skipped=True)  # kept from an earlier run
    p.advance(400)
    p.advance(600)
    p.shard_done("model-00002-of-00003.safetensors")
    d = p.bar.format_dict
    assert d["n"] == 2000 and d["initial"] == 1000  # tqdm's rate is (n - initial) / elapsed
    p.close()
    assert "2/3 shards" in capsys.readouterr().err
