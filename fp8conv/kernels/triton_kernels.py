"""Triton kernels of fp8conv: the GPU twins of the torch paths in `reference.py`.

Same signatures as the torch functions, and for `weight_dequant`, `weight_quant` and `act_quant` the same
output bytes (codes and scales). The numerics contract (see reference.py):

  dequantize:  y = cast_out(fp32(q) * s)              one fp32 multiply, one RNE cast
  quantize:    amax = max|x| over the tile's real elements
               s = max(amax / 448, 2**-126)            IEEE division (tl.math.div_rn -> div.rn.f32)
               ue8m0: s = 2 ** ceil(log2(s))           by exponent bits
               q = e4m3(clamp(x / s, -448, 448))       IEEE division, RNE cast (cvt.rn.satfinite)

Triton's plain `/` on fp32 lowers to an approximate divide (div.full.f32, ~2 ulp), so every division
here is `tl.math.div_rn` (checked in the PTX of Triton 3.6 and 3.9: `div.rn.f32`, no `.ftz`, so
subnormal inputs and scales are kept as the CPU keeps them). For ue8m0 scales (powers of two) x / s is
computed as x * 2**-k, which is the same correctly rounded value and much cheaper.

Launch notes:
- Row strides are passed as `N_div * ALIGN` where ALIGN (constexpr) is the largest power of two <= 16
  dividing the row length: Triton only learns "divisible by 16" on its own, so without this a ragged
  row length (7000 x 1000) would make every access a single byte; with it accesses stay 8-16 bytes.
- Offsets of rows and matrices are int64, so tensors past 2**31 elements index correctly (weight_quant
  adds int32 offsets within a tile where rows x row length < 2**31).
- fp8_gemm uses shipped per-M-bucket tile configurations (no autotuning pass on the first call);
  FP8CONV_GEMM_AUTOTUNE=1 autotunes the pointer kernel instead, keyed on (M bucket, N, K) (never
  under the CPU interpreter, where autotune fails). On Hopper, when K % 16 == 0, A and B tiles come
  through TMA tensor descriptors (_fp8_gemm_tma_kernel; FP8CONV_GEMM_TMA=0 turns that off), whose
  out-of-bounds zero fill handles ragged M, N and K without masks. From M = GEMM_WGMMA_MIN_M up,
  Hopper takes the persistent warp-specialized Gluon kernel of gluon_gemm.py (FP8CONV_GEMM_WGMMA=0
  turns it off; a Triton whose Gluon API it does not compile with falls back to the Triton kernels,
  with a warning). a_scale may be row-major or MN-major (act_quant(..., mn_major=True)); the Gluon
  kernel reads either in place, the Triton kernels take a row-major copy.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from fp8conv.kernels.reference import BLOCK, FP8_MAX, empty_scales, scale_grid, to_mn_major

__all__ = [
    "act_quant_triton",
    "fp8_gemm_triton",
    "weight_dequant_triton",
    "weight_quant_triton",
]

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Compile options every launch passes. Floating-point contraction stays on, as the GPU tests measured
# it (the GEMMs' `acc += p * s` is one fma; the quantizers use explicit fma and no contractible
# pairs): Triton 3.9 warns that its default turns off in 3.10, and this pins it either way.
LAUNCH_OPTS = {"enable_fp_fusion": True}
# Largest tile (elements) a quantization program keeps in registers in one pass.
_SINGLE_PASS_MAX = 16384
# weight_quant's in-tile offsets are int32 while rows x row length stays below this (else int64).
_OFFS32_LIMIT = 2**31

# Tile shapes of the memory-bound kernels (module-level so bench/bench_kernels.py can try variants).
DEQUANT_TILE = {"BLOCK_M": 32, "BLOCK_N": 256, "num_warps": 4}
# act_quant: rows x group elements per program, warps and division (see _quotient) for tensors of >=
# LARGE elements, and the small_ ones below that; row_: below LARGE, rows whose groups are a power of
# two in number and fit row_ELEMS (k <= 1024 at g = 128) go whole, row_ELEMS per program (7000x1000:
# 69-71% -> 76% of copy bandwidth on one H100, no change on another; slower at 576x7168 and on large
# sizes, so not used there).
# weight_quant: warps for tiles of >= 8192 elements (a 128 x 128 tile) and division. From
# bench/bench_kernels.py --sweep and lab runs on H100s (2026-11-25).
ACT_QUANT_TILE = {
    "ELEMS": 8192,
    "num_warps": 8,
    "div": 0,
    "small_ELEMS": 2048,
    "small_num_warps": 4,
    "small_div": 2,
    "LARGE": 1 << 24,
    "row_ELEMS": 1024,
    "row_num_warps": 2,
}
WEIGHT_QUANT = {"num_warps": 8, "div": 1, "maxnreg_narrow": 128}
# "maxnreg_narrow": a register cap for the one-pass 128 x 128 build where rows are only 8- or 4-element
# aligned (n % 16 != 0, e.g. 7000 x 1000). Its narrower fp8 stores need more address registers: ptxas
# gave 134-150 per thread, so one program of 256 threads per multiprocessor instead of two; capped at
# 128 it fits two without spilling (sm_90a build; with 16-aligned rows it needs 127 uncapped).


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _max_nan(a, b):
    # max that propagates NaN (torch.amax does; tl.max would skip it).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scale_from_amax(amax, FMAX: tl.constexpr, UE8M0: tl.constexpr):
    """(s, inv): s = max(amax / FMAX, 2**-126) correctly rounded; for ue8m0 s = 2**ceil(log2 s) and
    inv = 1/s exactly (a power of two), else inv is unused."""
    s = tl.maximum(tl.math.div_rn(amax, FMAX), 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
    inv = s
    if UE8M0:
        bits = s.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
        # s = 2**(e-127) with 1 <= e <= 248 here, so 1/s = 2**(127-e) is a normal float32.
        inv = ((254 - e) << 23).to(tl.float32, bitcast=True)
    return s, inv


# The quotient x / s of the quantizers, correctly rounded, without a div.rn.f32 per element
# (DIV = 1 or 2; DIV = 0 is plain div_rn). s is the same for a whole tile (or row), so its correctly
# rounded reciprocal r = RN(1/s) is computed once; then q = RN(x r), the exact remainder
# rem = x - q s (one fma), and q' = RN(q + rem r) is RN(x / s) (Markstein's correction step). Checked
# exhaustively on an H100 against div.rn.f32 for every pair of float32 significands (2^46 pairs; by
# scaling, that covers every x and s whose intermediate values stay normal: bench/div_check.py).
# Where s lies outside [2^-90, 2^100] (tiles of tiny or huge values, or inf / NaN), DIV = 1 falls back
# to div_rn for that tile; DIV = 2 first scales x and s by 2^64 or 2^-64 (exact where it matters).
# x = +-0 keeps its sign through a select (q + rem r would turn -0 into +0).
_DIV_LO = tl.constexpr(2.0**-90)
_DIV_HI = tl.constexpr(2.0**100)


@triton.jit
def _markstein(x, s, r):
    q = x * r
    y = tl.fma(tl.fma(-q, s, x), r, q)
    return tl.where(x == 0, x, y)


@triton.jit
def _quotient(x, s, inv, UE8M0: tl.constexpr, DIV: tl.constexpr):
    """RN(x / s) in float32; DIV = 1 needs a scalar s."""
    if UE8M0:
        y = x * inv  # exact: inv is a power of two, same value as the correctly rounded x / s
    elif DIV == 0:
        y = tl.math.div_rn(x, s)
    elif DIV == 1:
        if (s >= _DIV_LO) & (s <= _DIV_HI):
            y = _markstein(x, s, tl.math.div_rn(1.0, s))
        else:
            y = tl.math.div_rn(x, s)
    else:
        f = tl.where(s < _DIV_LO, 18446744073709551616.0, tl.where(s > _DIV_HI, 5.421010862427522e-20, 1.0))
        ss = s * f
        r = tl.math.div_rn(1.0, ss)
        xs = x * f
        # s = inf: r = 0 and x / inf is x * 0 (+-0, or NaN for an infinite x)
        y = tl.where(r == 0, xs * r, _markstein(xs, ss, r))
    return y


@triton.jit
def _encode(x, s, inv, FMAX: tl.constexpr, UE8M0: tl.constexpr, DIV: tl.constexpr, OUT_TY: tl.constexpr):
    y = _quotient(x, s, inv, UE8M0, DIV)
    y = tl.clamp(y, -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
    return y.to(OUT_TY, fp_downcast_rounding="rtne")


# The memory-bound kernels' shape arguments are not specialized (Triton would compile a variant per
# combination of "divisible by 16" and "== 1" over them: five for a DeepSeek-shaped dequantize, about
# 0.6 s each on a fresh machine). Alignment comes in through the ALIGN constexpr instead.
@triton.jit(do_not_specialize=["M", "bm", "bn", "sm", "sn", "n_tiles_n"])
def _weight_dequant_kernel(
    q_ptr,
    s_ptr,
    y_ptr,
    M,
    N_div,
    bm,
    bn,
    sm,
    sn,
    n_tiles_n,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_UNIFORM: tl.constexpr,
    COL_UNIFORM: tl.constexpr,
):
    """y[e, i, j] = cast(fp32(q[e, i, j]) * s[e, i // bm, j // bn]) over one BLOCK_M x BLOCK_N tile.

    ROW_UNIFORM / COL_UNIFORM: the tile lies within one scale row / column (then one scale per tile
    row or column, or a single scalar), else the scale is gathered per row / column."""
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    N = N_div * ALIGN
    pid_m = pid // n_tiles_n
    pid_n = pid - pid_m * n_tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = e * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s_mat = s_ptr + e * sm * sn
    if ROW_UNIFORM:
        s_row = s_mat + ((pid_m * BLOCK_M) // bm) * sn
        if COL_UNIFORM:
            y = x * tl.load(s_row + (pid_n * BLOCK_N) // bn)
        else:
            s_c = tl.load(s_row + cols // bn, mask=col_ok, other=1.0)
            y = x * s_c[None, :]
    else:
        if COL_UNIFORM:
            s_r = tl.load(s_mat + (rows // bm) * sn + (pid_n * BLOCK_N) // bn, mask=row_ok, other=1.0)
            y = x * s_r[:, None]
        else:
            s_2 = tl.load(s_mat + (rows // bm)[:, None] * sn + (cols // bn)[None, :], mask=mask, other=1.0)
            y = x * s_2
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "bm", "sm", "sn"])
def _weight_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    N_div,
    bm,
    sm,
    sn,
    BN: tl.constexpr,
    ALIGN: tl.constexpr,
    BM_P: tl.constexpr,
    BN_P: tl.constexpr,
    SINGLE: tl.constexpr,
    OFFS64: tl.constexpr,
    FMAX: tl.constexpr,
    UE8M0: tl.constexpr,
    DIV: tl.constexpr,
):
    """One program per scale tile (bm x BN) of matrix e. SINGLE: the tile (padded to BM_P x BN_P) is
    held in registers, one pass; else two passes over BM_P x BN_P chunks (amax, then encode).
    BN is constexpr so that column offsets are known multiples of it (vector accesses)."""
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    N = N_div * ALIGN
    ti = pid // sn
    tj = pid - ti * sn
    r0 = ti * bm
    c0 = tj * BN
    ar = tl.arange(0, BM_P)
    ac = tl.arange(0, BN_P)
    base = e * M * N
    OUT_TY: tl.constexpr = q_ptr.dtype.element_ty
    if SINGLE:
        rows = r0 + ar
        cols = c0 + ac
        mask = ((ar < bm) & (rows < M))[:, None] & ((ac < BN) & (cols < N))[None, :]
        # offsets within the tile in int32 where they fit (fewer registers: see WEIGHT_QUANT)
        t0 = base + r0.to(tl.int64) * N + c0
        if OFFS64:
            offs = ar.to(tl.int64)[:, None] * N + ac[None, :]
        else:
            offs = ar[:, None] * N + ac[None, :]
        x = tl.load(x_ptr + t0 + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.reduce(tl.abs(x), None, _max_nan)
        s, inv = _scale_from_amax(amax, FMAX, UE8M0)
        tl.store(q_ptr + t0 + offs, _encode(x, s, inv, FMAX, UE8M0, DIV, OUT_TY), mask=mask)
    else:
        amax = tl.zeros((BM_P, BN_P), dtype=tl.float32)
        for i in range(0, bm, BM_P):
            rows = r0 + i + ar
            rmask = ((i + ar) < bm) & (rows < M)
            roffs = base + rows.to(tl.int64) * N
            for j in range(0, BN, BN_P):
                cols = c0 + j + ac
                mask = rmask[:, None] & (((j + ac) < BN) & (cols < N))[None, :]
                x = tl.load(x_ptr + roffs[:, None] + cols[None, :], mask=mask, other=0.0)
                amax = _max_nan(amax, tl.abs(x.to(tl.float32)))
        s, inv = _scale_from_amax(tl.reduce(amax, None, _max_nan), FMAX, UE8M0)
        for i in range(0, bm, BM_P):
            rows = r0 + i + ar
            rmask = ((i + ar) < bm) & (rows < M)
            roffs = base + rows.to(tl.int64) * N
            for j in range(0, BN, BN_P):
                cols = c0 + j + ac
                mask = rmask[:, None] & (((j + ac) < BN) & (cols < N))[None, :]
                offs = roffs[:, None] + cols[None, :]
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_ptr + offs, _encode(x, s, inv, FMAX, UE8M0, DIV, OUT_TY), mask=mask)
    tl.store(s_ptr + e * sm * sn + pid, s)


@triton.jit(do_not_specialize=["R", "n_groups"])
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    R,
    K_div,
    n_groups,
    s_stride_r,
    s_stride_g,
    G: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    G_P: tl.constexpr,
    NG_B: tl.constexpr,
    FMAX: tl.constexpr,
    UE8M0: tl.constexpr,
    DIV: tl.constexpr,
):
    """x [R, K] -> codes [R, K], scales [R, n_groups] (strides s_stride_r, s_stride_g: row-major or
    MN-major): one program quantizes BLOCK_R rows of NG_B adjacent group columns, each row of each
    column its own 1 x g group (NG_B = 1 but for short rows, which go whole: one contiguous load per
    row instead of one per group)."""
    pid = tl.program_id(0)
    K = K_div * ALIGN
    ac = tl.arange(0, G_P)
    n_gb = tl.cdiv(n_groups, NG_B)
    pid_r = pid // n_gb
    gis = (pid - pid_r * n_gb) * NG_B + tl.arange(0, NG_B)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = gis[:, None] * G + ac[None, :]  # [NG_B, G_P]
    row_ok = rows < R
    mask = row_ok[:, None, None] & ((ac < G)[None, :] & (cols < K))[None, :, :]
    offs = rows.to(tl.int64)[:, None, None] * K + cols[None, :, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 2, _max_nan)  # [BLOCK_R, NG_B]
    s, inv = _scale_from_amax(amax, FMAX, UE8M0)
    q = _encode(x, s[:, :, None], inv[:, :, None], FMAX, UE8M0, DIV, q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs, q, mask=mask)
    s_offs = rows.to(tl.int64)[:, None] * s_stride_r + gis[None, :] * s_stride_g
    tl.store(s_ptr + s_offs, s, mask=row_ok[:, None] & (gis < n_groups)[None, :])


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile number pid's (tile row, tile column) in grouped order: GROUP_M row tiles sweep the N tiles
    together, so B tiles stay in L2. (Also called from the persistent Gluon kernel in gluon_gemm.py.)"""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_in = pid - group_id * num_in_group
    return first_m + pid_in % group_size, pid_in // group_size


@triton.jit
def _scale_ptrs(as_ptr, bs_ptr, offs_m, offs_n, pid_n, KB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row pointers into the A scales [M, KB] and B scales [ceil(N/128), KB] for this tile."""
    as_ptrs = as_ptr + offs_m.to(tl.int64) * KB
    if BLOCK_N <= BLOCK_K:
        # The tile lies inside one 128-row block of B: one B scale per K step.
        bs_ptrs = bs_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * KB
    else:
        bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * KB
    return as_ptrs, bs_ptrs


@triton.jit
def _scaled_dot(acc, a, b, as_ptrs, bs_ptrs, kb, m_ok, n_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + (A block . B block^T) * a_s * b_s for K block kb (fp32 dot, then the two scales)."""
    a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
    if BLOCK_N <= BLOCK_K:
        b_s = tl.load(bs_ptrs + kb)
        acc += tl.dot(a, tl.trans(b)) * (a_s * b_s)[:, None]
    else:
        b_s = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s[None, :])
    return acc


@triton.jit
def _store_c(c_ptr, acc, offs_m, offs_n, m_ok, n_ok, N):
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    KB,
    M_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[N, K]^T with A scales [M, KB] (1 x 128) and B scales [ceil(N/128), KB]
    (128 x 128). Per 128-wide K block: fp32 dot of the fp8 tiles, then acc += dot * a_s * b_s.
    M, N, K are runtime values (no recompiles per shape); M_BUCKET only keys the autotuner."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    as_ptrs, bs_ptrs = _scale_ptrs(as_ptr, bs_ptr, offs_m, offs_n, pid_n, KB, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _scaled_dot(acc, a, b, as_ptrs, bs_ptrs, kb, m_ok, n_ok, BLOCK_N, BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _store_c(c_ptr, acc, offs_m, offs_n, m_ok, n_ok, N)


@triton.jit
def _fp8_gemm_tma_kernel(
    a_desc,
    b_desc,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    KB,
    M_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """_fp8_gemm_kernel with A and B tiles fetched by the TMA engine (Hopper) through tensor
    descriptors; out-of-bounds rows and K columns arrive as zeros, so no masks on A and B."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    as_ptrs, bs_ptrs = _scale_ptrs(as_ptr, bs_ptr, offs_m, offs_n, pid_n, KB, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
        b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
        acc = _scaled_dot(acc, a, b, as_ptrs, bs_ptrs, kb, m_ok, n_ok, BLOCK_N, BLOCK_K)
    _store_c(c_ptr, acc, offs_m, offs_n, m_ok, n_ok, N)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _align(n: int) -> int:
    """Largest power of two <= 16 that divides n (the row length, in elements)."""
    a = 16
    while n % a:
        a //= 2
    return a


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _check_block(block_size) -> tuple[int, int]:
    try:
        bm, bn = (int(v) for v in block_size)
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be two positive integers, not {block_size!r}") from None
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block_size must be two positive integers, not {block_size!r}")
    return bm, bn


def _check_tensor(name: str, t, dtypes, device=None, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other operand is on {device}")


def _check_scale_fmt(scale_fmt: str) -> bool:
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt must be 'float' or 'ue8m0', not {scale_fmt!r}")
    return scale_fmt == "ue8m0"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def weight_dequant_triton(
    q: torch.Tensor,
    s: torch.Tensor,
    block_size: tuple[int, int] = (BLOCK, BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize block-FP8 weights q [..., M, N] with float32 scales [..., ceil(M/bm), ceil(N/bn)]."""
    bm, bn = _check_block(block_size)
    _check_tensor("q", q, _FP8_DTYPES)
    _check_tensor("s", s, (torch.float32,), q.device)
    if q.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    if tuple(s.shape) != scale_grid(tuple(q.shape), (bm, bn)):
        raise ValueError(
            f"scale shape {tuple(s.shape)} does not match weight {tuple(q.shape)} with block {(bm, bn)}"
        )
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, not {out_dtype}")
    y = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if q.numel() == 0:
        return y
    m, n = q.shape[-2:]
    e = q.numel() // (m * n)
    sm, sn = s.shape[-2:]
    block_m = min(DEQUANT_TILE["BLOCK_M"], _pow2(m))
    row_uniform = sm == 1 or bm % block_m == 0
    # Wide tiles (two 128-column scale blocks, scales gathered per column) measured best for
    # 128 x 128 blocks; where rows need their own scales, keep a tile inside one scale column.
    block_n = DEQUANT_TILE["BLOCK_N"] if row_uniform else min(DEQUANT_TILE["BLOCK_N"], 128)
    block_n = min(block_n, max(16, _pow2(n)))
    col_uniform = sn == 1 or bn % block_n == 0
    align = _align(n)
    n_tiles_n = triton.cdiv(n, block_n)
    grid = (triton.cdiv(m, block_m) * n_tiles_n, e)
    _weight_dequant_kernel[grid](
        q,
        s,
        y,
        m,
        n // align,
        bm,
        bn,
        sm,
        sn,
        n_tiles_n,
        ALIGN=align,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ROW_UNIFORM=row_uniform,
        COL_UNIFORM=col_uniform,
        num_warps=DEQUANT_TILE["num_warps"],
        **LAUNCH_OPTS,
    )
    return y


def _act_quant_2d(
    x2: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, g: int, ue8m0: bool, fmax: float
) -> None:
    r, k = x2.shape
    n_groups = s2.shape[-1]
    if n_groups == 1:
        g = _pow2(k)  # one group per row: any width >= k is the same (g is constexpr)
    g_p = _pow2(min(g, k))
    small = r * k < ACT_QUANT_TILE["LARGE"]
    ng_b = 1
    if small and 1 < n_groups == _pow2(n_groups) and n_groups * g_p <= ACT_QUANT_TILE["row_ELEMS"]:
        # short rows (k <= 1024 at g = 128): whole rows per program
        ng_b = n_groups
        block_r = max(1, min(_pow2(r), ACT_QUANT_TILE["row_ELEMS"] // (ng_b * g_p)))
        num_warps = ACT_QUANT_TILE["row_num_warps"]
    else:
        block_r = max(1, min(_pow2(r), ACT_QUANT_TILE["small_ELEMS" if small else "ELEMS"] // g_p))
        elems = block_r * g_p
        num_warps = ACT_QUANT_TILE["small_num_warps" if small else "num_warps"] if elems >= 2048 else 4
    align = _align(k)
    grid = (triton.cdiv(r, block_r) * triton.cdiv(n_groups, ng_b),)  # as the kernel counts them
    _act_quant_kernel[grid](
        x2,
        q2,
        s2,
        r,
        k // align,
        n_groups,
        s2.stride(0),
        s2.stride(1),
        G=g,
        ALIGN=align,
        BLOCK_R=block_r,
        G_P=g_p,
        NG_B=ng_b,
        FMAX=fmax,
        UE8M0=ue8m0,
        DIV=ACT_QUANT_TILE["small_div" if small else "div"],
        num_warps=num_warps,
        **LAUNCH_OPTS,
    )


def weight_quant_triton(
    x: torch.Tensor,
    block_size: tuple[int, int] = (BLOCK, BLOCK),
    scale_fmt: str = "float",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float weights x [..., M, N] to FP8 codes and float32 scales, one per block tile."""
    bm, bn = _check_block(block_size)
    ue8m0 = _check_scale_fmt(scale_fmt)
    _check_tensor("x", x, _FLOAT_DTYPES)
    if fp8_dtype not in _FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be float8_e4m3fn or float8_e5m2, not {fp8_dtype}")
    if x.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    fmax = FP8_MAX[fp8_dtype]
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    s = torch.empty(scale_grid(tuple(x.shape), (bm, bn)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, s
    m, n = x.shape[-2:]
    e = x.numel() // (m * n)
    sm, sn = s.shape[-2:]
    # One scale column: any block width >= n is the same; round it to a power of two so per-tensor
    # blocks of different widths share a compiled kernel (the width is constexpr).
    bn_k = _pow2(n) if sn == 1 else bn
    if bm == 1 and _pow2(bn_k) <= _SINGLE_PASS_MAX:
        # 1 x bn tiles are act_quant's groups over the E*M rows.
        _act_quant_2d(x.view(e * m, n), q.view(e * m, n), s.view(e * m, sn), bn_k, ue8m0, fmax)
        return q, s
    bm_p, bn_p = _pow2(min(bm, m)), _pow2(bn_k)
    single = bm_p * bn_p <= _SINGLE_PASS_MAX
    if not single:
        bn_p = min(bn_p, 256)
        bm_p = min(bm_p, max(1, 8192 // bn_p))
    elems = bm_p * bn_p
    num_warps = WEIGHT_QUANT["num_warps"] if elems >= 8192 else 4
    align = _align(n)
    narrow = single and elems >= 8192 and align in (4, 8) and WEIGHT_QUANT["maxnreg_narrow"]
    cap = {"maxnreg": WEIGHT_QUANT["maxnreg_narrow"]} if narrow else {}
    _weight_quant_kernel[(sm * sn, e)](
        x,
        q,
        s,
        m,
        n // align,
        bm,
        sm,
        sn,
        BN=bn_k,
        ALIGN=align,
        BM_P=bm_p,
        BN_P=bn_p,
        SINGLE=single,
        OFFS64=bm_p * n >= _OFFS32_LIMIT,
        FMAX=fmax,
        UE8M0=ue8m0,
        DIV=WEIGHT_QUANT["div"],
        num_warps=num_warps,
        **cap,
        **LAUNCH_OPTS,
    )
    return q, s


def act_quant_triton(
    x: torch.Tensor,
    group_size: int = BLOCK,
    scale_fmt: str = "float",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    mn_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [..., K] per 1 x group_size group: codes [..., K], scales [..., ceil(K/g)]
    (row-major, or MN-major with mn_major=True: same values, see reference.empty_scales)."""
    ue8m0 = _check_scale_fmt(scale_fmt)
    _check_tensor("x", x, _FLOAT_DTYPES)
    if fp8_dtype not in _FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be float8_e4m3fn or float8_e5m2, not {fp8_dtype}")
    g = int(group_size)
    if g <= 0:
        raise ValueError(f"group_size must be a positive integer, not {group_size!r}")
    if x.dim() < 1:
        raise ValueError("activations must have at least 1 dimension")
    k = x.shape[-1]
    if k == 0 or _pow2(min(g, k)) > _SINGLE_PASS_MAX:
        q, s = weight_quant_triton(x.reshape(-1, k), (1, g), scale_fmt, fp8_dtype)
        s = s.reshape(*x.shape[:-1], s.shape[-1])
        return q.reshape(x.shape), to_mn_major(s) if mn_major else s
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    s = empty_scales(tuple(x.shape[:-1]), triton.cdiv(k, g), x.device, mn_major)
    if x.numel() == 0:
        return q, s
    r = x.numel() // k
    _act_quant_2d(x.view(r, k), q.view(r, k), s.view(r, -1), g, ue8m0, FP8_MAX[fp8_dtype])
    return q, s


# ---- FP8 GEMM ----------------------------------------------------------------------------------


def _m_bucket(m: int) -> int:
    """Autotune / config key for M: next power of two, at least 16, capped at 4096."""
    return min(4096, max(16, _pow2(m)))


# Shipped configurations per M bucket: (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages).
# Pointer kernel, from a sweep on an H100 (bench/bench_kernels.py --sweep, 2026-11-25).
GEMM_CONFIGS = {
    16: (16, 64, 1, 4, 5),
    32: (32, 64, 1, 4, 5),
    64: (64, 64, 8, 4, 5),
    128: (64, 64, 8, 4, 5),
    256: (128, 128, 8, 8, 4),
}
# TMA kernel (A and B through tensor descriptors; used when K % 16 == 0 and M bucket >= 64), from
# the same sweep: 128 x 128 tiles, GROUP_M 16, 4 stages at M = 4096; 64 x 64, 6 stages at M = 128.
GEMM_TMA_CONFIGS = {
    64: (64, 64, 8, 4, 6),
    128: (64, 64, 8, 4, 6),
    256: (128, 128, 16, 8, 4),
}


# The persistent warp-specialized Gluon kernel (gluon_gemm.py) from this M bucket up, on Hopper: it
# matched the TMA kernel at M = 37 and beat it from M = 128 on in a sweep on an H100 (bench/NOTES.md).
# FP8CONV_GEMM_WGMMA=0 turns it off (then the TMA or pointer kernel runs).
GEMM_WGMMA_MIN_M = 64


# Why the Gluon kernel is off in this process, once a Triton version failed to compile it.
_WGMMA_BROKEN: list[str] = []


def _wgmma_launcher(a2: torch.Tensor, b: torch.Tensor, m_bucket: int, k: int):
    """gluon_gemm.fp8_gemm_wgmma where it takes the problem, else None."""
    if _interpreting() or os.environ.get("FP8CONV_GEMM_WGMMA", "1") == "0" or _WGMMA_BROKEN:
        return None
    if m_bucket < GEMM_WGMMA_MIN_M:
        return None
    try:
        from fp8conv.kernels import gluon_gemm
    except ImportError:  # a Triton without Gluon's Hopper API
        return None
    return gluon_gemm.fp8_gemm_wgmma if gluon_gemm.usable(a2, b, k) else None


def _scale_rows(a_scale: torch.Tensor, m: int, kb: int) -> torch.Tensor:
    """a_scale [..., KB] as a 2-D view [M, KB]; it must be row-major or MN-major (empty_scales)."""
    if a_scale.is_contiguous():
        return a_scale.view(m, kb)
    groups_first = a_scale.movedim(-1, 0)
    if groups_first.is_contiguous():
        return groups_first.reshape(kb, m).t()
    raise ValueError(
        "a_scale must be row-major (contiguous) or MN-major (act_quant(..., mn_major=True)); "
        f"got strides {a_scale.stride()} for shape {tuple(a_scale.shape)}"
    )


def _use_tma(a2: torch.Tensor, b: torch.Tensor, m_bucket: int, k: int) -> bool:
    if _interpreting() or os.environ.get("FP8CONV_GEMM_TMA", "1") == "0" or not a2.is_cuda:
        return False
    if m_bucket < min(GEMM_TMA_CONFIGS) or k % 16 or a2.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    return torch.cuda.get_device_capability(a2.device)[0] >= 9


def _gemm_config(m_bucket: int, n: int, k: int, tma: bool = False) -> dict:
    if k % 16:
        # Rows of A and B not 16-byte aligned: byte-wise loads, no async copies; a large tile
        # would spill registers (seen in the sm_90 compile), so take a small one.
        bm, bn, gm, nw, ns = (min(64, m_bucket), 64, 8, 4, 3)
    else:
        table = GEMM_TMA_CONFIGS if tma else GEMM_CONFIGS
        bm, bn, gm, nw, ns = table[max(b for b in table if b <= m_bucket)]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": gm, "num_warps": nw, "num_stages": ns}


def _gemm_autotune_configs():
    cfgs = []
    for bm, bn, nw in (
        (16, 64, 4),
        (32, 64, 4),
        (64, 64, 4),
        (64, 128, 4),
        (128, 64, 4),
        (128, 128, 8),
        (128, 256, 8),
        (64, 256, 8),
    ):
        for ns in (3, 4, 5):
            cfgs.append(
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
            )
    return cfgs


def _prune_gemm_configs(configs, named_args, **kwargs):
    mb = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb)]
    if mb >= 512:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64]
    return kept or configs[:1]


_fp8_gemm_autotuned = None


def _gemm_tuned_kernel():
    global _fp8_gemm_autotuned
    if _fp8_gemm_autotuned is None:
        _fp8_gemm_autotuned = triton.autotune(
            configs=_gemm_autotune_configs(),
            key=["M_BUCKET", "N", "K"],
            prune_configs_by={"early_config_prune": _prune_gemm_configs},
        )(_fp8_gemm_kernel)
    return _fp8_gemm_autotuned


def fp8_gemm_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """C = A @ B^T: a [..., K] e4m3 with a_scale [..., ceil(K/128)], b [N, K] e4m3 with
    b_scale [ceil(N/128), ceil(K/128)] (float32). Returns [..., N] in out_dtype."""
    _check_tensor("a", a, (torch.float8_e4m3fn,))
    _check_tensor("b", b, (torch.float8_e4m3fn,), a.device)
    _check_tensor("a_scale", a_scale, (torch.float32,), a.device, contiguous=False)  # layout: _scale_rows
    _check_tensor("b_scale", b_scale, (torch.float32,), a.device)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, not {out_dtype}")
    if a.dim() < 1 or b.dim() != 2:
        raise ValueError(f"a must be [..., K] and b [N, K]; got {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[-1]
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"inner dimensions differ: a [..., {k}] and b {tuple(b.shape)}")
    kb = triton.cdiv(k, BLOCK)
    if tuple(a_scale.shape) != (*a.shape[:-1], kb):
        raise ValueError(f"a_scale shape {tuple(a_scale.shape)} != {(*a.shape[:-1], kb)}")
    if tuple(b_scale.shape) != (triton.cdiv(n, BLOCK), kb):
        raise ValueError(f"b_scale shape {tuple(b_scale.shape)} != {(triton.cdiv(n, BLOCK), kb)}")
    c = torch.empty((*a.shape[:-1], n), dtype=out_dtype, device=a.device)
    m = a.numel() // k if k else math.prod(a.shape[:-1])
    if m == 0 or n == 0:
        return c
    mb = _m_bucket(m)
    even_k = k % BLOCK == 0
    as2 = _scale_rows(a_scale, m, kb)
    a2 = a.view(m, k)
    wgmma = None if k == 0 else _wgmma_launcher(a2, b, mb, k)
    if wgmma is not None:
        try:
            wgmma(a2, as2, b, b_scale, c.view(m, n))
            return c
        except CompilationError as ex:
            # Gluon's API still moves between Triton releases: a version this kernel was not written
            # for fails here, before anything runs; the Triton kernels below give the same bits.
            root = ex
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            _WGMMA_BROKEN.append(f"{type(root).__name__}: {str(root).strip()[-200:]}")
            warnings.warn(
                f"fp8conv: the Hopper fp8_gemm kernel does not compile with Triton {triton.__version__} "
                f"({_WGMMA_BROKEN[0]}); using the portable Triton kernels",
                RuntimeWarning,
                stacklevel=2,
            )
    # the Triton kernels read row-major A scales
    args = (a, b, c, as2.contiguous(), b_scale, m, n, k, kb, mb)
    if os.environ.get("FP8CONV_GEMM_AUTOTUNE") == "1" and not _interpreting():

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _gemm_tuned_kernel()[grid](*args, BLOCK_K=BLOCK, EVEN_K=even_k, **LAUNCH_OPTS)
        return c
    if k == 0:
        return c.zero_()
    tma = _use_tma(a2, b, mb, k)
    cfg = _gemm_config(mb, n, k, tma)
    if tma and (m < cfg["BLOCK_M"] or n < cfg["BLOCK_N"] or k < BLOCK):
        # keep every TMA box inside its tensor; small problems take the pointer kernel
        tma = False
        cfg = _gemm_config(mb, n, k, False)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a2, [cfg["BLOCK_M"], BLOCK])
        b_desc = TensorDescriptor.from_tensor(b, [cfg["BLOCK_N"], BLOCK])
        _fp8_gemm_tma_kernel[grid](a_desc, b_desc, *args[2:], BLOCK_K=BLOCK, **cfg, **LAUNCH_OPTS)
    else:
        _fp8_gemm_kernel[grid](*args, BLOCK_K=BLOCK, EVEN_K=even_k, **cfg, **LAUNCH_OPTS)
    return c
