"""What a layout family knows, as values: the quantized weights with their scales, the artifacts, the
settings it owns; and the base class every family module fills in."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import TensorInfo
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.scheme import (
    ELEMENTS,
    MX_GROUP,
    PACKED_DTYPES,
    SCALE_ENCODINGS,
    Element,
    Granularity,
    ScaleEncoding,
    ScaleLayout,
    WeightScheme,
    fit_scale,
    grid_of,
)
from fp8conv.formats.settings import Settings


class ArtifactKind(str, Enum):
    """A tensor that belongs to the quantization, never to a dequantized model."""

    WEIGHT_SCALE = "weight_scale"  # the scale of a quantized weight
    INPUT_SCALE = "input_scale"  # static activation scales: input_scale, activation_scale, qscale_act
    OUTPUT_SCALE = "output_scale"
    KV_SCALE = "kv_scale"  # kv-cache (and attention query) scales: k_scale, v_scale, q_scale, kv_scale


# Names of activation and kv-cache scales, as the published families spell them (FORMATS.md: RedHatAI
# static FP8 and AutoFP8 `input_scale`; Mistral `activation_scale` / native `qscale_act`; ModelOpt and
# compressed-tensors `k_scale` / `v_scale` on the attention or on k_proj / v_proj; `kv_scale` (older vLLM)).
ACTIVATION_ARTIFACTS: tuple[tuple[re.Pattern, ArtifactKind], ...] = (
    (re.compile(r"(^|\.)(kv|q|k|v)_fake_quantizer\.qscale_act$"), ArtifactKind.KV_SCALE),
    (
        re.compile(r"(^|[._])(input_scale|activation_scale|qscale_act|input_scale_ub)$"),
        ArtifactKind.INPUT_SCALE,
    ),
    (re.compile(r"(^|[._])output_scale$"), ArtifactKind.OUTPUT_SCALE),
    (re.compile(r"(^|\.)(k_scale|v_scale|q_scale|kv_scale)$"), ArtifactKind.KV_SCALE),
)
ACTIVATION_KINDS = (ArtifactKind.INPUT_SCALE, ArtifactKind.KV_SCALE, ArtifactKind.OUTPUT_SCALE)
# What looks like part of a quantization whatever the family: a name fp8conv refuses to pass through when
# the checkpoint is quantized and no layout explains it (a scale, a zero point, MX blocks / scales).
SCALE_LIKE = re.compile(
    r"(_scale_inv|(weight|input|output|activation|act|proj)_scale|(^|\.)(k|v|q|kv)_scale|qscale_\w+"
    r"|_zero_point|_blocks|_scales|_global_scale)$"
)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight of a checkpoint and how to turn it back into floats.

    `shape` is the weight's own shape [*lead, M, N] (for packed FP4 codes, the unpacked one); the
    dequantized value is cast_out(fp32(q) * fp32(s)) with s broadcast by `layout`, stored under
    `out_name` with shape `out_shape` ([*lead, N, M] when `transpose`, as gpt-oss experts load)."""

    name: str
    codes: TensorInfo
    scale: TensorInfo
    element: Element
    layout: ScaleLayout
    shape: tuple[int, ...]
    out_name: str
    transpose: bool = False

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.transpose:
            return (*self.shape[:-2], self.shape[-1], self.shape[-2])
        return self.shape

    @property
    def scheme(self) -> WeightScheme:
        g = self.layout.granularity
        tile = self.layout.tile if g in (Granularity.BLOCK, Granularity.GROUP) else None
        return WeightScheme(self.element, g, tile, self.layout.encoding)


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: ArtifactKind
    of: str | None = None  # the weight a weight scale belongs to


@dataclass
class Detection:
    """What a checkpoint is, as one family sees it: the object convert, verify and inspect read.

    weights: every quantized weight by its source name; artifacts: every tensor that must not reach a
    dequantized output (weight scales included); config_keys: dotted config.json paths of its settings;
    side_files: files it owns that a dequantized output drops (hf_quant_config.json); rewrite_params:
    whether params.json loses its `quantization` key."""

    family: str
    title: str
    settings: Settings
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    config_keys: tuple[str, ...] = ()
    side_files: tuple[str, ...] = ()
    rewrite_params: bool = False

    @property
    def schemes(self) -> list[WeightScheme]:
        """The distinct schemes of its weights, in first-seen order."""
        return list(dict.fromkeys(w.scheme for w in self.weights.values()))

    @property
    def scale_encodings(self) -> list[ScaleEncoding]:
        return list(dict.fromkeys(w.layout.encoding for w in self.weights.values()))

    def weight_of(self, scale_name: str) -> QuantizedWeight | None:
        a = self.artifacts.get(scale_name)
        return self.weights.get(a.of) if a is not None and a.of else None


class Layout:
    """A layout family. A subclass says which settings are its own (`claims`) and which tensors of a
    checkpoint are quantized weights and artifacts (`scan`); `detect` in the registry does the rest:
    it refuses anything quantized that the family leaves unexplained."""

    name: str = ""  # short id, used in messages and by `fp8conv inspect`
    title: str = ""  # the releases it covers, for people
    # settings of its own that a dequantized output loses (beyond config.json's keys)
    side_files: tuple[str, ...] = ()
    rewrite_params: bool = False

    def claims(self, settings: Settings) -> bool:  # pragma: no cover - every family overrides it
        raise NotImplementedError

    def check_settings(self, settings: Settings, ckpt: Checkpoint) -> None:
        """Raise InvalidCheckpoint for a setting of this family that fp8conv does not support."""

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:  # pragma: no cover
        """Fill found.weights and found.artifacts."""
        raise NotImplementedError

    def where(self, ckpt: Checkpoint, name: str) -> str:
        return str(ckpt.root / ckpt.weight_map[name])


