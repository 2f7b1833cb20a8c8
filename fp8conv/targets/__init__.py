"""Will this checkpoint load and run there? Tensor-parallel plans, loader rules, the loss a loader adds.

`serving_report(ckpt, tp_sizes, ep, targets, blackwell)` is the one entry point verify and inspect call;
it returns findings (data) and never prints. The pieces are usable per tensor by a planner:

- `arch.plan_model(config, tensors)`: the serving layers (column / row / merged / replicated / MoE);
- `tp.check_layer(layer, tp, ep, block, loader)`: the first partition rule a layer breaks;
- `tp.check_tensor(plan, tensor, tp, ep, block, loader)`: the same for one tensor in a scheme to be;
- `loaders.check_loaders(...)`: per target, loads or not and why;
- `weights.weight_refusal(target, method, shape, block, act_group)`: the per-weight rules behind it,
  which quantize's and convert's `--target` plans ask too;
- `requant.requant_loss(...)`: the error Blackwell's UE8M0 requant adds to one tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fp8conv.checkpoint.layout import Checkpoint, open_checkpoint
from fp8conv.checkpoint.safetensors_io import ShardReader
from fp8conv.errors import UsageError
from fp8conv.kernels import resolve_device
from fp8conv.targets.arch import FP8_DTYPES, ModelPlan, Role, plan_model
from fp8conv.targets.loaders import TARGETS, LoaderVerdict, check_loaders
from fp8conv.targets.requant import RequantLoss, requant_loss
from fp8conv.targets.scheme import Scheme, read_scheme
from fp8conv.targets.tp import TP_LOADERS, TpCell, check_tp, suggest_fix

__all__ = ["TARGETS", "DEFAULT_TP", "ServingReport", "parse_tp_sizes", "parse_targets", "serving_report"]

DEFAULT_TP = (1, 2, 4, 8, 16)
REQUANT_SUGGESTION = (
    "quantize with power-of-two scales so the server has nothing to requantize: "
    "fp8conv quantize --scale-fmt ue8m0 (or fp8conv convert --scale-fmt ue8m0 from this checkpoint)"
)


def parse_tp_sizes(text: str) -> tuple[int, ...]:
    """'1,2,4,8,16' -> (1, 2, 4, 8, 16); a bad list is a UsageError."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--tp wants positive integers separated by commas (e.g. 1,2,4,8,16), got {text!r}")
    return tuple(sorted(set(sizes)))


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    """'vllm,sglang' -> ('vllm', 'sglang'); None or '' -> None (the loaders of the checkpoint's format)."""
    if not text:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TARGETS]
    if bad:
        raise UsageError(f"unknown target {bad[0]!r}; known: {', '.join(TARGETS)}")
    return names


@dataclass
class ServingReport:
    architecture: str | None
    scheme: Scheme
    plan: ModelPlan
    tp_sizes: tuple[int, ...]
    ep: bool
    targets_requested: bool = False  # loader verdicts count towards `ok` only when targets were named
    cells: list[TpCell] = field(default_factory=list)
    fixes: dict[tuple[int, str], str] = field(default_factory=dict)
    loaders: list[LoaderVerdict] = field(default_factory=list)
    requant: list[RequantLoss] | None = None  # worst first; None when not asked for

    @property
    def failed_tp(self) -> list[int]:
        """Requested TP sizes that some loader refuses (or that cannot be judged)."""
        if not self.plan.known:
            return list(self.tp_sizes)  # cannot be judged: not a pass
        return sorted({c.tp for c in self.cells if not c.ok})

    @property
    def working_tp(self) -> list[int]:
        return [t for t in self.tp_sizes if t not in self.failed_tp]

    @property
    def ok(self) -> bool:
        """No requested TP size fails, and every loader that was asked for by name loads."""
        loaders_ok = not self.targets_requested or all(v.loads for v in self.loaders)
        return not self.failed_tp and loaders_ok

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture,
            "family": self.plan.family,
            "problem": self.plan.problem,
            "quant_method": self.scheme.method,
            "weight_block_size": list(self.scheme.block) if self.scheme.block else None,
            "ep": self.ep,
            "tp_sizes": list(self.tp_sizes),
            "working_tp": self.working_tp,
            "unmapped_fp8_tensors": self.plan.unmapped,
            "tp": [
                {
                    "tp": c.tp,
                    "loader": c.loader,
                    "ok": c.ok,
                    "failures": len(c.failures),
                    "first": None
                    if c.ok
                    else {
                        "layer": c.first.layer,
                        "tensor": c.first.tensor,
                        "message": c.first.message,
                        "rule": c.first.rule,
                        "source": c.first.source,
                    },
                    "fix": self.fixes.get((c.tp, c.loader)),
                }
                for c in self.cells
            ],
            "loaders": [
                {
                    "target": v.target,
                    "loads": v.loads,
                    "findings": [
                        {
                            "severity": f.severity,
                            "rule": f.rule,
                            "tensor": f.tensor,
                            "message": f.message,
                            "source": f.source,
                        }
                        for f in v.findings
                    ],
                }
                for v in self.loaders
            ],
            "blackwell_requant": None
            if self.requant is None
            else [
                {
                    "tensor": r.tensor,
                    "requantized": r.requantized,
                    "rel_error": r.rel_error,
                    "max_abs_error": r.max_abs_error,
                    "scales_changed": r.scales_changed,
                    "note": r.note,
                }
                for r in self.requant
            ],
        }


