"""The FP8 quantize / dequantize family: weight_dequant, weight_quant and act_quant (block scales),
channel_quant (one scale per row: weight_quant's 1 x N tile) and mx_quant (MXFP8: 1 x 32 groups, e8m0
exponent bytes), each kernel directly above its launcher. Same signatures as the torch functions in
`reference.py` (plus `out=`), and the same output bytes (codes and scales). The numerics contract
(see reference.py):

  dequantize:  y = cast_out(fp32(q) * s)              one fp32 multiply, one RNE cast
  quantize:    amax = max|x| over the tile's real elements
               s = max(amax / 448, 2**-126)            IEEE division (tl.math.div_rn -> div.rn.f32)
               ue8m0: s = 2 ** ceil(log2(s))           by exponent bits
               q = e4m3(clamp(x / s, -448, 448))       IEEE division, RNE cast (cvt.rn.satfinite)
  MXFP8:       e = the group's e8m0 byte from amax ("ceil" or "ct" rule, reference.mx_exponents)
               q = e4m3(clamp(x * 2**(127-e), -448, 448))   exact power-of-two multiply, RNE cast

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
- Per-shape launch state (grid, constexprs) is built once per key and the compiled kernel launched
  directly afterwards (common.Launch); the tuning tables below are read when a state is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8conv.kernels.common import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    LAUNCH_OPTS,
    Launch,
    align,
    check_block,
    check_out,
    check_scale_fmt,
    check_tensor,
    launch_state,
    pow2,
    state_key,
    store_state,
)
from fp8conv.kernels.reference import (
    BLOCK,
    E4M3_EMAX,
    FP8_MAX,
    MX_GROUP,
    MX_RULES,
    empty_scales,
    scale_grid,
    to_mn_major,
)

__all__ = [
    "act_quant_triton",
    "channel_quant_triton",
    "mx_quant_triton",
    "weight_dequant_triton",
    "weight_quant_triton",
]

# Largest tile (elements) a quantization program keeps in registers in one pass.
_SINGLE_PASS_MAX = 16384
# weight_quant's in-tile offsets are int32 while rows x row length stays below this (else int64).
_OFFS32_LIMIT = 2**31

# Tile shapes of the memory-bound kernels (module-level so bench/bench_kernels.py can try variants;
# read when a launch state is built: common.clear_launch_state() after changing one).
DEQUANT_TILE = {"BLOCK_M": 32, "BLOCK_N": 256, "num_warps": 4}
# act_quant: rows x group elements per program, warps and division (see _quotient) for tensors of >=
# LARGE elements, and the small_ ones below that; row_: below LARGE, rows whose groups are a power of
# two in number and fit row_ELEMS (k <= 1024 at g = 128) go whole, row_ELEMS per program (7000x1000:
# 69-71% -> 76% of copy bandwidth on one H100, no change on another; slower at 576x7168 and on large
# sizes, so not used there).
# weight_quant: warps for tiles of >= 8192 elements (a 128 x 128 tile) and division. From
# bench/bench_kernels.py --sweep and lab runs on H100s (2026-11-25); the large act_quant tile (4096
# elements, 4 warps; was 8192, 8) from a sweep on an H200 (2026-12-01: 82.5 -> 84.5% of copy).
ACT_QUANT_TILE = {
    "ELEMS": 4096,
    "num_warps": 4,
    "div": 0,
    "small_ELEMS": 2048,
    "small_num_warps": 4,
    "small_div": 2,
    "LARGE": 1 << 24,
    "row_ELEMS": 1024,
    "row_num_warps": 2,
}
WEIGHT_QUANT = {"num_warps": 8, "div": 1, "maxnreg_narrow": 128, "row_chunk": 4096}
# "maxnreg_narrow": a register cap for the one-pass 128 x 128 build where rows are only 8- or 4-element
# aligned (n % 16 != 0, e.g. 7000 x 1000). Its narrower fp8 stores need more address registers: ptxas
# gave 134-150 per thread, so one program of 256 threads per multiprocessor instead of two; capped at
# 128 it fits two without spilling (sm_90a build; with 16-aligned rows it needs 127 uncapped).
# "row_chunk": elements per pass of the two-pass build for one-row tiles (channel_quant's rows longer
# than _SINGLE_PASS_MAX): one row a program, read twice (the second time mostly from the L2).
# mx_quant: 1 x 32 groups a program (GROUPS, across rows when rows are short) and warps.
MX_QUANT_TILE = {"GROUPS": 128, "num_warps": 4}


# ----------------------------------------------------------------------------------------------
# Numerics shared by the quantizers
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


def weight_dequant_triton(
    q: torch.Tensor,
    s: torch.Tensor,
    block_size: tuple[int, int] = (BLOCK, BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize block-FP8 weights q [..., M, N] with float32 scales [..., ceil(M/bm), ceil(N/bn)];
    `out`: a contiguous tensor of q's shape in out_dtype to write into (returned)."""
    key = state_key("dequant", q, s, block_size, out_dtype, out)
    st = launch_state(key) if key is not None else None
    if st is None:
        st = _dequant_state(q, s, block_size, out_dtype, out)
        if key is not None:
            store_state(key, st)
    y = out if out is not None else torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if st is not _EMPTY:
        launch, ints = st
        launch(q, s, y, *ints)
    return y


