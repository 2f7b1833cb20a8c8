"""`fp8conv inspect`: what a checkpoint folder holds, from headers and config alone (no tensor data).

Also the shared ground of `verify`: a scan that, unlike `open_checkpoint`, does not stop at the first
structural problem (a truncated shard, a shard missing from disk, a tensor in two shards) but records
each one, naming its file and tensor, and keeps whatever can still be read; and the classification of
tensors into FP8 weights, their scales, orphan scales, unquantized floats and the rest.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fp8conv.checkpoint.layout import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    check_shard_name,
    index_disagreements,
    list_other_files,
    load_json,
    open_checkpoint,
)
from fp8conv.checkpoint.safetensors_io import (
    FLOAT_DTYPES,
    FP8_WEIGHT_DTYPES,
    ShardHeader,
    TensorInfo,
    read_header,
)
from fp8conv.convert.plan import SCALE_SUFFIXES, block_from_config
from fp8conv.errors import InvalidCheckpoint, ResourceError
from fp8conv.formats import find_quantization_config

# Name fragments of embedding tables: 2-D float `.weight`s that are not Linear layers.
EMBED_HINTS = ("embed", "wte", "wpe")


@dataclass
class Finding:
    """A problem that belongs to a file (or the checkpoint as a whole) rather than to one tensor."""

    check: str  # "index" | "header" | "config" | "files" | "reference" | ...
    status: str  # "fail" | "warn"
    message: str
    file: str | None = None
    tensor: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def text(self) -> str:
        where = [w for w in (self.file, f"tensor {self.tensor!r}" if self.tensor else None) if w]
        return ": ".join(where + [self.message])


@dataclass
class Scan:
    """A checkpoint as far as it can be read, plus every structural problem met on the way."""

    ckpt: Checkpoint
    findings: list[Finding] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # tensor -> shard it should be in
    strict_error: str | None = None  # what open_checkpoint refused, if it refused


def _fail(check: str, message: str, file=None, tensor=None) -> Finding:
    return Finding(check, "fail", message, None if file is None else str(file), tensor)


def _warn(check: str, message: str, file=None, tensor=None) -> Finding:
    return Finding(check, "warn", message, None if file is None else str(file), tensor)


def few(names, n: int = 5) -> str:
    names = list(names)
    text = ", ".join(names[:n])
    return text + (f" and {len(names) - n} more" if len(names) > n else "")


def is_checkpoint_folder(root: Path) -> bool:
    return root.is_dir() and ((root / INDEX_NAME).is_file() or (root / SINGLE_NAME).is_file())


def scan_checkpoint(path) -> Scan:
    """open_checkpoint, and when it refuses a folder that is a checkpoint, a scan that collects every
    problem instead. Raises InvalidCheckpoint (exit 3) only for what is not a checkpoint at all."""
    root = Path(path)
    try:
        ckpt = open_checkpoint(root)
    except InvalidCheckpoint as e:
        if not is_checkpoint_folder(root):
            raise
        scan = _lenient_scan(root)
        scan.strict_error = e.message
        if not any(f.status == "fail" for f in scan.findings):
            scan.findings.insert(0, _fail("structure", e.rule, e.file, e.tensor))
        _soft_checks(scan)
        return scan
    scan = Scan(ckpt)
    _soft_checks(scan)
    return scan


def _lenient_scan(root: Path) -> Scan:
    findings: list[Finding] = []
    unreadable: dict[str, str] = {}
    shards: dict[str, ShardHeader] = {}
    weight_map: dict[str, str] = {}
    metadata: dict = {}
    known_files: set[str] = set()
    index_path = root / INDEX_NAME
    has_index = index_path.is_file()
    if has_index:
        index = None
        try:
            index = json.loads(index_path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ResourceError(f"cannot read the index: {e.strerror or e}", file=index_path) from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            findings.append(_fail("index", f"index is not valid JSON ({e})", index_path))
        if index is not None and not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
            findings.append(_fail("index", "index has no weight_map object", index_path))
            index = None
        raw_map = index["weight_map"] if index else {}
        if index and isinstance(index.get("metadata"), dict):
            metadata = index["metadata"]
        valid: dict[str, str] = {}
        for tensor, shard in raw_map.items():
            try:
                check_shard_name(root, index_path, shard, tensor)
            except InvalidCheckpoint as e:
                findings.append(_fail("index", e.rule, e.file, e.tensor))
                continue
            valid[tensor] = shard
        held: dict[str, list[str]] = defaultdict(list)
        for tensor, shard in valid.items():
            held[shard].append(tensor)
        known_files = set(held)
        for name in sorted(held):
            path = root / name
            if not path.is_file():
                findings.append(
                    _fail(
                        "index",
                        f"shard named by the index is missing from disk; it should hold "
                        f"{len(held[name])} tensor(s): {few(held[name])}",
                        path,
                    )
                )
                unreadable.update({t: name for t in held[name]})
                continue
            try:
                shards[name] = read_header(path)
            except InvalidCheckpoint as e:
                findings.append(
                    _fail(
                        "header",
                        f"{e.rule}; its {len(held[name])} tensor(s) could not be checked",
                        e.file or path,
                        e.tensor,
                    )
                )
                unreadable.update({t: name for t in held[name]})
        weight_map = {t: s for t, s in valid.items() if s in shards and t in shards[s].tensors}
        for e in index_disagreements(root, valid, shards):
            findings.append(_fail("index", e.rule, e.file, e.tensor))
    else:
        known_files = {SINGLE_NAME}
        try:
            header = read_header(root / SINGLE_NAME)
            shards = {SINGLE_NAME: header}
            weight_map = {t: SINGLE_NAME for t in header.tensors}
        except InvalidCheckpoint as e:
            findings.append(
                _fail(
                    "header",
                    f"{e.rule}; none of its tensors could be checked",
                    e.file or root / SINGLE_NAME,
                    e.tensor,
                )
            )
    strays = sorted(
        p.name for p in root.iterdir() if p.name.endswith(".safetensors") and p.name not in known_files
    )
    for name in strays:
        findings.append(
            _fail(
                "files", "safetensors file is not named by the index (stray or leftover shard)", root / name
            )
        )
    config = None
    if (root / CONFIG_NAME).is_file():
        try:
            config = load_json(root / CONFIG_NAME, "config")
            if not isinstance(config, dict):
                findings.append(_fail("config", "config.json is not a JSON object", root / CONFIG_NAME))
                config = None
        except InvalidCheckpoint as e:
            findings.append(_fail("config", e.rule, e.file))
    try:
        other = list_other_files(root, known_files | set(strays))
    except InvalidCheckpoint as e:
        findings.append(_fail("files", e.rule, e.file, e.tensor))
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
    return Scan(ckpt, findings, unreadable)


def _soft_checks(scan: Scan) -> None:
    """Warnings that loaders tolerate: total_size and the shard metadata convention."""
    ckpt = scan.ckpt
    total = ckpt.index_metadata.get("total_size") if ckpt.has_index else None
    if ckpt.has_index and not scan.unreadable and total is not None:
        actual = sum(ckpt.info(t).nbytes for t in ckpt.weight_map)
        if total != actual:
            scan.findings.append(
                _warn(
                    "index",
                    f"metadata.total_size is {total} but the tensors hold {actual} bytes",
                    ckpt.root / INDEX_NAME,
                )
            )
    for name, header in ckpt.shards.items():
        if (header.metadata or {}).get("format") != "pt":
            scan.findings.append(
                _warn(
                    "header",
                    'shard metadata lacks {"format": "pt"} (transformers warns or refuses to load it)',
                    ckpt.root / name,
                )
            )


# ------------------------------------------------------------------------------------ classification
@dataclass
class Roles:
    fp8: dict[str, TensorInfo] = field(default_factory=dict)  # every FP8 tensor
    scale_names: dict[str, list[str]] = field(default_factory=dict)  # FP8 weight -> its scale(s)
    scales: dict[str, str] = field(default_factory=dict)  # scale -> its weight (FP8 or unreadable)
    orphans: dict[str, str] = field(default_factory=dict)  # scale-like tensor -> why it is an orphan
    unquantized: list[str] = field(default_factory=list)  # float tensors that are neither
    other: list[str] = field(default_factory=list)  # integer, bool, ...

    def scale_suffix(self, scale: str) -> str:
        return next(s for s in SCALE_SUFFIXES if scale.endswith(s))


def scale_base(name: str, ckpt: Checkpoint, unreadable: dict[str, str]) -> str | None:
    """The tensor `name` is the scale of, if its name says it is a weight scale.

    `X_scale_inv` always is; `X_scale` only when X exists (or should, in an unreadable shard) or
    ends in `.weight`, so that kv-cache / activation scales (`k_scale`, `input_scale`) are not taken
    for weight scales."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if suffix == "_scale_inv" or base in ckpt or base in unreadable or base.endswith(".weight"):
                return base
            return None
    return None