def _tensors(ckpt: Checkpoint) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (ckpt.info(name).dtype, tuple(ckpt.info(name).shape)) for name in ckpt.weight_map}


def _blackwell(ckpt: Checkpoint, scheme: Scheme, plan: ModelPlan, tensors, device) -> list[RequantLoss]:
    if scheme.block is None or scheme.scale_suffix is None:
        return []
    experts = {p.tensor for layer in plan.layers if layer.role == Role.MOE for p in layer.parts}
    out: list[RequantLoss] = []
    readers: dict[str, ShardReader] = {}
    try:
        for name, (dtype, shape) in tensors.items():
            if dtype not in FP8_DTYPES or len(shape) < 2:
                continue
            scale = name[: -len("weight")] + scheme.scale_suffix if name.endswith(".weight") else None
            if scale is None or scale not in tensors:
                continue
            q = _read(ckpt, readers, name).to(device)
            s = _read(ckpt, readers, scale).to(device)
            out.append(requant_loss(name, q, s, scheme.block, name in experts))
    finally:
        for r in readers.values():
            r.close()
    out.sort(key=lambda r: (-r.rel_error, r.tensor))
    return out


def _read(ckpt: Checkpoint, readers: dict[str, ShardReader], name: str):
    shard = ckpt.weight_map[name]
    if shard not in readers:
        readers[shard] = ShardReader(ckpt.shards[shard])
    return readers[shard].read_tensor(ckpt.info(name))


def serving_report(
    ckpt: str | os.PathLike | Checkpoint,
    tp_sizes: tuple[int, ...] = DEFAULT_TP,
    ep: bool = False,
    targets: tuple[str, ...] | None = None,
    blackwell: bool = False,
    device: str = "cpu",
) -> ServingReport:
    """For each TP size and each of vLLM/SGLang: ok, or the first failing tensor with the loader's error;
    per target: loads or not and why; with `blackwell`, the UE8M0 requant error per tensor, worst first.
    `targets` None checks the loaders that read the checkpoint's format (compressed-tensors only for a
    compressed-tensors checkpoint); named targets also decide `ok`. `tp_sizes` () skips the TP matrix.
    Headers and config only, except `blackwell`, which reads every FP8 weight and its scale and computes
    the requant on `device` (auto | cpu | cuda | cuda:N; the figures agree across devices)."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = open_checkpoint(ckpt)
    tensors = _tensors(ckpt)
    scheme = read_scheme(ckpt)
    plan = plan_model(ckpt.config, tensors)
    report = ServingReport(plan.architecture, scheme, plan, tuple(tp_sizes), ep, targets is not None)
    if targets is None:
        targets = tuple(
            t for t in TARGETS if t != "compressed-tensors" or scheme.method == "compressed-tensors"
        )
    if plan.known:
        for tp in report.tp_sizes:
            for loader in TP_LOADERS:
                cell = check_tp(plan, tp, ep, scheme.block, loader)
                report.cells.append(cell)
                if not cell.ok:
                    report.fixes[(tp, loader)] = suggest_fix(plan, cell, scheme.block)
    no_format = [n for n, h in ckpt.shards.items() if (h.metadata or {}).get("format") != "pt"]
    report.loaders = check_loaders(scheme, plan, tensors, no_format, targets)
    if blackwell:
        report.requant = _blackwell(ckpt, scheme, plan, tensors, resolve_device(device)[0])
    return report
