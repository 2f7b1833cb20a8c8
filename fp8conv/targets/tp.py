"""vLLM's and SGLang's tensor-parallel partition rules for block FP8, applied layer by layer.

Each rule is the consumer's own check, re-implemented from its source (see `sources.py`), with the
consumer's error text, so a failing cell reads exactly as the server's traceback would:

- heads: `num_attention_heads % tp == 0` (vLLM config check); kv heads split, or replicated when
  `tp >= kv_heads`, which needs `tp % kv_heads == 0` (QKVParallelLinear via `divide`).
- every split size must divide by tp (`divide` -> "X is not divisible by T").
- validate_fp8_block_shape (same code in vLLM and SGLang): a row-parallel layer's input per rank must
  divide by block_k; a column-parallel layer's outputs per rank, each part of a merged layer (q/k/v,
  gate/up) checked on its own, must divide by block_n; an unsplit merged layer (tp 1, or replicated)
  may leave its last part ragged.
- FusedMoE (Fp8MoEMethod.create_weights): intermediate per partition % block_n, and % block_k when
  tp > 1. With expert parallelism the experts are not split (intermediate per partition = intermediate).
  SGLang also asserts `num_experts % ep_size == 0`; vLLM spreads a remainder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fp8conv.targets import sources
from fp8conv.targets.arch import ModelPlan, ParallelLayer, Role

TP_LOADERS = ("vllm", "sglang")


@dataclass(frozen=True)
class TpFailure:
    layer: str
    tensor: str
    rule: str  # short name of the rule
    message: str  # the loader's own error text
    source: str


@dataclass(frozen=True)
class TpCell:
    tp: int
    loader: str
    ep: bool
    failures: tuple[TpFailure, ...]
    checked: int  # FP8 layers checked

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def first(self) -> TpFailure | None:
        return self.failures[0] if self.failures else None


def _validate_block(
    layer: ParallelLayer,
    tp: int,
    input_size: int,
    input_per_rank: int,
    output_size: int,
    output_parts: list[int],
    block: tuple[int, int],
    source: str,
) -> TpFailure | None:
    """validate_fp8_block_shape, statement for statement."""
    block_n, block_k = block
    if tp > 1 and input_size // input_per_rank == tp and input_per_rank % block_k != 0:
        return TpFailure(
            layer.name,
            layer.first_tensor,
            "row-parallel input per rank % block_k",
            f"Weight input_size_per_partition = {input_per_rank} is not divisible by "
            f"weight quantization block_k = {block_k}.",
            source,
        )
    is_tp_split = tp > 1 and output_size // sum(output_parts) == tp
    is_merged = len(output_parts) > 1
    if is_tp_split or is_merged:
        sizes = output_parts if is_tp_split else output_parts[:-1]
        for i, size in enumerate(sizes):
            if size % block_n != 0:
                return TpFailure(
                    layer.name,
                    layer.parts[i].tensor,
                    "column-parallel output per rank % block_n",
                    f"Weight output_partition_size = {size} is not divisible by "
                    f"weight quantization block_n = {block_n}.",
                    source,
                )
    return None


def _divide(layer: ParallelLayer, tensor: str, numerator: int, tp: int) -> TpFailure | None:
    if numerator % tp:
        return TpFailure(
            layer.name,
            tensor,
            "split size % tp",
            f"{numerator} is not divisible by {tp}",
            sources.VLLM_LINEAR,
        )
    return None


def check_layer(
    layer: ParallelLayer, tp: int, ep: bool, block: tuple[int, int] | None, loader: str
) -> TpFailure | None:
    """The first rule `loader` breaks building `layer` at tensor-parallel size `tp`, or None.
    `block` None means the checkpoint is not block-quantized: only the split itself is checked."""
    fp8_source = sources.VLLM_FP8_UTILS if loader == "vllm" else sources.SGLANG_FP8_UTILS
    moe_source = sources.VLLM_FP8_MOE if loader == "vllm" else sources.SGLANG_FP8_MOE
    blocked = block is not None and layer.quantized
    role = layer.role
    if role in (Role.VOCAB, Role.REPLICATED):
        return None
    if role == Role.MERGED_REPLICATED:
        if not blocked:
            return None
        sizes = list(layer.output_sizes)
        return _validate_block(
            layer, 1, layer.input_size, layer.input_size, sum(sizes), sizes, block, fp8_source
        )
    if role == Role.QKV:
        heads, kv = layer.heads
        head, v_head = layer.head_sizes
        if heads % tp:
            return _divide(layer, layer.parts[0].tensor, heads, tp)
        if tp >= kv:
            if tp % kv:
                return _divide(layer, layer.parts[1].tensor, tp, kv)
            kv_rank = 1
        else:
            if kv % tp:
                return _divide(layer, layer.parts[1].tensor, kv, tp)
            kv_rank = kv // tp
        parts = [heads // tp * head, kv_rank * head, kv_rank * v_head]
        if not blocked:
            return None
        output_size = sum(parts) * tp
        return _validate_block(
            layer, tp, layer.input_size, layer.input_size, output_size, parts, block, fp8_source
        )
    if role in (Role.COLUMN, Role.MERGED_COLUMN):
        for p in layer.parts:
            if f := _divide(layer, p.tensor, p.size, tp):
                return f
        parts = [p.size // tp for p in layer.parts]
        if not blocked:
            return None
        output_size = sum(layer.output_sizes)
        return _validate_block(
            layer, tp, layer.input_size, layer.input_size, output_size, parts, block, fp8_source
        )
    if role == Role.ROW:
        if f := _divide(layer, layer.first_tensor, layer.input_size, tp):
            return f
        if not blocked:
            return None
        out = layer.output_sizes[0]
        return _validate_block(
            layer, tp, layer.input_size, layer.input_size // tp, out, [out], block, fp8_source
        )
    if role == Role.MOE:
        if ep:
            if loader == "sglang" and layer.experts % tp:
                return TpFailure(
                    layer.name,
                    layer.first_tensor,
                    "experts % ep size",
                    f"AssertionError: num_experts % self.moe_ep_size == 0 ({layer.experts} experts, ep {tp})",
                    sources.SGLANG_FUSED_MOE,
                )
            per_partition = layer.intermediate
        else:
            if f := _divide(layer, layer.first_tensor, layer.intermediate, tp):
                return f
            per_partition = layer.intermediate // tp
        if not blocked:
            return None
        block_n, block_k = block
        if per_partition % block_n != 0:
            return TpFailure(
                layer.name,
                layer.first_tensor,
                "expert gate/up output per rank % block_n",
                f"The output_size of gate's and up's weight = {per_partition} is not divisible by "
                f"weight quantization block_n = {block_n}.",
                moe_source,
            )
        if tp > 1 and per_partition % block_k != 0:
            down = next(
                (p.tensor for p in layer.parts if "down" in p.tensor or p.tensor.endswith("w2.weight")), None
            )
            return TpFailure(
                layer.name,
                down or layer.first_tensor,
                "expert down input per rank % block_k",
                f"The input_size of down's weight = {per_partition} is not divisible by "
                f"weight quantization block_k = {block_k}.",
                moe_source,
            )
        return None
    raise AssertionError(f"unhandled role {role}")


def check_tensor(
    plan: ModelPlan, tensor: str, tp: int, ep: bool, block: tuple[int, int] | None, loader: str
) -> TpFailure | None:
    """Can `loader` build, at `tp`, the layer holding checkpoint weight `tensor` quantized with `block`
    (None: left unquantized)? For a planner deciding per tensor before anything is written; the
    checkpoint's current dtype does not matter. Raises KeyError for a tensor no serving layer holds."""
    for layer in plan.layers:
        if any(p.tensor == tensor for p in layer.parts):
            return check_layer(replace(layer, quantized=block is not None), tp, ep, block, loader)
    raise KeyError(tensor)