def classify(ckpt: Checkpoint, unreadable: dict[str, str] | None = None) -> Roles:
    unreadable = unreadable or {}
    roles = Roles()
    for name, shard in ckpt.weight_map.items():
        info = ckpt.shards[shard].tensors[name]
        if info.dtype in FP8_WEIGHT_DTYPES:
            roles.fp8[name] = info
            roles.scale_names.setdefault(name, [])
    for name, shard in ckpt.weight_map.items():
        if name in roles.fp8:
            continue
        info = ckpt.shards[shard].tensors[name]
        base = scale_base(name, ckpt, unreadable)
        if base is not None:
            if base in roles.fp8:
                roles.scales[name] = base
                roles.scale_names[base].append(name)
            elif base in unreadable:
                roles.scales[name] = base
            elif base in ckpt:
                roles.orphans[name] = f"scale of {base!r}, which is not FP8 ({ckpt.info(base).dtype})"
            else:
                roles.orphans[name] = f"scale without its tensor ({base!r} is not in the checkpoint)"
            continue
        (roles.unquantized if info.dtype in FLOAT_DTYPES else roles.other).append(name)
    return roles


def quant_method(ckpt: Checkpoint) -> str | None:
    qc = find_quantization_config(ckpt.config)
    return None if qc is None else str(qc.get("quant_method"))


