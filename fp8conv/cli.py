"""The `fp8conv` command. The only module that prints or exits; it maps typed errors to exit codes.

Start-up is kept light: torch, the engine and the verifier are imported inside the commands, so
`fp8conv --help`, `-h` and `--version` answer without importing torch (bench/bench_startup.py).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.text import Text

from fp8conv import JSON_SCHEMA_VERSION, __version__
from fp8conv.convert.options import OutDtype, QuantFormat, ScaleFmt, Scheme, Target
from fp8conv.convert.progress import ProgressCounter
from fp8conv.errors import EXIT_CODES, Fp8convError, Interrupted, UsageError
from fp8conv.text import middle

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Convert large-model checkpoints between BF16 and block-scaled FP8, and verify them.",
    epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
)
err = Console(stderr=True)
out = Console()

# ------------------------------------------------------------------------------ shared option types
SrcArg = Annotated[
    str,
    typer.Argument(
        metavar="SRC",
        help="checkpoint folder, Hugging Face cache snapshot, or repo id (org/name, org/name@revision)",
        show_default=False,
    ),
]
DstArg = Annotated[
    Optional[Path],
    typer.Argument(
        metavar="DST",
        help="output folder (new or empty); default: SRC-fp8 / SRC-bf16 beside SRC, ./NAME-... for a repo id",
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option("--revision", metavar="REV", help="branch, tag or commit of a repo id SRC"),
]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda|cuda:N", help="where to convert")]
JsonOpt = Annotated[
    Optional[str],
    typer.Option("--json", metavar="PATH", help="write a JSON summary to PATH, or - for stdout"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="no progress output")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="replace DST's existing content")]
PartOpt = Annotated[
    Optional[str], typer.Option("--part", metavar="I/N", help="convert share I of N of the shards")
]
DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", metavar="", help="print the plan, grouped by layer pattern; write nothing"),
]
FullOpt = Annotated[bool, typer.Option("--full", metavar="", help="with --dry-run: one row per tensor")]
TpOpt = Annotated[
    Optional[str],
    typer.Option(
        "--tp",
        metavar="N,N,...",
        help="tensor-parallel sizes to check vLLM/SGLang loading at, e.g. 1,2,4,8,16",
    ),
]
EpOpt = Annotated[
    bool, typer.Option("--ep", metavar="", help="with --tp: experts split by expert parallelism")
]
TargetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--target",
        metavar="LOADERS",
        help="loaders to check: transformers,vllm,sglang,compressed-tensors (default: the format's)",
    ),
]
BlackwellOpt = Annotated[
    bool,
    typer.Option(
        "--blackwell",
        metavar="",
        help="the error a Blackwell server's UE8M0 requant at load adds, per tensor",
    ),
]


def version_callback(value: bool) -> None:
    if value:
        print(f"fp8conv {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", metavar="", is_eager=True, callback=version_callback, help="print the version"
        ),
    ] = False,
) -> None:
    """Convert large-model checkpoints between BF16 and block-scaled FP8, and verify them."""


# ------------------------------------------------------------------------------------- rendering
def human(n: float) -> str:
    """Bytes in decimal units: 512 B, 1.20 MB, 3.40 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human3(n: float) -> str:
    """Bytes with three significant digits (table cells): 512 B, 1.2 MB, 262 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 99.5 else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


def seconds(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log(message: str, style: str | None = None, console: Console = err) -> None:
    """A plain line: never wrapped or cut at the console width (logs and greps see it whole)."""
    console.print(Text(message, style=style or ""), soft_wrap=True, highlight=False)


_ACTIVE: list[ConsoleProgress] = []  # the progress display to stop before an error is printed


class ConsoleProgress(ProgressCounter):
    """A rich bar on a terminal; plain lines every LINE_EVERY seconds otherwise (CI logs); nothing
    with --quiet. Rate and time left appear once there is data; bytes kept from an earlier run are
    shown apart and are not speed (ProgressCounter)."""

    LINE_EVERY = 10.0

    def __init__(
        self, quiet: bool, label: str, transient: bool = False, shards: bool = True, dst: Path | None = None
    ) -> None:
        super().__init__()
        self.quiet = quiet
        self.label = label
        self.transient = transient
        self.count_shards = shards
        self.dst = dst
        self.tty = err.is_terminal
        self.bar: Any = None
        self.task: Any = None
        self.last_line = 0.0

    def figures(self) -> str:
        parts = []
        r = self.rate()
        if r is not None:
            parts.append(f"{human(r)}/s")
            eta = self.eta()
            if eta is not None and self.done < self.total:
                parts.append(f"{seconds(eta)} left")
        if self.resumed:
            parts.append(f"{human(self.resumed)} kept from an earlier run")
        return "  ".join(parts)

    def start(self, total_bytes: int, total_shards: int, device: str) -> None:
        super().start(total_bytes, total_shards, device)
        self.last_line = self.t0
        if self.quiet:
            return
        if not self.count_shards:
            self.total_shards = 0
        shards = f"{total_shards} shard(s), " if self.total_shards else ""
        into = f" -> {self.dst}" if self.dst is not None else ""
        log(f"{self.label}: {shards}{human(total_bytes)} on {device}{into}")
        if self.tty:
            from rich.progress import BarColumn, DownloadColumn, TextColumn
            from rich.progress import Progress as RichProgress

            counter = self

            class Figures(TextColumn):
                def render(self, task):  # rate / time left from the counter, not rich's samples
                    return Text(counter.figures())

            self.bar = RichProgress(
                TextColumn(f"{self.label} on {device} [progress.description]{{task.description}}"),
                BarColumn(),
                DownloadColumn(binary_units=False),
                Figures(""),
                console=err,
                transient=self.transient,
            )
            self.bar.start()
            _ACTIVE.append(self)
            self.task = self.bar.add_task(self._shards(), total=total_bytes)

    def _shards(self) -> str:
        return f"{self.shards}/{self.total_shards} shards" if self.total_shards else ""

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=self._shards())

    def _maybe_line(self) -> None:
        if self.quiet or self.tty or not self.total:
            return
        import time

        now = time.monotonic()
        if now - self.last_line >= self.LINE_EVERY:
            self.last_line = now
            self._line()

    def _line(self) -> None:
        pct = 100 * self.done / self.total if self.total else 100.0
        shards = f"  {self._shards()}" if self.total_shards else ""
        figures = self.figures()
        log(
            f"{self.label}: {pct:5.1f}%  {human(self.done)} of {human(self.total)}{shards}"
            + (f"  {figures}" if figures else "")
        )

    def advance(self, nbytes: int) -> None:
        self._maybe_line()  # before the bytes: a kept shard's bytes are reclassified at shard_done
        super().advance(nbytes)
        self._refresh()

    def shard_done(self, name: str, skipped: bool = False) -> None:
        super().shard_done(name, skipped)
        self._refresh()
        if not self.quiet and not self.tty:
            log(f"{self.label}: {'kept (done by an earlier run)' if skipped else 'wrote'} {name}")

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(Text(f"note: {message}"), soft_wrap=True, highlight=False)
        else:
            log(f"note: {message}")

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self._refresh()
            self.bar.stop()
            self.bar = None
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        elif not self.quiet and not self.tty and self.total:
            self._line()


def stop_displays() -> None:
    """Stop any live bar so that what is printed next lands below it, on a clean line."""
    while _ACTIVE:
        p = _ACTIVE.pop()
        if p.bar is not None:
            p.bar.stop()
            p.bar = None


# ----------------------------------------------------------------------------- errors and JSON
def emit_json(target: str | None, payload: dict, protect=()) -> None:
    """Print JSON (`-`) or write it through the shared safe writer: never inside the checkpoint
    folders in `protect`, never through a link, atomically."""
    from fp8conv.checkpoint.output import write_file_atomic

    if not target:
        return
    text = json.dumps({"schema_version": JSON_SCHEMA_VERSION, **payload}, indent=2)
    if target == "-":
        print(text)
        return
    try:
        write_file_atomic(target, (text + "\n").encode(), protect, what="--json")
    except Fp8convError as e:
        log(f"error (exit {e.exit_code}): cannot write the JSON summary: {e.message}", style="bold red")
        raise typer.Exit(e.exit_code) from None


def check_json_target(target: str | None, protect=()) -> None:
    """Before any work: the --json file can be written where asked, outside the checkpoints."""
    from fp8conv.checkpoint.output import check_output_file

    if target and target != "-":
        check_output_file(target, protect, what="--json")


# The next step for errors that do not carry their own hint, by exit code.
NEXT_STEP = {
    2: "see `fp8conv COMMAND --help`",
    3: "`fp8conv inspect SRC` shows what the checkpoint holds",
    4: "leave the tensor out with --skip NAME, or repair the source",
    5: "fix the cause, then run the same command again to resume",
    6: "choose another DST, or add --overwrite to replace what it holds",
}


def interrupted_message(e: Interrupted, resumable: bool) -> str:
    how = "interrupted by SIGTERM" if e.signum == signal.SIGTERM else "interrupted (Ctrl-C)"
    if resumable:
        return (
            f"{how}; finished shards are kept and nothing partial sits under a final name: "
            "run the same command again to resume"
        )
    return f"{how}; nothing was written"


def fail(e: Fp8convError, json_target: str | None, resumable: bool = True, protect=()) -> None:
    stop_displays()
    if isinstance(e, Interrupted):
        text = interrupted_message(e, resumable)
    else:
        text = e.message
        if not e.hint and e.exit_code in NEXT_STEP:
            text += f" ({NEXT_STEP[e.exit_code]})"
    # Names of files and tensors may hold brackets: printed as Text, never as markup; one line.
    log(f"error (exit {e.exit_code}): {text}", style="bold red")
    if json_target:
        try:
            emit_json(json_target, {"ok": False, **e.to_dict()}, protect)
        except typer.Exit:
            pass  # reported; the first error decides the exit code
    raise typer.Exit(e.exit_code)


def run_guarded(fn, json_target: str | None, resumable: bool = True, protect=()):
    """Run fn, turning typed errors into one line and an exit code. The --json target is checked
    first (inside a checkpoint in `protect`, a missing folder): nothing runs when it cannot be written."""
    try:
        check_json_target(json_target, protect)
    except Fp8convError as e:
        fail(e, None, resumable)  # the target itself is the problem: nothing is written to it
    try:
        return fn()
    except KeyboardInterrupt:
        fail(Interrupted(signal.SIGINT), json_target, resumable, protect)
    except Fp8convError as e:
        fail(e, json_target, resumable, protect)
    finally:
        stop_displays()


def report_summary(summary, quiet: bool, json_target: str | None) -> None:
    if summary.already_complete:
        msg = f"{summary.dst} is already complete for this job; nothing rewritten"
    else:
        rate = summary.bytes_in / summary.seconds if summary.seconds else 0.0
        msg = (
            f"{summary.command}: {summary.tensors_converted} tensors converted, "
            f"{summary.tensors_copied} copied, {summary.shards_written} shard(s) written, "
            f"{summary.shards_skipped} kept from an earlier run; {human(summary.bytes_in)} "
            f"-> {human(summary.bytes_out)} in {summary.seconds:.{2 if summary.seconds < 10 else 1}f}s "
            f"({human(rate)}/s) "
            f"on {summary.device}; output in {summary.dst}"
        )
        if not summary.complete:
            msg += "; other parts still missing"
    if not quiet:
        log(msg)
    elif not summary.complete:  # said even under -q: DST is not a finished model yet
        log(
            f"{summary.dst} is not complete yet: other parts still missing "
            "(run them, or rerun without --part)"
        )
    emit_json(json_target, {"ok": True, **summary.to_dict()}, (summary.src, summary.dst))


def where_to(src: str, dst: Path | None, suffix: str, revision: str | None) -> Path:
    """DST as given, or the default one (the progress's first line says where)."""
    if dst is not None:
        return dst
    from fp8conv.convert import default_dst

    return run_guarded(lambda: default_dst(src, suffix, revision), None)


# -------------------------------------------------------------------------------------- commands
@app.command(short_help="FP8 -> bf16, fp16 or fp32 (DST by default: SRC-bf16)")
def dequantize(
    src: SrcArg,
    dst: DstArg = None,
    dtype: Annotated[OutDtype, typer.Option("--dtype", help="output dtype")] = "bf16",
    revision: RevisionOpt = None,
    dry_run: DryRunOpt = False,
    full: FullOpt = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
) -> None:
    """FP8 checkpoint (DeepSeek-V3 / compressed-tensors layout) -> bf16, fp16 or fp32 (DST: SRC-bf16)."""
    from fp8conv.convert import DequantizeOptions, plan_for_dequantize
    from fp8conv.convert import dequantize as run_dequantize

    def options():
        return DequantizeOptions(dtype=dtype, device=device, overwrite=overwrite, part=part, dry_run=dry_run)

    if dry_run:
        plan = run_guarded(
            lambda: plan_for_dequantize(src, options(), revision=revision), json_out, protect=(src,)
        )
        print_plan(plan, "dequantize", json_out, full, (src,))
        return
    target = where_to(src, dst, dtype, revision)
    progress = ConsoleProgress(quiet, "dequantize", dst=target)
    summary = run_guarded(
        lambda: run_dequantize(src, target, options(), progress, revision=revision),
        json_out,
        protect=(src, target),
    )
    report_summary(summary, quiet, json_out)


@app.command(short_help="bf16/fp16/fp32 -> block FP8 (DST by default: SRC-fp8)")
def quantize(
    src: SrcArg,
    dst: DstArg = None,
    format: Annotated[QuantFormat, typer.Option("--format", help="output layout")] = "fp8",
    scheme: Annotated[
        Scheme, typer.Option("--scheme", help="block tiles, one scale per row, or MXFP8 1x32 groups")
    ] = "fp8-block",
    target: Annotated[
        Target, typer.Option("--target", help="loader the output must run in; keeps bf16 what it cannot")
    ] = "any",
    like: Annotated[
        Optional[str],
        typer.Option(
            "--like",
            metavar="REF",
            help="FP8 checkpoint whose scheme, layout, FP8 tensor set and config to copy",
        ),
    ] = None,
    block_size: Annotated[str, typer.Option("--block-size", metavar="N|MxN", help="scale tile")] = "128",
    scale_fmt: Annotated[
        ScaleFmt, typer.Option("--scale-fmt", help="float32 scales, or powers of two (ue8m0)")
    ] = "float",
    skip: Annotated[
        Optional[list[str]],
        typer.Option("--skip", metavar="PATTERN", help="leave these tensors (glob or re:REGEX; repeatable)"),
    ] = None,
    only: Annotated[
        Optional[list[str]],
        typer.Option("--only", metavar="PATTERN", help="quantize only these (glob or re:REGEX; repeatable)"),
    ] = None,
    revision: RevisionOpt = None,
    dry_run: DryRunOpt = False,
    full: FullOpt = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
) -> None:
    """bf16/fp16/fp32 checkpoint -> FP8 (e4m3 weights): block tiles, per-channel or MXFP8 scales
    (DST: SRC-fp8)."""
    from fp8conv.convert import QuantizeOptions, plan_for_quantize, plan_notes, quantize_suffix
    from fp8conv.convert import quantize as run_quantize

    def options():
        return QuantizeOptions(
            format=format,
            scheme=scheme,
            target=target,
            like=like,
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
        plan = run_guarded(
            lambda: plan_for_quantize(src, options(), revision=revision), json_out, protect=(src,)
        )
        for note in plan_notes(plan):
            log(f"note: {note}")
        print_plan(plan, "quantize", json_out, full, (src,))
        return
    opts = run_guarded(options, json_out)
    # the suffix names the scheme's writer: a pair no loader reads is refused here, exit 2
    out_dir = where_to(src, dst, run_guarded(lambda: quantize_suffix(opts), json_out), revision)
    progress = ConsoleProgress(quiet, "quantize", dst=out_dir)
    summary = run_guarded(
        lambda: run_quantize(src, out_dir, opts, progress, revision=revision),
        json_out,
        protect=(src, out_dir),
    )
    report_summary(summary, quiet, json_out)


def plan_rows(plan) -> list[dict]:
    """One row per output tensor of a plan (a quantized weight's bytes include its scale)."""
    rows = []
    for sp in plan.shards:
        by_name = {j.name: j for j in sp.jobs}
        for j in sp.jobs:
            if j.action == "scale":
                continue
            after = j.out_bytes
            if j.action == "quant":
                after += by_name[j.scale_name].out_bytes
            action = {"quant": "quantize", "dequant": "dequantize"}.get(j.action, "keep")
            rows.append(
                {
                    "tensor": j.name,
                    "shard": sp.name,
                    "shape": list(j.src.shape),
                    "dtype": j.src.dtype,
                    "action": action,
                    "reason": j.reason,
                    "bytes_before": j.src.nbytes,
                    "bytes_after": after,
                }
            )
    return rows


def layer_pattern(name: str) -> str:
    """The name with each layer / expert number replaced by N: `model.layers.N.mlp.experts.N.w1`."""
    import re

    return re.sub(r"(?<=\.)\d+(?=\.|$)", "N", name)


def group_rows(rows: list[dict]) -> list[dict]:
    """Rows grouped by layer pattern, action and dtype, in first-seen order, with totals."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (layer_pattern(r["tensor"]), r["action"], r["reason"], r["dtype"])
        g = groups.setdefault(
            key,
            {"tensor": key[0], "action": r["action"], "reason": r["reason"], "dtype": r["dtype"],
             "count": 0, "shapes": set(), "bytes_before": 0, "bytes_after": 0},
        )  # fmt: skip
        g["count"] += 1
        g["shapes"].add("x".join(map(str, r["shape"])))
        g["bytes_before"] += r["bytes_before"]
        g["bytes_after"] += r["bytes_after"]
    return list(groups.values())


ACTION_W = 18


def short_reason(reason: str) -> str:
    """A plan's reason for keeping a tensor, in a few words (the JSON plan has it whole)."""
    import re

    if reason.startswith("default skip"):
        return "default"
    if reason.startswith("--skip"):
        return "--skip"
    if reason == "not matched by --only":
        return "not --only"
    if reason == "not floating point":
        return "not float"
    if re.fullmatch(r"smaller than one \d+x\d+ tile", reason):
        return "< 1 tile"
    return reason.split(" (", 1)[0]


def print_plan(plan, command: str, json_target: str | None, full: bool, protect=()) -> None:
    rows = plan_rows(plan)
    total_b = sum(r["bytes_before"] for r in rows)
    total_a = sum(r["bytes_after"] for r in rows)
    verb = "quantize" if command == "quantize" else "dequantize"
    n_conv = sum(r["action"] == verb for r in rows)
    if json_target:
        emit_json(
            json_target,
            {
                "ok": True,
                "command": command,
                "dry_run": True,
                "tensors": rows,
                "modules_to_not_convert": plan.modules_to_not_convert,
                "notes": plan.notes,
                "totals": {
                    "tensors": len(rows),
                    f"{verb}d": n_conv,
                    "bytes_before": total_b,
                    "bytes_after": total_a,
                },
            },
            protect,
        )
        if json_target == "-":
            return
    from rich import box
    from rich.table import Table

    if full:
        shown = [{**r, "count": 1, "shapes": {"x".join(map(str, r["shape"]))}} for r in rows]
    else:
        shown = group_rows(rows)
    dtypes = sorted({g["dtype"] for g in shown})
    one_dtype = len(dtypes) == 1  # then the title says it and the column goes (80 columns are few)
    cells = []
    for g in shown:
        action = g["action"] if g["action"] != "keep" else f"keep ({short_reason(g['reason'])})"
        shape = next(iter(g["shapes"])) if len(g["shapes"]) == 1 else f"{len(g['shapes'])} shapes"
        cells.append([g["tensor"], str(g["count"]), shape, g["dtype"], action, human3(g["bytes_after"])])
    title = f"{command} plan (dry run: nothing written)" + ("" if full else ", grouped by layer pattern")
    if one_dtype:
        title += f"; all {dtypes[0]}"
    first = "tensor" if full else "tensors (N: any layer or expert)"
    headers = [first, "n", "shape", "dtype", "action", "output"]
    cols = [i for i in range(6) if not (one_dtype and i == 3) and not (full and i == 1)]
    # Fit the table to the console: each other column takes its widest cell (the action at most
    # ACTION_W), the names take the rest and are shortened in the middle (the end of a name says
    # which projection it is; a cut end would leave `model.layers.0.s…`).
    widths = [max(len(c[i]) for c in [*cells, headers]) for i in range(6)]
    widths[4] = min(widths[4], ACTION_W)
    overhead = 3 * (len(cols) - 1)  # rich's column gaps with these box settings
    name_w = max(20, min(widths[0], out.width - sum(widths[i] for i in cols[1:]) - overhead))
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    for i in cols:
        table.add_column(
            middle(headers[i], name_w) if i == 0 else headers[i],
            no_wrap=True,
            width=name_w if i == 0 else widths[i] if i == 4 else None,
            justify="right" if i in (1, 5) else "left",
        )
    for c in cells:
        c = [middle(c[0], name_w), c[1], c[2], c[3], middle(c[4], widths[4]), c[5]]
        table.add_row(*(c[i] for i in cols))
    out.print(table)
    groups = "" if full else f" in {len(shown)} groups (--full lists every tensor)"
    log(
        f"total: {len(rows)} tensors{groups}, {n_conv} to {verb}; {human(total_b)} -> {human(total_a)}",
        console=out,
    )


@app.command(short_help="FP8 -> FP8: relayout, ue8m0 requant, block -> channel, -> MXFP8 (DST: SRC-<change>)")
def convert(
    src: SrcArg,
    dst: DstArg = None,
    format: Annotated[
        Optional[QuantFormat], typer.Option("--format", help="output layout (default: the source's)")
    ] = None,
    scheme: Annotated[
        Optional[Scheme], typer.Option("--scheme", help="output scheme (default: the source's)")
    ] = None,
    scale_fmt: Annotated[
        Literal["keep", "ue8m0"],
        typer.Option("--scale-fmt", help="keep the scales, or requantize to ue8m0 as DeepGEMM does at load"),
    ] = "keep",
    block_size: Annotated[
        Optional[str], typer.Option("--block-size", help="MxN nested in the source's tiles")
    ] = None,
    target: Annotated[
        Target, typer.Option("--target", help="loader the output must run in; writes bf16 what it cannot")
    ] = "any",
    reference: Annotated[
        Optional[str],
        typer.Option(
            "--reference",
            metavar="BF16",
            help="the original BF16 checkpoint: measure lossy tensors against it too",
        ),
    ] = None,
    revision: RevisionOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", metavar="", help="print the plan; write nothing")
    ] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """FP8 checkpoint -> FP8: another layout, scheme, scale format or block, saying what was lossless
    (DST: SRC-<what changes>, e.g. ckpt-fp8-ue8m0)."""
    from fp8conv.convert import ConvertOptions, convert_suffix, plan_for_convert
    from fp8conv.convert import convert as run_convert

    def options():
        return ConvertOptions(
            format=format,
            scheme=scheme,
            scale_fmt=scale_fmt,
            block_size=block_size,
            reference=reference,
            target=target,
            dry_run=dry_run,
            device=device,
            overwrite=overwrite,
        )

    if dry_run:
        cp = run_guarded(
            lambda: plan_for_convert(src, options(), revision=revision), json_out, protect=(src,)
        )
        rows = cp.report()
        lossy = [r["tensor"] for r in rows if not r["lossless"]]
        kept = {r["tensor"]: r["how"] for r in rows if r["tensor"] in cp.kept}
        emit_json(
            json_out,
            {
                "ok": True,
                "dry_run": True,
                "lossless": not lossy,
                "tensors": rows,
                "kept_bf16": kept,
                "modules_to_not_convert": cp.plan.modules_to_not_convert,
                "notes": cp.notes,
            },
            (src,),
        )
        if json_out != "-":
            for note in cp.notes:
                log(f"note: {note}")
            requant = len(lossy) - len(kept)
            said = [f"{requant} requantized (lossy, measured when written)"] if requant else []
            if kept:
                said.append(f"{len(kept)} kept bf16, each with its reason below (measured when written)")
            out.print(
                f"convert plan ({cp.source_format} {cp.source_scheme} -> "
                f"{cp.writer.format} {cp.writer.scheme}): "
                f"{len(rows)} FP8 weights, " + ("; ".join(said) or "all lossless"),
                highlight=False,
            )
            for name, how in kept.items():  # whole: the reason is the loader's own message
                out.print(Text(f"  {name}: {how}"), soft_wrap=True, highlight=False)
        return
    opts = run_guarded(options, json_out)
    out_dir = where_to(src, dst, convert_suffix(opts), revision)
    progress = ConsoleProgress(quiet, "convert", dst=out_dir)
    summary, cp = run_guarded(
        lambda: run_convert(src, out_dir, opts, progress, revision=revision),
        json_out,
        protect=(src, out_dir),
    )
    rows = cp.report()
    lossy = [r for r in rows if not r["lossless"]]
    if not quiet:
        from rich.table import Table

        for r in rows:
            if r["tensor"] in cp.kept:
                exact = (
                    "lossless: the bf16 values equal the FP8 ones"
                    if r["lossless"]
                    else "lossy: bf16 rounds them"
                )
                err.print(Text(f"{r['tensor']}: {r['how']} ({exact})"), soft_wrap=True, highlight=False)
        if lossy:
            table = Table(
                title=f"lossy: {len(lossy)} of {len(rows)} weights changed their values (worst first)"
            )
            cols = ["tensor", "how", "SQNR dB", "rel. error"]
            if reference:
                cols += ["SQNR vs BF16 dB (was)"]
            for col in cols:
                table.add_column(col)

            def db(v) -> str:
                return f"{v:.2f}" if v is not None else "-"

            for r in lossy:
                how = "kept bf16 (above)" if r["tensor"] in cp.kept else r["how"]
                row = [r["tensor"], how, db(r["sqnr_db"]), f"{r['rel_error'] or 0:.3e}"]
                if reference:
                    row.append(f"{db(r['sqnr_vs_reference_db'])} ({db(r['source_sqnr_vs_reference_db'])})")
                table.add_row(*row)
            err.print(table)
        else:
            bf16 = f" ({len(cp.kept)} of them as bf16)" if cp.kept else ""
            err.print(
                f"lossless: all {len(rows)} FP8 weights kept their values exactly{bf16}", highlight=False
            )
    report_summary(summary, quiet, None)
    emit_json(
        json_out,
        {"ok": True, **summary.to_dict(), "lossless": not lossy, "tensors": rows},
        (summary.src, summary.dst),
    )


def _checkpoint_here_or_exit(ckpt: str | None, what: str, json_target: str | None) -> str:
    """CKPT as given, or the current folder when it holds a checkpoint (exit 2 when it does not)."""
    if ckpt is not None:
        return ckpt
    here = Path.cwd()
    if (here / "model.safetensors.index.json").is_file() or (here / "model.safetensors").is_file():
        return "."
    fail(
        UsageError(
            f"no CKPT given and the current folder {here} is not a checkpoint "
            "(no model.safetensors.index.json or model.safetensors)",
            hint=f"run `fp8conv {what}` inside a checkpoint folder, or name one: `fp8conv {what} PATH`",
        ),
        json_target,
    )
    raise AssertionError  # fail() always exits


@app.command(short_help="check a converted checkpoint (by default the current folder)")
def verify(
    ckpt: Annotated[
        Optional[str],
        typer.Argument(
            metavar="CKPT",
            help="checkpoint to check (FP8 or dequantized; folder or repo id); default: the current folder",
            show_default=False,
        ),
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option(
            "--reference",
            metavar="SRC",
            help="the source: original bf16/fp16/fp32 for an FP8 CKPT, FP8 for a dequantized one",
        ),
    ] = None,
    tensors: Annotated[
        Optional[list[str]],
        typer.Option(
            "--tensors",
            metavar="PATTERN",
            help="data checks only for these tensors (glob or re:REGEX; repeatable)",
        ),
    ] = None,
    sample: Annotated[
        Optional[int],
        typer.Option("--sample", metavar="N", help="data checks for N tensors picked at random"),
    ] = None,
    rows: Annotated[
        int, typer.Option("--rows", metavar="M", help="rows M of the random activations in the GEMM check")
    ] = 16,
    seed: Annotated[
        int, typer.Option("--seed", metavar="S", help="seed for --sample, activations and expert sampling")
    ] = 0,
    min_sqnr: Annotated[
        float, typer.Option("--min-sqnr", metavar="DB", help="with --reference: fail below this SQNR in dB")
    ] = 20.0,
    experts: Annotated[
        int,
        typer.Option(
            "--experts", metavar="N", help="stacked experts: GEMM-check this many per tensor (0 = all)"
        ),
    ] = 8,
    reference_mode: Annotated[
        Literal["auto", "exact", "statistical"],
        typer.Option(
            "--reference-mode",
            help="FP8 CKPT vs its original: exact (bit-for-bit re-quantization), statistical, or auto",
        ),
    ] = "auto",
    revision: RevisionOpt = None,
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
    ckpt = _checkpoint_here_or_exit(ckpt, "verify", json_out)
    from fp8conv.checkpoint.source import resolve_source
    from fp8conv.errors import VerificationFailed
    from fp8conv.verify import VerifyOptions, verify_checkpoint
    from fp8conv.verify.verify import render_table, summary_line

    def go():
        from fp8conv import targets

        opts = VerifyOptions(
            reference=None if reference is None else resolve_source(reference),
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
        progress = ConsoleProgress(quiet, "verify", transient=True, shards=False)
        return verify_checkpoint(resolve_source(ckpt, revision), opts, progress)

    protect = (ckpt,) + ((reference,) if reference else ())
    report = run_guarded(go, json_out, resumable=False, protect=protect)
    serving = report.serving
    emit_json(json_out, report.to_dict(), protect)
    console = err if json_out == "-" else out
    if not quiet:
        console.print(render_table(report, width=console.width))
    if serving is not None and (not quiet or not serving.ok):
        print_serving(serving, console)
    if not report.ok:
        for line in report.failures[:20]:
            log(f"FAIL {line}", style="red")
    if not quiet or not report.ok:
        log(summary_line(report))
    if not report.ok:
        raise typer.Exit(VerificationFailed.exit_code)


@app.command(short_help="describe a checkpoint: format, config, tensors, oddities")
def inspect(
    ckpt: Annotated[
        Optional[str],
        typer.Argument(
            metavar="CKPT",
            help="checkpoint folder or repo id; default: the current folder",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOpt = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    tp: TpOpt = None,
    ep: EpOpt = False,
) -> None:
    """Describe a checkpoint: format, quantization config, shards, tensors by dtype and role, oddities;
    with --tp, the tensor-parallel sizes vLLM and SGLang can load it at (informational, exit 0)."""
    ckpt = _checkpoint_here_or_exit(ckpt, "inspect", json_out)
    from fp8conv.checkpoint.source import resolve_source
    from fp8conv.verify.inspect import inspect_checkpoint, inspect_table

    def go():
        return inspect_checkpoint(resolve_source(ckpt, revision))

    info = run_guarded(go, json_out, resumable=False, protect=(ckpt,))
    serving = serving_for(ckpt, revision, tp, ep, None, False, json_out)
    if serving is not None:
        info = {**info, "serving": serving.to_dict()}
    emit_json(json_out, info, (ckpt,))
    console = err if json_out == "-" else out
    console.print(inspect_table(info))
    if serving is not None:
        print_serving(serving, console, loaders=False)
    if not info["ok"]:
        # described, but damaged: not a checkpoint a loader can read (exit 3, as the converters)
        bad = [o for o in info["odd"] if o["kind"].startswith("structure:")]
        first = bad[0] if bad else {"file": info["path"], "message": "damaged"}
        log(
            f"error (exit 3): {first['file'] or info['path']}: {first['message']} "
            f"({len(bad)} structural problem(s) listed above)",
            style="bold red",
        )
        raise typer.Exit(3)


def serving_for(ckpt, revision, tp, ep, target, blackwell, json_out, device="cpu"):
    """The serving report when any of its options is given, else None."""
    if tp is None and target is None and not blackwell and not ep:
        return None
    from fp8conv import targets
    from fp8conv.checkpoint.source import resolve_source

    def go():
        sizes = targets.parse_tp_sizes(tp) if tp is not None else (targets.DEFAULT_TP if ep else ())
        path = resolve_source(ckpt, revision)
        return targets.serving_report(path, sizes, ep, targets.parse_targets(target), blackwell, device)

    return run_guarded(go, json_out, resumable=False)


def print_serving(report, console: Console, loaders: bool = True) -> None:
    """Render a fp8conv.targets.ServingReport: TP x loader matrix, loader verdicts, requant loss."""
    from rich.markup import escape
    from rich.table import Table

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
    # `fp8conv --version` answers before Typer converts any option value (its conversion imports
    # pydantic: 0.1-0.2 s of the 0.3 s that `--version` otherwise takes on a 2-core machine).
    if sys.argv[1:] in (["--version"], ["-V"]):
        print(f"fp8conv {__version__}")
        return
    try:
        app(prog_name="fp8conv")
    except KeyboardInterrupt:
        stop_displays()
        log("interrupted (Ctrl-C); run the same command again to resume", style="bold red")
        sys.exit(130)


if __name__ == "__main__":
    main()
