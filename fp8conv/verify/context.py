"""What every check sees: the scanned checkpoint (and reference), the options, the findings being
collected, and positional reads of tensor bytes; and the two kinds of check.

A `Check` has a name and a `run(ctx)` over headers and config (structure). A `TensorCheck` is a check
over tensor data: the verifier streams each tensor it applies to once, in row bands of whole tiles,
and hands every band to every data check of that tensor (`begin` / `band` / `end`); `finish(ctx)` runs
once all tensors are done. Checks write their results into `ctx.out` (records and findings).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import ShardReader, TensorInfo
from fp8conv.verify.layouts import Roles, classify, quant_method, quantization_config
from fp8conv.verify.report import Finding, Findings, TensorRecord
from fp8conv.verify.scan import Scan


class Context:
    def __init__(self, scan: Scan, ref: Checkpoint | None, opts, device: torch.device, progress) -> None:
        self.scan = scan
        self.ckpt = scan.ckpt
        self.unreadable = scan.unreadable
        self.roles: Roles = classify(self.ckpt, self.unreadable)
        self.qc = quantization_config(self.ckpt.config)
        self.method = quant_method(self.ckpt)
        self.ref = ref
        self.ref_roles: Roles | None = classify(ref) if ref is not None else None
        self.ref_qc = quantization_config(ref.config) if ref is not None else None
        found = self.ref_roles.detection if self.ref_roles is not None else None
        # the reference's packed FP4 weights by the name a dequantized output gives them
        self.ref_fp4 = (
            {qw.out_name: qw for qw in found.weights.values() if qw.element.packed}
            if found is not None
            else {}
        )
        self.opts = opts
        self.device = device
        self.progress = progress
        self.out = Findings()
        for f in scan.findings:
            self.out.add(f)
        # FP8 weight -> (block, scale info, scheme), filled by the structure check of scales
        self.usable: dict[str, tuple[tuple[int, int], TensorInfo, str]] = {}
        self.heavy: set[str] = set()  # tensors chosen for the costly data checks (--tensors/--sample)
        self.streamed: list[str] = []  # every tensor whose data is read, in file order
        self.reference_mode: str | None = None
        self.serving = None  # fp8conv.targets.ServingReport, when asked for
        self.bytes_read = 0
        # per tensor of the checkpoint: the CRC-32 of its bytes as the data checks read them, front to
        # back ([bytes covered so far, Crc32, its lock]): the shard checksum reads only what they did not
        self.crcs: dict[str, list] = {}
        self._readers: dict[tuple[int, str], ShardReader] = {}
        self._paths: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------- results
    def fail(self, check: str, message: str, file=None, tensor=None, status: str = "fail") -> None:
        self.out.add(Finding(check, status, message, None if file is None else str(file), tensor))

    def record(self, name: str, role: str | None = None, ckpt: Checkpoint | None = None) -> TensorRecord:
        rec = self.out.records.get(name)
        if rec is not None:
            return rec
        ckpt = ckpt or self.ckpt
        info = ckpt.info(name)
        return self.out.record(
            name, self.shard_path(ckpt, name), info.shape, info.dtype, role or self.roles.role(name)
        )

    def shard_path(self, ckpt: Checkpoint, name: str) -> str:
        """The path of the shard holding `name`, as text (one Path join per shard, not per tensor)."""
        shard = ckpt.weight_map[name]
        key = (id(ckpt), shard)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = str(ckpt.root / shard)
        return path

    # ------------------------------------------------------------------------------------ reads
    def reader(self, ckpt: Checkpoint, name: str) -> ShardReader:
        shard = ckpt.weight_map[name]
        key = (id(ckpt), shard)
        with self._lock:
            r = self._readers.get(key)
            if r is None:
                r = self._readers[key] = ShardReader(ckpt.shards[shard])
            return r

    def read(
        self,
        ckpt: Checkpoint,
        info: TensorInfo,
        start: int = 0,
        length: int | None = None,
        count: bool = True,
    ) -> torch.Tensor:
        raw = self.reader(ckpt, info.name).read_bytes(info, start, length)
        if ckpt is self.ckpt:
            self._crc(info, start, raw)
        if not count:  # a second read of bytes already counted (a light tensor's closer look)
            return raw
        with self._lock:
            self.bytes_read += raw.numel()
            if self.progress is not None and ckpt is self.ckpt:
                self.progress.advance(raw.numel())
        return raw

    def _crc(self, info: TensorInfo, start: int, raw: torch.Tensor) -> None:
        """Extend the tensor's CRC-32 with `raw` when it continues the bytes hashed so far (a tensor's
        bands are read in order by one worker; a second look at bytes already hashed is not added)."""
        from fp8conv.checkpoint.output import Crc32

        with self._lock:
            state = self.crcs.get(info.name)
            if state is None:
                state = self.crcs[info.name] = [0, Crc32(), threading.Lock()]
        with state[2]:  # claim and hash together: segments go in in file order, whatever the threads
            if state[0] != start:
                return
            state[1].update(raw.numpy())
            state[0] = start + raw.numel()

    def crc_digests(self) -> dict[tuple[int, int], bytes]:
        """(start, end) in its file -> CRC-32 digest, for every tensor whose bytes were all read."""
        out = {}
        for name, (done, crc, _) in self.crcs.items():
            info = self.ckpt.info(name)
            if done == info.nbytes:
                out[(info.start, info.start + info.nbytes)] = crc.digest()
        return out

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


class Check:
    """A check over headers and config: a name, and a run that adds records and findings."""

    name = ""

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


@dataclass
class TensorData:
    """One tensor being streamed: its geometry, its scales (read once), and its reference tensor."""

    name: str
    info: TensorInfo
    lead: tuple[int, ...]
    m: int
    k: int
    align: int = 1  # band rows are a multiple of this (the scale's tile rows)
    block: tuple[int, int] | None = None  # FP8: the scale's tile
    scales: torch.Tensor | None = None  # FP8: float32 [experts, tile rows, tile columns]
    ref_info: TensorInfo | None = None
    ref_block: tuple[int, int] | None = None  # FP8 reference: its scale's tile
    ref_scales: torch.Tensor | None = None
    state: dict = field(default_factory=dict)  # per-check scratch, keyed by check name
    rec: TensorRecord | None = None

    def record(self, ctx: Context) -> TensorRecord:
        """This tensor's record, made on first use (a passing light tensor gets none: bounded memory)."""
        if self.rec is None:
            self.rec = ctx.record(self.name)
        return self.rec

    @property
    def experts(self) -> int:
        return math.prod(self.lead)

    @property
    def stacked(self) -> bool:
        return len(self.lead) == 1