def quantization_config_locations(config: dict | None) -> list[str]:
    out = []
    if isinstance(config, dict):
        if "quantization_config" in config:
            out.append("quantization_config")
        tc = config.get("text_config")
        if isinstance(tc, dict) and "quantization_config" in tc:
            out.append("text_config.quantization_config")
    return out


def ignore_entries(qc: dict | None) -> list[str] | None:
    """The modules a loader leaves unquantized, or None when the config gives no list."""
    if not qc:
        return None
    keys = (
        ("ignore",)
        if qc.get("quant_method") == "compressed-tensors"
        else ("modules_to_not_convert", "ignored_layers")
    )
    found = [qc[k] for k in keys if isinstance(qc.get(k), list)]
    if not found:
        return None
    return [str(e) for lst in found for e in lst]


def module_names(name: str) -> list[str]:
    """Names a skip list may use for the layer holding tensor `name`."""
    if name.endswith(".weight"):
        return [name[: -len(".weight")]]
    return [name, name.rsplit(".", 1)[0]] if "." in name else [name]


def listed_by(name: str, entries: list[str], method: str | None) -> str | None:
    """The skip-list entry that covers tensor `name`'s layer, following the loader's own rule:
    compressed-tensors matches exact names and `re:` regexes (re.match); transformers matches a
    regex from the start up to a module boundary, or a plain suffix."""
    for module in module_names(name):
        for e in entries:
            if method == "compressed-tensors":
                if e.startswith("re:"):
                    try:
                        if re.match(e[3:], module):
                            return e
                    except re.error:
                        continue
                elif e == module:
                    return e
            else:
                try:
                    if re.match(rf"(?:{e})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(e):
                        return e
                except re.error:
                    if module == e or module.endswith(e):
                        return e
    return None


def linear_like(info: TensorInfo) -> bool:
    """A 2-D float `.weight` that is not an embedding table: what loaders turn into Linear layers."""
    low = info.name.lower()
    return (
        info.dtype in FLOAT_DTYPES
        and len(info.shape) == 2
        and info.name.endswith(".weight")
        and not any(h in low for h in EMBED_HINTS)
    )


# ----------------------------------------------------------------------------------------- inspect
def describe_format(ckpt: Checkpoint, roles: Roles) -> tuple[str, str]:
    qc = find_quantization_config(ckpt.config)
    method = quant_method(ckpt)
    float_bytes: dict[str, int] = defaultdict(int)
    for name in roles.unquantized:
        info = ckpt.info(name)
        float_bytes[info.dtype] += info.nbytes
    main = max(float_bytes, key=float_bytes.get) if float_bytes else None
    if roles.fp8:
        if method == "fp8":
            return "fp8", "native block FP8 (quant_method fp8, DeepSeek-V3 `weight_scale_inv` layout)"
        if method == "compressed-tensors":
            return "compressed-tensors", ("compressed-tensors float-quantized FP8 (`weight_scale` layout)")
        if qc is None:
            return "fp8-unconfigured", "FP8 tensors but no quantization_config in config.json"
        return "fp8-other", f"FP8 tensors with quant_method {method!r}"
    plain = f"plain {main.lower()}" if main else "no floating-point tensors"
    if qc is not None:
        return "plain-with-quantization-config", f"{plain}, but config.json keeps a quantization_config"
    return "plain", plain


def odd_things(ckpt: Checkpoint, roles: Roles, scan: Scan | None = None) -> list[dict]:
    out: list[dict] = []

    def add(kind: str, message: str, tensor: str | None = None, file: str | None = None):
        if tensor and file is None and tensor in ckpt:
            file = str(ckpt.root / ckpt.weight_map[tensor])
        out.append({"kind": kind, "message": message, "tensor": tensor, "file": file})

    if scan is not None:
        for f in scan.findings:
            add(
                f"structure:{f.check}" if f.status == "fail" else f"warning:{f.check}",
                f.message,
                f.tensor,
                f.file,
            )
    for name, scales in roles.scale_names.items():
        if not scales and not any(name + s in (scan.unreadable if scan else {}) for s in SCALE_SUFFIXES):
            add("fp8_without_scale", "FP8 tensor has no scale (X_scale_inv or X_scale)", name)
        elif len(scales) > 1:
            add("two_scales", f"FP8 tensor has more than one scale: {', '.join(scales)}", name)
    for name, why in roles.orphans.items():
        add("orphan_scale", why, name)
    suffixes = {roles.scale_suffix(s) for s in roles.scales}
    if len(suffixes) > 1:
        add(
            "mixed_scale_names",
            "both _scale_inv and _scale scales: loaders want one naming "
            f"({sum(s.endswith('_scale_inv') for s in roles.scales)} _scale_inv, "
            f"{sum(not s.endswith('_scale_inv') for s in roles.scales)} _scale)",
        )
    method = quant_method(ckpt)
    want = {"fp8": "_scale_inv", "compressed-tensors": "_scale"}.get(method or "")
    if want and len(suffixes) == 1 and suffixes != {want}:
        add(
            "scale_name_mismatch",
            f"quant_method {method} wants {want} scales, the checkpoint has {next(iter(suffixes))}",
        )
    locations = quantization_config_locations(ckpt.config)
    if not roles.fp8 and locations:
        add(
            "leftover_quantization_config",
            "no FP8 tensors, but config.json has " + " and ".join(locations),
            file=str(ckpt.root / CONFIG_NAME),
        )
    if roles.fp8 and not locations:
        add(
            "fp8_without_quantization_config",
            f"{len(roles.fp8)} FP8 tensor(s) but config.json has no quantization_config: {few(roles.fp8)}",
            file=str(ckpt.root / CONFIG_NAME),
        )
    return out


def inspect_checkpoint(path) -> dict:
    """A JSON-ready description of a checkpoint folder (see docs/verify.md for the fields)."""
    scan = scan_checkpoint(path)
    ckpt = scan.ckpt
    roles = classify(ckpt, scan.unreadable)
    fmt, description = describe_format(ckpt, roles)
    by_dtype: dict[str, dict] = {}
    by_role: dict[str, dict] = {
        k: {"tensors": 0, "bytes": 0}
        for k in ("fp8_weight", "fp8_without_scale", "scale", "orphan_scale", "unquantized_float", "other")
    }
    for name, shard in ckpt.weight_map.items():
        info = ckpt.shards[shard].tensors[name]
        d = by_dtype.setdefault(info.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += info.nbytes
        if name in roles.fp8:
            role = "fp8_weight" if roles.scale_names[name] else "fp8_without_scale"
        elif name in roles.scales:
            role = "scale"
        elif name in roles.orphans:
            role = "orphan_scale"
        elif name in roles.unquantized:
            role = "unquantized_float"
        else:
            role = "other"
        by_role[role]["tensors"] += 1
        by_role[role]["bytes"] += info.nbytes
    scale_dtypes: dict[str, int] = defaultdict(int)
    for s in roles.scales:
        if s in ckpt:
            scale_dtypes[ckpt.info(s).dtype] += 1
    qc = find_quantization_config(ckpt.config)
    locations = quantization_config_locations(ckpt.config)
    return {
        "path": str(ckpt.root),
        "format": fmt,
        "description": description,
        "quantization_config": qc,
        "quantization_config_location": locations[0] if locations else None,
        "block_size": list(block_from_config(ckpt)) if block_from_config(ckpt) else None,
        "scale_fmt": (qc or {}).get("scale_fmt"),
        "has_index": ckpt.has_index,
        "shards": len(ckpt.shards) + len(set(scan.unreadable.values())),
        "unreadable_shards": sorted(set(scan.unreadable.values())),
        "tensors": len(ckpt.weight_map),
        "tensor_bytes": sum(v["bytes"] for v in by_dtype.values()),
        "file_bytes": ckpt.total_bytes,
        "by_dtype": dict(sorted(by_dtype.items())),
        "by_role": by_role,
        "scale_names": {s: sum(roles.scale_suffix(n) == s for n in roles.scales) for s in SCALE_SUFFIXES},
        "scale_dtypes": dict(scale_dtypes),
        "other_files": ckpt.other_files,
        "odd": odd_things(ckpt, roles, scan),
    }


def inspect_table(info: dict):
    """A rich Table of `inspect_checkpoint`'s result (the CLI prints it)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{info['path']}: {info['description']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("format", info["format"])
    qc = info["quantization_config"]
    if qc is not None:
        loc = info["quantization_config_location"]
        table.add_row(
            "quantization_config",
            escape(
                ("" if loc == "quantization_config" else f"(under {loc}) ")
                + json.dumps(qc, separators=(",", ":"))
            ),
        )
    if info["block_size"]:
        table.add_row("block size", "x".join(map(str, info["block_size"])))
    table.add_row("shards", f"{info['shards']}" + (" (index)" if info["has_index"] else " (single file)"))
    table.add_row("tensors", f"{info['tensors']:,} ({info['tensor_bytes']:,} bytes)")
    for dtype, d in info["by_dtype"].items():
        table.add_row(f"  dtype {dtype}", f"{d['tensors']:,} tensors, {d['bytes']:,} bytes")
    for role, d in info["by_role"].items():
        if d["tensors"]:
            table.add_row(f"  {role.replace('_', ' ')}", f"{d['tensors']:,} tensors, {d['bytes']:,} bytes")
    table.add_row("other files", str(len(info["other_files"])))
    if info["odd"]:
        for o in info["odd"]:
            where = o["tensor"] or o["file"] or ""
            text = f"{where}: {o['message']}" if where else o["message"]
            table.add_row(f"[yellow]odd: {escape(o['kind'])}[/]", escape(text))
    else:
        table.add_row("odd", "nothing")
    return table


__all__ = [
    "Finding",
    "Roles",
    "Scan",
    "classify",
    "find_quantization_config",
    "inspect_checkpoint",
    "inspect_table",
    "scan_checkpoint",
]
