"""The `fp8conv` command. The only module that prints or exits; it maps typed errors to exit codes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress as RichProgress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from fp8conv.convert import engine
from fp8conv.errors import EXIT_CODES, Fp8convError, Interrupted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Convert large-model checkpoints between BF16 and block-scaled FP8, and verify them.",
    epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
)
err = Console(stderr=True)
out = Console()

DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write a JSON summary to PATH, or - for stdout")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace DST's existing content")]
PartOpt = Annotated[Optional[str], typer.Option("--part", help="convert share I of N of the shards (I/N)")]


class ConsoleProgress(engine.Progress):
    """rich bar on a terminal; plain periodic lines otherwise (CI logs); nothing with --quiet."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet = quiet
        self.label = label
        self.tty = err.is_terminal
        self.bar: RichProgress | None = None
        self.done = 0
        self.total = 0
        self.shards = 0
        self.total_shards = 0
        self.t0 = time.monotonic()
        self.last_line = 0.0

    def start(self, total_bytes: int, total_shards: int, device: str) -> None:
        self.total, self.total_shards, self.t0 = total_bytes, total_shards, time.monotonic()
        if self.quiet:
            return
        if self.tty:
            self.bar = RichProgress(
                TextColumn(f"{self.label} [progress.description]{{task.description}}"),
                BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                console=err, transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(f"0/{total_shards} shards on {device}", total=total_bytes)
        else:
            err.print(f"{self.label}: {total_shards} shard(s), {total_bytes / 1e9:.2f} GB on {device}",
                      highlight=False)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes)
        elif not self.quiet and time.monotonic() - self.last_line > 10:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        dt = max(self.last_line - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total if self.total else 100.0
        err.print(f"{self.label}: {pct:5.1f}%  {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  "
                  f"{self.shards}/{self.total_shards} shards  {rate / 1e6:.0f} MB/s  ETA {eta:.0f}s",
                  highlight=False)

    def shard_done(self, name: str, skipped: bool = False) -> None:
        self.shards += 1
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.shards}/{self.total_shards} shards")
        elif not self.quiet:
            err.print(f"{self.label}: {'kept (already done)' if skipped else 'wrote'} {name}",
                      highlight=False)

    def note(self, message: str) -> None:
        if not self.quiet:
            err.print(f"note: {message}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif not self.quiet and self.total:
            self._line()


def emit_json(target: str | None, payload: dict) -> None:
    if not target:
        return
    text = json.dumps(payload, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")


def fail(e: Fp8convError, json_target: str | None) -> None:
    err.print(f"[bold red]error[/] (exit {e.exit_code}): {e.message}", highlight=False)
    if json_target:
        emit_json(json_target, {"ok": False, **e.to_dict()})
    raise typer.Exit(e.exit_code)


def run_guarded(fn, json_target: str | None):
    try:
        return fn()
    except KeyboardInterrupt:
        fail(Interrupted(2), json_target)
    except Fp8convError as e:
        fail(e, json_target)


def report_summary(summary: engine.Summary, quiet: bool, json_target: str | None) -> None:
    if summary.already_complete:
        msg = f"{summary.dst} is already complete for this job; nothing rewritten"
    else:
        rate = summary.bytes_in / summary.seconds / 1e6 if summary.seconds else 0.0
        msg = (f"{summary.command}: {summary.tensors_converted} tensors converted, "
               f"{summary.tensors_copied} copied, {summary.shards_written} shard(s) written, "
               f"{summary.shards_skipped} kept from an earlier run; {summary.bytes_in / 1e9:.3f} GB "
               f"-> {summary.bytes_out / 1e9:.3f} GB in {summary.seconds:.1f}s ({rate:.0f} MB/s) "
               f"on {summary.device}")
        if not summary.complete:
            msg += "; other parts still missing"
    if not quiet:
        err.print(msg, highlight=False)
    emit_json(json_target, {"ok": True, **summary.to_dict()})


@app.command()
def dequantize(
    src: Annotated[Path, typer.Argument(help="FP8 checkpoint folder")],
    dst: Annotated[Path, typer.Argument(help="output folder (new or empty)")],
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 | fp16 | fp32")] = "bf16",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
) -> None:
    """FP8 checkpoint (DeepSeek-V3 / compressed-tensors layout) -> bf16, fp16 or fp32."""
    from fp8conv.convert import DequantizeOptions, dequantize as run_dequantize

    def go():
        opts = DequantizeOptions(dtype=dtype, device=device, overwrite=overwrite, part=part)
        return run_dequantize(src, dst, opts, ConsoleProgress(quiet, "dequantize"))

    report_summary(run_guarded(go, json_out), quiet, json_out)


@app.command()
def quantize(
    src: Annotated[Path, typer.Argument(help="bf16/fp16/fp32 checkpoint folder")],
    dst: Annotated[Path, typer.Argument(help="output folder (new or empty)")],
    format: Annotated[str, typer.Option("--format", help="fp8 | compressed-tensors")] = "fp8",
    block_size: Annotated[str, typer.Option("--block-size", help="128 or MxN")] = "128",
    scale_fmt: Annotated[str, typer.Option("--scale-fmt", help="float | ue8m0")] = "float",
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="leave these tensors (glob or re:REGEX)")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="quantize only these (glob or re:REGEX)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan; write nothing")] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
) -> None:
    """bf16/fp16/fp32 checkpoint -> block FP8 (e4m3 weights, one scale per tile)."""
    from fp8conv.convert import QuantizeOptions, plan_for_quantize, quantize as run_quantize

    def options():
        return QuantizeOptions(format=format, block_size=block_size, scale_fmt=scale_fmt,
                               skip=tuple(skip or ()), only=tuple(only or ()), dry_run=dry_run,
                               device=device, overwrite=overwrite, part=part)

    if dry_run:
        plan = run_guarded(lambda: plan_for_quantize(src, options()), json_out)
        print_plan(plan, json_out)
        return

    report_summary(run_guarded(lambda: run_quantize(src, dst, options(),
                                                    ConsoleProgress(quiet, "quantize")), json_out),
                   quiet, json_out)


