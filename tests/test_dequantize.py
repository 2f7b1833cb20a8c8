"""`fp8conv dequantize` end to end on tiny checkpoints: bytes on disk, config, index, exit codes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file, read_header, save_file
from fp8conv.cli import app
from fp8conv.formats.compressed_tensors import ct_block_config
from fp8conv.kernels.reference import expand_scales, scale_to_float32
from tests.conftest import tree_digest

runner = CliRunner()
DS = "deepseek-tiny-fp8"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def all_tensors(root):
    out = {}
    for p in sorted(root.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def formula(q, s, dtype=torch.bfloat16):
    """The straightforward definition: fp32(q) * expanded scale, rounded once."""
    return (q.float() * expand_scales(s, tuple(q.shape), (128, 128))).to(dtype)


@pytest.mark.parametrize(
    "dtype,torch_dtype,name",
    [
        ("bf16", torch.bfloat16, "bfloat16"),
        ("fp16", torch.float16, "float16"),
        ("fp32", torch.float32, "float32"),
    ],
)
def test_deepseek_sample_end_to_end(sample, tmp_path, dtype, torch_dtype, name):
    src = sample(DS)
    before = tree_digest(src)
    dst = tmp_path / "out"
    r = cli("dequantize", src, dst, "--dtype", dtype, "--quiet", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert tree_digest(src) == before  # the source is never modified

    srcs, outs = all_tensors(src), all_tensors(dst)
    scales = {k for k in srcs if k.endswith("_scale_inv")}
    assert set(outs) == set(srcs) - scales  # scales dropped, nothing else lost
    for k, v in srcs.items():
        if k in scales:
            continue
        if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            assert outs[k].dtype == torch_dtype
            want = formula(v, srcs[k + "_scale_inv"], torch_dtype)
            assert torch.equal(outs[k].view(torch.uint8), want.view(torch.uint8)), k
        else:  # byte-identical pass-through, int8/uint8/bool/int64 included
            assert outs[k].dtype == v.dtype
            assert torch.equal(outs[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    # shard names, metadata, index
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(
        p.name for p in src.glob("*.safetensors")
    )
    for p in dst.glob("*.safetensors"):
        assert read_header(p).metadata == {"format": "pt"}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in outs.values())
    assert set(index["weight_map"]) == set(outs)
    for k, shard in index["weight_map"].items():
        assert k in read_header(dst / shard).tensors
    # config: no quantization_config, states the dtype; other files and folders copied
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == name
    for rel in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "assets/NOTICE.txt"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] and summary["tensors_converted"] == 4 and summary["device"] == "cpu"
    assert summary["bytes_out"] == sum(p.stat().st_size for p in dst.glob("*.safetensors"))


def test_scale_in_another_shard_is_found(sample):
    src = sample(DS)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    w = "model.layers.0.mlp.down_proj.weight"
    assert index[w] != index[w + "_scale_inv"]  # the sample really has the split


def test_single_file_checkpoint_and_compressed_tensors_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    q = (
        torch.randint(0, 126, (200, 300), generator=gen, dtype=torch.int32)
        .to(torch.uint8)
        .view(torch.float8_e4m3fn)
    )
    s = torch.rand(2, 3, generator=gen) + 0.5
    save_file(
        {"a.weight": q, "a.weight_scale": s, "b": torch.arange(5)},
        src / "model.safetensors",
        {"format": "pt"},
    )
    (src / "config.json").write_text(
        json.dumps(
            {"text_config": {"quantization_config": ct_block_config((128, 128), []), "dtype": "bfloat16"}}
        )
    )
    r = cli("dequantize", src, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == {"a.weight", "b"}
    assert torch.equal(out["a.weight"], formula(q, s))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg["text_config"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_e5m2_and_ue8m0_scales_and_experts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(1)
    e5 = torch.randn(130, 260, generator=gen).to(torch.float8_e5m2)
    e5s = torch.randint(120, 130, (2, 3), generator=gen).to(torch.uint8)
    ex = torch.randn(3, 129, 128, generator=gen).to(torch.float8_e4m3fn)
    exs = torch.randint(120, 130, (3, 2, 1), generator=gen).to(torch.uint8).view(torch.float8_e8m0fnu)
    save_file(
        {"e5.weight": e5, "e5.weight_scale_inv": e5s, "ex.weight": ex, "ex.weight_scale_inv": exs},
        src / "model.safetensors",
        {"format": "pt"},
    )
    r = cli("dequantize", src, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["e5.weight"], formula(e5, scale_to_float32(e5s)))
    assert torch.equal(out["ex.weight"], formula(ex, scale_to_float32(exs)))


def test_missing_scale_is_refused_and_nothing_written(sample, tmp_path):
    src = sample(DS)
    shard = src / "model-00003-of-00003.safetensors"
    t = load_file(shard)
    del t["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(t, shard, {"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("dequantize", src, tmp_path / "out")
    assert r.exit_code == 3
    assert "o_proj.weight" in r.output and "no scale" in r.output
    assert not (tmp_path / "out").exists()


def test_misshapen_scale_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    q = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    save_file({"a.weight": q, "a.weight_scale_inv": torch.ones(3, 2)}, src / "model.safetensors")
    r = cli("dequantize", src, tmp_path / "out")
    assert r.exit_code == 3 and "a.weight_scale_inv" in r.output and "[2, 2]" in r.output


@pytest.mark.parametrize("code,exit_code", [(0x7F, 4)])
def test_nan_code_is_refused(tmp_path, code, exit_code):
    src = tmp_path / "src"
    src.mkdir()
    q = torch.zeros(256, 256, dtype=torch.uint8)
    q[130, 7] = code
    save_file(
        {"a.weight": q.view(torch.float8_e4m3fn), "a.weight_scale_inv": torch.ones(2, 2)},
        src / "model.safetensors",
    )
    r = cli("dequantize", src, tmp_path / "out")
    assert r.exit_code == exit_code and "[130, 7]" in r.output and "a.weight" in r.output
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_usage_errors_exit_2(sample, tmp_path):
    src = sample(DS)
    assert cli("dequantize", src, tmp_path / "o", "--dtype", "int4").exit_code == 2
    assert cli("dequantize", src, tmp_path / "o", "--device", "tpu").exit_code == 2
    assert cli("dequantize").exit_code == 2
    if not torch.cuda.is_available():
        r = cli("dequantize", src, tmp_path / "o", "--device", "cuda")
        assert r.exit_code == 2 and "cuda" in r.output


def test_not_a_checkpoint_exit_3(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("dequantize", tmp_path / "empty", tmp_path / "o")
    assert r.exit_code == 3 and "model.safetensors" in r.output


def test_json_to_stdout(sample, tmp_path):
    r = cli("dequantize", sample(DS), tmp_path / "o", "--json", "-", "--quiet")
    assert r.exit_code == 0
    payload = json.loads(r.stdout)
    assert payload["tensors_converted"] == 4 and payload["tensors_copied"] == 11


def test_plain_progress_lines_when_not_a_terminal(sample, tmp_path):
    r = cli("dequantize", sample(DS), tmp_path / "o")
    assert r.exit_code == 0
    assert "wrote model-00001-of-00003.safetensors" in r.output
    assert "100.0%" in r.output


def test_large_tensor_is_split_into_pieces(tmp_path, monkeypatch):
    """Pieces bound memory: a tensor bigger than a piece converts identically."""
    from fp8conv.convert import engine

    monkeypatch.setattr(engine, "PIECE_ELEMS", 128 * 300)
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1000, 300, generator=gen).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(1000 / 128), 3, generator=gen) + 0.1
    save_file({"w.weight": q, "w.weight_scale_inv": s, "x": torch.ones(3)}, src / "model.safetensors")
    r = cli("dequantize", src, tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output
    assert torch.equal(load_file(tmp_path / "o" / "model.safetensors")["w.weight"], formula(q, s))


def test_hugging_face_cache_snapshot_with_links_into_blobs(sample, tmp_path):
    """A cache snapshot is links into the repo's blobs/ folder: accepted; a link elsewhere is not."""
    src = sample(DS)
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(q for q in src.rglob("*") if q.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(p.read_bytes())
        link = snap / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    r = cli("dequantize", snap, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model-00001-of-00003.safetensors").is_file()
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(outside)
    r = cli("dequantize", snap, tmp_path / "out2", "-q")
    assert r.exit_code == 3 and "outside" in r.output
