"""`fp8conv inspect`: format, config, shards, tensors by dtype and role, and anything odd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv import DequantizeOptions, QuantizeOptions, dequantize, quantize
from fp8conv.checkpoint.safetensors_io import load_file, save_file
from fp8conv.cli import app
from fp8conv.errors import InvalidCheckpoint
from fp8conv.verify import inspect_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
META = {"format": "pt"}
runner = CliRunner()
UP0 = "model.layers.0.mlp.up_proj.weight"


def kinds(info: dict) -> dict[str, list]:
    out: dict[str, list] = {}
    for o in info["odd"]:
        out.setdefault(o["kind"], []).append(o)
    return out


def copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fp8conv"))
    return dst


def rewrite(path: Path, fn) -> None:
    t = load_file(path)
    fn(t)
    save_file(t, path, META)


def test_deepseek_sample():
    info = inspect_checkpoint(SAMPLES / "deepseek-tiny-fp8")
    assert info["format"] == "fp8" and "weight_scale_inv" in info["description"]
    assert info["quantization_config"]["quant_method"] == "fp8"
    assert info["block_size"] == [128, 128]
    assert info["has_index"] and info["shards"] == 3 and info["tensors"] == 19
    assert info["by_role"]["fp8_weight"]["tensors"] == 4
    assert info["by_role"]["scale"]["tensors"] == 4
    assert info["by_role"]["other"]["tensors"] == 4  # int64, bool, uint8, int8
    assert info["by_role"]["unquantized_float"]["tensors"] == 7
    assert info["by_dtype"]["F8_E4M3"]["tensors"] == 4
    assert info["scale_names"] == {"_scale_inv": 4, "_scale": 0}
    assert info["tensor_bytes"] == sum(d["bytes"] for d in info["by_dtype"].values())
    index = json.loads((SAMPLES / "deepseek-tiny-fp8" / "model.safetensors.index.json").read_text())
    assert info["tensor_bytes"] == index["metadata"]["total_size"]
    assert "assets/NOTICE.txt" in info["other_files"]
    assert info["odd"] == []


def test_llama_samples():
    bf16 = inspect_checkpoint(SAMPLES / "llama-tiny-bf16")
    assert bf16["format"] == "plain" and bf16["description"] == "plain bf16"
    assert bf16["quantization_config"] is None and bf16["shards"] == 1 and not bf16["has_index"]
    assert bf16["by_dtype"] == {"BF16": {"tensors": 21, "bytes": bf16["tensor_bytes"]}}
    assert bf16["odd"] == []
    fp8 = inspect_checkpoint(SAMPLES / "llama-tiny-fp8")
    assert fp8["format"] == "fp8" and fp8["shards"] == 2
    assert fp8["by_role"]["fp8_weight"]["tensors"] == 14 and fp8["odd"] == []


@pytest.mark.parametrize("fmt, scale_fmt", [("fp8", "float"), ("compressed-tensors", "ue8m0")])
def test_quantized_and_dequantized_outputs(tmp_path, fmt, scale_fmt):
    quantize(
        SAMPLES / "llama-tiny-bf16",
        tmp_path / "q",
        QuantizeOptions(format=fmt, scale_fmt=scale_fmt, device="cpu"),
    )
    info = inspect_checkpoint(tmp_path / "q")
    assert info["format"] == fmt
    suffix = "_scale" if fmt == "compressed-tensors" else "_scale_inv"
    assert info["scale_names"][suffix] == 14 and sum(info["scale_names"].values()) == 14
    assert info["scale_dtypes"] == {"F32": 14}
    assert info["odd"] == []
    dequantize(tmp_path / "q", tmp_path / "d", DequantizeOptions(device="cpu"))
    info = inspect_checkpoint(tmp_path / "d")
    assert info["format"] == "plain" and info["odd"] == []


def test_odd_things(tmp_path):
    ckpt = copy(SAMPLES / "llama-tiny-fp8", tmp_path)
    shard1 = ckpt / "model-00001-of-00002.safetensors"

    def plant(t):
        k = "model.layers.0.self_attn.k_proj.weight"
        t[k + "_scale"] = t.pop(k + "_scale_inv")
        t["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(2, 2)  # a second scale
        t.pop("model.layers.0.mlp.gate_proj.weight_scale_inv")  # FP8 without scale
        t["model.embed_tokens.weight_scale_inv"] = torch.ones(4, 2)  # orphan: embed is bf16

    rewrite(shard1, plant)
    idx = ckpt / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != shard1.name}
    data["weight_map"].update({k: shard1.name for k in load_file(shard1)})
    idx.write_text(json.dumps(data))
    info = inspect_checkpoint(ckpt)
    odd = kinds(info)
    assert [o["tensor"] for o in odd["fp8_without_scale"]] == ["model.layers.0.mlp.gate_proj.weight"]
    assert [o["tensor"] for o in odd["orphan_scale"]] == ["model.embed_tokens.weight_scale_inv"]
    assert "mixed_scale_names" in odd
    assert [o["tensor"] for o in odd["two_scales"]] == ["model.layers.0.self_attn.q_proj.weight"]
    assert info["by_role"]["fp8_without_scale"]["tensors"] == 1
    assert info["by_role"]["orphan_scale"]["tensors"] == 1


def test_leftover_config_and_fp8_in_plain(tmp_path):
    ckpt = copy(SAMPLES / "llama-tiny-bf16", tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"] = {"quantization_config": {"quant_method": "fp8"}}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    info = inspect_checkpoint(ckpt)
    assert info["format"] == "plain-with-quantization-config"
    assert info["quantization_config_location"] == "text_config.quantization_config"
    assert "text_config.quantization_config" in kinds(info)["leftover_quantization_config"][0]["message"]

    ckpt = copy(SAMPLES / "llama-tiny-bf16", tmp_path, "fp8left")
    rewrite(ckpt / "model.safetensors", lambda t: t.__setitem__(UP0, t[UP0].to(torch.float8_e4m3fn)))
    info = inspect_checkpoint(ckpt)
    assert info["format"] == "fp8-unconfigured"
    odd = kinds(info)
    assert UP0 in odd["fp8_without_quantization_config"][0]["message"]
    assert odd["fp8_without_scale"][0]["tensor"] == UP0


def test_broken_folder_is_described_not_refused(tmp_path):
    ckpt = copy(SAMPLES / "deepseek-tiny-fp8", tmp_path)
    (ckpt / "model-00003-of-00003.safetensors").unlink()
    p = ckpt / "model-00002-of-00003.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 10)
    info = inspect_checkpoint(ckpt)
    lost = ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert info["unreadable_shards"] == lost
    files = {o["file"] for o in info["odd"] if o["kind"].startswith("structure:")}
    assert {str(ckpt / n) for n in lost} <= files
    assert info["shards"] == 3


def test_cli(tmp_path):
    r = runner.invoke(app, ["inspect", str(SAMPLES / "deepseek-tiny-fp8"), "--json", "-"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "fp8" and info["shards"] == 3
    r = runner.invoke(app, ["inspect", str(SAMPLES / "llama-tiny-bf16")])
    # the table title holds SRC's path, so rich may wrap it anywhere on a deep checkout: compare words
    assert r.exit_code == 0 and "plain bf16" in " ".join(r.output.split())
    target = tmp_path / "i.json"
    r = runner.invoke(app, ["inspect", str(SAMPLES / "llama-tiny-fp8"), "--json", str(target)])
    assert r.exit_code == 0 and json.loads(target.read_text())["by_role"]["fp8_weight"]["tensors"] == 14


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["inspect", str(tmp_path / "empty")])
    assert r.exit_code == 3
    with pytest.raises(InvalidCheckpoint):
        inspect_checkpoint(tmp_path / "nowhere")
