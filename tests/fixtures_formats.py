"""One tiny checkpoint per published FP8 / FP4 family, built from the public facts cited with each, and
what its dequantized output must hold, computed here with each family's broadcast written out by hand
(independent of fp8conv.formats' ScaleLayout): y = (fp32(q) * fp32(s_expanded)).to(dtype).

Facts are from ../shared/FORMATS.md "Published layouts" unless another source is named; shapes are cut
down, but every awkward case of a family is kept: ragged tiles, a scale in another shard, the MTP layer,
fused and stacked experts, bf16 / fp16 / e8m0 / uint8 scales, per-gate/up-half and per-column scales.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fp8conv.checkpoint.safetensors_io import save_file

E4M3_NAN = 0x7F
NATIVE = -1  # the `shard` of a tensor in Mistral's consolidated.safetensors
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# ------------------------------------------------------------------------------ independent formulas
def fp8_codes(shape, gen, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    b = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    mask = E4M3_NAN if dtype == torch.float8_e4m3fn else 0x7C
    b[(b & mask) == mask] = 0x3A
    return b.view(dtype)


def exp_bytes(shape, gen, lo=118, hi=136) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


def exp_value(e: torch.Tensor) -> torch.Tensor:
    """e8m0 / uint8 exponent bytes -> float32 2**(e-127), through float64 (exact)."""
    return torch.pow(2.0, e.view(torch.uint8).to(torch.float64) - 127).to(torch.float32)


def tiles(s: torch.Tensor, shape, bm: int, bn: int) -> torch.Tensor:
    """Block scales spread over bm x bn tiles, cropped at the ragged edges."""
    return s.float().repeat_interleave(bm, -2).repeat_interleave(bn, -1)[..., : shape[-2], : shape[-1]]


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 bytes [..., K/2] -> float32 [..., K], the low nibble the even element."""
    b = codes.view(torch.uint8).to(torch.int64)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    return torch.stack((lut[b & 0xF], lut[b >> 4]), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)


def product(q: torch.Tensor, s_full: torch.Tensor, dtype) -> torch.Tensor:
    qf = q if q.dtype == torch.float32 else q.float()
    return (qf * s_full.float()).to(dtype)


