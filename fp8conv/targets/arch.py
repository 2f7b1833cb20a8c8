"""Which weights a server splits how: the parallel layers of a model, from tensor names and config.json.

A serving engine does not see `q_proj`, `k_proj` and `v_proj`: it builds one `qkv_proj` layer split by
heads, one `gate_up_proj` split part by part, row-parallel `o_proj`/`down_proj`, replicated routers, and
fused expert weights `w13`/`w2`. This module maps checkpoint tensors onto those layers (vLLM's and SGLang's
model files share the layout: llama.py, qwen2/qwen3(_moe).py, deepseek_v2.py, minimax_m2.py, glm4_moe.py,
mixtral.py) so the partition rules in `tp.py` can be applied to them. An architecture that is not listed
here is reported as unknown: its layers are never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


class Role(Enum):
    """The parallel linear class a server builds for a layer."""

    COLUMN = "column"  # ColumnParallelLinear: output split across ranks
    MERGED_COLUMN = "merged-column"  # MergedColumnParallelLinear: each part split (gate/up)
    QKV = "qkv"  # QKVParallelLinear: split by heads, kv heads replicated past their count
    ROW = "row"  # RowParallelLinear: input split across ranks
    REPLICATED = "replicated"  # ReplicatedLinear: whole on every rank
    MERGED_REPLICATED = "merged-replicated"  # MergedReplicatedLinear (DeepSeek fused_qkv_a_proj)
    MOE = "moe"  # FusedMoE: w13 = gate/up, w2 = down, per expert
    VOCAB = "vocab"  # VocabParallelEmbedding / ParallelLMHead (vocabulary padded, never FP8-checked)


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor's share of a serving layer."""

    tensor: str  # checkpoint weight name
    size: int  # its output rows (the part's width in the merged layer)


@dataclass(frozen=True)
class ParallelLayer:
    name: str  # the serving layer, e.g. model.layers.0.self_attn.qkv_proj
    role: Role
    parts: tuple[Part, ...]
    input_size: int
    quantized: bool  # whether its weights are FP8 in the checkpoint
    heads: tuple[int, int] | None = None  # QKV: (attention heads, kv heads)
    head_sizes: tuple[int, int] | None = None  # QKV: (q/k head size, v head size)
    experts: int = 0  # MOE: routed experts
    intermediate: int = 0  # MOE: intermediate size of one expert

    @property
    def output_sizes(self) -> tuple[int, ...]:
        return tuple(p.size for p in self.parts)

    @property
    def first_tensor(self) -> str:
        return self.parts[0].tensor


@dataclass
class ModelPlan:
    """The serving layers of a checkpoint, or why they are not known."""

    architecture: str | None
    family: str | None
    layers: list[ParallelLayer] = field(default_factory=list)
    attention_heads: int | None = None
    kv_heads: int | None = None
    unmapped: list[str] = field(default_factory=list)  # FP8 2-D weights no rule covers
    problem: str | None = None  # set when the architecture is unknown or config lacks a field

    @property
    def known(self) -> bool:
        return self.problem is None


# architectures[0] in config.json -> family. Families share naming; the family picks the attention and
# MoE conventions (see _layer_tensors).
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "Qwen2MoeForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Glm4MoeForCausalLM": "llama",
    "MiniMaxM2ForCausalLM": "llama",
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
}

FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}

_LAYER = re.compile(
    r"^(?P<prefix>(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(?P<idx>\d+))\.(?P<rest>.+)$"
)
_EXPERT = re.compile(
    r"^(?P<moe>(?:mlp|block_sparse_moe)\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
    r"\.weight$"
)
_FUSED_EXPERT = re.compile(r"^(?P<moe>mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")  # transformers v5
_W13 = {"gate_proj", "up_proj", "w1", "w3"}
_MLP_GROUPS = ("mlp", "mlp.shared_experts", "mlp.shared_expert")
_ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.shared_expert_gate.weight")
_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head|shared_head\.head|wte|word_embeddings)\.weight$")


