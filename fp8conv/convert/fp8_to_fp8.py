"""`fp8conv convert`: an FP8 checkpoint into another FP8 layout, scheme, scale format or block, without
a BF16 round trip, saying for every tensor whether the change was lossless.

What each request does to a quantized weight (source: any family fp8conv.formats detects, with e4m3
weights scaled per block, per channel or per 1 x 32 MX group):

- `--format` alone (relayout): codes copied byte for byte, the scale renamed (`weight_scale_inv` <->
  `weight_scale`) and copied when its dtype is one the target layout stores (float scales; e8m0 bytes
  for MXFP8), else widened to float32 exactly; the config rewritten. Lossless.
- `--block-size B` where B's tiles nest in the source's (each new tile inside one old tile): codes copied,
  every new tile inherits its old tile's scale. Lossless. Tiles that do not nest are refused.
- `--scheme mxfp8` from a block scheme whose scales are all powers of two (UE8M0) and whose tile width
  is a multiple of 32: codes copied, every 1 x 32 group inherits its tile's exponent. Lossless.
- `--scale-fmt ue8m0`: DeepGEMM's load-time requant, done offline (fp8conv.targets.requant: dequantize in
  float32, quantize again per tile with power-of-two scales). Lossy where a scale was not a power of two.
- `--scheme fp8-channel`, or MXFP8 from float block scales: dequantize in float32, quantize again in the
  new scheme (kernels.channel_quant / mx_quant). Lossy.

Every lossy tensor is measured against the FP8 source's own dequantized weight: SQNR in dB and
relative Frobenius error, reported worst first; with `--reference BF16`, also the SQNR of the new and of
the source weight against the original BF16 one.

`--target transformers|vllm|sglang`: a weight that loader could not load or run in the output's scheme,
layout and block (fp8conv.convert.targeting, the rules quantize's --target applies) is written bf16 by
`fp8conv dequantize`'s own job for it (the same bytes), its scale dropped and its module added to the
config's skip list; its change reads "kept bf16: <reason>", lossless only where every bf16 value equals
the FP8 one exactly (power-of-two scales), which is measured once it is written.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES, ShardReader, TensorInfo
from fp8conv.convert import decode
from fp8conv.convert.options import TARGETS
from fp8conv.convert.plan import Plan, ShardPlan, TensorJob
from fp8conv.convert.targeting import LOADERS, apply_targets, notes_for, targets_of
from fp8conv.errors import InvalidCheckpoint, UsageError
from fp8conv.formats import Element, Granularity, QuantizedWeight, detect, strip_config, strip_params
from fp8conv.formats.scheme import MX_GROUP
from fp8conv.formats.writers import SCHEME_OF_GRANULARITY, Writer, format_of, writer
from fp8conv.kernels import channel_quant, mx_quant, resolve_device, scale_to_float32
from fp8conv.kernels.reference import expand_scales

SCALE_FMTS = ("keep", "float", "ue8m0")


@dataclass(frozen=True)
class ConvertOptions:
    format: str | None = None  # None: the source's layout
    scheme: str | None = None  # None: the source's scheme
    scale_fmt: str = "keep"
    block_size: tuple[int, int] | None = None  # None: the source's block
    reference: str | None = None  # the original BF16 checkpoint: lossy tensors are also measured against it
    target: str = "any"  # the loader the output must load and run in: what it cannot stays bf16
    dry_run: bool = False
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        from fp8conv.convert.options import parse_block

        if self.scale_fmt not in SCALE_FMTS:
            raise UsageError(f"--scale-fmt must be one of {', '.join(SCALE_FMTS)}, not {self.scale_fmt!r}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.block_size is not None:
            object.__setattr__(self, "block_size", parse_block(self.block_size))

    def job_key(self) -> dict:
        d = asdict(self)
        for k in ("dry_run", "device", "overwrite"):
            d.pop(k)
        d["block_size"] = list(self.block_size) if self.block_size else None
        return {"command": "convert", **d}


@dataclass
class TensorChange:
    tensor: str
    how: str  # "relayout", "nested tiles", "inherited exponents", "requantized", "kept bf16: <reason>"
    lossless: bool  # kept bf16: whether every bf16 value equals the FP8 one exactly (measured when written)
    sqnr_db: float | None = None  # lossy: against the source's dequantized weight
    rel_error: float | None = None
    # with --reference: the new weight and the FP8 source each against the original BF16 weight
    sqnr_vs_reference_db: float | None = None
    source_sqnr_vs_reference_db: float | None = None


@dataclass
class ConvertPlan:
    plan: Plan
    source_format: str
    source_scheme: str
    writer: Writer
    block: tuple[int, int] | None
    changes: dict[str, TensorChange] = field(default_factory=dict)  # filled as tensors are written
    reference: Checkpoint | None = None  # --reference: the original BF16 checkpoint
    kept: dict[str, QuantizedWeight] = field(default_factory=dict)  # --target: written bf16 instead

    @property
    def notes(self) -> list[str]:
        return self.plan.notes

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.changes.values())

    def report(self) -> list[dict]:
        """Per tensor, worst first (lowest SQNR), lossless ones last."""
        rows = sorted(
            self.changes.values(),
            key=lambda c: (c.lossless, c.sqnr_db if c.sqnr_db is not None else math.inf, c.tensor),
        )
        return [asdict(c) for c in rows]


def _source_scheme(found, ckpt: Checkpoint) -> tuple[str, tuple[int, int] | None]:
    schemes, blocks = set(), set()
    for w in found.weights.values():
        g = w.layout.granularity
        if w.element is not Element.FP8_E4M3 or g not in SCHEME_OF_GRANULARITY:
            raise InvalidCheckpoint(
                f"{w.scheme.describe()}: fp8conv convert reads e4m3 weights scaled per block, per channel "
                "or per 1 x 32 MX group",
                file=ckpt.root / ckpt.weight_map[w.name],
                tensor=w.name,
                hint="fp8conv dequantize, then fp8conv quantize",
            )
        schemes.add(SCHEME_OF_GRANULARITY[g])
        if g is Granularity.BLOCK:
            blocks.add(w.layout.tile)
    if not schemes:
        raise InvalidCheckpoint(
            "no FP8 weight to convert", file=ckpt.root, hint="fp8conv quantize reads BF16"
        )
    if len(schemes) > 1 or len(blocks) > 1:
        raise InvalidCheckpoint(
            f"weights in more than one scheme ({', '.join(sorted(schemes))}; tiles {sorted(blocks)}): "
            "fp8conv convert takes one scheme in",
            file=ckpt.root,
        )
    return schemes.pop(), (blocks.pop() if blocks else None)


def plan_convert(ckpt: Checkpoint, opts: ConvertOptions) -> ConvertPlan:
    found = detect(ckpt)
    for a in found.artifacts.values():
        if a.kind.value != "weight_scale":
            raise InvalidCheckpoint(
                f"{a.kind.value} tensor: static activation or KV-cache scales have no place in the layouts "
                "fp8conv convert writes",
                file=ckpt.root / ckpt.weight_map[a.name],
                tensor=a.name,
            )
    src_scheme, src_block = _source_scheme(found, ckpt)
    fmt = opts.format or format_of(found.family)
    scheme = opts.scheme or src_scheme
    w = writer(fmt, scheme)
    block = opts.block_size or src_block or (128, 128)
    if scheme != "fp8-block" and opts.block_size is not None:
        raise UsageError(f"--block-size applies to --scheme fp8-block; {scheme} fixes its tile")
    if scheme == "fp8-block" and src_scheme != "fp8-block":
        raise UsageError(
            f"--scheme fp8-block from {src_scheme}: a block tile spans rows that each had their own scale",
            hint="fp8conv dequantize, then fp8conv quantize",
        )
    if scheme == "fp8-block" and block != src_block and opts.scale_fmt == "keep":
        bm, bn = block
        if src_block[0] % bm or src_block[1] % bn:
            raise UsageError(
                f"--block-size {bm}x{bn} does not nest in the source's {src_block[0]}x{src_block[1]} tiles: "
                "each new tile must lie inside one old tile",
                hint=f"pick a block whose sides divide {src_block[0]} and {src_block[1]}",
            )
    if opts.scale_fmt == "ue8m0" and (scheme != "fp8-block" or block != src_block):
        raise UsageError(
            "--scale-fmt ue8m0 requantizes block scales in place: use it without --scheme or --block-size"
        )
    if w.format == "compressed-tensors":
        stacked = next((qw for qw in found.weights.values() if len(qw.shape) != 2), None)
        if stacked is not None:
            raise InvalidCheckpoint(
                f"stacked experts {list(stacked.shape)}: compressed-tensors' config groups target Linear "
                "layers (2-D weights), so its loaders would not read this tensor as FP8",
                file=ckpt.root / ckpt.weight_map[stacked.name],
                tensor=stacked.name,
                hint="keep --format fp8 for this checkpoint",
            )
    cp = ConvertPlan(Plan([], None), found.family, src_scheme, w, block if scheme == "fp8-block" else None)
    cp.reference = _open_reference(opts.reference, found, ckpt) if opts.reference else None
    power_of_two = (
        _all_power_of_two(ckpt, found) if scheme == "mxfp8" and src_scheme == "fp8-block" else False
    )
    rules = _rules(w, block if scheme == "fp8-block" else None)
    kept, tensors, base, quant = _kept_for_target(ckpt, found, rules, opts, w)
    if kept and len(kept) == len(found.weights):
        lead = f"--target {opts.target}: " if opts.target != "any" else ""
        raise InvalidCheckpoint(
            f"{lead}every FP8 weight would be written bf16 (first: "
            f"{next(iter(kept))}: {next(iter(kept.values()))}); nothing is left to convert",
            file=ckpt.root,
            hint="fp8conv dequantize writes the whole checkpoint in bf16; or pick another --block-size",
        )
    # the codes job where the source's codes are, the scale job where its scale is (same shards, same
    # order: a relayout's round trip is byte-identical); a weight kept bf16 becomes the dequantize's
    # job for it and its scale is dropped
    jobs: dict[str, TensorJob | None] = {}
    for qw in found.weights.values():
        if qw.name in kept:
            jobs[qw.name], jobs[qw.scale.name] = _kept_job(ckpt, cp, qw, kept[qw.name]), None
            continue
        codes, scale = _weight_jobs(
            ckpt, cp, qw, ckpt.info(qw.name), w, block, src_scheme, opts, power_of_two
        )
        jobs[qw.name], jobs[qw.scale.name] = codes, scale
    shards = []
    not_converted: list[str] = [_module_of(n) for n in kept]
    for shard_name, header in ckpt.shards.items():
        sp = ShardPlan(shard_name, header.metadata)
        for name, info in header.tensors.items():
            if name in jobs:
                if jobs[name] is not None:
                    sp.jobs.append(jobs[name])
                continue
            sp.jobs.append(TensorJob(name, "copy", info, info.dtype, info.shape, reason="not FP8"))
            if name.endswith(".weight") and info.dtype in FLOAT_DTYPES and len(info.shape) in (2, 3):
                not_converted.append(name[: -len(".weight")])
        shards.append(sp)
    config = strip_config(ckpt.config, _dtype_name(ckpt.config))
    skipped = sorted(set(not_converted) | {"lm_head"})
    if config is not None:
        scale_fmt = "ue8m0" if opts.scale_fmt == "ue8m0" or _was_ue8m0(found) else "float"
        config["quantization_config"] = w.config(block, skipped, scale_fmt)
    write_files = {}
    if found.rewrite_params and found.settings.params is not None:
        write_files["params.json"] = strip_params(found.settings.params)
    cp.plan = Plan(
        shards, config, skipped, family=found.family, drop_files=found.side_files, write_files=write_files
    )
    cp.plan.notes = notes_for(
        ckpt.config,
        tensors,
        base,
        quant,
        *rules,
        opts.target,
        "kept bf16",
    )
    return cp


def _rules(w: Writer, block: tuple[int, int] | None) -> tuple[str, tuple[int, int] | None, int | None]:
    """What the loader rules see of the output: its quant_method, block (block scheme) and act group."""
    return w.format, block, w.act_group


def _kept_for_target(ckpt: Checkpoint, found, rules, opts: ConvertOptions, w: Writer):
    """The FP8 weights written bf16 (name -> why): those the output scheme cannot hold (MXFP8 needs K a
    multiple of 32, as quantize leaves such weights bf16) and those the --target loader could not load
    or run in the output's scheme, layout and block; and the rule inputs the plan's notes are made from."""
    scales = {qw.scale.name for qw in found.weights.values()}
    # the output's tensors as the rules see them: an FP8 weight kept back is bf16, its scale gone
    tensors = {
        n: ("BF16" if n in found.weights else ckpt.info(n).dtype, tuple(ckpt.info(n).shape))
        for n in ckpt.weight_map
        if n not in scales
    }
    base = {n: None if n in found.weights else "not FP8" for n in tensors}
    for n, qw in found.weights.items():
        base[n] = w.unfit(tuple(qw.shape))
    quant = apply_targets(ckpt.config, tensors, base, *rules, targets_of(opts.target))
    kept = {n: why for n, why in quant.items() if n in found.weights and why is not None}
    # a stacked-experts parameter (transformers v5 `experts.gate_up_proj`) is skipped by its module,
    # which holds the others too: they stay bf16 with it, or the skip list would misdescribe them
    for name, why in list(kept.items()):
        if not name.endswith(".weight"):
            module = _module_of(name)
            for other in found.weights:
                if other not in kept and not other.endswith(".weight") and _module_of(other) == module:
                    loader = why.split(":", 1)[0]  # a loader's reason keeps its loader first (notes)
                    lead = f"{loader}: " if loader in LOADERS else ""
                    kept[other] = quant[other] = (
                        f"{lead}{module} is skipped as a whole for {name}: one precision per module"
                    )
    return kept, tensors, base, quant


def _module_of(name: str) -> str:
    """The module a weight's skip-list entry names: `X` for `X.weight`, the parent of a stacked-experts
    parameter (`...mlp.experts` for `...mlp.experts.gate_up_proj`)."""
    return name[: -len(".weight")] if name.endswith(".weight") else name.rsplit(".", 1)[0]


def _kept_job(ckpt: Checkpoint, cp: ConvertPlan, qw: QuantizedWeight, why: str) -> TensorJob:
    """A weight the target cannot run in FP8: `fp8conv dequantize`'s own job for it (the same decode,
    the same checks, the same bf16 bytes). Whether the bf16 values equal the FP8 ones exactly is
    measured after it is written (`measure_kept`)."""
    cp.kept[qw.name] = qw
    cp.changes[qw.name] = TensorChange(qw.name, f"kept bf16: {why}", False)
    job = TensorJob(qw.out_name, "dequant", ckpt.info(qw.name), "BF16", qw.out_shape, scale=qw.scale)
    job.block, job.weight = decode.kernel_tile(qw), qw
    return job


def _dtype_name(config: dict | None) -> str:
    config = config or {}
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


def _was_ue8m0(found) -> bool:
    qc = found.settings.config or {}
    return qc.get("scale_fmt") == "ue8m0" or any(e.power_of_two for e in found.scale_encodings)


def _all_power_of_two(ckpt: Checkpoint, found) -> bool:
    for qw in found.weights.values():
        if qw.layout.encoding.power_of_two:
            continue
        s = _read(ckpt, qw.scale).float()
        if not bool((torch.frexp(s).mantissa.abs() == 0.5).all()):
            return False
    return True


def _read(ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
    with ShardReader(ckpt.shards[ckpt.weight_map[info.name]]) as r:
        return r.read_tensor(info)


def _source_weight(ckpt: Checkpoint, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """A source weight's e4m3 codes [E, M, N] and its float32 scales broadcast to the full grid
    [E, R, C] (E = 1 for a 2-D weight), as the requant and the kept-bf16 measurement read them."""
    m, n = tuple(qw.shape)[-2:]
    q = _read(ckpt, qw.codes).view(torch.float8_e4m3fn).reshape(-1, m, n)
    grid = qw.layout.grid
    s = scale_to_float32(_read(ckpt, qw.scale)).reshape(qw.layout.view).expand(grid)
    return q, s.reshape(-1, *grid[-2:])


def _weight_jobs(ckpt, cp, qw: QuantizedWeight, info, w: Writer, block, src_scheme, opts, power_of_two):
    """The codes job and the scale job of one quantized weight."""
    name, sname = qw.name, w.scale_name(qw.name)
    shape = tuple(qw.shape)
    sshape = w.scale_shape(shape, block)
    src_tile = qw.layout.tile
    same_scheme = w.scheme == src_scheme and (w.scheme != "fp8-block" or block == src_tile)
    if same_scheme and opts.scale_fmt != "ue8m0":
        cp.changes[name] = TensorChange(name, "relayout", True)
        codes = TensorJob(name, "copy", info, info.dtype, info.shape, reason="relayout: codes as they are")
        sdt = qw.scale.dtype
        keep = sdt in FLOAT_DTYPES if w.scale_dtype == "F32" else sdt == "U8"
        if keep and tuple(qw.scale.shape) == sshape:
            return codes, TensorJob(sname, "copy", qw.scale, sdt, sshape, reason="relayout: scale renamed")
        return codes, _scale_compute(ckpt, qw, sname, sshape, w, lambda s: s)
    if w.scheme == "fp8-block" and opts.scale_fmt != "ue8m0":  # nested tiles
        cp.changes[name] = TensorChange(name, "nested tiles", True)
        codes = TensorJob(
            name, "copy", info, info.dtype, info.shape, reason="nested tiles: codes as they are"
        )

        def nest(s: torch.Tensor) -> torch.Tensor:
            return _inherit(s, shape, src_tile, block)

        return codes, _scale_compute(ckpt, qw, sname, sshape, w, nest)
    if w.scheme == "mxfp8" and src_scheme == "fp8-block" and power_of_two and src_tile[1] % MX_GROUP == 0:
        cp.changes[name] = TensorChange(name, "inherited exponents", True)
        codes = TensorJob(
            name, "copy", info, info.dtype, info.shape, reason="MX groups inherit the tile exponent"
        )

        def inherit(s: torch.Tensor) -> torch.Tensor:
            return _inherit(s, shape, src_tile, (1, MX_GROUP))

        return codes, _scale_compute(ckpt, qw, sname, sshape, w, inherit)
    return _requant_jobs(ckpt, cp, qw, w, sname, sshape, opts)


def _inherit(s: torch.Tensor, shape, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Scales of `old` tiles spread over the `new` tiles nested in them: the new grid element (i, j)
    takes the old tile holding its first element."""
    *lead, m, n = shape
    gm, gn = math.ceil(m / new[0]), math.ceil(n / new[1])
    rows = torch.arange(gm) * new[0] // old[0]
    cols = torch.arange(gn) * new[1] // old[1]
    return s[..., rows, :][..., cols].contiguous()


