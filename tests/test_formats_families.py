"""Every published family dequantized on the CPU, bit for bit against the fixtures' own formulas, with
nothing of the quantization left; and what fp8conv does not understand refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.layout import open_checkpoint
from fp8conv.checkpoint.safetensors_io import load_file, read_header, save_file
from fp8conv.cli import app
from fp8conv.formats import Granularity, ScaleEncoding, dequantized_leftovers, detect
from tests.conftest import tree_digest
from tests.fixtures_formats import FAMILIES, build, fp8_codes

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def load_all(root):
    out = {}
    for p in sorted(root.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    ba, bb = a.contiguous().view(torch.uint8).reshape(-1), b.contiguous().view(torch.uint8).reshape(-1)
    i = int((ba != bb).nonzero()[0]) // a.element_size()
    return f"first differing element {i}: {a.reshape(-1)[i].item()!r} vs {b.reshape(-1)[i].item()!r}"


def output_leftovers(dst):
    tensors = {}
    for p in dst.glob("*.safetensors"):
        tensors.update({n: (i.dtype, p.name) for n, i in read_header(p).tensors.items()})
    config = json.loads((dst / "config.json").read_text()) if (dst / "config.json").exists() else None
    files = [str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    params = json.loads((dst / "params.json").read_text()) if (dst / "params.json").exists() else None
    return dequantized_leftovers(tensors, config, files, params)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_dequantizes_bit_exact_and_clean(name, tmp_path):
    f = build(name, tmp_path)
    before = tree_digest(f.root)
    assert detect(open_checkpoint(f.root)).family == f.family
    dst = tmp_path / "out"
    r = cli("dequantize", f.root, dst, "-q")
    assert r.exit_code == 0, r.output
    assert tree_digest(f.root) == before
    out = load_all(dst)
    assert set(out) == set(f.expect), set(out) ^ set(f.expect)
    for k, fn in f.expect.items():
        want = fn(torch.bfloat16)
        assert out[k].shape == want.shape and out[k].dtype == want.dtype, (k, out[k].shape, want.shape)
        assert torch.equal(out[k].view(torch.uint8), want.contiguous().view(torch.uint8)), (
            k,
            first_difference(out[k], want),
        )
    assert not f.dropped & set(out)
    assert output_leftovers(dst) == []
    if (dst / "model.safetensors.index.json").exists():  # lists the HF shards' tensors only, sized right
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        listed = {p.name: read_header(p) for p in dst.glob("model-*.safetensors")}
        assert index["weight_map"] == {n: s for s, h in listed.items() for n in h.tensors}
        assert index["metadata"]["total_size"] == sum(
            i.nbytes for h in listed.values() for i in h.tensors.values()
        )
    assert (dst / "consolidated.safetensors").exists() == bool(f.native)
    for rel in f.files:
        if rel in f.dropped_files:
            assert not (dst / rel).exists(), rel
        elif rel == "params.json":
            params = json.loads((dst / rel).read_text())
            assert "quantization" not in params and params == {
                k: v for k, v in json.loads(f.files[rel]).items() if k != "quantization"
            }
        else:
            assert (dst / rel).read_text() == f.files[rel]


@pytest.mark.parametrize("name", ["deepseek-v3", "fbgemm", "gpt-oss", "deepseek-v4", "ct-mxfp8"])
@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_other_output_dtypes(name, dtype, torch_dtype, tmp_path):
    f = build(name, tmp_path)
    r = cli("dequantize", f.root, tmp_path / "out", "--dtype", dtype, "-q")
    assert r.exit_code == 0, r.output
    out = load_all(tmp_path / "out")
    assert set(out) == set(f.expect)
    for k, fn in f.expect.items():  # pass-through tensors keep their dtype, the rest are torch_dtype
        want = fn(torch_dtype)
        assert torch.equal(out[k].view(torch.uint8), want.contiguous().view(torch.uint8)), k


def test_pieces_of_a_tensor_give_the_same_bytes(tmp_path, monkeypatch):
    """Row bands smaller than a tensor (and than a per-tensor scale's tile) change nothing."""
    from fp8conv.convert import engine

    monkeypatch.setattr(engine, "PIECE_ELEMS", 1000)
    for name in (
        "deepseek-v3",
        "static-fused-experts",
        "fbgemm",
        "gpt-oss",
        "deepseek-v4",
        "ct-mxfp8",
        "autofp8",
    ):
        f = build(name, tmp_path / name)
        r = cli("dequantize", f.root, tmp_path / name / "out", "-q")
        assert r.exit_code == 0, r.output
        out = load_all(tmp_path / name / "out")
        for k, fn in f.expect.items():
            assert torch.equal(out[k].view(torch.uint8), fn(torch.bfloat16).contiguous().view(torch.uint8)), k


def test_detection_names_scheme_and_encoding(tmp_path):
    cases = {
        "deepseek-v3": (Granularity.BLOCK, ScaleEncoding.FLOAT32),
        "ct-fp8-dynamic": (Granularity.CHANNEL, ScaleEncoding.BFLOAT16),
        "ct-fp8-static": (Granularity.TENSOR, ScaleEncoding.BFLOAT16),
        "ct-mxfp8": (Granularity.GROUP, ScaleEncoding.UINT8_EXPONENT),
        "transformers-mxfp8": (Granularity.GROUP, ScaleEncoding.UINT8_EXPONENT),
        "modelopt": (Granularity.TENSOR, ScaleEncoding.FLOAT32),
        "gpt-oss": (Granularity.GROUP, ScaleEncoding.UINT8_EXPONENT),
    }
    for name, (gran, enc) in cases.items():
        found = detect(open_checkpoint(build(name, tmp_path / name).root))
        assert {s.granularity for s in found.schemes} == {gran}, name
        assert found.scale_encodings == [enc], name
    found = detect(open_checkpoint(build("static-fused-experts", tmp_path / "sfe").root))
    assert {s.granularity for s in found.schemes} == {Granularity.HALF, Granularity.EXPERT}
    kinds = {a.kind.value for a in found.artifacts.values()}
    assert kinds == {"weight_scale", "input_scale"}
    found = detect(open_checkpoint(build("modelopt", tmp_path / "mo").root))
    assert {a.kind.value for a in found.artifacts.values()} == {"weight_scale", "input_scale", "kv_scale"}
    assert found.side_files == ("hf_quant_config.json",)
    w = found.weight_of("model.layers.0.mlp.down_proj.weight_scale")
    assert w is not None and w.name == "model.layers.0.mlp.down_proj.weight"


# ------------------------------------------------------------------------------------ refusals
def _plain_fp8(root, config, extra=None):
    root.mkdir(parents=True)
    t = {
        "a.weight": fp8_codes((128, 128), torch.Generator().manual_seed(0)),
        "a.weight_scale_inv": torch.ones(1, 1),
    }
    t.update(extra or {})
    save_file(t, root / "model.safetensors", {"format": "pt"})
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def _refused(src, dst, *words):
    r = cli("dequantize", src, dst)
    assert r.exit_code == 3, r.output
    for w in words:
        assert w in r.output, (w, r.output)
    assert not dst.exists()
    return r.output


@pytest.mark.parametrize(
    "qc,words",
    [
        ({"quant_method": "gptq", "bits": 4}, ["'gptq'", "fp8conv does not read", "compressed-tensors"]),
        ({"bits": 4}, ["no quant_method"]),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
            ["'pack-quantized'", "float-quantized"],
        ),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, ["'NVFP4'", "FP8"]),
        ({"quant_method": "fp8", "fmt": "e2m1"}, ["fmt 'e2m1'"]),
        ({"quant_method": "fp8", "weight_block_size": [128]}, ["weight_block_size"]),
    ],
)
def test_unknown_settings_are_refused(tmp_path, qc, words):
    src = _plain_fp8(tmp_path / "src", {"quantization_config": qc})
    _refused(src, tmp_path / "out", "config.json", *words)


