"""The per-tensor decode math of a dequantize, for every layout: a weight's scale made into the grid the
kernels read, and one band of rows turned from codes into floats. The engine calls these from one place
(`_Converter`); the layouts (fp8conv.formats) say which scale and which broadcast each weight has.

Every family comes down to y = cast_out(fp32(q) * fp32(s)) with s spread over a tile:
- FP8 codes: the block kernels (`weight_dequant`) with the layout's tile, any tile size (a per-tensor
  scale is one M x N tile, a per-row one 1 x N, a per-column one M x 1, MX groups 1 x 32);
- packed FP4 codes: `fp4_dequant` over 1 x 32 groups of e8m0 exponents.
"""

from __future__ import annotations

import math

import torch

from fp8conv.formats import Element, QuantizedWeight
from fp8conv.kernels import BLOCK, fp4_dequant, scale_grid, scale_to_float32, weight_dequant
from fp8conv.kernels.reference import FP4_GROUP_BYTES, weight_dequant_torch


def _split(t: int, size: int) -> int:
    """A tile side the kernels run well with that stays inside one scale's tile: BLOCK where `t`
    spans the whole side or is a multiple of BLOCK, else `t`."""
    if t >= size:
        return min(size, BLOCK)
    return BLOCK if t % BLOCK == 0 else t


def kernel_tile(w: QuantizedWeight) -> tuple[int, int]:
    """The tile the dequantize kernels are given: the layout's own, or a smaller one inside it when
    the layout's tile is the whole tensor or a multiple of 128 (one scale repeated over several
    tiles; the values are the same). A per-tensor scale as one M x N tile ran at half the speed of
    128 x 128 blocks on the CPU (4096 x 4096, one thread: 206 vs 94 ms), its chunks past the cache."""
    if w.element is Element.FP4_E2M1:
        return w.layout.tile
    (bm, bn), (m, n) = w.layout.tile, w.shape[-2:]
    return _split(bm, m), _split(bn, n)


def scale_grid_tensor(w: QuantizedWeight, raw: torch.Tensor) -> torch.Tensor:
    """The stored scale as the grid of `kernel_tile` [*lead, gm, gn]: float32 for FP8 codes, the e8m0
    exponent bytes (uint8) for FP4 codes. Broadcast scales (per tensor, per expert) are expanded."""
    lay = w.layout
    if w.element is Element.FP4_E2M1:
        return raw.view(torch.uint8).reshape(lay.view).expand(lay.grid).contiguous()
    s = scale_to_float32(raw).reshape(lay.view).expand(lay.grid)
    tile = kernel_tile(w)
    if tile == lay.tile:
        return s.contiguous()
    want = scale_grid(tuple(w.shape), tile)
    for dim, (old, new) in ((-2, (lay.tile[0], tile[0])), (-1, (lay.tile[1], tile[1]))):
        reps = math.ceil(old / new)  # kernel tiles per layout tile (the whole side: all of them)
        s = s.repeat_interleave(reps, dim=dim).narrow(dim, 0, want[dim])
    return s.contiguous()


def bad_scale(s: torch.Tensor) -> tuple[tuple[int, ...], float] | None:
    """The first element of a stored scale that is not finite and > 0 (e8m0: the NaN byte 255)."""
    f = scale_to_float32(s)
    bad = ~(torch.isfinite(f) & (f > 0))
    if not bool(bad.any()):
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return idx, float(f[idx])


def codes_view(w: QuantizedWeight, band: torch.Tensor, rows: int) -> torch.Tensor:
    """The bytes of `rows` rows of one expert as codes: FP8 [rows, N], FP4 uint8 [rows, N/32, 16]."""
    if w.element is Element.FP4_E2M1:
        return band.view(torch.uint8).view(rows, -1, FP4_GROUP_BYTES)
    return band.view(w.codes.torch_dtype).view(rows, w.shape[-1])


def dequant_band(w: QuantizedWeight, q: torch.Tensor, s_rows: torch.Tensor, dst: torch.Tensor) -> None:
    """Dequantize one band of rows of one expert into `dst` (CPU, the output's orientation: [rows, N],
    or [N, rows] for a transposed layout). q on the CPU or on a GPU; s_rows: the grid rows it uses."""
    tile = kernel_tile(w)
    if w.element is Element.FP4_E2M1:
        y = fp4_dequant(q, s_rows.to(q.device, non_blocking=True), dst.dtype)
        dst.copy_(y.t() if w.transpose else y, non_blocking=y.is_cuda)
        return
    if not q.is_cuda:
        weight_dequant_torch(q, s_rows, tile, dst.dtype, out=dst)
        return
    y = weight_dequant(q, s_rows.to(q.device), tile, dst.dtype)
    dst.copy_(y, non_blocking=True)


def dequantize(w: QuantizedWeight, codes: torch.Tensor, scale: torch.Tensor, out_dtype=torch.bfloat16):
    """A whole weight from its stored codes and scale (as read from the file: any dtype the layout
    allows), on the codes' device: the tensor a dequantized output holds under `w.out_name`."""
    s = scale_grid_tensor(w, scale.cpu()).to(codes.device)
    *lead, m, n = w.shape
    experts = math.prod(lead)
    flat = codes.contiguous().view(torch.uint8).reshape(experts, m, -1)
    out = torch.empty((experts, *w.out_shape[-2:]), dtype=out_dtype)
    s3 = s.reshape(experts, *s.shape[-2:])
    for e in range(experts):
        q = codes_view(w, flat[e], m)
        dequant_band(w, q, s3[e], out[e])
    return out.reshape(w.out_shape)
