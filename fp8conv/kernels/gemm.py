"""fp8_gemm, the Triton GEMM family: C = A @ B^T from block-FP8 operands (1 x 128 A scales, 128 x 128 B
scales), each kernel directly above its launcher, and the public launcher fp8_gemm_triton that picks one
of them or the persistent Gluon kernel (gluon_gemm.py) and keeps the per-shape launch state.

- Shipped per-M-bucket tile configurations (no autotuning pass on the first call);
  FP8CONV_GEMM_AUTOTUNE=1 autotunes the pointer kernel instead, keyed on (M bucket, N, K) (never under
  the CPU interpreter, where autotune fails).
- On Hopper, when K % 16 == 0, A and B tiles come through TMA tensor descriptors
  (_fp8_gemm_tma_kernel; FP8CONV_GEMM_TMA=0 turns that off), whose out-of-bounds zero fill handles
  ragged M, N and K without masks.
- From M = GEMM_WGMMA_MIN_M up, Hopper takes the persistent warp-specialized Gluon kernel
  (FP8CONV_GEMM_WGMMA=0 turns it off; a Triton whose Gluon API it does not compile with falls back to
  the Triton kernels, with a warning).
- a_scale may be row-major or MN-major (act_quant(..., mn_major=True)); the Gluon kernel reads either
  in place, the Triton kernels take a row-major copy.
- Launch state (kernel choice, grid, tile configuration, TMA descriptor templates, compiled kernel) is
  built on the first call per key (shapes, strides, dtypes, devices, alignment: common.state_key) and
  reused: a repeated call costs a key, one dictionary lookup, the output allocation (none with `out=`)
  and a direct launch. The FP8CONV_GEMM_* switches and the tables below are read when a state is
  built (common.clear_launch_state() after changing one).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from fp8conv.kernels.common import (
    FLOAT_DTYPES,
    LAUNCH_OPTS,
    Launch,
    check_out,
    check_tensor,
    clear_launch_state,
    desc_like,
    grouped_tile,
    interpreting,
    launch_state,
    pow2,
    state_key,
    store_state,
)
from fp8conv.kernels.reference import BLOCK

try:
    from fp8conv.kernels import gluon_gemm
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernels only
    gluon_gemm = None

__all__ = ["fp8_gemm_triton"]


def _m_bucket(m: int) -> int:
    """Autotune / config key for M: next power of two, at least 16, capped at 4096."""
    return min(4096, max(16, pow2(m)))


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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

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


def _gemm_config(m_bucket: int, n: int, k: int, tma: bool = False) -> dict:
    if k % 16:
        # Rows of A and B not 16-byte aligned: byte-wise loads, no async copies; a large tile
        # would spill registers (seen in the sm_90 compile), so take a small one.
        bm, bn, gm, nw, ns = (min(64, m_bucket), 64, 8, 4, 3)
    else:
        table = GEMM_TMA_CONFIGS if tma else GEMM_CONFIGS
        bm, bn, gm, nw, ns = table[max(b for b in table if b <= m_bucket)]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": gm, "num_warps": nw, "num_stages": ns}


def _tile_launch(kernel, m: int, n: int, cfg: dict, **extra) -> Launch:
    """A launch of one of the tiled Triton GEMMs (constexprs in their parameter order)."""
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    cons = dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK, GROUP_M=cfg["GROUP_M"], **extra
    )
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **LAUNCH_OPTS)
    return Launch(kernel, grid, cons, opts)


class _PointerRun:
    """_fp8_gemm_kernel for one problem: row-major A scales (a copy where they are MN-major)."""

    def __init__(self, m, n, k, cfg):
        self.launch = _tile_launch(_fp8_gemm_kernel, m, n, cfg, EVEN_K=k % BLOCK == 0)
        self.ints = (m, n, k, triton.cdiv(k, BLOCK), _m_bucket(m))

    def __call__(self, a, as_rows, b, b_scale, c):
        self.launch(a, b, c, as_rows, b_scale, *self.ints)


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


class _AutotunedRun:
    """_fp8_gemm_kernel through Triton's autotuner (FP8CONV_GEMM_AUTOTUNE=1): the JIT every call."""

    def __init__(self, m, n, k):
        self.ints = (m, n, k, triton.cdiv(k, BLOCK), _m_bucket(m))
        self.even_k = k % BLOCK == 0
        self.grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    def __call__(self, a, as_rows, b, b_scale, c):
        _gemm_tuned_kernel()[self.grid](
            a, b, c, as_rows, b_scale, *self.ints, BLOCK_K=BLOCK, EVEN_K=self.even_k, **LAUNCH_OPTS
        )


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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

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


class _TmaRun:
    """_fp8_gemm_tma_kernel for one problem; descriptor templates hold no tensor (base set per call)."""

    def __init__(self, a2, b, m, n, k, cfg):
        from triton.tools.tensor_descriptor import TensorDescriptor

        self.a_tmpl = TensorDescriptor.from_tensor(a2, [cfg["BLOCK_M"], BLOCK])
        self.b_tmpl = TensorDescriptor.from_tensor(b, [cfg["BLOCK_N"], BLOCK])
        self.a_tmpl.base = self.b_tmpl.base = None
        self.launch = _tile_launch(_fp8_gemm_tma_kernel, m, n, cfg)
        self.ints = (m, n, k, triton.cdiv(k, BLOCK), _m_bucket(m))

    def __call__(self, a, as_rows, b, b_scale, c):
        self.launch(desc_like(self.a_tmpl, a), desc_like(self.b_tmpl, b), c, as_rows, b_scale, *self.ints)


