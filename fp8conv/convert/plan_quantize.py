"""The quantize plan: which tensors become FP8 in which scheme and layout, which stay as they are and why.

A tensor stays as it is when it is not a float matrix, matches a skip rule (--skip, --only, the default
rules: embeddings, lm_head, norms, routers, DeepSeek-V3's MTP projections), does not fit the scheme
(MXFP8 needs K a multiple of 32), or when the --target loader could not load or run it in that scheme
(fp8conv.convert.targeting: the per-weight rules of fp8conv.targets.weights, ragged tiles for transformers'
fp8 method and K not a multiple of the activation group, and vLLM's and SGLang's fused-layer rules).
`--target any` (the default) applies none of them; the plan's notes then say, loader by loader, which
weights it would not load or run and why (`--target X` keeps exactly those bf16).
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES, FP8_WEIGHT_DTYPES, TensorInfo
from fp8conv.convert.like import Reference, check_same_tensors
from fp8conv.convert.options import QuantizeOptions
from fp8conv.convert.plan import Plan, ShardPlan, TensorJob
from fp8conv.convert.targeting import apply_targets, notes_for, targets_of
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.writers import Writer, writer
from fp8conv.text import first_match

# Left unquantized by default (FORMATS.md): embeddings, lm_head, norms, MoE router gates; and the MTP
# layer's projections as the DeepSeek-V3 release ships them in bf16 (`eh_proj`, `shared_head.head`;
# its `enorm` / `hnorm` are norms).
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
    "*.eh_proj.*",
    "*.shared_head.head.*",
)


def skip_reason(info: TensorInfo, opts: QuantizeOptions, w: Writer | None = None) -> str | None:
    """Why a tensor is left as it is by the skip rules and the scheme, or None if it is quantized."""
    w = w or writer(opts.format, opts.scheme)
    name = info.name
    if info.dtype not in FLOAT_DTYPES:
        return "not floating point"
    if len(info.shape) not in (2, 3):
        return f"{len(info.shape)}-D"
    if info.numel == 0:
        return "empty (no elements to quantize)"
    if not name.endswith(".weight"):
        return "not a .weight"
    if w.format == "compressed-tensors" and len(info.shape) == 3:
        return "stacked experts: compressed-tensors' config groups target Linear layers (2-D weights)"
    unfit = w.unfit(tuple(info.shape))
    if unfit:
        return unfit
    bm, bn = w.tile(info.shape, opts.block_size)
    m, n = info.shape[-2:]
    if m < bm or n < bn:
        return f"smaller than one {bm}x{bn} tile"
    hit = first_match(name, opts.skip)
    if hit:
        return f"--skip {hit}"
    if opts.only:
        return None if first_match(name, opts.only) else "not matched by --only"
    hit = first_match(name, DEFAULT_SKIP)
    if hit:
        return f"default skip {hit} (embeddings, lm_head, norms, routers, MTP projections)"
    return None


def plan_quantize(ckpt: Checkpoint, opts: QuantizeOptions, like: Reference | None = None) -> Plan:
    """The quantize plan; with `like` (--like REF, opts already taken from it), exactly the reference's
    FP8 tensor set and its quantization_config."""
    w = writer(opts.format, opts.scheme)  # refuses a pair no loader reads (exit 2), with the reason
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
                hint="run `fp8conv convert` to change its layout or scheme, or `fp8conv dequantize` first",
            )
    tensors = {n: (ckpt.info(n).dtype, tuple(ckpt.info(n).shape)) for n in ckpt.weight_map}
    # the loader rules see the output's quant_method, block (block scheme only) and activation group
    rules = (w.format, opts.block_size if w.scheme == "fp8-block" else None, w.act_group)
    if like is not None:
        check_same_tensors(ckpt, like)
        base = {
            n: None if n in like.fp8 else f"not FP8 in the --like reference {like.root}"
            for n in ckpt.weight_map
        }
        quant = base
    else:
        base = {name: skip_reason(ckpt.info(name), opts, w) for name in ckpt.weight_map}
        quant = apply_targets(ckpt.config, tensors, base, *rules, targets_of(opts.target))

    shards = []
    not_converted: list[str] = []
    for shard_name, header in ckpt.shards.items():
        sp = ShardPlan(shard_name, header.metadata)
        for name, info in header.tensors.items():
            why = quant[name]
            if why is None:
                sname = w.scale_name(name)
                if sname in ckpt:
                    raise InvalidCheckpoint(
                        f"output scale name {sname!r} is already taken",
                        file=ckpt.root / shard_name,
                        tensor=name,
                    )
                tile = w.tile(info.shape, opts.block_size)
                job = TensorJob(name, "quant", info, "F8_E4M3", info.shape, block=tile, scale_name=sname)
                job.quantizer = _quantizer(w)
                sp.jobs.append(job)
                sp.jobs.append(
                    TensorJob(
                        sname,
                        "scale",
                        None,
                        w.scale_dtype,
                        w.scale_shape(info.shape, opts.block_size),
                        block=tile,
                    )
                )
            else:
                sp.jobs.append(TensorJob(name, "copy", info, info.dtype, info.shape, reason=why))
                if name.endswith(".weight") and info.dtype in FLOAT_DTYPES and len(info.shape) in (2, 3):
                    not_converted.append(name[: -len(".weight")])
        shards.append(sp)
    module_list = sorted(set(not_converted) | {"lm_head"})
    plan = Plan(shards, quantized_config(ckpt.config, opts, module_list), module_list)
    if like is not None:
        if plan.config is not None and like.quantization_config is not None:
            plan.config["quantization_config"] = like.quantization_config
        return plan
    plan.notes = notes_for(ckpt.config, tensors, base, quant, *rules, opts.target, "kept as they are")
    return plan


def _quantizer(w: Writer) -> str:
    if w.scheme == "fp8-channel":
        return "channel"
    if w.scheme == "mxfp8":
        return f"mx-{w.mx_rule}"
    return "block"


def quantized_config(config: dict | None, opts: QuantizeOptions, skipped: list[str]) -> dict:
    out = dict(config or {})
    out["quantization_config"] = writer(opts.format, opts.scheme).config(
        opts.block_size, skipped, opts.scale_fmt
    )
    return out
