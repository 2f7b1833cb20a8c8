"""`--target`: on a model whose intermediate size is 8640 (not a multiple of 128), exactly the tensors a
loader cannot load or run stay bf16, the plan and the summary say which and why, and transformers loads
and runs what the transformers target writes. Also the DeepSeek-V3 MTP default skips."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file, save_file
from fp8conv.cli import app

transformers = pytest.importorskip("transformers")

runner = CliRunner()
INTERMEDIATE = 8640  # 67.5 tiles of 128: ragged rows for gate/up, ragged K for down
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPT = torch.tensor([[1, 17, 42, 99, 123, 200, 7, 64]])


def cli(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


@pytest.fixture(scope="module")
def model8640(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("m8640") / "bf16"
    model.save_pretrained(path)
    return path


def plan(src, *args) -> dict:
    r = cli("quantize", src, src.parent / "never-written", "--dry-run", "--json", "-", *args)
    assert not (src.parent / "never-written").exists()
    return json.loads(r.stdout)


def kept_linears(p: dict) -> dict[str, str]:
    return {
        r["tensor"].split(".")[-2]: r["reason"]
        for r in p["tensors"]
        if r["action"] == "keep" and r["tensor"].split(".")[-2] in MLP + ATTN
    }


def test_transformers_target_keeps_ragged_mlp_and_loads(model8640, tmp_path):
    p = plan(model8640, "--target", "transformers")
    kept = kept_linears(p)
    assert set(kept) == set(MLP)  # q/k/v/o are 128-multiples and quantized
    assert all("ragged" in why and "transformers" in why for why in kept.values())
    assert any("--target transformers" in n and "down_proj" in n for n in p["notes"])
    dst = tmp_path / "tf"
    r = cli("quantize", model8640, dst, "--target", "transformers")
    assert "kept as they are" in r.output
    t = load_file(dst / "model.safetensors")
    for name in MLP:
        assert t[f"model.layers.0.mlp.{name}.weight"].dtype == torch.bfloat16
    for name in ATTN:
        assert t[f"model.layers.0.self_attn.{name}.weight"].dtype == torch.float8_e4m3fn
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert {f"model.layers.0.mlp.{n}" for n in MLP} <= set(qc["modules_to_not_convert"])
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model8640, dtype=torch.bfloat16)(PROMPT).logits.float()
        got = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)(PROMPT).logits.float()
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.08, rel


def test_sglang_target_keeps_the_mlp_for_its_own_rules(model8640, tmp_path):
    """SGLang refuses gate/up as one merged layer with 8640-row parts (validate_fp8_block_shape) and
    down_proj's K = 8640 (activation group 128)."""
    p = plan(model8640, "--target", "sglang")
    kept = kept_linears(p)
    assert set(kept) == set(MLP)
    assert "activation group 128" in kept["down_proj"]
    assert "block_n" in kept["gate_proj"] and kept["gate_proj"] == kept["up_proj"]
    dst = tmp_path / "sglang"
    cli("quantize", model8640, dst, "--target", "sglang", "-q")
    t = load_file(dst / "model.safetensors")
    assert {n for n in MLP if t[f"model.layers.0.mlp.{n}.weight"].dtype == torch.bfloat16} == set(MLP)


def test_compressed_tensors_target_keeps_only_ragged_k(model8640, tmp_path):
    """compressed-tensors reads ragged rows (it pads) but quantizes the input per 128 columns: only
    down_proj (K = 8640) stays bf16 for transformers; the output loads and runs."""
    pytest.importorskip("compressed_tensors")
    p = plan(model8640, "--target", "transformers", "--format", "compressed-tensors")
    kept = kept_linears(p)
    assert set(kept) == {"down_proj"}
    assert "activation group 128" in kept["down_proj"]
    dst = tmp_path / "ct"
    cli("quantize", model8640, dst, "--target", "transformers", "--format", "compressed-tensors", "-q")
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model8640, dtype=torch.bfloat16)(PROMPT).logits.float()
        got = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)(PROMPT).logits.float()
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.12, rel


@pytest.mark.parametrize("scheme", ["fp8-channel", "mxfp8"])
def test_channel_and_mxfp8_quantize_every_linear_of_8640(model8640, scheme):
    p = plan(model8640, "--scheme", scheme, "--format", "compressed-tensors")
    assert kept_linears(p) == {}
    assert p["notes"] == []


def test_any_target_keeps_ragged_tiles_and_says_who_would_refuse(model8640, tmp_path):
    """The default writes every tile (DeepSeek-style ragged ones too) and says, loader by loader, which
    weights each cannot load or run; transformers indeed fails to load that output."""
    p = plan(model8640)
    assert kept_linears(p) == {}
    for loader in ("transformers", "vllm", "sglang"):
        assert any(n.startswith(f"{loader} cannot load or run") and "down_proj" in n for n in p["notes"]), (
            loader
        )
    dst = tmp_path / "any"
    cli("quantize", model8640, dst, "-q")
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with pytest.raises(Exception, match="issues during automatic conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)


def test_deepseek_mtp_layer_stays_bf16_by_default(tmp_path):
    """DeepSeek-V3's MTP layer 61 as released: eh_proj, shared_head.head, enorm, hnorm in bf16."""
    src = tmp_path / "mtp"
    src.mkdir()
    names = [
        "model.layers.61.eh_proj.weight",
        "model.layers.61.shared_head.head.weight",
        "model.layers.61.enorm.weight",
        "model.layers.61.hnorm.weight",
        "model.layers.61.self_attn.o_proj.weight",
    ]
    tensors = {n: torch.ones(128) if "norm" in n else torch.ones(256, 256) for n in names}
    save_file({k: v.bfloat16() for k, v in tensors.items()}, src / "model.safetensors", {"format": "pt"})
    (src / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    p = plan(src, "--target", "vllm")
    action = {r["tensor"]: r["action"] for r in p["tensors"]}
    assert action == {n: ("quantize" if "o_proj" in n else "keep") for n in names}
