"""`fp8conv convert --target`: from a block-FP8 Llama whose intermediate size is 8640 (ragged 128 x 128
tiles), exactly the weights the target loader cannot load or run in the output are written bf16, with
the bytes `fp8conv dequantize` writes for them, their scales dropped and their modules in the config's
skip list; the dry-run plan and the --json summary name them and say why; transformers loads and runs
what the transformers target writes, and compressed-tensors reads the compressed-tensors output."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fp8conv.checkpoint.safetensors_io import load_file
from tests.test_schemes_targets import ATTN, MLP, PROMPT, cli, model8640  # noqa: F401 (a fixture)

transformers = pytest.importorskip("transformers")

LAYER = "model.layers.0."


def full(name: str) -> str:
    return LAYER + ("mlp." if name in MLP else "self_attn.") + name + ".weight"


@pytest.fixture(scope="module")
def fp8_8640(model8640, tmp_path_factory):  # noqa: F811
    """The default (--target any) block-FP8 quantization: every linear FP8, ragged tiles included."""
    dst = tmp_path_factory.mktemp("fp8-8640") / "fp8"
    cli("quantize", model8640, dst, "-q")
    return dst


@pytest.fixture(scope="module")
def dequantized(fp8_8640, tmp_path_factory):
    dst = tmp_path_factory.mktemp("deq-8640") / "bf16"
    cli("dequantize", fp8_8640, dst, "-q")
    return load_file(dst / "model.safetensors")


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in `folder`."""
    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def plan(src, *args) -> dict:
    r = cli("convert", src, src.parent / "never-written", "--dry-run", "--json", "-", *args)
    assert not (src.parent / "never-written").exists()
    return json.loads(r.stdout)


def kept_of(report: dict) -> dict[str, str]:
    """Short projection name -> `how` of every weight the report says was kept bf16."""
    return {
        r["tensor"].split(".")[-2]: r["how"] for r in report["tensors"] if r["how"].startswith("kept bf16")
    }


def exact_fp8(q: torch.Tensor, s: torch.Tensor, tile=(128, 128)) -> torch.Tensor:
    """codes x scales in float64 (exact: 4 significant bits times 24), cropped to the weight."""
    m, n = q.shape
    big = s.double().repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:m, :n]
    return q.double() * big


def check_kept(out, src, dequantized, names, report) -> None:
    """The kept weights: bf16, dequantize's bytes, no scale, the FP8 source's values to bf16 rounding,
    `lossless` as measured against those values; the others FP8 with a scale."""
    t, s = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    rows = {r["tensor"]: r for r in report["tensors"]}
    for name in MLP + ATTN:
        w = full(name)
        if name in names:
            assert t[w].dtype == torch.bfloat16, w
            assert torch.equal(t[w].view(torch.uint8), dequantized[w].view(torch.uint8)), w
            assert not any(k.startswith(w[: -len("weight")] + "weight_scale") for k in t), w
            exact = exact_fp8(s[w], s[w + "_scale_inv"])
            assert torch.equal(t[w].double(), exact.bfloat16().double())  # round to nearest, once
            assert rows[w]["lossless"] is torch.equal(t[w].double(), exact), w
            assert rows[w]["sqnr_db"] is not None and rows[w]["sqnr_db"] > 40, rows[w]
        else:
            assert t[w].dtype == torch.float8_e4m3fn, w
            assert rows[w]["how"] == "relayout" and rows[w]["lossless"] is True, w


def logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)(PROMPT).logits.float()


def test_transformers_target_writes_ragged_mlp_bf16_and_loads(model8640, fp8_8640, dequantized, tmp_path):  # noqa: F811
    p = plan(fp8_8640, "--target", "transformers")
    kept = kept_of(p)
    assert set(kept) == set(MLP)  # q/k/v/o are 128-multiples: relayout, FP8
    assert all("transformers: ragged tiles: Weight shape" in how for how in kept.values()), kept
    assert set(p["kept_bf16"]) == {full(n) for n in MLP}
    assert {full(n)[: -len(".weight")] for n in MLP} <= set(p["modules_to_not_convert"])
    assert any(n.startswith("--target transformers: kept bf16") and "down_proj" in n for n in p["notes"])
    assert p["lossless"] is False  # not known before the bf16 values are written

    out = tmp_path / "tf"
    r = cli("convert", fp8_8640, out, "--target", "transformers", "--json", tmp_path / "s.json")
    assert "kept bf16" in r.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert set(kept_of(report)) == set(MLP)
    assert any("--target transformers: kept bf16" in n for n in report["notes"])
    check_kept(out, fp8_8640, dequantized, MLP, report)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {full(n)[: -len(".weight")] for n in MLP} <= set(qc["modules_to_not_convert"])
    assert qc["quant_method"] == "fp8"

    # transformers loads it and runs it on the CPU; the FP8 source itself does not load there
    ref = logits(model8640)
    rel = float((logits(out) - ref).norm() / ref.norm())
    assert 0 < rel < 0.08, rel
    with pytest.raises(Exception, match="issues during automatic conversion of the weights"):
        logits(fp8_8640)


