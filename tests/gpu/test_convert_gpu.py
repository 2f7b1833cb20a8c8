"""Whole checkpoints converted on the GPU and on the CPU are byte-identical, convert's loss figures equal
(run by `make test-gpu`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.checkpoint.safetensors_io import save_file
from fp8conv.cli import app
from tests.fixtures_formats import FAMILIES, build
from tests.test_convert_fp8 import synthetic_e4m3

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
runner = CliRunner()


def convert(*args) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output


def both_devices(src: Path, tmp_path: Path, *args) -> bool:
    """Dequantize `src` on the CPU and on the GPU into tmp_path/cpu and tmp_path/gpu: the same exit
    code, and the same error line when a value overflows the dtype (exit 4, nothing Inf written).
    True when both wrote an output."""
    codes, lines = [], []
    for dev in ("cpu", "gpu"):
        device = "cpu" if dev == "cpu" else "cuda"
        r = runner.invoke(app, ["dequantize", str(src), str(tmp_path / dev), "--device", device, *args])
        codes.append(r.exit_code)
        lines.append([x for x in r.output.splitlines() if x.startswith("error")])
    assert codes[0] == codes[1] and lines[0] == lines[1], (codes, lines)
    assert codes[0] in (0, 4), lines
    return codes[0] == 0


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.safetensors"))}


def assert_same(a: Path, b: Path) -> None:
    sa, sb = shard_bytes(a), shard_bytes(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        if sa[name] != sb[name]:
            x, y = sa[name], sb[name]
            first = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
            pytest.fail(f"{name}: CPU and GPU outputs differ first at byte {first}")
    for name in ("config.json", "model.safetensors.index.json"):
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes()


def synthetic_fp8(root: Path) -> Path:
    """Ragged tiles, stacked experts, e5m2, ue8m0 exponent scales, large magnitudes."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)

    def codes(shape, dtype):
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
        mask = 0x7F if dtype == torch.float8_e4m3fn else 0x7C
        b[(b & mask) == mask] = 0x11
        return b.view(dtype)

    def grid(shape):
        return (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))

    t = {}
    for i, shape in enumerate([(576, 7168), (7000, 1000), (1, 130), (129, 257), (4, 300, 260)]):
        t[f"w{i}.weight"] = codes(shape, torch.float8_e4m3fn)
        t[f"w{i}.weight_scale_inv"] = torch.rand(grid(shape), generator=g) * 10 ** (i - 2)
    t["e5.weight"] = codes((300, 520), torch.float8_e5m2)
    t["e5.weight_scale_inv"] = torch.rand(grid((300, 520)), generator=g)
    t["u.weight"] = codes((256, 384), torch.float8_e4m3fn)
    t["u.weight_scale_inv"] = torch.randint(100, 140, grid((256, 384)), generator=g).to(torch.uint8)
    t["keep"] = torch.arange(10)
    save_file(t, root / "model.safetensors", {"format": "pt"})
    return root


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_dequantize_cpu_and_gpu_byte_identical(tmp_path, dtype):
    for src in (SAMPLES / "deepseek-tiny-fp8", SAMPLES / "llama-tiny-fp8", synthetic_fp8(tmp_path / "syn")):
        # the synthetic checkpoint's large magnitudes overflow fp16: refused alike on both devices
        if both_devices(src, tmp_path, "--dtype", dtype, "-q"):
            assert_same(tmp_path / "cpu", tmp_path / "gpu")
        else:
            assert dtype == "fp16" and src.name == "syn"
        shutil.rmtree(tmp_path / "cpu", ignore_errors=True)
        shutil.rmtree(tmp_path / "gpu", ignore_errors=True)
        if (tmp_path / "syn").exists() and src == tmp_path / "syn":
            shutil.rmtree(src)


@pytest.mark.parametrize(
    "extra", [[], ["--scale-fmt", "ue8m0"], ["--format", "compressed-tensors"], ["--block-size", "64x128"]]
)
def test_quantize_cpu_and_gpu_byte_identical(tmp_path, extra):
    convert("dequantize", SAMPLES / "deepseek-tiny-fp8", tmp_path / "bf16", "--device", "cpu", "-q")
    for src in (SAMPLES / "llama-tiny-bf16", tmp_path / "bf16"):
        convert("quantize", src, tmp_path / "cpu", "--device", "cpu", "-q", *extra)
        convert("quantize", src, tmp_path / "gpu", "--device", "cuda", "-q", *extra)
        assert_same(tmp_path / "cpu", tmp_path / "gpu")
        shutil.rmtree(tmp_path / "cpu")
        shutil.rmtree(tmp_path / "gpu")


