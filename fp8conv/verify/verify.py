"""`fp8conv verify`: is this FP8 (or dequantized) checkpoint what it claims to be, and does it compute?

Three layers of checks (docs/verify.md lists each one, its bound and why):

* structure, from headers and config.json only, always over every tensor: index and shards agree, each
  FP8 weight has exactly one scale of the right name, dtype and shape, quantization_config agrees with
  the tensors, skip lists agree with what is quantized, a dequantized checkpoint keeps no scale and no
  quantization_config;
* data, over the selected tensors (all, or --tensors / --sample): scale values, NaN codes, and a GEMM
  of seeded random activations through the product's own kernels against a float64 reference;
* --reference: SQNR / per-tile gain / output cosine against the original weights (FP8 CKPT), or bit
  equality with weight_dequant of the source (dequantized CKPT).

Tensor data is read through ShardReader in row bands of whole tiles, never whole shards. The library
never prints; the CLI renders `VerifyReport` (render_table / summary_line) and maps `ok` to exit 0 / 1.
"""

from __future__ import annotations

import fnmatch
import math
import random
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fp8conv.checkpoint.layout import CONFIG_NAME, Checkpoint, open_checkpoint
from fp8conv.checkpoint.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    FP8_WEIGHT_DTYPES,
    ShardReader,
    TensorInfo,
)
from fp8conv.convert.plan import SCALE_DTYPES, SCALE_SUFFIXES, block_from_config, find_scale, scale_block
from fp8conv.errors import InvalidCheckpoint, UsageError
from fp8conv.formats import find_quantization_config
from fp8conv.kernels import act_quant, fp8_gemm, resolve_device, scale_to_float32, weight_dequant
from fp8conv.kernels.reference import fp8_gemm_torch, weight_dequant_torch
from fp8conv.verify.inspect import (
    Finding,
    Scan,
    classify,
    describe_format,
    few,
    ignore_entries,
    linear_like,
    listed_by,
    module_names,
    quant_method,
    quantization_config_locations,
    scan_checkpoint,
)

# ------------------------------------------------------------------------------------------- bounds
# GEMM check: C = fp8_gemm(act_quant(X), W) in float32 vs the same operands dequantized and multiplied
# in float64 (fp8_gemm_torch(..., acc_dtype=float64)); both see identical codes and scales, so only the
# arithmetic differs. A product of two e4m3 codes has an 8-bit significand and is exact in float32;
# multiplying by the two scales rounds once each (2**-24 relative). What remains is accumulation:
#  * CPU (float32 FMA/blocked summation): rounding errors of random sign grow like sqrt(K) * 2**-24
#    relative to |C| (the worst case, K * 2**-24, needs every rounding to go one way). Bound:
#    max(1e-5, 4 * sqrt(K) * 2**-24): 4x headroom over the statistical estimate, 1e-5 for small K.
#    K = 18432 (DeepSeek-V3 down_proj) gives 3.2e-5; measured: 3e-7.
#  * GPU (Hopper FP8 tensor cores): the MMA accumulates each 128-wide K-block with about 14 bits of
#    precision (DeepSeek-V3 report, sec. 3.3.2), i.e. about 2**-13 = 1.2e-4 relative per block, before
#    the kernel promotes the block sum to float32 with the scales. Block errors are independent, so the
#    relative error of the sum stays near 2**-13. Bound: 1e-3, 8x that. Measured on an H100 with the
#    Triton kernel: 1.3e-4 for M >= 64 (wgmma tiles; M=256/4096, K=2048/18432) and 1e-7 to 4e-7 for
#    M=16 (the small-M tile does not take that path), so --rows 256 exercises the tensor-core path.
# NaN or Inf anywhere in the output fails regardless.
GPU_GEMM_BOUND = 1e-3
CPU_GEMM_FLOOR = 1e-5


def gemm_bound(device: torch.device, k: int) -> float:
    if device.type == "cuda":
        return GPU_GEMM_BOUND
    return max(CPU_GEMM_FLOOR, 4.0 * math.sqrt(max(k, 1)) * 2.0**-24)


# --reference with an FP8 CKPT and the original weights W:
#  * SQNR = 10 log10(||W||^2 / ||W - dequant(Wq)||^2). e4m3 keeps 3 mantissa bits: round-to-nearest
#    leaves a relative error uniform in +-2**-4 of each element's binade, about 2**-4/sqrt(3) * 0.75 rms
#    => ~31 dB for Gaussian weights with absmax block scales (measured 31.1 dB on the llama sample,
#    ue8m0 likewise). Even the worst-placed values (all exactly half an ulp off) give 24 dB. The
#    default floor, 20 dB, is 11 dB under the typical value and 4 dB under that worst case; it is
#    applied to the whole tensor AND to every 128x128 tile, so one bad tile in a huge tensor is not
#    averaged away.
#  * per-tile gain g = <Wdq, W> / <W, W>: rounding errors are nearly zero-mean and uncorrelated with
#    W, so over a 128x128 tile g - 1 is ~ 2**-4 / sqrt(12 * 16384) * sqrt(3) = 3.5e-4 (sd) plus a small
#    bias (values thin out across each binade); measured on the llama sample's 72 tiles: mean -7e-4,
#    sd 3.5e-4, max |g - 1| 2.1e-3. A tile dequantized with another tile's scale has
#    g = s_used / s_true; TILE_GAIN_TOL = 1 % (5x the worst measured) catches a scale that is off by
#    1 % or more, which SQNR alone would not (a 5 % scale error still leaves 26 dB).
#  * Tiles whose largest |W| is below 448 * 2**-126 (the scale floor) are not judged per tile.
DEFAULT_MIN_SQNR = 20.0
TILE_GAIN_TOL = 0.01
TINY_TILE_AMAX = 448.0 * 2.0**-126

BAND_ELEMS = 4 << 20  # elements per band read (4 Mi: 4 MiB of FP8 codes)
COMPARE_CHUNK = 32 << 20  # bytes per chunk of a byte-for-byte comparison
MAX_NAME_FINDINGS = 20  # individual "missing/extra tensor" findings before one summary line

