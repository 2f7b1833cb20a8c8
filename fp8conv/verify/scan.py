"""Reading a checkpoint folder for verify and inspect, as far as it can be read.

Unlike `open_checkpoint`, the scan does not stop at the first structural problem (a truncated shard, a
shard missing from disk, a tensor in two shards, an index nested too deep, a link loop): it records
each one as a failed `Finding` naming its file and tensor, and keeps whatever can still be read.
Only what is not a checkpoint folder at all raises (InvalidCheckpoint, exit 3); I/O failures raise
ResourceError (exit 5).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.checkpoint.layout import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    check_shard_name,
    index_disagreements,
    list_other_files,
    open_checkpoint,
)
from fp8conv.checkpoint.safetensors_io import ShardHeader, read_header
from fp8conv.errors import InvalidCheckpoint, ResourceError
from fp8conv.verify.report import Finding

# A real index or config.json is at most a few MB (DeepSeek-V3's index: 9 MB for 91k tensors).
MAX_JSON_BYTES = 256 << 20


@dataclass
class Scan:
    """A checkpoint as far as it can be read, plus every structural problem met on the way."""

    ckpt: Checkpoint
    findings: list[Finding] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # tensor -> shard it should be in
    strict_error: str | None = None  # what open_checkpoint refused, if it refused
    # What no command reads at all (a link loop, JSON nested past the parser's limit): verify refuses
    # the folder (exit 3) instead of reporting a verification failure; inspect lists it and exits 3.
    refusals: list[Finding] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return any(f.status == "fail" for f in self.findings)


@contextlib.contextmanager
def paused_gc():
    """The cyclic garbage collector off while headers and the index become millions of small objects
    that form no cycles: its generational passes over them cost as much as the parsing itself
    (open_checkpoint + formats.detect of 10^6 tensors here: 102 s with it, 62 s without)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def fail(check: str, message: str, file=None, tensor=None) -> Finding:
    return Finding(check, "fail", message, None if file is None else str(file), tensor)


def warn(check: str, message: str, file=None, tensor=None) -> Finding:
    return Finding(check, "warn", message, None if file is None else str(file), tensor)


def few(names, n: int = 5) -> str:
    names = list(names)
    text = ", ".join(names[:n])
    return text + (f" and {len(names) - n} more" if len(names) > n else "")


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, RuntimeError):  # a link loop, a permission on the way
        return False


def is_checkpoint_folder(root: Path) -> bool:
    try:
        if not root.is_dir():
            return False
    except OSError:
        return False
    return (
        _is_file(root / INDEX_NAME)
        or _is_file(root / SINGLE_NAME)
        or (root / INDEX_NAME).is_symlink()
        or (root / SINGLE_NAME).is_symlink()
    )


def scan_checkpoint(path) -> Scan:
    """open_checkpoint, and when it refuses a folder that is a checkpoint, a scan that collects every
    problem instead."""
    root = Path(path)
    try:
        ckpt = open_checkpoint(root)
    except (InvalidCheckpoint, RuntimeError, RecursionError, OSError) as e:
        if isinstance(e, PermissionError) or (isinstance(e, OSError) and not is_checkpoint_folder(root)):
            raise ResourceError(f"cannot read: {e.strerror or e}", file=root) from None
        if not is_checkpoint_folder(root):
            if isinstance(e, InvalidCheckpoint):
                raise
            raise InvalidCheckpoint(f"cannot be read as a checkpoint folder ({e})", file=root) from None
        scan = _lenient_scan(root)
        msg = e.message if isinstance(e, InvalidCheckpoint) else str(e)
        scan.strict_error = msg
        if not scan.damaged:
            if isinstance(e, InvalidCheckpoint):
                scan.findings.insert(0, fail("structure", e.rule, e.file, e.tensor))
            else:
                scan.findings.insert(0, fail("structure", msg, root))
        _soft_checks(scan)
        return scan
    scan = Scan(ckpt)
    _soft_checks(scan)
    return scan


