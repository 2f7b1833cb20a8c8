"""Scheme values: what the numbers of a quantized weight are and how its scale spreads over it.

Values, not strings branched on (in the style of torchao `prototype/mx_formats/config.py`, whose
MXLinearConfig names an element dtype, a block size and a scale encoding): a layout family says which
schemes its checkpoints use, and convert / verify / inspect read these values instead of a family name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Element(str, Enum):
    """The stored element format of a quantized weight."""

    FP8_E4M3 = "float8_e4m3fn"
    FP8_E5M2 = "float8_e5m2"
    FP4_E2M1 = "float4_e2m1"  # packed: two codes a byte, the low nibble the even element

    @property
    def packed(self) -> bool:
        return self is Element.FP4_E2M1


class Granularity(str, Enum):
    """Which elements of a weight [*lead, M, N] share one scale (the tile, rows x columns)."""

    TENSOR = "tensor"  # one scale for the whole tensor (all experts too): tile M x N
    EXPERT = "expert"  # one scale per stacked expert [*lead]: tile M x N
    BLOCK = "block"  # tiles bm x bn, ragged at the bottom and right edges
    CHANNEL = "channel"  # one scale per row (output channel of an [out, in] weight): tile 1 x N
    COLUMN = "column"  # one per column (output channel of an [in, out] expert matrix): tile M x 1
    HALF = "half"  # one per half of the rows (the gate and up halves of a fused gate_up): M/2 x N
    GROUP = "group"  # MX groups of 1 x 32 along each row


class ScaleEncoding(str, Enum):
    """How a scale is stored. Every encoding is a dequantization multiplier: w = q * s."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    E8M0 = "float8_e8m0fnu"  # exponent byte e, value 2**(e-127); 255 is NaN
    UINT8_EXPONENT = "uint8_exponent"  # the same bytes stored as uint8

    @property
    def power_of_two(self) -> bool:
        return self in (ScaleEncoding.E8M0, ScaleEncoding.UINT8_EXPONENT)


# safetensors dtype of a scale tensor -> its encoding; other dtypes are no scale fp8conv can read.
SCALE_ENCODINGS: dict[str, ScaleEncoding] = {
    "F32": ScaleEncoding.FLOAT32,
    "BF16": ScaleEncoding.BFLOAT16,
    "F16": ScaleEncoding.FLOAT16,
    "F8_E8M0": ScaleEncoding.E8M0,
    "U8": ScaleEncoding.UINT8_EXPONENT,
}
ELEMENTS: dict[str, Element] = {"F8_E4M3": Element.FP8_E4M3, "F8_E5M2": Element.FP8_E5M2}
PACKED_DTYPES = ("U8", "I8")  # storage of packed FP4 codes
MX_GROUP = 32


@dataclass(frozen=True)
class ScaleLayout:
    """How one weight's scale tensor maps onto the weight: the tile one scale covers, the grid of
    tiles [*lead, ceil(M/bm), ceil(N/bn)], and `view`, the shape the stored scale is reshaped to (same
    element count) before it is broadcast to `grid` (a per-tensor scale [] has view [1, 1, 1] for a
    weight with one leading dimension)."""

    granularity: Granularity
    tile: tuple[int, int]
    grid: tuple[int, ...]
    view: tuple[int, ...]
    encoding: ScaleEncoding


@dataclass(frozen=True)
class WeightScheme:
    """One quantization scheme as a value: element format, scale granularity, tile and encoding."""

    element: Element
    granularity: Granularity
    tile: tuple[int, int] | None  # None where the tile is the tensor's own size (tensor, expert, ...)
    encoding: ScaleEncoding

    def describe(self) -> str:
        tile = f" {self.tile[0]}x{self.tile[1]}" if self.tile else ""
        return f"{self.element.value} {self.granularity.value}{tile}, {self.encoding.value} scales"


def grid_of(shape: tuple[int, ...], tile: tuple[int, int]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, math.ceil(m / tile[0]), math.ceil(n / tile[1]))


def fit_scale(
    shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    encoding: ScaleEncoding,
    allowed: frozenset[Granularity],
    block: tuple[int, int] | None = None,
) -> ScaleLayout | None:
    """The layout under which a scale of `scale_shape` covers a weight of (unpacked) `shape`, trying
    the allowed granularities in a fixed order (block first, so a configured block wins a tie), or
    None when none fits. `block` is the configured tile for BLOCK and GROUP."""
    *lead, m, n = shape
    lead_t, s = tuple(lead), tuple(scale_shape)
    k = math.prod(s)

    def make(g: Granularity, tile: tuple[int, int], view: tuple[int, ...]) -> ScaleLayout:
        return ScaleLayout(g, tile, grid_of(shape, tile), view, encoding)

    for g in (Granularity.BLOCK, Granularity.GROUP):
        if g in allowed and block is not None and s == grid_of(shape, block):
            return make(g, block, s)
    if Granularity.TENSOR in allowed and k == 1:
        return make(Granularity.TENSOR, (m, n), (1,) * len(shape))
    if Granularity.EXPERT in allowed and lead_t and s in (lead_t, (*lead_t, 1), (*lead_t, 1, 1)):
        return make(Granularity.EXPERT, (m, n), (*lead_t, 1, 1))
    if Granularity.CHANNEL in allowed and s in ((*lead_t, m, 1), (*lead_t, m)):
        return make(Granularity.CHANNEL, (1, n), (*lead_t, m, 1))
    if Granularity.COLUMN in allowed and s in ((*lead_t, 1, n), (*lead_t, n, 1)):
        # [*lead, n, 1] holds the same elements in the same order as [*lead, 1, n]
        return make(Granularity.COLUMN, (m, 1), (*lead_t, 1, n))
    if Granularity.HALF in allowed and s == (*lead_t, 2, 1) and m % 2 == 0:
        return make(Granularity.HALF, (m // 2, n), s)
    return None