_EMPTY = ()


def _dequant_state(q, s, block_size, out_dtype, out):
    bm, bn = check_block(block_size)
    check_tensor("q", q, FP8_DTYPES)
    check_tensor("s", s, (torch.float32,), q.device)
    if q.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    if tuple(s.shape) != scale_grid(tuple(q.shape), (bm, bn)):
        raise ValueError(
            f"scale shape {tuple(s.shape)} does not match weight {tuple(q.shape)} with block {(bm, bn)}"
        )
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, not {out_dtype}")
    if out is not None:
        check_out("out", out, q.shape, out_dtype, q.device)
    if q.numel() == 0:
        return _EMPTY
    m, n = q.shape[-2:]
    e = q.numel() // (m * n)
    sm, sn = s.shape[-2:]
    block_m = min(DEQUANT_TILE["BLOCK_M"], pow2(m))
    row_uniform = sm == 1 or bm % block_m == 0
    # Wide tiles (two 128-column scale blocks, scales gathered per column) measured best for
    # 128 x 128 blocks; where rows need their own scales, keep a tile inside one scale column.
    block_n = DEQUANT_TILE["BLOCK_N"] if row_uniform else min(DEQUANT_TILE["BLOCK_N"], 128)
    block_n = min(block_n, max(16, pow2(n)))
    col_uniform = sn == 1 or bn % block_n == 0
    al = align(n)
    n_tiles_n = triton.cdiv(n, block_n)
    grid = (triton.cdiv(m, block_m) * n_tiles_n, e)
    launch = Launch(
        _weight_dequant_kernel,
        grid,
        dict(ALIGN=al, BLOCK_M=block_m, BLOCK_N=block_n, ROW_UNIFORM=row_uniform, COL_UNIFORM=col_uniform),
        dict(num_warps=DEQUANT_TILE["num_warps"], **LAUNCH_OPTS),
    )
    return launch, (m, n // al, bm, bn, sm, sn, n_tiles_n)


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


def _act_quant_launch(r: int, k: int, n_groups: int, s_strides: tuple, g: int, ue8m0: bool, fmax: float):
    """The launch of _act_quant_kernel over x [r, k] with scales [r, n_groups] of strides s_strides,
    and its runtime integer arguments."""
    if n_groups == 1:
        g = pow2(k)  # one group per row: any width >= k is the same (g is constexpr)
    g_p = pow2(min(g, k))
    small = r * k < ACT_QUANT_TILE["LARGE"]
    ng_b = 1
    if small and 1 < n_groups == pow2(n_groups) and n_groups * g_p <= ACT_QUANT_TILE["row_ELEMS"]:
        # short rows (k <= 1024 at g = 128): whole rows per program
        ng_b = n_groups
        block_r = max(1, min(pow2(r), ACT_QUANT_TILE["row_ELEMS"] // (ng_b * g_p)))
        num_warps = ACT_QUANT_TILE["row_num_warps"]
    else:
        block_r = max(1, min(pow2(r), ACT_QUANT_TILE["small_ELEMS" if small else "ELEMS"] // g_p))
        elems = block_r * g_p
        num_warps = ACT_QUANT_TILE["small_num_warps" if small else "num_warps"] if elems >= 2048 else 4
    al = align(k)
    grid = (triton.cdiv(r, block_r) * triton.cdiv(n_groups, ng_b),)  # as the kernel counts them
    launch = Launch(
        _act_quant_kernel,
        grid,
        dict(
            G=g,
            ALIGN=al,
            BLOCK_R=block_r,
            G_P=g_p,
            NG_B=ng_b,
            FMAX=fmax,
            UE8M0=ue8m0,
            DIV=ACT_QUANT_TILE["small_div" if small else "div"],
        ),
        dict(num_warps=num_warps, **LAUNCH_OPTS),
    )
    return launch, (r, k // al, n_groups, *s_strides)


def act_quant_triton(
    x: torch.Tensor,
    group_size: int = BLOCK,
    scale_fmt: str = "float",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    mn_major: bool = False,
    out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [..., K] per 1 x group_size group: codes [..., K], scales [..., ceil(K/g)]
    (row-major, or MN-major with mn_major=True: same values, see reference.empty_scales).
    `out`: (codes, scales) to write into, either may be None; given scales must have the layout
    mn_major asks for."""
    q_out, s_out = (None, None) if out is None else out
    key = state_key(
        "act",
        x,
        group_size,
        scale_fmt,
        fp8_dtype,
        bool(mn_major),
        q_out,
        s_out,
    )
    st = launch_state(key) if key is not None else None
    if st is None:
        st = _act_state(x, group_size, scale_fmt, fp8_dtype, mn_major, q_out, s_out)
        if key is not None:
            store_state(key, st)
    kind, launch, ints, n_groups = st
    if kind == "big":  # groups wider than one register tile: weight_quant's two-pass path
        k = x.shape[-1]
        q, s = weight_quant_triton(x.reshape(-1, k), (1, group_size), scale_fmt, fp8_dtype)
        s = s.reshape(*x.shape[:-1], s.shape[-1])
        q = q.reshape(x.shape)
        if q_out is not None:
            q = q_out.copy_(q)
        if s_out is not None:
            s = s_out.copy_(s)
        elif mn_major:
            s = to_mn_major(s)
        return q, s
    q = q_out if q_out is not None else torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    s = s_out if s_out is not None else empty_scales(tuple(x.shape[:-1]), n_groups, x.device, mn_major)
    if launch is not None:
        launch(x, q, s, *ints)
    return q, s


def _act_state(x, group_size, scale_fmt, fp8_dtype, mn_major, q_out, s_out):
    ue8m0 = check_scale_fmt(scale_fmt)
    check_tensor("x", x, FLOAT_DTYPES)
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be float8_e4m3fn or float8_e5m2, not {fp8_dtype}")
    g = int(group_size)
    if g <= 0:
        raise ValueError(f"group_size must be a positive integer, not {group_size!r}")
    if x.dim() < 1:
        raise ValueError("activations must have at least 1 dimension")
    k = x.shape[-1]
    n_groups = triton.cdiv(k, g)
    if q_out is not None:
        check_out("out[0]", q_out, x.shape, fp8_dtype, x.device)
    if s_out is not None:
        check_tensor("out[1]", s_out, (torch.float32,), x.device, contiguous=False)
        want = empty_scales(tuple(x.shape[:-1]), n_groups, "meta", mn_major)
        if tuple(s_out.shape) != tuple(want.shape) or s_out.stride() != want.stride():
            raise ValueError(
                f"out[1] has shape {tuple(s_out.shape)} and strides {s_out.stride()}; expected "
                f"{tuple(want.shape)} and {want.stride()} ({'MN-major' if mn_major else 'row-major'})"
            )
    if k == 0 or pow2(min(g, k)) > _SINGLE_PASS_MAX:
        return "big", None, (), n_groups
    if x.numel() == 0:
        return "empty", None, (), n_groups
    r = x.numel() // k
    s_strides = (1, r) if mn_major else (n_groups, 1)  # the 2-D scale view's strides [r, n_groups]
    launch, ints = _act_quant_launch(r, k, n_groups, s_strides, g, ue8m0, FP8_MAX[fp8_dtype])
    return "kernel", launch, ints, n_groups


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


def weight_quant_triton(
    x: torch.Tensor,
    block_size: tuple[int, int] = (BLOCK, BLOCK),
    scale_fmt: str = "float",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float weights x [..., M, N] to FP8 codes and float32 scales, one per block tile.
    `out`: (codes, scales) to write into (contiguous, of x's shape and the scale grid), either may be
    None."""
    q_out, s_out = (None, None) if out is None else out
    key = state_key(
        "wq",
        x,
        block_size,
        scale_fmt,
        fp8_dtype,
        q_out,
        s_out,
    )
    st = launch_state(key) if key is not None else None
    if st is None:
        st = _wq_state(x, block_size, scale_fmt, fp8_dtype, q_out, s_out)
        if key is not None:
            store_state(key, st)
    s_shape, launch, ints = st
    q = q_out if q_out is not None else torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    s = s_out if s_out is not None else torch.empty(s_shape, dtype=torch.float32, device=x.device)
    if launch is not None:
        launch(x, q, s, *ints)
    return q, s


def _wq_state(x, block_size, scale_fmt, fp8_dtype, q_out, s_out):
    bm, bn = check_block(block_size)
    ue8m0 = check_scale_fmt(scale_fmt)
    check_tensor("x", x, FLOAT_DTYPES)
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be float8_e4m3fn or float8_e5m2, not {fp8_dtype}")
    if x.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    s_shape = scale_grid(tuple(x.shape), (bm, bn))
    if q_out is not None:
        check_out("out[0]", q_out, x.shape, fp8_dtype, x.device)
    if s_out is not None:
        check_out("out[1]", s_out, s_shape, torch.float32, x.device)
    if x.numel() == 0:
        return s_shape, None, ()
    fmax = FP8_MAX[fp8_dtype]
    m, n = x.shape[-2:]
    e = x.numel() // (m * n)
    sm, sn = s_shape[-2:]
    # One scale column: any block width >= n is the same; round it to a power of two so per-tensor
    # blocks of different widths share a compiled kernel (the width is constexpr).
    bn_k = pow2(n) if sn == 1 else bn
    if bm == 1 and pow2(bn_k) <= _SINGLE_PASS_MAX:
        # 1 x bn tiles are act_quant's groups over the E*M rows (the tensors are contiguous, so the
        # kernel reads them as [E*M, N] with row-major scales [E*M, sn])
        launch, ints = _act_quant_launch(e * m, n, sn, (sn, 1), bn_k, ue8m0, fmax)
        return s_shape, launch, ints
    bm_p, bn_p = pow2(min(bm, m)), pow2(bn_k)
    single = bm_p * bn_p <= _SINGLE_PASS_MAX
    if not single and bm == 1:
        bn_p = min(bn_p, WEIGHT_QUANT["row_chunk"])
    elif not single:
        bn_p = min(bn_p, 256)
        bm_p = min(bm_p, max(1, 8192 // bn_p))
    elems = bm_p * bn_p
    num_warps = WEIGHT_QUANT["num_warps"] if elems >= 8192 else 4
    al = align(n)
    narrow = single and elems >= 8192 and al in (4, 8) and WEIGHT_QUANT["maxnreg_narrow"]
    cap = {"maxnreg": WEIGHT_QUANT["maxnreg_narrow"]} if narrow else {}
    launch = Launch(
        _weight_quant_kernel,
        (sm * sn, e),
        dict(
            BN=bn_k,
            ALIGN=al,
            BM_P=bm_p,
            BN_P=bn_p,
            SINGLE=single,
            OFFS64=bm_p * n >= _OFFS32_LIMIT,
            FMAX=fmax,
            UE8M0=ue8m0,
            DIV=WEIGHT_QUANT["div"],
        ),
        dict(num_warps=num_warps, **cap, **LAUNCH_OPTS),
    )
    return s_shape, launch, (m, n // al, bm, sm, sn)


def channel_quant_triton(
    x: torch.Tensor, out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 of weights [..., M, N]: e4m3 codes and float32 scales [..., M, 1], one per row.
    The block numerics with a 1 x N tile, so this is weight_quant's launch (act_quant's row kernel for
    rows up to _SINGLE_PASS_MAX elements, its two-pass one beyond); same bytes as
    reference.channel_quant_torch."""
    if x.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    return weight_quant_triton(x, (1, max(1, x.shape[-1])), "float", out=out)


@triton.jit(do_not_specialize=["R"])
def _mx_quant_kernel(
    x_ptr,
    q_ptr,
    e_ptr,
    R,
    NG,
    BLOCK_R: tl.constexpr,
    NG_B: tl.constexpr,
    GROUP: tl.constexpr,
    CT: tl.constexpr,
    FMAX: tl.constexpr,
    EMAX: tl.constexpr,
):
    """x [R, NG * GROUP] -> codes of x's shape and e8m0 bytes [R, NG]: one program quantizes BLOCK_R
    rows of NG_B adjacent groups (the row length is a multiple of GROUP, so whole groups only)."""
    pid = tl.program_id(0)
    n_gb = tl.cdiv(NG, NG_B)
    pid_r = pid // n_gb
    gis = (pid - pid_r * n_gb) * NG_B + tl.arange(0, NG_B)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = (rows < R)[:, None] & (gis < NG)[None, :]  # [BLOCK_R, NG_B]
    K = NG * GROUP
    offs = (rows.to(tl.int64)[:, None] * K + gis[None, :] * GROUP)[:, :, None] + tl.arange(0, GROUP)[
        None, None, :
    ]
    x = tl.load(x_ptr + offs, mask=ok[:, :, None], other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 2, _max_nan)  # [BLOCK_R, NG_B]
    bad = (amax != amax) | (amax == float("inf"))
    if CT:
        # compressed-tensors: amax rounded to a power of two (up from a mantissa of 0.75), minus EMAX
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) >= 0x600000).to(tl.int32) - EMAX
        e = tl.where(amax == 0, 0, tl.minimum(tl.maximum(e, 0), 254))
    else:
        # OCP / DeepGEMM / transformers: the smallest power of two >= max(amax / FMAX, 2**-126)
        s = tl.maximum(tl.math.div_rn(amax, FMAX), 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
        bits = s.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        e = tl.where(amax == 0, 127, e)
    e = tl.where(bad, 255, e)
    # 1 / 2**(e-127) = 2**(127-e) as float32 bits, clamped as the torch path clamps it (e = 255 is
    # refused by the callers whatever the codes)
    inv = (tl.minimum(tl.maximum(254 - e, 1), 254) << 23).to(tl.float32, bitcast=True)
    y = tl.clamp(x * inv[:, :, None], -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok[:, :, None])
    e_offs = rows.to(tl.int64)[:, None] * NG + gis[None, :]
    tl.store(e_ptr + e_offs, e.to(tl.uint8), mask=ok)


def mx_quant_triton(
    x: torch.Tensor,
    rule: str = "ceil",
    out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 of weights [..., M, N] (N % 32 == 0): e4m3 codes [..., M, N] and uint8 e8m0 exponents
    [..., M, N/32] under `rule` ("ceil" or "ct", see reference.mx_exponents); same bytes as
    reference.mx_quant_torch. `out`: (codes, exponents) to write into, either may be None."""
    q_out, s_out = (None, None) if out is None else out
    key = state_key("mx", x, rule, q_out, s_out)
    st = launch_state(key) if key is not None else None
    if st is None:
        st = _mx_state(x, rule, q_out, s_out)
        if key is not None:
            store_state(key, st)
    e_shape, launch, ints = st
    q = q_out if q_out is not None else torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    e = s_out if s_out is not None else torch.empty(e_shape, dtype=torch.uint8, device=x.device)
    if launch is not None:
        launch(x, q, e, *ints)
    return q, e


def _mx_state(x, rule, q_out, s_out):
    if rule not in MX_RULES:
        raise ValueError(f"MX scale rule must be one of {', '.join(MX_RULES)}, not {rule!r}")
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    n = x.shape[-1]
    if n % MX_GROUP:
        raise ValueError(f"MXFP8 needs the last dimension to be a multiple of {MX_GROUP}, not {n}")
    e_shape = (*x.shape[:-1], n // MX_GROUP)
    if q_out is not None:
        check_out("out[0]", q_out, x.shape, torch.float8_e4m3fn, x.device)
    if s_out is not None:
        check_out("out[1]", s_out, e_shape, torch.uint8, x.device)
    if x.numel() == 0:
        return e_shape, None, ()
    r, ng = x.numel() // n, n // MX_GROUP
    ng_b = min(pow2(ng), MX_QUANT_TILE["GROUPS"])
    block_r = max(1, min(pow2(r), MX_QUANT_TILE["GROUPS"] // ng_b))
    launch = Launch(
        _mx_quant_kernel,
        (triton.cdiv(r, block_r) * triton.cdiv(ng, ng_b),),
        dict(
            BLOCK_R=block_r,
            NG_B=ng_b,
            GROUP=MX_GROUP,
            CT=rule == "ct",
            FMAX=FP8_MAX[torch.float8_e4m3fn],
            EMAX=E4M3_EMAX,
        ),
        dict(num_warps=MX_QUANT_TILE["num_warps"], **LAUNCH_OPTS),
    )
    return e_shape, launch, (r, ng)
