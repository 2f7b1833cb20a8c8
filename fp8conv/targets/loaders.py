"""Per-target load rules: will transformers, vLLM, SGLang or compressed-tensors load this checkpoint?

Each rule is a small function over the checkpoint's settings (`Scheme`) and tensor headers that returns
findings (data). The rules are the loaders' own checks, with their messages where they have one:

- settings each loader requires (vLLM/SGLang `Fp8Config.from_config`: `activation_scheme`; block FP8
  only with dynamic activations and a two-number `weight_block_size`);
- the scale name a loader reads (`weight_scale_inv` for native block FP8, `weight_scale` for
  compressed-tensors and per-tensor FP8) and the scale grid shape `[ceil(rows/bn), ceil(cols/bk)]`;
- ragged tiles for transformers, and the activation group (K % group_size == 0, else the forward fails:
  compressed-tensors' readers, and vLLM's and SGLang's block FP8 with group = block_k): the per-weight
  rules of `weights.weight_refusal`, the one function the planners ask too;
- every shard of a fused layer (q/k/v, gate/up) in the same precision (vLLM `is_layer_skipped`);
- embeddings and lm_head are never FP8 layers in vLLM/SGLang (no scale parameter to load into);
- shard metadata `{"format": "pt"}`: transformers 5.24 loads shards without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8conv.targets import sources
from fp8conv.targets.arch import FP8_DTYPES, ModelPlan, Role
from fp8conv.targets.scheme import Scheme
from fp8conv.targets.weights import weight_refusal

TARGETS = ("transformers", "vllm", "sglang", "compressed-tensors")
FLOAT_SCALE_DTYPES = {"F32", "BF16", "F16"}


@dataclass(frozen=True)
class LoaderFinding:
    target: str
    severity: str  # "fail": does not load or loads wrong; "warn": loads, with a caveat; "info"
    rule: str
    message: str
    tensor: str | None
    source: str


@dataclass(frozen=True)
class LoaderVerdict:
    target: str
    loads: bool
    findings: tuple[LoaderFinding, ...]

    @property
    def why(self) -> str:
        fails = [f for f in self.findings if f.severity == "fail"]
        return fails[0].message if fails else "loads"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_name(weight: str, suffix: str) -> str:
    # transformers v5 fused experts: experts.gate_up_proj -> experts.gate_up_proj_scale_inv
    if weight.endswith(".weight"):
        return weight[: -len("weight")] + suffix
    return weight + "_" + suffix.replace("weight_", "")


def _fp8_weights(tensors) -> list[str]:
    return [n for n, (dtype, shape) in tensors.items() if dtype in FP8_DTYPES and len(shape) >= 2]


def _config_rules(target: str, scheme: Scheme) -> list[LoaderFinding]:
    out: list[LoaderFinding] = []
    qc = scheme.config or {}
    where = scheme.where or "config.json"
    if scheme.method == "fp8" and target in ("vllm", "sglang"):
        src = sources.VLLM_FP8_CONFIG
        if "activation_scheme" not in qc:
            out.append(
                LoaderFinding(
                    target,
                    "fail",
                    "required setting",
                    f"{where}: Cannot find any of ['activation_scheme'] in the model's quantization config.",
                    None,
                    src,
                )
            )
        raw_block = qc.get("weight_block_size")
        if raw_block is not None and scheme.block is None:
            out.append(
                LoaderFinding(
                    target,
                    "fail",
                    "weight_block_size",
                    f"{where}: The quantization block size of weight must have 2 dimensions, "
                    f"but got {len(raw_block) if isinstance(raw_block, list) else raw_block} dimensions.",
                    None,
                    src,
                )
            )
        if scheme.block is not None and qc.get("activation_scheme", "dynamic") != "dynamic":
            out.append(
                LoaderFinding(
                    target,
                    "fail",
                    "block needs dynamic activations",
                    f"{where}: The block-wise quantization only supports dynamic activation scheme for now, "
                    f"but got {qc.get('activation_scheme')} activation scheme.",
                    None,
                    src,
                )
            )
    if target == "compressed-tensors" and scheme.method != "compressed-tensors":
        out.append(
            LoaderFinding(
                target,
                "fail",
                "quant_method",
                f"{where}: quant_method is {scheme.method!r}; compressed-tensors reads only "
                "'compressed-tensors' checkpoints (fp8conv quantize --format compressed-tensors)",
                None,
                sources.COMPRESSED_TENSORS,
            )
        )
    if scheme.method == "compressed-tensors" and not qc.get("config_groups"):
        out.append(
            LoaderFinding(
                target,
                "fail",
                "config_groups",
                f"{where}: compressed-tensors settings without config_groups describe no quantized layer",
                None,
                sources.COMPRESSED_TENSORS,
            )
        )
    return out


def _scale_rules(target: str, scheme: Scheme, tensors) -> list[LoaderFinding]:
    """Scale present under the name this loader reads, with the grid it expects and a dtype it reads."""
    out: list[LoaderFinding] = []
    if scheme.method not in ("fp8", "compressed-tensors") or scheme.block is None:
        return out
    suffix = scheme.scale_suffix
    other = "weight_scale" if suffix == "weight_scale_inv" else "weight_scale_inv"
    bn, bk = scheme.block
    src = sources.TRANSFORMERS_FP8 if target == "transformers" else sources.VLLM_FP8_UTILS
    for w in _fp8_weights(tensors):
        name = _scale_name(w, suffix)
        if name not in tensors:
            wrong = _scale_name(w, other)
            msg = (
                f"scale is named {wrong!r}, but {scheme.method} with a block size loads {name!r}: the loader "
                f"has no parameter for it and the weight's scale stays unset"
                if wrong in tensors
                else f"FP8 weight has no scale {name!r}"
            )
            out.append(LoaderFinding(target, "fail", "scale name", msg, w, src))
            continue
        dtype, shape = tensors[w]
        sdtype, sshape = tensors[name]
        rows, cols = shape[-2], shape[-1]
        want = (*shape[:-2], _cdiv(rows, bn), _cdiv(cols, bk))
        if tuple(sshape) != want:
            out.append(
                LoaderFinding(
                    target,
                    "fail",
                    "scale grid",
                    f"scale {name!r} has shape {list(sshape)}, the loader allocates {list(want)} for "
                    f"{list(shape)} at block [{bn}, {bk}]",
                    w,
                    src,
                )
            )
            continue
        if sdtype not in FLOAT_SCALE_DTYPES and not (target == "transformers" and sdtype == "U8"):
            out.append(
                LoaderFinding(
                    target,
                    "warn",
                    "scale dtype",
                    f"scale {name!r} is {sdtype}; fp8conv knows this loader to read F32/BF16/F16 scales only",
                    w,
                    src,
                )
            )
        if target == "transformers" and scheme.method == "fp8":  # compressed-tensors pads, as vLLM does
            refusal = weight_refusal(target, scheme.method, shape, scheme.block, grid=tuple(sshape[-2:]))
            if refusal is not None:
                out.append(LoaderFinding(target, "fail", refusal.rule, refusal.message, w, refusal.source))
    return out


def _plan_rules(target: str, scheme: Scheme, plan: ModelPlan, tensors) -> list[LoaderFinding]:
    out: list[LoaderFinding] = []
    if scheme.method is None:
        return out
    for layer in plan.layers:
        dtypes = {tensors[p.tensor][0] in FP8_DTYPES for p in layer.parts}
        if layer.role == Role.VOCAB and True in dtypes and target in ("vllm", "sglang"):
            out.append(
                LoaderFinding(
                    target,
                    "fail",
                    "FP8 embedding",
                    f"{layer.name} is FP8: {target} quantizes linear layers only, its embedding and lm_head "
                    "have no scale parameter (keep them in modules_to_not_convert)",
                    layer.first_tensor,
                    sources.VLLM_FP8_CONFIG,
                )
            )
        if len(dtypes) == 2 and layer.role in (Role.QKV, Role.MERGED_COLUMN, Role.MERGED_REPLICATED):
            if target in ("vllm", "sglang"):
                out.append(
                    LoaderFinding(
                        target,
                        "fail",
                        "fused layer precision",
                        f"Detected some but not all shards of {layer.name} are quantized. "
                        "All shards of fused layers to have the same precision.",
                        layer.first_tensor,
                        sources.VLLM_QUANT_UTILS,
                    )
                )
        # K against the activation group, per fused layer (its parts share K): every reader of the
        # compressed-tensors layout, and vLLM's and SGLang's per-token-group quantization of the input
        # under quant_method fp8 (group = block_k), as the planners apply it.
        if (
            (scheme.method == "compressed-tensors" or target in ("vllm", "sglang"))
            and True in dtypes
            and layer.role != Role.VOCAB
        ):
            refusal = weight_refusal(
                target, scheme.method, (0, layer.input_size), scheme.block, scheme.act_group, layer=layer.name
            )
            if refusal is not None:
                out.append(
                    LoaderFinding(
                        target, "fail", refusal.rule, refusal.message, layer.first_tensor, refusal.source
                    )
                )
    return out


def _metadata_rules(target: str, shards_without_format: list[str]) -> list[LoaderFinding]:
    if target != "transformers" or not shards_without_format:
        return []
    return [
        LoaderFinding(
            target,
            "info",
            "shard metadata",
            f'{len(shards_without_format)} shard(s) lack {{"format": "pt"}} metadata '
            f"({shards_without_format[0]}, ...): transformers 5.24 loads them anyway",
            None,
            sources.TRANSFORMERS_FP8_QUANTIZER,
        )
    ]


def check_loaders(
    scheme: Scheme,
    plan: ModelPlan,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    shards_without_format: list[str],
    targets: tuple[str, ...] = TARGETS,
) -> list[LoaderVerdict]:
    """One verdict per target: loads or not, with every finding behind it."""
    verdicts = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
        findings = (
            _config_rules(target, scheme)
            + _scale_rules(target, scheme, tensors)
            + _plan_rules(target, scheme, plan, tensors)
            + _metadata_rules(target, shards_without_format)
        )
        loads = not any(f.severity == "fail" for f in findings)
        verdicts.append(LoaderVerdict(target, loads, tuple(findings)))
    return verdicts
