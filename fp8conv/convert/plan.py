"""What happens to each tensor: the plan of a job, built from headers alone; the dequantize plan here,
the quantize plan in plan_quantize.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    ITEMSIZE,
    TensorInfo,
)
from fp8conv.convert import decode
from fp8conv.convert.options import DequantizeOptions
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats import (
    QuantizedWeight,
    compressed_tensors,
    detect,
    find_quantization_config,
    fp8_block,
    strip_config,
    strip_params,
)
from fp8conv.formats.scheme import SCALE_ENCODINGS
from fp8conv.kernels.reference import scale_grid

# Scale names and dtypes of the fp8 and compressed-tensors families (fp8conv.formats owns them; kept
# here for the verify and inspect modules that read them until they move onto fp8conv.formats).
SCALE_SUFFIXES = (fp8_block.SCALE_SUFFIX, compressed_tensors.SCALE_SUFFIX)
SCALE_DTYPES = tuple(SCALE_ENCODINGS)


@dataclass
class TensorJob:
    """One output tensor (or pair, for quantize) and how to make it from the source."""

    name: str  # output name
    action: str  # "copy" | "dequant" | "quant" | "scale" (the scale written by a "quant") | "compute"
    src: TensorInfo | None
    out_dtype: str
    out_shape: tuple[int, ...]
    scale: TensorInfo | None = None  # dequant: the source scale
    block: tuple[int, int] = (128, 128)
    scale_name: str | None = None  # quant: name of the scale output that follows
    reason: str = ""  # why copied (for --dry-run and inspect)
    weight: QuantizedWeight | None = None  # dequant: the layout's account of the weight and its scale
    quantizer: str = "block"  # quant: "block", "channel", "mx-ceil" or "mx-ct" (convert/quantize_schemes.py)
    compute: Callable[[], object] | None = None  # "compute": the tensor's bytes, any buffer (fp8_to_fp8.py)

    @property
    def out_bytes(self) -> int:
        return math.prod(self.out_shape) * ITEMSIZE[self.out_dtype]


@dataclass
class ShardPlan:
    name: str
    metadata: dict[str, str] | None
    jobs: list[TensorJob] = field(default_factory=list)
    indexed: bool = True  # named by the index (Mistral's consolidated.safetensors is not)

    @property
    def out_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)


@dataclass
class Plan:
    shards: list[ShardPlan]
    config: dict | None
    modules_to_not_convert: list[str] = field(default_factory=list)
    family: str | None = None  # dequantize: the source's layout family
    drop_files: tuple[str, ...] = ()  # other files of the source that the output does not get
    write_files: dict[str, bytes] = field(default_factory=dict)  # other files written instead of copied
    notes: list[str] = field(default_factory=list)  # quantize: what the plan kept unquantized for a loader

    def copied_files(self, other_files: list[str]) -> list[str]:
        """The source's other files that are copied as they are."""
        return [f for f in other_files if f not in self.drop_files and f not in self.write_files]

    def jobs(self):
        for s in self.shards:
            yield from s.jobs

    @property
    def weight_map(self) -> dict[str, str]:
        """The output index's weight_map: the tensors of the shards the index lists."""
        return {j.name: s.name for s in self.shards if s.indexed for j in s.jobs}

    @property
    def tensor_bytes(self) -> int:
        """The output index's total_size."""
        return sum(s.out_bytes for s in self.shards if s.indexed)


def find_scale(ckpt: Checkpoint, weight: str) -> TensorInfo | None:
    for suffix in SCALE_SUFFIXES:
        name = weight + suffix
        if name in ckpt:
            return ckpt.info(name)
    return None


def block_from_config(ckpt: Checkpoint) -> tuple[int, int] | None:
    qc = find_quantization_config(ckpt.config) or {}
    wbs = qc.get("weight_block_size")
    if wbs is None:
        try:
            wbs = qc["config_groups"]["group_0"]["weights"]["block_structure"]
        except (KeyError, TypeError):
            wbs = None
    if isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(v, int) and v > 0 for v in wbs):
        return int(wbs[0]), int(wbs[1])
    return None


def scale_block(ckpt: Checkpoint, w: TensorInfo, s: TensorInfo) -> tuple[int, int]:
    """The tile a scale covers: the config's block, or per-tensor / per-row if the shape says so."""
    if s.dtype not in SCALE_DTYPES:
        raise InvalidCheckpoint(
            f"scale dtype {s.dtype} is not one of {', '.join(SCALE_DTYPES)}",
            file=ckpt.root / ckpt.weight_map[s.name],
            tensor=s.name,
        )
    *lead, m, n = w.shape
    candidates = [block_from_config(ckpt) or (128, 128), (m, n), (1, n)]
    for blk in candidates:
        want = scale_grid(w.shape, blk)
        if tuple(s.shape) == want:
            return blk
        if blk == (m, n) and math.prod(s.shape) == math.prod(lead) and len(s.shape) <= 1 + len(lead):
            return blk
    raise InvalidCheckpoint(
        f"scale shape {list(s.shape)} does not fit weight {list(w.shape)}: expected "
        f"{list(scale_grid(w.shape, candidates[0]))} for {candidates[0][0]}x{candidates[0][1]} tiles",
        file=ckpt.root / ckpt.weight_map[s.name],
        tensor=s.name,
    )


def plan_dequantize(ckpt: Checkpoint, opts: DequantizeOptions) -> Plan:
    """Every quantized weight to floats, every artifact dropped, every other tensor copied; the
    settings of all four places removed. What no layout explains is refused here (fp8conv.formats)."""
    out_dtype = DTYPE_NAMES[opts.torch_dtype]
    found = detect(ckpt)
    shards = []
    for shard_name, header in ckpt.shards.items():
        sp = ShardPlan(shard_name, header.metadata, indexed=shard_name not in ckpt.unindexed)
        for name, info in header.tensors.items():
            if name in found.artifacts:
                continue
            w = found.weights.get(name)
            if w is not None:
                job = TensorJob(w.out_name, "dequant", info, out_dtype, w.out_shape, scale=w.scale)
                job.block, job.weight = decode.kernel_tile(w), w
                sp.jobs.append(job)
            else:
                sp.jobs.append(
                    TensorJob(name, "copy", info, info.dtype, info.shape, reason=_copy_reason(info))
                )
        shards.append(sp)
    names = [j.name for s in shards for j in s.jobs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidCheckpoint(
            "two source tensors would both become this output tensor", file=ckpt.root, tensor=dup
        )
    write_files = {}
    if found.rewrite_params and found.settings.params is not None:
        write_files["params.json"] = strip_params(found.settings.params)
    return Plan(
        shards,
        dequantized_config(ckpt.config, opts.dtype_name),
        family=found.family,
        drop_files=found.side_files,
        write_files=write_files,
    )


def _copy_reason(info: TensorInfo) -> str:
    if info.dtype not in FLOAT_DTYPES:
        return "not floating point"
    return "not FP8"


def dequantized_config(config: dict | None, dtype_name: str) -> dict | None:
    return strip_config(config, dtype_name)


def native_fp8_config(
    block: tuple[int, int] = (128, 128), skipped: list[str] | None = None, scale_fmt: str = "float"
) -> dict:
    """`quantization_config` of the native block-FP8 layout (DeepSeek-V3, transformers' FP8 loader)."""
    return fp8_block.fp8_config(block, skipped, scale_fmt)
