"""The families fp8conv knows, in the order they are asked, and `detect`: settings -> family -> tensors,
with every quantized thing that the family does not explain refused before anything is written."""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.base import SCALE_LIKE, Detection, Layout, is_fp8, looks_packed
from fp8conv.formats.compressed_tensors import CompressedTensors
from fp8conv.formats.fbgemm import Fbgemm
from fp8conv.formats.fp8_block import Fp8Block, scale_names
from fp8conv.formats.mistral import MistralNative
from fp8conv.formats.modelopt import ModelOpt
from fp8conv.formats.mxfp4 import Mxfp4
from fp8conv.formats.settings import HF_QUANT_CONFIG, PARAMS_JSON, Settings, read_settings

# Adding a family: write its module, add one instance here (README.md in this folder).
FAMILIES: tuple[Layout, ...] = (
    Fp8Block(),
    CompressedTensors(),
    ModelOpt(),
    Fbgemm(),
    Mxfp4(),
    MistralNative(),
)
PLAIN = "none"  # the family name of a checkpoint with no quantization


def family(name: str) -> Layout:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(name)


def known() -> str:
    """The families, for messages: 'fp8 (...), compressed-tensors (...), ...'."""
    return "; ".join(f"{f.name}: {f.title}" for f in FAMILIES)


def _choose(ckpt: Checkpoint, settings: Settings) -> Layout | None:
    for f in FAMILIES:
        if f.claims(settings):
            return f
    if settings.config is not None:
        qm = settings.config.get("quant_method")
        what = f"quant_method {qm!r}" if qm is not None else "no quant_method"
        raise InvalidCheckpoint(
            f"{settings.where()} has {what}, which fp8conv does not read",
            file=ckpt.root / "config.json",
            hint=f"supported layouts: {known()}",
        )
    return None


def detect(ckpt: Checkpoint) -> Detection:
    """The checkpoint's family, its quantized weights with their scale layouts, and its artifacts.

    Raises InvalidCheckpoint (exit 3) for settings no family reads, a quantized tensor without its
    scale, a scale whose shape no scheme of the family explains, a scale-like tensor no rule explains,
    and packed integer data of unknown meaning."""
    settings = read_settings(ckpt)
    layout = _choose(ckpt, settings)
    has_fp8 = any(is_fp8(ckpt.info(n)) for n in ckpt.weight_map)
    if layout is None and has_fp8:
        layout = FAMILIES[0]  # FP8 tensors and no settings: the fp8 family's names and tiles, by shape
    if layout is None:
        found = Detection(PLAIN, "not quantized", settings)
    else:
        layout.check_settings(settings, ckpt)
        found = Detection(layout.name, layout.title, settings)
        layout.scan(ckpt, settings, found)
    found.config_keys = settings.config_keys
    found.side_files = tuple(f for f in settings.files if f == HF_QUANT_CONFIG)
    found.rewrite_params = PARAMS_JSON in settings.files
    _refuse_unexplained(ckpt, found, quantized=settings.quantized or has_fp8)
    return found


def _refuse_unexplained(ckpt: Checkpoint, found: Detection, quantized: bool) -> None:
    hint = f"supported layouts: {known()}"
    for name, shard in ckpt.weight_map.items():
        if name in found.weights or name in found.artifacts:
            continue
        info = ckpt.info(name)
        where = ckpt.root / shard
        if is_fp8(info):
            raise InvalidCheckpoint(
                f"FP8 weight has no scale ({' or '.join(scale_names(name))}) anywhere in the checkpoint "
                f"that the {found.family} layout reads",
                file=where,
                tensor=name,
                hint="an FP8 tensor is never left in the output",
            )
        if info.dtype == "F8_E8M0" or SCALE_LIKE.search(name):
            raise InvalidCheckpoint(
                f"tensor looks like part of a quantization ({info.dtype} {list(info.shape)}), but no rule of "
                f"the {found.family} layout explains it",
                file=where,
                tensor=name,
                hint=hint,
            )
        if quantized and looks_packed(info):
            raise InvalidCheckpoint(
                f"{info.dtype} {list(info.shape)} tensor in a quantized checkpoint: packed data of unknown "
                f"meaning for the {found.family} layout",
                file=where,
                tensor=name,
                hint=hint,
            )
