"""fp8_gemm for Hopper in Gluon (Triton's lower-level language), warp-specialized so that the
promotion of each 128-wide K block on the CUDA cores overlaps tensor-core work.

Why not plain Triton: with per-K-block scales, each K block's product has to leave the tensor cores
(wgmma) and be scaled into the float32 accumulator. Triton 3.6 makes every such dot wait for its
wgmma right after issuing it (`warp_group_dot_wait {pendings = 0}` in the TTGIR of
_fp8_gemm_tma_kernel), and its warpgroups run in lock step (CTA-wide barriers around each TMA
issue), so the tensor cores idle while all warps scale. Keeping one wgmma in flight while promoting
the previous block inside one warpgroup does not help either: ptxas then serializes the wgmmas
("non wgmma instructions reading accumulator registers", C7514).

Here, as in DeepGEMM: one producer warp issues the TMA loads into a ring of STAGES shared-memory
stages (ready / empty mbarriers); 2 or 3 consumer warpgroups, each a separate partition with its own
64 rows of the tile and no barrier between them, run per K block: wgmma from zero (use_acc=False),
wait, release the stage, acc += product * a_s * b_s. While one consumer promotes, another's wgmma
runs. Numerics are those of the Triton kernels (each 128-long K block summed in the tensor core,
then scaled and added in float32).

Operands as fp8_gemm_triton's: A [M, K] e4m3 with scales [M, ceil(K/128)], B [N, K] e4m3 with scales
[ceil(N/128), ceil(K/128)]; needs Hopper, K % 16 == 0 and 16-byte aligned rows (TMA), M >= BLOCK_M,
N >= 128. Out-of-bounds rows and K columns arrive as zeros from TMA; the store is masked.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["fp8_gemm_wgmma", "WGMMA_CONFIG"]

# BLOCK_N is 128: one B scale per K block and tile. BLOCK_M 128 = two consumer warpgroups, the
# configuration the GPU tests ran. BLOCK_M 192 (three consumers, CONSUMER_REGS 160, PRODUCER_REGS 24)
# measured faster in a sweep on an H100 (0.75-0.82x vs 0.74-0.78x cuBLAS at M = 4096, bench/NOTES.md)
# but has not been through the GPU tests (ragged M leaves a whole 64-row TMA box out of bounds there).
WGMMA_CONFIG = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "GROUP_M": 8,
    "STAGES": 4,
    "CONSUMER_REGS": 232,
    "PRODUCER_REGS": 40,
}


@gluon.jit
def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, off_m, off_n, KB):
    """One warp: TMA loads of each K block (A in 64-row parts, one per consumer) into the ring."""
    HALF: gl.constexpr = a_bufs.type.shape[1]
    STAGES: gl.constexpr = b_bufs.type.shape[0]
    NC: gl.constexpr = a_bufs.type.shape[0] // STAGES  # consumers
    nbytes: gl.constexpr = NC * a_desc.block_type.nbytes + b_desc.block_type.nbytes
    for kb in range(KB):
        s = kb % STAGES
        # wait for every consumer to release the stage (passes at once in the first round)
        mbarrier.wait(empty.index(s), ((kb // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, nbytes)
        for i in gl.static_range(NC):
            tma.async_copy_global_to_shared(
                a_desc, [off_m + i * HALF, kb * 128], bar, a_bufs.index(NC * s + i)
            )
        tma.async_copy_global_to_shared(b_desc, [off_n, kb * 128], bar, b_bufs.index(s))


@gluon.jit
def _consumer(
    a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n, HALF_ID: gl.constexpr
):
    """One warpgroup: 64 rows of the tile. Per K block: its wgmma from zero, wait, release the
    stage, then scale into the float32 accumulator. The consumers are separate partitions with no
    barrier between them, so one promotes while another's wgmma runs."""
    HALF: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    STAGES: gl.constexpr = b_bufs.type.shape[0]
    NC: gl.constexpr = a_bufs.type.shape[0] // STAGES
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    off = off_m + HALF_ID * HALF
    rows = off + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
    m_ok = rows < M
    as_row = as_ptr + rows.to(gl.int64) * KB
    bs_row = bs_ptr + pid_n * KB
    zero = gl.zeros((HALF, BLOCK_N), gl.float32, mma)
    acc = gl.zeros((HALF, BLOCK_N), gl.float32, mma)
    for kb in range(KB):
        s = kb % STAGES
        sc = gl.load(as_row + kb, mask=m_ok, other=0.0) * gl.load(bs_row + kb)
        mbarrier.wait(ready.index(s), (kb // STAGES) & 1)
        tok = warpgroup_mma(
            a_bufs.index(NC * s + HALF_ID),
            b_bufs.index(s).permute((1, 0)),
            zero,
            use_acc=False,
            is_async=True,
        )
        p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        mbarrier.arrive(empty.index(s))
        acc = acc + p * sc[:, None]
    out: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    c = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out)
    r = off + gl.arange(0, HALF, layout=gl.SliceLayout(1, out))
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out))
    ptrs = c_ptr + r.to(gl.int64)[:, None] * N + cols[None, :]
    gl.store(ptrs, c, mask=(r < M)[:, None] & (cols < N)[None, :])


