"""Orchestration: plan a conversion from the source's headers, then run it."""

from __future__ import annotations

from pathlib import Path

from fp8conv.checkpoint.layout import open_checkpoint
from fp8conv.convert import engine
from fp8conv.convert.engine import Progress, Summary
from fp8conv.convert.fp8_to_fp8 import ConvertOptions, ConvertPlan, plan_convert, run_convert
from fp8conv.convert.options import DequantizeOptions, QuantizeOptions
from fp8conv.convert.plan import Plan, plan_dequantize
from fp8conv.convert.plan_quantize import plan_quantize

__all__ = [
    "ConvertOptions",
    "convert",
    "plan_for_convert",
    "DequantizeOptions",
    "Plan",
    "Progress",
    "QuantizeOptions",
    "Summary",
    "dequantize",
    "plan_for_quantize",
    "quantize",
]


def dequantize(
    src: str | Path,
    dst: str | Path,
    options: DequantizeOptions | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Turn an FP8 checkpoint folder into a bf16/fp16/fp32 one. Raises fp8conv.errors types."""
    opts = options or DequantizeOptions()
    ckpt = open_checkpoint(src)
    plan = plan_dequantize(ckpt, opts)
    return engine.run(
        ckpt, plan, Path(dst), "dequantize", opts.job_key(), opts.device, opts.overwrite, opts.part, progress
    )


def plan_for_quantize(src: str | Path, options: QuantizeOptions | None = None) -> Plan:
    """The quantize plan (what --dry-run shows), from headers alone; nothing is written."""
    ckpt = open_checkpoint(src)
    opts, ref = _like(options or QuantizeOptions())
    return plan_quantize(ckpt, opts, ref)


def quantize(
    src: str | Path, dst: str | Path, options: QuantizeOptions | None = None, progress: Progress | None = None
) -> Summary:
    """Turn a bf16/fp16/fp32 checkpoint folder into FP8: block, per-channel or MXFP8 (options.scheme)."""
    ckpt = open_checkpoint(src)
    opts, ref = _like(options or QuantizeOptions())
    plan = plan_quantize(ckpt, opts, ref)
    for note in plan.notes:
        (progress or Progress()).note(note)
    summary = engine.run(
        ckpt,
        plan,
        Path(dst),
        "quantize",
        opts.job_key(),
        opts.device,
        opts.overwrite,
        opts.part,
        progress,
        scale_fmt=opts.scale_fmt,
    )
    summary.notes.extend(plan.notes)
    return summary


def plan_for_convert(src: str | Path, options: ConvertOptions | None = None) -> ConvertPlan:
    """The convert plan (what --dry-run shows): per tensor what changes and whether it is lossless."""
    return plan_convert(open_checkpoint(src), options or ConvertOptions())


def convert(
    src: str | Path, dst: str | Path, options: ConvertOptions | None = None, progress: Progress | None = None
) -> tuple[Summary, ConvertPlan]:
    """FP8 checkpoint -> FP8 checkpoint in another layout, scheme, scale format or block. Returns the
    summary and the plan, whose report() gives per tensor how it changed and the loss, worst first."""
    opts = options or ConvertOptions()
    ckpt = open_checkpoint(src)
    cp = plan_convert(ckpt, opts)
    return run_convert(ckpt, cp, Path(dst), opts, progress), cp


def _like(opts: QuantizeOptions):
    """--like REF: the options taken from the reference, and the reference."""
    if not opts.like:
        return opts, None
    from fp8conv.convert.like import options_like, read_reference

    ref = read_reference(open_checkpoint(opts.like))
    return options_like(opts, ref), ref
