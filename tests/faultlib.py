"""Helpers for the fault suite: tiny multi-shard checkpoints, tree snapshots, CLI runners.

The checkpoints are built in tmp folders (seeded, a few hundred KB), with three shards each so that
"between shards" exists, a scale stored in another shard than its weight, ragged edge tiles, stacked
experts, non-float tensors, side files and a sub-folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.checkpoint.safetensors_io import read_header, save_file
from fp8conv.cli import app
from fp8conv.convert.plan import native_fp8_config
from fp8conv.kernels.reference import weight_quant_torch

META = {"format": "pt"}
FP8_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "torch_dtype": "bfloat16",
    "quantization_config": native_fp8_config(),
}
BF16_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
Shards = list[dict[str, torch.Tensor]]


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# ---------------------------------------------------------------------------------------- builders
def fp8_shards(seed: int = 7) -> Shards:
    """Three shards of a DeepSeek-style FP8 checkpoint (tensors only; see write_checkpoint); the
    first one gives the smallest output shard."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    def fp8(*shape):
        return weight_quant_torch(rnd(*shape))

    s1: dict[str, torch.Tensor] = {}
    s1["model.embed_tokens.weight"] = rnd(64, 128).bfloat16()
    s1["model.layers.0.self_attn.q_proj.weight"], s1["model.layers.0.self_attn.q_proj.weight_scale_inv"] = (
        fp8(256, 256)
    )
    q, o_scale = fp8(200, 300)  # ragged in both dims; its scale lives in shard 2
    s1["model.layers.0.self_attn.o_proj.weight"] = q
    s1["model.layers.0.input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    s2: dict[str, torch.Tensor] = {"model.layers.0.self_attn.o_proj.weight_scale_inv": o_scale}
    s2["model.layers.0.mlp.experts.gate_up_proj"], s2["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] = (
        fp8(2, 160, 256)
    )
    s2["model.position_ids"] = torch.arange(32, dtype=torch.int64)
    s2["model.attn_mask"] = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    s3: dict[str, torch.Tensor] = {}
    s3["model.layers.1.mlp.down_proj.weight"], s3["model.layers.1.mlp.down_proj.weight_scale_inv"] = fp8(
        256, 512
    )
    s3["model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    s3["lm_head.weight"] = rnd(64, 256).bfloat16()
    return [s1, s2, s3]


def bf16_shards(seed: int = 11) -> Shards:
    """Three shards of a Llama-style bf16 checkpoint (the first one the smallest output)."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, n):
        return (torch.randn(o, n, generator=g) / n**0.5).bfloat16()

    shards: Shards = []
    for layer in range(3):
        p = f"model.layers.{layer}."
        t: dict[str, torch.Tensor] = {}
        if layer == 0:
            t["model.embed_tokens.weight"] = lin(64, 256)
        t[p + "input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)
        t[p + "self_attn.q_proj.weight"] = lin(256, 256)
        t[p + "self_attn.o_proj.weight"] = lin(256, 256)
        t[p + "mlp.up_proj.weight"] = lin(320, 256)  # ragged rows: 3 tile rows, the last partial
        t[p + "mlp.down_proj.weight"] = lin(256, 320)
        if layer == 2:
            t["model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
            t["lm_head.weight"] = lin(256, 256)  # kept bf16: makes the last shard the largest
        shards.append(t)
    return shards


def write_checkpoint(
    root: Path, shards: Shards, config: dict | None, weight_map: dict[str, str] | None = None
) -> Path:
    """Shards + index + config + side files (tokenizer, a sub-folder) into a new folder `root`."""
    root.mkdir(parents=True)
    n = len(shards)
    wm: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, 1):
        save_file(tensors, root / shard_name(i, n), META)
        for k, v in tensors.items():
            wm[k] = shard_name(i, n)
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted((weight_map or wm).items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if config is not None:
        (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0}}}))
    (root / "assets").mkdir()
    (root / "assets" / "NOTICE.txt").write_text("a sub-folder that must arrive unchanged\n")
    return root


def make_fp8(root: Path, mutate: Callable[[Shards], None] | None = None) -> Path:
    shards = fp8_shards()
    if mutate:
        mutate(shards)
    return write_checkpoint(root, shards, FP8_CONFIG)


def make_bf16(root: Path, mutate: Callable[[Shards], None] | None = None) -> Path:
    shards = bf16_shards()
    if mutate:
        mutate(shards)
    return write_checkpoint(root, shards, BF16_CONFIG)


MAKERS = {"dequantize": make_fp8, "quantize": make_bf16}


# ---------------------------------------------------------------------------------------- trees
def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: files by (sha256, size, mtime_ns, inode), links by target, folders."""
    out: dict[str, tuple] = {}
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mtime_ns)
            elif not stat.S_ISREG(st.st_mode):  # a FIFO in a test: never opened
                out[rel] = ("special", st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = (
                    "file",
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                )
    return out


class SourceGuard:
    """Snapshot of a source tree; check() asserts nothing in it changed (bytes, mtimes, entries)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.before = snapshot(root)

    def check(self) -> None:
        after = snapshot(self.root)
        changed = sorted(k for k in set(self.before) | set(after) if self.before.get(k) != after.get(k))
        assert not changed, f"source tree changed: {changed}"


def final_files(dst: Path) -> dict[str, bytes]:
    """Files under their final names (everything outside DST/.fp8conv), by content."""
    out = {}
    if not dst.is_dir():
        return out
    for p in sorted(dst.rglob("*")):
        rel = p.relative_to(dst)
        if rel.parts[0] == STATE_DIR or p.is_dir():
            continue
        out[str(rel)] = p.read_bytes()
    return out


def without_job(data: bytes) -> tuple[dict, bytes]:
    """A shard's header without fp8conv's job record and content hash (they name the source, which
    a test may have changed on purpose), and its data."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    for k in ("fp8conv.job", "fp8conv.checksum"):
        header.get("__metadata__", {}).pop(k, None)
    return header, data[8 + n :]


def assert_no_partial(dst: Path, clean: dict[str, bytes], same_source: bool = True) -> None:
    """Each file under a final name is complete: shards parse and equal the clean run's bytes (with
    same_source=False, all but the job record, for a source changed on purpose)."""
    for rel, data in final_files(dst).items():
        if rel.endswith(".safetensors"):
            read_header(dst / rel)
        assert rel in clean, f"unexpected file {rel} in DST"
        if same_source or not rel.endswith(".safetensors"):
            assert data == clean[rel], f"{rel} differs from the clean run's"
        else:
            assert without_job(data) == without_job(clean[rel]), f"{rel} differs from the clean run's"


def tmp_leftovers(dst: Path) -> list[str]:
    """Files being written in DST's state folder, by output name (the random token removed)."""
    t = dst / STATE_DIR / "tmp"
    return sorted(p.name.rsplit(".", 1)[0] for p in t.iterdir()) if t.is_dir() else []


# ---------------------------------------------------------------------------------------- running
_runner = CliRunner()


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str, exception: BaseException | None = None):
        self.code, self.stdout, self.stderr, self.exception = code, stdout, stderr, exception

    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stderr={self.stderr[-2000:]!r}, exc={self.exception!r})"


