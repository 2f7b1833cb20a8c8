"""`fp8conv convert`: FP8 in, FP8 out. Relayouts are byte-identical round trips; nested blocks and UE8M0
block -> MXFP8 dequantize to the same bits as the source; --scale-fmt ue8m0 equals DeepGEMM's requant
bit for bit, with its loss reported per tensor, worst first; compressed-tensors decompresses what it
reads to fp8conv's dequantization."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import load_file, save_file
from fp8conv.cli import app
from fp8conv.kernels.reference import weight_dequant_torch
from tests.conftest import model_bytes, tree_digest
from tests.deepgemm_reference import deepgemm_per_block_cast_to_fp8

runner = CliRunner()


def cli(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def dequantized(folder, tmp_path, name, dtype="bf16") -> dict[str, torch.Tensor]:
    dst = tmp_path / name
    cli("dequantize", folder, dst, "--dtype", dtype, "-q")
    return tensors(dst)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.fixture
def fp8_llama(sample, tmp_path):
    src = sample("llama-tiny-bf16")
    cli("quantize", src, tmp_path / "fp8", "-q")
    return tmp_path / "fp8"


def test_relayout_round_trip_is_byte_identical(sample, tmp_path):
    src = sample("llama-tiny-fp8")
    before = tree_digest(src)
    r = cli("convert", src, tmp_path / "ct", "--format", "compressed-tensors", "--json", tmp_path / "a.json")
    assert "lossless" in r.output
    cli("convert", tmp_path / "ct", tmp_path / "back", "--format", "fp8", "-q")
    assert tree_digest(src) == before
    for shard in src.glob("*.safetensors"):  # the same model bytes; fp8conv's record of the job beside
        assert model_bytes(tmp_path / "back" / shard.name) == model_bytes(shard), shard.name
    ct_t, src_t = tensors(tmp_path / "ct"), tensors(src)
    for k, v in src_t.items():
        if v.dtype == torch.float8_e4m3fn:  # codes byte-identical under the same name
            assert torch.equal(ct_t[k].view(torch.uint8), v.view(torch.uint8)), k
            assert torch.equal(ct_t[k + "_scale"], src_t[k + "_scale_inv"]), k
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["lossless"] is True and all(t["how"] == "relayout" for t in report["tensors"])
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["config_groups"]["group_0"]["weights"][
        "strategy"
    ] == ("block")
    assert_same(dequantized(src, tmp_path, "d1"), dequantized(tmp_path / "ct", tmp_path, "d2"))


def test_relayout_of_stacked_experts_to_compressed_tensors_is_refused(sample, tmp_path):
    """compressed-tensors targets Linear layers: a [E, M, N] expert tensor would not be read as FP8."""
    src = sample("deepseek-tiny-fp8")
    r = cli("convert", src, tmp_path / "ct", "--format", "compressed-tensors", code=3)
    assert "stacked experts" in r.output and "experts.gate_up_proj" in r.output
    assert not (tmp_path / "ct").exists()
    # the same sharded checkpoint (a scale in another shard than its weight) relayouts to itself exactly
    cli("convert", src, tmp_path / "same", "--format", "fp8", "-q")
    for shard in src.glob("*.safetensors"):
        assert model_bytes(tmp_path / "same" / shard.name) == model_bytes(shard), shard.name


# The oracle: DeepGEMM's per_block_cast_to_fp8(use_ue8m0=True) as vLLM's requant_weight_ue8m0_inplace
# applies it, written out in tests/deepgemm_reference.py (file and commit cited there).
def test_ue8m0_is_deepgemms_requant_with_the_loss_reported(sample, tmp_path):
    src = sample("deepseek-tiny-fp8")  # sharded, ragged edge tiles, stacked experts
    out = tmp_path / "ue8m0"
    r = cli("convert", src, out, "--scale-fmt", "ue8m0", "--json", tmp_path / "r.json")
    assert "lossy" in r.output and "SQNR" in r.output
    got, ref = tensors(out), tensors(src)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lossless"] is False
    rows = {t["tensor"]: t for t in report["tensors"]}
    sqnrs = [t["sqnr_db"] for t in report["tensors"] if not t["lossless"]]
    assert sqnrs == sorted(sqnrs)  # worst first
    checked = 0
    for k, q in ref.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        s = ref[k + "_scale_inv"].float()
        qs = q.reshape(-1, *q.shape[-2:])
        ss = s.reshape(-1, *s.shape[-2:])
        gq = got[k].reshape(qs.shape)
        gs = got[k + "_scale_inv"].reshape(ss.shape)
        num = den = 0.0
        for e in range(qs.shape[0]):
            m, n = qs.shape[-2:]
            w = qs[e].float() * ss[e].repeat_interleave(128, 0).repeat_interleave(128, 1)[:m, :n]
            wq, wsf = deepgemm_per_block_cast_to_fp8(w)
            assert torch.equal(gq[e].view(torch.uint8), wq.view(torch.uint8)), k
            assert torch.equal(gs[e], wsf), k
            back = wq.float() * wsf.repeat_interleave(128, 0).repeat_interleave(128, 1)[:m, :n]
            num += float((back.double() - w.double()).pow(2).sum())
            den += float(w.double().pow(2).sum())
        if num > 0:
            assert rows[k]["rel_error"] == pytest.approx(math.sqrt(num / den), rel=1e-9)
            assert rows[k]["sqnr_db"] == pytest.approx(10 * math.log10(den / num), rel=1e-9)
        checked += 1
    assert checked >= 4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"
    # already power-of-two scales: a second pass changes nothing
    r = cli("convert", out, tmp_path / "again", "--scale-fmt", "ue8m0", "--json", tmp_path / "r2.json")
    assert all(t["lossless"] for t in json.loads((tmp_path / "r2.json").read_text())["tensors"])
    assert_same(tensors(out), tensors(tmp_path / "again"))


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_ue8m0_block_to_mxfp8_is_lossless(fp8_llama, tmp_path, fmt):
    cli("convert", fp8_llama, tmp_path / "ue8m0", "--scale-fmt", "ue8m0", "-q")
    out = tmp_path / f"mx-{fmt}"
    r = cli("convert", tmp_path / "ue8m0", out, "--scheme", "mxfp8", "--format", fmt)
    assert "lossless" in r.output
    t = tensors(out)
    w = "model.layers.0.mlp.down_proj.weight"
    assert t[w + ("_scale_inv" if fmt == "fp8" else "_scale")].dtype == torch.uint8
    assert_same(dequantized(tmp_path / "ue8m0", tmp_path, "a"), dequantized(out, tmp_path, "b"))


def test_float_block_to_mxfp8_requantizes_and_says_so(fp8_llama, tmp_path):
    r = cli("convert", fp8_llama, tmp_path / "mx", "--scheme", "mxfp8", "--json", "-", "-q")
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert report["lossless"] is False
    assert all(t["how"] == "requantized" and t["sqnr_db"] > 25 for t in report["tensors"])


def test_nested_block_is_lossless_and_other_blocks_refused(fp8_llama, tmp_path):
    r = cli("convert", fp8_llama, tmp_path / "b64", "--block-size", "64x128")
    assert "lossless" in r.output
    t = tensors(tmp_path / "b64")
    w = "model.layers.0.mlp.down_proj.weight"
    assert tuple(t[w + "_scale_inv"].shape) == (t[w].shape[0] // 64, t[w].shape[1] // 128)
    qc = json.loads((tmp_path / "b64" / "config.json").read_text())["quantization_config"]
    assert qc["weight_block_size"] == [64, 128]
    assert_same(dequantized(fp8_llama, tmp_path, "a"), dequantized(tmp_path / "b64", tmp_path, "b"))
    r = cli("convert", fp8_llama, tmp_path / "b96", "--block-size", "96", code=2)
    assert "does not nest" in r.output
    assert not (tmp_path / "b96").exists()


def test_block_to_channel_for_compressed_tensors(fp8_llama, tmp_path):
    """Per-channel requant (lossy, measured) in compressed-tensors' FP8_DYNAMIC layout, which
    compressed-tensors' decompressor turns into exactly fp8conv's dequantization."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "ch"
    r = cli("convert", fp8_llama, out, "--scheme", "fp8-channel", "--format", "compressed-tensors")
    assert "lossy" in r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert scheme.weights.strategy == "channel"
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    t = tensors(out)
    ours = dequantized(out, tmp_path, "d", "fp32")
    n = 0
    for k in t:
        if k + "_scale" in t:
            theirs = comp.decompress({"weight": t[k], "weight_scale": t[k + "_scale"]}, scheme)["weight"]
            assert torch.equal(theirs, ours[k]), k
            assert torch.equal(
                theirs, weight_dequant_torch(t[k], t[k + "_scale"], (1, t[k].shape[1]), torch.float32)
            )
            n += 1
    assert n == 14


