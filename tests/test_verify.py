"""`fp8conv verify`: good checkpoints pass; each planted fault fails with exit 1 and names its tensor/file.

Good checkpoints come from the real commands (quantize / dequantize of the bundled samples); each fault
is planted in a private copy. CPU only; the whole file runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv import DequantizeOptions, QuantizeOptions, dequantize, quantize
from fp8conv.checkpoint.layout import INDEX_NAME, SINGLE_NAME
from fp8conv.checkpoint.safetensors_io import load_file, read_header, save_file
from fp8conv.cli import app
from fp8conv.errors import UsageError
from fp8conv.kernels.reference import weight_quant_torch
from fp8conv.verify import VerifyOptions, verify_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
BF16 = SAMPLES / "llama-tiny-bf16"
LLAMA_FP8 = SAMPLES / "llama-tiny-fp8"
DS_FP8 = SAMPLES / "deepseek-tiny-fp8"
META = {"format": "pt"}
runner = CliRunner()

Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
GATE0 = "model.layers.0.mlp.gate_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Checkpoints made by the product's own commands, built once for the module."""
    root = tmp_path_factory.mktemp("good")
    for name, kw in (
        ("fp8", {}),
        ("ct", {"format": "compressed-tensors"}),
        ("fp8-ue8m0", {"scale_fmt": "ue8m0"}),
        ("ct-ue8m0", {"format": "compressed-tensors", "scale_fmt": "ue8m0"}),
    ):
        quantize(BF16, root / name, QuantizeOptions(device="cpu", **kw))
    dequantize(DS_FP8, root / "ds-bf16", DequantizeOptions(device="cpu"))
    dequantize(LLAMA_FP8, root / "llama-bf16", DequantizeOptions(device="cpu"))
    return root


def copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fp8conv"))
    return dst


_REPORTS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _report_dir(tmp_path_factory):
    """--json reports go to a tmp folder (never beside a bundled sample)."""
    _REPORTS[:] = [tmp_path_factory.mktemp("reports")]


def run(*args) -> tuple[int, dict | None, str]:
    """The CLI with --json to a file: (exit code, report, everything printed)."""
    args = [str(a) for a in args]
    target = _REPORTS[0] / f"report-{uuid.uuid4().hex}.json"
    r = runner.invoke(app, ["verify", *args, "--json", str(target)])
    report = json.loads(target.read_text()) if target.exists() else None
    return r.exit_code, report, r.output


def rec(report: dict, name: str) -> dict:
    return next(t for t in report["tensors"] if t["name"] == name)


def failed(report: dict, name: str) -> dict[str, str]:
    """{check: message} of the failing checks of tensor `name`."""
    return {k: c["message"] for k, c in rec(report, name)["checks"].items() if c["status"] == "fail"}


def failing_findings(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["status"] == "fail"]


def shard_of(ckpt: Path, tensor: str) -> Path:
    if (ckpt / INDEX_NAME).exists():
        return ckpt / json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][tensor]
    return ckpt / SINGLE_NAME


def edit(ckpt: Path, tensor: str, fn, index: bool = True) -> None:
    """Rewrite the shard holding `tensor` with fn(tensors) applied; keep the index in step."""
    path = shard_of(ckpt, tensor)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, META)
    idx = ckpt / INDEX_NAME
    if index and idx.exists():
        data = json.loads(idx.read_text())
        wm = {k: v for k, v in data["weight_map"].items() if v != path.name}
        wm.update({k: path.name for k in tensors})
        data["weight_map"] = dict(sorted(wm.items()))
        idx.write_text(json.dumps(data))


