"""One job per DST: different jobs lined up on the lock, parts of one job with the same host name and
PID (faked through FP8CONV_TEST_IDENTITY, and real PID namespaces through unshare), stale records.

Each run is a real process; a tiny driver lines several up at the lock (OutputDir.acquire), so
they reach output preparation together, which is when the unlocked version mixed their shards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fp8conv.checkpoint.layout import STATE_DIR
from tests.faultlib import (
    SourceGuard,
    clean_run,
    final_files,
    make_fp8,
    run_process,
)

CPU = ("--device", "cpu", "-q")
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from fp8conv.checkpoint import output
    barrier, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    original = output.OutputDir.acquire

    def acquire(self, *args, **kw):
        open(f"{barrier}.{me}", "w").close()
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{barrier}.{i}") for i in range(n)):
            assert time.monotonic() < deadline, "the other process never came"
            time.sleep(0.0005)
        return original(self, *args, **kw)

    output.OutputDir.acquire = acquire
    from fp8conv.cli import main
    sys.argv = ["fp8conv", *sys.argv[4:]]
    main()
    """
)


def lined_up(barrier: Path, runs: list[tuple[list[str], dict[str, str]]], prefix=()) -> list:
    """Start every run, each waiting at the lock for all the others; (returncode, stderr) each."""
    procs = []
    for i, (args, env) in enumerate(runs):
        cmd = [*prefix, sys.executable, "-c", DRIVER, str(barrier), str(i), str(len(runs)), *args]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        _, err = p.communicate(timeout=180)
        out.append((p.returncode, err))
    return out


def no_traceback(results):
    for _code, err in results:
        assert "Traceback" not in err, err


@pytest.mark.parametrize("trial", range(3))
def test_two_different_jobs_into_one_dst(tmp_path, trial):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    jobs = [["--dtype", "bf16"], ["--dtype", "fp16"]]
    res = lined_up(tmp_path / "barrier", [(["dequantize", str(src), str(dst), *CPU, *j], {}) for j in jobs])
    no_traceback(res)
    codes = [c for c, _ in res]
    assert sorted(codes) == [0, 6], res
    loser = codes.index(6)
    assert "another fp8conv job" in res[loser][1] or "different settings" in res[loser][1], res[loser][1]
    assert "pid" in res[loser][1] or "different settings" in res[loser][1]
    winner = jobs[codes.index(0)]
    assert final_files(dst) == clean_run("dequantize", *winner)
    assert not (dst / STATE_DIR).exists()
    guard.check()


def _fake(host_pid: str) -> dict[str, str]:
    return {"FP8CONV_TEST_IDENTITY": host_pid}


@pytest.mark.parametrize("trial", range(2))
def test_parts_with_the_same_host_and_pid(tmp_path, trial):
    """Two containers, both PID 1 on host 'box', write parts 1/2 and 2/2 of one job into one DST."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    runs = [(["dequantize", str(src), str(dst), *CPU, "--part", f"{i}/2"], _fake("box:1")) for i in (1, 2)]
    res = lined_up(tmp_path / "barrier", runs)
    no_traceback(res)
    assert [c for c, _ in res] == [0, 0], res
    assert final_files(dst) == clean_run("dequantize")
    assert not (dst / STATE_DIR).exists(), "the last part out did not remove the state folder"


def test_same_job_twice_with_the_same_host_and_pid(tmp_path):
    """The same command twice at once: one runs, the other is refused naming it (or, if it came
    after the first finished, finds the output complete); never a mix, never a traceback."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    runs = [(["dequantize", str(src), str(dst), *CPU], _fake("box:1")) for _ in range(2)]
    res = lined_up(tmp_path / "barrier", runs)
    no_traceback(res)
    codes = sorted(c for c, _ in res)
    assert codes in ([0, 0], [0, 6]), res
    for code, err in res:
        if code == 6:
            assert "already running" in err and "pid 1 on host box" in err, err
    assert final_files(dst) == clean_run("dequantize")
    assert not (dst / STATE_DIR).exists()


def test_parts_in_separate_pid_namespaces(tmp_path):
    """Real PID namespaces (unshare -p): each part is PID 1 in its own namespace."""
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -p not allowed here: {probe.stderr.decode().strip()}")
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    runs = [(["dequantize", str(src), str(dst), *CPU, "--part", f"{i}/2"], {}) for i in (1, 2)]
    res = lined_up(tmp_path / "barrier", runs, prefix=("unshare", "-p", "-f", "--mount-proc"))
    no_traceback(res)
    assert [c for c, _ in res] == [0, 0], res
    assert final_files(dst) == clean_run("dequantize")
    assert not (dst / STATE_DIR).exists()


def test_stale_record_of_a_dead_process_elsewhere(tmp_path):
    """A process in another PID namespace (faked) killed mid-shard: while its heartbeat is younger
    than the lease it counts as running (refused, exit 6); once older, the rerun takes over."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    env = dict(os.environ, FP8CONV_TEST_IDENTITY="box:1")
    p = subprocess.run(
        [sys.executable, "-m", "fp8conv.cli", "dequantize", str(src), str(dst), *CPU],
        env={**env, "FP8CONV_FAULT": "mid_shard:2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -9, p.stderr
    again = [sys.executable, "-m", "fp8conv.cli", "dequantize", str(src), str(dst), *CPU]
    r = subprocess.run(again, env={**env, "FP8CONV_LOCK_LEASE": "60"}, capture_output=True, text=True)
    assert r.returncode == 6 and "already running" in r.stderr and "Traceback" not in r.stderr, r.stderr
    time.sleep(1.2)
    r = subprocess.run(again, env={**env, "FP8CONV_LOCK_LEASE": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert final_files(dst) == clean_run("dequantize")
    assert not (dst / STATE_DIR).exists()
    guard.check()


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    """Same kernel and PID namespace: a dead PID (start time checked) is stale without waiting."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    r = run_process("dequantize", src, dst, *CPU, fault="after_shard:1")
    assert r.code == -9
    assert (dst / STATE_DIR / "owner").exists()
    r = run_process("dequantize", src, dst, *CPU)
    assert r.code == 0, r
    assert final_files(dst) == clean_run("dequantize")


def test_filesystem_without_hard_links(tmp_path, monkeypatch):
    """link(2) refused (EPERM, as on some FUSE, SMB and sandboxed filesystems): the lock falls back
    to O_EXCL records; the run completes and a different job is still refused."""
    import errno as errno_mod

    from fp8conv.checkpoint import output as output_mod
    from tests.faultlib import assert_clean_error, cli

    def no_link(*args, **kw):
        raise OSError(errno_mod.EPERM, "Operation not permitted")

    monkeypatch.setattr(output_mod.os, "link", no_link)
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    assert cli("dequantize", src, dst, *CPU, "--part", "1/2").code == 0
    r = cli("dequantize", src, dst, *CPU, "--dtype", "fp16")
    assert_clean_error(r, 6, "different settings")
    assert cli("dequantize", src, dst, *CPU, "--part", "2/2").code == 0
    assert final_files(dst) == clean_run("dequantize")
    assert not (dst / STATE_DIR).exists()