def test_refusals(sample, tmp_path):
    r = cli("convert", sample("llama-tiny-bf16"), tmp_path / "x", code=3)
    assert "no FP8 weight" in r.output
    r = cli(
        "convert",
        sample("llama-tiny-fp8"),
        tmp_path / "x",
        "--scheme",
        "fp8-channel",
        "--format",
        "fp8",
        code=2,
    )
    assert "FP8_DYNAMIC" in r.output
    r = cli(
        "convert",
        sample("llama-tiny-fp8"),
        tmp_path / "x",
        "--scale-fmt",
        "ue8m0",
        "--block-size",
        "64",
        code=2,
    )
    assert "without --scheme or --block-size" in r.output
    assert not (tmp_path / "x").exists()


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    d = float((got.double() - ref.double()).pow(2).sum())
    return 10 * math.log10(float(ref.double().pow(2).sum()) / d)


def test_reference_measures_against_the_original_bf16(sample, tmp_path):
    src = sample("llama-tiny-bf16")
    cli("quantize", src, tmp_path / "fp8", "-q")
    out = tmp_path / "ue8m0"
    r = cli(
        "convert",
        tmp_path / "fp8",
        out,
        "--scale-fmt",
        "ue8m0",
        "--reference",
        src,
        "--json",
        tmp_path / "r.json",
    )
    assert "SQNR vs BF16" in r.output
    rows = json.loads((tmp_path / "r.json").read_text())["tensors"]
    orig = tensors(src)
    before = dequantized(tmp_path / "fp8", tmp_path, "before", "fp32")
    after = dequantized(out, tmp_path, "after", "fp32")
    assert len(rows) == 14
    for row in rows:
        k = row["tensor"]
        assert row["sqnr_vs_reference_db"] == pytest.approx(_sqnr(orig[k], after[k]), rel=1e-9), k
        assert row["source_sqnr_vs_reference_db"] == pytest.approx(_sqnr(orig[k], before[k]), rel=1e-9), k
    r = cli(
        "convert",
        tmp_path / "fp8",
        tmp_path / "x",
        "--scale-fmt",
        "ue8m0",
        "--reference",
        sample("deepseek-tiny-fp8"),
        code=3,
    )
    assert "--reference" in r.output and not (tmp_path / "x").exists()


