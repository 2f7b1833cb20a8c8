"""Loader rules against the installed consumers: a checkpoint the report says loads must load; one it says
fails must fail the same way (transformers 5.24 and compressed-tensors 0.20.1, on the CPU). vLLM's and
SGLang's settings rules re-implement vllm/model_executor/layers/quantization/fp8.py
@0071b24bf8fe8c3d1bc3516d0ff8477f07964aaf (Fp8Config.from_config), which cannot run here."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from fp8conv.checkpoint.safetensors_io import load_file, save_file
from fp8conv.convert import QuantizeOptions, quantize
from fp8conv.kernels import weight_dequant
from fp8conv.targets import TARGETS, serving_report

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def llama_bf16(root: Path, hidden=256, inter=512, heads=4, kv=2, head_dim=64, meta=None) -> Path:
    g = torch.Generator().manual_seed(1)
    root.mkdir(parents=True)

    def lin(o, n):
        return (torch.randn(o, n, generator=g) / n**0.5).bfloat16()

    p = "model.layers.0."
    t = {
        "model.embed_tokens.weight": lin(512, hidden),
        p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": lin(heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": lin(kv * head_dim, hidden),
        p + "self_attn.v_proj.weight": lin(kv * head_dim, hidden),
        p + "self_attn.o_proj.weight": lin(hidden, heads * head_dim),
        p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "mlp.gate_proj.weight": lin(inter, hidden),
        p + "mlp.up_proj.weight": lin(inter, hidden),
        p + "mlp.down_proj.weight": lin(hidden, inter),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": lin(512, hidden),
    }
    save_file(t, root / "model.safetensors", {"format": "pt"} if meta is None else meta)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "vocab_size": 512,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def fp8_llama(tmp_path: Path, name: str, fmt: str = "fp8", **dims) -> Path:
    src = llama_bf16(tmp_path / f"{name}-bf16", **dims)
    quantize(src, tmp_path / name, QuantizeOptions(format=fmt, device="cpu"))
    return tmp_path / name


def load(path: Path, level: int = logging.ERROR):
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(level)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, output_loading_info=True)


def verdict(path: Path, target: str):
    return next(v for v in serving_report(path, (1,), targets=TARGETS).loaders if v.target == target)


def ours(path: Path, weight: str) -> torch.Tensor:
    t = load_file(path / "model.safetensors")
    return weight_dequant(t[weight], t[weight + "_scale_inv"])


DOWN = "model.layers.0.mlp.down_proj.weight"


def test_aligned_checkpoint_loads_in_transformers_as_reported(tmp_path):
    path = fp8_llama(tmp_path, "q")
    v = verdict(path, "transformers")
    assert v.loads and not [f for f in v.findings if f.severity == "fail"]
    model, info = load(path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.state_dict()[DOWN], ours(path, DOWN))


def test_ragged_grid_is_refused_by_transformers_as_reported(tmp_path, caplog):
    path = fp8_llama(tmp_path, "q", inter=320)  # 320 rows, 3 scale rows
    v = verdict(path, "transformers")
    fail = next(f for f in v.findings if f.rule == "ragged tiles")
    assert not v.loads
    assert fail.tensor == "model.layers.0.mlp.gate_proj.weight"
    assert fail.message.startswith("Weight shape (320, 256) not divisible by scale grid (3, 2).")
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="automatic conversion"):
        load(path, logging.WARNING)
    assert "Weight shape (320, 256) not divisible by scale grid (3, 2)." in caplog.text
    # vLLM pads edge tiles as fp8conv does: no ragged-tile finding there; but down_proj's K = 320 is
    # not a multiple of the 128-column activation group its per-token-group quantization asserts
    # (vllm model_executor/layers/quantization/utils/fp8_utils.py per_token_group_quant_fp8 @007d500)
    v = verdict(path, "vllm")
    assert not any(f.rule == "ragged tiles" for f in v.findings)
    fails = [f for f in v.findings if f.severity == "fail"]
    assert [(f.rule, f.tensor) for f in fails] == [("activation group", DOWN)], fails
    assert "K = 320" in fails[0].message


def test_ragged_grid_that_divides_loads_wrong_in_transformers_as_reported(tmp_path):
    path = fp8_llama(tmp_path, "q", inter=130)  # 130 rows, 2 scale rows: transformers infers 65-row tiles
    v = verdict(path, "transformers")
    fail = next(f for f in v.findings if f.rule == "ragged tiles")
    assert "infer block [65, 128]" in fail.message and "dequantizes wrong" in fail.message
    model, info = load(path)  # no error, no warning key
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not torch.equal(model.state_dict()[DOWN], ours(path, DOWN))


def test_scales_named_for_the_other_loader_as_reported(tmp_path):
    path = fp8_llama(tmp_path, "q")
    t = load_file(path / "model.safetensors")
    save_file(
        {k.replace("weight_scale_inv", "weight_scale"): v for k, v in t.items()},
        path / "model.safetensors",
        {"format": "pt"},
    )
    for target in ("transformers", "vllm", "sglang"):
        v = verdict(path, target)
        assert not v.loads
        assert "named 'model.layers.0.self_attn.q_proj.weight_scale'" in v.why
    model, info = load(path)  # transformers: the scales go unused
    assert "model.layers.0.mlp.down_proj.weight_scale" in info["unexpected_keys"]
    # the weight it holds is the bare e4m3 codes, never multiplied by a scale
    assert torch.equal(model.state_dict()[DOWN], t[DOWN].to(torch.bfloat16))


def test_compressed_tensors_aligned_runs_and_unaligned_k_fails_as_reported(tmp_path):
    pytest.importorskip("compressed_tensors")
    ok = fp8_llama(tmp_path, "ct", fmt="compressed-tensors")
    assert verdict(ok, "compressed-tensors").loads
    model, _ = load(ok)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    bad = fp8_llama(tmp_path, "ct320", fmt="compressed-tensors", hidden=320, heads=5, kv=5)
    v = verdict(bad, "compressed-tensors")
    fail = next(f for f in v.findings if f.rule == "activation group")
    assert not v.loads and "K = 320" in fail.message
    model, _ = load(bad)
    with pytest.raises(RuntimeError, match="don't multiply up to the size of dim 2 \\(320\\)"):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))


def test_ragged_compressed_tensors_run_right_in_transformers(tmp_path):
    # through compressed-tensors, transformers takes the block from the settings and pads edge tiles:
    # gate/up of 320 rows (3 ragged tiles) run; down_proj (K = 320) stays bf16 for the activation groups
    pytest.importorskip("compressed_tensors")
    src = llama_bf16(tmp_path / "bf16", inter=320)
    path = tmp_path / "ct"
    quantize(src, path, QuantizeOptions(format="compressed-tensors", skip=("*down_proj*",), device="cpu"))
    v = verdict(path, "transformers")
    assert v.loads and not [f for f in v.findings if f.rule == "ragged tiles"]
    prompt = torch.tensor([[1, 17, 42, 99, 123, 256, 300, 511]])
    with torch.no_grad():
        got = load(path)[0](prompt).logits.float()
        ref = load(src)[0](prompt).logits.float()
    # e4m3 weights and dynamic e4m3 activations, ~3% each (tests/test_consumers.py CT_LOGITS_REL_BOUND)
    assert float((got - ref).norm() / ref.norm()) < 0.12


def test_compressed_tensors_settings_against_the_library(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    path = fp8_llama(tmp_path, "ct", fmt="compressed-tensors")
    cfg = json.loads((path / "config.json").read_text())
    QuantizationConfig.model_validate(cfg["quantization_config"])  # what verify says loads, validates
    del cfg["quantization_config"]["config_groups"]
    (path / "config.json").write_text(json.dumps(cfg))
    v = verdict(path, "compressed-tensors")
    assert not v.loads and "config_groups" in v.why
    with pytest.raises(ValidationError, match="config_groups"):
        QuantizationConfig.model_validate(cfg["quantization_config"])
    assert not verdict(fp8_llama(tmp_path, "native"), "compressed-tensors").loads  # fp8, not ct


def test_shard_without_format_metadata_loads_in_transformers(tmp_path):
    path = fp8_llama(tmp_path, "q")
    t = load_file(path / "model.safetensors")
    save_file(t, path / "model.safetensors", None)
    v = verdict(path, "transformers")
    info = next(f for f in v.findings if f.rule == "shard metadata")
    assert v.loads and info.severity == "info" and "5.24 loads them anyway" in info.message
    model, loading = load(path)
    assert torch.equal(model.state_dict()[DOWN], ours(path, DOWN))


@pytest.mark.parametrize(
    "change, text",
    [
        ({"activation_scheme": None}, "Cannot find any of ['activation_scheme']"),
        ({"activation_scheme": "static"}, "only supports dynamic activation scheme for now, but got static"),
        ({"weight_block_size": [128]}, "must have 2 dimensions, but got 1 dimensions"),
    ],
)
def test_vllm_and_sglang_settings_rules(tmp_path, change, text):
    path = fp8_llama(tmp_path, "q")
    cfg = json.loads((path / "config.json").read_text())
    for k, val in change.items():
        if val is None:
            del cfg["quantization_config"][k]
        else:
            cfg["quantization_config"][k] = val
    (path / "config.json").write_text(json.dumps(cfg))
    for target in ("vllm", "sglang"):
        v = verdict(path, target)
        assert not v.loads and text in v.why, v.why


def test_fp8_lm_head_is_refused_for_vllm(tmp_path):
    path = tmp_path / "lm"
    src = llama_bf16(tmp_path / "lm-bf16")
    quantize(src, path, QuantizeOptions(only=("*_proj.weight", "lm_head.weight"), device="cpu"))
    if "lm_head.weight_scale_inv" not in load_file(path / "model.safetensors"):
        shutil.rmtree(path)
        pytest.skip("quantize leaves lm_head in bf16 even when asked")
    assert "lm_head" in verdict(path, "vllm").why


def test_default_targets_are_the_loaders_of_the_format(tmp_path):
    native = serving_report(fp8_llama(tmp_path, "native"), ())
    assert [v.target for v in native.loaders] == ["transformers", "vllm", "sglang"]
    ct = serving_report(fp8_llama(tmp_path, "ct", fmt="compressed-tensors"), ())
    assert [v.target for v in ct.loaders] == list(TARGETS)
    assert native.ok  # no TP size asked for, no target named
    named = serving_report(tmp_path / "native", (), targets=("compressed-tensors",))
    assert not named.ok  # a target named by the user that does not load fails the report