# -------------------------------------------------------------------------------- shared helpers
def encoding_of(ckpt: Checkpoint, scale: TensorInfo) -> ScaleEncoding:
    enc = SCALE_ENCODINGS.get(scale.dtype)
    if enc is None:
        raise InvalidCheckpoint(
            f"scale dtype {scale.dtype} is not one of {', '.join(SCALE_ENCODINGS)}",
            file=ckpt.root / ckpt.weight_map[scale.name],
            tensor=scale.name,
        )
    return enc


def fit_or_refuse(
    ckpt: Checkpoint,
    family: str,
    weight: str,
    shape: tuple[int, ...],
    scale: TensorInfo,
    allowed: Iterable[Granularity],
    block: tuple[int, int] | None,
) -> ScaleLayout:
    allowed = frozenset(allowed)
    enc = encoding_of(ckpt, scale)
    lay = fit_scale(shape, scale.shape, enc, allowed, block)
    if lay is None:
        kinds = ", ".join(g.value for g in Granularity if g in allowed)
        blk = (
            f"; expected {list(grid_of(shape, block))} for the configured {block[0]}x{block[1]} tiles"
            if block
            else ""
        )
        raise InvalidCheckpoint(
            f"scale shape {list(scale.shape)} does not fit weight {list(shape)} ({weight}) under any "
            f"{family} scheme ({kinds}{blk})",
            file=ckpt.root / ckpt.weight_map[scale.name],
            tensor=scale.name,
        )
    return lay


def add_fp8(
    found: Detection,
    ckpt: Checkpoint,
    name: str,
    scale_names: Iterable[str],
    allowed: Iterable[Granularity],
    block: tuple[int, int] | None,
) -> bool:
    """Record FP8 weight `name` with the first of `scale_names` present; False if none is."""
    info = ckpt.info(name)
    for sname in scale_names:
        if sname in ckpt and sname != name:
            scale = ckpt.info(sname)
            if len(info.shape) < 2:
                raise InvalidCheckpoint(
                    "FP8 tensor has fewer than 2 dimensions; cannot tile it",
                    file=ckpt.root / ckpt.weight_map[name],
                    tensor=name,
                )
            lay = fit_or_refuse(ckpt, found.family, name, info.shape, scale, allowed, block)
            found.weights[name] = QuantizedWeight(
                name, info, scale, ELEMENTS[info.dtype], lay, info.shape, name
            )
            found.artifacts[sname] = Artifact(sname, ArtifactKind.WEIGHT_SCALE, name)
            return True
    return False


def add_fp4(
    found: Detection,
    ckpt: Checkpoint,
    name: str,
    scale_name: str,
    out_name: str,
    grouped: bool,
    transpose: bool = False,
) -> None:
    """Record packed FP4 codes `name` with 1 x 32 e8m0 scales `scale_name`. `grouped`: codes stored
    [*lead, M, G, 16] (gpt-oss `_blocks`), else [*lead, M, N/2] (int8 experts of DeepSeek-V4)."""
    info, scale = ckpt.info(name), ckpt.info(scale_name)
    where = ckpt.root / ckpt.weight_map[name]
    if grouped:
        if len(info.shape) < 3 or info.shape[-1] != MX_GROUP // 2:
            raise InvalidCheckpoint(
                f"MXFP4 blocks must be [..., rows, groups, {MX_GROUP // 2}] bytes, not {list(info.shape)}",
                file=where,
                tensor=name,
            )
        shape = (*info.shape[:-2], info.shape[-2] * MX_GROUP)
    else:
        if len(info.shape) < 2:
            raise InvalidCheckpoint("packed FP4 tensor has fewer than 2 dimensions", file=where, tensor=name)
        shape = (*info.shape[:-1], info.shape[-1] * 2)
    enc = encoding_of(ckpt, scale)
    lay = fit_scale(shape, scale.shape, enc, frozenset({Granularity.GROUP}), (1, MX_GROUP))
    if lay is None or not enc.power_of_two or shape[-1] % MX_GROUP:
        raise InvalidCheckpoint(
            f"FP4 scale {list(scale.shape)} ({scale.dtype}) is not one e8m0 exponent byte per 1 x {MX_GROUP} "
            f"group of the unpacked weight {list(shape)}",
            file=ckpt.root / ckpt.weight_map[scale_name],
            tensor=scale_name,
        )
    found.weights[name] = QuantizedWeight(
        name, info, scale, Element.FP4_E2M1, lay, shape, out_name, transpose
    )
    found.artifacts[scale_name] = Artifact(scale_name, ArtifactKind.WEIGHT_SCALE, name)


def add_activation_artifacts(found: Detection, ckpt: Checkpoint, kinds: Iterable[ArtifactKind]) -> None:
    """Record every tensor named like an activation / kv-cache scale of an allowed kind."""
    kinds = set(kinds)
    for name in ckpt.weight_map:
        if name in found.artifacts:
            continue
        for pat, kind in ACTIVATION_ARTIFACTS:
            if kind in kinds and pat.search(name):
                found.artifacts[name] = Artifact(name, kind)
                break


def is_fp8(info: TensorInfo) -> bool:
    return info.dtype in ELEMENTS


def looks_packed(info: TensorInfo) -> bool:
    """Integer bytes shaped like weights: what packed FP4/INT4 data looks like (1-D codebooks, masks and
    ids are not)."""
    return info.dtype in PACKED_DTYPES and len(info.shape) >= 2