def test_gpu_quantize_refuses_nan(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(256, 256)
    w[131, 5] = float("nan")
    save_file({"a.weight": w}, src / "model.safetensors")
    r = runner.invoke(app, ["quantize", str(src), str(tmp_path / "o"), "--device", "cuda"])
    assert r.exit_code == 4 and "[131, 5]" in r.output


@pytest.mark.parametrize(
    "code, fp8", [(0x7F, torch.float8_e4m3fn), (0xFF, torch.float8_e4m3fn), (0x7C, torch.float8_e5m2)]
)
def test_gpu_dequantize_refuses_nan_codes(tmp_path, code, fp8):
    """The code check runs on the card for --device cuda: same exit code and element as on the CPU."""
    src = tmp_path / "src"
    src.mkdir()
    q = torch.randint(0, 0x70, (300, 260), dtype=torch.uint8)
    q[211, 7] = code
    s = torch.rand(3, 3) + 0.5
    save_file({"a.weight": q.view(fp8), "a.weight_scale_inv": s}, src / "model.safetensors")
    for dev in ("cuda", "cpu"):
        r = runner.invoke(app, ["dequantize", str(src), str(tmp_path / dev), "--device", dev])
        assert r.exit_code == 4 and "[211, 7]" in r.output and "a.weight" in r.output, (dev, r.output)


def test_gpu_pieces_of_a_large_tensor(tmp_path, monkeypatch):
    from fp8conv.convert import engine

    monkeypatch.setattr(engine, "PIECE_ELEMS", 128 * 1000)
    src = synthetic_fp8(tmp_path / "syn")
    convert("dequantize", src, tmp_path / "gpu", "--device", "cuda", "-q")
    monkeypatch.setattr(engine, "PIECE_ELEMS", 8 << 20)
    convert("dequantize", src, tmp_path / "cpu", "--device", "cpu", "-q")
    assert_same(tmp_path / "cpu", tmp_path / "gpu")


# ------------------------------------------------------------------------- every published family

FAMILY_DTYPES = [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]


def _load_all(root: Path) -> dict[str, torch.Tensor]:
    from fp8conv.checkpoint.safetensors_io import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(root.glob("*.safetensors")):
        out.update(load_file(p))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype,torch_dtype", FAMILY_DTYPES)
def test_every_family_dequantizes_to_the_same_bytes_on_gpu_and_cpu(tmp_path, name, dtype, torch_dtype):
    """Each family's fixture (tests/fixtures_formats.py) through `--device cuda` and `--device cpu`:
    identical files, and the GPU's tensors equal to the fixture's own formula bit for bit."""
    f = build(name, tmp_path / "src")
    wants = {k: fn(torch_dtype).contiguous() for k, fn in f.expect.items()}
    overflow = any(w.is_floating_point() and bool(torch.isinf(w).any()) for w in wants.values())
    # A formula that overflows the dtype (MX scales up to 2**8 times 448 in fp16) is refused alike.
    assert both_devices(f.root, tmp_path, "--dtype", dtype, "-q") is not overflow
    if overflow:
        return
    assert_same(tmp_path / "cpu", tmp_path / "gpu")
    for rel in ("params.json",):
        if (tmp_path / "cpu" / rel).exists():
            assert (tmp_path / "cpu" / rel).read_bytes() == (tmp_path / "gpu" / rel).read_bytes()
    out = _load_all(tmp_path / "gpu")
    assert set(out) == set(f.expect)
    for k, want in wants.items():
        assert torch.equal(out[k].view(torch.uint8), want.view(torch.uint8)), k


def test_every_family_in_small_pieces_on_gpu(tmp_path, monkeypatch):
    """Row bands smaller than one tensor (and than a per-tensor scale's tile) on the card."""
    from fp8conv.convert import engine

    monkeypatch.setattr(engine, "PIECE_ELEMS", 1000)
    for name in FAMILIES:
        f = build(name, tmp_path / name)
        convert("dequantize", f.root, tmp_path / name / "gpu", "--device", "cuda", "-q")
        out = _load_all(tmp_path / name / "gpu")
        for k, fn in f.expect.items():
            assert torch.equal(out[k].view(torch.uint8), fn(torch.bfloat16).contiguous().view(torch.uint8)), (
                name,
                k,
            )


@pytest.mark.parametrize("out_dtype", [d for _, d in FAMILY_DTYPES])
@pytest.mark.parametrize("shape", [(3, 64, 5, 16), (7, 1, 16), (2, 2880, 90, 16)])
def test_fp4_dequant_gpu_matches_cpu(shape, out_dtype):
    """fp4_dequant on the card gives the CPU path's bytes, every exponent byte 0..254 included."""
    from fp8conv.kernels import fp4_dequant

    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    scales = (torch.arange(math.prod(shape[:-1])) % 255).to(torch.uint8).reshape(shape[:-1])
    cpu = fp4_dequant(blocks, scales, out_dtype)
    gpu = fp4_dequant(blocks.cuda(), scales.cuda(), out_dtype)
    assert gpu.is_cuda and gpu.dtype == out_dtype
    assert torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))


