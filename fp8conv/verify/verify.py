"""`fp8conv verify`: is this FP8 (or dequantized) checkpoint what it claims to be, and does it compute?

The verifier runs a list of checks (docs/verify.md lists each one, its bound and why):

* structure (fp8conv/verify/structure.py), from headers, config.json and side files, over every tensor;
* numerics (fp8conv/verify/numerics.py), over tensor data: non-finite values in every float tensor,
  NaN codes, scale values, and a GEMM through the product's own kernels;
* comparison with --reference (fp8conv/verify/compare.py): exact re-quantization or statistics for an
  FP8 CKPT, bit equality for a dequantized one, byte equality for everything else.

Tensor data is streamed once per tensor in row bands (fp8conv/verify/stream.py). The library never
prints: the CLI renders the `VerifyReport` (report.py's render_table / summary_line) and maps `ok` to
exit 0 / 1.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

from fp8conv.checkpoint.layout import open_checkpoint
from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES
from fp8conv.errors import InvalidCheckpoint, ResourceError, UsageError
from fp8conv.kernels import resolve_device
from fp8conv.text import first_match
from fp8conv.verify.compare import (
    DEFAULT_MIN_SQNR,
    REFERENCE_MODES,
    TILE_GAIN_TOL,
    DequantizedComparison,
    Fp4DequantizedComparison,
    OriginalComparison,
    ReferenceNames,
    SameBytes,
)
from fp8conv.verify.context import Check, Context, TensorCheck
from fp8conv.verify.layouts import describe_format
from fp8conv.verify.numerics import FiniteValues, Gemm, NanCodes, ScaleValues, gemm_bound
from fp8conv.verify.report import (
    Finding,
    Outcome,
    TensorRecord,
    VerifyReport,
    render_table,
    summary_line,
    worst_first,
)
from fp8conv.verify.scan import paused_gc, scan_checkpoint
from fp8conv.verify.stream import stream
from fp8conv.verify.structure import STRUCTURE_CHECKS, ShardChecksums

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class VerifyOptions:
    """What `verify_checkpoint` checks; validated on construction (UsageError, exit 2)."""

    reference: str | None = None  # the source checkpoint folder
    tensors: tuple[str, ...] = ()  # globs or re:REGEX; data checks only for matching tensors
    sample: int | None = None  # data checks for N tensors picked at random (seeded)
    rows: int = 16  # M of the GEMM check's random activations
    seed: int = 0
    min_sqnr: float = DEFAULT_MIN_SQNR  # dB, --reference with an FP8 CKPT, statistical mode
    device: str = "auto"
    experts: int = 8  # stacked [E, N, K] weights: GEMM on a seeded sample of this many (0 = all)
    reference_mode: str = "auto"  # FP8 CKPT vs original: auto | exact | statistical
    # will it load and run there (fp8conv.targets): TP sizes, expert parallelism, loaders, Blackwell
    tp: tuple[int, ...] = ()
    ep: bool = False
    targets: tuple[str, ...] | None = None
    blackwell: bool = False

    @property
    def serving(self) -> bool:
        return bool(self.tp) or self.ep or self.targets is not None or self.blackwell

    def __post_init__(self) -> None:
        if self.reference is not None:
            object.__setattr__(self, "reference", str(self.reference))
        tensors = (self.tensors,) if isinstance(self.tensors, str) else tuple(self.tensors or ())
        object.__setattr__(self, "tensors", tensors)
        for p in tensors:
            if not p:
                raise UsageError("--tensors pattern is empty")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise UsageError(f"--tensors {p!r}: bad regular expression ({e})") from None
        if self.sample is not None and (isinstance(self.sample, bool) or int(self.sample) < 1):
            raise UsageError(f"--sample must be a positive number of tensors, not {self.sample!r}")
        if not 1 <= int(self.rows) <= 65536:
            raise UsageError(f"--rows must be between 1 and 65536, not {self.rows!r}")
        if int(self.seed) < 0:
            raise UsageError(f"--seed must be >= 0, not {self.seed!r}")
        if not math.isfinite(float(self.min_sqnr)):
            raise UsageError(f"--min-sqnr must be a finite number of dB, not {self.min_sqnr!r}")
        if int(self.experts) < 0:
            raise UsageError(f"--experts must be >= 0 (0 = all), not {self.experts!r}")
        if not _DEVICE_RE.match(str(self.device).strip().lower()):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        tp = tuple(self.tp or ())
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in tp):
            raise UsageError(f"--tp wants positive integers, not {list(tp)!r}")
        object.__setattr__(self, "tp", tp)
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.reference_mode not in REFERENCE_MODES:
            raise UsageError(
                f"--reference-mode must be one of {', '.join(REFERENCE_MODES)}, not {self.reference_mode!r}"
            )

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "tensors": list(self.tensors),
            "sample": self.sample,
            "rows": self.rows,
            "seed": self.seed,
            "min_sqnr": self.min_sqnr,
            "device": self.device,
            "experts": self.experts,
            "reference_mode": self.reference_mode,
            "tp": list(self.tp),
            "ep": self.ep,
            "targets": None if self.targets is None else list(self.targets),
            "blackwell": self.blackwell,
        }


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return first_match(name, patterns) is not None


# ---------------------------------------------------------------------------------------- selection
def select(ctx: Context) -> None:
    """ctx.heavy: the tensors for the costly data checks (FP8 weights; with an FP8 reference, the
    weights it quantized; in a plain checkpoint without reference, the 2-D+ float tensors), narrowed
    by --tensors and --sample. ctx.streamed: those plus every other tensor whose data is checked
    anyway (float tensors for non-finite values; with --reference, tensors both hold), narrowed by
    --tensors only, in file order."""
    opts, ckpt, roles = ctx.opts, ctx.ckpt, ctx.roles
    names = ckpt.weight_map
    ref_fp8 = ctx.ref_roles.fp8 if ctx.ref_roles is not None else {}
    cands = set(roles.fp8) | {n for n in ref_fp8 if n in names} | {n for n in ctx.ref_fp4 if n in names}
    if not cands and ctx.ref is None:
        cands = {n for n in roles.unquantized if len(ckpt.info(n).shape) >= 2}
    if opts.tensors:
        if not any(matches(n, opts.tensors) for n in (*names, *ctx.unreadable)):
            raise UsageError(f"--tensors {' '.join(opts.tensors)} matches no tensor of the checkpoint")
        cands = {n for n in cands if matches(n, opts.tensors)}
    chosen = sorted(cands)
    if opts.sample is not None and opts.sample < len(chosen):
        chosen = sorted(random.Random(opts.seed).sample(chosen, opts.sample))
    ctx.heavy = set(chosen)
    streamed = []
    for n in names:
        if n in cands and n not in ctx.heavy:
            continue
        if opts.tensors and not matches(n, opts.tensors):
            continue
        if n in ctx.heavy or ckpt.info(n).dtype in FLOAT_DTYPES or (ctx.ref is not None and n in ctx.ref):
            streamed.append(n)
    order = {s: i for i, s in enumerate(ckpt.shards)}
    streamed.sort(key=lambda n: (order[names[n]], ckpt.info(n).start))
    ctx.streamed = streamed


def planned_bytes(ctx: Context) -> int:
    """Bytes of CKPT the data checks will read (the progress total)."""
    total = sum(ctx.ckpt.info(n).nbytes for n in ctx.streamed)
    return total + sum(ctx.usable[n].scale.nbytes for n in ctx.heavy if n in ctx.usable)


def data_checks() -> list[TensorCheck]:
    return [
        FiniteValues(),
        NanCodes(),
        ScaleValues(),
        Gemm(),
        OriginalComparison(),
        DequantizedComparison(),
        Fp4DequantizedComparison(),
        SameBytes(),
    ]


def structure_checks() -> list[Check]:
    return [c() for c in STRUCTURE_CHECKS] + [ReferenceNames()]


# ------------------------------------------------------------------------------------------- report
def build_report(ctx: Context, note: str | None, seconds: float, ref_format: str | None) -> VerifyReport:
    fmt, description = describe_format(ctx.ckpt, ctx.roles)
    records = worst_first(ctx.out.records.values())
    findings = ctx.out.findings
    totals = {
        "tensors": len(ctx.ckpt.weight_map),
        "unreadable_tensors": len(ctx.unreadable),
        "fp8_weights": len(ctx.roles.fp8),
        "selected": len(ctx.heavy),
        "data_checked": len(ctx.streamed),
        "records": len(records),
        "failed_tensors": sum(not r.ok for r in records),
        "warned_tensors": sum(r.ok and r.status == "warn" for r in records),
        "failed_checks": sum(c.status == "fail" for r in records for c in r.checks.values()),
        "file_failures": sum(f.status == "fail" for f in findings),
        "file_warnings": sum(f.status == "warn" for f in findings),
        "bytes_read": ctx.bytes_read,
    }
    bounds = {
        "gemm_rule": "1e-3" if ctx.device.type == "cuda" else "max(1e-5, 4*sqrt(K)*2^-24)",
        "min_sqnr_db": ctx.opts.min_sqnr,
        "tile_gain_tol": TILE_GAIN_TOL,
    }
    return VerifyReport(
        path=str(ctx.ckpt.root),
        format=fmt,
        description=description,
        reference=ctx.opts.reference,
        reference_format=ref_format,
        reference_mode=ctx.reference_mode,
        device=str(ctx.device),
        device_note=note,
        options=ctx.opts.to_dict(),
        bounds=bounds,
        tensors=records,
        findings=findings,
        totals=totals,
        seconds=seconds,
        serving=getattr(ctx, "serving", None),
    )


def _open_reference(path: str):
    try:
        return open_checkpoint(path)
    except InvalidCheckpoint as e:
        raise InvalidCheckpoint(f"--reference: {e.rule}", file=e.file, tensor=e.tensor, hint=e.hint) from None
    except PermissionError as e:
        raise ResourceError(f"--reference: cannot read: {e.strerror or e}", file=path) from None
    except (OSError, RuntimeError, RecursionError) as e:  # link loops, nesting bombs
        raise InvalidCheckpoint(f"--reference: cannot be read as a checkpoint ({e})", file=path) from None


def verify_checkpoint(path, options: VerifyOptions | None = None, progress=None) -> VerifyReport:
    """Check a checkpoint folder; return the report (report.ok says pass / fail).

    Raises UsageError (exit 2) for bad options, InvalidCheckpoint (exit 3) when `path` (or the
    reference) is not a checkpoint folder at all, ResourceError (exit 5) for I/O failures. Structural
    damage inside a checkpoint folder is not raised: it is reported (report.ok False, exit 1).
    `progress` takes the converters' callbacks (fp8conv.convert.engine.Progress)."""
    opts = options or VerifyOptions()
    t0 = time.monotonic()
    device, note = resolve_device(opts.device)
    with paused_gc():
        scan = scan_checkpoint(path)
    if scan.refusals:
        first = scan.refusals[0]
        raise InvalidCheckpoint(
            first.message,
            file=first.file,
            tensor=first.tensor,
            hint=f"{len(scan.refusals)} such problem(s); verify reads regular files inside the folder "
            "and JSON nested no deeper than Python's parser allows",
        )
    with paused_gc():
        ref = _open_reference(opts.reference) if opts.reference is not None else None
    with paused_gc():
        ctx = Context(scan, ref, opts, device, progress)
        ref_format = describe_format(ref, ctx.ref_roles)[0] if ref is not None else None
    checks = data_checks()
    try:
        with paused_gc():
            for c in structure_checks():
                c.run(ctx)
            select(ctx)
        if progress is not None:
            progress.start(planned_bytes(ctx), len(scan.ckpt.shards), str(device))
            if note:
                progress.note(note)
        stream(ctx, checks, ctx.streamed)
        for c in checks:
            c.finish(ctx)
        ShardChecksums().run(ctx)
        if opts.serving:
            from fp8conv import targets

            sizes = opts.tp or (targets.DEFAULT_TP if opts.ep else ())
            ctx.serving = targets.serving_report(
                scan.ckpt, sizes, opts.ep, opts.targets, opts.blackwell, opts.device
            )
    finally:
        ctx.close()
        if progress is not None:
            progress.close()
    return build_report(ctx, note, time.monotonic() - t0, ref_format)


__all__ = [
    "Finding",
    "Outcome",
    "TensorRecord",
    "VerifyOptions",
    "VerifyReport",
    "gemm_bound",
    "render_table",
    "summary_line",
    "verify_checkpoint",
]
