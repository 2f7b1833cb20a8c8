"""Early writeback (start_writeback: sync_file_range hints while a shard is written) and the per-stage
timings in the summary (stage_seconds): what is timed, what is hinted, and that neither changes a byte."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from fp8conv import DequantizeOptions, dequantize
from fp8conv.checkpoint import output as output_mod
from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.checkpoint.output import SYNC_FILE_RANGE_WRITE, OutputDir, start_writeback
from fp8conv.checkpoint.safetensors_io import ShardReader
from fp8conv.convert import engine
from tests.faultlib import (
    assert_clean_error,
    assert_no_partial,
    clean_run,
    cli,
    final_files,
    make_bf16,
    make_fp8,
    tmp_leftovers,
)

DS = "deepseek-tiny-fp8"
STAGES = ("read", "convert", "write", "commit")
CPU = ("--device", "cpu")
linux_only = pytest.mark.skipif(
    output_mod._resolve_sync_file_range() is None, reason="libc has no sync_file_range"
)


def _path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Calls(list):
    """(fd, offset, length, flags) per call, and the path fd named at the time of the call."""

    paths: list[str]


@pytest.fixture
def recorder(monkeypatch):
    """Replace the resolved libc function with one that records its arguments and then calls the
    real one (or returns 0 where there is none)."""
    real = output_mod._sync_file_range
    calls = Calls()
    calls.paths = []

    def fake(fd, offset, length, flags):
        calls.append((fd, offset, length, flags))
        calls.paths.append(_path(fd))
        return real(fd, offset, length, flags) if real is not None else 0

    monkeypatch.setattr(output_mod, "_sync_file_range", fake)
    monkeypatch.delenv("FP8CONV_WRITEBACK", raising=False)
    return calls


# ---------------------------------------------------------------------------------- stage timings
def test_json_summary_has_stage_seconds(sample, tmp_path):
    src, dst = sample(DS), tmp_path / "out"
    r = cli("dequantize", src, dst, *CPU, "--quiet", "--json", "-")
    assert r.code == 0, r
    summary = r.json()
    stages = summary["stage_seconds"]
    assert set(STAGES) <= set(stages)
    for k in STAGES:
        assert isinstance(stages[k], (int, float)) and stages[k] >= 0, (k, stages)
        assert stages[k] == round(stages[k], 3)  # rounded in the JSON
    assert stages["convert"] > 0
    assert stages["wall"] == pytest.approx(summary["seconds"], abs=1e-3)
    # a rerun finds the output complete: nothing read, converted, written or committed
    r = cli("dequantize", src, dst, *CPU, "--quiet", "--json", "-")
    assert r.code == 0, r
    again = r.json()
    assert again["already_complete"]
    assert {k: again["stage_seconds"][k] for k in STAGES} == dict.fromkeys(STAGES, 0.0)


def test_stage_seconds_not_in_human_output(sample, tmp_path):
    r = cli("dequantize", sample(DS), tmp_path / "out", *CPU)
    assert r.code == 0, r
    assert "dequantize: " in r.stderr and "tensors converted" in r.stderr
    text = (r.stdout + r.stderr).replace(str(tmp_path), "DST").lower()  # the output path is named
    assert "stage" not in text and "commit" not in text


def test_stage_seconds_time_the_right_calls(tmp_path, monkeypatch):
    """Slow down the reader's reads and the commits by a known amount: the stages they belong to
    grow by at least that much, while the others stay below it."""
    delay = 0.05
    reads: list[str] = []
    commits: list[str] = []
    original_read, original_commit = ShardReader.read_into, OutputDir.commit

    def slow_read(self, buf, offset, tensor=None):
        time.sleep(delay)
        reads.append(threading.current_thread().name)
        return original_read(self, buf, offset, tensor)

    def slow_commit(self, tmp, rel):
        time.sleep(delay)
        commits.append(rel)
        return original_commit(self, tmp, rel)

    monkeypatch.setattr(ShardReader, "read_into", slow_read)
    monkeypatch.setattr(OutputDir, "commit", slow_commit)
    summary = dequantize(make_fp8(tmp_path / "src"), tmp_path / "dst", DequantizeOptions(device="cpu"))
    st = summary.stage_seconds
    # read_into also serves the scales, on the calling thread: only the reader thread's reads count
    piece_reads = sum(name.startswith("fp8conv-read") for name in reads)
    assert piece_reads >= summary.tensors_converted > 0 and piece_reads < len(reads)
    assert delay * piece_reads <= st["read"] < delay * (piece_reads + 1)
    # commit() also places the index, config and other files: only the shards' commits count
    shard_commits = sum(rel.endswith(".safetensors") for rel in commits)
    assert shard_commits == summary.shards_written == 3 and len(commits) > shard_commits
    assert delay * shard_commits <= st["commit"] < delay * (shard_commits + 1)
    assert 0 < st["convert"] < delay and 0 < st["write"] < delay
    assert st["wall"] == summary.seconds
    d = summary.to_dict()["stage_seconds"]
    assert d == {k: round(v, 3) for k, v in st.items()}


# ---------------------------------------------------------------------------------- writeback hint
@linux_only
def test_start_writeback_real_file_keeps_content(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(3 << 20)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        assert start_writeback(fd, 0, len(data)) is True
        assert start_writeback(fd, 1 << 20, 1 << 20) is True  # a part of the file
        assert start_writeback(fd, len(data), 4096) is True  # past the end: nothing to write, no error
        assert output_mod._sync_file_range is not None  # still in use
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert p.read_bytes() == data


def test_start_writeback_disabled_by_env(tmp_path, monkeypatch, recorder):
    fd = os.open(tmp_path / "f.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 8192, 0)
        monkeypatch.setenv("FP8CONV_WRITEBACK", "0")
        assert start_writeback(fd, 0, 8192) is False
        assert recorder == []
        monkeypatch.setenv("FP8CONV_WRITEBACK", "1")
        assert start_writeback(fd, 0, 8192) is True
        assert recorder == [(fd, 0, 8192, SYNC_FILE_RANGE_WRITE)]
        assert start_writeback(fd, 0, 0) is False  # nothing to hint: no call
        assert len(recorder) == 1
    finally:
        os.close(fd)


@linux_only
def test_start_writeback_error_turns_it_off(monkeypatch):
    """A failing call (here ESPIPE: a pipe) is silent and stops all later calls in the process."""
    monkeypatch.setattr(output_mod, "_sync_file_range", output_mod._resolve_sync_file_range())
    monkeypatch.delenv("FP8CONV_WRITEBACK", raising=False)
    r, w = os.pipe()
    try:
        assert start_writeback(w, 0, 4096) is False
        assert output_mod._sync_file_range is None
    finally:
        os.close(r)
        os.close(w)


def test_start_writeback_missing_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setattr(output_mod, "_sync_file_range", None)
    monkeypatch.delenv("FP8CONV_WRITEBACK", raising=False)
    fd = os.open(tmp_path / "f.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert start_writeback(fd, 0, 4096) is False
    finally:
        os.close(fd)


def test_shard_writer_hints_every_chunk(tmp_path, monkeypatch, recorder):
    """With a small chunk, the writer hints ranges of each shard's temporary file as it goes; the
    output is byte-identical to a run without hints, and the fsync before each rename still runs."""
    clean = clean_run("dequantize")  # (cached or made now, before anything below is patched)
    recorder.clear()
    monkeypatch.setattr(engine, "WRITEBACK_CHUNK", 4096)
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        fsynced.append(_path(fd))
        return real_fsync(fd)

    monkeypatch.setattr(output_mod.os, "fsync", fsync)
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    tmp_dir = str((dst / STATE_DIR / "tmp").resolve()) + os.sep
    r = cli("dequantize", src, dst, *CPU, "-q")
    assert r.code == 0, r
    out = final_files(dst)
    assert out == clean
    shards = {k: len(v) for k, v in out.items() if k.endswith(".safetensors")}
    assert len(shards) == 3
    hinted: dict[str, int] = {}
    for (_, off, length, flags), path in zip(recorder, recorder.paths, strict=True):
        assert flags == SYNC_FILE_RANGE_WRITE
        assert path.startswith(tmp_dir), path  # only the shards' temporary files
        name = path[len(tmp_dir) :].rsplit(".", 1)[0]
        assert off >= 0 and length >= 4096 and off + length <= shards[name]
        hinted[name] = hinted.get(name, 0) + length
    # every shard hinted, about all of it but its last < 4 KiB (ranges do not overlap here)
    assert {k: shards[k] - v < 4096 + 1024 for k, v in hinted.items()} == dict.fromkeys(shards, True)
    # durability unchanged: each shard's temporary file is still fsynced before its rename
    fsynced_tmp = {p[len(tmp_dir) :].rsplit(".", 1)[0] for p in fsynced if p.startswith(tmp_dir)}
    assert set(shards) <= fsynced_tmp

    recorder.clear()
    monkeypatch.setenv("FP8CONV_WRITEBACK", "0")
    dst2 = tmp_path / "dst2"
    r = cli("dequantize", src, dst2, *CPU, "-q")
    assert r.code == 0, r
    assert recorder == []
    assert final_files(dst2) == clean


def test_written_ranges_cover_what_was_written(tmp_path, monkeypatch):
    """The hinted ranges span exactly the bytes written since the previous hint (out of order too)."""
    hints: list[tuple[int, int]] = []
    monkeypatch.setattr(engine, "WRITEBACK_CHUNK", 100)
    monkeypatch.setattr(engine, "start_writeback", lambda fd, off, n: hints.append((off, n)) or True)
    w = engine._ShardWriter.__new__(engine._ShardWriter)
    w.fd, w.unhinted, w.hint_lo, w.hint_hi, w.hint_lock = 7, 0, 0, 0, threading.Lock()
    w._written(0, 60)
    assert hints == []
    w._written(60, 50)  # 110 bytes: hint [0, 110)
    assert hints == [(0, 110)]
    w._written(300, 80)  # a later tensor, then a scale before it
    w._written(200, 30)  # 110 again: [200, 380)
    assert hints == [(0, 110), (200, 180)]
    w._written(380, 10)
    assert len(hints) == 2 and w.unhinted == 10


@pytest.mark.parametrize("kind", ["dequantize", "quantize"])
def test_several_writer_threads_same_bytes(tmp_path, monkeypatch, recorder, kind):
    """Writer threads in parallel (as beside a GPU) over small pieces: the output is byte-identical
    to a one-writer run, and the hints still cover each shard's temporary file."""
    clean = clean_run(kind)
    recorder.clear()
    monkeypatch.setattr(engine, "CPU_WRITERS", 4)
    monkeypatch.setattr(engine, "PIECE_ELEMS", 128 * 128)
    monkeypatch.setattr(engine, "WRITEBACK_CHUNK", 4096)
    writers: set[str] = set()
    real_pwrite = engine.os.pwrite

    def pwrite(fd, data, off):  # which threads wrote
        writers.add(threading.current_thread().name)
        return real_pwrite(fd, data, off)

    monkeypatch.setattr(engine.os, "pwrite", pwrite)
    src = (make_fp8 if kind == "dequantize" else make_bf16)(tmp_path / "src")
    dst = tmp_path / "dst"
    r = cli(kind, src, dst, *CPU, "-q")
    assert r.code == 0, r
    assert final_files(dst) == clean
    assert len({w for w in writers if w.startswith("fp8conv-write")}) >= 2, writers
    assert len(recorder) > 0


