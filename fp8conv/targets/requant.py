"""The loss a Blackwell server adds at load: DeepGEMM's UE8M0 requantization of float block scales.

On SM100, vLLM (`requant_weight_ue8m0_inplace`, on by default with DeepGEMM) and SGLang rewrite every
block-FP8 weight that DeepGEMM will run: dequantize with the checkpoint's float scales (fp32), then
quantize again with power-of-two scales (DeepGEMM `per_block_cast_to_fp8(use_ue8m0=True)`). The torch
code below re-implements those two steps (it has to: neither vLLM nor DeepGEMM runs here) and measures
what the rewrite changes against the checkpoint's own dequantized weight. A checkpoint whose scales are
already powers of two (`--scale-fmt ue8m0`) comes through unchanged.

vLLM sends a dense linear to DeepGEMM only when its per-rank weight is a multiple of 128 in both
dimensions (`should_use_deepgemm_for_fp8_linear`); other shapes keep their scales (CUTLASS/Triton).
Expert weights always go to DeepGEMM when it runs the MoE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepGEMM clamps a tile's amax to this before dividing
DEEPGEMM_ALIGN = 128


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The next power of two >= |x|, by exponent bits (DeepGEMM `ceil_to_ue8m0`): exact where log2 is not."""
    bits = x.abs().float().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).bool().int()
    return (exp.clamp(1, 254) << 23).view(torch.float32)


CHUNK_ELEMS = 1 << 24  # elements per slice of tile rows: bounds memory at ~0.5 GB whatever the tensor


