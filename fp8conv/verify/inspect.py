"""`fp8conv inspect`: what a checkpoint folder holds, from headers and config alone (no tensor data).

Layout knowledge (family, scheme, scale encodings, artifacts) comes from fp8conv/verify/layouts.py;
reading the folder, damage included, from fp8conv/verify/scan.py. Cost is linear in the tensors.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from fp8conv.checkpoint.layout import CONFIG_NAME
from fp8conv.verify import layouts as L
from fp8conv.verify.scan import Scan, few, paused_gc, read_side_json, scan_checkpoint

__all__ = ["inspect_checkpoint", "inspect_table"]


def _schemes(scan: Scan, roles: L.Roles, qc: dict | None) -> tuple[dict, dict]:
    """How many FP8 weights use each scale scheme ("block 128x128", "channel", "tensor") and each
    scale encoding ("float (F32)", "ue8m0 exponent bytes (U8)", ...)."""
    ckpt = scan.ckpt
    cfg_block = L.block_from_config(qc)
    schemes: Counter = Counter()
    encodings: Counter = Counter()
    for name, info in roles.fp8.items():
        scales = roles.scale_names.get(name) or []
        if not scales:
            continue
        s = ckpt.info(scales[0])
        use, _ = L.scale_use(roles, info, s, cfg_block)
        schemes[use.scheme if use is not None else "unexplained scale shape"] += 1
        encodings[L.scale_encoding(s, qc)] += 1
    return dict(schemes), dict(encodings)


def odd_things(scan: Scan, roles: L.Roles) -> list[dict]:
    ckpt = scan.ckpt
    out: list[dict] = []

    def add(kind: str, message: str, tensor: str | None = None, file: str | None = None):
        if tensor and file is None and tensor in ckpt:
            file = str(ckpt.root / ckpt.weight_map[tensor])
        out.append({"kind": kind, "message": message, "tensor": tensor, "file": file})

    for f in scan.findings:
        add(
            f"structure:{f.check}" if f.status == "fail" else f"warning:{f.check}",
            f.message,
            f.tensor,
            f.file,
        )
    for name, scales in roles.scale_names.items():
        if not scales and not any(name + s in scan.unreadable for s in L.SCALE_SUFFIXES):
            add("fp8_without_scale", "FP8 tensor has no scale (X_scale_inv or X_scale)", name)
        elif len(scales) > 1:
            add("two_scales", f"FP8 tensor has more than one scale: {', '.join(scales)}", name)
    for name, why in roles.orphans.items():
        add("orphan_scale", why, name)
    suffixes = Counter(roles.scale_suffix(s) for s in roles.scales if s.endswith(L.SCALE_SUFFIXES))
    if len(suffixes) > 1:
        add(
            "mixed_scale_names",
            "more than one scale naming: loaders want one ("
            + ", ".join(f"{n} {s}" for s, n in sorted(suffixes.items()))
            + ")",
        )
    qc = L.quantization_config(ckpt.config)
    want = L.expected_scale_suffix(qc)
    clash = {L.naming_problem(qc, s) for s in roles.scales} - {None}
    if want and len(suffixes) == 1 and clash:
        add(
            "scale_name_mismatch",
            f"quant_method {qc.get('quant_method')} "
            f"{'with' if qc.get('weight_block_size') is not None else 'without'} weight_block_size "
            f"wants {want} scales, the checkpoint has {next(iter(suffixes))}",
        )
    quantized = L.is_quantized(roles, ckpt.config)
    locations = L.quantization_config_locations(ckpt.config)
    if not quantized:
        if locations:
            add(
                "leftover_quantization_config",
                "no FP8 or packed tensors, but config.json has " + " and ".join(locations),
                file=str(ckpt.root / CONFIG_NAME),
            )
        for name, kind in roles.artifacts.items():
            add("leftover_artifact", f"{kind} tensor in a checkpoint without FP8 weights", name)
        for fname in L.SIDE_FILES:
            if (ckpt.root / fname).exists():
                add(
                    "leftover_side_file",
                    f"{fname}: quantization settings beside plain weights",
                    file=str(ckpt.root / fname),
                )
        params = read_side_json(ckpt.root, L.PARAMS_FILE, [])
        if isinstance(params, dict) and "quantization" in params:
            add(
                "leftover_side_file",
                "params.json has a 'quantization' key beside plain weights",
                file=str(ckpt.root / L.PARAMS_FILE),
            )
    declared = roles.detection is not None and roles.detection.settings.quantized
    if roles.fp8 and not locations and not declared:
        add(
            "fp8_without_quantization_config",
            f"{len(roles.fp8)} FP8 tensor(s) but config.json has no quantization_config: {few(roles.fp8)}",
            file=str(ckpt.root / CONFIG_NAME),
        )
    return out


def inspect_checkpoint(path) -> dict:
    """A JSON-ready description of a checkpoint folder (see docs/verify.md for the fields). `ok` is
    False when the folder is damaged (the CLI then exits 3 after describing it)."""
    with paused_gc():
        return _inspect(path)


def _inspect(path) -> dict:
    scan = scan_checkpoint(path)
    ckpt = scan.ckpt
    roles = L.classify(ckpt, scan.unreadable)
    fmt, description = L.describe_format(ckpt, roles)
    by_dtype: dict[str, dict] = {}
    by_role: dict[str, dict] = {
        k: {"tensors": 0, "bytes": 0}
        for k in (
            "fp8_weight",
            "fp8_without_scale",
            "scale",
            "orphan_scale",
            "artifact",
            "unquantized_float",
            "other",
        )
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
        elif name in roles.artifacts:
            role = "artifact"
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
    artifacts: dict[str, int] = Counter()
    for name, kind in roles.artifacts.items():
        artifacts[f"{kind}: {name.rsplit('.', 1)[-1]}"] += 1
    qc = L.quantization_config(ckpt.config)
    locations = L.quantization_config_locations(ckpt.config)
    schemes, encodings = _schemes(scan, roles, qc)
    block = L.block_from_config(qc)
    side_files = [f for f in (*L.SIDE_FILES, L.PARAMS_FILE) if (ckpt.root / f).exists()]
    suffix_counts = Counter(roles.scale_suffix(n) for n in roles.scales)
    return {
        "ok": not scan.damaged,
        "path": str(ckpt.root),
        "format": fmt,
        "description": description,
        "family": roles.family if roles.detection is not None else None,
        "family_title": roles.detection.title if roles.detection is not None else None,
        "detect_error": roles.detect_error.message if roles.detect_error is not None else None,
        "quant_method": None if qc is None else qc.get("quant_method"),
        "quantization_config": qc,
        "quantization_config_location": locations[0] if locations else None,
        "block_size": list(block) if block else None,
        "scale_fmt": (qc or {}).get("scale_fmt"),
        "schemes": schemes,
        "scale_encodings": encodings,
        "artifacts": dict(artifacts),
        "side_files": side_files,
        "has_index": ckpt.has_index,
        "shards": len(ckpt.shards) + len(set(scan.unreadable.values())),
        "unreadable_shards": sorted(set(scan.unreadable.values())),
        "tensors": len(ckpt.weight_map),
        "tensor_bytes": sum(v["bytes"] for v in by_dtype.values()),
        "file_bytes": ckpt.total_bytes,
        "by_dtype": dict(sorted(by_dtype.items())),
        "by_role": by_role,
        "scale_names": {
            **{s: suffix_counts.get(s, 0) for s in L.SCALE_SUFFIXES},
            **{s: n for s, n in suffix_counts.items() if s not in L.SCALE_SUFFIXES},
        },
        "scale_dtypes": dict(scale_dtypes),
        "other_files": ckpt.other_files,
        "odd": odd_things(scan, roles),
    }


def inspect_table(info: dict):
    """A rich Table of `inspect_checkpoint`'s result (the CLI prints it)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{escape(info['path'])}: {escape(info['description'])}", show_header=False)
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
    for key, label in (
        ("schemes", "scale scheme"),
        ("scale_encodings", "scale encoding"),
        ("artifacts", "artifact"),
    ):
        for k, n in info[key].items():
            table.add_row(label, escape(f"{k}: {n:,} tensor(s)"))
    if info["side_files"]:
        table.add_row("side files", escape(", ".join(info["side_files"])))
    table.add_row("shards", f"{info['shards']}" + (" (index)" if info["has_index"] else " (single file)"))
    table.add_row("tensors", f"{info['tensors']:,} ({info['tensor_bytes']:,} bytes)")
    for dtype, d in info["by_dtype"].items():
        table.add_row(f"  dtype {dtype}", f"{d['tensors']:,} tensors, {d['bytes']:,} bytes")
    for role, d in info["by_role"].items():
        if d["tensors"]:
            table.add_row(f"  {role.replace('_', ' ')}", f"{d['tensors']:,} tensors, {d['bytes']:,} bytes")
    table.add_row("other files", str(len(info["other_files"])))
    odd = info["odd"]
    for o in odd[:50]:
        where = o["tensor"] or o["file"] or ""
        text = f"{where}: {o['message']}" if where else o["message"]
        table.add_row(f"[yellow]odd: {escape(o['kind'])}[/]", escape(text))
    if len(odd) > 50:
        table.add_row("[yellow]odd[/]", f"{len(odd) - 50} more (see --json)")
    if not odd:
        table.add_row("odd", "nothing")
    return table
