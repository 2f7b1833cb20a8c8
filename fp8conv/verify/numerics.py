"""Numerics checks over tensor data: non-finite values, NaN codes, scale values, and a GEMM through the
product's own kernels against a float64 product of the same operands.

Bounds (docs/verify.md says where each comes from):
GEMM: C = fp8_gemm(act_quant(X), W) in float32 vs the same operands dequantized and multiplied in
float64; both see identical codes and scales, so only the arithmetic differs. A product of two e4m3
codes has an 8-bit significand and is exact in float32; multiplying by the two scales rounds once each
(2**-24 relative). What remains is accumulation:
 * CPU (float32 FMA/blocked summation): rounding errors of random sign grow like sqrt(K) * 2**-24
   relative to |C|. Bound: max(1e-5, 4 * sqrt(K) * 2**-24) (K = 18432: 3.2e-5; measured 3e-7).
 * GPU (Hopper FP8 tensor cores): each 128-wide K block accumulates with about 14 bits (DeepSeek-V3
   report, sec. 3.3.2), about 2**-13 relative per block before promotion to float32; independent
   block errors keep the sum near 2**-13. Bound: 1e-3 (measured on an H100: 1.3e-4 for M >= 64).
NaN or Inf anywhere in the output fails regardless.
"""

from __future__ import annotations

import math
import random
import zlib

import torch

from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES
from fp8conv.kernels import act_quant, fp8_gemm
from fp8conv.verify.context import Band, Context, TensorCheck, TensorData, position, unravel

GEMM_ROWS = 512  # output rows of W (four 128-row tiles) the GEMM check multiplies, per checked expert
GPU_GEMM_BOUND = 1e-3
CPU_GEMM_FLOOR = 1e-5


def gemm_bound(device: torch.device, k: int) -> float:
    if device.type == "cuda":
        return GPU_GEMM_BOUND
    return max(CPU_GEMM_FLOOR, 4.0 * math.sqrt(max(k, 1)) * 2.0**-24)