def _heads_failure(plan: ModelPlan, tp: int) -> TpFailure | None:
    if plan.attention_heads and plan.attention_heads % tp:
        return TpFailure(
            "config.json",
            "num_attention_heads",
            "attention heads % tp",
            f"Total number of attention heads ({plan.attention_heads}) must be divisible by tensor "
            f"parallel size ({tp}).",
            sources.VLLM_MODEL_CONFIG,
        )
    return None


def check_tp(plan: ModelPlan, tp: int, ep: bool, block: tuple[int, int] | None, loader: str) -> TpCell:
    """Every failure of `plan` at `tp` for `loader`, in the order the server builds the layers."""
    failures: list[TpFailure] = []
    if f := _heads_failure(plan, tp):
        failures.append(f)
    checked = 0
    for layer in plan.layers:
        checked += layer.quantized
        if f := check_layer(layer, tp, ep, block, loader):
            failures.append(f)
    return TpCell(tp, loader, ep, tuple(failures), checked)


def suggest_fix(plan: ModelPlan, cell: TpCell, block: tuple[int, int] | None) -> str | None:
    """What would make a failing cell load: expert parallelism, a smaller block, or a per-channel scheme."""
    if cell.ok:
        return None
    fixes: list[str] = []
    only_block_rules = all("block" in f.rule for f in cell.failures)
    if not cell.ep and all(f.rule.startswith("expert") or "block" in f.rule for f in cell.failures):
        with_ep = check_tp(plan, cell.tp, True, block, cell.loader)
        if with_ep.ok:
            flag = "--enable-expert-parallel" if cell.loader == "vllm" else "--ep-size"
            fixes.append(f"expert parallelism ({flag}; fp8conv --ep)")
    if block is not None and only_block_rules:
        for smaller in (64, 32):
            if smaller < min(block) and check_tp(plan, cell.tp, cell.ep, (smaller, smaller), cell.loader).ok:
                fixes.append(
                    f"re-quantize with --block-size {smaller} (Triton/CUTLASS paths; DeepGEMM needs 128)"
                )
                break
        fixes.append("a per-channel FP8 scheme (no block constraint on the split)")
    if not fixes:
        return "no quantization change helps: the split itself does not divide (pick another TP size)"
    return "; or ".join(fixes)