def print_plan(plan, json_target: str | None) -> None:
    rows = []
    for sp in plan.shards:
        for j in sp.jobs:
            if j.action == "scale":
                continue
            before = j.src.nbytes
            after = j.out_bytes
            if j.action == "quant":
                scale = next(x for x in sp.jobs if x.name == j.scale_name)
                after += scale.out_bytes
            rows.append({"tensor": j.name, "shard": sp.name, "shape": list(j.src.shape),
                         "dtype": j.src.dtype, "action": "quantize" if j.action == "quant" else "keep",
                         "reason": j.reason, "bytes_before": before, "bytes_after": after})
    total_b = sum(r["bytes_before"] for r in rows)
    total_a = sum(r["bytes_after"] for r in rows)
    n_q = sum(r["action"] == "quantize" for r in rows)
    if json_target:
        emit_json(json_target, {"ok": True, "dry_run": True, "tensors": rows,
                                "modules_to_not_convert": plan.modules_to_not_convert,
                                "totals": {"tensors": len(rows), "quantized": n_q,
                                           "bytes_before": total_b, "bytes_after": total_a}})
        if json_target == "-":
            return
    table = Table(title="quantize plan (dry run: nothing written)")
    for col in ("tensor", "shape", "dtype", "action", "bytes before -> after"):
        table.add_column(col)
    for r in rows:
        action = r["action"] if r["action"] == "quantize" else f"keep ({r['reason']})"
        table.add_row(r["tensor"], "x".join(map(str, r["shape"])), r["dtype"], action,
                      f"{r['bytes_before']:,} -> {r['bytes_after']:,}")
    table.add_section()
    table.add_row(f"total: {len(rows)} tensors", "", "", f"{n_q} quantized",
                  f"{total_b:,} -> {total_a:,}")
    out.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
