"""Finished files are checked, not trusted: a shard changed after it was written (mtime restored) is
redone, a stray file is refused, a side file that differs is rewritten; a real full disk during a
commit resumes byte-identical; no Inf from finite input; empty tensors convert."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fp8conv.checkpoint import output as output_mod
from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.checkpoint.safetensors_io import read_header, save_file
from tests.faultlib import (
    FP8_CONFIG,
    SourceGuard,
    assert_clean_error,
    clean_run,
    cli,
    final_files,
    make_bf16,
    make_fp8,
    shard_name,
    snapshot,
    write_checkpoint,
)

CPU = ("--device", "cpu", "-q")
S1, S2, S3 = (shard_name(i, 3) for i in (1, 2, 3))


def rerun(*args):
    r = cli(*args, *CPU, "--json", "-")
    assert r.code == 0, r
    return r.json()


def _restore_times(p: Path, st: os.stat_result) -> None:
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("kind", ["dequantize", "quantize"])
@pytest.mark.parametrize("damage", ["flip a data byte", "zero the shard", "flip a header digit"])
def test_changed_shard_with_mtime_restored_is_redone(tmp_path, kind, damage):
    make = make_fp8 if kind == "dequantize" else make_bf16
    src, dst = make(tmp_path / "src"), tmp_path / "dst"
    assert cli(kind, src, dst, *CPU).code == 0
    assert not (dst / STATE_DIR).exists()
    p = dst / S2
    st = p.stat()
    data = bytearray(p.read_bytes())
    if damage == "flip a data byte":
        data[-5] ^= 0x01
    elif damage == "zero the shard":
        data = bytearray(len(data))
    else:
        at = data.index(b'"shape":[') + len('"shape":[')
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
    p.write_bytes(bytes(data))
    _restore_times(p, st)
    assert p.stat().st_mtime_ns == st.st_mtime_ns and p.stat().st_size == st.st_size
    summary = rerun(kind, src, dst)
    assert summary["already_complete"] is False
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2
    assert any(S2 in n and "differs" in n for n in summary["notes"]), summary["notes"]
    assert final_files(dst) == clean_run(kind)
    assert not (dst / STATE_DIR).exists()


def test_rerun_confirms_by_content_not_by_stat(tmp_path):
    """A copy of a finished DST elsewhere (new inodes, mtimes) is still recognized as complete."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, *CPU).code == 0
    shutil.copytree(dst, tmp_path / "copy")
    before = snapshot(tmp_path / "copy")
    summary = rerun("dequantize", src, tmp_path / "copy")
    assert summary["already_complete"] is True and summary["stage_seconds"]["confirm"] > 0
    assert snapshot(tmp_path / "copy") == before


def test_stray_file_in_finished_dst_is_refused(tmp_path):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, *CPU).code == 0
    stray = dst / "model-00009-of-00009.safetensors"
    shutil.copy(dst / S1, stray)
    before = snapshot(dst)
    r = cli("dequantize", src, dst, *CPU)
    assert_clean_error(r, 6, "does not write", stray.name, "--overwrite")
    assert snapshot(dst) == before
    summary = rerun("dequantize", src, dst, "--overwrite")
    assert not stray.exists() and summary["shards_written"] == 0
    assert final_files(dst) == clean_run("dequantize")


def test_changed_side_file_in_dst_is_rewritten(tmp_path):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, *CPU).code == 0
    (dst / "tokenizer.json").write_text("{}")
    (dst / "config.json").write_text("{}")
    summary = rerun("dequantize", src, dst)
    assert summary["already_complete"] is False and summary["shards_written"] == 0
    assert final_files(dst) == clean_run("dequantize")


def test_finished_dst_of_another_job_is_refused_naming_the_difference(tmp_path):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, *CPU).code == 0
    before = snapshot(dst)
    r = cli("dequantize", src, dst, *CPU, "--dtype", "fp16")
    assert_clean_error(r, 6, "dtype: was 'bf16', now 'fp16'")
    assert snapshot(dst) == before