@gluon.jit
def _consumer_0(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n):
    _consumer(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n, 0)


@gluon.jit
def _consumer_1(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n):
    _consumer(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n, 1)


@gluon.jit
def _consumer_2(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n):
    _consumer(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n, 2)


@gluon.jit
def _fp8_gemm_wgmma_kernel(
    a_desc,
    b_desc,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    KB,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    GROUP_M: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    gl.static_assert(BLOCK_N == 128)
    gl.static_assert(BLOCK_M == 128 or BLOCK_M == 192)
    # grouped tile order: GROUP_M row tiles sweep the N tiles together, so B tiles stay in L2
    pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_in = pid - group_id * num_in_group
    pid_m = first_m + pid_in % group_size
    pid_n = pid_in // group_size
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    HALF: gl.constexpr = 64  # rows per consumer warpgroup
    NC: gl.constexpr = BLOCK_M // HALF
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [NC * STAGES, HALF, 128], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NC)
    cargs = (a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, M, N, KB, off_m, off_n, pid_n)
    pargs = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, off_m, off_n, KB)
    if NC == 2:
        gl.warp_specialize(
            [(_consumer_0, cargs), (_consumer_1, cargs), (_producer, pargs)],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )
    else:
        gl.warp_specialize(
            [(_consumer_0, cargs), (_consumer_1, cargs), (_consumer_2, cargs), (_producer, pargs)],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
        )


def usable(a2: torch.Tensor, b: torch.Tensor, k: int) -> bool:
    """Whether this kernel takes the problem (Hopper, TMA-compatible operands, big enough)."""
    if not a2.is_cuda or torch.cuda.get_device_capability(a2.device)[0] != 9:
        return False
    if k % 16 or k < 128 or a2.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    return a2.shape[0] >= WGMMA_CONFIG["BLOCK_M"] and b.shape[0] >= WGMMA_CONFIG["BLOCK_N"]


def fp8_gemm_wgmma(a2, a_scale, b, b_scale, c, cfg: dict | None = None) -> torch.Tensor:
    """c[M, N] = (a2 * a_scale) @ (b * b_scale)^T, operands as fp8_gemm_triton's (checked there)."""
    cfg = dict(WGMMA_CONFIG, **(cfg or {}))
    m, k = a2.shape
    n = b.shape[0]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    lay_a = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    lay_b = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv)
    a_desc = TensorDescriptor.from_tensor(a2, [64, 128], lay_a)
    b_desc = TensorDescriptor.from_tensor(b, [bn, 128], lay_b)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_wgmma_kernel[grid](
        a_desc,
        b_desc,
        c,
        a_scale,
        b_scale,
        m,
        n,
        triton.cdiv(k, 128),
        BLOCK_M=bm,
        BLOCK_N=bn,
        GROUP_M=cfg["GROUP_M"],
        STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"],
        num_warps=4,
    )
    return c