def poke(ckpt: Path, tensor: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a tensor in place (the file keeps its size and header)."""
    path = shard_of(ckpt, tensor)
    info = read_header(path).tensors[tensor]
    assert offset + len(data) <= info.nbytes
    with open(path, "r+b") as f:
        f.seek(info.start + offset)
        f.write(data)


def set_config(ckpt: Path, fn) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------ good checkpoints
@pytest.mark.parametrize("name", ["fp8", "ct", "fp8-ue8m0", "ct-ue8m0"])
def test_quantized_outputs_pass(good, name):
    code, report, out = run(good / name, "-q")
    assert code == 0, out
    assert report["ok"] and report["totals"]["fp8_weights"] == 14 == report["totals"]["selected"]
    assert report["format"] == ("compressed-tensors" if name.startswith("ct") else "fp8")
    for t in report["tensors"]:
        if t["role"] == "fp8_weight":
            assert t["checks"]["gemm"]["status"] == "pass"
            assert t["metrics"]["gemm_rel_err"] < t["metrics"]["gemm_bound"]

    code, report, out = run(good / name, "--reference", BF16, "--reference-mode", "statistical", "-q")
    assert code == 0, out
    fp8 = [t for t in report["tensors"] if t["role"] == "fp8_weight"]
    assert len(fp8) == 14
    for t in fp8:
        assert t["checks"]["reference"]["status"] == "pass"
        # e4m3 block quantization of Gaussian weights: ~31 dB; the default floor is 20 dB
        assert 28 < t["metrics"]["sqnr_db"] < 35, t
        assert t["metrics"]["min_tile_sqnr_db"] > 28
        assert t["metrics"]["max_tile_gain_dev"] < 5e-3
        assert t["metrics"]["output_cosine"] > 0.999
    code, report, out = run(good / name, "--reference", BF16, "-q")
    assert code == 0, out
    for t in [t for t in report["tensors"] if t["role"] == "fp8_weight"]:
        # an output fp8conv wrote: compared with an exact re-quantization of the original
        assert "bit-identical to an exact re-quantization" in t["checks"]["reference"]["message"]
    assert report["reference_mode"] == "exact"
    # every tensor that was not quantized is byte-compared with the original (a passing tensor that
    # no check flags gets no record: the report stays small on 10^6 tensors)
    assert report["totals"]["data_checked"] == 14 + 14 + 7  # FP8 weights, their scales, the rest
    assert not [t for t in report["tensors"] if t["role"] in ("weight", "other")]


@pytest.mark.parametrize("ckpt, ref", [("ds-bf16", DS_FP8), ("llama-bf16", LLAMA_FP8)])
def test_dequantized_outputs_pass(good, ckpt, ref):
    code, report, out = run(good / ckpt, "-q")
    assert code == 0, out
    assert report["format"] == "plain"
    code, report, out = run(good / ckpt, "--reference", ref, "-q")
    assert code == 0, out
    deq = [t for t in report["tensors"] if t["role"] == "dequantized_weight"]
    assert len(deq) == (4 if ckpt == "ds-bf16" else 14)
    assert all("bit-identical" in t["checks"]["reference"]["message"] for t in deq)
    assert all(t["metrics"]["mismatched_elements"] == 0 for t in deq)


@pytest.mark.parametrize("sample", [DS_FP8, LLAMA_FP8])
def test_bundled_fp8_samples_pass(sample):
    code, report, out = run(sample, "-q")
    assert code == 0, out
    if sample == LLAMA_FP8:  # quantized from the very tensors of llama-tiny-bf16
        code, report, out = run(sample, "--reference", BF16, "-q")
        assert code == 0, out
    else:  # no modules_to_not_convert in this config: a warning, not a failure
        assert any(
            f["status"] == "warn" and "modules_to_not_convert" in f["message"] for f in report["findings"]
        )


def test_stacked_experts_are_sampled(tmp_path):
    code, report, _ = run(DS_FP8, "--experts", "2", "-q")
    assert code == 0
    experts = rec(report, "model.layers.0.mlp.experts.gate_up_proj")
    assert experts["metrics"]["experts_checked"] == 2
    assert "2 of 4 experts" in experts["checks"]["gemm"]["message"]
    code, report, _ = run(DS_FP8, "--experts", "0", "-q")
    assert rec(report, "model.layers.0.mlp.experts.gate_up_proj")["metrics"]["experts_checked"] == 4


def test_table_and_summary_are_printed(good):
    r = runner.invoke(app, ["verify", str(good / "fp8")])
    assert r.exit_code == 0
    assert "all checks passed" in r.output and "down_proj" in r.output


# ------------------------------------------------------------------------------------ planted faults
def _square_scale_weight(ckpt: Path) -> tuple[str, torch.Tensor]:
    """The 256x256 weight whose 2x2 scale is least symmetric (so a transpose changes values)."""
    t = load_file(ckpt / SINGLE_NAME)
    best = max(
        (Q0, Q1, O0, "model.layers.1.self_attn.o_proj.weight"),
        key=lambda n: abs(float(t[n + "_scale_inv"][0, 1] / t[n + "_scale_inv"][1, 0]) - 1),
    )
    return best, t[best + "_scale_inv"]


def test_transposed_square_scale_needs_reference(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    name, s = _square_scale_weight(ckpt)
    assert abs(float(s[0, 1] / s[1, 0]) - 1) > 0.02  # the fault changes values
    edit(ckpt, name, lambda t: t.__setitem__(name + "_scale_inv", t[name + "_scale_inv"].t().contiguous()))
    code, report, _ = run(ckpt, "-q")
    assert code == 0  # same shape, finite, positive: only the original weights can tell
    code, report, out = run(ckpt, "--reference", BF16, "-q")
    assert code == 1
    msg = failed(report, name)["reference"]
    assert "tile (0, 1)" in msg or "tile (1, 0)" in msg
    assert name in out
    assert [t["name"] for t in report["tensors"] if not t["ok"]] == [name]
    assert report["tensors"][0]["name"] == name  # worst first


def test_transposed_nonsquare_scale_fails_by_shape(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    key = DOWN0 + "_scale_inv"  # 256x512 -> scale 2x4; transposed 4x2
    edit(ckpt, DOWN0, lambda t: t.__setitem__(key, t[key].t().contiguous()))
    code, report, out = run(ckpt, "-q")
    assert code == 1
    msg = failed(report, DOWN0)["scale"]
    assert "[4, 2]" in msg and "expected [2, 4]" in msg and key in msg
    assert DOWN0 in out


def test_one_tile_scale_doubled(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    key = GATE0 + "_scale_inv"  # 512x256: 4x2 tiles

    def double(t):
        t[key][2, 1] *= 2

    edit(ckpt, GATE0, double)
    assert run(ckpt, "-q")[0] == 0
    code, report, out = run(ckpt, "--reference", BF16, "--reference-mode", "statistical", "-q")
    assert code == 1 and report["reference_mode"] == "statistical"
    msg = failed(report, GATE0)["reference"]
    assert "tile (2, 1)" in msg and "gain 1.99" in msg
    assert rec(report, GATE0)["metrics"]["min_tile_sqnr_db"] < 1
    assert GATE0 in out
    code, report, out = run(ckpt, "--reference", BF16, "-q")
    assert code == 1 and report["reference_mode"] == "exact"
    msg = failed(report, GATE0)["reference"]
    assert "1 of 8 scale(s) differ, first at tile (2, 1)" in msg and "0 code" not in msg


def test_two_same_shaped_weights_swapped(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)

    def swap(t):
        for suffix in ("", "_scale_inv"):
            t[Q0 + suffix], t[Q1 + suffix] = t[Q1 + suffix], t[Q0 + suffix]

    edit(ckpt, Q0, swap)
    assert run(ckpt, "-q")[0] == 0  # every tensor is a valid FP8 weight on its own
    code, report, _ = run(ckpt, "--reference", BF16, "-q")
    assert code == 1
    for n in (Q0, Q1):
        assert "SQNR" in failed(report, n)["reference"]
        assert rec(report, n)["metrics"]["sqnr_db"] < 0
    assert {t["name"] for t in report["tensors"] if not t["ok"]} == {Q0, Q1}


@pytest.mark.parametrize("layout", ["fp8", "ct"])
def test_nan_code(good, tmp_path, layout):
    ckpt = copy(good / layout, tmp_path)
    poke(ckpt, UP1, 300, b"\xff")  # e4m3 NaN (-NaN): row 1, column 44
    code, report, out = run(ckpt, "-q")
    assert code == 1
    bad = failed(report, UP1)
    assert "1 NaN code(s); first at (1, 44) = 0xFF" in bad["nan_codes"]
    assert "NaN/Inf" in bad["gemm"]
    assert UP1 in out


def test_zeroed_scale_bytes(good, tmp_path):
    """Zeroed bytes inside a scale: scale_values fails (a zero scale), without any reference."""
    ckpt = copy(good / "fp8", tmp_path)
    poke(ckpt, K0 + "_scale_inv", 4, bytes(4))  # second of the 1x2 scales := 0.0
    code, report, out = run(ckpt, "-q")
    assert code == 1
    assert "zero or negative; first at tile (0, 1) = 0.0" in failed(report, K0)["scale_values"]
    assert K0 in out


def test_zeroed_weight_bytes_need_reference(good, tmp_path):
    """Zeroed codes are valid FP8 zeros: the numbers alone pass; the shard's recorded checksum and
    --reference (tile SQNR and gain, or the exact re-quantization) catch them."""
    ckpt = copy(good / "fp8", tmp_path)
    poke(ckpt, O0, 128 * 256, bytes(64 * 256))  # rows 128..191 of 256x256 := 0
    code, report, out = run(ckpt, "-q")
    assert code == 1 and "content differs from the checksum fp8conv recorded" in out
    assert failed(report, O0) == {}  # no numeric check of the tensor itself fails
    code, report, _ = run(ckpt, "--reference", BF16, "--reference-mode", "statistical", "-q")
    assert code == 1
    msg = failed(report, O0)["reference"]
    assert "tile (1, " in msg and "SQNR" in msg
    code, report, _ = run(ckpt, "--reference", BF16, "-q")
    assert code == 1
    msg = failed(report, O0)["reference"]
    assert "16384 of 65536 code(s) differ, first at (128, 0)" in msg


def test_missing_scale(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    edit(ckpt, UP0, lambda t: t.pop(UP0 + "_scale_inv"))
    code, report, out = run(ckpt, "-q")
    assert code == 1
    assert "no scale" in failed(report, UP0)["scale"]
    assert UP0 in out


def test_missing_scale_still_in_index(tmp_path):
    """The index still names the scale, the shard lost it: open_checkpoint refuses; verify reports."""
    ckpt = copy(LLAMA_FP8, tmp_path)
    edit(ckpt, UP1, lambda t: t.pop(UP1 + "_scale_inv"), index=False)
    code, report, out = run(ckpt, "-q")
    assert code == 1
    assert any(
        f["tensor"] == UP1 + "_scale_inv" and "does not hold it" in f["message"]
        for f in failing_findings(report)
    )
    assert "no scale" in failed(report, UP1)["scale"]


def test_truncated_shard(tmp_path):
    ckpt = copy(LLAMA_FP8, tmp_path)
    path = ckpt / "model-00002-of-00002.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    code, report, out = run(ckpt, "-q")
    assert code == 1
    bad = failing_findings(report)
    assert any(f["file"] == str(path) and "truncated" in f["message"] for f in bad)
    assert "model-00002-of-00002.safetensors" in out
    # what is readable is still checked
    assert rec(report, Q0)["ok"] and rec(report, Q0)["checks"]["gemm"]["status"] == "pass"


def test_truncated_single_file(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    with open(ckpt / SINGLE_NAME, "r+b") as f:
        f.truncate(100_000)
    code, report, out = run(ckpt, "-q")
    assert code == 1
    assert any(f["file"] == str(ckpt / SINGLE_NAME) for f in failing_findings(report))


@pytest.mark.parametrize("nested", [False, True])
def test_leftover_quantization_config(good, tmp_path, nested):
    ckpt = copy(good / "llama-bf16", tmp_path)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}

    def add(cfg):
        if nested:
            cfg["text_config"] = {"quantization_config": qc}
        else:
            cfg["quantization_config"] = qc

    set_config(ckpt, add)
    code, report, out = run(ckpt, "-q")
    assert code == 1
    [f] = failing_findings(report)
    assert f["file"] == str(ckpt / "config.json")
    assert ("text_config.quantization_config" if nested else "quantization_config") in f["message"]
    assert report["format"] == "plain-with-quantization-config"


def test_fp8_tensor_left_in_bf16_checkpoint(good, tmp_path):
    ckpt = copy(good / "llama-bf16", tmp_path)
    edit(ckpt, UP0, lambda t: t.__setitem__(UP0, weight_quant_torch(t[UP0].float())[0]))
    code, report, out = run(ckpt, "-q")
    assert code == 1
    bad = failed(report, UP0)
    assert "no quantization_config" in bad["format"] and "no scale" in bad["scale"]
    assert any(UP0 in f["message"] for f in failing_findings(report))
    code, report, _ = run(ckpt, "--reference", LLAMA_FP8, "-q")
    assert code == 1 and not rec(report, UP0)["ok"]


def test_orphan_scale_in_dequantized_checkpoint(good, tmp_path):
    ckpt = copy(good / "llama-bf16", tmp_path)
    name = UP0 + "_scale_inv"
    edit(ckpt, UP0, lambda t: t.__setitem__(name, torch.ones(4, 2)))
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "keeps no scale" in failed(report, name)["orphan"]


def test_shard_missing_from_disk(good, tmp_path):
    ckpt = copy(good / "ds-bf16", tmp_path)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    code, report, out = run(ckpt, "-q")
    assert code == 1
    [f] = [f for f in failing_findings(report) if "missing from disk" in f["message"]]
    assert f["file"] == str(ckpt / "model-00002-of-00003.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in f["message"]
    assert "model-00002-of-00003.safetensors" in out


def test_scale_in_missing_shard(tmp_path):
    """DeepSeek layout: down_proj's scale lives in shard 2; without shard 2 the weight is named."""
    ckpt = copy(DS_FP8, tmp_path)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "cannot be read" in failed(report, "model.layers.0.mlp.down_proj.weight")["scale"]


def test_dequantized_weight_differs_from_source(good, tmp_path):
    ckpt = copy(good / "llama-bf16", tmp_path)

    def nudge(t):
        w = t[DOWN0].view(torch.int16)
        w[3, 7] += 1  # one ulp of one element

    edit(ckpt, DOWN0, nudge)
    assert run(ckpt, "-q")[0] == 0
    code, report, _ = run(ckpt, "--reference", LLAMA_FP8, "-q")
    assert code == 1
    assert "1 of 131072 element(s) differ" in failed(report, DOWN0)["reference"]
    assert "(3, 7)" in failed(report, DOWN0)["reference"]


def test_copied_tensor_differs_from_source(good, tmp_path):
    ckpt = copy(good / "llama-bf16", tmp_path)
    poke(ckpt, "model.norm.weight", 10, b"\x00\x00")
    code, report, _ = run(ckpt, "--reference", LLAMA_FP8, "-q")
    assert code == 1
    assert "differ from the reference" in failed(report, "model.norm.weight")["reference"]


def test_tensor_missing_compared_with_reference(good, tmp_path):
    ckpt = copy(good / "llama-bf16", tmp_path)
    edit(ckpt, "model.norm.weight", lambda t: t.pop("model.norm.weight"))
    code, report, _ = run(ckpt, "--reference", LLAMA_FP8, "-q")
    assert code == 1
    assert any(
        f["tensor"] == "model.norm.weight" and "missing" in f["message"] for f in failing_findings(report)
    )


def test_mixed_scale_names(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    edit(ckpt, K0, lambda t: t.__setitem__(K0 + "_scale", t.pop(K0 + "_scale_inv")))
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "mixed scale names" in failed(report, K0)["scale"]
    assert [t["name"] for t in report["tensors"] if not t["ok"]] == [K0]


def test_fp8_weight_in_skip_list(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    set_config(
        ckpt,
        lambda c: c["quantization_config"]["modules_to_not_convert"].append(
            "model.layers.0.self_attn.q_proj"
        ),
    )
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "modules_to_not_convert" in failed(report, Q0)["ignore_list"]
    assert not failed(report, Q1)  # a boundary match: layers.0.self_attn.q_proj only


def test_unquantized_linear_not_in_ignore_list(good, tmp_path):
    ckpt = copy(good / "ct", tmp_path)
    set_config(ckpt, lambda c: c["quantization_config"]["ignore"].remove("lm_head"))
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "not in ignore" in failed(report, "lm_head.weight")["ignore_list"]
    # the fp8 layout: transformers < 5 adds lm_head itself, so only a warning
    ckpt = copy(good / "fp8", tmp_path, "fp8")
    set_config(ckpt, lambda c: c["quantization_config"]["modules_to_not_convert"].remove("lm_head"))
    code, report, _ = run(ckpt, "-q")
    assert code == 0 and rec(report, "lm_head.weight")["status"] == "warn"


def test_config_block_disagrees_with_scales(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    set_config(ckpt, lambda c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]))
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "64x64" in failed(report, Q0)["scale"]


def test_ue8m0_config_with_float_scales(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    set_config(ckpt, lambda c: c["quantization_config"].__setitem__("scale_fmt", "ue8m0"))
    code, report, _ = run(ckpt, "-q")
    assert code == 1
    assert "not a power of two" in failed(report, Q0)["scale_values"]


def test_gemm_check_catches_a_wrong_kernel(good, monkeypatch):
    import fp8conv.verify.numerics as v

    real = v.fp8_gemm
    monkeypatch.setattr(v, "fp8_gemm", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    report = verify_checkpoint(good / "fp8", VerifyOptions(device="cpu", tensors=(Q0,)))
    assert not report.ok
    assert "exceeds the bound" in rec(report.to_dict(), Q0)["checks"]["gemm"]["message"]
    monkeypatch.setattr(v, "fp8_gemm", lambda *a, **k: real(*a, **k) * float("nan"))
    report = verify_checkpoint(good / "fp8", VerifyOptions(device="cpu", tensors=(Q0,)))
    assert "NaN/Inf" in rec(report.to_dict(), Q0)["checks"]["gemm"]["message"]


# --------------------------------------------------------------------------------------- selection
def test_tensors_filter(good):
    code, report, _ = run(good / "fp8", "--tensors", "*q_proj*", "--tensors", r"re:layers\.1\.mlp\.up", "-q")
    assert code == 0
    chosen = {t["name"] for t in report["tensors"] if t["selected"]}
    assert chosen == {Q0, Q1, UP1}
    assert report["totals"]["selected"] == 3
    other = rec(report, K0)
    assert not other["selected"] and "gemm" not in other["checks"] and "scale" in other["checks"]


def test_sample_is_seeded(good):
    picks = []
    for seed in (1, 1, 2):
        code, report, _ = run(good / "fp8", "--sample", "3", "--seed", seed, "-q")
        assert code == 0 and report["totals"]["selected"] == 3
        picks.append({t["name"] for t in report["tensors"] if t["selected"]})
    assert picks[0] == picks[1]
    assert len(picks[0]) == 3


def test_data_faults_outside_the_selection_are_not_read_but_structure_is(good, tmp_path):
    ckpt = copy(good / "fp8", tmp_path)
    poke(ckpt, UP1, 0, b"\x7f")
    assert run(ckpt, "--tensors", "*q_proj*", "-q")[0] == 0
    assert run(ckpt, "--tensors", UP1, "-q")[0] == 1
    edit(ckpt, K0, lambda t: t.pop(K0 + "_scale_inv"))
    code, report, _ = run(ckpt, "--tensors", "*q_proj*", "-q")
    assert code == 1 and "no scale" in failed(report, K0)["scale"]


# ---------------------------------------------------------------------------------- usage and input
@pytest.mark.parametrize(
    "args",
    [
        ["--rows", "0"],
        ["--sample", "0"],
        ["--device", "cuda"],
        ["--device", "tpu"],
        ["--tensors", "nothing*"],
        ["--min-sqnr", "nan"],
        ["--tensors", "re:("],
    ],
)
def test_bad_options_exit_2(good, args):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = runner.invoke(app, ["verify", str(good / "fp8"), *args])
    assert r.exit_code == 2, r.output


def test_not_a_checkpoint_exit_3(tmp_path, good):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for p in (tmp_path / "empty", tmp_path / "file", tmp_path / "nowhere"):
        r = runner.invoke(app, ["verify", str(p)])
        assert r.exit_code == 3, r.output
    r = runner.invoke(app, ["verify", str(good / "fp8"), "--reference", str(tmp_path / "empty")])
    assert r.exit_code == 3 and "--reference" in r.output


def test_options_are_frozen_and_validated():
    opts = VerifyOptions(tensors="*q_proj*", reference=Path("x"))
    assert opts.tensors == ("*q_proj*",) and opts.reference == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rows = 3
    for bad in (
        {"rows": 0},
        {"sample": 0},
        {"seed": -1},
        {"min_sqnr": float("inf")},
        {"experts": -1},
        {"device": "gpu"},
        {"tensors": ("re:[",)},
    ):
        with pytest.raises(UsageError):
            VerifyOptions(**bad)


# --------------------------------------------------------------------------------------- JSON schema
# The schema docs/verify.md documents: field -> type (tuple = any of); "num" is a number or one of
# the strings "inf", "-inf", "nan".
NUM = "num"
REPORT = {
    "schema_version": int,  # added by the CLI to every JSON document it writes (docs/api.md)
    "ok": bool,
    "command": str,
    "path": str,
    "format": str,
    "description": str,
    "reference": (str, type(None)),
    "reference_format": (str, type(None)),
    "reference_mode": (str, type(None)),
    "device": str,
    "device_note": (str, type(None)),
    "options": dict,
    "bounds": dict,
    "totals": dict,
    "seconds": NUM,
    "findings": list,
    "tensors": list,
}
OPTIONS = {
    "reference": (str, type(None)),
    "tensors": list,
    "sample": (int, type(None)),
    "rows": int,
    "seed": int,
    "min_sqnr": NUM,
    "device": str,
    "experts": int,
    "reference_mode": str,
    "tp": list,
    "ep": bool,
    "targets": (list, type(None)),
    "blackwell": bool,
}
BOUNDS = {"gemm_rule": str, "min_sqnr_db": NUM, "tile_gain_tol": NUM}
TOTALS = {
    k: int
    for k in (
        "tensors",
        "unreadable_tensors",
        "fp8_weights",
        "selected",
        "data_checked",
        "records",
        "failed_tensors",
        "warned_tensors",
        "failed_checks",
        "file_failures",
        "file_warnings",
        "bytes_read",
    )
}
FINDING = {
    "check": str,
    "status": str,
    "message": str,
    "file": (str, type(None)),
    "tensor": (str, type(None)),
}
TENSOR = {
    "name": str,
    "file": (str, type(None)),
    "shape": list,
    "dtype": str,
    "role": str,
    "selected": bool,
    "status": str,
    "ok": bool,
    "checks": dict,
    "metrics": dict,
}
METRICS = {
    "scale": str,
    "block": str,
    "scale_min": NUM,
    "scale_max": NUM,
    "nan_codes": int,
    "gemm_rel_err": NUM,
    "gemm_bound": NUM,
    "experts_checked": int,
    "sqnr_db": NUM,
    "min_tile_sqnr_db": NUM,
    "max_tile_gain_dev": NUM,
    "output_cosine": NUM,
    "mismatched_elements": int,
    "max_abs_diff": NUM,
    "non_finite": int,
}
CHECK_NAMES = {
    "format",
    "scale",
    "ignore_list",
    "orphan",
    "scale_values",
    "nan_codes",
    "gemm",
    "reference",
    "finite",
}


def _is(value, typ) -> bool:
    if isinstance(typ, tuple):
        return any(_is(value, t) for t in typ)
    if typ == NUM:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ) or value in ("inf", "-inf", "nan")
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _conforms(obj: dict, schema: dict, exact: bool = True) -> None:
    if exact:
        assert set(obj) == set(schema), set(obj) ^ set(schema)
    for k, v in obj.items():
        assert k in schema, k
        assert _is(v, schema[k]), (k, v)


def check_schema(report: dict) -> None:
    _conforms(report, REPORT)
    _conforms(report["options"], OPTIONS)
    _conforms(report["bounds"], BOUNDS)
    _conforms(report["totals"], TOTALS)
    for f in report["findings"]:
        _conforms(f, FINDING)
        assert f["status"] in ("fail", "warn")
    for t in report["tensors"]:
        _conforms(t, TENSOR)
        assert t["role"] in ("fp8_weight", "dequantized_weight", "scale", "weight", "other")
        assert t["status"] in ("pass", "fail", "warn", "skip")
        assert all(isinstance(d, int) for d in t["shape"])
        for name, c in t["checks"].items():
            assert name in CHECK_NAMES
            _conforms(c, {"status": str, "message": str})
            assert c["status"] in ("pass", "fail", "warn", "skip")
        _conforms(t["metrics"], METRICS, exact=False)


def test_json_report_matches_documented_schema(good, tmp_path):
    for args in (
        [good / "fp8", "--reference", BF16],
        [good / "llama-bf16", "--reference", LLAMA_FP8],
        [DS_FP8],
        [good / "llama-bf16"],
    ):
        code, report, _ = run(*args, "-q")
        assert code == 0
        check_schema(report)
    ckpt = copy(good / "fp8", tmp_path)
    poke(ckpt, O0, 0, bytes(128 * 256))  # a zeroed tile: min tile SQNR 0 dB, gain 0
    poke(ckpt, UP1, 0, b"\x7f")
    (ckpt / "stray.safetensors").write_bytes(b"")
    code, report, _ = run(ckpt, "--reference", BF16, "-q")
    assert code == 1
    check_schema(report)
    assert failing_findings(report)
    json.dumps(report, allow_nan=False)  # strict JSON
    # stdout carries only the JSON with --json -
    r = runner.invoke(app, ["verify", str(good / "fp8"), "--json", "-"])
    assert r.exit_code == 0
    check_schema(json.loads(r.stdout))


def test_broken_index_and_stray_shard_are_named(tmp_path):
    ckpt = copy(LLAMA_FP8, tmp_path)
    (ckpt / "model-00009-of-00009.safetensors").write_bytes(b"")
    code, report, out = run(ckpt, "-q")
    assert code == 1
    assert any(
        f["file"] == str(ckpt / "model-00009-of-00009.safetensors") and "stray" in f["message"]
        for f in failing_findings(report)
    )
    (ckpt / INDEX_NAME).write_text("{not json")
    code, report, out = run(ckpt, "-q")
    assert code == 1
    assert any(
        f["file"] == str(ckpt / INDEX_NAME) and "not valid JSON" in f["message"]
        for f in failing_findings(report)
    )


def test_table_reads_at_80_columns(good):
    """At 80 columns every row fits, names keep their layer numbers, and a failure's message stays
    whole in one cell (no column squeezed to a few characters)."""
    import io

    from rich.console import Console

    from fp8conv.verify.verify import render_table

    report = verify_checkpoint(good / "fp8", VerifyOptions(reference=str(BF16), device="cpu"))
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render_table(report, width=80))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…layers.0." in text and "…layers.1." in text
    wide = Console(width=160, record=True, file=io.StringIO())
    wide.print(render_table(report, width=160))
    assert "model.layers.0.mlp.down_proj.weight" in wide.export_text()