# ------------------------------------------------------------------------------ a fixture
@dataclass
class Fixture:
    """A checkpoint being built: tensors by shard, what the output holds, what it must not."""

    name: str
    root: Path
    gen: torch.Generator
    shards: list[dict[str, torch.Tensor]] = field(default_factory=lambda: [{}])
    expect: dict[str, Callable[[torch.dtype], torch.Tensor]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    config: dict | None = None
    files: dict[str, str] = field(default_factory=dict)  # other files: relative path -> text
    dropped_files: set[str] = field(default_factory=set)
    family: str = ""
    native: dict[str, torch.Tensor] = field(default_factory=dict)  # Mistral's consolidated.safetensors

    def put(self, name: str, t: torch.Tensor, shard: int = 0) -> torch.Tensor:
        if shard == NATIVE:
            self.native[name] = t
            return t
        while len(self.shards) <= shard:
            self.shards.append({})
        self.shards[shard][name] = t
        return t

    def keep(self, name: str, t: torch.Tensor, shard: int = 0) -> None:
        """A tensor that passes through byte for byte."""
        self.put(name, t, shard)
        self.expect[name] = lambda dtype, t=t: t

    def drop(self, name: str, t: torch.Tensor, shard: int = 0) -> None:
        """An artifact: in the source, never in the output."""
        self.put(name, t, shard)
        self.dropped.add(name)

    def quant(self, name, q, scale_name, s, s_full_fn, shard=0, scale_shard=None, out_name=None, fn=None):
        """A quantized weight with its scale; the output is product(q, s_full_fn()) (or fn(dtype))."""
        self.put(name, q, shard)
        self.drop(scale_name, s, shard if scale_shard is None else scale_shard)
        if out_name is not None and out_name != name:
            self.dropped.add(name)
        self.expect[out_name or name] = fn or (lambda dtype: product(q, s_full_fn(), dtype))

    def bf16(self, name, shape, shard=0):
        self.keep(name, torch.randn(shape, generator=self.gen).to(torch.bfloat16), shard)

    def write(self) -> Path:
        self.root.mkdir(parents=True)
        if self.native:
            save_file(self.native, self.root / "consolidated.safetensors", {"format": "pt"})
        if not self.shards[0]:
            pass
        elif len(self.shards) == 1:
            save_file(self.shards[0], self.root / "model.safetensors", {"format": "pt"})
        else:
            n = len(self.shards)
            wm = {}
            for i, tensors in enumerate(self.shards, 1):
                fn = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(tensors, self.root / fn, {"format": "pt"})
                wm.update(dict.fromkeys(tensors, fn))
            size = sum(t.numel() * t.element_size() for s in self.shards for t in s.values())
            index = {"metadata": {"total_size": size}, "weight_map": wm}
            (self.root / "model.safetensors.index.json").write_text(json.dumps(index))
        if self.config is not None:
            (self.root / "config.json").write_text(json.dumps(self.config, indent=2))
        for rel, text in self.files.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_text(text)
        return self.root


def _new(name, root, seed, family):
    return Fixture(name, root / name, torch.Generator().manual_seed(seed), family=family)


def block_weight(
    f: Fixture, name, shape, bm=128, bn=128, scale_dtype=torch.float32, suffix="_scale_inv", **kw
):
    q = fp8_codes(shape, f.gen)
    grid = (*shape[:-2], math.ceil(shape[-2] / bm), math.ceil(shape[-1] / bn))
    s = (torch.rand(grid, generator=f.gen) * 2e-3 + 1e-4).to(scale_dtype)
    f.quant(
        name, q, name + suffix if suffix.startswith("_") else suffix, s, lambda: tiles(s, shape, bm, bn), **kw
    )


FP8_BLOCK_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


# ------------------------------------------------------------------------------ the families
def deepseek_v3(root: Path) -> Fixture:
    """DeepSeek-V3/R1 and Kimi-K2 (same layout): block 128 fp32 `weight_scale_inv`; kv_a_proj_with_mqa
    has 576 rows (ragged last tile); a scale in the next shard; per-expert 2-D experts; router
    `mlp.gate.weight` bf16 + `e_score_correction_bias` fp32; layer 61 = MTP with `enorm`, `hnorm`,
    `eh_proj`, `shared_head.head` bf16 and the rest FP8 (DeepSeek-V3 README_WEIGHTS.md; vLLM
    deepseek_mtp.py); V3.2's indexer `indexer.wq_b`/`wk` FP8, `k_norm`, `weights_proj` bf16."""
    f = _new("deepseek-v3", root, 1, "fp8")
    f.config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "torch_dtype": "bfloat16",
        "quantization_config": dict(FP8_BLOCK_CONFIG),
    }
    f.bf16("model.embed_tokens.weight", (64, 96))
    block_weight(f, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (576, 96))
    block_weight(f, "model.layers.0.self_attn.q_a_proj.weight", (200, 96), shard=0, scale_shard=1)
    block_weight(f, "model.layers.0.self_attn.indexer.wq_b.weight", (130, 96))
    block_weight(f, "model.layers.0.self_attn.indexer.wk.weight", (128, 96))
    f.bf16("model.layers.0.self_attn.indexer.k_norm.weight", (128,))
    f.bf16("model.layers.0.self_attn.indexer.weights_proj.weight", (16, 96))
    f.bf16("model.layers.0.mlp.gate.weight", (4, 96))
    f.keep("model.layers.0.mlp.gate.e_score_correction_bias", torch.rand(4, generator=f.gen))
    for e in range(2):
        block_weight(f, f"model.layers.0.mlp.experts.{e}.up_proj.weight", (160, 96), shard=1)
    for n in ("enorm", "hnorm"):
        f.bf16(f"model.layers.61.{n}.weight", (96,), shard=1)
    f.bf16("model.layers.61.eh_proj.weight", (96, 192), shard=1)
    f.bf16("model.layers.61.shared_head.head.weight", (64, 96), shard=1)
    block_weight(f, "model.layers.61.self_attn.o_proj.weight", (96, 300), shard=1)
    f.bf16("lm_head.weight", (64, 96), shard=1)
    f.files["tokenizer.json"] = "{}"
    return f