def test_compressed_tensors_for_vllm_writes_k8640_and_fused_gate_up_bf16(
    model8640,  # noqa: F811
    fp8_8640,
    dequantized,
    tmp_path,
):
    """vLLM reads the compressed-tensors layout's ragged rows (it pads), but down_proj's K = 8640 breaks
    its per-token-group activation quantization (group 128), and gate/up, one merged layer whose 8640-row
    parts do not divide by block_n, break validate_fp8_block_shape (vllm
    model_executor/layers/quantization/utils/fp8_utils.py @007d50058a06dec0f82472d63c819244d460c40d)."""
    pytest.importorskip("compressed_tensors")
    p = plan(fp8_8640, "--format", "compressed-tensors", "--target", "vllm")
    kept = kept_of(p)
    assert set(kept) == set(MLP)
    assert "vllm: activation group: input size K = 8640" in kept["down_proj"]
    assert "activation group 128" in kept["down_proj"]
    assert "block_n" in kept["gate_proj"] and kept["gate_proj"] == kept["up_proj"]

    out = tmp_path / "ct"
    cli(
        "convert",
        fp8_8640,
        out,
        "--format",
        "compressed-tensors",
        "--target",
        "vllm",
        "-q",
        "--json",
        tmp_path / "s.json",
    )
    report = json.loads((tmp_path / "s.json").read_text())
    assert set(kept_of(report)) == set(MLP)
    check_kept(out, fp8_8640, dequantized, MLP, report)

    # compressed-tensors' own settings and decompressor read it: the kept modules in `ignore`, every
    # FP8 weight decompressed to fp8conv's float32 dequantization of the same file
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {full(n)[: -len(".weight")] for n in MLP} <= set(qc["ignore"])
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    t = load_file(out / "model.safetensors")
    back = tmp_path / "back"
    cli("dequantize", out, back, "--dtype", "fp32", "-q")
    ours = load_file(back / "model.safetensors")
    fp8 = [k for k in t if k + "_scale" in t]
    assert sorted(fp8) == sorted(full(n) for n in ATTN)
    for k in fp8:
        theirs = comp.decompress({"weight": t[k], "weight_scale": t[k + "_scale"]}, scheme)["weight"]
        assert torch.equal(theirs, ours[k]), k
    for n in MLP:  # a bf16 tensor in the output stays as written through a dequantize
        assert torch.equal(ours[full(n)], t[full(n)].float())

    # and transformers, through compressed-tensors, loads and runs it on the CPU
    ref = logits(model8640)
    rel = float((logits(out) - ref).norm() / ref.norm())
    assert 0 < rel < 0.12, rel


def test_any_target_keeps_every_weight_fp8_and_says_who_would_refuse(fp8_8640, tmp_path):
    p = plan(fp8_8640)
    assert kept_of(p) == {} and p["kept_bf16"] == {} and p["lossless"] is True
    for loader in ("transformers", "vllm", "sglang"):
        assert any(n.startswith(f"{loader} cannot load or run") and "down_proj" in n for n in p["notes"]), (
            loader
        )
    assert any("ragged tiles" in n for n in p["notes"] if n.startswith("transformers"))
    out = tmp_path / "any"
    cli("convert", fp8_8640, out, "--format", "compressed-tensors", "-q", "--json", tmp_path / "s.json")
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["lossless"] is True and all(r["how"] == "relayout" for r in report["tensors"])
    assert any(n.startswith("vllm cannot load or run") for n in report["notes"])
    t = load_file(out / "model.safetensors")
    assert all(t[full(n)].dtype == torch.float8_e4m3fn for n in MLP + ATTN)


def test_sglang_dry_run_names_each_rule(fp8_8640):
    r = cli("convert", fp8_8640, fp8_8640.parent / "never-written", "--target", "sglang", "--dry-run")
    assert not (fp8_8640.parent / "never-written").exists()
    said = " ".join(r.output.split())  # the headline wraps at the console's width
    assert "3 kept bf16, each with its reason below" in said
    for name in MLP:
        assert f"{full(name)}: kept bf16: sglang:" in r.output


def test_a_target_that_leaves_nothing_fp8_is_refused(tmp_path):
    """Every linear ragged for transformers: nothing would stay FP8; exit 3, nothing written."""
    from fp8conv.checkpoint.safetensors_io import save_file

    src = tmp_path / "bf16"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {"model.layers.0.mlp.down_proj.weight": torch.randn(200, 300, generator=g).bfloat16()},
        src / "model.safetensors",
        {"format": "pt"},
    )
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cli("quantize", src, tmp_path / "fp8", "-q")
    r = cli("convert", tmp_path / "fp8", tmp_path / "out", "--target", "transformers", code=3)
    assert "every FP8 weight would be written bf16" in r.output and "ragged tiles" in r.output
    assert not (tmp_path / "out").exists()


