"""`--target`, for both planners (quantize and convert): which weights stay bf16 because the target
loader could not load or run them in FP8 in the output's scheme, layout and block.

The per-weight rules are fp8conv.targets.weights' (the same function verify's loader check asks);
the per-layer rules here are vLLM's and SGLang's for fused layers at TP 1: the block-shape rules
(validate_fp8_block_shape, fp8conv.targets.tp) and every shard of a fused layer (q/k/v, gate/up) in one
precision (vLLM `is_layer_skipped`). `any` applies none of them; the plan's notes then say, loader by
loader, which weights it would not load or run and why.
"""

from __future__ import annotations

from collections import defaultdict

from fp8conv.targets.arch import plan_model
from fp8conv.targets.tp import check_layer
from fp8conv.targets.weights import weight_refusal

LOADERS = ("transformers", "vllm", "sglang")

# name -> (the dtype it has when it is not written in FP8, shape)
Tensors = dict[str, tuple[str, tuple[int, ...]]]


def targets_of(target: str) -> tuple[str, ...]:
    """The loaders whose rules decide what stays bf16: none for `any` (every tile fp8conv can write,
    ragged ones too, as DeepSeek lays them out; the plan's notes say what each loader would refuse)."""
    return () if target == "any" else (target,)


def apply_targets(
    config: dict | None,
    tensors: Tensors,
    base: dict[str, str | None],
    method: str,
    block: tuple[int, int] | None,
    act_group: int | None,
    targets: tuple[str, ...],
) -> dict[str, str | None]:
    """`base` (name -> None where the plan writes FP8, else why not) with the loaders' per-weight and
    per-layer rules added. method: the output's quant_method; block: its tile when block-scaled."""
    quant = dict(base)
    for name, why in base.items():
        if why is None:
            for target in targets:
                refusal = weight_refusal(target, method, tensors[name][1], block, act_group)
                if refusal is not None:
                    why = refusal.reason
                    break
            quant[name] = why
    _layer_rules(config, tensors, quant, block, targets)
    return quant


def _layer_rules(
    config: dict | None,
    tensors: Tensors,
    quant: dict[str, str | None],
    block: tuple[int, int] | None,
    targets: tuple[str, ...],
) -> None:
    """vLLM / SGLang: block-shape rules of fused layers at TP 1 and one precision per fused layer.
    Updates `quant` in place until nothing changes."""
    loaders = [t for t in targets if t in ("vllm", "sglang")]
    if not loaders:
        return
    for _ in range(4):
        now = {
            n: ("F8_E4M3" if quant.get(n, "") is None else dtype, shape)
            for n, (dtype, shape) in tensors.items()
        }
        model = plan_model(config, now)
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


def notes_for(
    config: dict | None,
    tensors: Tensors,
    base: dict[str, str | None],
    quant: dict[str, str | None],
    method: str,
    block: tuple[int, int] | None,
    act_group: int | None,
    target: str,
    kept: str,
) -> list[str]:
    """The plan's notes: for `any`, loader by loader what each would not load or run; else what the
    target kept (`kept`: how the plan words it)."""
    if target != "any":
        return target_notes(quant, f"--target {target}: {kept}")
    return [
        note
        for loader in LOADERS
        for note in target_notes(
            apply_targets(config, tensors, base, method, block, act_group, (loader,)),
            f"{loader} cannot load or run",
        )
    ]