# ------------------------------------------------------------------------- convert's requant on the card


def convert_both(src: Path, tmp_path: Path, *args) -> None:
    """`fp8conv convert` of src on the CPU and on the GPU: the same model bytes in every shard (fp8conv's
    own job record aside), the same config and index, and the loss figures of --json equal to the bit."""
    from tests.conftest import model_bytes

    reports = {}
    for dev in ("cpu", "cuda"):
        out, js = tmp_path / f"conv-{dev}", tmp_path / f"conv-{dev}.json"
        shutil.rmtree(out, ignore_errors=True)
        convert("convert", src, out, "--device", dev, "-q", "--json", js, *args)
        reports[dev] = json.loads(js.read_text())
    cpu, gpu = tmp_path / "conv-cpu", tmp_path / "conv-cuda"
    shards = sorted(p.name for p in cpu.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in gpu.glob("*.safetensors"))
    for name in shards:
        assert model_bytes(cpu / name) == model_bytes(gpu / name), name
    for name in ("config.json", "model.safetensors.index.json"):
        if (cpu / name).exists():
            assert (cpu / name).read_bytes() == (gpu / name).read_bytes(), name
    assert reports["cpu"]["lossless"] == reports["cuda"]["lossless"]
    assert reports["cpu"]["tensors"] == reports["cuda"]["tensors"]  # every figure, to the bit
    assert any(not t["lossless"] for t in reports["cpu"]["tensors"])


REQUANTS = [
    ["--scale-fmt", "ue8m0"],
    ["--scheme", "fp8-channel", "--format", "compressed-tensors"],
    ["--scheme", "mxfp8"],
]


@pytest.mark.parametrize("extra", REQUANTS)
def test_convert_requant_cpu_and_gpu_byte_identical(tmp_path, extra):
    sources = [SAMPLES / "llama-tiny-fp8"]
    if extra[0] == "--scale-fmt":  # stacked experts and ragged tiles (MXFP8 and compressed-tensors refuse)
        sources += [SAMPLES / "deepseek-tiny-fp8", synthetic_e4m3(tmp_path / "syn")]
    for src in sources:
        convert_both(src, tmp_path, *extra)


@pytest.mark.parametrize("extra", [REQUANTS[0], REQUANTS[2]])
def test_convert_requant_with_reference_cpu_and_gpu_identical(tmp_path, extra):
    convert("quantize", SAMPLES / "llama-tiny-bf16", tmp_path / "fp8", "--device", "cpu", "-q")
    convert_both(tmp_path / "fp8", tmp_path, *extra, "--reference", SAMPLES / "llama-tiny-bf16")


def test_convert_requant_in_small_gpu_bands(tmp_path, monkeypatch):
    """Many bands per weight on the card (4096 elements) against the CPU's: the same bytes and figures."""
    from fp8conv.convert import fp8_to_fp8

    monkeypatch.setattr(fp8_to_fp8, "GPU_BAND_ELEMS", 4096)
    convert_both(synthetic_e4m3(tmp_path / "syn"), tmp_path, "--scale-fmt", "ue8m0")
