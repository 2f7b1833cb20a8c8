"""The `fp8conv` command. The only module that prints or exits; it maps typed errors to exit codes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as RichProgress,
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
JsonOpt = Annotated[
    Optional[str], typer.Option("--json", help="write a JSON summary to PATH, or - for stdout")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace DST's existing content")]
PartOpt = Annotated[Optional[str], typer.Option("--part", help="convert share I of N of the shards (I/N)")]


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


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
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(f"0/{total_shards} shards on {device}", total=total_bytes)
        else:
            err.print(
                f"{self.label}: {total_shards} shard(s), {human(total_bytes)} on {device}", highlight=False
            )

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
        err.print(
            f"{self.label}: {pct:5.1f}%  {human(self.done)} of {human(self.total)}  "
            f"{self.shards}/{self.total_shards} shards  {human(rate)}/s  ETA {eta:.0f}s",
            highlight=False,
        )

    def shard_done(self, name: str, skipped: bool = False) -> None:
        self.shards += 1
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.shards}/{self.total_shards} shards")
        elif not self.quiet:
            err.print(
                f"{self.label}: {'kept (already done)' if skipped else 'wrote'} {name}", highlight=False
            )

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
        return
    try:
        Path(target).write_text(text + "\n")
    except OSError as e:
        err.print(
            f"[bold red]error[/] (exit 5): {escape(target)}: cannot write the JSON summary: "
            f"{escape(e.strerror or str(e))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(5) from None


def fail(e: Fp8convError, json_target: str | None) -> None:
    # The message holds file and tensor names: escaped so brackets in them are not taken for markup,
    # and on one line (soft_wrap) so logs and greps see it whole.
    err.print(
        f"[bold red]error[/] (exit {e.exit_code}): {escape(e.message)}", highlight=False, soft_wrap=True
    )
    if json_target:
        try:
            emit_json(json_target, {"ok": False, **e.to_dict()})
        except typer.Exit:
            pass  # reported; the first error decides the exit code
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
        msg = (
            f"{summary.command}: {summary.tensors_converted} tensors converted, "
            f"{summary.tensors_copied} copied, {summary.shards_written} shard(s) written, "
            f"{summary.shards_skipped} kept from an earlier run; {human(summary.bytes_in)} "
            f"-> {human(summary.bytes_out)} in {summary.seconds:.1f}s ({human(rate * 1e6)}/s) "
            f"on {summary.device}"
        )
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
    from fp8conv.convert import DequantizeOptions
    from fp8conv.convert import dequantize as run_dequantize

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
    skip: Annotated[
        Optional[list[str]], typer.Option("--skip", help="leave these tensors (glob or re:REGEX)")
    ] = None,
    only: Annotated[
        Optional[list[str]], typer.Option("--only", help="quantize only these (glob or re:REGEX)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan; write nothing")] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
) -> None:
    """bf16/fp16/fp32 checkpoint -> block FP8 (e4m3 weights, one scale per tile)."""
    from fp8conv.convert import QuantizeOptions, plan_for_quantize
    from fp8conv.convert import quantize as run_quantize

    def options():
        return QuantizeOptions(
            format=format,
            block_size=block_size,
            scale_fmt=scale_fmt,
            skip=tuple(skip or ()),
            only=tuple(only or ()),
            dry_run=dry_run,
            device=device,
            overwrite=overwrite,
            part=part,
        )

    if dry_run:
        plan = run_guarded(lambda: plan_for_quantize(src, options()), json_out)
        print_plan(plan, json_out)
        return

    report_summary(
        run_guarded(lambda: run_quantize(src, dst, options(), ConsoleProgress(quiet, "quantize")), json_out),
        quiet,
        json_out,
    )


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
            rows.append(
                {
                    "tensor": j.name,
                    "shard": sp.name,
                    "shape": list(j.src.shape),
                    "dtype": j.src.dtype,
                    "action": "quantize" if j.action == "quant" else "keep",
                    "reason": j.reason,
                    "bytes_before": before,
                    "bytes_after": after,
                }
            )
    total_b = sum(r["bytes_before"] for r in rows)
    total_a = sum(r["bytes_after"] for r in rows)
    n_q = sum(r["action"] == "quantize" for r in rows)
    if json_target:
        emit_json(
            json_target,
            {
                "ok": True,
                "dry_run": True,
                "tensors": rows,
                "modules_to_not_convert": plan.modules_to_not_convert,
                "totals": {
                    "tensors": len(rows),
                    "quantized": n_q,
                    "bytes_before": total_b,
                    "bytes_after": total_a,
                },
            },
        )
        if json_target == "-":
            return
    table = Table(title="quantize plan (dry run: nothing written)")
    for col in ("tensor", "shape", "dtype", "action", "bytes before -> after"):
        table.add_column(col)
    for r in rows:
        action = r["action"] if r["action"] == "quantize" else f"keep ({r['reason']})"
        table.add_row(
            r["tensor"],
            "x".join(map(str, r["shape"])),
            r["dtype"],
            action,
            f"{r['bytes_before']:,} -> {r['bytes_after']:,}",
        )
    table.add_section()
    table.add_row(f"total: {len(rows)} tensors", "", "", f"{n_q} quantized", f"{total_b:,} -> {total_a:,}")
    out.print(table)


@app.command()
def verify(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder to check (FP8 or dequantized)")],
    reference: Annotated[
        Optional[Path],
        typer.Option(
            "--reference",
            help="the source: original bf16/fp16/fp32 for an FP8 CKPT, FP8 for a dequantized one",
        ),
    ] = None,
    tensors: Annotated[
        Optional[list[str]],
        typer.Option("--tensors", help="data checks only for these tensors (glob or re:REGEX; repeatable)"),
    ] = None,
    sample: Annotated[
        Optional[int], typer.Option("--sample", help="data checks for N tensors picked at random")
    ] = None,
    rows: Annotated[
        int, typer.Option("--rows", help="rows M of the random activations in the GEMM check")
    ] = 16,
    seed: Annotated[
        int, typer.Option("--seed", help="seed for --sample, activations and expert sampling")
    ] = 0,
    min_sqnr: Annotated[
        float, typer.Option("--min-sqnr", help="with --reference: fail below this SQNR in dB")
    ] = 20.0,
    experts: Annotated[
        int, typer.Option("--experts", help="stacked experts: GEMM-check this many per tensor (0 = all)")
    ] = 8,
    reference_mode: Annotated[
        str,
        typer.Option(
            "--reference-mode",
            help="FP8 CKPT vs its original: exact (bit-for-bit re-quantization), statistical, or auto",
        ),
    ] = "auto",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    tp: TpOpt = None,
    ep: EpOpt = False,
    target: TargetOpt = None,
    blackwell: BlackwellOpt = False,
) -> None:
    """Check an FP8 or dequantized checkpoint: structure, scales, NaN codes, GEMM numerics, --reference;
    with --tp/--target/--blackwell also whether servers load it (TP plans, loader rules, requant loss)."""
    from fp8conv.errors import VerificationFailed
    from fp8conv.verify import VerifyOptions, verify_checkpoint
    from fp8conv.verify.verify import render_table, summary_line

    def go():
        from fp8conv import targets

        opts = VerifyOptions(
            reference=reference,
            tensors=tuple(tensors or ()),
            sample=sample,
            rows=rows,
            seed=seed,
            min_sqnr=min_sqnr,
            device=device,
            experts=experts,
            reference_mode=reference_mode,
            tp=targets.parse_tp_sizes(tp) if tp is not None else (),
            ep=ep,
            targets=targets.parse_targets(target),
            blackwell=blackwell,
        )
        return verify_checkpoint(ckpt, opts, ConsoleProgress(quiet, "verify"))

    report = run_guarded(go, json_out)
    serving = report.serving
    emit_json(json_out, report.to_dict())
    console = err if json_out == "-" else out
    if not quiet:
        console.print(render_table(report))
    if serving is not None and (not quiet or not serving.ok):
        print_serving(serving, console)
    if not report.ok:
        for line in report.failures[:20]:
            err.print(f"FAIL {line}", style="red", highlight=False, markup=False, soft_wrap=True)
    if not quiet or not report.ok:
        err.print(summary_line(report), highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(VerificationFailed.exit_code)


@app.command()
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    json_out: JsonOpt = None,
    tp: TpOpt = None,
    ep: EpOpt = False,
) -> None:
    """Describe a checkpoint: format, quantization config, shards, tensors by dtype and role, oddities;
    with --tp, the tensor-parallel sizes vLLM and SGLang can load it at (informational, exit 0)."""
    from fp8conv.verify.inspect import inspect_checkpoint, inspect_table

    info = run_guarded(lambda: inspect_checkpoint(ckpt), json_out)
    serving = serving_for(ckpt, tp, ep, None, False, json_out)
    if serving is not None:
        info = {**info, "serving": serving.to_dict()}
    emit_json(json_out, info)
    console = err if json_out == "-" else out
    console.print(inspect_table(info))
    if serving is not None:
        print_serving(serving, console, loaders=False)
    if not info["ok"]:
        # described, but damaged: not a checkpoint a loader can read (exit 3, as the converters)
        bad = [o for o in info["odd"] if o["kind"].startswith("structure:")]
        first = bad[0] if bad else {"file": info["path"], "message": "damaged"}
        err.print(
            f"[bold red]error[/] (exit 3): {escape(str(first['file'] or info['path']))}: "
            f"{escape(first['message'])} ({len(bad)} structural problem(s) listed above)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(3)


TpOpt = Annotated[
    Optional[str],
    typer.Option("--tp", help="tensor-parallel sizes to check vLLM/SGLang loading at, e.g. 1,2,4,8,16"),
]
EpOpt = Annotated[bool, typer.Option("--ep", help="with --tp: experts split by expert parallelism")]
TargetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--target", help="loaders to check: transformers,vllm,sglang,compressed-tensors (default all)"
    ),
]
BlackwellOpt = Annotated[
    bool,
    typer.Option("--blackwell", help="the error a Blackwell server's UE8M0 requant at load adds, per tensor"),
]


def serving_for(ckpt, tp, ep, target, blackwell, json_out, device="cpu"):
    """The serving report when any of its options is given, else None."""
    if tp is None and target is None and not blackwell and not ep:
        return None
    from fp8conv import targets

    def go():
        sizes = targets.parse_tp_sizes(tp) if tp is not None else (targets.DEFAULT_TP if ep else ())
        return targets.serving_report(ckpt, sizes, ep, targets.parse_targets(target), blackwell, device)

    return run_guarded(go, json_out)


def print_serving(report, console: Console, loaders: bool = True) -> None:
    """Render a fp8conv.targets.ServingReport: TP x loader matrix, loader verdicts, requant loss."""
    block = report.scheme.block
    if not report.tp_sizes:
        pass
    elif not report.plan.known:
        console.print(f"[red]tensor parallelism: {escape(report.plan.problem)}[/]")
    else:
        title = f"tensor parallelism ({report.architecture}, block {list(block) if block else 'none'}, "
        table = Table(title=title + f"expert parallel {'on' if report.ep else 'off'})")
        table.add_column("TP", justify="right")
        names = sorted({c.loader for c in report.cells}, key=["vllm", "sglang"].index)
        for name in names:
            table.add_column({"vllm": "vLLM", "sglang": "SGLang"}[name], overflow="fold")
        for size in report.tp_sizes:
            row = [str(size)]
            for name in names:
                c = next(c for c in report.cells if c.tp == size and c.loader == name)
                more = f" (+{len(c.failures) - 1} more)" if len(c.failures) > 1 else ""
                row.append(
                    "[green]ok[/]"
                    if c.ok
                    else f"[red]{escape(c.first.tensor)}[/]: {escape(c.first.message)}{more}"
                )
            table.add_row(*row)
        console.print(table)
        works = ", ".join(map(str, report.working_tp)) or "none"
        console.print(f"works at TP {works}", highlight=False)
        grouped: dict[tuple[int, str], list[str]] = {}
        for (size, name), fix in report.fixes.items():
            grouped.setdefault((size, fix), []).append({"vllm": "vLLM", "sglang": "SGLang"}[name])
        for (size, fix), who in sorted(grouped.items()):
            console.print(f"TP {size} ({', '.join(who)}): {escape(fix)}", highlight=False)
        for name in report.plan.unmapped[:5]:
            console.print(f"[yellow]no partition rule for FP8 tensor {escape(name)}[/]")
    if loaders and report.loaders:
        table = Table(title="loaders")
        table.add_column("target")
        table.add_column("loads")
        table.add_column("why", overflow="fold")
        for v in report.loaders:
            notes = [f for f in v.findings if f.severity != "fail"]
            why = escape(v.why) + "".join(f"\n{f.severity}: {escape(f.message)}" for f in notes[:3])
            table.add_row(v.target, "[green]yes[/]" if v.loads else "[red]no[/]", why)
        console.print(table)
    if report.requant is not None:
        table = Table(title="Blackwell UE8M0 requant at load (worst first)")
        table.add_column("tensor", overflow="fold")
        table.add_column("rel. error", justify="right")
        table.add_column("max abs", justify="right")
        for r in report.requant[:15]:
            if r.requantized:
                table.add_row(escape(r.tensor), f"{r.rel_error:.4f}", f"{r.max_abs_error:.3g}")
            else:
                table.add_row(escape(r.tensor), "kept", escape(r.note or ""))
        console.print(table)
        if any(r.rel_error > 0 for r in report.requant):
            from fp8conv.targets import REQUANT_SUGGESTION

            console.print(escape(REQUANT_SUGGESTION), highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
