"""The FP4 family: MX FP4 (e2m1 codes, e8m0 scales per 32 elements) dequantization on the GPU, the
twin of reference.fp4_dequant_torch and bit-identical to it:

  y[..., 32 g + 2 j]     = cast_out(e2m1(lo nibble of blocks[..., g, j]) * 2**(scales[..., g] - 127))
  y[..., 32 g + 2 j + 1] = cast_out(e2m1(hi nibble of blocks[..., g, j]) * ...)

with the scale as reference.scale_to_float32 makes it (e = 255 is NaN, e = 0 is the subnormal
2**-127), one float32 multiply (exact: an e2m1 value times a power of two down to 2**-127 stays
representable in float32) and one round-to-nearest-even cast.

The kernel decodes the sixteen codes by arithmetic on the code's bits rather than a table lookup (a
gather per element costs more than the few integer operations): magnitude code m = 1..7 is
2**((m >> 1) - 1) * (1 + (m & 1) / 2), built as float32 bits ((m >> 1) + 126) << 23 | (m & 1) << 22;
m = 1 (0.5) is exponent 126 with a zero mantissa, and m = 0 is +-0. The even and odd elements come out
of one byte load as two tensors joined along a new last axis, so each thread stores its 32 outputs
contiguously.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8conv.kernels.checks import FLOAT_DTYPES, check_out, check_tensor, state_key
from fp8conv.kernels.common import LAUNCH_OPTS, Launch, launch_state, pow2, store_state

__all__ = ["fp4_dequant_triton", "FP4_TILE"]

FP4_GROUP_BYTES = 16  # bytes of packed codes per e8m0 scale (32 elements)

# Groups (rows of 16 bytes, 32 outputs) per program and warps (read when a launch state is built).
# 128 groups (2 KB of codes in, 8 KB of bf16 out) and 4 warps: the best of 128-1024 groups and 4-8
# warps on an H200 (bench/NOTES.md, 2026-12-01).
FP4_TILE = {"GROUPS": 128, "num_warps": 4}


@triton.jit
def _e2m1_bits(c):
    """float32 bit pattern of e2m1 code c (int32, 0..15)."""
    m = c & 7
    e = m >> 1
    mag = tl.where(m >= 2, ((e + 126) << 23) | ((m & 1) << 22), tl.where(m == 1, 126 << 23, 0))
    return mag | ((c & 8) << 28)


@triton.jit(do_not_specialize=["R"])
def _fp4_dequant_kernel(b_ptr, s_ptr, y_ptr, R, BLOCK_R: tl.constexpr):
    """R groups of 16 code bytes and one e8m0 byte each -> R x 32 outputs; BLOCK_R groups a program."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = tl.arange(0, 16)
    b = tl.load(b_ptr + rows[:, None] * 16 + cols[None, :], mask=row_ok[:, None], other=0).to(tl.int32) & 255
    e = tl.load(s_ptr + rows, mask=row_ok, other=127).to(tl.int32) & 255
    # scale_to_float32: 2**(e-127); e = 0 -> 2**-127 (subnormal), e = 255 -> NaN
    sbits = tl.where(e == 255, 0x7FC00000, tl.where(e == 0, 0x00400000, e << 23))
    s = sbits.to(tl.float32, bitcast=True)[:, None]
    lo = _e2m1_bits(b & 15).to(tl.float32, bitcast=True) * s
    hi = _e2m1_bits(b >> 4).to(tl.float32, bitcast=True) * s
    y = tl.reshape(tl.join(lo, hi), (BLOCK_R, 32))  # element 2j from the low nibble, 2j+1 the high
    out_cols = tl.arange(0, 32)
    offs = rows[:, None] * 32 + out_cols[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=row_ok[:, None])


def fp4_dequant_triton(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize MX FP4 codes: blocks uint8 or int8 [..., G, 16], scales uint8 (or float8_e8m0fnu)
    e8m0 bytes [..., G]; returns [..., G*32] in out_dtype (written into `out` when given)."""
    key = state_key("fp4", blocks, scales, out_dtype, out)
    st = launch_state(key) if key is not None else None
    if st is None:
        st = _fp4_state(blocks, scales, out_dtype, out)
        if key is not None:
            store_state(key, st)
    y_shape, launch, r = st
    y = out if out is not None else torch.empty(y_shape, dtype=out_dtype, device=blocks.device)
    if launch is not None:
        launch(blocks, scales if scales.dtype == torch.uint8 else scales.view(torch.uint8), y, r)
    return y


def _fp4_state(blocks, scales, out_dtype, out):
    check_tensor("blocks", blocks, (torch.uint8, torch.int8))
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    check_tensor("scales", scales, tuple(d for d in (torch.uint8, e8m0) if d is not None), blocks.device)
    if blocks.dim() < 2 or blocks.shape[-1] != FP4_GROUP_BYTES:
        raise ValueError(f"FP4 blocks must be [..., G, {FP4_GROUP_BYTES}], not {tuple(blocks.shape)}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"FP4 scales {tuple(scales.shape)} must be blocks' shape without its last dim")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, not {out_dtype}")
    y_shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
    if out is not None:
        check_out("out", out, y_shape, out_dtype, blocks.device)
    r = blocks.numel() // FP4_GROUP_BYTES
    if r == 0:
        return y_shape, None, 0
    block_r = min(FP4_TILE["GROUPS"], pow2(r))
    launch = Launch(
        _fp4_dequant_kernel,
        (triton.cdiv(r, block_r),),
        dict(BLOCK_R=block_r),
        dict(num_warps=FP4_TILE["num_warps"], **LAUNCH_OPTS),
    )
    return y_shape, launch, r
