"""`fp8conv quantize --scheme`: every scheme in every layout a loader reads, checked against the real
consumers installed here: compressed-tensors (its presets, its MX scale rule, its decompressors) and
transformers (its quantizer's ue8m0 rule, loading and running the outputs on the CPU)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file
from fp8conv.cli import app
from fp8conv.kernels.reference import channel_quant_torch, mx_quant_torch, weight_quant_torch
from tests.conftest import tree_digest

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

runner = CliRunner()
LLAMA = "llama-tiny-bf16"
COMBOS = [
    ("fp8-block", "fp8"),
    ("fp8-block", "compressed-tensors"),
    ("fp8-channel", "compressed-tensors"),
    ("mxfp8", "fp8"),
    ("mxfp8", "compressed-tensors"),
]
PROMPT = torch.tensor([[1, 17, 42, 99, 123, 256, 300, 511, 7, 64]])
# Logits against the bf16 model (as in test_consumers.py): e4m3 weights carry ~3% relative error per
# matrix; compressed-tensors also quantizes activations on the fly (a second error of the same size).
LOGITS_REL_BOUND = {"fp8": 0.08, "compressed-tensors": 0.12}


def cli(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def load_model(path):
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits.float()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The llama sample quantized in each scheme and layout (once for the module)."""
    from tests.conftest import SAMPLES

    root = tmp_path_factory.mktemp("schemes")
    src = SAMPLES / LLAMA
    before = tree_digest(src)
    out = {}
    for scheme, fmt in COMBOS:
        dst = root / f"{scheme}-{fmt}"
        cli("quantize", src, dst, "--scheme", scheme, "--format", fmt, "-q")
        out[scheme, fmt] = dst
    assert tree_digest(src) == before
    return src, out