def _exponent_bytes(s: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales as their e8m0 bytes (exact)."""
    return ((s.float().contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def _scale_out(s: torch.Tensor, w: Writer):
    """Scales as the writer stores them, as a buffer: float32, or e8m0 exponent bytes (from power-of-two
    float32 scales, or already bytes)."""
    if w.scale_dtype == "U8":
        e = s if s.dtype == torch.uint8 else _exponent_bytes(s)
        return e.contiguous().reshape(-1).numpy()
    return s.float().contiguous().view(torch.uint8).reshape(-1).numpy()


def _scale_compute(ckpt, qw: QuantizedWeight, sname, sshape, w: Writer, fn) -> TensorJob:
    def compute() -> bytes:
        s = scale_to_float32(_read(ckpt, qw.scale)).reshape(qw.layout.view).expand(qw.layout.grid)
        return _scale_out(fn(s.contiguous()), w)

    return TensorJob(sname, "compute", None, w.scale_dtype, sshape, compute=compute)


# Elements of one band of a requantized weight: its float32 and float64 work is a few times this, whatever
# the tensor's size (a whole 7168 x 18432 weight at once took 18x its bf16 size in memory). 2 Mi ran
# faster than 8 Mi with a band per core (bench_convert.py, 2 cores: 11.0 s against 15.8 s, peak RSS
# 1.08 against 1.95 GB). On a GPU the bands run one after another, larger (fewer launches per element;
# ~60 bytes of work per element, about 1 GB at 16 Mi).
BAND_ELEMS = 2 << 20
GPU_BAND_ELEMS = 16 << 20
# Elements per call of channel_quant / mx_quant on the CPU: their fresh temporaries for a whole 2 Mi
# band fault their pages in every time (per-channel 14.6 ms per 256 x 7168 band whole, 4.8-6.5 in
# pieces of 16-64 rows; MXFP8 17.2 against 6.6-11.3; bench/NOTES.md).
QUANT_PIECE_ELEMS = 1 << 18
_CORES = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
_E4M3_TABLE: dict[torch.device, torch.Tensor] = {}


def _placement(spec: str) -> tuple[torch.device, int, int]:
    """Where a weight's bands run: (device, bands at once, elements per band). The CPU runs one band
    per core; a GPU runs them in turn (one stream), the codes and scales moved there once per weight."""
    device, _ = resolve_device(spec)
    if device.type == "cuda":
        return device, 1, GPU_BAND_ELEMS
    return device, _CORES, BAND_ELEMS


class _Buffers:
    """Float work buffers reused band after band (by one thread): a fresh multi-MB tensor per band costs
    page faults on the CPU (a table lookup into new memory ran at 4.2 ns per element, 0.65 into a
    reused buffer; bench/NOTES.md)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, tag: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get((tag, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(tag, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def _decode(q: torch.Tensor, buf: _Buffers, tag: str) -> torch.Tensor:
    """float32 values of e4m3 codes [rows, cols], by a 256-entry table built with torch's own cast (so
    each value, NaN codes included, is exactly what q.float() gives); torch's float8 -> float32 cast is
    a scalar loop on the CPU (6 ns per element here, the lookup 0.9)."""
    table = _E4M3_TABLE.get(q.device)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        table = _E4M3_TABLE.setdefault(q.device, codes.float().to(q.device))
    idx = buf.get("idx", torch.int32, tuple(q.shape))
    idx.copy_(q.view(torch.uint8))
    out = buf.get(tag, torch.float32, tuple(q.shape))
    torch.index_select(table, 0, idx.view(-1), out=out.view(-1))
    return out


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """Each row of t [rows, cols] (float64, overwritten) summed by folding halves: column j + column
    j + h, then again, down to one column (an odd width first adds its last column into the first).
    A fixed sequence of IEEE float64 additions, so the same bits on the CPU and on a GPU, whatever the
    band or thread. For non-negative terms within L * 2**-53 of the exact sum, L <= 2 floor(log2 cols)
    the additions on the longest path (a fold, and one more at an odd width)."""
    w = t.shape[1]
    if w == 0:
        return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
    while w > 1:
        h = w // 2
        if w % 2:
            t[:, 0].add_(t[:, w - 1])
        t[:, :h].add_(t[:, h : 2 * h])
        w = h
    return t[:, 0].clone()


def _sq_rows(a: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """Per row, the float64 sum of (a - b)**2, or a**2 (a float32 or float64, b float64): a widened to
    float64 exactly into t, the difference and the square taken in float64, as the figure always took
    them."""
    t.copy_(a)
    if b is not None:
        t.sub_(b)
    return _row_sums(t.mul_(t))


def _new_tile(kind: str, src_tile: tuple[int, int], n: int) -> tuple[int, int]:
    """The tile of the new scales: the source's for UE8M0, a row for per-channel, 1 x 32 for MXFP8."""
    return src_tile if kind == "ue8m0" else (1, n) if kind == "fp8-channel" else (1, MX_GROUP)


def _requant_band(q, s, src_tile, kind, q2, orig, buf: _Buffers, quant_rows: int):
    """One band: codes q [rows, cols] with scales s [R, C] per src_tile -> new codes written into q2,
    returns (new float32 scales, float64 row sums [2, rows] of err**2 and ref**2, or [5, rows] with the
    reference band `orig`: also (new - orig)**2, (source - orig)**2, orig**2). `kind` is "ue8m0",
    "fp8-channel", or the MXFP8 exponent rule ("ceil" / "ct")."""
    from fp8conv.targets.requant import requant_ue8m0_band, tile_mul

    rows, cols = q.shape
    tile = _new_tile(kind, src_tile, cols)
    ref = _decode(q, buf, "ref")
    tile_mul(ref, s, src_tile, out=ref)
    if kind == "ue8m0":
        s2 = requant_ue8m0_band(ref, tile, q2, buf.get("work", torch.float32, (rows, cols)))
    else:
        s2 = torch.empty(rows, math.ceil(cols / tile[1]), dtype=torch.float32, device=q.device)
        for c0 in range(0, rows, quant_rows):  # rows are independent: any split gives the same bytes
            c1 = min(rows, c0 + quant_rows)
            if kind == "fp8-channel":
                q2[c0:c1], s2[c0:c1] = channel_quant(ref[c0:c1])
            else:
                q2[c0:c1], ex = mx_quant(ref[c0:c1], kind)
                s2[c0:c1] = scale_to_float32(ex)
    got = _decode(q2, buf, "got")
    tile_mul(got, s2, tile, out=got)
    # float64 copies made once (a mixed float32 / float64 operation would allocate its own)
    r64, t = (buf.get(tag, torch.float64, (rows, cols)) for tag in ("r64", "t"))
    r64.copy_(ref)
    err = _sq_rows(got, r64, t)
    against_reference = []
    if orig is not None:
        o64 = buf.get("o64", torch.float64, (rows, cols))
        o64.copy_(orig)
        against_reference = [_sq_rows(got, o64, t), _sq_rows(r64, o64, t), _sq_rows(o64, None, o64)]
    return s2, torch.stack([err, _sq_rows(r64, None, r64), *against_reference])


def _requantize(ckpt, cp, qw: QuantizedWeight, w: Writer, opts) -> dict[str, torch.Tensor]:
    """One weight quantized again, band by band (whole tile rows of about BAND_ELEMS elements, each expert
    on its own), on the conversion's device: new codes and float32 scales, the loss against the source
    (and the reference) from float64 sums. Each row's squares are summed in a fixed order (_row_sums)
    and the row sums added exactly (math.fsum), so the figures depend neither on the band size, the
    thread schedule nor the device; the codes and scales are the same bytes on every device (float32
    products, one rounding each; amax; bit operations; torch's RNE cast)."""
    device, workers, band_elems = _placement(opts.device)
    shape = tuple(qw.shape)
    m, n = shape[-2:]
    q_all, s_all = _source_weight(ckpt, qw)
    q_all, s_all = q_all.to(device), s_all.contiguous().to(device)
    src_tile = qw.layout.tile
    kind = "ue8m0" if opts.scale_fmt == "ue8m0" else w.scheme if w.scheme == "fp8-channel" else w.mx_rule
    tile = _new_tile(kind, src_tile, n)
    experts = q_all.shape[0]
    q_out = torch.empty((experts, m, n), dtype=torch.float8_e4m3fn, device=device)
    s_out = torch.empty(
        (experts, math.ceil(m / tile[0]), math.ceil(n / tile[1])), dtype=torch.float32, device=device
    )
    orig = None
    if cp.reference is not None:
        orig = _read(cp.reference, cp.reference.info(qw.name)).reshape(experts, m, n).to(device)
    bm = src_tile[0]
    step = max(bm, (band_elems // max(n, 1)) // bm * bm)
    # channel_quant / mx_quant allocate their temporaries: on the CPU in row pieces that stay in cache
    quant_rows = step if device.type == "cuda" else max(1, QUANT_PIECE_ELEMS // max(n, 1))
    local = threading.local()

    def band(e: int, r0: int) -> torch.Tensor:
        """One band requantized into q_out / s_out (disjoint slices); its rows' float64 sums [k, rows]."""
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = _Buffers(device)
        r1 = min(m, r0 + step)
        reference = None if orig is None else orig[e, r0:r1]
        sb = s_all[e, r0 // bm : math.ceil(r1 / bm)]
        s2, sums = _requant_band(
            q_all[e, r0:r1], sb, src_tile, kind, q_out[e, r0:r1], reference, buf, quant_rows
        )
        s_out[e, r0 // tile[0] : math.ceil(r1 / tile[0])] = s2
        return sums

    # On the CPU the bands run on the cores at once (torch's ops release the GIL; the conversion runs
    # them single-threaded). The row sums come back to the host once per weight.
    bands = [(e, r0) for e in range(experts) for r0 in range(0, m, step)]
    if workers > 1 and len(bands) > 1:
        with ThreadPoolExecutor(min(workers, len(bands)), thread_name_prefix="fp8conv-requant") as pool:
            results = list(pool.map(lambda b: band(*b), bands))
    else:
        results = [band(*b) for b in bands]
    k = 5 if orig is not None else 2
    rows = torch.cat(results, dim=1).cpu() if results else torch.zeros((k, 0), dtype=torch.float64)
    err, ref_sq, *more = (math.fsum(r) for r in rows.tolist())
    change = cp.changes[qw.name]
    change.lossless = err == 0
    change.rel_error = math.sqrt(err / ref_sq) if ref_sq > 0 else 0.0
    change.sqnr_db = _db(ref_sq, err)
    if orig is not None:
        o_err, o_src, o_sq = more
        change.sqnr_vs_reference_db = _db(o_sq, o_err)
        change.source_sqnr_vs_reference_db = _db(o_sq, o_src)
    scale = s_out.reshape(*shape[:-2], *s_out.shape[-2:])
    if w.scale_dtype == "U8":  # MXFP8's e8m0 bytes made where the scales are: a quarter of the transfer
        scale = _exponent_bytes(scale)
    return {"codes": q_out.reshape(shape).cpu(), "scale": scale.cpu()}


def _requant_jobs(
    ckpt, cp, qw: QuantizedWeight, w: Writer, sname, sshape, opts
) -> tuple[TensorJob, TensorJob]:
    """Codes and scale of one weight quantized again (lossy); the loss recorded when it is computed.
    Whichever of the two is written first computes both (they may lie in different shards)."""
    name = qw.name
    state: dict[str, torch.Tensor] = {}
    cp.changes[name] = TensorChange(name, "requantized", False)

    def result(part: str) -> torch.Tensor:
        if not state:
            state.update(_requantize(ckpt, cp, qw, w, opts))
        return state.pop(part)

    def codes():
        # the codes' own memory as a buffer (the writer and the checksum take any): no copy of a
        # weight-sized bytes object (1.27 s of a 6 s GPU convert of 2 GB went to that copy)
        return result("codes").contiguous().view(torch.uint8).reshape(-1).numpy()

    def scale() -> bytes:
        return _scale_out(result("scale"), w)

    return (
        TensorJob(name, "compute", None, "F8_E4M3", tuple(qw.shape), compute=codes),
        TensorJob(sname, "compute", None, w.scale_dtype, sshape, compute=scale),
    )


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf


def _open_reference(path: str, found, ckpt: Checkpoint) -> Checkpoint:
    """The original BF16 checkpoint; every FP8 weight of the source must be in it, same name and shape."""
    from fp8conv.checkpoint.layout import open_checkpoint

    ref = open_checkpoint(path)
    for qw in found.weights.values():
        if qw.name not in ref:
            raise InvalidCheckpoint(
                f"--reference {path} has no tensor {qw.name!r}", file=ref.root, tensor=qw.name
            )
        info = ref.info(qw.name)
        if tuple(info.shape) != tuple(qw.shape) or info.dtype not in FLOAT_DTYPES:
            raise InvalidCheckpoint(
                f"--reference holds {qw.name} as {info.dtype} {list(info.shape)}; the source's weight is "
                f"{list(qw.shape)} (a float tensor of that shape is needed)",
                file=ref.root / ref.weight_map[qw.name],
                tensor=qw.name,
            )
    return ref


def run_convert(ckpt: Checkpoint, cp: ConvertPlan, dst: Path, opts: ConvertOptions, progress=None):
    from fp8conv.convert import engine

    summary = engine.run(
        ckpt, cp.plan, Path(dst), "convert", opts.job_key(), opts.device, opts.overwrite, None, progress
    )
    summary.tensors_converted = len(cp.changes)
    summary.notes.extend(cp.notes)
    if cp.kept and summary.complete:
        measure_kept(ckpt, cp, Path(dst))
    return summary


def measure_kept(ckpt: Checkpoint, cp: ConvertPlan, dst: Path) -> None:
    """For every weight written bf16 for the target: the bf16 values as written in `dst` against the
    FP8 source's exact values (codes x scales, in float64, where the product is exact): lossless only
    when all are equal; else the SQNR and relative error (and, with --reference, against the original)."""
    from fp8conv.checkpoint.layout import open_checkpoint

    out = open_checkpoint(dst)
    for name, qw in cp.kept.items():
        shape = tuple(qw.shape)
        m, n = shape[-2:]
        got_all = _read(out, out.info(qw.out_name)).reshape(-1, *qw.out_shape[-2:])
        if qw.transpose:
            got_all = got_all.transpose(-1, -2)
        q_all, s_all = _source_weight(ckpt, qw)
        orig = None
        if cp.reference is not None:
            orig = _read(cp.reference, cp.reference.info(name)).reshape(-1, m, n)
        tile = qw.layout.tile
        bm = tile[0] if tile[0] < m else m
        step = max(bm, (BAND_ELEMS // max(n, 1)) // bm * bm)
        sums, equal = [0.0] * 5, True
        for e in range(q_all.shape[0]):
            for r0 in range(0, m, step):
                r1 = min(m, r0 + step)
                s_rows = s_all[e, r0 // tile[0] : math.ceil(r1 / tile[0])]
                exact = q_all[e, r0:r1].double() * expand_scales(s_rows, (r1 - r0, n), tile).double()
                got = got_all[e, r0:r1].double()
                equal = equal and torch.equal(got, exact)
                band = [float((got - exact).pow(2).sum()), float(exact.pow(2).sum()), 0.0, 0.0, 0.0]
                if orig is not None:
                    o64 = orig[e, r0:r1].double()
                    band[2:] = [
                        float((got - o64).pow(2).sum()),
                        float((exact - o64).pow(2).sum()),
                        float(o64.pow(2).sum()),
                    ]
                sums = [a + b for a, b in zip(sums, band, strict=True)]  # in band order
        err, ref_sq, o_err, o_src, o_sq = sums
        change = cp.changes[name]
        change.lossless = equal
        change.rel_error = math.sqrt(err / ref_sq) if ref_sq > 0 else 0.0
        change.sqnr_db = _db(ref_sq, err)
        if orig is not None:
            change.sqnr_vs_reference_db = _db(o_sq, o_err)
            change.source_sqnr_vs_reference_db = _db(o_sq, o_src)
