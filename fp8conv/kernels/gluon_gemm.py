"""fp8_gemm for Hopper in Gluon (Triton's lower-level language): persistent and warp-specialized,
so that the promotion of each 128-wide K block on the CUDA cores overlaps tensor-core work.

Why not plain Triton: with per-K-block scales, each K block's product has to leave the tensor cores
(wgmma) and be scaled into the float32 accumulator. Triton 3.6 makes every such dot wait for its
wgmma right after issuing it (`warp_group_dot_wait {pendings = 0}` in the TTGIR of
_fp8_gemm_tma_kernel), and its warpgroups run in lock step (CTA-wide barriers around each TMA
issue), so the tensor cores idle while all warps scale. Keeping one wgmma in flight while promoting
the previous block inside one warpgroup does not help either: ptxas then serializes the wgmmas
("non wgmma instructions reading accumulator registers", C7514).

Here, as in DeepGEMM: one producer warp fills a ring of STAGES shared-memory stages (ready / empty
mbarriers) with, per K block, the A and B tiles (TMA) and their scales (cp.async, tracked by the
same ready barrier); two consumer warpgroups, each a separate partition with its own 64 rows of the
128-row tile and no barrier between them, run per K block: wgmma from zero (use_acc=False), wait,
release the stage, acc += product * a_s * b_s. While one consumer promotes, the other's wgmma runs.
The grid is persistent (one program per multiprocessor, tiles in grouped order), so the producer
loads the next tile while the consumers store the last one.

Why the producer copies the scales: loaded by the consumers with plain loads, their latency sits
before each wgmma (the scale product is computed before it) or before the stage's release (an
mbarrier arrive waits for the thread's earlier loads), and fp8_gemm ran at 0.73-0.77x cuBLAS;
through the stage, at 0.80-0.93x (bench/NOTES.md). MN-major A scales (stride 1 along M, as
`act_quant(..., mn_major=True)` writes them and cuBLAS requires) are read as 256-byte runs instead
of one 32-byte sector per row (faster on five of the eight benchmark shapes, slower by up to 8% on
three); row-major ones are read in place too.

Numerics are those of the Triton kernels (each 128-long K block summed in the tensor core, then
scaled and added in float32), so the kernels agree bit for bit.

Operands as fp8_gemm_triton's: A [M, K] e4m3 with scales [M, ceil(K/128)] of any strides, B [N, K]
e4m3 with contiguous scales [ceil(N/128), ceil(K/128)]; needs Hopper, K % 16 == 0 and 16-byte
aligned rows (TMA). Out-of-bounds rows and K columns arrive as zeros from TMA (and from cp.async
for the scales); the store is masked.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fp8conv.kernels.common import LAUNCH_OPTS, Launch, desc_like, grouped_tile

# The TMA tile load and the cp.async copy are tma / async_copy.async_copy_global_to_shared in Triton
# 3.6 (the version this kernel is measured and tested with); later versions call them async_load and
# make the old names raise.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

__all__ = ["fp8_gemm_wgmma", "prepare", "usable", "block_n_for", "WGMMA_CONFIG"]

# 128-row tiles (two consumer warpgroups of 64 rows). BLOCK_N 128, or 64 where 128-wide tiles would
# leave multiprocessors idle (block_n_for). Measured on an H100 (bench/NOTES.md): a 192-row tile with
# three consumers was no faster once the scales went through the stages; a 128 x 256 tile (two
# 128-column halves per consumer) spills registers in ptxas and ran at 0.66x.
WGMMA_CONFIG = {
    "BLOCK_M": 128,
    "GROUP_M": 8,
    "STAGES_128": 4,  # stages for BLOCK_N 128 and 64: 32 KB and 24 KB of tiles per stage
    "STAGES_64": 6,
    "CONSUMER_REGS": 232,
    "PRODUCER_REGS": 40,
    # a 64-wide tile does this much of a 128-wide one's work per unit time (sweep at M = 256-4096)
    "N64_EFFICIENCY": 0.85,
}


@gluon.jit
def _tile(t, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Tile t's (row, column) offsets in the Triton kernels' grouped order (GROUP_M row tiles sweep
    the N tiles together, so B tiles stay in L2)."""
    pid_m, pid_n = grouped_tile(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _producer(
    a_desc,
    b_desc,
    a_bufs,
    b_bufs,
    as_bufs,
    bs_bufs,
    ready,
    empty,
    as_ptr,
    bs_ptr,
    M,
    N,
    KB,
    sam,
    sak,
    GROUP_M: gl.constexpr,
):
    """One warp: per K block, the scales by cp.async and the A (two 64-row boxes) and B tiles by
    TMA into the next free stage; the stage's ready barrier completes when all have landed."""
    HALF: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    STAGES: gl.constexpr = b_bufs.type.shape[0]
    nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
    lane = gl.arange(0, HALF, layout=gl.BlockedLayout([HALF // 32], [32], [1], [0]))
    num_tiles = gl.cdiv(M, 2 * HALF) * gl.cdiv(N, BLOCK_N)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_m, off_n = _tile(t, M, N, 2 * HALF, BLOCK_N, GROUP_M)
        bs_lane = bs_ptr + (off_n // 128) * KB + lane * 0  # one B scale, copied to every lane
        for kb in range(KB):
            s = it % STAGES
            # wait for both consumers to release the stage (passes at once in the first round)
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            for i in gl.static_range(2):
                rows = off_m + i * HALF + lane
                _cp_async_load(
                    as_bufs.index(2 * s + i), as_ptr + rows.to(gl.int64) * sam + kb * sak, mask=rows < M
                )
            _cp_async_load(bs_bufs.index(s), bs_lane + kb)
            # the barrier also waits for these copies (counted before the TMA's arrive below)
            async_copy.mbarrier_arrive(bar)
            mbarrier.expect(bar, nbytes)
            for i in gl.static_range(2):
                _tma_load(a_desc, [off_m + i * HALF, kb * 128], bar, a_bufs.index(2 * s + i))
            _tma_load(b_desc, [off_n, kb * 128], bar, b_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(
    a_bufs,
    b_bufs,
    as_bufs,
    bs_bufs,
    ready,
    empty,
    c_ptr,
    M,
    N,
    KB,
    HALF_ID: gl.constexpr,
    GROUP_M: gl.constexpr,
):
    """One warpgroup: 64 rows of each tile. Per K block: its wgmma from zero, wait, release the
    stage, then scale into the float32 accumulator."""
    HALF: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    STAGES: gl.constexpr = b_bufs.type.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    rowl: gl.constexpr = gl.SliceLayout(1, mma)
    out: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_N, BLOCK_N // 8], [4, 1], [1, 0])
    num_tiles = gl.cdiv(M, 2 * HALF) * gl.cdiv(N, BLOCK_N)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_m, off_n = _tile(t, M, N, 2 * HALF, BLOCK_N, GROUP_M)
        zero = gl.zeros((HALF, BLOCK_N), gl.float32, mma)
        acc = gl.zeros((HALF, BLOCK_N), gl.float32, mma)
        for _ in range(KB):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            sc = as_bufs.index(2 * s + HALF_ID).load(rowl) * bs_bufs.index(s).load(rowl)
            tok = warpgroup_mma(
                a_bufs.index(2 * s + HALF_ID),
                b_bufs.index(s).permute((1, 0)),
                zero,
                use_acc=False,
                is_async=True,
            )
            p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
            mbarrier.arrive(empty.index(s))
            acc = acc + p * sc[:, None]
            it += 1
        c = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out)
        r = off_m + HALF_ID * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, out))
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out))
        ptrs = c_ptr + r.to(gl.int64)[:, None] * N + cols[None, :]
        gl.store(ptrs, c, mask=(r < M)[:, None] & (cols < N)[None, :])


@gluon.jit
def _consumer_0(a_bufs, b_bufs, as_bufs, bs_bufs, ready, empty, c_ptr, M, N, KB, GROUP_M: gl.constexpr):
    _consumer(a_bufs, b_bufs, as_bufs, bs_bufs, ready, empty, c_ptr, M, N, KB, 0, GROUP_M)


@gluon.jit
def _consumer_1(a_bufs, b_bufs, as_bufs, bs_bufs, ready, empty, c_ptr, M, N, KB, GROUP_M: gl.constexpr):
    _consumer(a_bufs, b_bufs, as_bufs, bs_bufs, ready, empty, c_ptr, M, N, KB, 1, GROUP_M)


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
    sam,
    sak,
    GROUP_M: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    HALF: gl.constexpr = a_desc.block_type.shape[0]  # rows per consumer warpgroup
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(HALF == 64)
    gl.static_assert(BLOCK_N == 64 or BLOCK_N == 128)  # one B scale per K block and tile
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, HALF, 128], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], b_desc.layout)
    slay: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    as_bufs = gl.allocate_shared_memory(gl.float32, [2 * STAGES, HALF], slay)
    bs_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, HALF], slay)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    cargs = (a_bufs, b_bufs, as_bufs, bs_bufs, ready, empty, c_ptr, M, N, KB, GROUP_M)
    pargs = (
        a_desc,
        b_desc,
        a_bufs,
        b_bufs,
        as_bufs,
        bs_bufs,
        ready,
        empty,
        as_ptr,
        bs_ptr,
        M,
        N,
        KB,
        sam,
        sak,
        GROUP_M,
    )
    gl.warp_specialize(
        [(_consumer_0, cargs), (_consumer_1, cargs), (_producer, pargs)],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


def usable(a2: torch.Tensor, b: torch.Tensor, k: int) -> bool:
    """Whether this kernel takes the problem (Hopper, TMA-compatible operands)."""
    if not a2.is_cuda or torch.cuda.get_device_capability(a2.device)[0] != 9:
        return False
    if k % 16 or k < 128 or a2.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    return a2.shape[0] >= 1 and b.shape[0] >= 64


_SMS: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def block_n_for(m: int, n: int, sms: int) -> int:
    """64 or 128: the tile width that keeps more of the machine busy, counting the last, partly
    filled wave of tiles and a 64-wide tile's lower efficiency (WGMMA_CONFIG["N64_EFFICIENCY"])."""
    if n < 128:
        return 64

    def busy(bn: int) -> float:
        tiles = triton.cdiv(m, WGMMA_CONFIG["BLOCK_M"]) * triton.cdiv(n, bn)
        return tiles / (triton.cdiv(tiles, sms) * sms)

    return 64 if busy(64) * WGMMA_CONFIG["N64_EFFICIENCY"] > busy(128) else 128


class _WgmmaRun:
    """The Gluon kernel for one problem: tile width, grid and shared layouts chosen once, descriptor
    templates that hold no tensor (each call copies one over its operand), the launch."""

    def __init__(self, a2, a_scale2, b, b_scale, block_n: int | None = None):
        m, k = a2.shape
        n = b.shape[0]
        sms = _sms(a2.device)
        bn = block_n or block_n_for(m, n, sms)
        lay_a = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
        lay_b = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv)
        self.a_tmpl = TensorDescriptor.from_tensor(a2, [64, 128], lay_a)
        self.b_tmpl = TensorDescriptor.from_tensor(b, [bn, 128], lay_b)
        self.a_tmpl.base = self.b_tmpl.base = None
        tiles = triton.cdiv(m, WGMMA_CONFIG["BLOCK_M"]) * triton.cdiv(n, bn)
        self.launch = Launch(
            _fp8_gemm_wgmma_kernel,
            (min(tiles, sms),),
            dict(
                GROUP_M=WGMMA_CONFIG["GROUP_M"],
                STAGES=WGMMA_CONFIG[f"STAGES_{bn}"],
                CONSUMER_REGS=WGMMA_CONFIG["CONSUMER_REGS"],
                PRODUCER_REGS=WGMMA_CONFIG["PRODUCER_REGS"],
            ),
            dict(num_warps=4, **LAUNCH_OPTS),
        )
        self.ints = (m, n, triton.cdiv(k, 128), a_scale2.stride(0), a_scale2.stride(1))

    def __call__(self, a, a_scale, b, b_scale, c):
        """a and a_scale may be the N-d tensors whose 2-D views built this run (same storage)."""
        self.launch(desc_like(self.a_tmpl, a), desc_like(self.b_tmpl, b), c, a_scale, b_scale, *self.ints)


def prepare(a2, a_scale2, b, b_scale, block_n: int | None = None) -> _WgmmaRun:
    """The launch state for c = fp8_gemm_wgmma(a2, a_scale2, b, b_scale, c): call it with the
    operands (any with the same shapes, strides, dtypes, device and alignment) and c."""
    return _WgmmaRun(a2, a_scale2, b, b_scale, block_n)


def fp8_gemm_wgmma(a2, a_scale2, b, b_scale, c, block_n: int | None = None) -> torch.Tensor:
    """c[M, N] = (a2 * a_scale2) @ (b * b_scale)^T, operands as fp8_gemm_triton's (checked there);
    a_scale2 is [M, ceil(K/128)] with any strides. Builds the launch state every call (fp8_gemm_triton
    keeps it)."""
    prepare(a2, a_scale2, b, b_scale, block_n)(a2, a_scale2, b, b_scale, c)
    return c
