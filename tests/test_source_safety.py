"""The source is read-only in every path, nothing in it is skipped silently, and DST holds only the
model after success: --json into SRC, unreadable folders (as an unprivileged user), links, .git."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fp8conv.checkpoint.layout import STATE_DIR
from tests.faultlib import (
    SourceGuard,
    assert_clean_error,
    clean_run,
    cli,
    final_files,
    make_bf16,
    make_fp8,
    shard_name,
)

CPU = ("--device", "cpu", "-q")
S2 = shard_name(2, 3)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target", [S2, "config.json", "link-into-src", "assets/new.json"])
def test_json_into_src_is_refused(tmp_path, target):
    src = make_fp8(tmp_path / "src")
    (tmp_path / "link-into-src").symlink_to(src / S2)
    guard = SourceGuard(src)
    path = tmp_path / target if target == "link-into-src" else src / target
    r = cli("dequantize", src, tmp_path / "dst", *CPU, "--json", path)
    assert_clean_error(r, 6, "--json", str(src.name))
    assert not (tmp_path / "dst").exists(), "refused only after converting"
    guard.check()


def test_json_into_dst_or_verified_checkpoint_is_refused(tmp_path):
    src = make_fp8(tmp_path / "src")
    dst = tmp_path / "dst"
    r = cli("dequantize", src, dst, *CPU, "--json", dst / "summary.json")
    assert_clean_error(r, 6, "lies inside")
    assert cli("dequantize", src, dst, *CPU).code == 0
    guard = SourceGuard(dst)
    for cmd in (["verify", dst], ["inspect", dst]):
        r = cli(*cmd, "--json", dst / "config.json")
        assert_clean_error(r, 6, "--json")
    guard.check()


def test_json_written_atomically_and_never_through_a_link(tmp_path):
    src = make_fp8(tmp_path / "src")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "summary.json").symlink_to(victim)
    r = cli("dequantize", src, tmp_path / "dst", *CPU, "--json", tmp_path / "summary.json")
    assert r.code == 0, r
    assert victim.read_text() == "precious"
    assert not (tmp_path / "summary.json").is_symlink()
    assert '"ok": true' in (tmp_path / "summary.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src", "summary.json", "victim"]


def test_clean_output_no_git_no_caches_no_state(tmp_path):
    src = make_bf16(tmp_path / "src")
    (src / ".git" / "lfs" / "objects").mkdir(parents=True)
    (src / ".git" / "lfs" / "objects" / "blob").write_bytes(b"x" * 1000)
    (src / ".cache" / "huggingface").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "download.lock").write_text("")
    (src / "assets" / "__pycache__").mkdir()
    (src / "assets" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    guard = SourceGuard(src)
    r = cli("quantize", src, tmp_path / "dst", "--device", "cpu", "--json", "-")
    assert r.code == 0, r
    notes = " ".join(r.json()["notes"])
    assert ".git/" in notes and ".cache/" in notes and "__pycache__" in notes
    names = {str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*")}
    assert not any(n.startswith((".git", ".cache", STATE_DIR)) or "__pycache__" in n for n in names), names
    assert final_files(tmp_path / "dst") == clean_run("quantize")
    guard.check()


def test_linked_folder_inside_src_is_copied(tmp_path):
    src = make_fp8(tmp_path / "src")
    (src / "more").symlink_to("assets")
    r = cli("dequantize", src, tmp_path / "dst", *CPU)
    assert r.code == 0, r
    out = tmp_path / "dst" / "more"
    assert out.is_dir() and not out.is_symlink()
    assert (out / "NOTICE.txt").read_bytes() == (src / "assets" / "NOTICE.txt").read_bytes()


@pytest.mark.parametrize(
    "case",
    ["link loop in folder", "side files linking to each other", "index shard is a link loop", "fifo"],
)
def test_links_and_special_files_refused_without_traceback(tmp_path, case):
    src = make_fp8(tmp_path / "src")
    if case == "link loop in folder":
        (src / "assets" / "up").symlink_to("..")
        needle = "loop"
    elif case == "side files linking to each other":
        (src / "a.json").symlink_to("b.json")
        (src / "b.json").symlink_to("a.json")
        needle = "loop"
    elif case == "index shard is a link loop":
        (src / S2).unlink()
        (src / S2).symlink_to(S2)
        needle = "loop"
    else:
        (src / S2).unlink()
        os.mkfifo(src / S2)
        needle = "not a regular file"
    guard = SourceGuard(src)
    for cmd in ("dequantize", "quantize"):
        r = cli(cmd, src, tmp_path / "dst", *CPU)
        assert_clean_error(r, 3, needle)
    assert not (tmp_path / "dst").exists()
    guard.check()


def test_dst_symlink_loop_and_missing_parent(tmp_path):
    src = make_fp8(tmp_path / "src")
    (tmp_path / "loop").symlink_to("loop")
    assert_clean_error(cli("dequantize", src, tmp_path / "loop", *CPU), 6, "symlink loop")
    deep = tmp_path / "a" / "b" / "c" / "dst"
    assert_clean_error(cli("dequantize", src, deep, *CPU), 5, "parent folder", "does not exist", "mkdir -p")
    assert not (tmp_path / "a").exists()


def _as_nobody(args: list[str], cwd: Path):
    for tool in (
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        ["runuser", "-u", "nobody", "--"],
    ):
        if shutil.which(tool[0]):
            probe = subprocess.run([*tool, "true"], capture_output=True)
            if probe.returncode == 0:
                env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(cwd)}
                # The unprivileged user must be able to read this checkout and its Python packages (a
                # clone inside a 0700 folder, as `mktemp -d` makes, is not readable by it).
                imports = subprocess.run(
                    [*tool, sys.executable, "-c", "import fp8conv.cli"], capture_output=True, env=env, cwd=cwd
                )
                if imports.returncode != 0:
                    pytest.skip(
                        "the unprivileged user cannot import fp8conv from this checkout (its folder or the "
                        "virtual environment is not readable by others)"
                    )
                return subprocess.run(
                    [*tool, sys.executable, "-m", "fp8conv.cli", *args],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=cwd,
                    timeout=120,
                )
    pytest.skip("neither setpriv nor runuser can drop to an unprivileged user here")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as an unprivileged user")
@pytest.mark.parametrize("mode", [0o311, 0o600, 0o000])
def test_unreadable_folder_as_unprivileged_user(mode):
    base = Path(tempfile.mkdtemp(prefix="fp8conv-perm-"))
    try:
        base.chmod(0o777)
        src = make_fp8(base / "src")
        for p in [src, *src.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (src / "assets").chmod(mode)
        r = _as_nobody(["dequantize", str(src), str(base / "dst"), *CPU], base)
        assert r.returncode == 5, r.stderr
        assert "Traceback" not in r.stderr and "assets" in r.stderr and "permission" in r.stderr.lower()
        assert not (base / "dst").exists()
        src.chmod(0o600)  # no execute bit on SRC itself
        r = _as_nobody(["dequantize", str(src), str(base / "dst"), *CPU], base)
        # refused by the argument parser (exit 2, "not readable") or by fp8conv (exit 5)
        assert r.returncode in (2, 5) and "Traceback" not in r.stderr, r.stderr
        assert "readable" in r.stderr or "permission" in r.stderr.lower(), r.stderr
    finally:
        for p in [base, *base.rglob("*")] if base.exists() else []:
            try:
                p.chmod(0o755)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def test_a_newline_in_a_file_name_keeps_the_error_on_one_line(tmp_path):
    """A shard named with a newline: the error names it escaped, on the one line logs and greps read."""
    import json

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x\ny.safetensors"}}))
    r = cli("dequantize", src, tmp_path / "out", *CPU)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.code == 3 and len(errors) == 1 and "x\\ny.safetensors" in errors[0], r