def test_commit_failure_after_rename_then_resume(tmp_path, monkeypatch):
    """ENOSPC in the directory fsync after a shard got its final name (the old progress record's
    failure point): the shard is kept by its own hash, counted once by the free-space check."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}") == str(dst):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(output_mod.os, "fsync", fsync)
    r = cli("dequantize", src, dst, *CPU)
    assert_clean_error(r, 5, "No space left on device")
    monkeypatch.undo()
    assert (dst / S2).exists()
    summary = rerun("dequantize", src, dst)
    assert summary["shards_skipped"] == 2
    assert final_files(dst) == clean_run("dequantize")


def test_real_disk_full_on_tmpfs_then_resume(tmp_path):
    """A real full disk (a small tmpfs), at several sizes; after space is freed the rerun completes
    byte-identical and never needs more space than is left to write."""
    clean = clean_run("dequantize")
    total = sum(len(v) for v in clean.values())
    mnt = Path(tempfile.mkdtemp(prefix="fp8conv-tmpfs-"))
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if probe.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    try:
        src = make_fp8(tmp_path / "src")
        guard = SourceGuard(src)
        for size in (total // 3, total // 2, (3 * total) // 4):
            subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
            dst = mnt / "dst"
            r = subprocess.run(
                [sys.executable, "-m", "fp8conv.cli", "dequantize", str(src), str(dst), *CPU],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            assert r.returncode == 5 and "Traceback" not in r.stderr, r.stderr
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
            summary = rerun("dequantize", src, dst)
            assert summary["complete"] is True
            assert final_files(dst) == clean
            shutil.rmtree(dst)
        guard.check()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mnt.rmdir()


# ----------------------------------------------------------------------------------- overflow
def _fp8_with_scale(root: Path, scale: float) -> Path:
    q = torch.full((128, 128), 448.0).to(torch.float8_e4m3fn)
    q[0, :5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).to(torch.float8_e4m3fn)
    shards = [
        {
            "model.layers.0.mlp.down_proj.weight": q,
            "model.layers.0.mlp.down_proj.weight_scale_inv": torch.full((1, 1), scale),
        }
    ]
    return write_checkpoint(root, shards, FP8_CONFIG)


@pytest.mark.parametrize(
    ("dtype", "scale", "needles"),
    [
        ("bf16", 1e37, ("overflows bf16", "no output dtype holds it")),
        ("fp16", 1000.0, ("overflows fp16", "--dtype fp32")),
    ],
)
def test_overflow_is_refused(tmp_path, dtype, scale, needles):
    src = _fp8_with_scale(tmp_path / "src", scale)
    r = cli("dequantize", src, tmp_path / "dst", *CPU, "--dtype", dtype)
    assert_clean_error(r, 4, "down_proj.weight", "element [0, 5]", *needles)
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "dst").glob("*"))


def test_large_but_finite_values_pass(tmp_path):
    src = _fp8_with_scale(tmp_path / "src", 100.0)  # 44800 fits fp16
    assert cli("dequantize", src, tmp_path / "dst", *CPU, "--dtype", "fp16").code == 0
    r = cli("dequantize", src, tmp_path / "dst32", *CPU, "--dtype", "fp32")
    assert r.code == 0


# ----------------------------------------------------------------------------------- empty tensors
def test_empty_tensors_convert(tmp_path):
    src = tmp_path / "bf16"
    src.mkdir()
    save_file(
        {
            "model.layers.0.mlp.experts.weight": torch.zeros(0, 256, 256, dtype=torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight": torch.randn(256, 256).bfloat16(),
        },
        src / "model.safetensors",
        {"format": "pt"},
    )
    r = cli("quantize", src, tmp_path / "fp8", *CPU)
    assert r.code == 0, r
    h = read_header(tmp_path / "fp8" / "model.safetensors")
    assert h.tensors["model.layers.0.mlp.experts.weight"].shape == (0, 256, 256)
    fp8 = tmp_path / "fp8src"
    fp8.mkdir()
    save_file(
        {
            "w.weight": torch.zeros(128, 0).to(torch.float8_e4m3fn),
            "w.weight_scale_inv": torch.zeros(1, 0),
        },
        fp8 / "model.safetensors",
        {"format": "pt"},
    )
    r = cli("dequantize", fp8, tmp_path / "deq", *CPU)
    assert r.code == 0, r
    assert read_header(tmp_path / "deq" / "model.safetensors").tensors["w.weight"].shape == (128, 0)


def test_oversized_config_is_refused(tmp_path):
    src = make_fp8(tmp_path / "src")
    with open(src / "config.json", "r+b") as f:
        f.seek((16 << 20) + 10)
        f.write(b" ")
    r = cli("dequantize", src, tmp_path / "dst", *CPU)
    assert_clean_error(r, 3, "over the", "limit")
    assert not (tmp_path / "dst").exists()


def test_recorded_checksum_for_other_readers(tmp_path):
    """The check verify can use without a plan: the file's own header, its checksum zeroed."""
    from fp8conv.checkpoint.output import recorded_checksum_ok

    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, *CPU).code == 0
    assert all(recorded_checksum_ok(dst / n) is True for n in (S1, S2, S3))
    assert recorded_checksum_ok(src / S1) is None  # not written by fp8conv
    data = bytearray((dst / S2).read_bytes())
    data[-3] ^= 0x80
    (dst / S2).write_bytes(bytes(data))
    assert recorded_checksum_ok(dst / S2) is False


def test_incomplete_output_is_said_even_under_quiet(tmp_path):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    r = cli("dequantize", src, dst, *CPU, "--part", "1/2")
    assert r.code == 0, r
    assert "not complete yet" in r.stderr and "other parts still missing" in r.stderr
    assert (dst / STATE_DIR).is_dir()  # the resume state stays until the output is complete
    r = cli("dequantize", src, dst, *CPU, "--part", "2/2")
    assert r.code == 0 and r.stderr == "", r
    assert not (dst / STATE_DIR).exists()
    assert final_files(dst) == clean_run("dequantize")


def test_nan_code_index_keeps_every_leading_dim(tmp_path):
    q = torch.zeros(2, 3, 128, 128).to(torch.float8_e4m3fn)
    q.view(torch.uint8)[1, 2, 5, 7] = 0x7F
    root = tmp_path / "src"
    root.mkdir()
    w = "model.layers.0.mlp.experts.weight"
    save_file({w: q, w + "_scale_inv": torch.ones(2, 3, 1, 1)}, root / "model.safetensors", {"format": "pt"})
    r = cli("dequantize", root, tmp_path / "dst", *CPU)
    assert_clean_error(r, 4, "element [1, 2, 5, 7]")