STATUS_RANK = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}
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
    min_sqnr: float = DEFAULT_MIN_SQNR  # dB, --reference with an FP8 CKPT
    device: str = "auto"
    experts: int = 8  # stacked [E, N, K] weights: GEMM on a seeded sample of this many (0 = all)

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
        }


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


# ------------------------------------------------------------------------------------------- report
def _jsonable(x):
    """Floats as numbers; non-finite ones as the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclass
class Check:
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
    checks: dict[str, Check] = field(default_factory=dict)
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)

    def add(self, check: str, status: str, message: str = "") -> None:
        old = self.checks.get(check)
        if old is None:
            self.checks[check] = Check(status, message)
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
        return _jsonable(
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


@dataclass
class VerifyReport:
    path: str
    format: str
    description: str
    reference: str | None
    reference_format: str | None
    device: str
    device_note: str | None
    options: dict
    bounds: dict
    tensors: list[TensorRecord]  # worst first
    findings: list[Finding]  # file-level problems
    totals: dict
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.tensors) and not any(f.status == "fail" for f in self.findings)

    @property
    def failures(self) -> list[str]:
        """One line per failure, naming file and/or tensor."""
        out = [f.text for f in self.findings if f.status == "fail"]
        for r in self.tensors:
            for name, c in r.checks.items():
                if c.status == "fail":
                    out.append(f"{r.file}: tensor {r.name!r}: {name}: {c.message}")
        return out

    def to_dict(self) -> dict:
        return _jsonable(
            {
                "ok": self.ok,
                "command": "verify",
                "path": self.path,
                "format": self.format,
                "description": self.description,
                "reference": self.reference,
                "reference_format": self.reference_format,
                "device": self.device,
                "device_note": self.device_note,
                "options": self.options,
                "bounds": self.bounds,
                "totals": self.totals,
                "seconds": round(self.seconds, 3),
                "findings": [f.to_dict() for f in self.findings],
                "tensors": [r.to_dict() for r in self.tensors],
            }
        )


# ------------------------------------------------------------------------------------------ helpers
def _tiles(x: torch.Tensor, bm: int, bn: int, op: str = "sum") -> torch.Tensor:
    """Per-tile sum (or amax) of a [r, n] band whose first row starts a tile row."""
    r, n = x.shape
    pr, pc = -r % bm, -n % bn
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    v = x.reshape((r + pr) // bm, bm, (n + pc) // bn, bn)
    return v.sum(dim=(1, 3)) if op == "sum" else v.amax(dim=(1, 3))


def _nan_codes(codes: torch.Tensor, dtype: str) -> torch.Tensor:
    """Mask of NaN (and, for e5m2, Inf) codes in a uint8 view: e4m3 S.1111.111, e5m2 S.11111.xx."""
    if dtype == "F8_E4M3":
        return (codes & 0x7F) == 0x7F
    return (codes & 0x7C) == 0x7C


def _where(idx: tuple[int, ...], stacked: bool) -> str:
    if stacked:
        return f"expert {idx[0]}, " + ", ".join(map(str, idx[1:]))
    return ", ".join(map(str, idx[1:] if len(idx) == 3 else idx))


def _db(num: float, den: float) -> float:
    """10 log10(num / den) with the limits spelled out: exact -> inf, nothing to compare -> inf."""
    if math.isnan(num) or math.isnan(den):
        return float("nan")
    if den == 0:
        return float("inf")
    if num == 0:
        return float("-inf")
    return 10.0 * math.log10(num / den)


def _fmt(x: float, spec: str = ".1f") -> str:
    return format(x, spec) if math.isfinite(x) else str(x)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Verifier:
    def __init__(
        self, scan: Scan, ref: Checkpoint | None, opts: VerifyOptions, device: torch.device, progress
    ) -> None:
        self.scan = scan
        self.ckpt = scan.ckpt
        self.unreadable = scan.unreadable
        self.findings: list[Finding] = list(scan.findings)
        self.roles = classify(self.ckpt, self.unreadable)
        self.qc = find_quantization_config(self.ckpt.config)
        self.method = quant_method(self.ckpt)
        self.ref = ref
        self.ref_roles = classify(ref) if ref is not None else None
        self.opts = opts
        self.device = device
        self.progress = progress
        self.records: dict[str, TensorRecord] = {}
        self.usable: dict[str, tuple[tuple[int, int], TensorInfo]] = {}  # FP8 weight -> (block, scale)
        self.readers: dict[str, ShardReader] = {}
        self.bytes_read = 0
        self.selected: list[str] = []
        self.candidates: set[str] = set()
        self.compared: list[str] = []

    # ----------------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()

    def reader(self, ckpt: Checkpoint, name: str) -> ShardReader:
        shard = ckpt.weight_map[name]
        key = str(ckpt.root / shard)
        if key not in self.readers:
            self.readers[key] = ShardReader(ckpt.shards[shard])
        return self.readers[key]

    def read(
        self, ckpt: Checkpoint, info: TensorInfo, start: int = 0, length: int | None = None
    ) -> torch.Tensor:
        raw = self.reader(ckpt, info.name).read_bytes(info, start, length)
        self.bytes_read += raw.numel()
        if self.progress is not None and ckpt is self.ckpt:
            self.progress.advance(raw.numel())
        return raw

    def planned_bytes(self) -> int:
        """Bytes of CKPT the data checks will read (the progress total)."""
        total = 0
        for n in self.selected:
            total += self.ckpt.info(n).nbytes
            if n in self.usable:
                total += self.usable[n][1].nbytes
        return total + sum(self.ckpt.info(n).nbytes for n in self.compared)

    def fail(self, check: str, message: str, file=None, tensor=None, status: str = "fail") -> None:
        self.findings.append(Finding(check, status, message, None if file is None else str(file), tensor))

    def record(self, name: str, role: str, ckpt: Checkpoint | None = None) -> TensorRecord:
        rec = self.records.get(name)
        if rec is None:
            ckpt = ckpt or self.ckpt
            info = ckpt.info(name)
            rec = TensorRecord(
                name, str(ckpt.root / ckpt.weight_map[name]), list(info.shape), info.dtype, role
            )
            self.records[name] = rec
        return rec

    def role_of(self, name: str) -> str:
        if name in self.roles.fp8:
            return "fp8_weight"
        if name in self.roles.scales or name in self.roles.orphans:
            return "scale"
        if name in self.roles.unquantized:
            return "weight"
        return "other"

    # ---------------------------------------------------------------------------------- structure
    def list_key(self) -> str:
        return "ignore" if self.method == "compressed-tensors" else "modules_to_not_convert"

    def expected_fp8_dtype(self) -> str | None:
        if self.method == "fp8":
            fmt = str(self.qc.get("fmt") or "e4m3").lower()
            return {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}.get(fmt)
        if self.method == "compressed-tensors":
            return "F8_E4M3"
        return None

    def structure(self) -> None:
        cfg = self.ckpt.root / CONFIG_NAME
        roles = self.roles
        if roles.fp8:
            self.config_checks(cfg)
        else:
            for loc in quantization_config_locations(self.ckpt.config):
                self.fail(
                    "config",
                    f"no FP8 tensors, but config.json still has {loc}: loaders would "
                    "build FP8 layers for these plain weights",
                    cfg,
                )
        want_dtype = self.expected_fp8_dtype()
        cfg_block = block_from_config(self.ckpt)
        entries = ignore_entries(self.qc)
        for name, info in roles.fp8.items():
            rec = self.record(name, "fp8_weight")
            if self.qc is None:
                rec.add(
                    "format",
                    "fail",
                    "FP8 tensor, but config.json has no quantization_config: "
                    "loaders cannot know it is quantized (an FP8 tensor left in a plain checkpoint?)",
                )
            elif want_dtype is not None and info.dtype != want_dtype:
                rec.add("format", "fail", f"dtype {info.dtype}, but quantization_config says {want_dtype}")
            elif want_dtype is None:
                rec.add("format", "fail", f"quant_method {self.method!r} does not describe block FP8")
            else:
                rec.add("format", "pass")
            self.scale_structure(rec, info, cfg_block)
            if entries is not None:
                hit = listed_by(name, entries, self.method)
                if hit is not None:
                    rec.add(
                        "ignore_list",
                        "fail",
                        f"the layer is in {self.list_key()} (entry {hit!r}) "
                        "but its weight is FP8: loaders build an unquantized layer and load raw "
                        "FP8 codes into it",
                    )
                else:
                    rec.add("ignore_list", "pass")
        for name, why in roles.orphans.items():
            rec = self.record(name, "scale")
            extra = "; a dequantized checkpoint keeps no scale tensors" if not roles.fp8 else ""
            rec.add("orphan", "fail", f"orphan scale: {why}{extra}")
        if roles.fp8 and self.method in ("fp8", "compressed-tensors"):
            self.unlisted_check(entries)

    def unlisted_check(self, entries: list[str] | None) -> None:
        unlisted = []
        for name in self.roles.unquantized:
            info = self.ckpt.info(name)
            if not linear_like(info):
                continue
            if entries is None:
                unlisted.append(name)
                continue
            if listed_by(name, entries, self.method) is not None:
                continue
            is_head = module_names(name)[0].split(".")[-1] == "lm_head"
            status = "warn" if is_head and self.method == "fp8" else "fail"
            rec = self.record(name, "weight")
            rec.add(
                "ignore_list",
                status,
                f"unquantized {info.dtype} 2-D weight is not in "
                f"{self.list_key()}: a loader that quantizes every Linear layer expects an FP8 "
                "weight and a scale here"
                + (" (transformers <5 adds lm_head itself)" if status == "warn" else ""),
            )
        if entries is None and unlisted:
            self.fail(
                "config",
                f"quantization_config has no {self.list_key()}: {len(unlisted)} "
                f"unquantized 2-D weight(s) rely on each loader's own defaults: {few(unlisted)}",
                self.ckpt.root / CONFIG_NAME,
                status="warn",
            )

    def scale_structure(self, rec: TensorRecord, info: TensorInfo, cfg_block) -> None:
        name = info.name
        scales = self.roles.scale_names.get(name, [])
        lost = [name + s for s in SCALE_SUFFIXES if name + s in self.unreadable]
        if len(info.shape) < 2:
            rec.add("scale", "fail", "FP8 tensor has fewer than 2 dimensions; no block scale fits it")
            return
        if not scales:
            if lost:
                rec.add(
                    "scale",
                    "fail",
                    f"its scale {lost[0]!r} is in {self.unreadable[lost[0]]}, which cannot be read",
                )
            else:
                rec.add(
                    "scale",
                    "fail",
                    f"no scale: neither {name}_scale_inv nor {name}_scale is in "
                    "the checkpoint (an FP8 tensor without its scale cannot be dequantized)",
                )
            return
        problems = []
        if len(scales) > 1:
            problems.append(f"more than one scale ({', '.join(scales)}): loaders pick one")
        s = self.ckpt.info(scales[0])
        rec.metrics["scale"] = s.name
        want = {"fp8": "_scale_inv", "compressed-tensors": "_scale"}.get(self.method or "")
        suffix = self.roles.scale_suffix(s.name)
        if want is not None and suffix != want:
            problems.append(
                f"scale {s.name!r} is named *{suffix}, but quant_method {self.method} "
                f"loaders look for {name}{want} (mixed scale names)"
            )
        scale_fmt = (self.qc or {}).get("scale_fmt")
        usable_dtype = s.dtype in SCALE_DTYPES
        if not usable_dtype:
            problems.append(f"scale dtype {s.dtype} is not one of {', '.join(SCALE_DTYPES)}")
        elif self.method == "fp8" and s.dtype in ("F8_E8M0", "U8") and scale_fmt != "ue8m0":
            problems.append(
                f"scale dtype {s.dtype} holds exponent bytes, but quantization_config has "
                'no "scale_fmt": "ue8m0"'
            )
        elif self.method == "fp8" and s.dtype in ("BF16", "F16"):
            rec.add(
                "scale",
                "warn",
                f"scale dtype {s.dtype}: the fp8 loaders keep weight_scale_inv in float32 (they cast)",
            )
        elif self.method == "compressed-tensors" and s.dtype not in ("F32", "BF16", "F16"):
            problems.append(f"scale dtype {s.dtype}: compressed-tensors stores float scales")
        blk = None
        try:
            blk = scale_block(self.ckpt, info, s)
        except InvalidCheckpoint as e:
            problems.append(f"scale {s.name!r}: {e.rule}")
        if blk is not None and cfg_block is not None and blk != cfg_block:
            problems.append(
                f"scale shape {list(s.shape)} means {blk[0]}x{blk[1]} tiles, but "
                f"quantization_config says {cfg_block[0]}x{cfg_block[1]}"
            )
        if problems:
            rec.add("scale", "fail", "; ".join(problems))
        else:
            rec.add("scale", "pass")
        if blk is not None and usable_dtype:
            self.usable[name] = (blk, s)
            rec.metrics["block"] = f"{blk[0]}x{blk[1]}"

    def config_checks(self, cfg: Path) -> None:
        qc, method = self.qc, self.method
        if qc is None:
            self.fail(
                "config",
                f"{len(self.roles.fp8)} FP8 tensor(s) but config.json has no "
                f"quantization_config; loaders cannot load them: {few(self.roles.fp8)}",
                cfg,
            )
            return
        if method == "fp8":
            fmt = qc.get("fmt")
            if fmt is not None and str(fmt).lower() not in ("e4m3", "e5m2"):
                self.fail("config", f"quantization_config fmt {fmt!r} is not e4m3 or e5m2", cfg)
            if qc.get("weight_block_size") is None:
                self.fail(
                    "config",
                    "quantization_config has no weight_block_size: transformers "
                    "assumes 128x128 tiles, vLLM per-tensor scales",
                    cfg,
                    status="warn",
                )
            elif block_from_config(self.ckpt) is None:
                self.fail(
                    "config",
                    f"weight_block_size {qc.get('weight_block_size')!r} is not two positive integers",
                    cfg,
                )
            act = qc.get("activation_scheme")
            if act not in (None, "dynamic"):
                self.fail(
                    "config",
                    f"activation_scheme {act!r}: block-FP8 weights come with dynamic "
                    "per-group activation scales",
                    cfg,
                    status="warn",
                )
            sf = qc.get("scale_fmt")
            if sf not in (None, "ue8m0", "float"):
                self.fail("config", f"scale_fmt {sf!r} is neither ue8m0 nor absent", cfg, status="warn")
        elif method == "compressed-tensors":
            groups = qc.get("config_groups")
            if not isinstance(groups, dict) or not groups:
                self.fail("config", "compressed-tensors quantization_config has no config_groups", cfg)
            else:
                for gname, g in groups.items():
                    g = g if isinstance(g, dict) else {}
                    w = g.get("weights") if isinstance(g.get("weights"), dict) else {}
                    gfmt = g.get("format") or qc.get("format")
                    where = f"config_groups.{gname}"
                    if gfmt != "float-quantized":
                        self.fail("config", f"{where} format {gfmt!r}: FP8 weights are float-quantized", cfg)
                    if w.get("type") != "float" or w.get("num_bits") != 8:
                        self.fail(
                            "config",
                            f"{where}.weights is {w.get('num_bits')}-bit {w.get('type')!r}, not 8-bit float",
                            cfg,
                        )
                    strategy = w.get("strategy")
                    if strategy not in ("block", "channel", "tensor"):
                        self.fail(
                            "config",
                            f"{where}.weights.strategy {strategy!r} is not block, channel or tensor",
                            cfg,
                        )
                    bs = w.get("block_structure")
                    if strategy == "block" and not (
                        isinstance(bs, list)
                        and len(bs) == 2
                        and all(isinstance(v, int) and v > 0 for v in bs)
                    ):
                        self.fail(
                            "config",
                            f"{where}.weights.block_structure {bs!r} is not two positive integers",
                            cfg,
                        )
            status = qc.get("quantization_status")
            if status != "compressed":
                self.fail(
                    "config", f"quantization_status {status!r}: FP8 weights on disk are 'compressed'", cfg
                )
        else:
            self.fail(
                "config",
                f"quant_method {method!r} does not describe block-FP8 tensors (expected "
                "fp8 or compressed-tensors)",
                cfg,
            )

    # ---------------------------------------------------------------------------------- selection
    def select(self) -> None:
        opts = self.opts
        names = set(self.ckpt.weight_map)
        ref_fp8 = set(self.ref_roles.fp8) if self.ref_roles else set()
        cands = set(self.roles.fp8) | (ref_fp8 & names)
        if not cands and self.ref is None:
            cands = {
                n
                for n in names
                if self.ckpt.info(n).dtype in FLOAT_DTYPES
                and len(self.ckpt.info(n).shape) >= 2
                and n not in self.roles.orphans
            }
        if opts.tensors:
            if not any(matches(n, opts.tensors) for n in names | set(self.unreadable)):
                raise UsageError(f"--tensors {' '.join(opts.tensors)} matches no tensor of the checkpoint")
            cands = {n for n in cands if matches(n, opts.tensors)}
        chosen = sorted(cands)
        if opts.sample is not None and opts.sample < len(chosen):
            chosen = sorted(random.Random(opts.seed).sample(chosen, opts.sample))
        self.candidates = cands
        self.selected = chosen
        # With --reference, every other tensor both hold is compared byte for byte (--tensors
        # narrows this; --sample does not).
        self.compared = []
        if self.ref is not None:
            for name in sorted(names & set(self.ref.weight_map)):
                if name in cands or (opts.tensors and not matches(name, opts.tensors)):
                    continue
                self.compared.append(name)

    # ------------------------------------------------------------------------------------ data
    def data(self) -> None:
        ref_fp8 = set(self.ref_roles.fp8) if self.ref_roles else set()
        for name in self.selected:
            if name in self.roles.fp8:
                self.fp8_data(name)
            elif name in ref_fp8:
                self.dequant_exact(name)
            else:
                self.finite(name)
        if self.ref is not None:
            self.reference_names()
            for name in self.compared:
                self.compare_bytes(name)

    def bands(self, info: TensorInfo, bm: int):
        """(expert, r0, r1) bands of whole tile rows, about BAND_ELEMS elements each."""
        *lead, m, k = info.shape
        experts = math.prod(lead)
        per = max(1, BAND_ELEMS // max(k, 1))
        per = max(bm, per // bm * bm)
        for e in range(experts):
            for r0 in range(0, m, per):
                yield e, r0, min(m, r0 + per)

    def fp8_data(self, name: str) -> None:
        info = self.ckpt.info(name)
        rec = self.record(name, "fp8_weight")
        rec.selected = True
        *lead, m, k = info.shape
        experts = math.prod(lead)
        stacked = len(info.shape) == 3
        use = self.usable.get(name)
        s3 = None
        blk = use[0] if use else (128, 128)
        bm, bn = blk
        if use is not None:
            s_info = use[1]
            s32 = scale_to_float32(self.read(self.ckpt, s_info).view(s_info.torch_dtype)).float()
            s3 = s32.reshape(experts, math.ceil(m / bm) if bm else 1, -1)
            bad = ~torch.isfinite(s3) | (s3 <= 0)
            if s3.numel():
                rec.metrics["scale_min"] = float(s3.min())
                rec.metrics["scale_max"] = float(s3.max())
            if bool(bad.any()):
                idx = tuple(int(v) for v in bad.nonzero()[0])
                rec.add(
                    "scale_values",
                    "fail",
                    f"{int(bad.sum())} of {s3.numel()} scale(s) are NaN, "
                    f"Inf, zero or negative; first at tile ({_where(idx, stacked)}) = "
                    f"{float(s3[idx])}",
                )
            elif (
                (self.qc or {}).get("scale_fmt") == "ue8m0"
                and s_info.dtype != "U8"
                and s_info.dtype != "F8_E8M0"
                and bool((torch.frexp(s3).mantissa != 0.5).any())
            ):
                idx = tuple(int(v) for v in (torch.frexp(s3).mantissa != 0.5).nonzero()[0])
                rec.add(
                    "scale_values",
                    "fail",
                    f"scale_fmt is ue8m0 but scale at tile "
                    f"({_where(idx, stacked)}) = {float(s3[idx])} is not a power of two",
                )
            else:
                rec.add("scale_values", "pass", f"{s3.numel()} scale(s) finite and > 0")
        else:
            rec.add("scale_values", "skip", "no usable scale")

        gemm_why = None
        if use is None:
            gemm_why = "no usable scale"
        elif blk != (128, 128):
            gemm_why = f"fp8_gemm takes 128x128 weight tiles; this weight has {bm}x{bn}"
        elif info.dtype != "F8_E4M3":
            gemm_why = f"fp8_gemm takes e4m3 weights, not {info.dtype}"
        elif k == 0 or m == 0:
            gemm_why = "empty tensor"
        g = torch.Generator().manual_seed((self.opts.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        x = torch.randn(self.opts.rows, max(k, 1), generator=g)[:, :k]
        gemm_experts: set[int] = set()
        if gemm_why is None:
            n = self.opts.experts
            if n == 0 or experts <= n:
                gemm_experts = set(range(experts))
            else:
                gemm_experts = set(
                    random.Random(self.opts.seed ^ zlib.crc32(name.encode())).sample(range(experts), n)
                )
            xq, xs = act_quant(x.to(self.device))
            xq_c, xs_c = xq.cpu(), xs.cpu()
        g_num = g_den = 0.0
        g_nonfinite = 0
        g_ref_nonfinite = 0

        # reference (original weights)
        ref_fp8 = self.ref_roles is not None and bool(self.ref_roles.fp8)
        r_info = None
        if self.ref is not None and not ref_fp8:
            if name not in self.ref:
                rec.add("reference", "fail", "not in the reference checkpoint")
            else:
                r_info = self.ref.info(name)
                if tuple(r_info.shape) != tuple(info.shape):
                    rec.add(
                        "reference",
                        "fail",
                        f"shape {list(info.shape)} but the reference has {list(r_info.shape)}",
                    )
                    r_info = None
                elif r_info.dtype not in FLOAT_DTYPES:
                    rec.add("reference", "fail", f"reference tensor is {r_info.dtype}, not a float")
                    r_info = None
                elif use is None:
                    rec.add("reference", "fail", "cannot dequantize without a usable scale")
                    r_info = None
        x64 = x.double()
        tot_ref = tot_err = 0.0
        cos_dot = cos_q = cos_r = 0.0
        worst_tile = (float("inf"), None)  # (tile SQNR dB, where)
        worst_gain = (0.0, None, 1.0)  # (|g - 1|, where, g)
        nan_count = 0
        first_nan = None
        fp8_dtype = info.torch_dtype
        for e, r0, r1 in self.bands(info, bm):
            rows = r1 - r0
            codes = self.read(self.ckpt, info, (e * m + r0) * k, rows * k)
            bad = _nan_codes(codes, info.dtype)
            nb = int(bad.sum())
            if nb:
                if first_nan is None:
                    j = int(bad.nonzero()[0])
                    first_nan = (e, r0 + j // k, j % k, int(codes[j]))
                nan_count += nb
            q = codes.view(fp8_dtype).reshape(rows, k)
            sb = s3[e, r0 // bm : math.ceil(r1 / bm)] if s3 is not None else None
            if e in gemm_experts:
                c = (
                    fp8_gemm(
                        xq, xs, q.to(self.device), sb.contiguous().to(self.device), out_dtype=torch.float32
                    )
                    .cpu()
                    .double()
                )
                cr = fp8_gemm_torch(xq_c, xs_c, q, sb, out_dtype=torch.float64, acc_dtype=torch.float64)
                fin, rfin = torch.isfinite(c), torch.isfinite(cr)
                g_nonfinite += int((~fin).sum())
                g_ref_nonfinite += int((~rfin).sum())
                both = fin & rfin
                d = torch.where(both, c - cr, 0.0)
                g_num += float((d * d).sum())
                g_den += float(torch.where(rfin, cr, 0.0).square().sum())
            if r_info is not None:
                isz = r_info.nbytes // max(r_info.numel, 1)
                raw = self.read(self.ref, r_info, (e * m + r0) * k * isz, rows * k * isz)
                wr = raw.view(r_info.torch_dtype).reshape(rows, k).double()
                wq = weight_dequant_torch(q, sb, blk, out_dtype=torch.float32).double()
                diff = wq - wr
                e_ref = _tiles(wr * wr, bm, bn)
                e_err = _tiles(diff * diff, bm, bn)
                cross = _tiles(wq * wr, bm, bn)
                amax = _tiles(wr.abs(), bm, bn, "amax")
                tot_ref += float(e_ref.sum())
                tot_err += float(e_err.sum())
                tsq = torch.where(e_err > 0, 10 * torch.log10(e_ref / e_err), torch.inf)
                tsq = torch.nan_to_num(tsq, nan=-torch.inf)
                judged = (amax >= TINY_TILE_AMAX) | ((amax == 0) & (e_err != 0))
                if bool(judged.any()):
                    t = torch.where(judged, tsq, torch.inf)
                    j = int(t.argmin())
                    if float(t.view(-1)[j]) < worst_tile[0]:
                        ti, tj = divmod(j, t.shape[1])
                        worst_tile = (float(t.view(-1)[j]), (e, r0 // bm + ti, tj))
                    gain = torch.nan_to_num(cross / e_ref, nan=0.0, posinf=0.0, neginf=0.0)
                    dev = torch.where(judged & (amax > 0), (gain - 1).abs(), 0.0)
                    j = int(dev.argmax())
                    if float(dev.view(-1)[j]) > worst_gain[0]:
                        ti, tj = divmod(j, dev.shape[1])
                        worst_gain = (float(dev.view(-1)[j]), (e, r0 // bm + ti, tj), float(gain.view(-1)[j]))
                yq = x64 @ wq.t()
                yr = x64 @ wr.t()
                cos_dot += float((yq * yr).sum())
                cos_q += float((yq * yq).sum())
                cos_r += float((yr * yr).sum())

        if nan_count:
            e, r, c, code = first_nan
            rec.add(
                "nan_codes",
                "fail",
                f"{nan_count} NaN code(s); first at ({_where((e, r, c), stacked)}) = 0x{code:02X}",
            )
        else:
            rec.add("nan_codes", "pass")
        rec.metrics["nan_codes"] = nan_count

        if gemm_why is not None:
            rec.add("gemm", "skip", gemm_why)
        else:
            bound = gemm_bound(self.device, k)
            err = math.sqrt(g_num / g_den) if g_den > 0 else (0.0 if g_num == 0 else float("inf"))
            rec.metrics.update(gemm_rel_err=err, gemm_bound=bound, experts_checked=len(gemm_experts))
            scope = (
                f"{len(gemm_experts)} of {experts} experts, " if stacked else ""
            ) + f"M={self.opts.rows}, K={k}, on {self.device.type}"
            if g_nonfinite or g_ref_nonfinite:
                rec.add(
                    "gemm",
                    "fail",
                    f"output has {g_nonfinite} NaN/Inf value(s) "
                    f"({g_ref_nonfinite} in the float64 reference) [{scope}]",
                )
            elif err > bound:
                rec.add("gemm", "fail", f"relative error {err:.2e} exceeds the bound {bound:.1e} [{scope}]")
            else:
                rec.add("gemm", "pass", f"relative error {err:.2e} <= {bound:.1e} [{scope}]")

        if r_info is not None:
            sqnr = _db(tot_ref, tot_err)
            cos = (
                cos_dot / math.sqrt(cos_q * cos_r)
                if cos_q > 0 and cos_r > 0
                else (1.0 if cos_q == cos_r == 0 else 0.0)
            )
            rec.metrics.update(
                sqnr_db=sqnr,
                min_tile_sqnr_db=worst_tile[0],
                max_tile_gain_dev=worst_gain[0],
                output_cosine=cos,
            )
            floor = self.opts.min_sqnr
            bad = []
            if not sqnr >= floor:
                bad.append(f"SQNR {_fmt(sqnr)} dB < {floor:g} dB")
            if not worst_tile[0] >= floor:
                bad.append(
                    f"tile ({_where(worst_tile[1], stacked)}) SQNR {_fmt(worst_tile[0])} dB < {floor:g} dB"
                )
            if not worst_gain[0] <= TILE_GAIN_TOL:
                bad.append(
                    f"tile ({_where(worst_gain[1], stacked)}) gain {worst_gain[2]:.4f} (dequantized"
                    f"/original) is off by more than {TILE_GAIN_TOL:.0%}: wrong scale for that tile?"
                )
            if not math.isfinite(cos):
                bad.append("output cosine is NaN")
            summary = (
                f"SQNR {_fmt(sqnr)} dB, worst tile {_fmt(worst_tile[0])} dB, "
                f"max tile gain error {worst_gain[0]:.2e}, output cosine {cos:.6f}"
            )
            if bad:
                rec.add("reference", "fail", "; ".join(bad) + f" [{summary}]")
            else:
                rec.add("reference", "pass", summary)
        elif self.ref is not None and ref_fp8:
            if name in self.ref and self.ref.info(name).dtype in FP8_WEIGHT_DTYPES:
                self.compare_bytes(name)
            elif name in self.ref:
                rec.add("reference", "fail", f"FP8 here, but {self.ref.info(name).dtype} in the reference")

    def dequant_exact(self, name: str) -> None:
        """A dequantized weight equals weight_dequant(source codes, source scale), bit for bit."""
        info = self.ckpt.info(name)
        rec = self.record(name, "dequantized_weight")
        rec.selected = True
        q_info = self.ref.info(name)
        if info.dtype not in FLOAT_DTYPES:
            rec.add("reference", "fail", f"dtype {info.dtype}: a dequantized weight must be a float")
            return
        if tuple(info.shape) != tuple(q_info.shape):
            rec.add("reference", "fail", f"shape {list(info.shape)} but the source has {list(q_info.shape)}")
            return
        s_info = find_scale(self.ref, name)
        if s_info is None:
            rec.add("reference", "fail", "the source FP8 tensor has no scale; nothing to compare with")
            return
        try:
            blk = scale_block(self.ref, q_info, s_info)
        except InvalidCheckpoint as e:
            rec.add("reference", "fail", f"source scale unusable: {e.message}")
            return
        *lead, m, k = info.shape
        stacked = len(info.shape) == 3
        s3 = scale_to_float32(self.read(self.ref, s_info).view(s_info.torch_dtype)).float()
        s3 = s3.reshape(math.prod(lead), math.ceil(m / blk[0]), -1)
        out_dtype = DTYPES[info.dtype]
        isz = info.nbytes // max(info.numel, 1)
        iv = _INT_VIEW[isz]
        mismatched = 0
        first = None
        max_diff = 0.0
        for e, r0, r1 in self.bands(info, blk[0]):
            rows = r1 - r0
            q = self.read(self.ref, q_info, (e * m + r0) * k, rows * k)
            q = q.view(q_info.torch_dtype).reshape(rows, k)
            want = weight_dequant(q, s3[e, r0 // blk[0] : math.ceil(r1 / blk[0])], blk, out_dtype)
            got = self.read(self.ckpt, info, (e * m + r0) * k * isz, rows * k * isz).view(out_dtype)
            got = got.reshape(rows, k)
            ne = want.view(iv) != got.view(iv)
            n = int(ne.sum())
            if n:
                mismatched += n
                if first is None:
                    j = int(ne.reshape(-1).nonzero()[0])
                    first = (e, r0 + j // k, j % k, float(want.reshape(-1)[j]), float(got.reshape(-1)[j]))
                d = (want.double() - got.double()).abs()
                max_diff = max(max_diff, float(torch.nan_to_num(d, nan=float("inf")).max()))
        rec.metrics.update(mismatched_elements=mismatched, max_abs_diff=max_diff)
        if mismatched:
            e, r, c, w, g = first
            rec.add(
                "reference",
                "fail",
                f"{mismatched} of {info.numel} element(s) differ from "
                f"weight_dequant(source); first at ({_where((e, r, c), stacked)}): expected {w!r}, "
                f"found {g!r}; max |diff| {max_diff:.3g}",
            )
        else:
            rec.add(
                "reference",
                "pass",
                f"bit-identical to weight_dequant(source codes, scale) "
                f"({blk[0]}x{blk[1]} tiles, {info.dtype})",
            )

    def finite(self, name: str) -> None:
        info = self.ckpt.info(name)
        rec = self.record(name, self.role_of(name))
        rec.selected = True
        *_, m, k = info.shape
        isz = info.nbytes // max(info.numel, 1)
        bad = 0
        first = None
        for e, r0, r1 in self.bands(info, 1):
            x = self.read(self.ckpt, info, (e * m + r0) * k * isz, (r1 - r0) * k * isz)
            nf = ~torch.isfinite(x.view(info.torch_dtype))
            n = int(nf.sum())
            if n and first is None:
                j = int(nf.nonzero()[0])
                first = (e, r0 + j // k, j % k)
            bad += n
        rec.metrics["non_finite"] = bad
        if bad:
            rec.add(
                "finite", "fail", f"{bad} NaN/Inf value(s); first at ({_where(first, len(info.shape) == 3)})"
            )
        else:
            rec.add("finite", "pass")

    def compare_bytes(self, name: str) -> None:
        a, b = self.ckpt.info(name), self.ref.info(name)
        rec = self.record(name, self.role_of(name))
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            rec.add(
                "reference",
                "fail",
                f"{a.dtype} {list(a.shape)} here but {b.dtype} {list(b.shape)} "
                "in the reference (only quantized weights may change)",
            )
            return
        differ = 0
        first = None
        for off in range(0, a.nbytes, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, a.nbytes - off)
            x = self.read(self.ckpt, a, off, n)
            y = self.read(self.ref, b, off, n)
            if not torch.equal(x, y):
                ne = x != y
                differ += int(ne.sum())
                if first is None:
                    first = off + int(ne.nonzero()[0])
        if differ:
            isz = a.nbytes // max(a.numel, 1)
            rec.add(
                "reference",
                "fail",
                f"{differ} byte(s) differ from the reference; first in element "
                f"{first // max(isz, 1)} (byte {first})",
            )
        else:
            rec.add("reference", "pass", "byte-identical to the reference")

    def reference_names(self) -> None:
        """Same tensor names as the reference, allowing for the scales that come and go."""
        ref, ckpt = self.ref, self.ckpt
        have = set(ckpt.weight_map) | set(self.unreadable)
        if self.ref_roles.fp8:
            expected = set()
            for n in ref.weight_map:
                base = self.ref_roles.scales.get(n)
                if base is not None and base in ckpt and ckpt.info(base).dtype not in FP8_WEIGHT_DTYPES:
                    continue  # the scale of a weight that was dequantized: gone, as it should be
                expected.add(n)
            extra = sorted(set(ckpt.weight_map) - expected)
        else:
            expected = set(ref.weight_map)
            extra = sorted(set(ckpt.weight_map) - expected - set(self.roles.scales))
        missing = sorted(expected - have)
        for what, names, where in (
            ("missing from the checkpoint", missing, ref),
            ("not in the reference", extra, ckpt),
        ):
            for n in names[:MAX_NAME_FINDINGS]:
                self.fail(
                    "reference",
                    f"tensor {what}",
                    where.root / where.weight_map[n] if n in where.weight_map else where.root,
                    n,
                )
            if len(names) > MAX_NAME_FINDINGS:
                self.fail("reference", f"{len(names) - MAX_NAME_FINDINGS} more tensor(s) {what}", where.root)

    # ------------------------------------------------------------------------------------ report
    def report(
        self, opts: VerifyOptions, device_note: str | None, seconds: float, ref_format: str | None
    ) -> VerifyReport:
        fmt, description = describe_format(self.ckpt, self.roles)
        records = list(self.records.values())

        def key(r: TensorRecord):
            sq = [
                v
                for k, v in r.metrics.items()
                if k in ("sqnr_db", "min_tile_sqnr_db") and isinstance(v, float)
            ]
            ratio = (r.metrics.get("gemm_rel_err") or 0.0) / (r.metrics.get("gemm_bound") or 1.0)
            return (STATUS_RANK[r.status], min(sq) if sq else float("inf"), -ratio, r.name)

        records.sort(key=key)
        totals = {
            "tensors": len(self.ckpt.weight_map),
            "unreadable_tensors": len(self.unreadable),
            "fp8_weights": len(self.roles.fp8),
            "selected": len(self.selected),
            "records": len(records),
            "failed_tensors": sum(not r.ok for r in records),
            "warned_tensors": sum(r.ok and r.status == "warn" for r in records),
            "failed_checks": sum(c.status == "fail" for r in records for c in r.checks.values()),
            "file_failures": sum(f.status == "fail" for f in self.findings),
            "file_warnings": sum(f.status == "warn" for f in self.findings),
            "bytes_read": self.bytes_read,
        }
        bounds = {
            "gemm_rule": "1e-3" if self.device.type == "cuda" else "max(1e-5, 4*sqrt(K)*2^-24)",
            "min_sqnr_db": opts.min_sqnr,
            "tile_gain_tol": TILE_GAIN_TOL,
        }
        return VerifyReport(
            path=str(self.ckpt.root),
            format=fmt,
            description=description,
            reference=opts.reference,
            reference_format=ref_format,
            device=str(self.device),
            device_note=device_note,
            options=opts.to_dict(),
            bounds=bounds,
            tensors=records,
            findings=self.findings,
            totals=totals,
            seconds=seconds,
        )


def verify_checkpoint(path, options: VerifyOptions | None = None, progress=None) -> VerifyReport:
    """Check a checkpoint folder; return the report (report.ok says pass / fail).

    Raises UsageError (exit 2) for bad options, InvalidCheckpoint (exit 3) when `path` (or the
    reference) is not a checkpoint folder at all, ResourceError (exit 5) for I/O failures. Structural
    damage inside a checkpoint folder is not raised: it is reported (report.ok False, exit 1)."""
    opts = options or VerifyOptions()
    t0 = time.monotonic()
    device, note = resolve_device(opts.device)
    scan = scan_checkpoint(path)
    ref = None
    ref_format = None
    if opts.reference is not None:
        try:
            ref = open_checkpoint(opts.reference)
        except InvalidCheckpoint as e:
            raise InvalidCheckpoint(
                f"--reference: {e.rule}", file=e.file, tensor=e.tensor, hint=e.hint
            ) from None
    v = _Verifier(scan, ref, opts, device, progress)
    try:
        if ref is not None:
            ref_format = describe_format(ref, v.ref_roles)[0]
        v.structure()
        v.select()
        if progress is not None:
            progress.start(v.planned_bytes(), len(scan.ckpt.shards), str(device))
            if note:
                progress.note(note)
        v.data()
    finally:
        v.close()
        if progress is not None:
            progress.close()
    return v.report(opts, note, time.monotonic() - t0, ref_format)


# ------------------------------------------------------------------------------------- rendering
def render_table(report: VerifyReport, limit: int = 30):
    """A rich Table of the worst tensors (failures first), for the CLI to print."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"verify {report.path} ({report.format}"
        + (f" vs {report.reference}" if report.reference else "")
        + f", {report.device})"
    )
    for col in ("tensor", "shape", "dtype", "status", "checks", "metrics"):
        table.add_column(col, overflow="fold")
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
            parts.append(f"SQNR {_fmt(m['sqnr_db'])} dB (tile min {_fmt(m['min_tile_sqnr_db'])})")
        if isinstance(m.get("gemm_rel_err"), float):
            parts.append(f"gemm {m['gemm_rel_err']:.1e}/{m['gemm_bound']:.0e}")
        if isinstance(m.get("output_cosine"), float):
            parts.append(f"cos {m['output_cosine']:.5f}")
        table.add_row(
            escape(r.name),
            "x".join(map(str, r.shape)),
            r.dtype,
            f"[{style[r.status]}]{r.status}[/]",
            checks,
            ", ".join(parts),
        )
    if len(report.tensors) > limit:
        table.add_section()
        rest = report.tensors[limit:]
        table.add_row(f"... {len(rest)} more", "", "", f"{sum(not r.ok for r in rest)} failing", "", "")
    for f in report.findings:
        table.add_section()
        table.add_row(
            escape(f.tensor or "(file)"),
            "",
            "",
            f"[{style[f.status]}]{f.status}[/]",
            escape(f"{f.check}: {f.file + ': ' if f.file else ''}{f.message}"),
            "",
        )
    return table


def summary_line(report: VerifyReport) -> str:
    t = report.totals
    head = (
        f"verify: {t['tensors']} tensors ({t['fp8_weights']} FP8 weights), {t['selected']} with "
        f"data checks on {report.device}, {t['bytes_read'] / 1e6:.1f} MB read in {report.seconds:.1f}s"
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


__all__ = [
    "Check",
    "TensorRecord",
    "VerifyOptions",
    "VerifyReport",
    "gemm_bound",
    "render_table",
    "summary_line",
    "verify_checkpoint",
]