@dataclass
class Band:
    """Rows r0:r1 of expert e: the bytes of CKPT's tensor, and the reference's on demand."""

    ctx: Context
    t: TensorData
    e: int
    r0: int
    r1: int
    raw: torch.Tensor  # uint8
    _ref: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    def values(self) -> torch.Tensor:
        return self.raw.view(self.t.info.torch_dtype).reshape(self.rows, self.t.k)

    def ref_values(self) -> torch.Tensor:
        if self._ref is None:
            r = self.t.ref_info
            isz = r.nbytes // max(r.numel, 1)
            start = (self.e * self.t.m + self.r0) * self.t.k * isz
            self._ref = self.ctx.read(self.ctx.ref, r, start, self.rows * self.t.k * isz)
        return self._ref.view(self.t.ref_info.torch_dtype).reshape(self.rows, self.t.k)

    def tile_rows(self, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        """The rows of a [experts, tile rows, tile columns] scale grid that cover this band."""
        bm = block[0]
        return scales[self.e, self.r0 // bm : math.ceil(self.r1 / bm)]

    def where(self, row: int, col: int) -> str:
        """'r, c', 'expert e, r, c' or 'i, j, r, c' (every leading index) of an element of this band;
        the flat index of a 0-D or 1-D tensor."""
        if len(self.t.info.shape) < 2:
            return str(col)
        return position((*unravel(self.e, self.t.lead), self.r0 + row, col), self.t.stacked)


def unravel(flat: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(dims):
        flat, i = divmod(flat, max(d, 1))
        out.append(i)
    return tuple(reversed(out))


def scale_grid(s: torch.Tensor, use, experts: int) -> torch.Tensor:
    """A stored scale (float32) broadcast to one value per tile, as [experts, tile rows, tile columns]:
    reshaped to the layout's view, expanded to its grid (formats' ScaleLayout rule)."""
    *_, gm, gn = use.grid
    return s.reshape(use.view).expand(use.grid).reshape(experts, gm, gn).contiguous()


def position(idx: tuple[int, ...], stacked: bool) -> str:
    if stacked:
        return f"expert {idx[0]}, " + ", ".join(map(str, idx[1:]))
    return ", ".join(map(str, idx))


class TensorCheck(Check):
    """A check over tensor data, fed band by band by the verifier (see the module docstring)."""

    def applies(self, ctx: Context, t: TensorData) -> bool:
        raise NotImplementedError

    def begin(self, ctx: Context, t: TensorData) -> None:
        pass

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        pass

    def end(self, ctx: Context, t: TensorData) -> None:
        pass

    def finish(self, ctx: Context) -> None:
        pass

    def run(self, ctx: Context) -> None:  # data checks run through the verifier's stream
        raise TypeError(f"{type(self).__name__} is a data check: the verifier streams tensors into it")
