"""Orchestration: plan a conversion from the source's headers, then run it.

`quantize` and `dequantize` take a folder, a Hugging Face cache snapshot or a repo id as SRC
(fp8conv/checkpoint/source.py), refuse a job that would convert nothing before anything is written,
and, with `dry_run=True`, return the plan and write nothing. torch is imported when a job runs,
not when this package is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

from fp8conv.convert.options import DequantizeOptions, QuantizeOptions
from fp8conv.convert.progress import NoProgress, TqdmProgress
from fp8conv.errors import InvalidCheckpoint

if TYPE_CHECKING:
    from fp8conv.checkpoint.layout import Checkpoint
    from fp8conv.convert.engine import Progress, Summary
    from fp8conv.convert.fp8_to_fp8 import ConvertOptions, ConvertPlan
    from fp8conv.convert.plan import Plan

__all__ = [
    "ConvertOptions",
    "convert",
    "plan_for_convert",
    "DequantizeOptions",
    "Plan",
    "Progress",
    "ProgressArg",
    "QuantizeOptions",
    "Summary",
    "convert_suffix",
    "default_dst",
    "dequantize",
    "plan_for_dequantize",
    "plan_for_quantize",
    "plan_notes",
    "quantize",
    "unmatched_patterns",
]

ProgressArg = Union["Progress", bool, None]
"""True (default): a tqdm.auto bar; False or None: nothing; or an engine.Progress to call back."""

SrcArg = Union[str, "os.PathLike[str]"]


def __getattr__(name: str):
    # Plan, Progress and Summary live beside torch-using code; imported on first use.
    if name in ("Progress", "Summary"):
        from fp8conv.convert import engine

        return getattr(engine, name)
    if name == "Plan":
        from fp8conv.convert.plan import Plan

        return Plan
    if name in ("ConvertOptions", "ConvertPlan"):
        from fp8conv.convert import fp8_to_fp8

        return getattr(fp8_to_fp8, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_dst(src: SrcArg, suffix: str, revision: str | None = None) -> Path:
    """Where a conversion writes when no DST is given: `<src>-<suffix>` beside a folder
    (`ckpt/` -> `ckpt-fp8/`), `./<name>-<suffix>` in the current folder for a repo id
    (`deepseek-ai/DeepSeek-V3` -> `DeepSeek-V3-bf16/`)."""
    from fp8conv.checkpoint.source import parse_repo_id

    ref = parse_repo_id(src, revision)
    if ref is not None:
        return Path(f"{ref.name}-{suffix}")
    p = Path(os.fspath(src))
    if p.name in ("", ".", ".."):
        p = p.resolve()
    return p.with_name(f"{p.name}-{suffix}")


def quantize_suffix(options: QuantizeOptions) -> str:
    """The scheme in a default DST name: `fp8` (block), `fp8-channel` or `mxfp8`, with `-ct` for the
    compressed-tensors layout."""
    from fp8conv.formats.writers import writer

    return writer(options.format, options.scheme).dst_suffix


def convert_suffix(options: ConvertOptions) -> str:
    """What a convert changes, in a default DST name: `ue8m0`, `ct`, `fp8-channel-ct`, `b64x128`,
    `ct-vllm` (a --target), ... (`converted` when it only rewrites the same layout)."""
    from fp8conv.formats.writers import FORMAT_TAGS

    parts = []
    if options.scheme is not None:
        parts.append(options.scheme)
    if options.format is not None:
        parts.append(FORMAT_TAGS[options.format])
    if options.scale_fmt != "keep":
        parts.append(options.scale_fmt)
    if options.block_size is not None:
        parts.append("b{}x{}".format(*options.block_size))
    if options.target != "any":
        parts.append(options.target)
    return "-".join(parts) or "converted"


def plan_notes(plan: Plan) -> list[str]:
    """Warnings found while planning (e.g. a --skip pattern that matches nothing)."""
    return list(getattr(plan, "notes", []))


def _progress(progress: ProgressArg, label: str):
    if progress is True:
        return TqdmProgress(label)
    if progress is False or progress is None:
        return NoProgress()
    return progress


def unmatched_patterns(ckpt: Checkpoint, patterns: tuple[str, ...]) -> list[str]:
    """The patterns (globs or `re:` expressions) that match no tensor name in the checkpoint."""
    from fp8conv.text import first_match

    names = list(ckpt.weight_map)
    return [p for p in patterns if not any(first_match(n, (p,)) for n in names)]


def plan_for_dequantize(
    src: SrcArg, options: DequantizeOptions | None = None, *, revision: str | None = None
) -> Plan:
    """The dequantize plan from headers alone; nothing is written. Refuses (InvalidCheckpoint,
    exit 3) a checkpoint without FP8 weights: there would be nothing to dequantize."""
    from fp8conv.checkpoint.layout import open_checkpoint

    return _plan_dequantize(open_checkpoint(src, revision), options or DequantizeOptions())


def _plan_dequantize(ckpt: Checkpoint, opts: DequantizeOptions) -> Plan:
    from fp8conv.convert.plan import plan_dequantize

    plan = plan_dequantize(ckpt, opts)
    if not any(j.action == "dequant" for j in plan.jobs()):
        raise InvalidCheckpoint(
            "no FP8 weights to dequantize: every tensor is already "
            + ", ".join(sorted({j.src.dtype for j in plan.jobs()}) or ["absent"]),
            file=ckpt.root,
            hint="this checkpoint needs no dequantize; to make an FP8 one from it, run "
            "`fp8conv quantize` instead",
        )
    return plan


def plan_for_quantize(
    src: SrcArg, options: QuantizeOptions | None = None, *, revision: str | None = None
) -> Plan:
    """The quantize plan (what --dry-run shows), from headers alone; nothing is written.

    Refuses (InvalidCheckpoint, exit 3) a plan that quantizes nothing, and an `--only` pattern that
    matches no tensor; `--skip` patterns that match nothing are listed in the plan's `notes`."""
    from fp8conv.checkpoint.layout import open_checkpoint

    return _plan_quantize(open_checkpoint(src, revision), options or QuantizeOptions())