def _dequant_tiles(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Codes [..., rows, cols] and scales [..., R, C] -> fp32 tiles [..., R, bm, C, bn]; edge tiles are
    zero-padded (DeepGEMM pads the dequantized weight with zeros before it requantizes)."""
    bm, bn = block
    rows, cols = q.shape[-2], q.shape[-1]
    r, c = s.shape[-2], s.shape[-1]
    w = q.float()
    if rows != r * bm or cols != c * bn:
        w = torch.nn.functional.pad(w, (0, c * bn - cols, 0, r * bm - rows))
    return w.view(*q.shape[:-2], r, bm, c, bn) * s.float()[..., :, None, :, None]


def _requant_tiles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=AMAX_FLOOR)
    sf = ceil_to_ue8m0(amax / FP8_E4M3_MAX)
    return (w * (1.0 / sf)).to(torch.float8_e4m3fn), sf


def requant_ue8m0(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the server holds after load: (e4m3 codes, power-of-two fp32 scales) for codes `q`, scales `s`.
    2-D or stacked 3-D; edge tiles padded with zeros as DeepGEMM pads them."""
    rows, cols = q.shape[-2], q.shape[-1]
    codes, sf = _requant_tiles(_dequant_tiles(q, s, block))
    lead = q.shape[:-2]
    r, bm, c, bn = codes.shape[-4:]
    return codes.view(*lead, r * bm, c * bn)[..., :rows, :cols].contiguous(), sf.view(*lead, r, c)


def _tile_regions(rows: int, cols: int, block: tuple[int, int]):
    """The whole tiles of a [rows, cols] matrix and its ragged right, bottom and corner edges, as
    (row slice, column slice, tile-row slice, tile-column slice, whole): `whole` says, for rows and for
    columns, whether the region is whole tiles (else it is one ragged tile's extent)."""
    bm, bn = block
    rf, cf = rows // bm, cols // bn
    rs = [(slice(0, rf * bm), slice(0, rf), True)] if rf else []
    if rows > rf * bm:
        rs.append((slice(rf * bm, rows), slice(rf, rf + 1), False))
    cs = [(slice(0, cf * bn), slice(0, cf), True)] if cf else []
    if cols > cf * bn:
        cs.append((slice(cf * bn, cols), slice(cf, cf + 1), False))
    for r, tr, rwhole in rs:
        for c, tc, cwhole in cs:
            yield r, c, tr, tc, (rwhole, cwhole)


def _tiled(x: torch.Tensor, block: tuple[int, int], whole: tuple[bool, bool]) -> torch.Tensor:
    """A region [h, w] viewed as [R, bm, C, bn] (a ragged side: R = 1 or C = 1, its own extent)."""
    h, w = x.shape
    bm = block[0] if whole[0] else h
    bn = block[1] if whole[1] else w
    return x.view(h // bm, bm, w // bn, bn)


def tile_mul(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """out = x * s, s [R, C] one float32 value per tile of x [rows, cols] (the first tile at (0, 0),
    edge tiles ragged). Element by element the one rounded float32 product `expand_scales` gives,
    without materializing the expanded scales; out may be x."""
    for r, c, tr, tc, whole in _tile_regions(x.shape[0], x.shape[1], block):
        torch.mul(
            _tiled(x[r, c], block, whole), s[tr, tc][:, None, :, None], out=_tiled(out[r, c], block, whole)
        )
    return out


def tile_amax(a: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max over each tile of a [rows, cols] (non-negative values, e.g. |w|) -> [R, C]; NaN propagates.
    The max over a tile's real elements is what DeepGEMM's zero-padded tile gives: |w| >= 0."""
    bm, bn = block
    rows, cols = a.shape
    out = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn), dtype=a.dtype, device=a.device)
    for r, c, tr, tc, whole in _tile_regions(rows, cols, block):
        out[tr, tc] = _tiled(a[r, c], block, whole).amax(dim=(1, 3))
    return out


def requant_ue8m0_band(
    w: torch.Tensor, block: tuple[int, int], codes: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """`requant_ue8m0` of an already dequantized float32 band w [rows, cols] (tiles from (0, 0)):
    writes the e4m3 codes into `codes` (same shape) and returns the power-of-two scales [R, C]. The same
    bytes as requant_ue8m0 (and DeepGEMM): the same amax (zero padding never raises |w|'s max), clamp,
    ceil_to_ue8m0, reciprocal and one float32 product per element before the cast; `work` is a float32
    buffer of w's shape."""
    amax = tile_amax(torch.abs(w, out=work), block).clamp(min=AMAX_FLOOR)
    sf = ceil_to_ue8m0(amax / FP8_E4M3_MAX)
    codes.copy_(tile_mul(w, 1.0 / sf, block, out=work))  # the cast: RNE to e4m3, as .to() does
    return sf


@dataclass(frozen=True)
class RequantLoss:
    tensor: str
    requantized: bool  # False: the server keeps this tensor's scales (shape not DeepGEMM-aligned)
    rel_error: float  # ||W_server - W_checkpoint||_F / ||W_checkpoint||_F
    max_abs_error: float
    scales_changed: float  # fraction of scale tiles that were not already a power of two
    note: str | None = None


def requant_loss(
    name: str, q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], expert: bool
) -> RequantLoss:
    """The error the UE8M0 requant at load adds to one tensor, against the checkpoint's dequantized weight."""
    rows, cols = q.shape[-2], q.shape[-1]
    if not expert and (rows % DEEPGEMM_ALIGN or cols % DEEPGEMM_ALIGN):
        return RequantLoss(
            name, False, 0.0, 0.0, 0.0, f"{rows} x {cols} is not 128-aligned: vLLM runs it without DeepGEMM"
        )
    bm, bn = block
    q3 = q.reshape(-1, rows, cols)
    s3 = s.reshape(-1, *s.shape[-2:])
    step = max(1, CHUNK_ELEMS // (bm * s3.shape[-1] * bn))  # tile rows per slice
    err2 = ref2 = 0.0
    max_abs = 0.0
    for m in range(q3.shape[0]):
        for r0 in range(0, s3.shape[-2], step):
            ref = _dequant_tiles(q3[m, r0 * bm : (r0 + step) * bm], s3[m, r0 : r0 + step], block)
            codes, sf = _requant_tiles(ref)
            # fp32 difference, float64 sums: agrees with an all-float64 figure to ~1e-11 at half the time
            diff = codes.float().mul_(sf).sub_(ref)  # zero in the padding: 0 -> 0
            err2 += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            ref2 += float(torch.linalg.vector_norm(ref, dtype=torch.float64)) ** 2
            if diff.numel():
                max_abs = max(max_abs, float(diff.abs().max()))
    rel = (err2**0.5) / (ref2**0.5) if ref2 > 0 else 0.0
    sf = s.float()
    # an exact count (a float32 mean sums in a different order on the GPU and the CPU)
    changed = int((ceil_to_ue8m0(sf) != sf.abs()).sum()) / sf.numel() if sf.numel() else 0.0
    return RequantLoss(name, True, rel, max_abs, changed)