def test_dry_run_says_what_each_tensor_would_become(fp8_llama, tmp_path):
    r = cli("convert", fp8_llama, tmp_path / "x", "--scheme", "mxfp8", "--dry-run", "--json", "-")
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["lossless"] is False
    assert {t["how"] for t in plan["tensors"]} == {"requantized"} and len(plan["tensors"]) == 14
    r = cli("convert", fp8_llama, tmp_path / "x", "--format", "compressed-tensors", "--dry-run")
    assert "all lossless" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--scale-fmt", "ue8m0"],
        ["--scheme", "fp8-channel", "--format", "compressed-tensors"],
        ["--scheme", "mxfp8"],
    ],
)
def test_requant_in_bands_gives_the_whole_tensors_bytes(sample, tmp_path, monkeypatch, extra):
    """Requantizing band by band (bounded memory) writes the bytes and reports the loss that one pass
    over each whole tensor gives: bands of 4096 elements against bands larger than any tensor."""
    from fp8conv.convert import fp8_to_fp8

    src = sample("deepseek-tiny-fp8") if extra[0] == "--scale-fmt" else sample("llama-tiny-fp8")
    reports = {}
    for band in (1 << 30, 4096):
        monkeypatch.setattr(fp8_to_fp8, "BAND_ELEMS", band)
        out = tmp_path / f"b{band}"
        cli("convert", src, out, *extra, "-q", "--json", tmp_path / f"b{band}.json")
        reports[band] = {
            t["tensor"]: t for t in json.loads((tmp_path / f"b{band}.json").read_text())["tensors"]
        }
    for shard in (tmp_path / f"b{1 << 30}").glob("*.safetensors"):
        assert model_bytes(shard) == model_bytes(tmp_path / "b4096" / shard.name), shard.name
    whole, banded = reports[1 << 30], reports[4096]
    assert whole.keys() == banded.keys() and any(not t["lossless"] for t in whole.values())
    for k, t in whole.items():
        if t["sqnr_db"] is not None and math.isfinite(t["sqnr_db"]):
            assert banded[k]["sqnr_db"] == pytest.approx(t["sqnr_db"], rel=1e-12), k