def _plan_quantize(ckpt: Checkpoint, opts: QuantizeOptions) -> Plan:
    from fp8conv.convert.plan_quantize import plan_quantize

    opts, ref = _like(opts)
    plan = plan_quantize(ckpt, opts, ref)
    notes: list[str] = []
    unmatched_only = unmatched_patterns(ckpt, opts.only)
    if unmatched_only:
        raise InvalidCheckpoint(
            "--only " + " ".join(repr(p) for p in unmatched_only) + " matches no tensor",
            file=ckpt.root,
            hint="patterns are globs on full tensor names (e.g. '*.mlp.*') or re:REGEX; "
            "`fp8conv inspect` lists the names",
        )
    for p in unmatched_patterns(ckpt, opts.skip):
        notes.append(f"--skip {p!r} matches no tensor")
    if not any(j.action == "quant" for j in plan.jobs()):
        reasons = sorted({j.reason for j in plan.jobs() if j.reason})
        raise InvalidCheckpoint(
            "nothing to quantize: no tensor is a 2-D or 3-D floating-point .weight of at least one "
            f"{opts.block_size[0]}x{opts.block_size[1]} tile that the options leave in "
            f"(kept because: {'; '.join(reasons[:4]) or 'no tensors'})",
            file=ckpt.root,
            hint="check --only/--skip and --block-size; `fp8conv quantize SRC --dry-run` shows why "
            "each tensor is kept",
        )
    # Plan.notes: what the caller should be told (the CLI prints them, the API adds them to the
    # summary); added to any notes the planner made.
    plan.notes = [*plan_notes(plan), *notes]  # type: ignore[attr-defined]
    return plan


