"""--part I/N (union byte-identical to one run) and the memory bound (peak RSS by tensors, not shards)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import save_file
from fp8conv.cli import app

runner = CliRunner()


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def files(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".fp8conv" not in p.parts
    }


@pytest.mark.parametrize(
    "command,src_name", [("dequantize", "deepseek-tiny-fp8"), ("quantize", "llama-tiny-bf16")]
)
def test_parts_in_one_folder_equal_a_single_run(sample, tmp_path, command, src_name):
    src = sample(src_name)
    if command == "quantize":  # a sharded bf16 source, so parts have shards to share
        cli("dequantize", sample("deepseek-tiny-fp8"), tmp_path / "bf16", "-q")
        src = tmp_path / "bf16"
    cli(command, src, tmp_path / "one", "-q")
    r1 = runner.invoke(
        app, [command, str(src), str(tmp_path / "parts"), "--part", "1/2", "-q", "--json", "-"]
    )
    assert r1.exit_code == 0 and json.loads(r1.stdout)["complete"] is False
    r2 = runner.invoke(
        app, [command, str(src), str(tmp_path / "parts"), "--part", "2/2", "-q", "--json", "-"]
    )
    assert r2.exit_code == 0 and json.loads(r2.stdout)["complete"] is True
    assert files(tmp_path / "parts") == files(tmp_path / "one")


def test_parts_in_separate_folders_merge_by_copying(sample, tmp_path):
    src = sample("deepseek-tiny-fp8")
    cli("dequantize", src, tmp_path / "one", "-q")
    for i in (1, 2, 3):
        cli("dequantize", src, tmp_path / f"p{i}", "--part", f"{i}/3", "-q")
    merged = tmp_path / "merged"
    merged.mkdir()
    for i in (1, 2, 3):
        for p in (tmp_path / f"p{i}").iterdir():
            if p.name != ".fp8conv":
                if p.is_dir():
                    shutil.copytree(p, merged / p.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(p, merged / p.name)
    assert files(merged) == files(tmp_path / "one")
    # every part wrote the same index and config
    for i in (1, 2, 3):
        for name in ("model.safetensors.index.json", "config.json"):
            assert (tmp_path / f"p{i}" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_bad_part_is_a_usage_error(sample, tmp_path):
    for bad in ("0/2", "3/2", "x"):
        r = runner.invoke(
            app, ["dequantize", str(sample("deepseek-tiny-fp8")), str(tmp_path / "o"), "--part", bad]
        )
        assert r.exit_code == 2, bad


@pytest.mark.slow
def test_peak_memory_is_bounded_by_tensors_not_shards(tmp_path):
    """One 384 MB shard of 1 MB tensors: dequantize (768 MB out) must not hold the shard in memory.
    Bound: 2 x largest output tensor + 1 GiB, the same for any shard size; a whole-shard converter
    would hold 384 MB in + 768 MB out above the interpreter's own ~0.3 GB and cross it."""
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(384):
        b = torch.randint(0, 0x7E, (1024, 1024), generator=gen, dtype=torch.int32).to(torch.uint8)
        tensors[f"layers.{i}.weight"] = b.view(torch.float8_e4m3fn)
        tensors[f"layers.{i}.weight_scale_inv"] = torch.rand(8, 8, generator=gen) + 0.5
    save_file(tensors, src / "model.safetensors", {"format": "pt"})
    del tensors
    largest_out = 1024 * 1024 * 2
    code = (
        "import sys;from fp8conv.cli import app;"
        "sys.argv=['fp8conv','dequantize',sys.argv[1],sys.argv[2],'-q'];"
        "import typer\n"
        "try:\n app()\nexcept SystemExit as e:\n assert not e.code, e.code\n"
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    # VmHWM, not getrusage: Linux carries ru_maxrss over fork and exec, so a child of a large pytest
    # process would report the parent's peak (seen: 1.9 GB after the resume tests).
    out = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = int(out.stdout.strip().splitlines()[-1])
    bound = 2 * largest_out + (1 << 30)
    assert peak < bound, f"peak RSS {peak / 1e6:.0f} MB over the bound {bound / 1e6:.0f} MB"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 768e6
