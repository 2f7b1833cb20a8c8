"""The quantize plan: which tensors become FP8 in which scheme and layout, which stay as they are and why.

A tensor stays as it is when it is not a float matrix, matches a skip rule (--skip, --only, the default
rules: embeddings, lm_head, norms, routers, DeepSeek-V3's MTP projections), does not fit the scheme
(MXFP8 needs K a multiple of 32), or when the --target loader could not load or run it in that scheme:

- transformers (quant_method fp8): ragged tiles. It infers the block as weight shape / scale grid and
  refuses a shape the grid does not divide (integrations/finegrained_fp8.py Fp8Dequantize).
- transformers (compressed-tensors), vLLM, SGLang: K not a multiple of the activation group. compressed-
  tensors quantizes the input per 1 x group_size group and fails in the forward pass; vLLM's and SGLang's
  per-token-group activation quantization asserts K % group_size == 0 (vllm
  model_executor/layers/quantization/utils/fp8_utils.py, sglang srt/layers/quantization/fp8_kernel.py).
- vLLM, SGLang: the block-shape rules of fused layers (validate_fp8_block_shape, in fp8conv.targets.tp),
  and every shard of a fused layer (q/k/v, gate/up) in one precision.

`--target any` (the default) applies none of them: every tile fp8conv can write, ragged ones too, as the
DeepSeek releases lay them out; the plan's notes then say, loader by loader, which weights it would not
load or run and why (`--target X` keeps exactly those bf16).
"""

from __future__ import annotations

from collections import defaultdict

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES, FP8_WEIGHT_DTYPES, TensorInfo
from fp8conv.convert.like import Reference, check_same_tensors
from fp8conv.convert.options import QuantizeOptions
from fp8conv.convert.plan import Plan, ShardPlan, TensorJob
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
LOADERS = ("transformers", "vllm", "sglang")


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
    bm, bn = w.tile(info.shape, opts.block_size)
    m, n = info.shape[-2:]
    if w.scheme == "mxfp8" and n % bn:
        return f"K = {n} is not a multiple of {bn} (MXFP8 groups)"
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


def targets_of(opts: QuantizeOptions) -> tuple[str, ...]:
    """The loaders whose rules decide what stays bf16: none for `any` (every tile fp8conv can write,
    ragged ones too, as DeepSeek lays them out; the plan's notes say what each loader would refuse)."""
    return () if opts.target == "any" else (opts.target,)


def loader_reason(shape: tuple[int, ...], w: Writer, opts: QuantizeOptions, target: str) -> str | None:
    """Why `target` could not load or run this weight in the chosen scheme (per-tensor rules)."""
    if w.scheme != "fp8-block":
        return None  # per-channel: per-token activations; MXFP8: K % 32 is the scheme's own rule
    m, n = shape[-2:]
    bm, bn = w.tile(shape, opts.block_size)
    if target == "transformers" and w.format == "fp8" and (m % bm or n % bn):
        return (
            f"transformers: {m}x{n} leaves ragged {bm}x{bn} tiles, and transformers infers the block as "
            "weight shape / scale grid and refuses it"
        )
    group = w.act_group or bn  # quant_method fp8: activations quantized per 1 x block_k
    if n % group and (target in ("vllm", "sglang") or w.format == "compressed-tensors"):
        return (
            f"{target}: K = {n} is not a multiple of the activation group {group}; the input's per-group "
            "quantization fails in the forward pass"
        )
    return None


def _layer_rules(
    ckpt: Checkpoint, quant: dict[str, str | None], w: Writer, opts: QuantizeOptions, targets: tuple[str, ...]
) -> None:
    """vLLM / SGLang: block-shape rules of fused layers at TP 1 and one precision per fused layer.
    Updates `quant` (name -> None if quantized, else the reason) in place until nothing changes."""
    from fp8conv.targets.arch import plan_model
    from fp8conv.targets.tp import check_layer

    loaders = [t for t in targets if t in ("vllm", "sglang")]
    if not loaders:
        return
    block = opts.block_size if w.scheme == "fp8-block" else None
    for _ in range(4):
        tensors = {
            n: ("F8_E4M3" if quant.get(n, "") is None else ckpt.info(n).dtype, tuple(ckpt.info(n).shape))
            for n in ckpt.weight_map
        }
        model = plan_model(ckpt.config, tensors)
        changed = False
        for layer in model.layers:
            names = [p.tensor for p in layer.parts]
            fp8 = [n for n in names if quant.get(n, "") is None]
            if not fp8:
                continue
            why = None
            for loader in loaders:
                fail = check_layer(layer, 1, False, block, loader) if block is not None else None
                if fail is not None:
                    why = f"{loader}: {layer.name}: {fail.message}"
                    break
            if why is None and len(fp8) < len(names):
                kept = next(n for n in names if n not in fp8)
                why = f"{loaders[0]}: every shard of {layer.name} in one precision, and {kept} stays as it is"
            if why is not None:
                for n in fp8:
                    quant[n] = why
                changed = True
        if not changed:
            return


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
    if like is not None:
        check_same_tensors(ckpt, like)
        base = {
            n: None if n in like.fp8 else f"not FP8 in the --like reference {like.root}"
            for n in ckpt.weight_map
        }
        quant = base
    else:
        base = {name: skip_reason(ckpt.info(name), opts, w) for name in ckpt.weight_map}
        quant = _apply_targets(ckpt, base, w, opts, targets_of(opts))

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
    if opts.target == "any":
        plan.notes = [
            note
            for loader in LOADERS
            for note in target_notes(
                _apply_targets(ckpt, base, w, opts, (loader,)), f"{loader} cannot load or run"
            )
        ]
    else:
        plan.notes = target_notes(quant, f"--target {opts.target}: kept as they are")
    return plan


def _apply_targets(
    ckpt: Checkpoint, base: dict[str, str | None], w: Writer, opts: QuantizeOptions, targets: tuple[str, ...]
) -> dict[str, str | None]:
    """`base` (the skip rules' verdicts) with the loaders' per-tensor and per-layer rules added."""
    quant = dict(base)
    for name, why in base.items():
        if why is None:
            for target in targets:
                why = loader_reason(tuple(ckpt.info(name).shape), w, opts, target)
                if why is not None:
                    break
            quant[name] = why
    _layer_rules(ckpt, quant, w, opts, targets)
    return quant


def _quantizer(w: Writer) -> str:
    if w.scheme == "fp8-channel":
        return "channel"
    if w.scheme == "mxfp8":
        return f"mx-{w.mx_rule}"
    return "block"


def target_notes(quant: dict[str, str | None], lead: str) -> list[str]:
    """One line per loader reason: how many weights it concerns, and which."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, why in quant.items():
        if why and why.split(":", 1)[0] in LOADERS:
            by_reason[why].append(name)
    out = []
    for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
        out.append(f"{lead}: {shown}: {why}")
    return out


def quantized_config(config: dict | None, opts: QuantizeOptions, skipped: list[str]) -> dict:
    out = dict(config or {})
    out["quantization_config"] = writer(opts.format, opts.scheme).config(
        opts.block_size, skipped, opts.scale_fmt
    )
    return out