def dequantize(
    src: SrcArg,
    dst: SrcArg | None = None,
    options: DequantizeOptions | None = None,
    progress: ProgressArg = True,
    *,
    revision: str | None = None,
) -> Summary | Plan:
    """Turn an FP8 checkpoint into a bf16/fp16/fp32 one.

    src: a folder, a Hugging Face cache snapshot, or a repo id (`org/name`, `org/name@rev`).
    dst: the output folder; None writes `<src>-<dtype>` beside a folder (`./<name>-<dtype>` for a
    repo id). options.dry_run: return the Plan and write nothing. progress: True for a tqdm bar,
    False for none, or an engine.Progress. Returns the run's Summary. Raises fp8conv.errors types
    (each with an exit_code).
    """
    from fp8conv.checkpoint.layout import open_checkpoint

    opts = options or DequantizeOptions()
    ckpt = open_checkpoint(src, revision)
    plan = _plan_dequantize(ckpt, opts)
    if opts.dry_run:
        return plan
    from fp8conv.convert import engine

    out = Path(dst) if dst is not None else default_dst(src, opts.dtype, revision)
    return engine.run(
        ckpt,
        plan,
        out,
        "dequantize",
        opts.job_key(),
        opts.device,
        opts.overwrite,
        opts.part,
        _progress(progress, "dequantize"),
    )


def quantize(
    src: SrcArg,
    dst: SrcArg | None = None,
    options: QuantizeOptions | None = None,
    progress: ProgressArg = True,
    *,
    revision: str | None = None,
) -> Summary | Plan:
    """Turn a bf16/fp16/fp32 checkpoint into block FP8 (e4m3, one float32 scale per tile).

    src, progress, revision: as for `dequantize`. dst: the output folder; None writes `<src>-fp8`
    (`<src>-fp8-ct` for the compressed-tensors layout) beside a folder. options.dry_run: return the
    Plan (what would be quantized and kept, and why) and write nothing.
    """
    from fp8conv.checkpoint.layout import open_checkpoint

    opts = options or QuantizeOptions()
    ckpt = open_checkpoint(src, revision)
    plan = _plan_quantize(ckpt, opts)
    if opts.dry_run:
        return plan
    from fp8conv.convert import engine

    out = Path(dst) if dst is not None else default_dst(src, quantize_suffix(opts), revision)
    prog = _progress(progress, "quantize")
    for note in plan_notes(plan):
        prog.note(note)
    summary = engine.run(
        ckpt,
        plan,
        out,
        "quantize",
        opts.job_key(),
        opts.device,
        opts.overwrite,
        opts.part,
        prog,
        scale_fmt=opts.scale_fmt,
    )
    summary.notes.extend(plan_notes(plan))
    return summary


def plan_for_convert(
    src: SrcArg, options: ConvertOptions | None = None, *, revision: str | None = None
) -> ConvertPlan:
    """The convert plan (what --dry-run shows): per tensor what changes and whether it is lossless;
    with a --target, the weights it keeps bf16 and why (`how`), and the plan's `notes`."""
    from fp8conv.checkpoint.layout import open_checkpoint
    from fp8conv.convert.fp8_to_fp8 import ConvertOptions, plan_convert

    return plan_convert(open_checkpoint(src, revision), options or ConvertOptions())


def convert(
    src: SrcArg,
    dst: SrcArg,
    options: ConvertOptions | None = None,
    progress: ProgressArg = True,
    *,
    revision: str | None = None,
) -> tuple[Summary, ConvertPlan]:
    """FP8 checkpoint -> FP8 checkpoint in another layout, scheme, scale format or block. Returns the
    summary and the plan, whose report() gives per tensor how it changed and the loss, worst first.
    options.target: a weight that loader cannot load or run in the output is written bf16 (the bytes
    `dequantize` writes for it), left out of the quantization config, and reported "kept bf16: why"."""
    from fp8conv.checkpoint.layout import open_checkpoint
    from fp8conv.convert.fp8_to_fp8 import ConvertOptions, plan_convert, run_convert

    opts = options or ConvertOptions()
    ckpt = open_checkpoint(src, revision)
    cp = plan_convert(ckpt, opts)
    prog = _progress(progress, "convert")
    for note in cp.notes:
        prog.note(note)
    return run_convert(ckpt, cp, Path(dst), opts, prog), cp


def _like(opts: QuantizeOptions):
    """--like REF: the options taken from the reference, and the reference."""
    if not opts.like:
        return opts, None
    from fp8conv.checkpoint.layout import open_checkpoint
    from fp8conv.convert.like import options_like, read_reference

    ref = read_reference(open_checkpoint(opts.like))
    return options_like(opts, ref), ref
