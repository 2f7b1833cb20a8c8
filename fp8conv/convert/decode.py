"""The per-tensor decode math of a dequantize, for every layout: a weight's scale made into the grid the
kernels read, and one band of rows turned from codes into floats. The engine calls these from one place
(`_Converter`); the layouts (fp8conv.formats) say which scale and which broadcast each weight has.

Every family comes down to y = cast_out(fp32(q) * fp32(s)) with s spread over a tile:
- FP8 codes: the block kernels (`weight_dequant`) with the layout's tile, any tile size (a per-tensor
  scale is one M x N tile, a per-row one 1 x N, a per-column one M x 1, MX groups 1 x 32);
- packed FP4 codes: `fp4_dequant` over 1 x 32 groups of e8m0 exponents.
"""

from __future__ import annotations

import torch

from fp8conv.formats import Element, QuantizedWeight
from fp8conv.kernels import fp4_dequant, scale_to_float32, weight_dequant
from fp8conv.kernels.reference import FP4_GROUP_BYTES, weight_dequant_torch


def scale_grid_tensor(w: QuantizedWeight, raw: torch.Tensor) -> torch.Tensor:
    """The stored scale as the layout's full grid [*lead, gm, gn]: float32 for FP8 codes, the e8m0
    exponent bytes (uint8) for FP4 codes. Broadcast scales (per tensor, per expert) are expanded."""
    lay = w.layout
    if w.element is Element.FP4_E2M1:
        return raw.view(torch.uint8).reshape(lay.view).expand(lay.grid).contiguous()
    return scale_to_float32(raw).reshape(lay.view).expand(lay.grid).contiguous()


def bad_scale(w: QuantizedWeight, s: torch.Tensor) -> tuple[tuple[int, ...], float] | None:
    """The first scale element that is not finite and > 0 (e8m0: the NaN byte 255), or None."""
    f = scale_to_float32(s) if s.dtype == torch.uint8 else s
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
    tile = w.layout.tile
    if w.element is Element.FP4_E2M1:
        y = fp4_dequant(q, s_rows.to(q.device, non_blocking=True), dst.dtype)
        dst.copy_(y.t() if w.transpose else y, non_blocking=y.is_cuda)
        return
    if not q.is_cuda:
        weight_dequant_torch(q, s_rows, tile, dst.dtype, out=dst)
        return
    y = weight_dequant(q, s_rows.to(q.device), tile, dst.dtype)
    dst.copy_(y, non_blocking=True)
