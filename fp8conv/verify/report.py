"""What verify found, as data: per-tensor records, file-level findings, the report and its JSON.

The library never prints: `render_table` and `summary_line` build what the CLI shows (a rich Table and
one line of text) from a finished report.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

STATUS_RANK = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}


def jsonable(x):
    """Floats as numbers; non-finite ones as the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def fmt_num(x: float, spec: str = ".1f") -> str:
    return format(x, spec) if math.isfinite(x) else str(x)


@dataclass
class Finding:
    """A problem that belongs to a file (or the checkpoint as a whole) rather than to one tensor."""

    check: str  # "index" | "header" | "config" | "files" | "leftover" | "reference" | ...
    status: str  # "fail" | "warn"
    message: str
    file: str | None = None
    tensor: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def text(self) -> str:
        where = [w for w in (self.file, f"tensor {self.tensor!r}" if self.tensor else None) if w]
        return ": ".join(where + [self.message])


@dataclass
class Outcome:
    """The result of one named check on one tensor."""

    status: str  # "pass" | "fail" | "warn" | "skip"
    message: str = ""


@dataclass
class TensorRecord:
    name: str
    file: str | None
    shape: list[int]
    dtype: str
    role: str  # "fp8_weight" | "dequantized_weight" | "scale" | "weight" | "other"
    selected: bool = False
    checks: dict[str, Outcome] = field(default_factory=dict)
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)

    def add(self, check: str, status: str, message: str = "") -> None:
        old = self.checks.get(check)
        if old is None:
            self.checks[check] = Outcome(status, message)
            return
        if STATUS_RANK[status] < STATUS_RANK[old.status]:
            old.status = status
        if message and message not in old.message:
            old.message = f"{old.message}; {message}" if old.message else message

    @property
    def status(self) -> str:
        if not self.checks:
            return "pass"
        return min((c.status for c in self.checks.values()), key=STATUS_RANK.__getitem__)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks.values())

    def to_dict(self) -> dict:
        return jsonable(
            {
                "name": self.name,
                "file": self.file,
                "shape": self.shape,
                "dtype": self.dtype,
                "role": self.role,
                "selected": self.selected,
                "status": self.status,
                "ok": self.ok,
                "checks": {k: {"status": c.status, "message": c.message} for k, c in self.checks.items()},
                "metrics": self.metrics,
            }
        )


class Findings:
    """Records and findings as the checks produce them; thread-safe (data checks run in a pool)."""

    def __init__(self) -> None:
        self.records: dict[str, TensorRecord] = {}
        self.findings: list[Finding] = []
        self._lock = threading.Lock()

    def add(self, finding: Finding) -> None:
        with self._lock:
            self.findings.append(finding)

    def record(self, name: str, file: str | None, shape, dtype: str, role: str) -> TensorRecord:
        with self._lock:
            rec = self.records.get(name)
            if rec is None:
                rec = self.records[name] = TensorRecord(name, file, list(shape), dtype, role)
            return rec


@dataclass
class VerifyReport:
    path: str
    format: str
    description: str
    reference: str | None
    reference_format: str | None
    reference_mode: str | None  # "exact" | "statistical" | None without --reference
    device: str
    device_note: str | None
    options: dict
    bounds: dict
    tensors: list[TensorRecord]  # worst first
    findings: list[Finding]  # file-level problems
    totals: dict
    seconds: float
    serving: object | None = None  # fp8conv.targets.ServingReport with --tp/--ep/--target/--blackwell

    @property
    def ok(self) -> bool:
        return (
            all(r.ok for r in self.tensors)
            and not any(f.status == "fail" for f in self.findings)
            and (self.serving is None or self.serving.ok)
        )

    @property
    def failures(self) -> list[str]:
        """One line per failure, naming file and/or tensor."""
        out = [f.text for f in self.findings if f.status == "fail"]
        if self.serving is not None and not self.serving.ok:
            out.append("serving: a requested TP size or loader fails (see the serving tables)")
        for r in self.tensors:
            for name, c in r.checks.items():
                if c.status == "fail":
                    out.append(f"{r.file}: tensor {r.name!r}: {name}: {c.message}")
        return out

    def to_dict(self) -> dict:
        return jsonable(
            {
                "ok": self.ok,
                "command": "verify",
                "path": self.path,
                "format": self.format,
                "description": self.description,
                "reference": self.reference,
                "reference_format": self.reference_format,
                "reference_mode": self.reference_mode,
                "device": self.device,
                "device_note": self.device_note,
                "options": self.options,
                "bounds": self.bounds,
                "totals": self.totals,
                "seconds": round(self.seconds, 3),
                "findings": [f.to_dict() for f in self.findings],
                "tensors": [r.to_dict() for r in self.tensors],
                **({"serving": self.serving.to_dict()} if self.serving is not None else {}),
            }
        )