@pytest.mark.parametrize("kind", ["dequantize", "quantize"])
def test_write_failure_with_several_writers_then_resume(tmp_path, monkeypatch, kind):
    """A disk-full error in one of several writer threads: exit 5 naming the shard, no partial file
    under a final name, no temporary file left; the rerun resumes to the clean run's bytes."""
    clean = clean_run(kind)
    monkeypatch.setattr(engine, "CPU_WRITERS", 4)
    monkeypatch.setattr(engine, "PIECE_ELEMS", 128 * 128)
    real_pwrite = engine.os.pwrite
    count = {"n": 0}
    lock = threading.Lock()

    def pwrite(fd, data, off):
        if threading.current_thread().name.startswith("fp8conv-write"):
            with lock:
                count["n"] += 1
                fail = count["n"] == 3
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, off)

    monkeypatch.setattr(engine.os, "pwrite", pwrite)
    src, dst = (make_fp8 if kind == "dequantize" else make_bf16)(tmp_path / "src"), tmp_path / "dst"
    r = cli(kind, src, dst, *CPU)
    assert count["n"] >= 3  # the failing write happened
    assert_clean_error(r, 5, "No space left on device", ".safetensors")
    assert_no_partial(dst, clean)
    assert tmp_leftovers(dst) == []
    monkeypatch.setattr(engine.os, "pwrite", real_pwrite)
    r = cli(kind, src, dst, *CPU)
    assert r.code == 0, r
    assert final_files(dst) == clean
