"""`fp8conv quantize --like REF`: take the layout, scheme, block, scale format, FP8 tensor set (and so the
skip list) and quantization_config of an existing FP8 checkpoint, so a fine-tuned BF16 model goes back
to exactly the release's layout. The model's tensors must be the reference's, name for name and shape for
shape; anything else is refused (exit 3) with the differences listed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.convert.options import QuantizeOptions
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats import Element, Granularity, detect, find_quantization_config
from fp8conv.formats.writers import SCHEME_OF_GRANULARITY, format_of, writer

SHOWN = 4  # differences of each kind listed in a refusal


@dataclass(frozen=True)
class Reference:
    root: str
    format: str
    scheme: str
    block: tuple[int, int]
    scale_fmt: str
    fp8: frozenset[str]  # the weights the reference holds in FP8
    shapes: dict[str, tuple[int, ...]]  # the reference's tensors as the BF16 model holds them
    quantization_config: dict | None


def read_reference(ref: Checkpoint) -> Reference:
    found = detect(ref)
    if not found.weights:
        raise InvalidCheckpoint("--like: the reference holds no FP8 weight", file=ref.root)
    grans, tiles, dtypes = set(), set(), set()
    for w in found.weights.values():
        if w.element is not Element.FP8_E4M3 or w.layout.granularity not in SCHEME_OF_GRANULARITY:
            raise InvalidCheckpoint(
                f"--like: {w.scheme.describe()} is not a scheme fp8conv quantize writes "
                "(block, per-channel, MXFP8 e4m3)",
                file=ref.root / ref.weight_map[w.name],
                tensor=w.name,
            )
        grans.add(w.layout.granularity)
        tiles.add(w.layout.tile if w.layout.granularity is Granularity.BLOCK else None)
        dtypes.add(w.scale.dtype)
    if len(grans) > 1 or len(tiles) > 1:
        raise InvalidCheckpoint("--like: the reference mixes schemes or tiles", file=ref.root)
    fmt = format_of(found.family)
    scheme = SCHEME_OF_GRANULARITY[grans.pop()]
    w = writer(fmt, scheme)
    if dtypes != {w.scale_dtype}:
        raise InvalidCheckpoint(
            f"--like: the reference stores {', '.join(sorted(dtypes))} scales; fp8conv writes "
            f"{w.scale_dtype} for {scheme} in the {fmt} layout",
            file=ref.root,
            hint="quantize with --scheme / --format instead, or convert the reference's scales first",
        )
    qc = find_quantization_config(ref.config)
    power_of_two = (qc or {}).get("scale_fmt") == "ue8m0"
    shapes = {}
    for name in ref.weight_map:
        if name in found.artifacts:
            continue
        shapes[name] = (
            tuple(found.weights[name].shape) if name in found.weights else tuple(ref.info(name).shape)
        )
    tile = tiles.pop() or (128, 128)
    return Reference(
        str(ref.root),
        fmt,
        scheme,
        tile,
        "ue8m0" if power_of_two else "float",
        frozenset(found.weights),
        shapes,
        qc,
    )


def options_like(opts: QuantizeOptions, ref: Reference) -> QuantizeOptions:
    return replace(opts, format=ref.format, scheme=ref.scheme, block_size=ref.block, scale_fmt=ref.scale_fmt)


def check_same_tensors(ckpt: Checkpoint, ref: Reference) -> None:
    """Refuse a model whose tensors are not the reference's (names and shapes), listing differences."""
    ours = {n: tuple(ckpt.info(n).shape) for n in ckpt.weight_map}
    kinds = [
        [f"{n}: only in the model" for n in sorted(set(ours) - set(ref.shapes))],
        [f"{n}: only in the reference" for n in sorted(set(ref.shapes) - set(ours))],
        [
            f"{n}: shape {list(ours[n])} here, {list(ref.shapes[n])} in the reference"
            for n in sorted(set(ours) & set(ref.shapes))
            if ours[n] != ref.shapes[n]
        ],
    ]
    total = sum(len(k) for k in kinds)
    if total:
        shown = [d for k in kinds for d in k[:SHOWN]]
        more = f"; and {total - len(shown)} more" if total > len(shown) else ""
        raise InvalidCheckpoint(
            f"--like {ref.root}: the model's tensors are not the reference's ({total} differences): "
            + "; ".join(shown)
            + more,
            file=ckpt.root,
            hint="--like needs the same architecture and sizes; use --scheme / --format / --skip instead",
        )
