"""Runs a conversion plan: shard by shard, tensor piece by tensor piece, read / convert / write overlapped.

Memory is bounded by pieces, not tensors or shards: each tensor is cut into row bands of whole tiles
(at most PIECE_ELEMS elements, or one tile row if that is larger), and a fixed pool of piece buffers
is in flight. One thread reads the next pieces with positional reads; converter threads turn them
into output bytes (on the CPU one per core, each with single-threaded torch ops; on the GPU one,
through pinned buffers and the Triton kernels); writer threads (one on the CPU, GPU_WRITERS beside a
GPU) write with positional writes to disjoint ranges. Tensors kept as they are go file to file in
the kernel (copy_file_range). Each output shard is written into DST/.fp8conv/tmp/ and fsynced and
renamed into place while the next shard converts; every ~64 MiB written, the writer asks the kernel
to start writing that range back (start_writeback), so the disk is busy during the conversion rather
than only in the final fsync. Summary.stage_seconds adds up the time spent in each stage (read,
convert, write, commit) over the threads that run it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fp8conv.checkpoint.layout import CONFIG_NAME, INDEX_NAME, Checkpoint
from fp8conv.checkpoint.output import (
    HASH_PLACEHOLDER,
    META_HASH,
    META_JOB,
    WRITEBACK_CHUNK,
    Crc32,
    OutputDir,
    canonical,
    check_paths,
    confirm_shard,
    copy_range,
    hash_field,
    hash_range,
    io_error,
    same_bytes,
    same_content,
    shard_digest,
    start_writeback,
)
from fp8conv.checkpoint.safetensors_io import DTYPES, ITEMSIZE, ShardReader, build_header, read_header
from fp8conv.convert import decode
from fp8conv.convert.plan import Plan, ShardPlan, TensorJob
from fp8conv.convert.quantize_schemes import quantize_band, scale_dtype
from fp8conv.errors import Fp8convError, Interrupted, NonFiniteError, ResourceError
from fp8conv.kernels import resolve_device, scale_to_float32, weight_quant

PIECE_ELEMS = 8 << 20  # 8 Mi elements: 8 MiB of FP8, 16 MiB of bf16 per piece
POOL = 3  # pieces in flight on each side of the converter
_CORES = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
CPU_WORKERS = min(4, _CORES)
# Writer threads with a GPU converting: one thread's pwrite into the page cache ran at ~2 GB/s and
# was the longest stage of a GPU dequantize (measured on an H100 machine); positional writes to
# disjoint ranges parallelize. On the CPU the cores are busy converting, so one writer.
GPU_WRITERS = min(4, max(1, _CORES // 4))
CPU_WRITERS = 1

# Test hook (tests/test_resume.py), read once: FP8CONV_FAULT=POINT[:N][=SIG] stops the process there.
_FAULT = os.environ.get("FP8CONV_FAULT", "")


def _fault_point(name: str, shard: int | None = None, settle=None) -> None:
    """TEST HOOK, inert unless FP8CONV_FAULT is set: kill this process at a named point so the fault
    suite can check crash safety. Points: after_shard:N (shard N of SRC, 1-based, renamed and
    recorded), mid_shard:N (shard N partly written into DST/.fp8conv/tmp), before_index,
    before_complete (index and config written, `complete` not yet). SIGKILL, or the signal named
    after '=' (e.g. mid_shard:2=TERM). `settle` runs first, so the point is deterministic (mid_shard
    waits for the previous shard's commit, which otherwise runs beside it)."""
    if not _FAULT:
        return
    point, _, sig = _FAULT.partition("=")
    if point == name or point == f"{name}:{shard}":
        if settle is not None:
            settle()
        os.kill(os.getpid(), getattr(signal, "SIG" + sig) if sig else signal.SIGKILL)


class Progress:
    """Callbacks the CLI implements; the library never prints."""

    def start(self, total_bytes: int, total_shards: int, device: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def shard_done(self, name: str, skipped: bool = False) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class Summary:
    command: str
    src: str
    dst: str
    device: str
    tensors_converted: int = 0
    tensors_copied: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    files_copied: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    complete: bool = False
    part: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    # Seconds per stage summed over the threads that run it (so a stage may exceed "wall"): read
    # (positional reads of piece inputs), convert (the converter threads), write (pwrite and
    # copy_file_range into temporary files, writeback hints included), commit (fsync + rename),
    # confirm (hashing what DST already holds, on a rerun).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage_seconds"] = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        return d


class _Stages:
    """Thread-safe accumulation of seconds per stage into a Summary's stage_seconds."""

    NAMES = ("read", "convert", "write", "commit", "confirm")

    def __init__(self, into: dict[str, float]) -> None:
        self.seconds = into
        for name in self.NAMES:
            into.setdefault(name, 0.0)
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            with self.lock:
                self.seconds[stage] += dt


@dataclass
class _Piece:
    job: TensorJob
    kind: str  # "copy" | "convert" | "emit"
    src_off: int = 0
    length: int = 0  # input bytes
    dst_off: int = 0
    rows: tuple[int, int, int] = (0, 0, 0)  # expert, r0, r1
    last: bool = False
    jobs: tuple[TensorJob, ...] = ()  # copy: every tensor of a run of small ones, in file order


def source_fingerprint(ckpt: Checkpoint) -> dict:
    """Sizes and content hashes of the source files: equal on every machine that holds the same
    checkpoint, so parts on different machines agree. A shard's hash covers its header and samples of
    its data (all of it when small), so a shard rewritten in place with the same size is noticed."""
    files: dict[str, list] = {}
    try:
        for name, h in ckpt.shards.items():
            files[name] = [h.file_size, _shard_hash(h.path, h.data_start, h.file_size)]
        for rel in [INDEX_NAME, CONFIG_NAME, *ckpt.other_files]:
            p = ckpt.root / rel
            if p.is_file():
                files[rel] = [p.stat().st_size, _quick_hash(p)]
    except OSError as e:
        raise io_error(e, getattr(e, "filename", None) or ckpt.root, "reading the source") from e
    return files


_SAMPLE = 1 << 20


def _shard_hash(p: Path, data_start: int, size: int) -> str:
    """sha256 of the header and of the data: whole up to 4 MiB, else its first, middle and last MiB."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(data_start))
        n = size - data_start
        spans = (
            [(data_start, n)]
            if n <= 4 * _SAMPLE
            else [
                (data_start, _SAMPLE),
                (data_start + (n - _SAMPLE) // 2, _SAMPLE),
                (size - _SAMPLE, _SAMPLE),
            ]
        )
        for off, length in spans:
            f.seek(off)
            h.update(f.read(length))
    return h.hexdigest()[:16]


def _quick_hash(p: Path) -> str:
    h = hashlib.sha256()
    size = p.stat().st_size
    with open(p, "rb") as f:
        if size <= 64 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _single_threaded_ops(device: torch.device):
    """On the CPU the pipeline runs one converter thread per core, each with single-threaded torch
    ops; restore the caller's setting afterwards."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Signals:
    """SIGTERM (and SIGINT) raise Interrupted in the main thread so cleanup runs."""

    def __enter__(self) -> _Signals:
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Interrupted(signum)

    def __exit__(self, *exc) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


def run(
    ckpt: Checkpoint,
    plan: Plan,
    dst: Path,
    command: str,
    job_key: dict,
    device_spec: str,
    overwrite: bool,
    part: tuple[int, int] | None,
    progress: Progress | None = None,
    scale_fmt: str = "float",
) -> Summary:
    progress = progress or Progress()
    t0 = time.perf_counter()
    check_paths(ckpt.root, dst)
    device, note = resolve_device(device_spec)
    summary = Summary(command, str(ckpt.root), str(dst), str(device), part=list(part) if part else None)
    stages = _Stages(summary.stage_seconds)
    for message in ([note] if note else []) + _skipped_notes(ckpt):
        summary.notes.append(message)
        progress.note(message)
    job = {**job_key, "source": source_fingerprint(ckpt)}
    layouts = {sp.name: _ShardLayout(sp, canonical(job)) for sp in plan.shards}
    side = _side_files(ckpt, plan)
    expected = [s.name for s in plan.shards] + list(side)
    out = OutputDir(dst)
    # A finished output has no state folder: confirm it read-only, without taking the lock.
    if dst.is_dir() and not out.has_state():
        with stages("confirm"):
            finished = _finished(out, plan, layouts, side, set(expected))
        if finished:
            summary.already_complete = summary.complete = True
            summary.seconds = summary.stage_seconds["wall"] = time.perf_counter() - t0
            return summary
    mine = [s for i, s in enumerate(plan.shards) if part is None or i % part[1] == part[0] - 1]
    shard_no = {name: i for i, name in enumerate(ckpt.shards, 1)}
    out.precheck(job, overwrite, set(expected), _job_in_shards(out, plan))
    with _Signals(), _single_threaded_ops(device):
        out.acquire(job, part, command, overwrite)
        try:
            out.prepare(job, overwrite, set(expected), _job_in_shards(out, plan))
            present = [sp for sp in mine if (dst / sp.name).exists() or (dst / sp.name).is_symlink()]
            with stages("confirm"):
                done = _confirm_shards(out, present, layouts)
            for sp in present:
                if sp.name not in done:
                    message = (
                        f"{sp.name} in DST differs from what this job wrote (content hash); writing it again"
                    )
                    summary.notes.append(message)
                    progress.note(message)
            todo = [s for s in mine if s.name not in done]
            _check_free_space(ckpt, out, todo, side)
            total_in = sum(ckpt.shards[s.name].file_size for s in mine)
            progress.start(total_in, len(mine), str(device))
            committer = ThreadPoolExecutor(1, thread_name_prefix="fp8conv-commit")
            pending: Future | None = None
            try:
                for sp in mine:
                    if sp.name not in done:
                        tmp = _write_shard(
                            ckpt,
                            sp,
                            out,
                            device,
                            scale_fmt,
                            summary,
                            progress,
                            pending,
                            stages,
                            layouts[sp.name],
                            shard_no[sp.name],
                        )
                        if pending is not None:
                            pending.result()  # at most one commit in flight; its errors surface here
                        pending = committer.submit(
                            _commit_shard, out, tmp, sp.name, progress, stages, shard_no[sp.name]
                        )
                        summary.shards_written += 1
                    else:
                        summary.shards_skipped += 1
                        progress.advance(ckpt.shards[sp.name].file_size)
                        progress.shard_done(sp.name, skipped=True)
                if pending is not None:
                    pending.result()
            finally:
                committer.shutdown(wait=True)
            _write_side_files(ckpt, plan, side, out, summary)
            _fault_point("before_complete")
            out.check_lock()
            mine_names = {s.name for s in mine}
            summary.complete = out.finish(
                lambda: all(s.name in mine_names or _present(out, layouts[s.name]) for s in plan.shards)
            )
        finally:
            out.release()
    summary.seconds = summary.stage_seconds["wall"] = time.perf_counter() - t0
    progress.close()
    return summary


class _ShardLayout:
    """What one output shard holds: its header (with the job and a placeholder hash in its
    __metadata__), each tensor's byte span, its size. The same on every run of the job."""

    def __init__(self, sp: ShardPlan, job: str) -> None:
        meta = dict(sp.metadata) if sp.metadata is not None else {"format": "pt"}
        meta[META_JOB] = job
        meta[META_HASH] = HASH_PLACEHOLDER
        entries = [(j.name, j.out_dtype, j.out_shape) for j in sp.jobs]
        self.prefix, self.offsets = build_header(entries, meta)
        self.spans = [self.offsets[j.name] for j in sp.jobs]
        self.size = len(self.prefix) + sp.out_bytes
        self.path_name = sp.name


def _skipped_notes(ckpt: Checkpoint) -> list[str]:
    skipped = getattr(ckpt, "skipped", None) or []
    if not skipped:
        return []
    return ["not copied to the output: " + ", ".join(skipped) + " (version control, caches, tool state)"]


def _side_files(ckpt: Checkpoint, plan: Plan) -> dict[str, Path | bytes]:
    """Every file but the shards that a complete output holds: the source's other files (by path),
    the index and config.json (by the bytes they must have)."""
    import json

    side: dict[str, Path | bytes] = {rel: ckpt.root / rel for rel in plan.copied_files(ckpt.other_files)}
    side.update(plan.write_files)
    if ckpt.has_index:
        meta = dict(ckpt.index_metadata)
        meta["total_size"] = plan.tensor_bytes
        index = {"metadata": meta, "weight_map": dict(sorted(plan.weight_map.items()))}
        side[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()
    if plan.config is not None:
        side[CONFIG_NAME] = (json.dumps(plan.config, indent=2) + "\n").encode()
    return side


def _side_ok(out: OutputDir, rel: str, want: Path | bytes) -> bool:
    p = out.root / rel
    return same_bytes(p, want) if isinstance(want, bytes) else same_content(want, p)


def _present(out: OutputDir, layout: _ShardLayout) -> bool:
    """A shard another part committed: right size and header (the job) without reading the data."""
    p = out.root / layout.path_name
    try:
        if p.is_symlink() or p.stat().st_size != layout.size:
            return False
        with open(p, "rb") as f:
            head = f.read(len(layout.prefix))
    except OSError:
        return False
    at = layout.prefix.find(hash_field(HASH_PLACEHOLDER))
    n = len(hash_field(HASH_PLACEHOLDER))
    return head[:at] == layout.prefix[:at] and head[at + n :] == layout.prefix[at + n :]


def _confirm_shards(out: OutputDir, shards: list[ShardPlan], layouts: dict) -> set[str]:
    """Names of the shards in DST whose content hash confirms them; files hashed in parallel
    (hashlib releases the GIL; this is read-bound)."""
    if not shards:
        return set()

    def check(sp: ShardPlan) -> bool:
        lay = layouts[sp.name]
        return confirm_shard(out.root / sp.name, lay.prefix, lay.size, lay.spans)

    with ThreadPoolExecutor(min(4, _CORES, len(shards)), thread_name_prefix="fp8conv-confirm") as ex:
        return {sp.name for sp, ok in zip(shards, ex.map(check, shards), strict=True) if ok}


def _finished(out: OutputDir, plan: Plan, layouts: dict, side: dict, expected: set[str]) -> bool:
    """DST is a complete output of this job: every file confirmed, nothing else, no links."""
    if out.strays(expected) or out._links():
        return False
    if not all(_side_ok(out, rel, want) for rel, want in side.items()):
        return False
    return len(_confirm_shards(out, plan.shards, layouts)) == len(plan.shards)


def _job_in_shards(out: OutputDir, plan: Plan) -> dict | None:
    """The job recorded in the first finished shard found in DST (a finished output has no state
    folder; its shards say what made them)."""
    import json

    for sp in plan.shards:
        p = out.root / sp.name
        if not p.is_file() or p.is_symlink():
            continue
        try:
            meta = read_header(p).metadata or {}
            job = json.loads(meta[META_JOB])
        except (Fp8convError, KeyError, ValueError):
            continue
        if isinstance(job, dict):
            return job
    return None


def _final_names(ckpt: Checkpoint, plan: Plan) -> list[str]:
    """Every file a complete output holds."""
    names = [s.name for s in plan.shards] + plan.copied_files(ckpt.other_files) + list(plan.write_files)
    return names + [INDEX_NAME] * ckpt.has_index + [CONFIG_NAME] * (plan.config is not None)


def _check_free_space(ckpt: Checkpoint, out: OutputDir, todo: list[ShardPlan], side: dict) -> None:
    """Space for what is still to write: shards not confirmed in DST (counted once however they
    got there) and side files whose copy in DST is not yet the right size."""
    need = sum(s.out_bytes for s in todo)
    for rel, want in side.items():
        size = len(want) if isinstance(want, bytes) else want.stat().st_size
        try:
            have = (out.root / rel).lstat().st_size
        except OSError:
            have = -1
        if have != size:
            need += size
    free = shutil.disk_usage(out.root).free
    if need > free:
        raise ResourceError(
            f"the output needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free",
            file=out.root,
            hint="free space or choose another DST",
        )


def _write_side_files(ckpt: Checkpoint, plan: Plan, side: dict, out: OutputDir, summary: Summary) -> None:
    """Every part writes these, byte-identical: other files, rewritten settings files (params.json),
    the index, config.json; each only if DST does not already hold exactly it."""
    for rel in plan.copied_files(ckpt.other_files):
        if not _side_ok(out, rel, side[rel]):
            out.copy_file(ckpt.root / rel, rel)
            summary.files_copied += 1
    for rel in plan.write_files:  # settings files rewritten by the plan (params.json)
        if not _side_ok(out, rel, side[rel]):
            out.write_bytes_atomic(rel, side[rel])
    _fault_point("before_index")
    for rel in (INDEX_NAME, CONFIG_NAME):
        if rel in side and not _side_ok(out, rel, side[rel]):
            out.write_bytes_atomic(rel, side[rel])


# ------------------------------------------------------------------------------------------ pieces
def _align(job: TensorJob) -> int:
    bm = job.block[0]
    return bm if bm < _matrix(job)[1] else 1


def _matrix(job: TensorJob) -> tuple[int, int, int, int]:
    """(experts, rows, columns, source bytes per row) of the weight a job converts; a dequantize's
    geometry comes from its layout (packed FP4 codes hold two columns a byte)."""
    shape = job.weight.shape if job.weight is not None else job.src.shape
    *lead, m, n = shape
    experts = math.prod(lead)
    row_bytes = (
        job.src.nbytes // max(experts * m, 1) if job.weight is not None else n * ITEMSIZE[job.src.dtype]
    )
    return experts, m, n, row_bytes


def _rows_per_piece(job: TensorJob) -> int:
    """Whole tile rows (any rows when one tile spans the matrix) worth about PIECE_ELEMS elements;
    a whole expert where the output is transposed."""
    _, m, n, _ = _matrix(job)
    if job.weight is not None and job.weight.transpose:
        return m
    align = _align(job)
    return max(align, (PIECE_ELEMS // max(n, 1)) // align * align)


SMALL_COPY = 1 << 20  # tensors below this, adjacent in source and output, are copied as one run
RUN_BYTES = 16 << 20  # ... of at most this many bytes


def _pieces(sp: ShardPlan, offsets: dict[str, tuple[int, int]]):
    run: list[TensorJob] = []  # small copied tensors contiguous in the source and in the output

    def flush():
        first, last = run[0], run[-1]
        n = last.src.end - first.src.start
        piece = _Piece(first, "copy", first.src.start, n, offsets[first.name][0], last=True, jobs=tuple(run))
        run.clear()
        return piece

    for job in sp.jobs:
        dst0 = offsets[job.name][0]
        if job.action == "copy":
            if run and not (
                job.src.nbytes < SMALL_COPY
                and job.src.start == run[-1].src.end
                and dst0 == offsets[run[-1].name][1]
                and job.src.end - run[0].src.start <= RUN_BYTES
            ):
                yield flush()
            if job.src.nbytes < SMALL_COPY:
                run.append(job)
            else:
                yield _Piece(job, "copy", job.src.start, job.src.nbytes, dst0, last=True, jobs=(job,))
            continue
        if run:
            yield flush()
        if job.action in ("scale", "compute"):
            yield _Piece(job, "emit", 0, 0, dst0, last=True)
            continue
        src = job.src
        if src.numel == 0:  # nothing to read or write; its header entry says [.., 0, ..]
            continue
        experts, m, n, row_bytes = _matrix(job)
        step = _rows_per_piece(job)
        out_item = ITEMSIZE[job.out_dtype]
        for e in range(experts):
            for r0 in range(0, m, step):
                r1 = min(m, r0 + step)
                row = e * m + r0
                yield _Piece(
                    job,
                    "convert",
                    src.start + row * row_bytes,
                    (r1 - r0) * row_bytes,
                    dst0 + row * n * out_item,
                    (e, r0, r1),
                    last=(e == experts - 1 and r1 == m),
                )
    if run:
        yield flush()


def _max_piece_bytes(sp: ShardPlan) -> tuple[int, int]:
    mi = mo = 0
    for job in sp.jobs:
        if job.action in ("dequant", "quant"):
            _, m, n, row_bytes = _matrix(job)
            rows = min(m, _rows_per_piece(job))
            mi = max(mi, rows * row_bytes)
            mo = max(mo, rows * n * ITEMSIZE[job.out_dtype])
    return mi, mo


# ------------------------------------------------------------------------------------------ convert
class _Converter:
    """Turns one piece's input bytes into output bytes on the chosen device."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, scale_fmt: str = "float"):
        self.ckpt = ckpt
        self.device = device
        self.scale_fmt = scale_fmt
        self.readers: dict[str, ShardReader] = {}
        self.scales: dict[str, torch.Tensor] = {}  # dequant: source scale; quant: scales being made

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    def _reader(self, shard: str) -> ShardReader:
        if shard not in self.readers:
            self.readers[shard] = ShardReader(self.ckpt.shards[shard])
        return self.readers[shard]

    def source_scale(self, job: TensorJob) -> torch.Tensor:
        s = self.scales.get(job.name)
        if s is None:
            info = job.scale
            shard = self.ckpt.weight_map[info.name]
            raw = self._reader(shard).read_tensor(info)
            bad = decode.bad_scale(raw)  # checked as stored, so the index is the file's
            if bad is not None:
                idx, value = bad
                raise NonFiniteError(
                    f"scale element {list(idx)} is {value!r}; scales must be finite and > 0",
                    file=self.ckpt.root / shard,
                    tensor=info.name,
                )
            s = decode.scale_grid_tensor(job.weight, raw)
            self.scales = {job.name: s}
        return s

    def prepare(self, piece: _Piece) -> torch.Tensor:
        """Per-tensor state, on the calling thread before the piece is converted: the source scale
        (read and checked once per tensor), or the scale tensor that a quantization fills."""
        job = piece.job
        if job.action == "dequant":
            return self.source_scale(job)
        if piece.rows[:2] == (0, 0):
            self.scales = {job.name: torch.empty(*job.src.shape[:-2], *_grid(job), dtype=scale_dtype(job))}
        return self.scales[job.name]

    def convert(self, piece: _Piece, buf: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> int:
        """Pure work on one piece with the tensor's scales `s` from prepare(); thread-safe, since
        pieces write disjoint slices."""
        job = piece.job
        e, r0, r1 = piece.rows
        n = _matrix(job)[2]
        nbytes_out = (r1 - r0) * n * ITEMSIZE[job.out_dtype]
        bm = job.block[0]
        i0, i1 = r0 // bm, math.ceil(r1 / bm)
        if job.action == "dequant":
            w = job.weight
            q = decode.codes_view(w, buf[: piece.length], r1 - r0)
            dst = (
                out[:nbytes_out]
                .view(DTYPES[job.out_dtype])
                .view(*((n, r1 - r0) if w.transpose else (r1 - r0, n)))
            )
            s2 = s.reshape(-1, *s.shape[-2:])[e, i0:i1]
            if self.device.type != "cpu":
                q = q.to(self.device, non_blocking=True)
            if not w.element.packed:
                _check_codes(q, job, e, r0, self.ckpt)
            decode.dequant_band(w, q, s2, dst)
            if self.device.type != "cpu":
                torch.cuda.current_stream(self.device).synchronize()
            _check_overflow(dst, q, s2, job, e, r0, self.ckpt)
            return nbytes_out
        src = buf[: piece.length].view(job.src.torch_dtype).view(r1 - r0, n)
        dst = out[:nbytes_out].view(DTYPES[job.out_dtype]).view(r1 - r0, n)
        # quant
        if job.quantizer != "block":  # per-channel, MXFP8
            s_rows, finite = quantize_band(job, src, dst, self.device)
            if not finite:
                _check_finite(src, job, e, r0, self.ckpt)
        elif self.device.type == "cpu":
            _, s_rows = weight_quant(src, job.block, self.scale_fmt, out=(dst, None))
            # torch's amax propagates NaN and Inf into the scale: one cheap test per tile instead
            # of isfinite over every element (0.6 GB/s on bf16 here, 4x slower than quantizing).
            if not bool(torch.isfinite(s_rows).all()):
                _check_finite(src, job, e, r0, self.ckpt)
        else:
            xg = src.to(self.device, non_blocking=True)
            _check_finite(xg, job, e, r0, self.ckpt)
            qg, sg = weight_quant(xg, job.block, self.scale_fmt)
            dst.view(torch.uint8).copy_(qg.view(torch.uint8), non_blocking=True)
            s_rows = sg.cpu()
        s.reshape(-1, *s.shape[-2:])[e, i0:i1] = s_rows
        return nbytes_out

    def emit(self, weight_job: TensorJob) -> bytes:
        s = self.scales.pop(weight_job.name)
        return s.contiguous().view(torch.uint8).numpy().tobytes()


def _checksum_run(fd: int, offset: int, length: int, spans) -> None:
    data = memoryview(os.pread(fd, length, offset))
    if len(data) != length:
        raise OSError(errno.EIO, "source ended early (file shrank while being read)")
    for start, n, h in spans:
        h.update(data[start : start + n])


def _grid(job: TensorJob) -> tuple[int, int]:
    m, n = job.src.shape[-2:]
    return math.ceil(m / job.block[0]), math.ceil(n / job.block[1])


def _first_bad(mask: torch.Tensor, job: TensorJob, e: int, r0: int) -> list[int]:
    r, c = (int(i) for i in mask.nonzero()[0])
    lead: list[int] = []
    for d in reversed(job.src.shape[:-2]):  # the expert number, back to every leading index
        lead.insert(0, e % d)
        e //= d
    return lead + [r0 + r, c]


def _check_codes(q: torch.Tensor, job: TensorJob, e: int, r0: int, ckpt: Checkpoint) -> None:
    b = q.view(torch.uint8)
    # NaN/Inf codes are the largest bytes seen as int8 (positive) or as uint8 (negative): two max
    # reductions over the flat band, vectorised (over 100 GB/s here; a masked compare ran at 0.8).
    # On a GPU the masked compare is microseconds and one sync; there the two CPU reductions, single-
    # threaded in the converter, cost more than the whole conversion (measured on an H100 machine).
    lowest = 0x7F if q.dtype == torch.float8_e4m3fn else 0x7C  # e5m2: exponent all ones
    flat = b.reshape(-1)
    if not b.is_cuda and int(flat.view(torch.int8).max()) < lowest and int(flat.max()) < lowest + 0x80:
        return
    bad = (b & lowest) == lowest
    if bool(bad.any()):
        raise NonFiniteError(
            f"FP8 NaN/Inf code at element {_first_bad(bad, job, e, r0)}",
            file=ckpt.root / ckpt.weight_map[job.name],
            tensor=job.name,
        )


_FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
_FP4_MAX = 6.0  # the largest e2m1 magnitude
_DTYPE_FLAGS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def _check_overflow(
    y: torch.Tensor, q: torch.Tensor, s: torch.Tensor, job: TensorJob, e: int, r0: int, ckpt: Checkpoint
) -> None:
    """No Inf from finite input: a dequantized band `y` (codes `q`, the band's scales `s`) whose
    values overflow the output dtype is refused (exit 4). Codes are finite (checked before) and
    scales finite and > 0, so only overflow can make a non-finite value, and it cannot happen when
    the largest code times the band's largest scale fits: one reduction over the scales (tiles,
    not elements) on the common path; the element check runs only when that bound is exceeded."""
    top = torch.finfo(y.dtype).max
    packed = job.weight is not None and job.weight.element.packed
    smax = float(scale_to_float32(s).max() if s.dtype == torch.uint8 else s.max()) if s.numel() else 0.0
    bound = (_FP4_MAX if packed else _FP8_MAX[job.src.dtype]) * smax
    if bound < top:
        return
    bad = torch.isinf(y)
    if not bool(bad.any()):
        return
    flag = _DTYPE_FLAGS.get(job.out_dtype, job.out_dtype)
    if packed:  # FP4 codes: two a byte, the output maybe transposed; name the bound, not an element
        raise NonFiniteError(
            f"dequantized values overflow {flag} (largest finite {top:.6g}; the band's largest scale is "
            f"{smax:.6g}, times the largest FP4 code {_FP4_MAX:g})",
            file=ckpt.root / ckpt.weight_map[job.name],
            tensor=job.name,
            hint="rerun with --dtype fp32, which holds it" if flag != "fp32" else None,
        )
    idx = _first_bad(bad.cpu(), job, e, r0)
    r, c = idx[-2] - r0, idx[-1]
    code = float(q[r, c].float())
    scale = float(s.reshape(-1, s.shape[-1])[r // job.block[0], c // job.block[1]])
    exact = code * scale
    if abs(exact) < torch.finfo(torch.float32).max and flag != "fp32":
        hint = "rerun with --dtype fp32, which holds it"
    else:
        hint = "no output dtype holds it: the scale is wrong; fix or re-download the checkpoint"
    raise NonFiniteError(
        f"dequantized value {exact:.6g} (code {code:g} x scale {scale:.6g}) at element {idx} "
        f"overflows {flag} (largest finite {top:.6g})",
        file=ckpt.root / ckpt.weight_map[job.name],
        tensor=job.name,
        hint=hint,
    )


def _check_finite(x: torch.Tensor, job: TensorJob, e: int, r0: int, ckpt: Checkpoint) -> None:
    ok = torch.isfinite(x)
    if not bool(ok.all()):
        idx = _first_bad((~ok).cpu(), job, e, r0)
        val = float(x[idx[-2] - r0, idx[-1]])
        raise NonFiniteError(
            f"weight holds {val} at element {idx}; NaN and Inf cannot be quantized",
            file=ckpt.root / ckpt.weight_map[job.name],
            tensor=job.name,
        )


# ------------------------------------------------------------------------------------------ a shard
class _ShardWriter:
    """One output shard through the read -> convert -> write pipeline, into a temporary file."""

    def __init__(
        self,
        ckpt: Checkpoint,
        sp: ShardPlan,
        out: OutputDir,
        conv: _Converter,
        progress: Progress,
        stages: _Stages | None = None,
        layout: _ShardLayout | None = None,
        shard_no: int = 0,
    ) -> None:
        self.ckpt, self.sp, self.out, self.conv, self.progress = ckpt, sp, out, conv, progress
        self.layout = layout or _ShardLayout(sp, "")
        self.shard_no = shard_no
        # The content checksum, while written: one CRC-32 per tensor, fed in order from this thread
        # (pieces of a tensor finish in order) and run on hasher threads (hashlib releases the GIL);
        # a tensor always goes to the same hasher, so its updates stay in order.
        self.digests = {j.name: Crc32() for j in sp.jobs}
        self.hashers = 1 if conv.device.type != "cuda" else 2
        self.slot = {j.name: i % self.hashers for i, j in enumerate(sp.jobs)}
        self.stages = stages or _Stages({})
        self.reader = conv._reader(sp.name)
        pin = conv.device.type == "cuda"
        # CPU: one single-threaded converter per core beats torch's intra-op threads on pieces this
        # size (OpenMP fork/join per elementwise op); GPU: one, the card does the work.
        self.workers = 1 if pin else CPU_WORKERS
        self.writers = GPU_WRITERS if pin else CPU_WRITERS
        self.max_writes = max(POOL, self.writers)
        in_size, out_size = _max_piece_bytes(sp)
        self.in_pool = [
            torch.empty(in_size, dtype=torch.uint8, pin_memory=pin) for _ in range(POOL + self.workers)
        ]
        self.out_pool = [
            torch.empty(out_size, dtype=torch.uint8, pin_memory=pin)
            for _ in range(self.max_writes + self.workers)
        ]
        self.reads: deque[tuple[_Piece, torch.Tensor | None, Future | None]] = deque()
        self.converting: deque[tuple[_Piece, torch.Tensor, torch.Tensor, Future]] = deque()
        self.writes: deque[tuple[Future, torch.Tensor | None]] = deque()
        self.fd = -1
        # Bytes written since the last writeback hint, and the file range they lie in (writes are
        # nearly in file order; a scale tensor emitted after its weight may lie before it).
        self.unhinted = 0
        self.hint_lo = self.hint_hi = 0
        self.hint_lock = threading.Lock()

    # -- the I/O threads' work (the header's pwrite runs before the writer threads start)
    def _read(self, buf: torch.Tensor, offset: int, tensor: str) -> None:
        with self.stages("read"):
            self.reader.read_into(buf, offset, tensor)

    def _convert(self, piece: _Piece, buf: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> int:
        with self.stages("convert"):
            return self.conv.convert(piece, buf, out, s)

    def _written(self, off: int, n: int) -> None:
        """Count n bytes written at off; past WRITEBACK_CHUNK, hint the range to the kernel."""
        with self.hint_lock:  # the writer threads share the count
            if self.unhinted == 0:
                self.hint_lo, self.hint_hi = off, off + n
            else:
                self.hint_lo, self.hint_hi = min(self.hint_lo, off), max(self.hint_hi, off + n)
            self.unhinted += n
            if self.unhinted < WRITEBACK_CHUNK:
                return
            lo, hi = self.hint_lo, self.hint_hi
            self.unhinted = 0
        start_writeback(self.fd, lo, hi - lo)

    def _pwrite(self, data, dst_off: int, job: TensorJob | None, advance: int = 0) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        with self.stages("write"):
            try:
                while pos < len(view):
                    pos += os.pwrite(self.fd, view[pos:], dst_off + pos)
            except OSError as e:
                raise io_error(e, self.out.root / self.sp.name, "writing", job.name if job else None) from e
            self._written(dst_off, len(view))
        if advance:
            self.progress.advance(advance)

    def _copy(self, piece: _Piece) -> None:
        with self.stages("write"):
            try:
                copy_range(self.reader._fd, self.fd, piece.src_off, piece.length, piece.dst_off)
            except OSError as e:
                raise io_error(e, self.out.root / self.sp.name, "copying tensor data", piece.job.name) from e
            self._written(piece.dst_off, piece.length)
        self.progress.advance(piece.length)

    def _hash(self, job: TensorJob, data) -> Future:
        """Queue bytes of `job` (a buffer, or ('range', fd, offset, length)) for its tensor's hash."""
        h = self.digests[job.name]
        if isinstance(data, tuple):
            _, fd, off, n = data
            return self.hs[self.slot[job.name]].submit(hash_range, fd, off, n, h)
        return self.hs[self.slot[job.name]].submit(h.update, data)

    # -- bookkeeping on the calling thread
    def _reclaim(self) -> None:
        f, b, h = self.writes.popleft()
        f.result()
        if h is not None:
            h.result()  # the buffer goes back to the pool only once hashed too
        if b is not None:
            self.out_pool.append(b)

    def _submit_write(self, fn, *args, buf=None, hashed=None) -> None:
        while len(self.writes) >= self.max_writes:
            self._reclaim()
        self.writes.append((self.wr.submit(fn, *args), buf, hashed))

    def _submit_read(self, piece: _Piece) -> None:
        if piece.kind == "convert":
            buf = self.in_pool.pop()
            f = self.rd.submit(self._read, buf[: piece.length], piece.src_off, piece.job.name)
            self.reads.append((piece, buf, f))
        else:
            self.reads.append((piece, None, None))

    def _finish_convert(self, summary: Summary) -> None:
        piece, buf, obuf, f = self.converting.popleft()
        n = f.result()
        self.in_pool.append(buf)
        data = obuf[:n].numpy()
        hashed = self._hash(piece.job, data)
        self._submit_write(
            self._pwrite, data, piece.dst_off, piece.job, piece.length, buf=obuf, hashed=hashed
        )
        if piece.last:
            summary.tensors_converted += 1

    def _step(self, summary: Summary) -> None:
        piece, buf, f = self.reads.popleft()
        job = piece.job
        if piece.kind == "copy":
            # copied file to file in the kernel; checksummed from the source range (in the page
            # cache after the copy), which copy_file_range reproduces exactly
            if len(piece.jobs) == 1:
                hashed = self._hash(job, ("range", self.reader._fd, piece.src_off, piece.length))
            else:  # a run of small tensors: one read, one checksum per tensor
                spans = [
                    (j.src.start - piece.src_off, j.src.nbytes, self.digests[j.name]) for j in piece.jobs
                ]
                hashed = self.hs[self.slot[job.name]].submit(
                    _checksum_run, self.reader._fd, piece.src_off, piece.length, spans
                )
            self._submit_write(self._copy, piece, hashed=hashed)
            summary.tensors_copied += len(piece.jobs)
            return
        if piece.kind == "emit":  # the scales are complete once every piece before is converted
            while self.converting:
                self._finish_convert(summary)
            data = job.compute() if job.action == "compute" else self.conv.emit(self.weight_job)
            self._submit_write(self._pwrite, data, piece.dst_off, job, hashed=self._hash(job, data))
            return
        f.result()
        while len(self.converting) >= self.workers:
            self._finish_convert(summary)
        while not self.out_pool:
            self._reclaim()
        obuf = self.out_pool.pop()
        state = self.conv.prepare(piece)
        self.converting.append((piece, buf, obuf, self.cv.submit(self._convert, piece, buf, obuf, state)))
        self.weight_job = job

    def run(self, summary: Summary) -> None:
        prefix, offsets = self.layout.prefix, self.layout.offsets
        self.fd, tmp = self.out.open_tmp(self.sp.name)
        self.rd = ThreadPoolExecutor(1, thread_name_prefix="fp8conv-read")
        self.wr = ThreadPoolExecutor(self.writers, thread_name_prefix="fp8conv-write")
        self.cv = ThreadPoolExecutor(self.workers, thread_name_prefix="fp8conv-convert")
        self.hs = [ThreadPoolExecutor(1, thread_name_prefix="fp8conv-hash") for _ in range(self.hashers)]
        ok = False
        try:
            self._pwrite(prefix, 0, None)
            for piece in _pieces(self.sp, offsets):
                self._submit_read(piece)
                if len(self.reads) >= POOL:
                    self._step(summary)
            _fault_point("mid_shard", self.shard_no, self.settle)
            while self.reads:
                self._step(summary)
            while self.converting:
                self._finish_convert(summary)
            while self.writes:
                self._reclaim()
            # the header's placeholder becomes the content hash (same length, same offsets)
            digest = shard_digest(prefix, [self.digests[j.name].digest() for j in self.sp.jobs])
            final = prefix.replace(hash_field(HASH_PLACEHOLDER), hash_field(digest), 1)
            self._pwrite(final, 0, None)
            os.close(self.fd)
            self.fd = -1
            ok = True
        except KeyboardInterrupt:
            raise Interrupted(2) from None
        finally:
            for f, _, _ in self.writes:
                f.cancel()
            for _, _, f in self.reads:
                if f is not None:
                    f.cancel()
            for *_, f in self.converting:
                f.cancel()
            self.cv.shutdown(wait=True)
            self.rd.shutdown(wait=True)
            self.wr.shutdown(wait=True)
            for h in self.hs:
                h.shutdown(wait=True)
            if self.fd >= 0:
                os.close(self.fd)
            if not ok:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass
        header = self.ckpt.shards[self.sp.name]
        moved = sum(j.src.nbytes for j in self.sp.jobs if j.src is not None)
        self.progress.advance(header.file_size - moved)
        summary.bytes_in += header.file_size
        summary.bytes_out += tmp.stat().st_size
        return tmp


def _write_shard(
    ckpt: Checkpoint,
    sp: ShardPlan,
    out: OutputDir,
    device: torch.device,
    scale_fmt: str,
    summary: Summary,
    progress: Progress,
    previous: Future | None = None,
    stages: _Stages | None = None,
    layout: _ShardLayout | None = None,
    shard_no: int = 0,
) -> Path:
    """Write one shard completely into its temporary file; the caller commits it (`previous` is the
    commit still running for the shard before)."""
    conv = _Converter(ckpt, device, scale_fmt)
    writer = _ShardWriter(ckpt, sp, out, conv, progress, stages, layout, shard_no)
    writer.settle = (lambda: previous.result()) if previous is not None else None
    try:
        return writer.run(summary)
    finally:
        conv.close()


def _commit_shard(
    out: OutputDir,
    tmp: Path,
    name: str,
    progress: Progress,
    stages: _Stages | None = None,
    shard_no: int = 0,
) -> None:
    """fsync + rename; runs beside the next shard's conversion (the fsync of a 1 GB shard is seconds
    of disk time that the pipeline would otherwise wait out). No separate record: the shard's own
    header says which job wrote it and what its content hashes to."""
    with (stages or _Stages({}))("commit"):
        out.commit(tmp, name)
    progress.shard_done(name)
    _fault_point("after_shard", shard_no)
