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
