"""Tensor-parallel plans: tiny checkpoints of each common architecture, with sizes that pass and fail at
given TP sizes, checked cell by cell against a straightforward re-implementation of the rules.

The oracle below is written from the model dimensions (config), not from tensor names, re-implementing:
- vLLM vllm/model_executor/layers/quantization/utils/fp8_utils.py validate_fp8_block_shape
  @007d50058a06dec0f82472d63c819244d460c40d (SGLang python/sglang/srt/layers/quantization/fp8_utils.py
  @002ed7e465ec774f9332987798b855eb73d5e830 has the same function);
- vLLM vllm/model_executor/layers/linear.py @9e109c9887e38c51fc16b0da89760c5bd7c293c9 (QKVParallelLinear
  head split and kv-head replication, MergedColumnParallelLinear parts, RowParallelLinear input split);
- vLLM vllm/model_executor/layers/quantization/fp8.py @0071b24bf8fe8c3d1bc3516d0ff8477f07964aaf
  Fp8MoEMethod.create_weights (SGLang fp8.py @d94a1535900da43cb374c2445679375e78935af6 the same);
- SGLang python/sglang/srt/layers/moe/fused_moe_triton/layer.py @9af3c47b70fa13269891063624d658bb1be1b6b9
  (`assert num_experts % self.moe_ep_size == 0`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp8conv.checkpoint.safetensors_io import save_file
from fp8conv.targets import serving_report
from fp8conv.targets.arch import Role, plan_model
from fp8conv.targets.tp import check_tensor

BLOCK = 128
TP_SIZES = (1, 2, 4, 8, 16)
QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- tiny checkpoints, by architecture
def llama_like(
    arch, hidden, heads, kv, head_dim, inter=None, layers=1, moe=None, shared=None, router="mlp.gate"
):
    """Tensor shapes of a Llama/Qwen/Mistral/GLM/MiniMax-style model. moe = (experts, expert intermediate,
    naming) with naming 'hf' (experts.E.gate_proj) or 'mixtral' (block_sparse_moe.experts.E.w1)."""
    cfg = {
        "architectures": [arch],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
        "vocab_size": 256,
    }
    t: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (256, hidden),
        "lm_head.weight": (256, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = (hidden,)
        t[f"{p}.self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = (kv * head_dim, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = (kv * head_dim, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if inter:
            cfg["intermediate_size"] = inter
            for n in ("gate", "up"):
                t[f"{p}.mlp.{n}_proj.weight"] = (inter, hidden)
            t[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        if moe:
            experts, mi, naming = moe
            cfg["moe_intermediate_size"] = mi
            cfg["num_experts"] = experts
            t[f"{p}.{router}.weight"] = (experts, hidden)
            for e in range(experts):
                if naming == "mixtral":
                    q = f"{p}.block_sparse_moe.experts.{e}"
                    t[f"{q}.w1.weight"] = (mi, hidden)
                    t[f"{q}.w3.weight"] = (mi, hidden)
                    t[f"{q}.w2.weight"] = (hidden, mi)
                else:
                    q = f"{p}.mlp.experts.{e}"
                    t[f"{q}.gate_proj.weight"] = (mi, hidden)
                    t[f"{q}.up_proj.weight"] = (mi, hidden)
                    t[f"{q}.down_proj.weight"] = (hidden, mi)
        if shared:
            for n in ("gate", "up"):
                t[f"{p}.mlp.shared_experts.{n}_proj.weight"] = (shared, hidden)
            t[f"{p}.mlp.shared_experts.down_proj.weight"] = (hidden, shared)
    return cfg, t


def deepseek_like(
    hidden, heads, q_lora, kv_lora, nope, rope, v_head, inter, moe_inter, experts, shared, dense=1
):
    """DeepSeek-V2/V3 MLA + MoE: layer 0 dense, layer 1 MoE with shared experts."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v_head,
        "intermediate_size": inter,
        "moe_intermediate_size": moe_inter,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "first_k_dense_replace": dense,
        "num_hidden_layers": 2,
    }
    t: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (256, hidden),
        "lm_head.weight": (256, hidden),
    }
    for i in range(2):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        if q_lora:
            t[f"{a}.q_a_proj.weight"] = (q_lora, hidden)
            t[f"{a}.q_a_layernorm.weight"] = (q_lora,)
            t[f"{a}.q_b_proj.weight"] = (heads * (nope + rope), q_lora)
        else:
            t[f"{a}.q_proj.weight"] = (heads * (nope + rope), hidden)
        t[f"{a}.kv_a_proj_with_mqa.weight"] = (kv_lora + rope, hidden)
        t[f"{a}.kv_a_layernorm.weight"] = (kv_lora,)
        t[f"{a}.kv_b_proj.weight"] = (heads * (nope + v_head), kv_lora)
        t[f"{a}.o_proj.weight"] = (hidden, heads * v_head)
        if i < dense:
            for n in ("gate", "up"):
                t[f"{p}.mlp.{n}_proj.weight"] = (inter, hidden)
            t[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        else:
            t[f"{p}.mlp.gate.weight"] = (experts, hidden)
            for e in range(experts):
                q = f"{p}.mlp.experts.{e}"
                t[f"{q}.gate_proj.weight"] = (moe_inter, hidden)
                t[f"{q}.up_proj.weight"] = (moe_inter, hidden)
                t[f"{q}.down_proj.weight"] = (hidden, moe_inter)
            for n in ("gate", "up"):
                t[f"{p}.mlp.shared_experts.{n}_proj.weight"] = (shared, hidden)
            t[f"{p}.mlp.shared_experts.down_proj.weight"] = (hidden, shared)
    return cfg, t


UNQUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "block_sparse_moe.gate.weight")