def test_power_of_two_scales_are_kept_bf16_exactly(model8640, tmp_path):  # noqa: F811
    """codes x 2^k has 4 significant bits: bf16 holds it exactly, and the report says lossless."""
    src = tmp_path / "ue8m0"
    cli("quantize", model8640, src, "--scale-fmt", "ue8m0", "-q")
    out = tmp_path / "tf"
    r = cli("convert", src, out, "--target", "transformers", "--json", tmp_path / "s.json")
    report = json.loads((tmp_path / "s.json").read_text())
    assert set(kept_of(report)) == set(MLP)
    assert report["lossless"] is True
    assert "lossless: the bf16 values equal the FP8 ones" in r.output
    assert "(3 of them as bf16)" in r.output
    t, s = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    for name in MLP:
        w = full(name)
        assert torch.equal(t[w].double(), exact_fp8(s[w], s[w + "_scale_inv"])), w


def test_verify_asks_the_same_rule_and_passes_what_convert_wrote(fp8_8640, tmp_path):
    """verify's loader check and convert's plan ask one per-weight rule: verify names on the --target any
    output exactly the weights convert --target keeps bf16 for that rule, and passes convert's output."""
    from fp8conv.targets import serving_report

    def failing(path, target, rule):
        report = serving_report(path, (1,), targets=(target,))
        return report, {f.tensor for f in report.loaders[0].findings if f.rule == rule}

    _, ragged = failing(fp8_8640, "transformers", "ragged tiles")
    assert ragged == set(plan(fp8_8640, "--target", "transformers")["kept_bf16"])
    out = tmp_path / "tf"
    cli("convert", fp8_8640, out, "--target", "transformers", "-q")
    report, ragged = failing(out, "transformers", "ragged tiles")
    assert ragged == set() and report.ok and report.loaders[0].loads

    ct = tmp_path / "ct"
    cli("convert", fp8_8640, ct, "--format", "compressed-tensors", "-q")
    _, groups = failing(ct, "transformers", "activation group")
    kept = plan(fp8_8640, "--format", "compressed-tensors", "--target", "transformers")["kept_bf16"]
    assert groups == set(kept) == {full("down_proj")}
    assert "activation group 128" in kept[full("down_proj")]
    out = tmp_path / "ct-vllm"
    cli("convert", fp8_8640, out, "--format", "compressed-tensors", "--target", "vllm", "-q")
    report = serving_report(out, (1,), targets=("vllm", "transformers", "compressed-tensors"))
    assert report.ok, report.to_dict()


def test_stacked_experts_kept_bf16_are_skipped_by_their_module(sample, tmp_path):
    """DeepSeek-style sample: transformers v5 fused `experts.gate_up_proj` [4, 256, 320] has K = 320,
    which vLLM's activation groups of 128 refuse: written bf16 (dequantize's bytes), its module
    `...mlp.experts` in modules_to_not_convert (the parameter name is not a module's)."""
    src = sample("deepseek-tiny-fp8")
    out = tmp_path / "vllm"
    cli("convert", src, out, "--target", "vllm", "-q", "--json", tmp_path / "s.json")
    report = json.loads((tmp_path / "s.json").read_text())
    stacked = "model.layers.0.mlp.experts.gate_up_proj"
    kept = {r["tensor"] for r in report["tensors"] if r["how"].startswith("kept bf16")}
    assert stacked in kept and "model.layers.0.self_attn.o_proj.weight" not in kept
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.experts" in qc["modules_to_not_convert"]
    cli("dequantize", src, tmp_path / "bf16", "-q")
    ours, theirs = folder_tensors(out), folder_tensors(tmp_path / "bf16")
    for name in kept:
        assert ours[name].dtype == torch.bfloat16, name
        assert torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)), name
        assert name + "_scale_inv" not in ours and name[: -len("weight")] + "weight_scale_inv" not in ours


def test_mxfp8_keeps_bf16_a_weight_whose_k_is_not_a_multiple_of_32(sample, tmp_path):
    """`--scheme mxfp8` on the DeepSeek-style sample: down_proj [256, 300] cannot be cut into 1 x 32
    groups, so it is written bf16 (dequantize's bytes), named in the skip list and the report, as
    quantize leaves such a weight; the other weights become MXFP8, and the output dequantizes."""
    src = sample("deepseek-tiny-fp8")
    out = tmp_path / "mx"
    cli("convert", src, out, "--scheme", "mxfp8", "-q", "--json", tmp_path / "s.json")
    report = json.loads((tmp_path / "s.json").read_text())
    down = "model.layers.0.mlp.down_proj.weight"
    hows = {r["tensor"]: r["how"] for r in report["tensors"]}
    assert hows[down] == "kept bf16: K = 300 is not a multiple of 32 (MXFP8 groups)"
    assert all(h == "requantized" for n, h in hows.items() if n != down), hows
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["modules_to_not_convert"]
    cli("dequantize", src, tmp_path / "bf16", "-q")
    ours, theirs = folder_tensors(out), folder_tensors(tmp_path / "bf16")
    assert torch.equal(ours[down].view(torch.uint8), theirs[down].view(torch.uint8))
    assert not any(
        k.startswith(down + "_scale") or k == down[: -len("weight")] + "weight_scale" for k in ours
    )
    cli("dequantize", out, tmp_path / "mx-bf16", "-q")