def _first(mask: torch.Tensor, b: Band) -> str:
    j = int(mask.reshape(-1).nonzero()[0])
    return b.where(j // max(b.t.k, 1), j % max(b.t.k, 1))


class FiniteValues(TensorCheck):
    """Every float tensor that is not an FP8 weight (unquantized weights, norms, biases, 1-D and 0-D
    tensors, scales) holds no NaN or Inf, with or without a reference."""

    name = "finite"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return t.info.dtype in FLOAT_DTYPES

    @staticmethod
    def all_finite(x: torch.Tensor) -> bool:
        """No NaN or Inf in x. aminmax propagates NaN and turns Inf into a non-finite bound: one pass
        at ~10 GB/s on bf16 here, where isfinite over every element runs at 0.5 GB/s."""
        if x.numel() == 0:
            return True
        lo, hi = torch.aminmax(x)
        return math.isfinite(float(lo)) and math.isfinite(float(hi))

    def begin(self, ctx: Context, t: TensorData) -> None:
        t.state[self.name] = [0, None]

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        x = b.values()
        if self.all_finite(x):  # the count and the position only when there is one
            return
        bad = ~torch.isfinite(x)
        st = t.state[self.name]
        st[0] += int(bad.sum())
        if st[1] is None:
            st[1] = _first(bad, b)

    def end(self, ctx: Context, t: TensorData) -> None:
        n, first = t.state.pop(self.name)
        if n:
            rec = t.record(ctx)
            rec.metrics["non_finite"] = n
            rec.add(self.name, "fail", f"{n} NaN/Inf value(s) of {t.info.numel}; first at ({first})")
        elif t.name in ctx.heavy:
            t.record(ctx).add(self.name, "pass")


class NanCodes(TensorCheck):
    """FP8 codes that are NaN (e4m3 S.1111.111) or, for e5m2, NaN/Inf (exponent all ones)."""

    name = "nan_codes"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return t.name in ctx.roles.fp8

    def begin(self, ctx: Context, t: TensorData) -> None:
        t.state[self.name] = [0, None]

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        codes = b.raw
        lowest = 0x7F if t.info.dtype == "F8_E4M3" else 0x7C
        if codes.numel() == 0:
            return
        # Two max reductions (as int8 for positive codes, as uint8 for negative ones) at over 20 GB/s;
        # the masked count only when one of them reaches the NaN range.
        if int(codes.view(torch.int8).max()) < lowest and int(codes.max()) < 0x80 | lowest:
            return
        bad = (codes & 0x7F) >= lowest
        st = t.state[self.name]
        st[0] += int(bad.sum())
        if st[1] is None:
            j = int(bad.nonzero()[0])
            st[1] = f"({b.where(j // t.k, j % t.k)}) = 0x{int(codes[j]):02X}"

    def end(self, ctx: Context, t: TensorData) -> None:
        n, first = t.state.pop(self.name)
        rec = t.record(ctx)
        rec.metrics["nan_codes"] = n
        if n:
            rec.add(self.name, "fail", f"{n} NaN code(s); first at {first}")
        else:
            rec.add(self.name, "pass")


class ScaleValues(TensorCheck):
    """The scales of an FP8 weight are finite and > 0; with scale_fmt ue8m0, powers of two."""

    name = "scale_values"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return t.name in ctx.roles.fp8

    def begin(self, ctx: Context, t: TensorData) -> None:
        rec = t.record(ctx)
        s3 = t.scales
        if s3 is None:
            rec.add(self.name, "skip", "no usable scale")
            return
        if s3.numel():
            rec.metrics["scale_min"] = float(s3.min())
            rec.metrics["scale_max"] = float(s3.max())
        bad = ~torch.isfinite(s3) | (s3 <= 0)
        if bool(bad.any()):
            idx = tuple(int(v) for v in bad.nonzero()[0])
            where = position((*unravel(idx[0], t.lead), *idx[1:]), t.stacked)
            rec.add(
                self.name,
                "fail",
                f"{int(bad.sum())} of {s3.numel()} scale(s) are NaN, Inf, zero or negative; first at "
                f"tile ({where}) = {float(s3[idx])}",
            )
            return
        s_info = ctx.usable[t.name].scale
        if (ctx.qc or {}).get("scale_fmt") == "ue8m0" and s_info.dtype not in ("U8", "F8_E8M0"):
            off = torch.frexp(s3).mantissa != 0.5
            if bool(off.any()):
                idx = tuple(int(v) for v in off.nonzero()[0])
                where = position((*unravel(idx[0], t.lead), *idx[1:]), t.stacked)
                rec.add(
                    self.name,
                    "fail",
                    f"scale_fmt is ue8m0 but scale at tile ({where}) = {float(s3[idx])} "
                    "is not a power of two",
                )
                return
        rec.add(self.name, "pass", f"{s3.numel()} scale(s) finite and > 0")


def _expand(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A [tile rows, tile columns] grid repeated over its tiles and cropped to [rows, cols]."""
    return s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


class Gemm(TensorCheck):
    """fp8_gemm(act_quant(X), W) on --device vs the float64 product of the same dequantized operands
    (an independent formula, on the CPU), per selected e4m3 weight with 128x128 tiles (or one scale
    per tensor, which is the same scale over every 128x128 tile)."""

    name = "gemm"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return t.name in ctx.roles.fp8 and t.name in ctx.heavy

    def begin(self, ctx: Context, t: TensorData) -> None:
        rec = t.record(ctx)
        why = None
        use = ctx.usable.get(t.name)
        if use is None or t.scales is None:
            why = "no usable scale"
        elif not use.one_per_matrix and t.block != (128, 128):
            why = f"fp8_gemm takes 128x128 weight tiles; this weight has {t.block[0]}x{t.block[1]}"
        elif t.info.dtype != "F8_E4M3":
            why = f"fp8_gemm takes e4m3 weights, not {t.info.dtype}"
        elif t.k == 0 or t.m == 0:
            why = "empty tensor"
        if why is not None:
            rec.add(self.name, "skip", why)
            return
        opts = ctx.opts
        seed = (opts.seed * 1_000_003 + zlib.crc32(t.name.encode())) % 2**63
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(opts.rows, t.k, generator=g)
        n = opts.experts
        if n == 0 or t.experts <= n:
            experts = set(range(t.experts))
        else:
            experts = set(random.Random(opts.seed ^ zlib.crc32(t.name.encode())).sample(range(t.experts), n))
        xq, xs = act_quant(x.to(ctx.device))
        xq_c, xs_c = xq.cpu(), xs.cpu()
        x64 = xq_c.double() * _expand(xs_c, opts.rows, t.k, (1, 128)).double()
        # a seeded window of GEMM_ROWS output rows (whole tile rows) per checked expert: the kernel's
        # numerics do not depend on which rows, and the whole weight would cost more than converting it
        # (its codes, scales and NaNs are checked over every row by the other checks)
        w0 = 128 * random.Random(seed).randrange(max(1, math.ceil(t.m / 128)))
        w0 = max(0, min(w0, (t.m - GEMM_ROWS) // 128 * 128))
        t.state[self.name] = {
            "window": (w0, min(t.m, w0 + GEMM_ROWS)),
            "experts": experts,
            "xq": xq,
            "xs": xs,
            "x64": x64,
            "num": 0.0,
            "den": 0.0,
            "nf": 0,
            "rnf": 0,
        }

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        st = t.state.get(self.name)
        if st is None or b.e not in st["experts"]:
            return
        lo, hi = max(b.r0, st["window"][0]), min(b.r1, st["window"][1])
        if lo >= hi:
            return
        q = b.values()[lo - b.r0 : hi - b.r0]
        rows = hi - lo
        if ctx.usable[t.name].one_per_matrix:
            # one scale per tensor (or expert): the same value over every 128x128 tile of the rows
            sb = t.scales[b.e].reshape(1, 1).expand(math.ceil(rows / 128), math.ceil(t.k / 128))
            blk = (128, 128)
        else:  # lo starts a tile row: bands and the window are aligned to 128
            sb, blk = t.scales[b.e, lo // 128 : math.ceil(hi / 128)], t.block
        sb = sb.contiguous()
        c = fp8_gemm(st["xq"], st["xs"], q.to(ctx.device), sb.to(ctx.device), out_dtype=torch.float32)
        c = c.cpu().double()
        w64 = q.double() * _expand(sb, rows, t.k, blk).double()
        cr = st["x64"] @ w64.t()
        fin, rfin = torch.isfinite(c), torch.isfinite(cr)
        st["nf"] += int((~fin).sum())
        st["rnf"] += int((~rfin).sum())
        d = torch.where(fin & rfin, c - cr, 0.0)
        st["num"] += float((d * d).sum())
        st["den"] += float(torch.where(rfin, cr, 0.0).square().sum())

    def end(self, ctx: Context, t: TensorData) -> None:
        st = t.state.pop(self.name, None)
        if st is None:
            return
        rec = t.record(ctx)
        bound = gemm_bound(ctx.device, t.k)
        num, den = st["num"], st["den"]
        err = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))
        rec.metrics.update(gemm_rel_err=err, gemm_bound=bound, experts_checked=len(st["experts"]))
        scope = (
            f"{len(st['experts'])} of {t.experts} experts, " if t.stacked else ""
        ) + f"M={ctx.opts.rows}, K={t.k}, rows {st['window'][0]}:{st['window'][1]}, on {ctx.device.type}"
        if st["nf"] or st["rnf"]:
            rec.add(
                self.name,
                "fail",
                f"output has {st['nf']} NaN/Inf value(s) ({st['rnf']} in the float64 reference) [{scope}]",
            )
        elif err > bound:
            rec.add(self.name, "fail", f"relative error {err:.2e} exceeds the bound {bound:.1e} [{scope}]")
        else:
            rec.add(self.name, "pass", f"relative error {err:.2e} <= {bound:.1e} [{scope}]")