def write_fp8(root: Path, cfg: dict, shapes: dict[str, tuple[int, ...]], qc: dict | None = None) -> Path:
    """An FP8 checkpoint with these shapes (codes zero, scales one: the split rules read headers only)."""
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) == 1 or any(u in name for u in UNQUANTIZED):
            tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
            continue
        tensors[name] = torch.zeros(shape, dtype=torch.float8_e4m3fn)
        grid = (*shape[:-2], cdiv(shape[-2], BLOCK), cdiv(shape[-1], BLOCK))
        tensors[name[: -len("weight")] + "weight_scale_inv"] = torch.ones(grid, dtype=torch.float32)
    save_file(tensors, root / "model.safetensors", {"format": "pt"})
    (root / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc or QC}))
    return root


# ---------------------------------------------------------------- the oracle, from the model dimensions
def _block(sizes_per_rank: list[int], tp: int, merged_last_free: bool) -> str | None:
    check = sizes_per_rank if tp > 1 else (sizes_per_rank[:-1] if merged_last_free else [])
    for s in check:
        if s % BLOCK:
            return (
                f"Weight output_partition_size = {s} is not divisible by weight quantization block_n = 128."
            )
    return None


def _row(n: int, tp: int) -> str | None:
    if n % tp:
        return f"{n} is not divisible by {tp}"
    if tp > 1 and (n // tp) % BLOCK:
        return (
            f"Weight input_size_per_partition = {n // tp} is not divisible by "
            "weight quantization block_k = 128."
        )
    return None


def _column(sizes: list[int], tp: int) -> str | None:
    for s in sizes:
        if s % tp:
            return f"{s} is not divisible by {tp}"
    return _block([s // tp for s in sizes], tp, merged_last_free=len(sizes) > 1)


def _moe(experts: int, inter: int, tp: int, ep: bool, loader: str) -> str | None:
    if ep and loader == "sglang" and experts % tp:
        return f"AssertionError: num_experts % self.moe_ep_size == 0 ({experts} experts, ep {tp})"
    if not ep and inter % tp:
        return f"{inter} is not divisible by {tp}"
    per = inter if ep else inter // tp
    if per % BLOCK:
        return (
            f"The output_size of gate's and up's weight = {per} is not divisible by "
            f"weight quantization block_n = {BLOCK}."
        )
    if tp > 1 and per % BLOCK:
        return (
            f"The input_size of down's weight = {per} is not divisible by weight quantization block_k = 128."
        )
    return None


def oracle(cfg: dict, tp: int, ep: bool, loader: str) -> list[str]:
    """Every error message the server raises, in build order."""
    out: list[str] = []
    heads = cfg["num_attention_heads"]
    if heads % tp:
        out.append(
            f"Total number of attention heads ({heads}) must be divisible by tensor parallel size ({tp})."
        )
    for i in range(cfg["num_hidden_layers"]):
        if "q_lora_rank" in cfg:  # MLA
            nope, rope, v, q_lora = (
                cfg["qk_nope_head_dim"],
                cfg["qk_rope_head_dim"],
                cfg["v_head_dim"],
                cfg["q_lora_rank"],
            )
            if q_lora and q_lora % BLOCK:  # fused_qkv_a_proj: unsplit, last part (kv_a, 576) may be ragged
                out.append(_block([q_lora, cfg["kv_lora_rank"] + rope], 1, True))
            out += [
                _column([heads * (nope + rope)], tp),
                _column([heads * (nope + v)], tp),
                _row(heads * v, tp),
            ]
        else:
            kv, hd = cfg["num_key_value_heads"], cfg["head_dim"]
            if heads % tp:
                out.append(f"{heads} is not divisible by {tp}")
            elif tp >= kv and tp % kv:
                out.append(f"{tp} is not divisible by {kv}")
            elif tp < kv and kv % tp:
                out.append(f"{kv} is not divisible by {tp}")
            else:
                kv_rank = 1 if tp >= kv else kv // tp
                out.append(_block([heads // tp * hd, kv_rank * hd, kv_rank * hd], tp, True))
            out.append(_row(heads * hd, tp))
        dense = "q_lora_rank" not in cfg or i < cfg.get("first_k_dense_replace", 0)
        if dense and cfg.get("intermediate_size"):
            inter = cfg["intermediate_size"]
            out += [_column([inter, inter], tp), _row(inter, tp)]
        if cfg.get("shared") and "q_lora_rank" not in cfg:
            out += [_column([cfg["shared"]] * 2, tp), _row(cfg["shared"], tp)]
        if "q_lora_rank" in cfg and not dense:
            shared = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
            out += [_column([shared, shared], tp), _row(shared, tp)]
        if cfg.get("moe_intermediate_size") and (not dense or "q_lora_rank" not in cfg):
            experts = cfg.get("num_experts") or cfg["n_routed_experts"]
            out.append(_moe(experts, cfg["moe_intermediate_size"], tp, ep, loader))
    return [m for m in out if m]


# ---------------------------------------------------------------- the cases
# (id, builder kwargs, TP sizes that must load with vLLM without --ep)
CASES = {
    # Llama-3-8B-like proportions, shrunk: 32 heads of 128, 8 kv heads, intermediate 1024
    "llama": (lambda: llama_like("LlamaForCausalLM", 512, 32, 8, 128, inter=1024), [1, 2, 4, 8]),
    # Llama-3.2-1B-like attention (32 heads of 64, 8 kv heads): k/v per rank is 64 rows at TP 8
    "llama-3.2-1b": (lambda: llama_like("LlamaForCausalLM", 256, 32, 8, 64, inter=512), [1, 2, 4]),
    # head_dim 64 with 2 kv heads: k per rank is 64 from TP 2 up
    "llama-hd64": (lambda: llama_like("LlamaForCausalLM", 256, 4, 2, 64, inter=512), [1]),
    # Mistral with an intermediate of 1536: 192 per rank at TP 8 (vllm #17569's number)
    "mistral": (lambda: llama_like("MistralForCausalLM", 256, 16, 8, 128, inter=1536), [1, 2, 4]),
    "qwen2": (lambda: llama_like("Qwen2ForCausalLM", 256, 16, 16, 128, inter=640), [1]),
    # Qwen3-MoE: expert intermediate 384 -> 192 per rank at TP 2; EP fixes it
    "qwen3-moe": (lambda: llama_like("Qwen3MoeForCausalLM", 256, 16, 4, 128, moe=(4, 384, "hf")), [1]),
    # Qwen3-30B-A3B's shapes (4 of its 128 experts): 768 / 4 = 192 per rank, the published TP 4 failure
    # (vllm #25292; QwenLM/Qwen3 #1485: "only TP1 and TP2")
    "qwen3-30b-a3b": (
        lambda: llama_like("Qwen3MoeForCausalLM", 2048, 32, 4, 128, moe=(4, 768, "hf")),
        [1, 2],
    ),
    # MiniMax-M2 naming (block_sparse_moe.experts.E.w1/w2/w3), expert intermediate 1536 as released
    "minimax": (
        lambda: llama_like(
            "MiniMaxM2ForCausalLM", 256, 16, 8, 128, moe=(3, 1536, "mixtral"), router="block_sparse_moe.gate"
        ),
        [1, 2, 4],
    ),
    # GLM-4.5-like: dense intermediate 1024 + experts 512 + shared experts 512
    "glm4-moe": (
        lambda: llama_like("Glm4MoeForCausalLM", 256, 32, 8, 128, inter=1024, moe=(4, 512, "hf"), shared=512),
        [1, 2, 4],
    ),
}


def _deepseek_v3_mla_16():
    # DeepSeek-V3 MLA dimensions (q_lora 1536, kv_lora 512, nope 128, rope 64, v 128) with 16 heads:
    # q_b_proj per rank is one head, 192 rows, at TP 16
    return deepseek_like(256, 16, 1536, 512, 128, 64, 128, inter=1024, moe_inter=256, experts=4, shared=256)


def _deepseek_v4_pro_shared():
    # The shared-expert split of vllm #42384 (DeepSeek-V4-Pro at TP 16, moe_intermediate_size 3072):
    # 3072 / 16 = 192 per rank, and expert parallelism does not split the shared expert
    return deepseek_like(256, 32, 1536, 512, 128, 64, 128, inter=2048, moe_inter=3072, experts=2, shared=3072)


CASES["deepseek-mla-16-heads"] = (_deepseek_v3_mla_16, [1, 2])
CASES["deepseek-v4pro-shared"] = (_deepseek_v4_pro_shared, [1, 2, 4, 8])


def _config_for_oracle(cfg: dict, shapes) -> dict:
    c = dict(cfg)
    if any(".shared_experts." in n for n in shapes) and "q_lora_rank" not in c:
        c["shared"] = next(s[0] for n, s in shapes.items() if n.endswith("shared_experts.gate_proj.weight"))
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for name, (make, _) in CASES.items():
        cfg, shapes = make()
        out[name] = (write_fp8(root / name, cfg, shapes), _config_for_oracle(cfg, shapes))
    return out


@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matrix_cell_by_cell_against_the_oracle(built, case, ep):
    path, cfg = built[case]
    report = serving_report(path, TP_SIZES, ep=ep)
    assert report.plan.known, report.plan.problem
    assert report.plan.unmapped == []
    assert len(report.cells) == len(TP_SIZES) * 2
    for cell in report.cells:
        want = oracle(cfg, cell.tp, ep, cell.loader)
        got = [f.message for f in cell.failures]
        assert got == want, (case, cell.tp, cell.loader, got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_working_tp_sizes_are_the_published_ones(built, case):
    path, _ = built[case]
    report = serving_report(path, TP_SIZES)
    assert report.working_tp == CASES[case][1]
    assert report.failed_tp == [t for t in TP_SIZES if t not in CASES[case][1]]


def test_intermediate_192_per_rank_fails_with_vllms_text_and_ep_fixes_it(built):
    path, _ = built["qwen3-moe"]
    report = serving_report(path, (2,))
    cell = next(c for c in report.cells if c.loader == "vllm")
    assert cell.first.message == (
        "The output_size of gate's and up's weight = 192 is not divisible by "
        "weight quantization block_n = 128."
    )
    assert cell.first.tensor == "model.layers.0.mlp.experts.0.gate_proj.weight"
    assert "expert parallelism" in report.fixes[(2, "vllm")]
    assert serving_report(path, (2,), ep=True).ok


def test_deepseek_mla_at_tp16_names_q_b_proj(built):
    path, _ = built["deepseek-mla-16-heads"]
    cell = next(c for c in serving_report(path, (16,)).cells if c.loader == "vllm")
    assert cell.first.tensor == "model.layers.0.self_attn.q_b_proj.weight"
    assert cell.first.message == (
        "Weight output_partition_size = 192 is not divisible by weight quantization block_n = 128."
    )
    # the experts (256 / 16 = 16 rows per rank) fail at any block of 32 or more: no smaller block is offered
    fix = serving_report(path, (16,)).fixes[(16, "vllm")]
    assert "--block-size" not in fix and "per-channel" in fix
    # at TP 4 a 64 block fixes it (experts 64 rows per rank, dense 256, q_b 4 x 192)
    fix4 = serving_report(path, (4,)).fixes[(4, "vllm")]
    assert "--block-size 64" in fix4


def test_deepseek_v4pro_shared_expert_fails_at_tp16_even_with_ep(built):
    path, _ = built["deepseek-v4pro-shared"]
    report = serving_report(path, (8, 16), ep=True)
    by = {(c.loader, c.tp): c for c in report.cells}
    assert by[("vllm", 8)].ok and not by[("vllm", 16)].ok
    # SGLang also wants the 2 experts to divide over the 8 or 16 expert-parallel ranks
    assert by[("sglang", 8)].first.rule == "experts % ep size"
    cell = by[("vllm", 16)]
    messages = {f.tensor: f.message for f in cell.failures}
    assert messages["model.layers.1.mlp.shared_experts.down_proj.weight"] == (
        "Weight input_size_per_partition = 192 is not divisible by weight quantization block_k = 128."
    )
    assert "model.layers.1.mlp.experts" not in {f.layer for f in cell.failures}  # EP keeps experts whole


def test_sglang_needs_experts_divisible_by_ep_size_vllm_does_not(built):
    path, _ = built["minimax"]  # 3 experts
    report = serving_report(path, (2,), ep=True)
    by = {c.loader: c for c in report.cells}
    assert by["vllm"].ok
    assert by["sglang"].first.rule == "experts % ep size"


def test_plan_roles_for_each_family(built):
    roles = {}
    for case in ("llama", "qwen3-moe", "minimax", "glm4-moe", "deepseek-mla-16-heads"):
        path, _ = built[case]
        report = serving_report(path, (1,))
        roles[case] = {layer.name.split(".", 3)[-1]: layer.role for layer in report.plan.layers}
    assert roles["llama"]["self_attn.qkv_proj"] == Role.QKV
    assert roles["llama"]["mlp.gate_up_proj"] == Role.MERGED_COLUMN
    assert roles["llama"]["mlp.down_proj"] == Role.ROW
    assert roles["qwen3-moe"]["mlp.experts"] == Role.MOE
    assert roles["qwen3-moe"]["mlp.gate"] == Role.REPLICATED
    assert roles["minimax"]["block_sparse_moe.experts"] == Role.MOE
    assert roles["glm4-moe"]["mlp.shared_experts.gate_up_proj"] == Role.MERGED_COLUMN
    assert roles["deepseek-mla-16-heads"]["self_attn.fused_qkv_a_proj"] == Role.MERGED_REPLICATED
    assert roles["deepseek-mla-16-heads"]["self_attn.kv_b_proj"] == Role.COLUMN


def test_unknown_architecture_says_so_instead_of_guessing(tmp_path):
    cfg, shapes = llama_like("FalconForCausalLM", 256, 4, 4, 64, inter=512)
    report = serving_report(write_fp8(tmp_path / "f", cfg, shapes), (1, 2))
    assert not report.plan.known
    assert "FalconForCausalLM" in report.plan.problem and "LlamaForCausalLM" in report.plan.problem
    assert report.cells == [] and report.failed_tp == [1, 2] and not report.ok


def test_fp8_tensor_without_a_rule_is_listed_not_guessed():
    cfg, shapes = llama_like("LlamaForCausalLM", 256, 4, 4, 64, inter=512)
    tensors = {n: ("F8_E4M3" if len(s) == 2 else "BF16", s) for n, s in shapes.items()}
    tensors["model.layers.0.self_attn.rotary_proj.weight"] = ("F8_E4M3", (128, 256))
    plan = plan_model(cfg, tensors)
    assert plan.unmapped == ["model.layers.0.self_attn.rotary_proj.weight"]


def test_unquantized_layers_only_need_the_split(tmp_path):
    # bf16 everywhere: a 192-per-rank intermediate is fine, an indivisible head count is not
    cfg, shapes = llama_like("LlamaForCausalLM", 256, 4, 4, 64, inter=384)
    root = tmp_path / "bf16"
    root.mkdir()
    save_file(
        {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in shapes.items()}, root / "model.safetensors"
    )
    (root / "config.json").write_text(json.dumps(cfg))
    report = serving_report(root, (1, 2, 4, 8))
    assert report.working_tp == [1, 2, 4]


def test_planner_asks_per_tensor_for_a_scheme_to_be():
    # a bf16 Llama with head_dim 64 and 2 kv heads: block 128 breaks k_proj at TP 2, no block does not
    cfg, shapes = llama_like("LlamaForCausalLM", 256, 4, 2, 64, inter=512)
    plan = plan_model(cfg, {n: ("BF16", s) for n, s in shapes.items()})
    k = "model.layers.0.self_attn.k_proj.weight"
    f = check_tensor(plan, k, 2, False, (128, 128), "vllm")
    assert f.tensor == k and f.message.startswith("Weight output_partition_size = 64 ")
    assert check_tensor(plan, k, 2, False, None, "vllm") is None
    assert check_tensor(plan, k, 2, False, (64, 64), "vllm") is None
    assert check_tensor(plan, "model.layers.0.mlp.down_proj.weight", 2, False, (128, 128), "sglang") is None
    with pytest.raises(KeyError):
        check_tensor(plan, "model.norm.weight", 2, False, (128, 128), "vllm")
