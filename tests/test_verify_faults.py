"""verify and inspect against faults a conversion (or a hostile folder) can leave: non-finite values
anywhere, leftovers of quantization in a dequantized output, small faults only an exact
re-quantization sees, and inputs that used to end in a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv import DequantizeOptions, QuantizeOptions, dequantize, quantize
from fp8conv.checkpoint.layout import INDEX_NAME, SINGLE_NAME
from fp8conv.checkpoint.safetensors_io import load_file, read_header, save_file
from fp8conv.cli import app
from fp8conv.verify import VerifyOptions, inspect_checkpoint, verify_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
BF16 = SAMPLES / "llama-tiny-bf16"
LLAMA_FP8 = SAMPLES / "llama-tiny-fp8"
META = {"format": "pt"}
runner = CliRunner()

Q0 = "model.layers.0.self_attn.q_proj.weight"
GATE0 = "model.layers.0.mlp.gate_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
HEAD = "lm_head.weight"
F8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    quantize(BF16, root / "fp8", QuantizeOptions(device="cpu"))
    quantize(BF16, root / "ct", QuantizeOptions(device="cpu", format="compressed-tensors"))
    dequantize(LLAMA_FP8, root / "bf16", DequantizeOptions(device="cpu"))
    return root


def copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fp8conv"))
    return dst


def shard_of(ckpt: Path, tensor: str) -> Path:
    if (ckpt / INDEX_NAME).exists():
        return ckpt / json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][tensor]
    return ckpt / SINGLE_NAME


def edit(ckpt: Path, tensor: str, fn, new: tuple[str, ...] = ()) -> None:
    """Apply fn to the tensors of the shard holding `tensor`; names in `new` join the index there."""
    path = shard_of(ckpt, tensor)
    t = load_file(path)
    fn(t)
    save_file(t, path, META)
    if (ckpt / INDEX_NAME).exists():
        idx = json.loads((ckpt / INDEX_NAME).read_text())
        for n in new:
            idx["weight_map"][n] = path.name
        (ckpt / INDEX_NAME).write_text(json.dumps(idx))


def set_config(ckpt: Path, fn) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def run(*args) -> tuple[int, dict | None, str]:
    r = runner.invoke(app, ["verify", *map(str, args), "--device", "cpu", "--json", "-", "-q"])
    try:
        report = json.loads(r.stdout)
    except ValueError:
        report = None
    return r.exit_code, report, r.output


def failed(report: dict, name: str) -> dict[str, str]:
    [t] = [t for t in report["tensors"] if t["name"] == name]
    return {k: c["message"] for k, c in t["checks"].items() if c["status"] == "fail"}


# --------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("where", ["fp8", "bf16"])
@pytest.mark.parametrize("tensor, value", [(NORM, float("inf")), (HEAD, float("nan"))])
def test_non_finite_in_unquantized_and_1d_tensors(good, tmp_path, where, tensor, value):
    ckpt = copy(good / where, tmp_path)
    edit(ckpt, tensor, lambda t: t[tensor].view(-1).__setitem__(7, value))
    ref = BF16 if where == "fp8" else LLAMA_FP8
    runs = [(ckpt,), (ckpt, "--reference", ref)]
    if where == "fp8" or tensor == NORM:
        # --sample narrows the costly checks (FP8 weights; 2-D weights of a plain checkpoint); the
        # rest is always read for non-finite values
        runs.append((ckpt, "--sample", "1"))
    for args in runs:
        code, report, out = run(*args)
        assert code == 1, out
        msg = failed(report, tensor)["finite"]
        first = "7" if tensor == NORM else "0, 7"
        assert msg.startswith("1 NaN/Inf value(s)") and f"first at ({first})" in msg, msg


def test_reference_does_not_pass_an_output_holding_inf(good, tmp_path):
    """A scale of 1e37 dequantizes to Inf in bf16: bit-equal to weight_dequant(source), and wrong."""
    src = copy(LLAMA_FP8, tmp_path, "src")
    edit(src, GATE0, lambda t: t[GATE0 + "_scale_inv"].fill_(1e37))
    out = copy(good / "bf16", tmp_path, "out")
    with torch.no_grad():
        q = load_file(shard_of(src, GATE0))[GATE0]
    want = (q.float() * 1e37).bfloat16()
    assert torch.isinf(want).any()
    edit(out, GATE0, lambda t: t.__setitem__(GATE0, want))
    code, report, _ = run(out, "--reference", src)
    assert code == 1
    bad = failed(report, GATE0)
    assert "NaN/Inf" in bad["finite"] and "reference" not in bad  # bit-identical, and still refused


# --------------------------------------------------------------------------------- leftovers
LEFTOVER_TENSORS = {
    "input_scale": ("model.layers.0.self_attn.q_proj.input_scale", torch.ones(())),
    "activation_scale": ("model.layers.0.mlp.up_proj.activation_scale", torch.ones(1)),
    "k_scale": ("model.layers.0.self_attn.k_scale", torch.ones(())),
    "v_scale": ("model.layers.0.self_attn.v_scale", torch.ones(())),
    "qscale_act": ("layers.0.attention.wq.qscale_act", torch.ones(())),
    "weight_scale": (Q0 + "_scale", torch.ones(2, 2)),
    "weight_scale_inv": (Q0 + "_scale_inv", torch.ones(2, 2)),
    "mxfp4 blocks": (
        "model.layers.0.mlp.experts.gate_up_proj_blocks",
        torch.zeros(2, 4, 16, dtype=torch.uint8),
    ),
    "mxfp4 scales": ("model.layers.0.mlp.experts.gate_up_proj_scales", torch.zeros(2, 4, dtype=torch.uint8)),
    "fp8": ("model.layers.0.extra.weight", torch.zeros(4, 4).to(F8)),
}


@pytest.mark.parametrize("kind", sorted(LEFTOVER_TENSORS))
def test_dequantized_output_with_a_leftover_tensor_fails(good, tmp_path, kind):
    ckpt = copy(good / "bf16", tmp_path)
    name, value = LEFTOVER_TENSORS[kind]
    edit(ckpt, Q0, lambda t: t.__setitem__(name, value), new=(name,))
    code, report, out = run(ckpt)
    assert code == 1, out
    assert failed(report, name), report["tensors"][:2]
    assert name in out
    info = inspect_checkpoint(ckpt)
    assert any(o["tensor"] == name for o in info["odd"]), info["odd"]


LEFTOVER_SETTINGS = {
    "quantization_config": lambda c: c.__setitem__("quantization_config", {"quant_method": "fp8"}),
    "compression_config": lambda c: c.__setitem__(
        "compression_config", {"quant_method": "compressed-tensors"}
    ),
    "text_config.quantization_config": lambda c: c.__setitem__(
        "text_config", {"quantization_config": {"quant_method": "fp8"}}
    ),
    "text_config.compression_config": lambda c: c.__setitem__(
        "text_config", {"compression_config": {"quant_method": "compressed-tensors"}}
    ),
}


@pytest.mark.parametrize("where", sorted(LEFTOVER_SETTINGS))
def test_dequantized_output_with_leftover_settings_fails(good, tmp_path, where):
    ckpt = copy(good / "bf16", tmp_path)
    set_config(ckpt, LEFTOVER_SETTINGS[where])
    code, report, _ = run(ckpt)
    assert code == 1
    [f] = [f for f in report["findings"] if f["status"] == "fail"]
    assert f["file"] == str(ckpt / "config.json") and where in f["message"]


@pytest.mark.parametrize("side", ["hf_quant_config.json", "params.json"])
def test_dequantized_output_with_a_quantization_side_file_fails(good, tmp_path, side):
    ckpt = copy(good / "bf16", tmp_path)
    body = {"quantization": {"quant_algo": "FP8"}} if side == "hf_quant_config.json" else {"dim": 256}
    (ckpt / side).write_text(json.dumps(body))
    code, report, _ = run(ckpt)
    if side == "params.json":  # params.json without "quantization" is a plain Mistral file
        assert code == 0
        (ckpt / side).write_text(json.dumps({"dim": 256, "quantization": {"qformat_weight": "fp8_e4m3"}}))
        code, report, _ = run(ckpt)
    assert code == 1
    assert any(f["file"] == str(ckpt / side) and f["status"] == "fail" for f in report["findings"])


def test_fp8_checkpoint_keeps_its_activation_scales(good, tmp_path):
    """Static FP8 layouts carry input / kv-cache scales legitimately: not leftovers there."""
    ckpt = copy(good / "ct", tmp_path)
    name = "model.layers.0.self_attn.q_proj.input_scale"
    edit(ckpt, Q0, lambda t: t.__setitem__(name, torch.ones(())), new=(name,))
    code, report, out = run(ckpt)
    assert code == 0, out
    edit(ckpt, Q0, lambda t: t.__setitem__(name, torch.full((), float("inf"))))
    code, report, _ = run(ckpt)
    assert code == 1 and "NaN/Inf" in failed(report, name)["finite"]


# ------------------------------------------------------------------------------- exact comparison
def _flip_code(t, mode: str):
    q = t[GATE0].view(torch.uint8)
    if mode == "one step":
        # a positive code below the top one: one step up is the next e4m3 value
        j = int(((q > 0) & (q < 0x7E)).reshape(-1).nonzero()[0])
        q.view(-1)[j] += 1
    else:  # the sign of tile (1, 0)'s largest code
        tile = q[128:256, 0:128].clone()
        flat = tile.reshape(-1)
        j = int((flat & 0x7F).argmax())
        flat[j] = flat[j] ^ 0x80
        q[128:256, 0:128] = tile


@pytest.mark.parametrize(
    "fault",
    [
        "one code one step",
        "sign of a tile's largest code",
        "one tile's scale 0.5% off",
        "one scale one ulp off",
    ],
)
def test_exact_mode_catches_small_faults(good, tmp_path, fault):
    ckpt = copy(good / "fp8", tmp_path)
    key = GATE0 + "_scale_inv"
    if fault == "one code one step":
        edit(ckpt, GATE0, lambda t: _flip_code(t, "one step"))
    elif fault == "sign of a tile's largest code":
        edit(ckpt, GATE0, lambda t: _flip_code(t, "sign"))
    elif fault == "one tile's scale 0.5% off":
        edit(ckpt, GATE0, lambda t: t[key][1, 0].mul_(1.005))
    else:
        edit(ckpt, GATE0, lambda t: t[key].view(torch.int32)[0, 1].add_(1))
    code, report, out = run(ckpt, "--reference", BF16)
    assert code == 1, out
    assert report["reference_mode"] == "exact"
    msg = failed(report, GATE0)["reference"]
    assert "not what an exact re-quantization of the reference gives" in msg
    if "scale" in fault:
        assert "1 of 8 scale(s) differ" in msg and "code" not in msg.split("[")[0]
    else:
        assert "1 of 131072 code(s) differ" in msg
    # the statistical comparison alone lets these through: why the exact mode exists
    code, report, _ = run(ckpt, "--reference", BF16, "--reference-mode", "statistical")
    assert report["reference_mode"] == "statistical"
    if fault != "sign of a tile's largest code":
        assert code == 0


def test_exact_mode_on_compressed_tensors_and_auto_fallback(good, tmp_path):
    code, report, _ = run(good / "ct", "--reference", BF16)
    assert code == 0 and report["reference_mode"] == "exact"
    # an FP8 checkpoint another tool made (scales rounded differently everywhere): statistical
    ckpt = copy(good / "fp8", tmp_path)
    shard = shard_of(ckpt, Q0)
    t = load_file(shard)
    for k in list(t):
        if k.endswith("_scale_inv"):
            t[k] = t[k] * (1 + 2**-20)
    save_file(t, shard, META)
    code, report, out = run(ckpt, "--reference", BF16)
    assert code == 0 and report["reference_mode"] == "statistical", out
    code, report, _ = run(ckpt, "--reference", BF16, "--reference-mode", "exact")
    assert code == 1 and report["reference_mode"] == "exact"


# ------------------------------------------------------------------------------ no traceback
def _single(tmp_path: Path, tensors: dict, config: dict | None = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(tensors, d / SINGLE_NAME, META)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


FP8_CFG = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}


def _invoke(cmd: str, path: Path) -> tuple[int, str]:
    r = runner.invoke(app, [cmd, str(path)] + (["--device", "cpu", "-q"] if cmd == "verify" else []))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


def test_empty_and_low_rank_fp8_tensors(tmp_path):
    ckpt = _single(
        tmp_path,
        {
            "a.weight": torch.zeros(128, 0, dtype=F8),
            "a.weight_scale_inv": torch.zeros(1, 0),
            "b.weight": torch.zeros(7, dtype=F8),
            "b.weight_scale_inv": torch.ones(1),
            "c.weight": torch.zeros((), dtype=F8),
            "c.weight_scale_inv": torch.ones(()),
            "d.weight": torch.zeros(0, 256, 256, dtype=torch.bfloat16),
        },
        FP8_CFG,
    )
    code, out = _invoke("verify", ckpt)
    assert code == 1
    report = verify_checkpoint(ckpt, VerifyOptions(device="cpu"))
    for name in ("b.weight", "c.weight"):
        [r] = [r for r in report.tensors if r.name == name]
        assert "fewer than 2 dimensions" in r.checks["scale"].message
    [a] = [r for r in report.tensors if r.name == "a.weight"]
    assert a.ok
    assert _invoke("inspect", ckpt)[0] == 0


def test_hostile_folders_are_refused_not_crashed(tmp_path):
    cases = {}
    d = tmp_path / "deep"
    d.mkdir()
    (d / INDEX_NAME).write_text("[" * 100_000 + "]" * 100_000)
    cases["deep"] = (d, 3, 3)
    d = tmp_path / "deep-config"
    shutil.copytree(BF16, d)
    (d / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    cases["deep-config"] = (d, 3, 3)
    d = tmp_path / "hdr"
    d.mkdir()
    (d / SINGLE_NAME).write_bytes(struct.pack("<Q", 2**63) + b"{}      ")
    cases["hdr"] = (d, 1, 3)  # a broken shard is what verify reports (exit 1); inspect refuses it
    d = tmp_path / "loop"
    d.mkdir()
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    os.symlink("model-1.safetensors", d / "model-1.safetensors")
    cases["loop"] = (d, 3, 3)
    d = tmp_path / "loop-single"
    d.mkdir()
    os.symlink(SINGLE_NAME, d / SINGLE_NAME)
    cases["loop-single"] = (d, 3, 3)
    for name, (path, want_verify, want_inspect) in cases.items():
        assert _invoke("verify", path)[0] == want_verify, name
        assert _invoke("inspect", path)[0] == want_inspect, name


def test_unreadable_shard_is_an_io_error(tmp_path, monkeypatch):
    """A permission error on a shard is exit 5 naming it (the check runs as root here, so the
    error is injected at the one place shards are opened)."""
    import fp8conv.checkpoint.safetensors_io as sio

    ckpt = copy(LLAMA_FP8, tmp_path)
    victim = str(ckpt / "model-00001-of-00002.safetensors")
    real = sio.os.open

    def deny(path, *a, **k):
        if str(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(sio.os, "open", deny)
    code, out = _invoke("verify", ckpt)
    assert code == 5 and "model-00001-of-00002.safetensors" in " ".join(out.split())


def test_nan_position_keeps_leading_dims(tmp_path):
    w = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
    w[1, 2, 5, 7] = 0x7F
    ckpt = _single(
        tmp_path,
        {"x.weight": w.view(F8), "x.weight_scale_inv": torch.ones(2, 3, 1, 1)},
        FP8_CFG,
    )
    report = verify_checkpoint(ckpt, VerifyOptions(device="cpu"))
    [r] = [r for r in report.tensors if r.name == "x.weight"]
    assert "first at (1, 2, 5, 7) = 0x7F" in r.checks["nan_codes"].message


# ---------------------------------------------------------------------------------------- inspect
def test_inspect_per_tensor_fp8_uses_weight_scale(tmp_path):
    """AutoFP8 / RedHatAI static FP8: quant_method fp8 without weight_block_size, per-tensor
    `weight_scale` plus `input_scale`; the scale name is the legitimate one there."""
    w = torch.randn(256, 256)
    s = w.abs().max() / 448
    ckpt = _single(
        tmp_path,
        {
            Q0: (w / s).to(F8),
            Q0 + "_scale": s.reshape(()),
            "model.layers.0.self_attn.q_proj.input_scale": torch.ones(()),
        },
        {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
    )
    info = inspect_checkpoint(ckpt)
    kinds = {o["kind"] for o in info["odd"]}
    assert "scale_name_mismatch" not in kinds, info["odd"]
    assert info["schemes"] == {"tensor": 1}
    assert info["scale_encodings"] == {"float (F32)": 1}
    assert info["artifacts"] == {"input_scale: input_scale": 1}
    assert info["family"] == "fp8"
    code, report, out = run(ckpt)
    assert code == 0, out
    [r] = [r for r in report["tensors"] if r["name"] == Q0]
    assert r["checks"]["gemm"]["status"] == "pass"


def test_inspect_names_schemes_of_block_checkpoints(good):
    info = inspect_checkpoint(good / "fp8")
    assert info["ok"] and info["quant_method"] == "fp8"
    assert info["schemes"] == {"block 128x128": 14}
    assert info["scale_encodings"] == {"float (F32)": 14}


# ------------------------------------------------------------------------- written-content checksum
def _checksums_recorded() -> bool:
    from fp8conv.verify.structure import _recorded_checksum_ok

    return _recorded_checksum_ok() is not None


@pytest.mark.skipif(not _checksums_recorded(), reason="this build's output layer records no shard checksum")
def test_changed_shard_is_flagged_by_its_checksum(tmp_path):
    out = tmp_path / "out"
    quantize(BF16, out, QuantizeOptions(device="cpu"))
    assert run(out)[0] == 0
    shard = shard_of(out, HEAD)
    st = shard.stat()
    info = read_header(shard).tensors[HEAD]
    with open(shard, "r+b") as f:  # one bit of lm_head: still finite, same size, same mtime
        f.seek(info.start + 10)
        b = f.read(1)
        f.seek(info.start + 10)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, report, out_text = run(out)
    assert code == 1, out_text
    [f] = [f for f in report["findings"] if f["check"] == "checksum"]
    assert f["file"] == str(shard) and "differs from the checksum" in f["message"]
    assert run(out, "--sample", "1")[0] == 0  # a sample reads no whole shard: not judged


@pytest.mark.skipif(not _checksums_recorded(), reason="this build's output layer records no shard checksum")
@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_whole_checkpoint_verify_reads_each_byte_once(tmp_path, fmt):
    """The shard checksums take the CRC-32 of each tensor the data checks read as they read it: a whole
    checkpoint's tensor bytes are read once, not once for the checks and again for the checksums (the
    scales, a few hundred bytes here, are looked at twice: beside their weight and for their own
    finiteness)."""
    out = tmp_path / "out"
    quantize(BF16, out, QuantizeOptions(device="cpu", format=fmt))
    report = verify_checkpoint(out, VerifyOptions(device="cpu"))
    infos = [i for p in out.glob("*.safetensors") for i in read_header(p).tensors.values()]
    data = sum(i.nbytes for i in infos)
    scales = sum(i.nbytes for i in infos if "_scale" in i.name)
    assert report.ok and 0 < scales < data / 100
    assert data <= report.totals["bytes_read"] <= data + scales, (report.totals["bytes_read"], data)


def test_serving_report_is_part_of_the_verify_report(good):
    """--tp / --target go through verify_checkpoint: one report, one `ok`, one JSON."""
    report = verify_checkpoint(good / "fp8", VerifyOptions(device="cpu", tp=(1, 2), targets=("vllm",)))
    assert report.serving is not None and report.ok == report.serving.ok
    d = report.to_dict()
    assert d["serving"] == report.serving.to_dict() and d["options"]["tp"] == [1, 2]
    code, js, out = run(good / "fp8", "--tp", "1,2")
    assert js["serving"]["tp_sizes"] == [1, 2]
    assert (code == 0) == js["ok"]