def architecture_of(config: dict | None) -> str | None:
    if not config:
        return None
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def plan_model(config: dict | None, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> ModelPlan:
    """Map `tensors` (name -> (safetensors dtype, shape)) onto the serving layers of `config`'s model."""
    arch = architecture_of(config)
    family = FAMILIES.get(arch or "")
    plan = ModelPlan(architecture=arch, family=family)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        plan.problem = (
            f"architecture {arch!r} is not one fp8conv knows how servers split; known: {known}"
            if arch
            else "config.json names no architecture; the tensor-parallel split cannot be known"
        )
        return plan
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        plan.problem = "config.json has no num_attention_heads; heads decide the attention split"
        return plan
    plan.attention_heads = heads
    kv = config.get("num_key_value_heads", heads)
    plan.kv_heads = kv if isinstance(kv, int) and kv > 0 else heads

    by_layer: dict[str, dict[str, str]] = {}
    covered: set[str] = set()
    for name in tensors:
        m = _LAYER.match(name)
        if m:
            by_layer.setdefault(m["prefix"], {})[m["rest"]] = name
        elif _VOCAB.search(name):
            dtype, shape = tensors[name]
            plan.layers.append(
                ParallelLayer(name[: -len(".weight")], Role.VOCAB, (Part(name, shape[0]),), shape[-1], False)
            )
            covered.add(name)

    def idx(prefix: str) -> int:
        return int(prefix.rsplit(".", 1)[1])

    for prefix in sorted(by_layer, key=idx):
        rest = by_layer[prefix]
        layers = _layer(plan, family, prefix, rest, tensors, config)
        plan.layers.extend(layers)
        for layer in layers:
            covered.update(p.tensor for p in layer.parts)
        for r, full in rest.items():
            if _VOCAB.search(r):
                dtype, shape = tensors[full]
                plan.layers.append(
                    ParallelLayer(full[:-7], Role.VOCAB, (Part(full, shape[0]),), shape[-1], False)
                )
                covered.add(full)
    for name, (dtype, shape) in tensors.items():
        if name not in covered and dtype in FP8_DTYPES and len(shape) >= 2:
            plan.unmapped.append(name)
    return plan


def _fp8(tensors, names) -> bool:
    return any(tensors[n][0] in FP8_DTYPES for n in names)


def _layer(plan, family, prefix, rest, tensors, config) -> list[ParallelLayer]:
    out: list[ParallelLayer] = []

    def full(r: str) -> str | None:
        return rest.get(r)

    def shape(n: str) -> tuple[int, ...]:
        return tensors[n][1]

    # attention
    if family == "deepseek":
        qa, kva = full("self_attn.q_a_proj.weight"), full("self_attn.kv_a_proj_with_mqa.weight")
        if qa and kva:  # vLLM fuses them into one MergedReplicatedLinear (deepseek_v2.py fused_qkv_a_proj)
            out.append(
                _fused(f"{prefix}.self_attn.fused_qkv_a_proj", Role.MERGED_REPLICATED, (qa, kva), tensors)
            )
        elif kva:
            out.append(_simple(f"{prefix}.self_attn.kv_a_proj_with_mqa", Role.REPLICATED, kva, tensors))
        for r in ("self_attn.q_b_proj", "self_attn.q_proj", "self_attn.kv_b_proj"):
            n = full(r + ".weight")
            if n:
                out.append(_simple(f"{prefix}.{r}", Role.COLUMN, n, tensors))
    else:
        q, k, v = (full(f"self_attn.{p}_proj.weight") for p in "qkv")
        if q and k and v:
            kv_heads = plan.kv_heads
            out.append(
                _fused(
                    f"{prefix}.self_attn.qkv_proj",
                    Role.QKV,
                    (q, k, v),
                    tensors,
                    heads=(plan.attention_heads, kv_heads),
                    head_sizes=(shape(k)[-2] // kv_heads, shape(v)[-2] // kv_heads),
                )
            )
    o = full("self_attn.o_proj.weight")
    if o:
        out.append(_simple(f"{prefix}.self_attn.o_proj", Role.ROW, o, tensors))

    # dense MLP and shared experts: gate/up merged, down row-parallel
    for group in _MLP_GROUPS:
        g, u, d = (full(f"{group}.{p}_proj.weight") for p in ("gate", "up", "down"))
        if g and u:
            out.append(_fused(f"{prefix}.{group}.gate_up_proj", Role.MERGED_COLUMN, (g, u), tensors))
        if d:
            out.append(_simple(f"{prefix}.{group}.down_proj", Role.ROW, d, tensors))

    # routed experts, one FusedMoE layer
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for r, n in rest.items():
        m = _EXPERT.match(r)
        if m:
            experts.setdefault(m["moe"], {}).setdefault(int(m["e"]), {})[m["proj"]] = n
    for moe, per in experts.items():
        names = tuple(n for e in sorted(per) for n in per[e].values())
        first = per[min(per)]
        w13 = [n for p, n in first.items() if p in _W13]
        w2 = [n for p, n in first.items() if p not in _W13]
        inter = shape(w13[0])[-2] if w13 else shape(w2[0])[-1]
        hidden = shape(w13[0])[-1] if w13 else shape(w2[0])[-2]
        parts = tuple(Part(n, shape(n)[-2]) for n in names)
        out.append(
            ParallelLayer(
                f"{prefix}.{moe}",
                Role.MOE,
                parts,
                hidden,
                _fp8(tensors, names),
                experts=len(per),
                intermediate=inter,
            )
        )
    fused = {m["proj"]: n for r, n in rest.items() if (m := _FUSED_EXPERT.match(r))}
    if fused:  # [E, 2I, H] gate_up and [E, H, I] down
        names = tuple(fused.values())
        gu, dn = fused.get("gate_up_proj"), fused.get("down_proj")
        inter = shape(gu)[-2] // 2 if gu else shape(dn)[-1]
        hidden = shape(gu)[-1] if gu else shape(dn)[-2]
        out.append(
            ParallelLayer(
                f"{prefix}.mlp.experts",
                Role.MOE,
                tuple(Part(n, shape(n)[-2]) for n in names),
                hidden,
                _fp8(tensors, names),
                experts=shape(names[0])[0],
                intermediate=inter,
            )
        )

    for r in _ROUTERS:
        n = full(r)
        if n:
            out.append(_simple(f"{prefix}.{r[: -len('.weight')]}", Role.REPLICATED, n, tensors))
    n = full("eh_proj.weight")  # DeepSeek MTP: a plain nn.Linear in vLLM's deepseek_mtp.py
    if n:
        out.append(_simple(f"{prefix}.eh_proj", Role.REPLICATED, n, tensors))
    return out


def _fused(name: str, role: Role, names: tuple[str, ...], tensors, **kw) -> ParallelLayer:
    """A layer vLLM / SGLang load as one: its parts' output rows, their shared input size."""
    parts = tuple(Part(n, tensors[n][1][-2]) for n in names)
    return ParallelLayer(name, role, parts, tensors[names[0]][1][-1], _fp8(tensors, names), **kw)


def _simple(name: str, role: Role, tensor: str, tensors) -> ParallelLayer:
    dtype, shape = tensors[tensor]
    return ParallelLayer(name, role, (Part(tensor, shape[-2]),), shape[-1], dtype in FP8_DTYPES)
