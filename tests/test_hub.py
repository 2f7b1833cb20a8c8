"""Hugging Face repo ids as SRC: resolved by huggingface_hub from a cache laid out in tmp_path, with
HF_HUB_OFFLINE=1 (no network here), and a clear refusal when the repo is not cached.

The cache is built the way huggingface_hub writes it (models--org--name/{blobs,refs,snapshots}, each
snapshot file a relative link to its blob), and huggingface_hub itself resolves it, in a fresh
process, since it reads HF_HUB_OFFLINE and HF_HUB_CACHE when imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fp8conv.checkpoint.source import IGNORE_PATTERNS, parse_repo_id
from fp8conv.errors import UsageError
from tests.conftest import SAMPLES

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache: Path, repo_id: str, sample: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """A Hugging Face hub cache holding `sample` as `repo_id` at `commit` (refs/<ref> -> commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for f in sorted((SAMPLES / sample).rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(SAMPLES / sample)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def fp8conv(*args, cache: Path, cwd: Path, offline: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fp8conv", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_repo_id_from_the_cache_offline(tmp_path):
    cache = tmp_path / "hf" / "hub"
    snap = make_cache(cache, "tiny-org/DeepSeek-Tiny", "deepseek-tiny-fp8")
    work = tmp_path / "work"
    work.mkdir()
    p = fp8conv(
        "dequantize", "tiny-org/DeepSeek-Tiny", "--device", "cpu", "--json", "s.json", cache=cache, cwd=work
    )
    assert p.returncode == 0, p.stderr
    out = work / "DeepSeek-Tiny-bf16"  # named after the repo, in the current folder
    assert (out / "model.safetensors.index.json").is_file()
    summary = json.loads((work / "s.json").read_text())
    assert Path(summary["src"]).resolve() == snap.resolve()
    # The same bytes as converting the sample folder itself.
    ref = fp8conv("dequantize", SAMPLES / "deepseek-tiny-fp8", work / "ref", "-q", cache=cache, cwd=work)
    assert ref.returncode == 0, ref.stderr
    for f in (work / "ref").glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    # The cache is never written to by a conversion.
    assert all(p.is_symlink() for p in snap.rglob("*") if p.is_file())


def test_revision_forms_and_inspect(tmp_path):
    cache = tmp_path / "hf" / "hub"
    make_cache(cache, "tiny-org/llama", "llama-tiny-bf16", ref="v1")
    work = tmp_path / "w"
    work.mkdir()
    p = fp8conv("inspect", f"tiny-org/llama@{COMMIT}", "--json", "-", cache=cache, cwd=work)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tensors"] == 21
    p = fp8conv("quantize", "tiny-org/llama", "--revision", "v1", "-q", cache=cache, cwd=work)
    assert p.returncode == 0, p.stderr
    assert (work / "llama-fp8" / "model.safetensors").is_file()
    p = fp8conv("verify", "--reference", "tiny-org/llama@v1", "-q", cache=cache, cwd=work / "llama-fp8")
    assert p.returncode == 0, p.stderr


def test_not_cached_while_offline_is_a_clear_refusal(tmp_path):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    p = fp8conv("dequantize", "deepseek-ai/DeepSeek-V3", "out", cache=cache, cwd=tmp_path)
    assert p.returncode == 3, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error (exit 3): Hugging Face repo deepseek-ai/DeepSeek-V3: not in the Hugging Face cache"
    )
    assert "HF_HUB_OFFLINE" in line and "hf download deepseek-ai/DeepSeek-V3" in line
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


def test_unknown_revision_of_a_cached_repo_is_refused(tmp_path):
    cache = tmp_path / "hf" / "hub"
    make_cache(cache, "tiny-org/llama", "llama-tiny-bf16")
    p = fp8conv("inspect", "tiny-org/llama@nope", cache=cache, cwd=tmp_path)
    assert p.returncode == 3 and "not in the Hugging Face cache" in p.stderr


def test_a_local_folder_wins_over_a_repo_id_of_the_same_spelling(tmp_path, monkeypatch, sample):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    src = sample("llama-tiny-bf16")
    src.rename(tmp_path / "org" / "llama")
    assert parse_repo_id("org/llama") is None
    assert parse_repo_id("org/other") is not None
    p = fp8conv("quantize", "org/llama", "-q", cache=tmp_path / "nocache", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "org" / "llama-fp8" / "model.safetensors").is_file()  # beside the folder


@pytest.mark.parametrize(
    ("text", "repo", "rev"),
    [
        ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3", None),
        ("Qwen/Qwen3-8B-FP8@main", "Qwen/Qwen3-8B-FP8", "main"),
        (f"org/name@{COMMIT}", "org/name", COMMIT),
        ("./org/name", None, None),
        ("/abs/path", None, None),
        ("a/b/c", None, None),
        ("ckpt/", None, None),
        ("name", None, None),
        ("org/../x", None, None),
    ],
)
def test_what_counts_as_a_repo_id(text, repo, rev, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = parse_repo_id(text)
    assert (ref.repo_id, ref.revision) == (repo, rev) if repo else ref is None


def test_revision_twice_or_on_a_folder_is_a_usage_error(tmp_path, sample):
    with pytest.raises(UsageError, match="revision given twice"):
        parse_repo_id("org/name@a", revision="b")
    from fp8conv.checkpoint.source import resolve_source

    with pytest.raises(UsageError, match="--revision applies to a Hugging Face repo id"):
        resolve_source(sample("llama-tiny-bf16"), revision="main")


def test_other_weight_formats_are_not_downloaded():
    # What a conversion copies from SRC it also downloads; pickled or original-format weights would
    # publish the full-precision model again inside the FP8 output.
    for pattern in ("*.bin", "*.pth", "*.pt", "original/*", "*.gguf"):
        assert pattern in IGNORE_PATTERNS