def worst_first(records) -> list[TensorRecord]:
    """Failures first, then the lowest SQNR, then the highest GEMM error relative to its bound."""

    def key(r: TensorRecord):
        m = r.metrics
        sq = [v for v in (m.get("sqnr_db"), m.get("min_tile_sqnr_db")) if isinstance(v, float)]
        ratio = (m.get("gemm_rel_err") or 0.0) / (m.get("gemm_bound") or 1.0)
        return (STATUS_RANK[r.status], min(sq) if sq else float("inf"), -ratio, r.name)

    return sorted(records, key=key)


# ------------------------------------------------------------------------------------- rendering
def render_table(report: VerifyReport, limit: int = 30, width: int | None = None):
    """A rich Table of the worst tensors (failures first), for the CLI to print. Below 120 columns
    (`width`, the console's) the dtype and metrics columns fold into the others and names are shortened
    in the middle, so each row stays readable at 80 columns."""
    from rich.markup import escape
    from rich.table import Table

    from fp8conv.text import middle

    narrow = width is not None and width < 120
    name_width = max(24, (width or 0) * 2 // 5)

    def name(text: str) -> str:
        if narrow and len(text) > name_width and text.startswith("model."):
            text = "…" + text[len("model.") :]  # the layer number is what tells rows apart: keep it
        return escape(middle(text, name_width) if narrow else text)

    mode = f", {report.reference_mode} comparison" if report.reference_mode else ""
    table = Table(
        title=f"verify {report.path} ({report.format}"
        + (f" vs {report.reference}{mode}" if report.reference else "")
        + f", {report.device})"
    )
    cols = (
        ("tensor", "shape", "status", "checks")
        if narrow
        else ("tensor", "shape", "dtype", "status", "checks", "metrics")
    )
    for col in cols:
        table.add_column(col, overflow="fold", no_wrap=narrow and col in ("tensor", "shape", "status"))

    def row(tensor: str, shape: str, dtype: str, status: str, checks: str, metrics: str) -> None:
        if narrow:
            shape = f"{shape} {dtype}".strip()
            checks = "; ".join(x for x in (checks, metrics) if x)
            table.add_row(tensor, shape, status, checks)
        else:
            table.add_row(tensor, shape, dtype, status, checks, metrics)

    style = {"fail": "bold red", "warn": "yellow", "pass": "green", "skip": "dim"}
    shown = report.tensors[:limit]
    for r in shown:
        bad = [escape(f"{k}: {c.message}") for k, c in r.checks.items() if c.status in ("fail", "warn")]
        skipped = [k for k, c in r.checks.items() if c.status == "skip"]
        n_pass = sum(c.status == "pass" for c in r.checks.values())
        checks = (
            "\n".join(bad)
            if bad
            else f"{n_pass} passed" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        )
        m = r.metrics
        parts = []
        if isinstance(m.get("sqnr_db"), float):
            parts.append(f"SQNR {fmt_num(m['sqnr_db'])} dB (tile min {fmt_num(m['min_tile_sqnr_db'])})")
        if isinstance(m.get("gemm_rel_err"), float):
            parts.append(f"gemm {m['gemm_rel_err']:.1e}/{m['gemm_bound']:.0e}")
        if isinstance(m.get("output_cosine"), float):
            parts.append(f"cos {m['output_cosine']:.5f}")
        row(
            name(r.name),
            "x".join(map(str, r.shape)),
            r.dtype,
            f"[{style[r.status]}]{r.status}[/]",
            checks,
            ", ".join(parts),
        )
    if len(report.tensors) > limit:
        table.add_section()
        rest = report.tensors[limit:]
        row(f"... {len(rest)} more", "", "", f"{sum(not r.ok for r in rest)} failing", "", "")
    for f in report.findings:
        table.add_section()
        row(
            name(f.tensor or "(file)"),
            "",
            "",
            f"[{style[f.status]}]{f.status}[/]",
            escape(f"{f.check}: {f.file + ': ' if f.file else ''}{f.message}"),
            "",
        )
    return table


def summary_line(report: VerifyReport) -> str:
    t = report.totals
    mode = f", {report.reference_mode} comparison with the reference" if report.reference_mode else ""
    head = (
        f"verify: {t['tensors']} tensors ({t['fp8_weights']} FP8 weights), {t['selected']} with "
        f"data checks on {report.device}{mode}, {t['bytes_read'] / 1e6:.1f} MB read in "
        f"{report.seconds:.1f}s"
    )
    if report.ok:
        warn = (
            f" ({t['warned_tensors'] + t['file_warnings']} warning(s))"
            if (t["warned_tensors"] or t["file_warnings"])
            else ""
        )
        return f"{head}: all checks passed{warn}"
    return (
        f"{head}: FAILED: {t['failed_tensors']} tensor(s) with {t['failed_checks']} failed check(s), "
        f"{t['file_failures']} file-level failure(s)"
    )