def _use_tma(a2: torch.Tensor, b: torch.Tensor, m_bucket: int, k: int) -> bool:
    if interpreting() or os.environ.get("FP8CONV_GEMM_TMA", "1") == "0" or not a2.is_cuda:
        return False
    if m_bucket < min(GEMM_TMA_CONFIGS) or k % 16 or a2.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    return torch.cuda.get_device_capability(a2.device)[0] >= 9


# ----------------------------------------------------------------------------------------------
# The public launcher
# ----------------------------------------------------------------------------------------------


def _wgmma_ok(a2: torch.Tensor, b: torch.Tensor, m_bucket: int, k: int) -> bool:
    """Whether the Gluon kernel takes the problem."""
    if gluon_gemm is None or interpreting() or os.environ.get("FP8CONV_GEMM_WGMMA", "1") == "0":
        return False
    return not _WGMMA_BROKEN and m_bucket >= GEMM_WGMMA_MIN_M and gluon_gemm.usable(a2, b, k)


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


class _GemmState:
    """What fp8_gemm_triton keeps per key: the output shape; the run (None: nothing to launch, and
    zero: fill the output with zeros, for K = 0); whether the run reads a row-major 2-D view of the A
    scales [m, kb] (the Triton kernels) or a_scale as it is (the Gluon kernel takes its strides); and
    whether the run is the Gluon kernel's first, which compiles it and may fail."""

    __slots__ = ("c_shape", "run", "zero", "rows", "m", "kb", "first_gluon")

    def __init__(self, c_shape, run=None, zero=False, rows=False, m=0, kb=0, first_gluon=False):
        self.c_shape, self.run, self.zero, self.rows = c_shape, run, zero, rows
        self.m, self.kb, self.first_gluon = m, kb, first_gluon


def fp8_gemm_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = A @ B^T: a [..., K] e4m3 with a_scale [..., ceil(K/128)], b [N, K] e4m3 with
    b_scale [ceil(N/128), ceil(K/128)] (float32). Returns [..., N] in out_dtype (written into `out`, a
    contiguous tensor of that shape and dtype, when given)."""
    key = state_key("gemm", a, a_scale, b, b_scale, out_dtype, out)
    st = launch_state(key) if key is not None else None
    if st is None:
        st = _gemm_state(a, a_scale, b, b_scale, out_dtype, out)
        if key is not None:
            store_state(key, st)
    c = out if out is not None else torch.empty(st.c_shape, dtype=out_dtype, device=a.device)
    if st.run is None:
        return c.zero_() if st.zero else c
    as_rows = _scale_rows(a_scale, st.m, st.kb).contiguous() if st.rows else a_scale
    if st.first_gluon:
        try:
            st.run(a, as_rows, b, b_scale, c)
        except CompilationError as ex:
            # Gluon's API still moves between Triton releases: a version this kernel was not written
            # for fails here, before anything runs; the Triton kernels give the same bits. Every state
            # is rebuilt (the others may hold the Gluon kernel too).
            _gluon_broken(ex)
            clear_launch_state()
            return fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype, out)
        st.first_gluon = False
        return c
    st.run(a, as_rows, b, b_scale, c)
    return c


def _gluon_broken(ex: CompilationError) -> None:
    root = ex
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    _WGMMA_BROKEN.append(f"{type(root).__name__}: {str(root).strip()[-200:]}")
    warnings.warn(
        f"fp8conv: the Hopper fp8_gemm kernel does not compile with Triton {triton.__version__} "
        f"({_WGMMA_BROKEN[0]}); using the portable Triton kernels",
        RuntimeWarning,
        stacklevel=3,
    )


def _gemm_state(a, a_scale, b, b_scale, out_dtype, out) -> _GemmState:
    check_tensor("a", a, (torch.float8_e4m3fn,))
    check_tensor("b", b, (torch.float8_e4m3fn,), a.device)
    check_tensor("a_scale", a_scale, (torch.float32,), a.device, contiguous=False)  # layout: _scale_rows
    check_tensor("b_scale", b_scale, (torch.float32,), a.device)
    if out_dtype not in FLOAT_DTYPES:
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
    c_shape = (*a.shape[:-1], n)
    if out is not None:
        check_out("out", out, c_shape, out_dtype, a.device)
    m = a.numel() // k if k else math.prod(a.shape[:-1])
    if m == 0 or n == 0:
        return _GemmState(c_shape)
    mb = _m_bucket(m)
    as2 = _scale_rows(a_scale, m, kb)  # checks the layout
    a2 = a.view(m, k)
    if k and _wgmma_ok(a2, b, mb, k):
        return _GemmState(c_shape, gluon_gemm.prepare(a2, as2, b, b_scale), m=m, kb=kb, first_gluon=True)
    if os.environ.get("FP8CONV_GEMM_AUTOTUNE") == "1" and not interpreting():
        return _GemmState(c_shape, _AutotunedRun(m, n, k), rows=not a_scale.is_contiguous(), m=m, kb=kb)
    if k == 0:
        return _GemmState(c_shape, zero=True)
    tma = _use_tma(a2, b, mb, k)
    cfg = _gemm_config(mb, n, k, tma)
    if tma and (m < cfg["BLOCK_M"] or n < cfg["BLOCK_N"] or k < BLOCK):
        # keep every TMA box inside its tensor; small problems take the pointer kernel
        tma = False
        cfg = _gemm_config(mb, n, k, False)
    run = _TmaRun(a2, b, m, n, k, cfg) if tma else _PointerRun(m, n, k, cfg)
    return _GemmState(c_shape, run, rows=not a_scale.is_contiguous(), m=m, kb=kb)
