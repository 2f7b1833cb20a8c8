"""What happens to each tensor: the plan for a dequantize or quantize job, built from headers alone."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    FP8_WEIGHT_DTYPES,
    ITEMSIZE,
    TensorInfo,
)
from fp8conv.convert.options import DequantizeOptions, QuantizeOptions
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats import (
    QuantizedWeight,
    compressed_tensors,
    detect,
    find_quantization_config,
    fp8_block,
    strip_config,
    strip_params,
    writer,
)
from fp8conv.formats.scheme import SCALE_ENCODINGS
from fp8conv.kernels.reference import scale_grid

# Scale names and dtypes of the fp8 and compressed-tensors families (fp8conv.formats owns them; kept
# here for the verify and inspect modules that read them until they move onto fp8conv.formats).
SCALE_SUFFIXES = (fp8_block.SCALE_SUFFIX, compressed_tensors.SCALE_SUFFIX)
SCALE_DTYPES = tuple(SCALE_ENCODINGS)

# Left unquantized by default (FORMATS.md): embeddings, lm_head, norms, MoE router gates.
DEFAULT_SKIP = (
    "*embed_tokens*",
    "*embeddings*",
    "*word_embeddings*",
    "*wte*",
    "*wpe*",
    "*embed*",
    "lm_head*",
    "*.lm_head*",
    "*norm*",
    "*LayerNorm*",
    "*layernorm*",
    "*ln_*",
    "*.mlp.gate.weight",
    "*.gate.weight",
    "*router*",
    "*shared_expert_gate*",
)


@dataclass
class TensorJob:
    """One output tensor (or pair, for quantize) and how to make it from the source."""

    name: str  # output name
    action: str  # "copy" | "dequant" | "quant" | "scale" (the scale written by a "quant")
    src: TensorInfo | None
    out_dtype: str
    out_shape: tuple[int, ...]
    scale: TensorInfo | None = None  # dequant: the source scale
    block: tuple[int, int] = (128, 128)
    scale_name: str | None = None  # quant: name of the scale output that follows
    reason: str = ""  # why copied (for --dry-run and inspect)
    weight: QuantizedWeight | None = None  # dequant: the layout's account of the weight and its scale

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
                job.block, job.weight = w.layout.tile, w
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


# ---------------------------------------------------------------------------------------- quantize
def _match(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first pattern (glob, or `re:` regular expression) that matches the name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return p
        elif fnmatch.fnmatchcase(name, p):
            return p
    return None


def skip_reason(info: TensorInfo, opts: QuantizeOptions) -> str | None:
    """Why a tensor is left as it is, or None if it is quantized."""
    name = info.name
    if info.dtype not in FLOAT_DTYPES:
        return "not floating point"
    if len(info.shape) not in (2, 3):
        return f"{len(info.shape)}-D"
    if not name.endswith(".weight"):
        return "not a .weight"
    bm, bn = opts.block_size
    if info.shape[-2] < bm or info.shape[-1] < bn:
        return f"smaller than one {bm}x{bn} tile"
    hit = _match(name, opts.skip)
    if hit:
        return f"--skip {hit}"
    if opts.only:
        return None if _match(name, opts.only) else "not matched by --only"
    hit = _match(name, DEFAULT_SKIP)
    if hit:
        return f"default skip {hit} (embeddings, lm_head, norms, routers)"
    return None


def plan_quantize(ckpt: Checkpoint, opts: QuantizeOptions) -> Plan:
    for shard in ckpt.unindexed:
        raise InvalidCheckpoint(
            "Mistral's native tensors are not quantized by fp8conv",
            file=ckpt.root / shard,
            hint="quantize a folder without it (the HF shards and config.json)",
        )
    for name, shard in ckpt.weight_map.items():
        info = ckpt.shards[shard].tensors[name]
        if info.dtype in FP8_WEIGHT_DTYPES:
            raise InvalidCheckpoint(
                f"input is already FP8 ({info.dtype})",
                file=ckpt.root / shard,
                tensor=name,
                hint="run `fp8conv dequantize` first to get a BF16 checkpoint",
            )
    layout = writer(opts.format)
    shards = []
    not_converted: list[str] = []
    for shard_name, header in ckpt.shards.items():
        sp = ShardPlan(shard_name, header.metadata)
        for name, info in header.tensors.items():
            why = skip_reason(info, opts)
            if why is None:
                sname = layout.scale_name(name)
                if sname in ckpt:
                    raise InvalidCheckpoint(
                        f"output scale name {sname!r} is already taken", file=ckpt.root / shard, tensor=name
                    )
                sp.jobs.append(
                    TensorJob(
                        name, "quant", info, "F8_E4M3", info.shape, block=opts.block_size, scale_name=sname
                    )
                )
                sp.jobs.append(
                    TensorJob(
                        sname,
                        "scale",
                        None,
                        "F32",
                        scale_grid(info.shape, opts.block_size),
                        block=opts.block_size,
                    )
                )
            else:
                sp.jobs.append(TensorJob(name, "copy", info, info.dtype, info.shape, reason=why))
                if name.endswith(".weight") and info.dtype in FLOAT_DTYPES and len(info.shape) in (2, 3):
                    not_converted.append(name[: -len(".weight")])
        shards.append(sp)
    module_list = sorted(set(not_converted) | {"lm_head"})
    return Plan(shards, quantized_config(ckpt.config, opts, module_list), module_list)


def native_fp8_config(
    block: tuple[int, int] = (128, 128), skipped: list[str] | None = None, scale_fmt: str = "float"
) -> dict:
    """`quantization_config` of the native block-FP8 layout (DeepSeek-V3, transformers' FP8 loader)."""
    return fp8_block.fp8_config(block, skipped, scale_fmt)


def quantized_config(config: dict | None, opts: QuantizeOptions, skipped: list[str]) -> dict:
    out = dict(config or {})
    out["quantization_config"] = writer(opts.format).config(opts.block_size, skipped, opts.scale_fmt)
    return out