def deepseek_v31_ue8m0(root: Path) -> Fixture:
    """DeepSeek-V3.1/V3.2: `scale_fmt: ue8m0`, power-of-two scales stored as fp32, and as e8m0 bytes."""
    f = _new("deepseek-v3.1-ue8m0", root, 2, "fp8")
    f.config = {"quantization_config": {**FP8_BLOCK_CONFIG, "scale_fmt": "ue8m0"}}
    q = fp8_codes((300, 257), f.gen)
    e = exp_bytes((3, 3), f.gen)
    s32 = exp_value(e)
    f.quant("a.weight", q, "a.weight_scale_inv", s32, lambda: tiles(s32, (300, 257), 128, 128))
    q2 = fp8_codes((130, 128), f.gen)
    e2 = exp_bytes((2, 1), f.gen).view(torch.float8_e8m0fnu)
    f.quant("b.weight", q2, "b.weight_scale_inv", e2, lambda: tiles(exp_value(e2), (130, 128), 128, 128))
    return f


def qwen3(root: Path) -> Fixture:
    """Qwen3 FP8: block 128 scales in bf16 (Qwen3-1.7B-FP8) or fp16 (Qwen3-4B-Instruct-2507-FP8);
    Qwen3-Next's `linear_attn` conv1d 3-D weight, `A_log`, `shared_expert_gate` and `mtp.*` bf16;
    Qwen3-VL's `model.language_model.*` FP8 and `model.visual.*` bf16, the settings under text_config."""
    f = _new("qwen3", root, 3, "fp8")
    f.config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "text_config": {
            "dtype": "bfloat16",
            "quantization_config": {
                **FP8_BLOCK_CONFIG,
                "modules_to_not_convert": ["lm_head", "model.visual", "mlp.gate"],
            },
        },
    }
    block_weight(
        f, "model.language_model.layers.0.self_attn.q_proj.weight", (256, 200), scale_dtype=torch.bfloat16
    )
    block_weight(
        f, "model.language_model.layers.0.mlp.down_proj.weight", (200, 384), scale_dtype=torch.float16
    )
    f.bf16("model.language_model.layers.0.linear_attn.conv1d.weight", (64, 1, 4))
    f.keep("model.language_model.layers.0.linear_attn.A_log", torch.rand(8, generator=f.gen))
    f.bf16("model.language_model.layers.0.mlp.shared_expert_gate.weight", (1, 200))
    f.bf16("mtp.fc.weight", (200, 400))
    f.bf16("model.visual.blocks.0.attn.qkv.weight", (96, 32))
    return f


def fused_experts(root: Path) -> Fixture:
    """transformers v5 fused experts: `experts.gate_up_proj` [E, 2I, H] + `gate_up_proj_scale_inv`
    [E, ceil(2I/128), ceil(H/128)], `down_proj` likewise (ragged: 2I = 260, H = 200)."""
    f = _new("fused-experts", root, 4, "fp8")
    f.config = {"quantization_config": dict(FP8_BLOCK_CONFIG)}
    block_weight(f, "model.layers.0.mlp.experts.gate_up_proj", (3, 260, 200))
    block_weight(f, "model.layers.0.mlp.experts.down_proj", (3, 200, 130))
    return f