def _read_json(path: Path, what: str, findings: list[Finding], check: str, refusals=None):
    """A side file's JSON, or None with a failed finding (too big, not UTF-8/JSON, nested too deep)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            findings.append(
                fail(check, f"{what} is {size} bytes, over the {MAX_JSON_BYTES}-byte limit", path)
            )
            return None
        with open(path, "rb") as f:
            raw = f.read()
    except PermissionError as e:
        raise ResourceError(f"cannot read {what}: {e.strerror or e}", file=path) from None
    except (OSError, RuntimeError) as e:
        findings.append(fail(check, f"{what} cannot be read ({getattr(e, 'strerror', None) or e})", path))
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, nested too deep, huge integers
        why = "nested too deep" if isinstance(e, RecursionError) else str(e)
        findings.append(fail(check, f"{what} is not valid JSON ({why})", path))
        if isinstance(e, RecursionError) and refusals is not None:
            refusals.append(findings[-1])
        return None


def _lenient_scan(root: Path) -> Scan:
    findings: list[Finding] = []
    refusals: list[Finding] = []
    unreadable: dict[str, str] = {}
    shards: dict[str, ShardHeader] = {}
    weight_map: dict[str, str] = {}
    metadata: dict = {}
    known_files: set[str] = set()
    index_path = root / INDEX_NAME
    has_index = _is_file(index_path) or index_path.is_symlink()
    if has_index:
        index = _read_json(index_path, "index", findings, "index", refusals)
        if index is not None and not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
            findings.append(fail("index", "index has no weight_map object", index_path))
            index = None
        raw_map = index["weight_map"] if index else {}
        if index and isinstance(index.get("metadata"), dict):
            metadata = index["metadata"]
        valid: dict[str, str] = {}
        bad_names = 0
        for tensor, shard in raw_map.items():
            try:
                check_shard_name(root, index_path, shard, tensor)
            except InvalidCheckpoint as e:
                bad_names += 1
                if bad_names <= 20:
                    findings.append(fail("index", e.rule, e.file, e.tensor))
                    link = root / shard if isinstance(shard, str) and shard else None
                    if link is not None and link.is_symlink() and not link.exists():
                        refusals.append(findings[-1])  # a link loop (or dangling link): no command reads it
                continue
            except (RuntimeError, OSError) as e:
                bad_names += 1
                if bad_names <= 20:
                    findings.append(
                        fail("index", f"shard {shard!r} cannot be resolved ({e})", index_path, tensor)
                    )
                    refusals.append(findings[-1])
                continue
            valid[tensor] = shard
        if bad_names > 20:
            findings.append(fail("index", f"{bad_names - 20} more bad weight_map entries", index_path))
        held: dict[str, list[str]] = defaultdict(list)
        for tensor, shard in valid.items():
            held[shard].append(tensor)
        known_files = set(held)
        missing_reported = 0
        for name in sorted(held):
            path = root / name
            if not _is_file(path):
                missing_reported += 1
                if missing_reported <= 20:
                    loop = path.is_symlink() and not path.exists()
                    what = (
                        "is a dangling link or a link loop"
                        if loop
                        else "is missing from disk or not a regular file"
                    )
                    findings.append(
                        fail(
                            "index",
                            f"shard named by the index {what}; it should hold "
                            f"{len(held[name])} tensor(s): {few(held[name])}",
                            path,
                        )
                    )
                    if loop:
                        refusals.append(findings[-1])
                unreadable.update({t: name for t in held[name]})
                continue
            try:
                shards[name] = read_header(path)
            except InvalidCheckpoint as e:
                findings.append(
                    fail(
                        "header",
                        f"{e.rule}; its {len(held[name])} tensor(s) could not be checked",
                        e.file or path,
                        e.tensor,
                    )
                )
                unreadable.update({t: name for t in held[name]})
        if missing_reported > 20:
            findings.append(fail("index", f"{missing_reported - 20} more shards are missing", index_path))
        weight_map = {t: s for t, s in valid.items() if s in shards and t in shards[s].tensors}
        n = 0
        for e in index_disagreements(root, valid, shards):
            n += 1
            if n <= 20:
                findings.append(fail("index", e.rule, e.file, e.tensor))
        if n > 20:
            findings.append(
                fail("index", f"{n - 20} more disagreements between index and shards", index_path)
            )
    else:
        known_files = {SINGLE_NAME}
        path = root / SINGLE_NAME
        try:
            if not _is_file(path):
                if path.is_symlink() and not path.exists():
                    refusals.append(fail("header", "a dangling link or a link loop", path))
                raise InvalidCheckpoint("not a regular file (a link loop, FIFO or device?)", file=path)
            header = read_header(path)
            shards = {SINGLE_NAME: header}
            weight_map = {t: SINGLE_NAME for t in header.tensors}
        except InvalidCheckpoint as e:
            findings.append(
                fail("header", f"{e.rule}; none of its tensors could be checked", e.file or path, e.tensor)
            )
    try:
        entries = sorted(p.name for p in root.iterdir())
    except OSError as e:
        raise ResourceError(f"cannot list the folder: {e.strerror or e}", file=root) from None
    strays = [n for n in entries if n.endswith(".safetensors") and n not in known_files]
    for name in strays:
        findings.append(
            fail("files", "safetensors file is not named by the index (stray or leftover shard)", root / name)
        )
    config = None
    if _is_file(root / CONFIG_NAME):
        config = _read_json(root / CONFIG_NAME, "config.json", findings, "config", refusals)
        if config is not None and not isinstance(config, dict):
            findings.append(fail("config", "config.json is not a JSON object", root / CONFIG_NAME))
            config = None
    try:
        other = list_other_files(root, known_files | set(strays))
    except InvalidCheckpoint as e:
        findings.append(fail("files", e.rule, e.file, e.tensor))
        other = []
    except (OSError, RuntimeError) as e:
        findings.append(fail("files", f"the folder's other files cannot be listed ({e})", root))
        other = []
    ckpt = Checkpoint(
        root=root,
        shards=dict(sorted(shards.items())),
        weight_map=weight_map,
        has_index=has_index,
        index_metadata=metadata,
        config=config,
        other_files=other,
    )
    return Scan(ckpt, findings, unreadable, refusals=refusals)


def _soft_checks(scan: Scan) -> None:
    """Warnings that loaders tolerate: total_size and the shard metadata convention."""
    ckpt = scan.ckpt
    total = ckpt.index_metadata.get("total_size") if ckpt.has_index else None
    if ckpt.has_index and not scan.unreadable and total is not None:
        actual = sum(h.tensors[t].nbytes for h in ckpt.shards.values() for t in h.tensors)
        if total != actual:
            scan.findings.append(
                warn(
                    "index",
                    f"metadata.total_size is {total} but the tensors hold {actual} bytes",
                    ckpt.root / INDEX_NAME,
                )
            )
    for name, header in ckpt.shards.items():
        if (header.metadata or {}).get("format") != "pt":
            scan.findings.append(
                warn(
                    "header",
                    'shard metadata lacks {"format": "pt"} (transformers warns or refuses to load it)',
                    ckpt.root / name,
                )
            )


def read_side_json(root: Path, name: str, findings: list[Finding]):
    """A side file beside the shards (hf_quant_config.json, params.json), or None if absent/unreadable."""
    path = root / name
    if not _is_file(path):
        return None
    return _read_json(path, name, findings, "config")