def test_unknown_hf_quant_algo_is_refused(tmp_path):
    src = _plain_fp8(tmp_path / "src", {})
    (src / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A8_AWQ"}}))
    _refused(src, tmp_path / "out", "hf_quant_config.json", "'W4A8_AWQ'")


@pytest.mark.parametrize(
    "extra,tensor",
    [
        (
            {"b.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "b.weight_scale": torch.ones(1)},
            "b.weight_scale",
        ),
        ({"b.qscale_weight": torch.ones(1)}, "b.qscale_weight"),
        ({"b.weight_zero_point": torch.zeros(4, dtype=torch.int8)}, "b.weight_zero_point"),
        ({"b.e8": torch.ones(4, dtype=torch.uint8).view(torch.float8_e8m0fnu)}, "b.e8"),
        ({"b.weight": torch.zeros(64, 16, dtype=torch.uint8)}, "b.weight"),  # packed data, unknown meaning
        ({"b.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}, "b.weight"),  # FP8 without a scale
    ],
)
def test_unexplained_tensors_are_refused(tmp_path, extra, tensor):
    src = _plain_fp8(tmp_path / "src", {"quantization_config": {"quant_method": "fp8"}}, extra)
    _refused(src, tmp_path / "out", repr(tensor), "model.safetensors")


def test_orphaned_mxfp4_blocks_are_refused(tmp_path):
    """gpt-oss blocks whose settings were removed are not a bf16 checkpoint."""
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {
            "e.gate_up_proj_blocks": torch.zeros(2, 8, 2, 16, dtype=torch.uint8),
            "e.gate_up_proj_scales": torch.full((2, 8, 2), 127, dtype=torch.uint8),
            "n.weight": torch.ones(4, dtype=torch.bfloat16),
        },
        src / "model.safetensors",
        {"format": "pt"},
    )
    (src / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    _refused(src, tmp_path / "out", "e.gate_up_proj_", "quantization")


def test_mxfp4_blocks_that_are_not_stacked_experts_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {
            "x_blocks": torch.zeros(8, 2, 16, dtype=torch.uint8),
            "x_scales": torch.full((8, 2), 127, dtype=torch.uint8),
        },
        src / "model.safetensors",
        {"format": "pt"},
    )
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mxfp4"}}))
    _refused(src, tmp_path / "out", "x_blocks")


def test_misfit_fbgemm_scale_names_the_schemes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {"a.weight": fp8_codes((8, 16), torch.Generator()), "a.weight_scale": torch.ones(1, 16)},
        src / "model.safetensors",
        {"format": "pt"},
    )
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fbgemm_fp8"}}))
    _refused(src, tmp_path / "out", "a.weight_scale", "[1, 16]", "channel")


# ------------------------------------------------------------------------------------ leftovers
@pytest.mark.parametrize(
    "plant,kind",
    [
        ({"tensor": ("x.weight_scale_inv", "F32")}, "scale_tensor"),
        ({"tensor": ("x.input_scale", "BF16")}, "scale_tensor"),
        ({"tensor": ("x.self_attn.k_scale", "BF16")}, "scale_tensor"),
        ({"tensor": ("x.activation_scale", "F32")}, "scale_tensor"),
        ({"tensor": ("x.qscale_act", "F32")}, "scale_tensor"),
        ({"tensor": ("x.weight", "F8_E4M3")}, "fp8_tensor"),
        ({"tensor": ("e.down_proj_blocks", "U8")}, "packed_tensor"),
        ({"tensor": ("e.down_proj_scales", "U8")}, "scale_tensor"),
        ({"tensor": ("x.scale", "F8_E8M0")}, "scale_tensor"),
        ({"config": {"quantization_config": {}}}, "config_key"),
        ({"config": {"text_config": {"quantization_config": {}}}}, "config_key"),
        ({"config": {"compression_config": {}}}, "config_key"),
        ({"file": "hf_quant_config.json"}, "side_file"),
        ({"params": {"quantization": {}}}, "params_key"),
    ],
)
def test_leftovers_are_found(plant, kind):
    tensors = {"y.weight": ("BF16", "model.safetensors"), "norm.scale": ("BF16", "model.safetensors")}
    if "tensor" in plant:
        tensors[plant["tensor"][0]] = (plant["tensor"][1], "model.safetensors")
    found = dequantized_leftovers(
        tensors,
        plant.get("config", {"dtype": "bfloat16"}),
        [plant.get("file", "tokenizer.json")],
        plant.get("params"),
    )
    assert [x.kind for x in found] == [kind]
    assert (
        dequantized_leftovers(tensors if "tensor" not in plant else {"y.weight": ("BF16", "m")}, {}, []) == []
    )