# ------------------------------------------------------------------------------- configs and names
def _preset_dump(preset: str, fmt: str, ignore: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    group = QuantizationScheme(targets=["Linear"], format=fmt, **PRESET_SCHEMES[preset])
    qc = QuantizationConfig(
        config_groups={"group_0": group},
        format=fmt,
        quantization_status="compressed",
        ignore=ignore,
    )
    return qc.model_dump(mode="json")


@pytest.mark.parametrize(
    "scheme,preset,fmt",
    [
        ("fp8-channel", "FP8_DYNAMIC", "float-quantized"),
        ("mxfp8", "MXFP8", "mxfp8-quantized"),
        ("fp8-block", "FP8_BLOCK", "float-quantized"),
    ],
)
def test_compressed_tensors_config_is_the_preset_field_by_field(outputs, scheme, preset, fmt):
    from compressed_tensors.quantization import QuantizationConfig

    _, out = outputs
    qc = json.loads((out[scheme, "compressed-tensors"] / "config.json").read_text())["quantization_config"]
    ours = QuantizationConfig.model_validate(qc).model_dump(mode="json")
    theirs = _preset_dump(preset, fmt, qc["ignore"])
    for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert ours[key] == theirs[key], key
    g, h = ours["config_groups"]["group_0"], theirs["config_groups"]["group_0"]
    assert set(g) == set(h)
    for part in ("targets", "format", "output_activations"):
        assert g[part] == h[part], part
    for part in ("weights", "input_activations"):
        for field, value in h[part].items():
            if field == "observer":  # the calibration observer: not stored by the preset dump
                continue
            assert g[part][field] == value, (part, field)


def test_mxfp8_fp8_config_is_transformers_mxfp8_bytes(outputs):
    _, out = outputs
    qc = json.loads((out["mxfp8", "fp8"] / "config.json").read_text())["quantization_config"]
    assert qc["weight_block_size"] == [1, 32] and qc["scale_fmt"] == "ue8m0" and qc["quant_method"] == "fp8"
    t = load_file(out["mxfp8", "fp8"] / "model.safetensors")
    w = "model.layers.0.mlp.down_proj.weight"
    assert t[w].dtype == torch.float8_e4m3fn
    assert t[w + "_scale_inv"].dtype == torch.uint8
    assert tuple(t[w + "_scale_inv"].shape) == (t[w].shape[0], t[w].shape[1] // 32)


def test_refused_pairs_and_options_say_why(sample, tmp_path):
    src = sample(LLAMA)
    r = cli("quantize", src, tmp_path / "x", "--scheme", "fp8-channel", "--format", "fp8", code=2)
    assert "FP8_DYNAMIC" in r.output and "--format compressed-tensors" in r.output
    r = cli("quantize", src, tmp_path / "x", "--scheme", "mxfp8", "--block-size", "64", code=2)
    assert "--block-size applies to --scheme fp8-block" in r.output
    r = cli("quantize", src, tmp_path / "x", "--scheme", "fp8-nope", code=2)
    assert "Invalid value for '--scheme'" in r.output and "fp8-channel" in r.output  # Typer's choices
    r = cli("quantize", src, tmp_path / "x", "--target", "tgi", code=2)
    assert "Invalid value for '--target'" in r.output and "sglang" in r.output
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the numbers, exactly
def test_codes_and_scales_are_the_schemes_formulas(outputs):
    src, out = outputs
    srcs = load_file(src / "model.safetensors")
    quantized = [k for k in srcs if k.endswith("_proj.weight")]
    for (scheme, fmt), dst in out.items():
        t = load_file(dst / "model.safetensors")
        suffix = "_scale_inv" if fmt == "fp8" else "_scale"
        assert set(t) == set(srcs) | {k + suffix for k in quantized}, (scheme, fmt)
        for k in quantized:
            if scheme == "fp8-block":
                q, s = weight_quant_torch(srcs[k])
            elif scheme == "fp8-channel":
                q, s = channel_quant_torch(srcs[k])
                assert tuple(s.shape) == (srcs[k].shape[0], 1)
            else:
                q, s = mx_quant_torch(srcs[k], "ceil" if fmt == "fp8" else "ct")
            assert torch.equal(t[k].view(torch.uint8), q.view(torch.uint8)), (scheme, fmt, k)
            assert torch.equal(t[k + suffix], s), (scheme, fmt, k)


def test_channel_quant_is_block_quant_with_one_row_tiles():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(96, 200, generator=g) * torch.logspace(-3, 3, 96).unsqueeze(1)).bfloat16()
    x[5] = 0
    q, s = channel_quant_torch(x)
    q2, s2 = weight_quant_torch(x, (1, 200))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def _mx_data() -> torch.Tensor:
    """Groups whose amax hits the rules' edges: zero, exactly 1.75 * 2**k (the tie where the two rules
    differ), just below, exact powers of two, tiny and huge magnitudes, then random data."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-6, 6, 64).unsqueeze(1)
    x[0, :32] = 0
    x[1, :32] = 0.01
    x[1, 5] = 1.75
    x[1, 40] = -1.75 * 2**-20
    x[2, 0:32] = 1.0
    x[2, 64] = 448.0
    x[2, 96] = 1.74
    x[3, :32] = 2.0**-125
    x[3, 32:64] = 3.0e30
    return x.bfloat16()


def test_mx_ct_rule_is_compressed_tensors_bit_for_bit():
    """The e8m0 bytes and the codes of compressed-tensors' own MXFP8 quantization: calculate_qparams
    (generate_mx_scales), compress_mx_scale, and the quantize() its compressor calls."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import MXFP8
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    x = _mx_data()
    args = MXFP8["weights"]
    groups = x.view(64, 8, 32)
    amax = groups.abs().amax(dim=-1)
    scale, zp = calculate_qparams(-amax, amax, args)
    theirs_e = compress_mx_scale(scale, torch.uint8)
    theirs_q = quantize(x, scale, zp, args, dtype=torch.float8_e4m3fn)
    q, e = mx_quant_torch(x, "ct")
    assert torch.equal(e, theirs_e)
    assert torch.equal(q.view(torch.uint8), theirs_q.view(torch.uint8))
    # the rules differ at the tie: amax = 1.75 in group (1, 0) takes 2**-7 here, 2**-8 under ceil
    _, e_ceil = mx_quant_torch(x, "ceil")
    assert int(e[1, 0]) == 120 and int(e_ceil[1, 0]) == 119


def test_mx_ceil_rule_is_transformers_ue8m0_quantizer():
    """transformers' Fp8Quantize with weight_block_size [1, 32] and scale_fmt ue8m0 (what it writes
    when it saves an MXFP8 model): the same codes and the same power-of-two scales."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    x = _mx_data()
    cfg = FineGrainedFP8Config(weight_block_size=[1, 32], scale_fmt="ue8m0")
    res = Fp8Quantize(SimpleNamespace(quantization_config=cfg)).convert({"a.weight": x})
    tq, ts = res["a.weight"], res["a.weight_scale_inv"]
    q, e = mx_quant_torch(x, "ceil")
    assert torch.equal(q.view(torch.uint8), tq.view(torch.uint8))
    assert torch.equal(e, ts.view(torch.uint8))


# ------------------------------------------------------------------------------------ the consumers
def _ct_decompress(dst) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompressor over the files, module by module."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    t = load_file(dst / "model.safetensors")
    out = {}
    for k in t:
        if k.endswith(".weight") and k + "_scale" in t:
            sd = comp.decompress({"weight": t[k], "weight_scale": t[k + "_scale"]}, scheme)
            out[k] = sd["weight"]
    return out


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-channel", "mxfp8"])
def test_compressed_tensors_decompresses_to_fp8conv_dequantize(outputs, tmp_path, scheme):
    _, out = outputs
    dst = out[scheme, "compressed-tensors"]
    theirs = _ct_decompress(dst)
    assert len(theirs) == 14
    for dtype in ("bf16", "fp32"):
        cli("dequantize", dst, tmp_path / dtype, "--dtype", dtype, "-q")
    ours = {d: load_file(tmp_path / d / "model.safetensors") for d in ("bf16", "fp32")}
    for k, v in theirs.items():
        # float32 scales decompress in float32, e8m0 ones in bf16 (decompress_mx_scale)
        want = ours["fp32" if v.dtype == torch.float32 else "bf16"][k]
        assert v.dtype == want.dtype and torch.equal(v, want), k
        assert torch.equal(v.bfloat16(), ours["bf16"][k]), k


@pytest.mark.parametrize("scheme,fmt", COMBOS)
def test_transformers_loads_and_runs_every_output(outputs, scheme, fmt):
    src, out = outputs
    ref = logits(load_model(src))
    got = logits(load_model(out[scheme, fmt]))
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < LOGITS_REL_BOUND[fmt], rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_fp8_layout_dequantizes_in_transformers_to_our_bytes(outputs, tmp_path):
    """transformers' own dequantization of the MXFP8 bytes (uint8 exponents) equals fp8conv's."""
    _, out = outputs
    dst = out["mxfp8", "fp8"]
    cli("dequantize", dst, tmp_path / "bf16", "-q")
    ours = load_file(tmp_path / "bf16" / "model.safetensors")
    theirs = load_model(dst).state_dict()
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k