def cli(*args: object) -> CliResult:
    """The CLI in this process (typer's runner): fast, for everything that needs no real process."""
    r = _runner.invoke(app, [str(a) for a in args])
    exc = r.exception if not isinstance(r.exception, SystemExit) else None
    return CliResult(r.exit_code, r.stdout, r.stderr, exc)


def _limits(fsize: int | None) -> Callable[[], None]:
    def pre() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return pre


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FP8CONV_FAULT", None)
    if fault:
        env["FP8CONV_FAULT"] = fault
    return env


def run_process(
    *args: object, fault: str | None = None, fsize: int | None = None, timeout: float = 120
) -> CliResult:
    """`python -m fp8conv.cli ARGS` in a real process (signals, SIGKILL, rlimits)."""
    p = subprocess.run(
        [sys.executable, "-m", "fp8conv.cli", *map(str, args)],
        env=_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limits(fsize),
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


def start_process(*args: object, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fp8conv.cli", *map(str, args)],
        env=_env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_clean_error(r: CliResult, code: int, *needles: str) -> None:
    """Exit `code`, fp8conv's own message (each needle in it), no traceback."""
    assert r.exception is None, f"unexpected exception {r.exception!r}"
    assert r.code == code, r
    assert "Traceback" not in r.stderr, r.stderr
    assert f"error (exit {code})" in r.stderr or code in (130, 143), r.stderr
    lines = r.stderr.splitlines()  # each message on one line (no wrapping), whatever the width
    for n in needles:
        assert any(n in line for line in lines), f"{n!r} not in {r.stderr!r}"


_CLEAN: dict[tuple[str, tuple[str, ...]], dict[str, bytes]] = {}


def clean_run(kind: str, *options: str) -> dict[str, bytes]:
    """Final files of an uninterrupted run of `kind` over the default checkpoint (cached)."""
    key = (kind, options)
    if key not in _CLEAN:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fp8conv-clean-") as d:
            src = MAKERS[kind](Path(d) / "src")
            r = cli(kind, src, Path(d) / "dst", "--device", "cpu", "-q", *options)
            assert r.code == 0, r
            _CLEAN[key] = final_files(Path(d) / "dst")
    return _CLEAN[key]


# ---------------------------------------------------------------------------------------- surgery
def read_raw(path: Path) -> tuple[dict, bytes]:
    """A shard's header (as parsed JSON, in file order) and its data bytes."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    """Write a shard from a header (dict, or raw JSON bytes) and data, padding the header to 8."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    header, data = read_raw(path)
    fn(header)
    write_raw(path, header, data)


def edit_index(root: Path, fn: Callable[[dict], None]) -> None:
    p = root / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index)
    p.write_text(json.dumps(index, indent=2))