def minimax_m2(root: Path) -> Fixture:
    """MiniMax-M2: `fmt: float8_e4m3fn`, `block_sparse_moe.experts.E.w1/w2/w3` + `weight_scale_inv`,
    router gate fp32, `modules_to_not_convert: [gate, e_score_correction_bias, lm_head]`."""
    f = _new("minimax-m2", root, 5, "fp8")
    f.config = {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "float8_e4m3fn",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
        }
    }
    for e in range(2):
        for w in ("w1", "w2", "w3"):
            block_weight(f, f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight", (130, 140))
    f.keep("model.layers.0.block_sparse_moe.gate.weight", torch.randn(2, 140, generator=f.gen))
    f.keep("model.layers.0.block_sparse_moe.e_score_correction_bias", torch.rand(2, generator=f.gen))
    return f


def _ct_config(weights: dict, fmt="float-quantized", inputs=None, kv=None, key="quantization_config"):
    return {
        key: {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": inputs,
                    "output_activations": None,
                    "format": fmt,
                }
            },
            "ignore": ["lm_head"],
            "kv_cache_scheme": kv,
        }
    }


def ct_dynamic(root: Path) -> Fixture:
    """compressed-tensors FP8_DYNAMIC (RedHatAI `*-FP8-dynamic`): weights `strategy: channel`,
    `X.weight_scale` bf16 [out, 1]."""
    f = _new("ct-fp8-dynamic", root, 6, "compressed-tensors")
    f.config = _ct_config(
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
        inputs={"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
    )
    for name, shape in (
        ("model.layers.0.self_attn.q_proj", (96, 64)),
        ("model.layers.0.mlp.down_proj", (64, 200)),
    ):
        q = fp8_codes(shape, f.gen)
        s = (torch.rand(shape[0], 1, generator=f.gen) * 1e-2 + 1e-3).to(torch.bfloat16)
        f.quant(name + ".weight", q, name + ".weight_scale", s, lambda s=s: s.float())
    f.bf16("lm_head.weight", (32, 64))
    return f


def ct_static(root: Path, key="quantization_config") -> Fixture:
    """compressed-tensors FP8 static (RedHatAI `*-FP8`): weights `strategy: tensor`, `X.weight_scale`
    bf16 [1], `X.input_scale` bf16 [1], `kv_cache_scheme` with `self_attn.k_scale` / `v_scale` bf16 [1]."""
    f = _new(
        "ct-fp8-static" if key == "quantization_config" else "ct-compression-config",
        root,
        7,
        "compressed-tensors",
    )
    arg = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    f.config = _ct_config(arg, inputs=dict(arg), kv=dict(arg), key=key)
    for name, shape in (
        ("model.layers.0.self_attn.k_proj", (32, 64)),
        ("model.layers.0.mlp.up_proj", (150, 64)),
    ):
        q = fp8_codes(shape, f.gen)
        s = (torch.rand(1, generator=f.gen) * 1e-2 + 1e-3).to(torch.bfloat16)
        f.quant(name + ".weight", q, name + ".weight_scale", s, lambda s=s: s.float())
        f.drop(name + ".input_scale", torch.rand(1, generator=f.gen).to(torch.bfloat16))
    f.drop("model.layers.0.self_attn.k_scale", torch.rand(1, generator=f.gen).to(torch.bfloat16))
    f.drop("model.layers.0.self_attn.v_scale", torch.rand(1, generator=f.gen).to(torch.bfloat16))
    return f


def ct_compression_config(root: Path) -> Fixture:
    """compressed-tensors under the old `compression_config` key (vLLM/SGLang read it when
    `quantization_config` is absent)."""
    return ct_static(root, key="compression_config")


def ct_mxfp8(root: Path) -> Fixture:
    """compressed-tensors MXFP8 (`format: mxfp8-quantized`, `strategy: group`, `group_size: 32`):
    `X.weight_scale` uint8 exponent bytes [out, in/32] (compressors/mxfp8/base.py)."""
    f = _new("ct-mxfp8", root, 8, "compressed-tensors")
    f.config = _ct_config(
        {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "group",
            "group_size": 32,
            "dynamic": False,
            "scale_dtype": "torch.uint8",
        },
        fmt="mxfp8-quantized",
    )
    for name, shape in (
        ("model.layers.0.mlp.gate_proj", (48, 96)),
        ("model.layers.0.mlp.down_proj", (96, 64)),
    ):
        q = fp8_codes(shape, f.gen)
        e = exp_bytes((shape[0], shape[1] // 32), f.gen)
        f.quant(
            name + ".weight", q, name + ".weight_scale", e, lambda e=e: exp_value(e).repeat_interleave(32, -1)
        )
    return f


def autofp8(root: Path) -> Fixture:
    """AutoFP8 legacy (neuralmagic): `quant_method: fp8`, `activation_scheme: static`, `ignored_layers`;
    scalar fp32 `weight_scale` and `input_scale`."""
    f = _new("autofp8", root, 9, "fp8")
    f.config = {
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "static",
            "ignored_layers": ["lm_head"],
        }
    }
    for name, shape in (
        ("model.layers.0.self_attn.o_proj", (64, 64)),
        ("model.layers.0.mlp.up_proj", (130, 64)),
    ):
        q = fp8_codes(shape, f.gen)
        s = torch.tensor(float(torch.rand(1, generator=f.gen)) * 1e-2 + 1e-4)
        f.quant(name + ".weight", q, name + ".weight_scale", s, lambda s=s: s)
        f.drop(name + ".input_scale", torch.tensor(0.02))
    return f


def _modelopt_tensors(f: Fixture) -> None:
    for name, shape in (
        ("model.layers.0.self_attn.k_proj", (32, 64)),
        ("model.layers.0.self_attn.v_proj", (32, 64)),
        ("model.layers.0.mlp.down_proj", (64, 136)),
    ):
        q = fp8_codes(shape, f.gen)
        s = torch.rand((), generator=f.gen) * 1e-2 + 1e-4
        f.quant(name + ".weight", q, name + ".weight_scale", s, lambda s=s: s)
        f.drop(name + ".input_scale", torch.tensor(0.05))
    f.drop("model.layers.0.self_attn.k_proj.k_scale", torch.tensor(1.0))
    f.drop("model.layers.0.self_attn.v_proj.v_scale", torch.tensor(1.0))
    f.bf16("lm_head.weight", (32, 64))


MODELOPT_QUANT = {
    "producer": {"name": "modelopt", "version": "0.29.0"},
    "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]},
}


def modelopt_config(root: Path) -> Fixture:
    """NVIDIA ModelOpt FP8 with `quant_method: modelopt`, `quant_algo: FP8` in config.json and
    hf_quant_config.json beside it: scalar `weight_scale` + `input_scale`, `k_proj.k_scale` /
    `v_proj.v_scale`."""
    f = _new("modelopt", root, 10, "modelopt")
    f.config = {
        "quantization_config": {
            "quant_method": "modelopt",
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8",
            "exclude_modules": ["lm_head"],
        }
    }
    f.files["hf_quant_config.json"] = json.dumps(MODELOPT_QUANT)
    f.dropped_files.add("hf_quant_config.json")
    _modelopt_tensors(f)
    return f


def modelopt_hf_quant_only(root: Path) -> Fixture:
    """ModelOpt <= 0.29: settings only in hf_quant_config.json (config.json has no quantization_config;
    vLLM and SGLang then read that file)."""
    f = _new("modelopt-hf-quant-config", root, 11, "modelopt")
    f.config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    f.files["hf_quant_config.json"] = json.dumps(MODELOPT_QUANT)
    f.dropped_files.add("hf_quant_config.json")
    _modelopt_tensors(f)
    return f


def fbgemm(root: Path) -> Fixture:
    """fbgemm_fp8 (Llama-4; transformers integrations/fbgemm_fp8.py): linear `weight_scale` fp32
    [out, 1]; fused experts `gate_up_proj` [E, H, 2I] + `gate_up_proj_scale` [E, 1, 2I] and `down_proj`
    [E, I, H] + `down_proj_scale` [E, H, 1], one scale per output column."""
    f = _new("fbgemm", root, 12, "fbgemm")
    f.config = {
        "quantization_config": {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": ["lm_head", "vision_model"],
        }
    }
    q = fp8_codes((96, 64), f.gen)
    s = torch.rand(96, 1, generator=f.gen) * 1e-2 + 1e-4
    f.quant(
        "language_model.model.layers.0.self_attn.q_proj.weight",
        q,
        "language_model.model.layers.0.self_attn.q_proj.weight_scale",
        s,
        lambda: s,
    )
    E, H, INTER = 2, 64, 48
    p = "language_model.model.layers.0.feed_forward.experts."
    gu = fp8_codes((E, H, 2 * INTER), f.gen)
    gs = torch.rand(E, 1, 2 * INTER, generator=f.gen) * 1e-2 + 1e-4
    f.quant(p + "gate_up_proj", gu, p + "gate_up_proj_scale", gs, lambda: gs)
    dn = fp8_codes((E, INTER, H), f.gen)
    ds = torch.rand(E, H, 1, generator=f.gen) * 1e-2 + 1e-4
    f.quant(p + "down_proj", dn, p + "down_proj_scale", ds, lambda: ds.transpose(1, 2))
    f.bf16("vision_model.patch_embedding.weight", (32, 48))
    return f


def static_fused_experts(root: Path) -> Fixture:
    """transformers static fused experts (Mistral-Small-4, unverified): `activation_scheme: static`,
    `gate_up_proj_scale_inv` [E, 2, 1] (one scale per gate / up half), `*_activation_scale`."""
    f = _new("static-fused-experts", root, 13, "fp8")
    f.config = {
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "static",
            "weight_block_size": None,
        }
    }
    E, INTER, H = 3, 40, 64
    p = "model.layers.0.mlp.experts."
    gu = fp8_codes((E, 2 * INTER, H), f.gen)
    gs = torch.rand(E, 2, 1, generator=f.gen) * 1e-2 + 1e-4
    f.quant(
        p + "gate_up_proj", gu, p + "gate_up_proj_scale_inv", gs, lambda: gs.repeat_interleave(INTER, dim=1)
    )
    dn = fp8_codes((E, H, INTER), f.gen)
    ds = torch.rand(E, 1, 1, generator=f.gen) * 1e-2 + 1e-4
    f.quant(p + "down_proj", dn, p + "down_proj_scale_inv", ds, lambda: ds)
    f.drop(p + "gate_up_proj_activation_scale", torch.rand(E, generator=f.gen))
    f.drop(p + "down_proj_activation_scale", torch.rand(E, generator=f.gen))
    return f


def mistral_hf(root: Path) -> Fixture:
    """Mistral FP8 (Ministral-3, Devstral-2, Mistral-Large-3), the HF shards: `activation_scheme: static`,
    `weight_block_size: null`, scalar `weight_scale_inv` + `activation_scale`; params.json with
    `quantization` beside them (the native format's settings, vllm#39293), which the output loses."""
    f = _new("mistral-hf", root, 14, "fp8")
    f.config = {
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "static",
            "weight_block_size": None,
            "modules_to_not_convert": ["lm_head"],
        }
    }
    for shard, name, shape in (
        (0, "model.layers.0.self_attn.q_proj", (64, 96)),
        (1, "model.layers.0.mlp.gate_proj", (200, 96)),
    ):
        q = fp8_codes(shape, f.gen)
        s = torch.rand((), generator=f.gen) * 1e-2 + 1e-4
        f.quant(name + ".weight", q, name + ".weight_scale_inv", s, lambda s=s: s, shard=shard)
        f.drop(name + ".activation_scale", torch.tensor(0.03), shard=shard)
    _mistral_native_tensors(f)  # beside the HF shards, not in their index
    f.files["params.json"] = json.dumps(
        {"dim": 96, "n_layers": 1, "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}}
    )
    return f


def _mistral_native_tensors(f: Fixture) -> None:
    """consolidated.safetensors: `X.weight` e4m3 + `X.qscale_weight` per tensor (bf16 [1]) or per output row
    (fp32 [out]), `X.qscale_act`, kv-cache `kv_fake_quantizer.qscale_act` (vLLM llama.py mistral_mapping)."""
    q = fp8_codes((64, 96), f.gen)
    s = (torch.rand(1, generator=f.gen) * 1e-2 + 1e-4).to(torch.bfloat16)
    f.quant(
        "layers.0.attention.wq.weight",
        q,
        "layers.0.attention.wq.qscale_weight",
        s,
        lambda: s.float(),
        shard=NATIVE,
    )
    f.drop("layers.0.attention.wq.qscale_act", torch.tensor([0.03]), shard=NATIVE)
    q2 = fp8_codes((200, 96), f.gen)
    s2 = torch.rand(200, generator=f.gen) * 1e-2 + 1e-4
    f.quant(
        "layers.0.feed_forward.w1.weight",
        q2,
        "layers.0.feed_forward.w1.qscale_weight",
        s2,
        lambda: s2.unsqueeze(1),
        shard=NATIVE,
    )
    f.drop("layers.0.attention.kv_fake_quantizer.qscale_act", torch.tensor([1.0]), shard=NATIVE)
    f.keep(
        "layers.0.attention_norm.weight", torch.randn(96, generator=f.gen).to(torch.bfloat16), shard=NATIVE
    )


def mistral_native(root: Path) -> Fixture:
    """Mistral native files alone: consolidated.safetensors and params.json with `quantization`, no
    config.json."""
    f = _new("mistral-native", root, 18, "mistral")
    _mistral_native_tensors(f)
    f.files["params.json"] = json.dumps(
        {"dim": 96, "n_layers": 1, "quantization": {"qformat_weight": "fp8_e4m3"}}
    )
    return f


def mxfp8_bytes(root: Path) -> Fixture:
    """transformers MXFP8 bytes: `quant_method: fp8`, `scale_fmt: ue8m0`, `weight_block_size: [1, 32]`,
    `weight_scale_inv` uint8 exponent bytes [out, in/32]."""
    f = _new("transformers-mxfp8", root, 15, "fp8")
    f.config = {
        "quantization_config": {**FP8_BLOCK_CONFIG, "weight_block_size": [1, 32], "scale_fmt": "ue8m0"}
    }
    q = fp8_codes((40, 96), f.gen)
    e = exp_bytes((40, 3), f.gen)
    f.quant(
        "model.layers.0.mlp.up_proj.weight",
        q,
        "model.layers.0.mlp.up_proj.weight_scale_inv",
        e,
        lambda: exp_value(e).repeat_interleave(32, -1),
    )
    return f


def deepseek_v4(root: Path) -> Fixture:
    """DeepSeek-V4: block scales named `X.scale` (e8m0); experts FP4 as int8 bytes (two e2m1 codes each,
    low nibble first) with e8m0 `X.scale` per 1 x 32 (transformers renames `.scale` -> `weight_scale_inv`,
    Fp8Dequantize._unpack_fp4 unpacks int8 experts; names unverified)."""
    f = _new("deepseek-v4", root, 16, "fp8")
    f.config = {"quantization_config": {**FP8_BLOCK_CONFIG, "scale_fmt": "ue8m0"}}
    q = fp8_codes((200, 136), f.gen)
    e = exp_bytes((2, 2), f.gen).view(torch.float8_e8m0fnu)
    f.quant(
        "model.layers.0.attn.wq.weight",
        q,
        "model.layers.0.attn.wq.scale",
        e,
        lambda: tiles(exp_value(e), (200, 136), 128, 128),
    )
    for w, (m, k) in (("w1", (48, 64)), ("w2", (64, 96))):
        name = f"model.layers.0.ffn.experts.0.{w}"
        codes = torch.randint(-128, 128, (m, k // 2), generator=f.gen, dtype=torch.int32).to(torch.int8)
        ex = exp_bytes((m, k // 32), f.gen).view(torch.float8_e8m0fnu)
        f.quant(
            name + ".weight",
            codes,
            name + ".scale",
            ex,
            lambda ex=ex: exp_value(ex).repeat_interleave(32, -1),
            fn=lambda dtype, c=codes, ex=ex: product(
                fp4_values(c), exp_value(ex).repeat_interleave(32, -1), dtype
            ),
        )
    f.bf16("model.layers.0.attn_norm.weight", (136,))
    return f


def gpt_oss(root: Path) -> Fixture:
    """gpt-oss MXFP4 (transformers integrations/mxfp4.py, modeling_gpt_oss.py): `X_blocks` uint8
    [E, rows, G, 16] + `X_scales` uint8 [E, rows, G]; the bf16 model holds `X` transposed:
    `gate_up_proj` [E, hidden, 2*intermediate], `down_proj` [E, intermediate, hidden]. Attention,
    router and biases bf16."""
    f = _new("gpt-oss", root, 17, "mxfp4")
    E, H, INTER = 2, 64, 32
    f.config = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
    }
    p = "model.layers.0.mlp.experts."
    for proj, rows, cols in (("gate_up_proj", 2 * INTER, H), ("down_proj", H, INTER)):
        blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=f.gen, dtype=torch.int32).to(
            torch.uint8
        )
        scales = exp_bytes((E, rows, cols // 32), f.gen)

        def fn(dtype, b=blocks, s=scales, rows=rows, cols=cols):
            vals = fp4_values(b.reshape(E, rows, cols // 2))
            y = product(vals, exp_value(s).repeat_interleave(32, -1), dtype)
            return y.transpose(1, 2).contiguous()

        f.put(p + proj + "_blocks", blocks)
        f.drop(p + proj + "_scales", scales)
        f.dropped.add(p + proj + "_blocks")
        f.expect[p + proj] = fn
        f.bf16(p + proj + "_bias", (E, rows))
    f.bf16("model.layers.0.mlp.router.weight", (E, H))
    f.bf16("model.layers.0.self_attn.q_proj.weight", (64, H))
    return f


FAMILIES: dict[str, Callable[[Path], Fixture]] = {
    "deepseek-v3": deepseek_v3,
    "deepseek-v3.1-ue8m0": deepseek_v31_ue8m0,
    "qwen3": qwen3,
    "fused-experts": fused_experts,
    "minimax-m2": minimax_m2,
    "ct-fp8-dynamic": ct_dynamic,
    "ct-fp8-static": ct_static,
    "ct-compression-config": ct_compression_config,
    "ct-mxfp8": ct_mxfp8,
    "autofp8": autofp8,
    "modelopt": modelopt_config,
    "modelopt-hf-quant-config": modelopt_hf_quant_only,
    "fbgemm": fbgemm,
    "static-fused-experts": static_fused_experts,
    "mistral-hf": mistral_hf,
    "mistral-native": mistral_native,
    "transformers-mxfp8": mxfp8_bytes,
    "deepseek-v4": deepseek_v4,
    "gpt-oss": gpt_oss,
}


def build(name: str, root: Path) -> Fixture:
    f = FAMILIES[name](root)
    f.write()
    return f