def test_default_dst_says_what_changed(sample, tmp_path):
    """Without DST, convert writes beside SRC under a name that says what it changed."""
    src = sample("llama-tiny-fp8")
    cli("convert", src, "--scale-fmt", "ue8m0", "-q")
    cli("convert", src, "--format", "compressed-tensors", "-q")
    assert (src.parent / f"{src.name}-ue8m0" / "model.safetensors.index.json").is_file()
    assert (src.parent / f"{src.name}-ct" / "model.safetensors.index.json").is_file()


def synthetic_e4m3(root: Path) -> Path:
    """e4m3 weights with float block scales over many magnitudes: ragged edge tiles, stacked experts, a
    single row, a tensor of several CPU bands, an all-zero tile (DeepGEMM's amax floor) and subnormal
    scales."""
    root.mkdir()
    g = torch.Generator().manual_seed(1)
    t = {}
    for i, shape in enumerate([(576, 7168), (7000, 1000), (1, 130), (129, 257), (4, 300, 260), (256, 384)]):
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
        b[(b & 0x7F) == 0x7F] = 0x11
        grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
        s = torch.rand(grid, generator=g) * 10.0 ** (i - 3)
        if i == 3:
            b[:128, :128] = 0  # an all-zero tile
        if i == 5:
            s = s * 2.0**-130  # float32 subnormal scales
        t[f"model.layers.{i}.mlp.down_proj.weight"] = b.view(torch.float8_e4m3fn)
        t[f"model.layers.{i}.mlp.down_proj.weight_scale_inv"] = s
    t["model.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    save_file(t, root / "model.safetensors", {"format": "pt"})
    return root


REQUANTS = [
    ["--scale-fmt", "ue8m0"],
    ["--scheme", "fp8-channel", "--format", "compressed-tensors"],
    ["--scheme", "mxfp8"],
]


@pytest.mark.parametrize(
    "source, extra",
    [
        ("deepseek-tiny-fp8", REQUANTS[0]),
        ("llama-tiny-fp8", REQUANTS[1]),
        ("llama-tiny-fp8", REQUANTS[2]),
        ("synthetic", REQUANTS[0]),
        ("llama-tiny-bf16 quantized", [*REQUANTS[0], "--reference"]),
        ("llama-tiny-bf16 quantized", [*REQUANTS[2], "--reference"]),
    ],
)
def test_requant_figures_do_not_depend_on_bands_threads_or_placement(
    sample, tmp_path, monkeypatch, source, extra
):
    """The bytes and every loss figure, to the bit, whatever the band size, the thread count, and with
    the GPU's schedule (bands in turn, 16 Mi elements, one copy back) run on the CPU: each row's squares
    are summed in one fixed order and the rows added exactly."""
    from fp8conv.convert import fp8_to_fp8

    if source == "synthetic":
        src = synthetic_e4m3(tmp_path / "syn")
    elif source.endswith("quantized"):
        cli("quantize", sample("llama-tiny-bf16"), tmp_path / "src", "-q")
        src, extra = tmp_path / "src", [*extra, sample("llama-tiny-bf16")]
    else:
        src = sample(source)
    cpu = torch.device("cpu")
    runs = {
        "default": None,
        "4096-element bands, 2 threads": lambda spec: (cpu, 2, 4096),
        "the GPU's schedule": lambda spec: (cpu, 1, fp8_to_fp8.GPU_BAND_ELEMS),
    }
    reports = {}
    for what, placement in runs.items():
        if placement is not None:
            monkeypatch.setattr(fp8_to_fp8, "_placement", placement)
        out = tmp_path / what.replace(" ", "-").replace(",", "").replace("'", "")
        cli("convert", src, out, *extra, "-q", "--json", out.with_suffix(".json"))
        reports[what] = json.loads(out.with_suffix(".json").read_text())["tensors"]
        for shard in (tmp_path / "default").glob("*.safetensors"):
            assert model_bytes(shard) == model_bytes(out / shard.name), (what, shard.name)
    assert any(not t["lossless"] for t in reports["default"])
    if "--reference" in extra:
        assert all(t["sqnr_vs_reference_db"] is not None for t in reports["default"])
    for what, rows in reports.items():
        assert rows == reports["default"], what


def test_band_arithmetic_is_the_straightforward_one():
    """The band's pieces against the plain formulas, bit for bit: the code table against torch's cast
    (all 256 codes), the tile-by-tile product against expand_scales, the UE8M0 band against DeepGEMM's
    cast (ragged tiles, an all-zero tile, a NaN code, subnormal scales)."""
    from fp8conv.convert.fp8_to_fp8 import _Buffers, _decode
    from fp8conv.kernels.reference import expand_scales
    from fp8conv.targets.requant import requant_ue8m0, requant_ue8m0_band, tile_mul

    buf = _Buffers(torch.device("cpu"))
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    assert torch.equal(_decode(every, buf, "x").view(torch.int32), every.float().view(torch.int32))
    g = torch.Generator().manual_seed(2)
    for shape, block, scale in [
        ((300, 257), (128, 128), 1e-3),
        ((128, 256), (128, 128), 2.0**-140),
        ((1, 130), (128, 128), 10.0),
        ((64, 96), (1, 32), 1.0),
        ((7, 33), (1, 33), 1e-2),
    ]:
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
        b[(b & 0x7F) == 0x7F] = 0x11
        b[: block[0], : block[1]] = 0
        if shape == (300, 257):
            b[200, 200] = 0x7F
        q = b.view(torch.float8_e4m3fn)
        s = torch.rand(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]), generator=g) * scale
        want = q.float() * expand_scales(s, shape, block)
        w = tile_mul(_decode(q, buf, "w"), s, block, out=torch.empty(shape))
        assert torch.equal(w.view(torch.int32), want.view(torch.int32)), shape
        codes = torch.empty(shape, dtype=torch.float8_e4m3fn)
        sf = requant_ue8m0_band(w, block, codes, torch.empty(shape))
        q2, s2 = requant_ue8m0(q, s, block)
        assert torch.equal(codes.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(sf, s2), shape
        if block == (128, 128):
            wq, wsf = deepgemm_per_block_cast_to_fp8(want)
            assert torch.equal(codes.view(torch.uint8), wq.view(torch.uint8)), shape
            assert torch.equal(sf.view(torch.int32), wsf.view(torch.int32)), shape


@pytest.mark.parametrize("cols", [0, 1, 2, 7, 128, 1001, 7168])
def test_row_sums_are_within_their_bound(cols):
    """Folding halves sums each row within L * 2**-53 of the exact sum (math.fsum), L the additions on
    the longest path: at most 2 * floor(log2 cols) (a fold, plus one for an odd width)."""
    from fp8conv.convert.fp8_to_fp8 import _row_sums

    g = torch.Generator().manual_seed(cols)
    x = torch.randn(5, cols, generator=g) * torch.logspace(-20, 20, 5)[:, None]
    t = x.double() ** 2  # squares of float32 values: exact in float64, as the loss's terms
    rows = [math.fsum(r) for r in t.tolist()]
    got = _row_sums(t.clone()).tolist()
    bound = 2 * math.floor(math.log2(cols)) * 2.0**-53 * 1.01 if cols > 1 else 0.0
    for exact, s in zip(rows, got, strict=True):
        assert abs(s - exact) <= bound * exact, (cols, s, exact)
    ints = torch.randint(0, 1 << 20, (3, cols), generator=g).double()  # exact sums: no rounding at all
    assert _row_sums(ints.clone()).tolist() == [math.fsum(r) for r in ints.tolist()]
