"""The torch paths against independent, straightforward formulas, bit for bit where the math is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fp8conv import kernels
from fp8conv.kernels.reference import (
    act_quant_torch,
    fp8_gemm_torch,
    scale_to_float32,
    weight_dequant_torch,
    weight_quant_torch,
)

# One shape list for every kernel test: ragged edges, single rows, primes, below one tile, experts.
SHAPES = [
    (576, 7168),
    (7000, 1000),
    (1, 128),
    (1, 5),
    (129, 257),
    (127, 300),
    (211, 389),
    (256, 256),
    (3, 130, 257),
    (2, 128, 128),
]
SMALL_SHAPES = [s for s in SHAPES if math.prod(s) <= 2_000_000]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    ai, bi = (t.contiguous().view(-1).view(torch.uint8) for t in (a, b))
    idx = int((ai != bi).nonzero()[0]) // a.element_size()
    return f"first difference at flat element {idx}: {a.reshape(-1)[idx]} vs {b.reshape(-1)[idx]}"


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
        pytest.fail(first_difference(a, b))


def random_codes(shape, dtype, gen) -> torch.Tensor:
    """Every finite FP8 code with equal chance (NaN/Inf codes excluded)."""
    b = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    if dtype == torch.float8_e4m3fn:
        b = torch.where((b & 0x7F) == 0x7F, b & 0xF0, b)
    else:
        b = torch.where((b & 0x7C) == 0x7C, b & 0x83, b)
    return b.view(dtype)


def independent_dequant(q: torch.Tensor, s32: np.ndarray, block) -> np.ndarray:
    """numpy float32 on the lookup-table values of each code: no torch arithmetic involved."""
    lut = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(q.dtype).float().numpy()
    vals = lut[q.view(torch.uint8).numpy()]
    bm, bn = block
    m, n = q.shape[-2:]
    full = np.repeat(np.repeat(s32, bm, axis=-2), bn, axis=-1)[..., :m, :n]
    with np.errstate(over="ignore"):  # extreme-scale cases overflow to inf on purpose
        return (vals * full).astype(np.float32)


def to_dtype_np(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(x).to(dtype)  # float32 -> dtype, round to nearest even


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_matches_independent_formula(shape, fp8, out_dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(fp8), str(out_dtype))) % 2**31)
    q = random_codes(shape, fp8, gen)
    grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    # Scales spanning many octaves, as real checkpoints do, kept where fp16 output stays finite.
    s = torch.exp2(torch.randint(-20, 4, grid, generator=gen).float()) * (1 + torch.rand(grid, generator=gen))
    want = to_dtype_np(independent_dequant(q, s.numpy(), (128, 128)), out_dtype)
    got = weight_dequant_torch(q, s, (128, 128), out_dtype)
    assert_bits_equal(got, want)


@pytest.mark.parametrize("block", [(128, 128), (1, 128), (64, 32), (7000, 1000)])
def test_dequant_other_block_sizes(block):
    gen = torch.Generator().manual_seed(7)
    q = random_codes((7000, 1000), torch.float8_e4m3fn, gen)
    grid = (math.ceil(7000 / block[0]), math.ceil(1000 / block[1]))
    s = torch.rand(grid, generator=gen) + 0.01
    want = to_dtype_np(independent_dequant(q, s.numpy(), block), torch.bfloat16)
    assert_bits_equal(weight_dequant_torch(q, s, block), want)


def test_dequant_extreme_scales_take_the_plain_path():
    gen = torch.Generator().manual_seed(3)
    q = random_codes((256, 256), torch.float8_e4m3fn, gen)
    s = torch.tensor([[2.0**125, 1e-38], [3e-45, 1.5]], dtype=torch.float32)
    want = to_dtype_np(independent_dequant(q, s.numpy(), (128, 128)), torch.float32)
    assert_bits_equal(weight_dequant_torch(q, s, out_dtype=torch.float32), want)


def test_dequant_nan_codes_stay_nan():
    q = torch.tensor([[0x7F, 0xFF, 0x01, 0x00]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    y = weight_dequant_torch(q, torch.ones(1, 1), out_dtype=torch.float32)
    assert torch.isnan(y[0, :2]).all() and torch.isfinite(y[0, 2:]).all()


def test_ue8m0_scales_all_encodings_agree():
    gen = torch.Generator().manual_seed(11)
    q = random_codes((300, 260), torch.float8_e4m3fn, gen)
    exps = torch.randint(100, 140, (3, 3), generator=gen).to(torch.uint8)
    as_f32 = torch.exp2(exps.float() - 127)
    assert_bits_equal(scale_to_float32(exps), as_f32)
    assert_bits_equal(scale_to_float32(exps.view(torch.float8_e8m0fnu)), as_f32)
    assert_bits_equal(
        scale_to_float32(exps.view(torch.float8_e8m0fnu)), exps.view(torch.float8_e8m0fnu).float()
    )
    y1 = kernels.weight_dequant(q, exps)
    y2 = kernels.weight_dequant(q, as_f32)
    assert_bits_equal(y1, y2)
    assert torch.isnan(scale_to_float32(torch.tensor([255], dtype=torch.uint8))).all()


# -------------------------------------------------------------------------------------- quantize
def independent_quant(x: np.ndarray, block, scale_fmt="float"):
    """Tile by tile in numpy float32: amax, s = max(amax/448, 2^-126), q = e4m3(clip(x/s))."""
    bm, bn = block
    m, n = x.shape
    s = np.zeros((math.ceil(m / bm), math.ceil(n / bn)), dtype=np.float32)
    y = np.zeros_like(x, dtype=np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = x[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            sc = max(np.float32(np.abs(tile).max()) / np.float32(448), np.float32(2.0**-126))
            sc = np.float32(sc)
            if scale_fmt == "ue8m0":
                sc = np.float32(2.0 ** math.ceil(math.log2(sc)))
            s[i, j] = sc
            y[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = np.clip(tile / sc, -448, 448)
    return torch.from_numpy(y).to(torch.float8_e4m3fn), torch.from_numpy(s)


@pytest.mark.parametrize("shape", [s for s in SMALL_SHAPES if len(s) == 2 and math.prod(s) < 300_000])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_quant_matches_independent_formula(shape, scale_fmt, in_dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 10 ** torch.randint(-4, 4, (1,), generator=gen)).to(in_dtype)
    q, s = weight_quant_torch(x, (128, 128), scale_fmt)
    wq, ws = independent_quant(x.float().numpy(), (128, 128), scale_fmt)
    assert_bits_equal(s, ws)
    assert_bits_equal(q, wq)


def test_quant_zero_and_tiny_tiles_are_finite():
    x = torch.zeros(256, 384)
    x[128:, 128:256] = 1e-40  # float32 subnormals
    x[:128, 256:] = torch.randn(128, 128)
    q, s = weight_quant_torch(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(q.float()).all()
    assert (q[:128, :128].float() == 0).all()
    y = weight_dequant_torch(q, s, out_dtype=torch.float32)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:128, :128], torch.zeros(128, 128))


def test_quant_extreme_magnitudes_saturate_nowhere_but_448():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(300, 300, generator=gen) * 3e38
    x = x.clamp(-3.3e38, 3.3e38)
    q, s = weight_quant_torch(x)
    assert torch.isfinite(s).all()
    assert q.float().abs().max() == 448


def test_stacked_experts_quantize_per_expert():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 130, 257, generator=gen)
    x[1] *= 1000
    q, s = weight_quant_torch(x)
    assert s.shape == (3, 2, 3)
    for e in range(3):
        q2, s2 = weight_quant_torch(x[e])
        assert_bits_equal(q[e], q2)
        assert_bits_equal(s[e], s2)


ROUND_TRIP_BOUND = 0.035  # e4m3 keeps 3 mantissa bits: ~2.5-3% relative Frobenius error on Gaussians


@pytest.mark.parametrize("shape", [(576, 7168), (7000, 1000), (129, 257)])
def test_round_trip_error_on_gaussian_weights(shape):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    q, s = weight_quant_torch(w)
    back = weight_dequant_torch(q, s, out_dtype=torch.float32)
    rel = float((back - w.float()).norm() / w.float().norm())
    assert 0.01 < rel < ROUND_TRIP_BOUND, rel


def test_act_quant_groups_and_zero_groups():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(33, 300, generator=gen).bfloat16()
    x[5, :128] = 0
    q, s = act_quant_torch(x)
    assert q.shape == x.shape and s.shape == (33, 3)
    assert torch.isfinite(s).all() and (q[5, :128].float() == 0).all()
    wq, ws = independent_quant(x.float().numpy(), (1, 128))
    assert_bits_equal(q, wq)
    assert_bits_equal(s, ws)


@pytest.mark.parametrize("shape", [(5, 300), (2, 3, 256), (1, 128), (0, 256)])
def test_act_quant_mn_major(shape):
    """mn_major=True: the same codes and scale values, the scales stored with stride 1 along the rows
    (the group index outermost), and fp8_gemm gives the same result from either layout."""
    x = torch.randn(shape) * 3
    q, s = kernels.act_quant(x)
    q2, s2 = kernels.act_quant(x, mn_major=True)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    assert s2.shape == s.shape and torch.equal(s2, s)
    assert s2.movedim(-1, 0).is_contiguous()
    rows = math.prod(shape[:-1])
    if rows > 1:
        assert s2.stride(-1) == rows and not s2.is_contiguous()
    if rows:
        wq, ws = kernels.weight_quant(torch.randn(130, shape[-1]))
        got = kernels.fp8_gemm(q2, s2, wq, ws, torch.float32)
        assert torch.equal(got, kernels.fp8_gemm(q, s, wq, ws, torch.float32))


@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (7, 300, 257), (16, 1000, 300), (64, 256, 512)])
def test_fp8_gemm_torch_matches_float64(m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    xq, xs = act_quant_torch(torch.randn(m, k, generator=gen))
    wq, ws = weight_quant_torch(torch.randn(n, k, generator=gen) * 0.02)
    got = fp8_gemm_torch(xq, xs, wq, ws, out_dtype=torch.float32)
    ref = fp8_gemm_torch(xq, xs, wq, ws, out_dtype=torch.float64, acc_dtype=torch.float64)
    rel = float((got.double() - ref).norm() / ref.norm())
    assert rel < 1e-6, rel  # float32 accumulation of exact products: ~sqrt(K) * 2^-24
    # and through the public dispatch on CPU
    assert torch.equal(kernels.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32), got)


def test_resolve_device():
    dev, note = kernels.resolve_device("cpu")
    assert dev.type == "cpu" and note is None
    if not torch.cuda.is_available():
        dev, note = kernels.resolve_device("auto")
        assert dev.type == "cpu" and "CPU" in note
        from fp8conv.errors import UsageError

        with pytest.raises(UsageError):
            kernels.resolve_device("cuda")
    with pytest.raises(Exception, match="--device"):
        kernels.resolve_device("tpu")


# ---- launch-state keys (fp8conv.kernels.checks.state_key): what a cached GPU launch depends on ----


def test_state_key_separates_what_a_launch_depends_on():
    """Two calls share a launch state only when shapes, strides, dtypes, devices, pointer alignment and
    the other arguments all agree; the key is computed on CPU tensors the same way as on GPU ones."""
    from fp8conv.kernels.checks import state_key

    base = torch.zeros(64, 96, dtype=torch.bfloat16)
    key = state_key("wq", base, (128, 128), "float", None)
    assert key == state_key("wq", torch.ones(64, 96, dtype=torch.bfloat16), [128, 128], "float", None)
    storage = torch.zeros(64 * 96 + 8, dtype=torch.bfloat16)
    others = {
        "shape": torch.zeros(65, 96, dtype=torch.bfloat16),
        "dtype": torch.zeros(64, 96, dtype=torch.float16),
        "strides": torch.zeros(96, 64, dtype=torch.bfloat16).t(),
        "alignment": storage[1 : 1 + 64 * 96].view(64, 96),
        "device": torch.zeros(64, 96, dtype=torch.bfloat16, device="meta"),
    }
    assert others["alignment"].data_ptr() % 16 != 0
    for what, t in others.items():
        if what == "device":
            # meta and CPU tensors both report device index -1; CUDA tensors their index, so a
            # tensor on another GPU (or on the CPU beside a GPU operand) gives another key
            assert t.get_device() == base.get_device() == -1
            continue
        assert state_key("wq", t, (128, 128), "float", None) != key, what
    assert state_key("wq", base, (1, 128), "float", None) != key
    assert state_key("wq", base, (128, 128), "ue8m0", None) != key
    assert state_key("wq", base, (128, 128), "float", torch.empty(64, 96)) != key  # an out= buffer
    assert state_key("wq", base, {"unhashable": 1}) is None  # then no state is cached: the checks speak


def test_public_functions_write_out_buffers_on_cpu():
    """out= on the CPU paths: the result lands in the caller's buffer, which is returned; a wrong
    buffer is refused."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(130, 260, generator=gen).to(torch.bfloat16)
    q_ref, s_ref = kernels.weight_quant(x)
    q_out, s_out = torch.empty_like(q_ref), torch.full_like(s_ref, float("nan"))
    q, s = kernels.weight_quant(x, out=(q_out, s_out))
    assert q is q_out and s is s_out
    assert_bits_equal(q, q_ref)
    assert_bits_equal(s, s_ref)
    y_out = torch.empty(130, 260, dtype=torch.bfloat16)
    assert kernels.weight_dequant(q, s, out=y_out) is y_out
    assert_bits_equal(y_out, kernels.weight_dequant(q, s))
    aq_ref, as_ref = kernels.act_quant(x, mn_major=True)
    as_out = torch.empty(3, 130).t()
    aq, as_ = kernels.act_quant(x, mn_major=True, out=(None, as_out))
    assert as_ is as_out
    assert_bits_equal(as_.contiguous(), as_ref.contiguous())
    c_out = torch.empty(130, 130)
    assert kernels.fp8_gemm(aq, as_, q, s, torch.float32, out=c_out) is c_out
    assert_bits_equal(c_out, kernels.fp8_gemm(aq, as_, q, s, torch.float32))
    with pytest.raises(ValueError, match="shape"):
        kernels.weight_dequant(q, s, out=y_out[:1])
    with pytest.raises(ValueError, match="dtype"):
        kernels.fp8_gemm(aq, as_, q, s, torch.bfloat16, out=c_out)
    with pytest.raises(ValueError, match="strides"):
        kernels.act_quant(x, mn_major=True, out=(None, torch.empty(130, 3)))
