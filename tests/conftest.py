from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under root: what 'the source is never modified' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture
def sample(tmp_path):
    """A private copy of a bundled sample, by name."""

    def make(name: str) -> Path:
        dst = tmp_path / f"src-{name}"
        if dst.exists():
            return dst
        shutil.copytree(SAMPLES / name, dst)
        return dst

    return make


def model_bytes(path: Path) -> tuple[dict, dict, bytes]:
    """A shard as a loader sees it: each tensor's entry (dtype, shape, offsets), the metadata without
    fp8conv's own record of the job and checksum (`fp8conv.*`, which differs by how the file was
    made), and the data bytes. Two shards with equal model_bytes hold the same model."""
    from fp8conv.checkpoint.safetensors_io import read_header

    h = read_header(path)
    entries = {
        n: (t.dtype, t.shape, t.start - h.data_start, t.end - h.data_start) for n, t in h.tensors.items()
    }
    meta = {k: v for k, v in (h.metadata or {}).items() if not k.startswith("fp8conv.")}
    with open(path, "rb") as f:
        f.seek(h.data_start)
        data = f.read()
    return entries, meta, data
