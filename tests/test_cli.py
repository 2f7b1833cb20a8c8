"""The command line a newcomer types: default DSTs, verify in the current folder, --version, -h,
`python -m fp8conv`, choices shown and checked, refusals of jobs that would do nothing, the grouped
dry-run at 80 columns, progress in a pipe and on a pseudo-terminal, and Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fp8conv import JSON_SCHEMA_VERSION, __version__
from fp8conv.cli import app
from tests.conftest import tree_digest

ROOT = Path(__file__).resolve().parent.parent
LLAMA = "llama-tiny-bf16"
DS = "deepseek-tiny-fp8"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def run(*args, env=None, cwd=None, **kw):
    """`python -m fp8conv ARGS` in a fresh process, stdout and stderr through pipes."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fp8conv", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
        **kw,
    )


# ------------------------------------------------------------------------------- design card usage
def test_quantize_without_dst_writes_scheme_named_folder_beside_src(sample):
    src = sample(LLAMA)
    r = cli("quantize", src, "--device", "cpu")
    assert r.exit_code == 0, r.output
    dst = src.with_name(f"{src.name}-fp8")
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert f"-> {dst}" in r.stderr and f"output in {dst}" in r.stderr


def test_compressed_tensors_default_dst_says_its_layout(sample):
    src = sample(LLAMA)
    r = cli("quantize", src, "--format", "compressed-tensors", "-q")
    assert r.exit_code == 0, r.output
    cfg = json.loads((src.with_name(f"{src.name}-fp8-ct") / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_dequantize_without_dst_writes_dtype_named_folder(sample, dtype):
    src = sample(DS)
    r = cli("dequantize", src, "--dtype", dtype, "-q")
    assert r.exit_code == 0, r.output
    dst = src.with_name(f"{src.name}-{dtype}")
    assert (dst / "model.safetensors.index.json").is_file()
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())


def test_trailing_slash_and_dot_name_the_folder_itself(sample, monkeypatch):
    src = sample(LLAMA)
    r = cli("quantize", f"{src}/", "-q")
    assert r.exit_code == 0, r.output
    assert (src.with_name(f"{src.name}-fp8") / "model.safetensors").is_file()
    monkeypatch.chdir(src)
    r = cli("quantize", ".", "--format", "compressed-tensors", "-q")
    assert r.exit_code == 0, r.output
    assert (src.with_name(f"{src.name}-fp8-ct") / "model.safetensors").is_file()


def test_verify_and_inspect_default_to_the_current_folder(sample, monkeypatch, tmp_path):
    src = sample(LLAMA)
    assert cli("quantize", src, tmp_path / "out", "-q").exit_code == 0
    monkeypatch.chdir(tmp_path / "out")
    r = cli("verify", "--reference", src, "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] and report["schema_version"] == JSON_SCHEMA_VERSION
    r = cli("inspect", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"]


def test_verify_outside_a_checkpoint_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("verify", "--json", "-")
    assert r.exit_code == 2
    assert "not a checkpoint" in r.stderr and "fp8conv verify PATH" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and doc["error"] == "usage"
    assert cli("inspect").exit_code == 2


def test_version_help_and_python_dash_m():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"fp8conv {__version__}"
    for args in (["-h"], ["--help"], ["quantize", "-h"], ["verify", "-h"]):
        r = cli(*args)
        assert r.exit_code == 0 and "Usage" in r.stdout, args
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"fp8conv {__version__}"
    p = run("-h")
    assert p.returncode == 0 and "--install-completion" in p.stdout  # shell completion offered


def test_help_shows_choices_and_placeholders_not_python_types():
    r = runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    text = r.stdout
    assert "<fp8|compressed-tensors>" in text and "<float|ue8m0>" in text
    assert "--skip" in text and "PATTERN" in text and "repeatable" in text
    assert "<list[str]>" not in text
    flag_lines = [ln for ln in text.splitlines() if re.search(r"--(dry-run|quiet|overwrite|full)\b", ln)]
    assert len(flag_lines) == 4 and not any("<bool>" in ln for ln in flag_lines), flag_lines
    assert "[DST]" in text
    r = runner.invoke(app, ["dequantize", "--help"], terminal_width=200)
    assert "<bf16|fp16|fp32>" in r.stdout


def test_bad_choice_lists_the_choices(sample, tmp_path):
    r = cli("quantize", sample(LLAMA), tmp_path / "o", "--format", "int4")
    assert r.exit_code == 2
    assert "fp8" in r.output and "compressed-tensors" in r.output
    assert not (tmp_path / "o").exists()


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\nfrom fp8conv.cli import app\n"
        "for a in (['--help'], ['--version'], ['quantize', '-h']):\n"
        "    try:\n        app(a)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"


# ----------------------------------------------------------------------------- no silent no-ops
def test_dequantize_of_a_bf16_checkpoint_is_refused_with_the_right_command(sample, tmp_path):
    src = sample(LLAMA)
    before = tree_digest(src)
    r = cli("dequantize", src, tmp_path / "o", "--json", tmp_path / "e.json")
    assert r.exit_code == 3
    assert "no FP8 weights to dequantize" in r.stderr and "fp8conv quantize" in r.stderr
    assert not (tmp_path / "o").exists() and tree_digest(src) == before
    err = json.loads((tmp_path / "e.json").read_text())
    assert err["ok"] is False and err["exit_code"] == 3 and err["schema_version"] == JSON_SCHEMA_VERSION


def test_only_matching_nothing_is_an_error_naming_the_pattern(sample, tmp_path):
    r = cli("quantize", sample(LLAMA), tmp_path / "o", "--only", "*.mlp.*", "--only", "*.experts.*")
    assert r.exit_code == 3
    assert "--only '*.experts.*' matches no tensor" in r.stderr and "'*.mlp.*' matches" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_skip_matching_nothing_is_named_and_the_run_goes_on(sample, tmp_path):
    r = cli(
        "quantize", sample(LLAMA), tmp_path / "o", "--skip", "re:nothing_here", "--json", tmp_path / "s.json"
    )
    assert r.exit_code == 0, r.output
    assert "--skip 're:nothing_here' matches no tensor" in r.stderr
    assert (
        "--skip 're:nothing_here' matches no tensor" in json.loads((tmp_path / "s.json").read_text())["notes"]
    )


def test_nothing_left_to_quantize_is_refused(sample, tmp_path):
    r = cli("quantize", sample(LLAMA), tmp_path / "o", "--skip", "*")
    assert r.exit_code == 3
    assert "nothing to quantize" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "o").exists()


def test_already_fp8_input_to_quantize_says_dequantize_first(sample, tmp_path):
    r = cli("quantize", sample(DS), tmp_path / "o")
    assert r.exit_code == 3 and "fp8conv dequantize" in r.stderr


# ------------------------------------------------------------------------------------- dry run
def test_dry_run_groups_by_layer_pattern_at_80_columns(sample, tmp_path):
    src = sample(LLAMA)
    p = run("quantize", src, "--dry-run", env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    table = [ln for ln in lines if not ln.startswith("total:")]
    assert all(len(ln.rstrip()) <= 80 for ln in table), [ln for ln in table if len(ln.rstrip()) > 80]
    assert any(ln.startswith("model.layers.N.mlp.down_proj.weight ") for ln in lines), p.stdout
    assert not any("model.layers.0." in ln for ln in lines)
    assert re.search(
        r"^total: 21 tensors in \d+ groups .*14 to quantize; 2\.89 MB -> 1\.71 MB$", p.stdout, re.M
    )
    assert not src.with_name(f"{src.name}-fp8").exists()
    full = run("quantize", src, "--dry-run", "--full", env={"COLUMNS": "80"})
    names = [ln.split()[0] for ln in full.stdout.splitlines() if ln.startswith(("model.", "lm_head"))]
    assert len(names) == 21
    assert all(len(ln.rstrip()) <= 80 for ln in full.stdout.splitlines() if not ln.startswith("total:"))
    # Long names shortened in the middle: both ends are kept.
    post = [n for n in names if n.endswith("post_attention_layernorm.weight") or "…" in n]
    assert post and all(n.startswith("model.") for n in post)


def test_dequantize_dry_run_writes_nothing(sample, tmp_path):
    src = sample(DS)
    r = cli("dequantize", src, tmp_path / "o", "--dry-run", "--json", "-")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and plan["totals"]["dequantized"] == 4
    assert plan["schema_version"] == JSON_SCHEMA_VERSION
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- progress
def test_progress_in_a_pipe_is_plain_unwrapped_lines(sample, tmp_path):
    src = sample(DS)
    p = run("dequantize", src, tmp_path / "o", "--device", "cpu", env={"COLUMNS": "40"})
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert "\x1b[" not in p.stderr  # no bar, no colour codes in a log
    summary = [ln for ln in lines if ln.startswith("dequantize: ") and "tensors converted" in ln]
    assert len(summary) == 1 and len(summary[0]) > 40 and summary[0] == summary[0].rstrip()
    assert lines[0].startswith("dequantize: 3 shard(s), ") and lines[0].endswith(
        f"on cpu -> {tmp_path / 'o'}"
    )
    # No rate or time left without data to base them on (a tiny job never earns one).
    assert not any(re.search(r"ETA|left|/s\b", ln) for ln in lines if "tensors converted" not in ln)


def test_resumed_shards_are_shown_apart_and_not_counted_as_speed(sample, tmp_path):
    from fp8conv import dequantize
    from fp8conv.convert.progress import ProgressCounter

    src = sample(DS)
    dst = tmp_path / "o"
    p = run("dequantize", src, dst, "--device", "cpu", "-q", env={"FP8CONV_FAULT": "after_shard:1"})
    assert p.returncode == -9  # killed after shard 1 was committed
    counter = ProgressCounter()
    s = dequantize(src, dst, progress=counter)
    assert s.shards_skipped == 1 and s.shards_written == 2
    first = (src / "model-00001-of-00003.safetensors").stat().st_size
    assert counter.resumed == first
    assert counter.converted == counter.total - first
    assert counter.shards == 3


def test_counter_has_no_rate_before_data(monkeypatch):
    from fp8conv.convert import progress as prog

    now = [100.0]
    monkeypatch.setattr(prog.time, "monotonic", lambda: now[0])
    c = prog.ProgressCounter()
    c.start(1000, 2, "cpu")
    assert c.rate() is None and c.eta() is None
    c.advance(500)
    c.shard_done("a", skipped=True)  # kept from an earlier run
    now[0] += 5
    assert c.rate() is None and c.done == 500 and c.resumed == 500
    c.advance(100)
    now[0] += 5
    c.advance(150)
    assert c.rate() == pytest.approx(100 / 10)  # the held-back last advance is not counted yet
    c.flush()
    assert c.rate() == pytest.approx(250 / 10) and c.eta() == pytest.approx(250 / 25)


def _pty_run(args, env):
    """Run `python -m fp8conv ARGS` with stderr and stdout on a pseudo-terminal; return (rc, bytes)."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ.update({"PYTHONPATH": str(ROOT), "COLUMNS": "100", "TERM": "xterm", **env})
        os.execv(sys.executable, [sys.executable, "-m", "fp8conv", *map(str, args)])
    chunks = []
    while True:
        r, _, _ = select.select([fd], [], [], 120)
        if not r:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def test_terminal_bar_and_ctrl_c_leave_a_clean_terminal(sample, tmp_path):
    src = sample(DS)
    rc, data = _pty_run(["dequantize", src, tmp_path / "o", "--device", "cpu"], {})
    text = data.decode()
    assert rc == 0, text
    assert "\x1b[?25l" in text and text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")  # cursor back
    assert "3/3 shards" in text and "tensors converted" in text
    # Ctrl-C mid-run: the bar is stopped (cursor shown) before the error, which is on its own line.
    rc, data = _pty_run(
        ["dequantize", src, tmp_path / "o2", "--device", "cpu"], {"FP8CONV_FAULT": "mid_shard:2=INT"}
    )
    text = data.decode()
    assert rc == 130, text
    err_at = text.index("error (exit 130)")
    assert text.rindex("\x1b[?25h", 0, err_at) > text.rindex("\x1b[?25l", 0, err_at)
    assert re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text[:err_at]).endswith("\n")
    line = text[err_at:].splitlines()[0]
    assert "interrupted (Ctrl-C)" in line and "run the same command again to resume" in line
    assert "signal 2" not in text
    # And the same command does resume.
    rc, data = _pty_run(["dequantize", src, tmp_path / "o2", "--device", "cpu"], {})
    assert rc == 0 and "1 kept from an earlier run" in data.decode()


def test_sigterm_says_how_to_resume(sample, tmp_path):
    p = run(
        "dequantize", sample(DS), tmp_path / "o", "--device", "cpu", env={"FP8CONV_FAULT": "mid_shard:2=TERM"}
    )
    assert p.returncode == 143
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("error")][0]
    assert line.startswith("error (exit 143): interrupted by SIGTERM")
    assert "run the same command again to resume" in line and "signal 15" not in p.stderr


def test_messages_add_a_next_step_when_the_error_has_none(sample, tmp_path):
    r = cli("dequantize", tmp_path / "missing", tmp_path / "o")
    assert r.exit_code == 3
    assert "does not exist (nor is it a Hugging Face repo id" in r.stderr and "check the path" in r.stderr
    # A DST that holds other files: exit 6 and what to do about it.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = cli("dequantize", sample(DS), tmp_path / "busy")
    assert r.exit_code == 6
    assert "--overwrite" in r.stderr


def test_a_changed_source_is_named_in_words(sample, tmp_path):
    src = sample(LLAMA)
    assert cli("quantize", src, tmp_path / "o", "-q").exit_code == 0
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = 1.0
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "extra.txt").write_text("new")
    r = cli("quantize", src, tmp_path / "o", "-q")
    assert r.exit_code == 6
    line = r.stderr.strip().splitlines()[-1]
    assert (
        "config.json changed since this output was started" in line and "SRC has a new file extra.txt" in line
    )
    assert "--overwrite" in line and "[" not in line.split("settings:", 1)[1].split("(")[0]
