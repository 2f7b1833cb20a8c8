"""Streaming tensor data through the data checks: each tensor read once, in row bands of whole tiles,
by a pool of workers (one per core on the CPU, a few beside a GPU), so that reads of one tensor overlap
the checks of another and both cores stay busy, as in the converter. Memory is bounded by the workers'
bands (about BAND_ELEMS elements each, plus a reference band), never by tensors or shards.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES
from fp8conv.kernels import scale_to_float32
from fp8conv.verify.context import Band, Context, TensorCheck, TensorData, scale_grid
from fp8conv.verify.numerics import FiniteValues

BAND_ELEMS = 4 << 20  # elements per band read (4 Mi: 4 MiB of FP8 codes, 8 MiB of bf16)
_CORES = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
CPU_WORKERS = min(4, _CORES)
GPU_WORKERS = 4  # readers and host-side work beside the GPU's kernels
MAX_IN_FLIGHT = 2  # tasks queued per worker beyond the running ones
MAX_BATCH = 1024  # tensors per task at most
SMALL_ELEMS = 1 << 16  # a tensor this small is checked with others of its batch


def geometry(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """(leading dims, rows, columns): 0-D and 1-D tensors are one row."""
    if len(shape) == 0:
        return (), 1, 1
    if len(shape) == 1:
        return (), 1, shape[0]
    return tuple(shape[:-2]), shape[-2], shape[-1]


def bands(t: TensorData):
    """(expert, r0, r1) bands of whole tile rows, about BAND_ELEMS elements each."""
    if t.info.numel == 0:
        return
    per = max(1, BAND_ELEMS // max(t.k, 1))
    per = max(t.align, per // t.align * t.align)
    for e in range(t.experts):
        for r0 in range(0, t.m, per):
            yield e, r0, min(t.m, r0 + per)


def _align(t: TensorData) -> int:
    a = 1
    for blk in (t.block, t.ref_block):
        if blk is not None and blk[0] < t.m:
            a = math.lcm(a, blk[0])
    return a


def tensor_data(ctx: Context, name: str) -> TensorData:
    info = ctx.ckpt.info(name)
    lead, m, k = geometry(tuple(info.shape))
    t = TensorData(name, info, lead, m, k)
    if name in ctx.heavy:
        t.record(ctx).selected = True
    use = ctx.usable.get(name)
    if use is not None and name in ctx.heavy:
        raw = ctx.read(ctx.ckpt, use.scale).view(use.scale.torch_dtype)
        t.block = use.tile
        t.scales = scale_grid(scale_to_float32(raw).float(), use, t.experts)
    return t


def run_tensor(ctx: Context, checks: list[TensorCheck], name: str, count_bytes: bool = True) -> None:
    t = tensor_data(ctx, name)
    active = [c for c in checks if c.applies(ctx, t)]
    if not active:
        return
    for c in active:
        c.begin(ctx, t)
    t.align = _align(t)
    row_bytes = t.k * (t.info.nbytes // max(t.info.numel, 1))
    for e, r0, r1 in bands(t):
        raw = ctx.read(ctx.ckpt, t.info, (e * t.m + r0) * row_bytes, (r1 - r0) * row_bytes, count_bytes)
        b = Band(ctx, t, e, r0, r1, raw)
        for c in active:
            c.band(ctx, t, b)
    for c in active:
        c.end(ctx, t)


@contextlib.contextmanager
def _single_threaded_ops(device: torch.device, workers: int):
    """One worker per core on the CPU, each with single-threaded torch ops (as the converter does)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batches(ctx: Context, names: list[str]):
    """Consecutive tensors in tasks of about one band (or MAX_BATCH tensors): small tensors (norms,
    scales, 10^6 of them in a big MoE) cost one task per batch, not one each."""
    batch: list[str] = []
    size = 0
    for name in names:
        batch.append(name)
        size += ctx.ckpt.info(name).numel
        if size >= BAND_ELEMS or len(batch) >= MAX_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _light(ctx: Context, name: str) -> bool:
    """A small float tensor that only the non-finite check reads (a norm, a bias, a scale)."""
    info = ctx.ckpt.info(name)
    return (
        name not in ctx.heavy
        and info.numel <= SMALL_ELEMS
        and info.dtype in FLOAT_DTYPES
        and (ctx.ref is None or name not in ctx.ref)
    )


def run_batch(ctx: Context, checks: list[TensorCheck], names: list[str]) -> None:
    """Each tensor through its checks; the light ones of a batch together first: one read each, one
    `all_finite` over all of them per dtype, and each of a group only when that group holds a NaN/Inf
    (the per-tensor torch calls cost more than the data for 10^5 norms and scales)."""
    finite = next((c for c in checks if isinstance(c, FiniteValues)), None)
    light: dict[str, list[str]] = {}
    for name in names:
        if finite is not None and _light(ctx, name):
            light.setdefault(ctx.ckpt.info(name).dtype, []).append(name)
        else:
            run_tensor(ctx, checks, name)
    for group in light.values():
        raws = [ctx.read(ctx.ckpt, ctx.ckpt.info(n)) for n in group]
        dtype = ctx.ckpt.info(group[0]).torch_dtype
        if not finite.all_finite(torch.cat(raws).view(dtype)):
            for name in group:
                run_tensor(ctx, checks, name, count_bytes=False)


def stream(ctx: Context, checks: list[TensorCheck], names: list[str]) -> None:
    """Run the data checks over `names` (in file order) with a bounded pool of workers."""
    workers = GPU_WORKERS if ctx.device.type == "cuda" else CPU_WORKERS
    workers = max(1, min(workers, len(names)))
    if workers == 1:
        for name in names:
            run_tensor(ctx, checks, name)
        return
    with (
        _single_threaded_ops(ctx.device, workers),
        ThreadPoolExecutor(workers, thread_name_prefix="fp8conv-verify") as pool,
    ):
        pending = set()
        try:
            for batch in batches(ctx, names):
                if len(pending) >= workers * MAX_IN_FLIGHT:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(run_batch, ctx, checks, batch))
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()
        finally:
            for f in pending:
                f.cancel()
