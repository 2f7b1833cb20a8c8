"""`fp8conv quantize` end to end: what is quantized, names, config, dry run, refusals, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file, read_header, save_file
from fp8conv.cli import app
from fp8conv.kernels.reference import weight_dequant_torch, weight_quant_torch
from tests.conftest import tree_digest

runner = CliRunner()
LLAMA = "llama-tiny-bf16"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_llama_sample_fp8_layout(sample, tmp_path):
    src = sample(LLAMA)
    before = tree_digest(src)
    dst = tmp_path / "q"
    r = cli("quantize", src, dst, "-q")
    assert r.exit_code == 0, r.output
    assert tree_digest(src) == before
    srcs, outs = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    meta = read_header(dst / "model.safetensors").metadata  # the source's, plus the job and content hash
    assert {k: v for k, v in meta.items() if not k.startswith("fp8conv.")} == {"format": "pt"}
    assert set(meta) == {"format", "fp8conv.job", "fp8conv.checksum"}
    quantized = [k for k in srcs if k.endswith("_proj.weight")]
    assert len(quantized) == 14
    for k in quantized:
        assert outs[k].dtype == torch.float8_e4m3fn
        assert outs[k + "_scale_inv"].dtype == torch.float32
        q, s = weight_quant_torch(srcs[k])
        assert torch.equal(outs[k].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(outs[k + "_scale_inv"], s)
    for k in set(srcs) - set(quantized):  # embeddings, norms, lm_head untouched
        assert torch.equal(outs[k], srcs[k])
    assert set(outs) == set(srcs) | {k + "_scale_inv" for k in quantized}
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
    }
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_deepseek_style_sharded_bf16_round_trip(sample, tmp_path):
    """dequantize -> quantize -> dequantize of the DeepSeek sample: sharded, ragged, experts."""
    src = sample("deepseek-tiny-fp8")
    assert cli("dequantize", src, tmp_path / "bf16", "-q").exit_code == 0
    r = cli("quantize", tmp_path / "bf16", tmp_path / "fp8", "-q")
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" in index
    assert "model.layers.0.mlp.gate.weight_scale_inv" not in index  # router kept
    # quantizing the exact dequantization of block-FP8 data reproduces the codes (amax tiles map to 448)
    assert cli("dequantize", tmp_path / "fp8", tmp_path / "bf16b", "-q").exit_code == 0
    a = {p.name: p.read_bytes() for p in (tmp_path / "bf16").glob("*.safetensors")}
    b = {p.name: p.read_bytes() for p in (tmp_path / "bf16b").glob("*.safetensors")}
    assert a.keys() == b.keys()
    w_a, w_b = {}, {}
    for n in a:
        w_a.update(load_file(tmp_path / "bf16" / n))
        w_b.update(load_file(tmp_path / "bf16b" / n))
    assert set(w_a) == set(w_b)
    for k in w_a:
        rel = float((w_a[k].float() - w_b[k].float()).norm() / max(w_a[k].float().norm(), 1e-30))
        assert rel < 0.035, (k, rel)


def test_compressed_tensors_format(sample, tmp_path):
    r = cli("quantize", sample(LLAMA), tmp_path / "ct", "--format", "compressed-tensors", "-q")
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "ct" / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight_scale" in out
    assert not any(k.endswith("_scale_inv") for k in out)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert w["strategy"] == "block" and w["block_structure"] == [128, 128]
    assert "lm_head" in qc["ignore"]


def test_ue8m0_and_block_size(sample, tmp_path):
    r = cli("quantize", sample(LLAMA), tmp_path / "u", "--scale-fmt", "ue8m0", "--block-size", "64x128", "-q")
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "u" / "model.safetensors")
    s = out["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert s.shape == (4, 2)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    qc = json.loads((tmp_path / "u" / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [64, 128]


def test_skip_only_and_regex(sample, tmp_path):
    r = cli(
        "quantize", sample(LLAMA), tmp_path / "a", "--skip", "*.mlp.*", "--skip", "re:layers\\.1\\.", "-q"
    )
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "a" / "model.safetensors")
    fp8 = sorted(k for k, v in out.items() if v.dtype == torch.float8_e4m3fn)
    assert fp8 == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "koqv"]
    mods = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"
    ]
    assert "model.layers.0.mlp.up_proj" in mods and "model.layers.1.self_attn.q_proj" in mods
    r = cli("quantize", sample(LLAMA), tmp_path / "b", "--only", "*.down_proj.weight", "-q")
    out = load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(k for k, v in out.items() if v.dtype == torch.float8_e4m3fn) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert cli("quantize", sample(LLAMA), tmp_path / "c", "--skip", "re:(").exit_code == 2


def test_dry_run_writes_nothing(sample, tmp_path):
    r = cli("quantize", sample(LLAMA), tmp_path / "d", "--dry-run", "--json", "-")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert (
        plan["totals"]["quantized"] == 14 and plan["totals"]["bytes_after"] < plan["totals"]["bytes_before"]
    )
    row = next(t for t in plan["tensors"] if t["tensor"] == "model.norm.weight")
    assert row["action"] == "keep"
    assert not (tmp_path / "d").exists()
    r = cli("quantize", sample(LLAMA), tmp_path / "d", "--dry-run")
    assert r.exit_code == 0 and "quantize plan" in r.output and not (tmp_path / "d").exists()


def test_fp8_input_is_refused(sample, tmp_path):
    r = cli("quantize", sample("deepseek-tiny-fp8"), tmp_path / "x")
    assert r.exit_code == 3 and "dequantize" in r.output and "already FP8" in r.output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused(tmp_path, bad):
    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(256, 256)
    w[200, 3] = bad
    save_file({"a.weight": torch.randn(256, 256), "b.weight": w}, src / "model.safetensors")
    r = cli("quantize", src, tmp_path / "o")
    assert r.exit_code == 4, r.output
    assert "b.weight" in r.output and "[200, 3]" in r.output
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_small_and_odd_tensors_are_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    t = {
        "small.weight": torch.randn(64, 256),
        "bias": torch.randn(256),
        "ids": torch.arange(4),
        "big.weight": torch.randn(130, 300).half(),
        "experts.weight": torch.randn(2, 128, 256).bfloat16(),
    }
    save_file(t, src / "model.safetensors")
    assert cli("quantize", src, tmp_path / "o", "-q").exit_code == 0
    out = load_file(tmp_path / "o" / "model.safetensors")
    assert out["small.weight"].dtype == torch.float32 and torch.equal(out["small.weight"], t["small.weight"])
    assert out["big.weight"].dtype == torch.float8_e4m3fn and out["big.weight_scale_inv"].shape == (2, 3)
    assert out["experts.weight_scale_inv"].shape == (2, 1, 2)
    back = weight_dequant_torch(out["big.weight"], out["big.weight_scale_inv"], out_dtype=torch.float32)
    assert float((back - t["big.weight"].float()).norm() / t["big.weight"].float().norm()) < 0.035
