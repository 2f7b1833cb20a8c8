"""Crash safety and resume: SIGKILL at fixed points, SIGTERM/SIGINT, reruns, changed jobs.

Kills use the engine's test hook FP8CONV_FAULT (see engine._fault_point) in a real process; reruns and
refusals run in this process, where a crash is simulated by making the hook raise.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.convert import engine
from tests.faultlib import (
    MAKERS,
    CliResult,
    SourceGuard,
    assert_clean_error,
    assert_no_partial,
    clean_run,
    cli,
    final_files,
    run_process,
    shard_name,
    snapshot,
    start_process,
    tmp_leftovers,
)

KINDS = ["quantize", "dequantize"]
CPU = ("--device", "cpu", "-q")
S1, S2, S3 = (shard_name(i, 3) for i in (1, 2, 3))
INDEX = "model.safetensors.index.json"


class _Crash(BaseException):
    """Stands in for SIGKILL in this process: no except clause of the tool catches it."""


def crash_at(monkeypatch, point: str) -> None:
    def hook(name, shard=None, settle=None):
        if point in (name, f"{name}:{shard}"):
            if settle is not None:
                settle()
            raise _Crash(point)

    monkeypatch.setattr(engine, "_fault_point", hook)


def partial_output(monkeypatch, kind: str, src, dst, point: str = "after_shard:1", *opts: str) -> None:
    """DST as a crash at `point` leaves it (in this process)."""
    with monkeypatch.context() as m:
        crash_at(m, point)
        with pytest.raises(_Crash):
            cli_raise(kind, src, dst, *opts)


def cli_raise(*args):
    """Like cli() but lets the simulated crash through."""
    r = cli(*args)
    if r.exception is not None:
        raise r.exception
    return r


def stats(dst, names):
    return {n: ((dst / n).stat().st_ino, (dst / n).stat().st_mtime_ns) for n in names}


def rerun(kind, src, dst, *opts):
    r = cli(kind, src, dst, "--device", "cpu", "-q", "--json", "-", *opts)
    assert r.code == 0, r
    return r.json()


# ------------------------------------------------------------------------------- SIGKILL and resume
FAULTS = {
    # point: (finished shards under final names, shards absent, index present)
    "after_shard:1": ([S1], [S2, S3], False),
    "mid_shard:2": ([S1], [S2, S3], False),
    "before_index": ([S1, S2, S3], [], False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_then_resume(tmp_path, kind, fault):
    clean = clean_run(kind)
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    r = run_process(kind, src, dst, "--device", "cpu", "-q", fault=fault)
    assert r.code == -9, r
    done, absent, has_index = FAULTS[fault]
    assert_no_partial(dst, clean)
    for n in done:
        assert (dst / n).is_file()
    for n in absent:
        assert not (dst / n).exists()
    assert (dst / INDEX).exists() == has_index
    if fault.startswith("mid_shard"):
        # the killed shard was being written in the state folder, never under its final name
        assert tmp_leftovers(dst) == [S2]
        (partial,) = (dst / STATE_DIR / "tmp").glob(S2 + ".*")
        assert partial.stat().st_size < len(clean[S2])
    before = stats(dst, done)
    guard.check()

    summary = rerun(kind, src, dst)
    assert summary["shards_skipped"] == len(done)
    assert summary["shards_written"] == 3 - len(done)
    assert summary["complete"] is True
    assert stats(dst, done) == before, "finished shards were rewritten"
    assert final_files(dst) == clean
    assert tmp_leftovers(dst) == []
    guard.check()


def test_sigkill_through_entry_point(tmp_path):
    # the console script beside this interpreter (make test runs .venv/bin/python without activating)
    beside = Path(sys.executable).parent / "fp8conv"
    exe = str(beside) if beside.exists() else shutil.which("fp8conv")
    if exe is None:
        pytest.skip("fp8conv entry point not installed")
    import subprocess

    src, dst = MAKERS["dequantize"](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    p = subprocess.run(
        [exe, "dequantize", str(src), str(dst), "--device", "cpu", "-q"],
        env={**__import__("os").environ, "FP8CONV_FAULT": "after_shard:2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -9, p.stderr
    assert sorted(n for n in final_files(dst) if n.endswith(".safetensors")) == [S1, S2]
    summary = rerun("dequantize", src, dst)
    assert summary["shards_skipped"] == 2
    assert final_files(dst) == clean_run("dequantize")
    guard.check()


@pytest.mark.parametrize("kind", KINDS)
def test_rerun_over_finished_output_rewrites_nothing(tmp_path, kind):
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    assert cli(kind, src, dst, "--device", "cpu", "-q").code == 0
    before = snapshot(dst)
    summary = rerun(kind, src, dst)
    assert summary["already_complete"] is True
    assert summary["shards_written"] == 0
    assert snapshot(dst) == before
    guard.check()


def test_finished_output_missing_a_shard_is_repaired(tmp_path):
    src, dst = MAKERS["dequantize"](tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, "--device", "cpu", "-q").code == 0
    (dst / S2).unlink()
    summary = rerun("dequantize", src, dst)
    assert summary["already_complete"] is False
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2
    assert final_files(dst) == clean_run("dequantize")


# ------------------------------------------------------------------------------- SIGTERM / SIGINT
@pytest.mark.parametrize(
    ("kind", "sig", "code"),
    [
        ("dequantize", "TERM", 143),
        ("quantize", "TERM", 143),
        ("quantize", "INT", 130),
        ("dequantize", "INT", 130),
    ],
)
def test_signal_mid_shard(tmp_path, kind, sig, code):
    clean = clean_run(kind)
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    r = run_process(kind, src, dst, "--device", "cpu", "-q", fault=f"mid_shard:2={sig}")
    assert_clean_error(r, code, "interrupted")
    assert_no_partial(dst, clean)
    assert not (dst / S2).exists()
    assert tmp_leftovers(dst) == [], "the interrupted shard's temporary file was left behind"
    summary = rerun(kind, src, dst)
    assert summary["shards_skipped"] == 1
    assert final_files(dst) == clean
    guard.check()


def test_external_sigterm(tmp_path):
    """A SIGTERM sent from outside (the process parks itself mid-shard with SIGSTOP, is sent SIGTERM,
    then SIGCONT): exit 143, the partial shard removed, the rerun resumes."""
    src, dst = MAKERS["quantize"](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    p = start_process("quantize", src, dst, *CPU, fault="mid_shard:3=STOP")
    try:
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        assert tmp_leftovers(dst) == [S3]
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert_clean_error(CliResult(p.returncode, out, err), 143, "interrupted by SIGTERM")
    assert tmp_leftovers(dst) == []
    assert_no_partial(dst, clean_run("quantize"))
    assert rerun("quantize", src, dst)["shards_skipped"] == 2
    assert final_files(dst) == clean_run("quantize")
    guard.check()


# ------------------------------------------------------------------------------- in-process crashes
@pytest.mark.parametrize("point", ["after_shard:2", "mid_shard:3", "before_index", "before_complete"])
@pytest.mark.parametrize("kind", KINDS)
def test_simulated_crash_then_resume(tmp_path, monkeypatch, kind, point):
    clean = clean_run(kind)
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    partial_output(monkeypatch, kind, src, dst, point, "--device", "cpu", "-q")
    assert_no_partial(dst, clean)
    skipped = {"after_shard:2": 2, "mid_shard:3": 2, "before_index": 3, "before_complete": 3}[point]
    summary = rerun(kind, src, dst)
    assert summary["shards_skipped"] == skipped
    assert final_files(dst) == clean
    guard.check()


def test_crash_before_job_file_does_not_block_rerun(tmp_path):
    """A kill between creating DST/.fp8conv and writing job.json leaves only the state folder."""
    src, dst = MAKERS["dequantize"](tmp_path / "src"), tmp_path / "dst"
    (dst / STATE_DIR / "tmp").mkdir(parents=True)
    (dst / STATE_DIR / "done").mkdir()
    assert cli("dequantize", src, dst, "--device", "cpu", "-q").code == 0
    assert final_files(dst) == clean_run("dequantize")


# ------------------------------------------------------------------------------- changed jobs
def _refused(r, dst, before, *needles):
    assert_clean_error(r, 6, *needles)
    assert snapshot(dst) == before, "a refused resume wrote into DST"


def test_resume_refuses_other_dtype(tmp_path, monkeypatch):
    src, dst = MAKERS["dequantize"](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    partial_output(monkeypatch, "dequantize", src, dst, "after_shard:1", "--device", "cpu", "-q")
    before = snapshot(dst)
    r = cli("dequantize", src, dst, "--dtype", "fp16", "--device", "cpu", "-q")
    _refused(r, dst, before, "different settings", "dtype: was 'bf16', now 'fp16'")
    # the original command still resumes; --overwrite with the new one starts over
    assert rerun("dequantize", src, dst)["shards_skipped"] == 1
    assert rerun("dequantize", src, dst, "--dtype", "fp16", "--overwrite")["shards_skipped"] == 0
    assert final_files(dst) == clean_run("dequantize", "--dtype", "fp16")
    guard.check()


def test_resume_refuses_other_quantize_options(tmp_path, monkeypatch):
    src, dst = MAKERS["quantize"](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    partial_output(monkeypatch, "quantize", src, dst, "after_shard:1", "--device", "cpu", "-q")
    before = snapshot(dst)
    r = cli("quantize", src, dst, "--block-size", "64", "--device", "cpu", "-q")
    _refused(r, dst, before, "block_size: was [128, 128], now [64, 64]")
    r = cli("quantize", src, dst, "--format", "compressed-tensors", "--device", "cpu", "-q")
    _refused(r, dst, before, "format: was 'fp8', now 'compressed-tensors'")
    guard.check()


def _flip_data_byte(path, from_end=10):
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("finished", [False, True])
def test_resume_refuses_modified_source(tmp_path, monkeypatch, kind, finished):
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    if finished:
        assert cli(kind, src, dst, "--device", "cpu", "-q").code == 0
    else:
        partial_output(monkeypatch, kind, src, dst, "after_shard:1", "--device", "cpu", "-q")
    before = snapshot(dst)
    _flip_data_byte(src / S3)  # same size, same header: only the data changed
    r = cli(kind, src, dst, "--device", "cpu", "-q")
    _refused(r, dst, before, "different settings", S3)


def test_resume_refuses_changed_side_file(tmp_path, monkeypatch):
    src, dst = MAKERS["dequantize"](tmp_path / "src"), tmp_path / "dst"
    partial_output(monkeypatch, "dequantize", src, dst, "after_shard:1", "--device", "cpu", "-q")
    before = snapshot(dst)
    (src / "tokenizer.json").write_text('{"changed": true}')
    r = cli("dequantize", src, dst, "--device", "cpu", "-q")
    _refused(r, dst, before, "tokenizer.json")
