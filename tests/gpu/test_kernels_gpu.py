"""The Triton kernels against the torch paths, on a CUDA GPU (run: `make test-gpu`).

weight_dequant, weight_quant, act_quant, channel_quant, mx_quant and fp4_dequant must give the same
BYTES as reference.py run on the CPU (codes and scales, atol=0); fp8_gemm must match a float64 product
of the dequantized operands within a stated error bound. Every test draws fresh random data (never
zeros only), and the CUDA caching allocator is filled with NaN before each kernel call, so an output
element a kernel forgets to write shows up as a mismatch.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fp8conv.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# One shape list for every kernel: ragged (not multiples of 128), a single row, a prime, 3-D experts.
SHAPES = [
    (576, 7168),
    (7000, 1000),
    (1, 128),
    (1, 5),
    (129, 257),
    (127, 300),
    (7168, 2048),
    (211, 389),
    (4, 300, 260),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _shape_dtype_params(shapes):
    """Every shape with bf16 input; fp16 and fp32 input on the shapes under 2M elements (the torch
    reference on the CPU is the slow part of these tests)."""
    out = []
    for shape in shapes:
        for dt in FLOAT_DTYPES:
            if dt == torch.bfloat16 or math.prod(shape) < 2_000_000:
                out.append(pytest.param(shape, dt, id=f"{'x'.join(map(str, shape))}-{_DT[dt]}"))
    return out


FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@pytest.fixture(autouse=True)
def fresh_launch_state():
    """Tuning tables and FP8CONV_GEMM_* switches are read when a launch state is built: every test
    starts (and leaves) with none cached, so what it patches takes effect."""
    from fp8conv.kernels.common import clear_launch_state

    clear_launch_state()
    yield
    clear_launch_state()


def _switch(monkeypatch, name: str, value: str) -> None:
    """Set an FP8CONV_GEMM_* switch for the calls that follow (new launch states)."""
    from fp8conv.kernels.common import clear_launch_state

    monkeypatch.setenv(name, value)
    clear_launch_state()


@pytest.fixture(scope="module")
def tk():
    """The quantize / dequantize family."""
    from fp8conv.kernels import quant

    return quant


@pytest.fixture(scope="module")
def gk():
    """The GEMM family."""
    from fp8conv.kernels import gemm

    return gemm


def _gen() -> torch.Generator:
    """A CPU generator with a fresh seed (printed, so a failure can be replayed)."""
    seed = int.from_bytes(os.urandom(8), "little") >> 2
    print(f"seed {seed}")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def poison(nbytes: int) -> None:
    """Leave NaN-filled blocks in the CUDA caching allocator, so torch.empty in a kernel launcher
    likely hands back NaN bytes rather than zeros or a previous correct result."""
    n = max(1, (int(nbytes) * 2 + 3) // 4)
    t = torch.full((n,), float("nan"), dtype=torch.float32, device="cuda")
    u = torch.full((n // 2 + 1,), float("nan"), dtype=torch.float32, device="cuda")
    del t, u


def assert_same_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise equality; on failure name the first differing element with both values and bits."""
    got = got.detach().cpu()
    want = want.detach().cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    iv = _INT_VIEW[got.element_size()]
    gb, wb = got.contiguous().view(iv), want.contiguous().view(iv)
    if torch.equal(gb, wb):
        return
    diff = (gb != wb).nonzero()
    first = tuple(diff[0].tolist())
    mask = (1 << (8 * got.element_size())) - 1
    raise AssertionError(
        f"{what}: {diff.shape[0]} of {got.numel()} elements differ; first at {first}: "
        f"got {got[first].float().item()!r} (0x{int(gb[first]) & mask:x}), "
        f"want {want[first].float().item()!r} (0x{int(wb[first]) & mask:x})"
    )


def random_codes(shape, fp8_dtype, g) -> torch.Tensor:
    """Uniformly random FP8 bit patterns without NaN (e5m2 keeps its infinities)."""
    c = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    if fp8_dtype == torch.float8_e4m3fn:
        c[(c & 0x7F) == 0x7F] = 0x7E
    else:
        c[(c & 0x7F) > 0x7C] = 0x7B
    return c.view(fp8_dtype)


def random_scales(shape, kind: str, g) -> torch.Tensor:
    """Positive float32 scales. 'float': log-uniform over 2**-60..2**60 with extremes planted
    (1e-30, 1e30, a float32 subnormal 1e-39, 2**-126); 'ue8m0': powers of two 2**-127..2**100."""
    n = math.prod(shape)
    if kind == "float":
        e = torch.randint(-60, 61, (n,), generator=g).to(torch.float64)
        s = (torch.rand(n, generator=g, dtype=torch.float64) + 1.0) * torch.exp2(e)
        extremes = [1e-30, 1e30, 1e-39, 2.0**-126]
    else:
        s = torch.exp2(torch.randint(-127, 101, (n,), generator=g).to(torch.float64))
        extremes = [2.0**-127, 2.0**100, 2.0**-126, 1.0]
    s = s.to(torch.float32)
    k = min(n, len(extremes))
    s[:k] = torch.tensor(extremes[:k], dtype=torch.float32)
    return s[torch.randperm(n, generator=g)].reshape(shape)


def random_weights(shape, dtype, g) -> torch.Tensor:
    """randn with a magnitude per row drawn log-uniformly from 1e-6..1e4, an all-zero tile / group,
    a tile of tiny values (1e-40, float32/bf16 subnormals) and a few signed zeros."""
    x = torch.randn(shape, generator=g)
    mag = torch.pow(10.0, torch.rand(x.shape[-2], generator=g) * 10 - 6)
    x.mul_(mag[:, None])
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 128 or x2.shape[1] > 128:  # more than one tile (never all zero)
        x2[:128, :128] = 0.0  # first tile: all zero
        r0 = 128 if x2.shape[0] > 128 else 0
        c0 = 128 if r0 == 0 else 0
        tile = x2[r0 : r0 + 128, c0 : c0 + 128]
        tile.copy_(torch.randn(tile.shape, generator=g) * 1e-40)
    x2.view(-1)[-3:] = -0.0
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


# ---- weight_dequant --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("scale_kind", ["float", "ue8m0"])
def test_weight_dequant_bit_exact(tk, shape, fp8_dtype, out_dtype, scale_kind):
    g = _gen()
    q = random_codes(shape, fp8_dtype, g)
    s = random_scales(ref.scale_grid(shape, (128, 128)), scale_kind, g)
    poison(q.numel() * 4)
    y = tk.weight_dequant_triton(q.cuda(), s.cuda(), (128, 128), out_dtype)
    assert y.dtype == out_dtype and y.device.type == "cuda"
    want = ref.weight_dequant_torch(q, s, (128, 128), out_dtype)
    assert_same_bytes(y, want, f"dequant {shape} {fp8_dtype} -> {out_dtype} ({scale_kind} scales)")


@pytest.mark.parametrize("block", [(1, 128), (64, 32), (128, 256), (3, 100), "tensor"])
@pytest.mark.parametrize("shape", [(7000, 1000), (129, 257), (4, 300, 260)], ids=str)
def test_weight_dequant_block_sizes(tk, shape, block):
    g = _gen()
    if block == "tensor":
        block = (shape[-2], shape[-1])
    q = random_codes(shape, torch.float8_e4m3fn, g)
    s = random_scales(ref.scale_grid(shape, block), "float", g)
    poison(q.numel() * 4)
    y = tk.weight_dequant_triton(q.cuda(), s.cuda(), block, torch.bfloat16)
    assert_same_bytes(
        y, ref.weight_dequant_torch(q, s, block, torch.bfloat16), f"dequant {shape} block {block}"
    )


def test_weight_dequant_nan_codes(tk):
    g = _gen()
    q = random_codes((300, 260), torch.float8_e4m3fn, g).view(torch.uint8)
    q[::7, ::5] = 0x7F
    q[1::11, ::3] = 0xFF
    q = q.view(torch.float8_e4m3fn)
    s = random_scales(ref.scale_grid(q.shape, (128, 128)), "float", g)
    y = tk.weight_dequant_triton(q.cuda(), s.cuda()).cpu()
    want = ref.weight_dequant_torch(q, s)
    assert torch.equal(y.isnan(), want.isnan())
    keep = ~want.isnan()
    assert_same_bytes(y[keep], want[keep], "dequant around NaN codes")


def test_weight_dequant_validates(tk):
    q = torch.zeros(256, 256, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.ones(2, 2, device="cuda")
    with pytest.raises(ValueError, match="scale shape"):
        tk.weight_dequant_triton(q, torch.ones(2, 3, device="cuda"))
    with pytest.raises(ValueError, match="dtype"):
        tk.weight_dequant_triton(q.view(torch.uint8), s)
    with pytest.raises(ValueError, match="contiguous"):
        tk.weight_dequant_triton(q.t(), s)
    with pytest.raises(ValueError, match="out_dtype"):
        tk.weight_dequant_triton(q, s, (128, 128), torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        tk.weight_dequant_triton(q, s.double())


# ---- weight_quant ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape, in_dtype", _shape_dtype_params(SHAPES))
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_weight_quant_bit_exact(tk, shape, in_dtype, scale_fmt):
    g = _gen()
    x = random_weights(shape, in_dtype, g)
    poison(x.numel() * 2)
    q, s = tk.weight_quant_triton(x.cuda(), (128, 128), scale_fmt)
    qr, sr = ref.weight_quant_torch(x, (128, 128), scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert_same_bytes(s, sr, f"quant scales {shape} {in_dtype} {scale_fmt}")
    assert_same_bytes(q, qr, f"quant codes {shape} {in_dtype} {scale_fmt}")
    assert not s.isnan().any() and not q.float().isnan().any()


@pytest.mark.parametrize("block", [(1, 128), (64, 64), (32, 128), (3, 100), (256, 512), "tensor"])
@pytest.mark.parametrize("shape", [(7000, 1000), (129, 257), (4, 300, 260)], ids=str)
def test_weight_quant_block_sizes(tk, shape, block):
    g = _gen()
    if block == "tensor":
        block = (shape[-2], shape[-1])
    x = random_weights(shape, torch.bfloat16, g)
    poison(x.numel() * 2)
    q, s = tk.weight_quant_triton(x.cuda(), block, "float")
    qr, sr = ref.weight_quant_torch(x, block, "float")
    assert_same_bytes(s, sr, f"quant scales {shape} block {block}")
    assert_same_bytes(q, qr, f"quant codes {shape} block {block}")


@pytest.mark.parametrize("shape", [(7000, 1000), (576, 7168), (4, 300, 260)], ids=str)
def test_weight_quant_int64_offsets(tk, monkeypatch, shape):
    """The int64 in-tile offsets (for rows x row length >= 2**31, forced here) give the same bytes."""
    monkeypatch.setattr(tk, "_OFFS32_LIMIT", 0)
    x = random_weights(shape, torch.bfloat16, _gen())
    q, s = tk.weight_quant_triton(x.cuda())
    qr, sr = ref.weight_quant_torch(x)
    assert_same_bytes(s, sr, f"quant scales {shape} int64 offsets")
    assert_same_bytes(q, qr, f"quant codes {shape} int64 offsets")


@pytest.mark.parametrize("cap", [None, 128])
def test_weight_quant_register_cap(tk, monkeypatch, cap):
    """With and without the register cap of the 8-aligned build, the torch reference's bytes."""
    monkeypatch.setitem(tk.WEIGHT_QUANT, "maxnreg_narrow", cap)
    for dtype in FLOAT_DTYPES:
        x = random_weights((7000, 1000), dtype, _gen())
        q, s = tk.weight_quant_triton(x.cuda())
        qr, sr = ref.weight_quant_torch(x)
        assert_same_bytes(s, sr, f"quant scales {dtype} cap {cap}")
        assert_same_bytes(q, qr, f"quant codes {dtype} cap {cap}")


def test_weight_quant_e5m2_and_saturation(tk):
    g = _gen()
    x = random_weights((300, 260), torch.float32, g)
    x[5, 7] = 3e38  # a huge value: its tile's scale is huge, the rest of the tile becomes ~0
    for fp8 in FP8_DTYPES:
        q, s = tk.weight_quant_triton(x.cuda(), (128, 128), "float", fp8)
        qr, sr = ref.weight_quant_torch(x, (128, 128), "float", fp8)
        assert_same_bytes(s, sr, f"scales {fp8}")
        assert_same_bytes(q, qr, f"codes {fp8}")


def test_weight_quant_nan_input_gives_nan_scale(tk):
    """A NaN in the input shows up as a NaN scale of its tile (as torch.amax propagates it)."""
    x = torch.randn(300, 260)
    x[130, 140] = float("nan")
    _, s = tk.weight_quant_triton(x.cuda())
    _, sr = ref.weight_quant_torch(x)
    assert torch.equal(s.cpu().isnan(), sr.isnan())


def test_weight_quant_validates(tk):
    x = torch.randn(256, 256, device="cuda")
    with pytest.raises(ValueError, match="scale_fmt"):
        tk.weight_quant_triton(x, (128, 128), "e8m0")
    with pytest.raises(ValueError, match="block_size"):
        tk.weight_quant_triton(x, (0, 128))
    with pytest.raises(ValueError, match="contiguous"):
        tk.weight_quant_triton(x.t())
    with pytest.raises(ValueError, match="dtype"):
        tk.weight_quant_triton(x.to(torch.int32))


# ---- act_quant -------------------------------------------------------------------------------


def random_activations(shape, dtype, g) -> torch.Tensor:
    x = torch.randn(shape, generator=g)
    x2 = x.reshape(-1, x.shape[-1])
    mag = torch.pow(10.0, torch.rand(x2.shape[0], 1, generator=g) * 10 - 6)
    x2.mul_(mag)
    x2[1::3, :128] = 0.0  # zero groups (row 0 stays non-zero)
    x2[1::5, -100:] = 0.0  # a zero (partial, at ragged K) last group
    x2[2::7, :64] *= 1e-35  # tiny groups: subnormal fp32 values
    x2.view(-1)[:2] = -0.0
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


# (7000, 1000), (4096, 1000), (37, 1000), (1, 1024), (3, 4, 256), (2, 130, 140): whole short rows per
# program (a power-of-two count of groups)
ACT_SHAPES = SHAPES + [
    (2, 3, 7168),
    (4096, 300),
    (4096, 1000),
    (37, 1000),
    (1, 1024),
    (3, 4, 256),
    (2, 130, 140),
]


@pytest.mark.parametrize("shape, in_dtype", _shape_dtype_params(ACT_SHAPES))
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_act_quant_bit_exact(tk, shape, in_dtype, scale_fmt):
    g = _gen()
    x = random_activations(shape, in_dtype, g)
    poison(x.numel() * 2)
    q, s = tk.act_quant_triton(x.cuda(), 128, scale_fmt)
    qr, sr = ref.act_quant_torch(x, 128, scale_fmt)
    assert q.shape == x.shape and s.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    assert_same_bytes(s, sr, f"act scales {shape} {in_dtype} {scale_fmt}")
    assert_same_bytes(q, qr, f"act codes {shape} {in_dtype} {scale_fmt}")
    assert not s.isnan().any() and not q.float().isnan().any()
    assert (s.cpu() >= 2.0**-126).all()  # zero groups: the finite floor, never 0


@pytest.mark.parametrize(
    "group, k", [(32, 7168), (64, 7168), (100, 7168), (256, 7168), (7168, 7168), (100, 400), (64, 512)]
)
def test_act_quant_group_sizes(tk, group, k):
    g = _gen()
    x = random_activations((37, k), torch.bfloat16, g)
    q, s = tk.act_quant_triton(x.cuda(), group)
    qr, sr = ref.act_quant_torch(x, group)
    assert_same_bytes(s, sr, f"act scales group {group}")
    assert_same_bytes(q, qr, f"act codes group {group}")


def test_act_quant_all_zero_is_finite(tk):
    """The seed kernel's defect: an all-zero group gave scale 0 and NaN codes."""
    x = torch.zeros(4, 384, dtype=torch.bfloat16, device="cuda")
    x[1, 200] = 1.0
    q, s = tk.act_quant_triton(x)
    assert not q.float().isnan().any()
    assert (s[0] == 2.0**-126).all() and (q[0].view(torch.uint8) == 0).all()


@pytest.mark.parametrize(
    "shape_group",
    [
        ((1, 7168), 128),
        ((37, 300), 128),
        ((4, 5, 1040), 128),
        ((0, 256), 128),
        ((3, 33000), 32768),
        ((37, 1000), 128),
        ((5, 400), 100),
    ],
    ids=str,
)
def test_act_quant_mn_major_bit_exact(tk, shape_group):
    """mn_major=True: the torch path's codes and scale bytes, the scales written with stride 1 along
    the rows by the kernel (group 32768 takes the two-pass path and is re-laid out)."""
    shape, group = shape_group
    x = random_activations(shape, torch.bfloat16, _gen())
    q, s = tk.act_quant_triton(x.cuda(), group, mn_major=True)
    qr, sr = ref.act_quant_torch(x, group)
    assert s.shape == sr.shape and s.movedim(-1, 0).is_contiguous()
    assert_same_bytes(s.contiguous(), sr, f"act scales mn-major {shape}")
    assert_same_bytes(q, qr, f"act codes mn-major {shape}")


# ---- fp8_gemm --------------------------------------------------------------------------------
#
# Error bound. Dequantized operands are A = qa * sa, B = qb * sb with e4m3 codes; the reference is
# their product in float64 (fp8_gemm_torch with acc_dtype=float64, on the CPU). The kernel:
#  * multiplies e4m3 codes on the tensor cores: a product of two 4-bit significands is exact (8 bits);
#  * sums each 128-long K block in the tensor-core accumulator, which on Hopper keeps fewer than
#    fp32's 24 bits for FP8 inputs (about 13-14 bits are reported for H800): per block a relative
#    error up to ~2^-13 of the block's magnitude, random in sign;
#  * scales each block sum by sa * sb (one fp32 rounding, 2^-24) and accumulates in fp32 over
#    K/128 blocks (2^-24 per addition).
# So the float32 output lands near 1e-4 relative (Frobenius) for random data; we allow 1e-3.
# bf16 output adds one rounding to an 8-bit significand: at most 2^-8 relative per element, RMS
# about 1.6e-3 over random values; we allow 8e-3 (the worst case 2^-8 = 3.9e-3, plus the above,
# with a factor two of margin).
GEMM_TOL = {torch.float32: 1e-3, torch.bfloat16: 8e-3}


def _gemm_operands(m, n, k, g):
    a = torch.randn(m, k, generator=g) * torch.pow(10.0, torch.rand(m, 1, generator=g) * 4 - 2)
    b = torch.randn(n, k, generator=g) * 0.05
    aq, as_ = ref.act_quant_torch(a, 128)
    bq, bs = ref.weight_quant_torch(b, (128, 128))
    return aq, as_, bq, bs


def _check_gemm(gk, aq, as_, bq, bs, out_dtype, what):
    poison(aq.shape[0] * bq.shape[0] * 4)
    c = gk.fp8_gemm_triton(aq.cuda(), as_.cuda(), bq.cuda(), bs.cuda(), out_dtype)
    assert c.dtype == out_dtype and c.shape == (*aq.shape[:-1], bq.shape[0])
    c = c.cpu()
    assert not c.isnan().any(), f"{what}: NaN in the output"
    want = ref.fp8_gemm_torch(aq, as_, bq, bs, torch.float64, acc_dtype=torch.float64)
    err = ((c.double() - want).norm() / want.norm()).item()
    assert err <= GEMM_TOL[out_dtype], f"{what}: relative error {err:.2e} > {GEMM_TOL[out_dtype]}"


@pytest.mark.parametrize("m", [1, 7, 128, 300, 4096])
# K = 300 and 200 take the pointer kernel (rows not 16-byte aligned); 1040 and 4096 the TMA kernel
# on Hopper (1040: a ragged last K block zero-filled by TMA).
@pytest.mark.parametrize("nk", [(1000, 300), (384, 1040), (130, 200), (256, 4096)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_gemm_ragged(gk, m, nk, out_dtype):
    n, k = nk
    aq, as_, bq, bs = _gemm_operands(m, n, k, _gen())
    _check_gemm(gk, aq, as_, bq, bs, out_dtype, f"gemm {m}x{n}x{k}")


@pytest.mark.parametrize("nk", [(7168, 18432), (24576, 1536), (4096, 7168), (7168, 2048)], ids=str)
def test_fp8_gemm_model_shapes(gk, nk):
    n, k = nk
    aq, as_, bq, bs = _gemm_operands(128, n, k, _gen())
    _check_gemm(gk, aq, as_, bq, bs, torch.bfloat16, f"gemm 128x{n}x{k}")


@pytest.mark.parametrize("kernel", ["wgmma", "tma", "pointer"])
@pytest.mark.parametrize("mnk", [(300, 1000, 1040), (4096, 384, 7168), (257, 7168, 2048)], ids=str)
def test_fp8_gemm_each_kernel(gk, monkeypatch, kernel, mnk):
    """The Gluon (warp-specialized), TMA and pointer kernels on the same problems: M and N ragged,
    K % 128 != 0, and model shapes."""
    monkeypatch.setenv("FP8CONV_GEMM_WGMMA", "1" if kernel == "wgmma" else "0")
    monkeypatch.setattr(gk, "GEMM_WGMMA_MIN_M", 0)  # the Gluon kernel at any M it accepts
    monkeypatch.setenv("FP8CONV_GEMM_TMA", "0" if kernel == "pointer" else "1")
    if kernel == "wgmma":
        from fp8conv.kernels import gluon_gemm

        assert gluon_gemm.usable(
            torch.empty(mnk[0], mnk[2], device="cuda"), torch.empty(mnk[1], 1, device="cuda"), mnk[2]
        )
    aq, as_, bq, bs = _gemm_operands(*mnk, _gen())
    for out_dtype in (torch.float32, torch.bfloat16):
        _check_gemm(gk, aq, as_, bq, bs, out_dtype, f"gemm {mnk} {kernel} {out_dtype}")


def test_fp8_gemm_falls_back_when_gluon_does_not_compile(gk, monkeypatch):
    """A Triton whose Gluon API the Hopper kernel does not compile with: fp8_gemm warns once and
    gives the Triton kernels' bits."""
    import ast

    from triton.compiler.errors import CompilationError

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on Hopper only")
    from fp8conv.kernels import gluon_gemm

    g = _gen()
    a, a_s = ref.act_quant_torch(torch.randn(300, 1024, generator=g))
    b, b_s = ref.weight_quant_torch(torch.randn(512, 1024, generator=g))
    args = (a.cuda(), a_s.cuda(), b.cuda(), b_s.cuda())
    _switch(monkeypatch, "FP8CONV_GEMM_WGMMA", "0")
    want = gk.fp8_gemm_triton(*args)
    _switch(monkeypatch, "FP8CONV_GEMM_WGMMA", "1")
    calls = []

    def broken(*a, **k):
        calls.append(1)
        try:
            raise RuntimeError("async_copy_global_to_shared has been removed")
        except RuntimeError as inner:
            raise CompilationError("x = 1", ast.parse("x = 1").body[0], None) from inner

    # the launch state is built as usual; its first launch (where Triton compiles) fails
    monkeypatch.setattr(gluon_gemm, "prepare", lambda *a, **k: broken)
    monkeypatch.setattr(gk, "_WGMMA_BROKEN", [])
    with pytest.warns(RuntimeWarning, match="has been removed"):
        got = gk.fp8_gemm_triton(*args)
    assert_same_bytes(got, want, "fallback after a Gluon compile failure")
    got2 = gk.fp8_gemm_triton(*args)  # no second attempt
    assert_same_bytes(got2, want, "second call")
    assert calls == [1]


@pytest.mark.parametrize(
    "mnk",
    [
        (1, 256, 256),
        (7, 1000, 1040),
        (33, 7168, 2048),
        (200, 130, 256),
        (300, 1000, 1040),
        (1000, 4096, 7168),
        (4096, 384, 7168),
    ],
    ids=str,
)
def test_fp8_gemm_gluon_scale_layouts_and_tile_widths(gk, monkeypatch, mnk):
    """The Gluon kernel with row-major and MN-major A scales and with 64- and 128-wide tiles: the same
    bits every way (the same block sums in the same order), within the bound of the float64 reference;
    the public call with MN-major scales matches too, also through the Triton kernels."""
    from fp8conv.kernels import gluon_gemm

    m, n, k = mnk
    aq, as_, bq, bs = (t.cuda() for t in _gemm_operands(m, n, k, _gen()))
    assert gluon_gemm.usable(aq, bq, k)
    as_mn = ref.to_mn_major(as_)
    assert as_mn.stride() == (1, m) or m == 1
    outs = {}
    for bn in (64, 128):
        for name, sc in (("row", as_), ("mn", as_mn)):
            c = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")
            outs[bn, name] = gluon_gemm.fp8_gemm_wgmma(aq, sc, bq, bs, c, block_n=bn).cpu()
    first = outs[64, "row"]
    for key, c in outs.items():
        same = torch.equal(c.view(torch.int32), first.view(torch.int32))
        assert same, f"gemm {mnk} {key} differs from (64, row)"
    want = ref.fp8_gemm_torch(aq.cpu(), as_.cpu(), bq.cpu(), bs.cpu(), torch.float64, acc_dtype=torch.float64)
    err = ((first.double() - want).norm() / want.norm()).item()
    assert err <= GEMM_TOL[torch.float32], f"gemm {mnk}: relative error {err:.2e}"
    for wgmma in ("1", "0"):
        _switch(monkeypatch, "FP8CONV_GEMM_WGMMA", wgmma)
        c = gk.fp8_gemm_triton(aq, as_mn, bq, bs, torch.float32).cpu()
        err = ((c.double() - want).norm() / want.norm()).item()
        assert err <= GEMM_TOL[torch.float32], f"gemm {mnk} public, WGMMA={wgmma}: error {err:.2e}"
        if wgmma == "1" and m >= 33:
            same = torch.equal(c.view(torch.int32), first.view(torch.int32))
            assert same, f"gemm {mnk}: public call differs from the kernel called directly"


def test_fp8_gemm_batched_leading_dims(gk):
    aq, as_, bq, bs = _gemm_operands(2 * 3 * 5, 260, 384, _gen())
    aq, as_ = aq.reshape(2, 15, 384), as_.reshape(2, 15, 3)
    _check_gemm(gk, aq, as_, bq, bs, torch.float32, "gemm [2, 15, 384]")


def test_fp8_gemm_validates(gk):
    aq, as_, bq, bs = (t.cuda() for t in _gemm_operands(4, 256, 256, _gen()))
    with pytest.raises(ValueError, match="a_scale"):
        gk.fp8_gemm_triton(aq, as_[:, :1].contiguous(), bq, bs)
    with pytest.raises(ValueError, match="inner"):
        gk.fp8_gemm_triton(aq, as_, bq[:, :128].contiguous(), bs)
    with pytest.raises(ValueError, match="dtype"):
        gk.fp8_gemm_triton(aq.view(torch.uint8), as_, bq, bs)


# ---- the quantizers' division ----------------------------------------------------------------


def test_division_exhaustive_bf16_fp16(tk):
    """Markstein's quotient equals div.rn.f32 for every bf16 and fp16 significand against every
    float32 significand of s (the float32 x sweep, 2^46 pairs, is bench/div_check.py)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from div_check import exhaustive

    for bits in (7, 10):
        bad, done, total, _ = exhaustive(bits)
        assert done == total == (1 << 23) * (1 << bits)
        assert bad == 0, f"{bad} pairs differ for {bits}-bit significands"
    # the checker sees a difference where there is one: the plain product x * RN(1/s) is not RN(x/s)
    bad, _, total, _ = exhaustive(7, naive=True)
    assert 0 < bad < total


def assert_same_bytes_but_nan_sign(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """assert_same_bytes, except that a NaN may carry either sign bit (an x86 CPU makes inf / inf
    and NaN arithmetic negative NaNs, a GPU positive ones): NaN where want is NaN, same bytes elsewhere."""
    got, want = got.detach().cpu(), want.detach().cpu()
    nan = want.float().isnan()
    assert nan.sum() < want.numel(), f"{what}: the test data should not be all NaN"
    assert got.float().isnan().equal(nan), f"{what}: NaN at different places"
    iv = _INT_VIEW[got.element_size()]
    same_nans = got.contiguous().view(iv).clone()
    same_nans[nan] = want.contiguous().view(iv)[nan]  # take want's NaN bits, then compare everything
    assert_same_bytes(same_nans.view(got.dtype), want, what)


def extreme_tiles(dtype) -> torch.Tensor:
    """128 x 128 tiles, one kind each: ordinary, tiny (scale < 2^-90), subnormal only, huge (scale >
    2^100), with an inf, with a NaN, all +-0, ordinary with tiny and subnormal members."""
    g = _gen()
    tiles = [torch.randn(128, 128, generator=g) for _ in range(8)]
    tiles[1] *= 1e-30
    tiles[2] = torch.randn(128, 128, generator=g) * 1e-39
    tiles[3] *= 1e35
    tiles[4][3, 4] = float("inf")
    tiles[4][5, 6] = -float("inf")
    tiles[5][7, 8] = float("nan")
    tiles[6] = torch.where(torch.rand(128, 128, generator=g) < 0.5, 0.0, -0.0)
    tiles[7][:, :64] *= 1e-38
    x = torch.cat(tiles, dim=1)
    if dtype == torch.float16:
        x = torch.cat([tiles[0], tiles[4], tiles[5], tiles[6], tiles[7]], dim=1).clamp(-6e4, 6e4)
    return x.to(dtype)


@pytest.mark.parametrize("div", [0, 1, 2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: _DT[d])
def test_weight_quant_division_paths(tk, monkeypatch, div, dtype):
    """Every division path of weight_quant gives the torch reference's bytes, special tiles included."""
    monkeypatch.setitem(tk.WEIGHT_QUANT, "div", div)
    x = extreme_tiles(dtype)
    q, s = tk.weight_quant_triton(x.cuda())
    qr, sr = ref.weight_quant_torch(x)
    assert_same_bytes_but_nan_sign(s, sr, f"scales div={div} {dtype}")
    assert_same_bytes_but_nan_sign(q, qr, f"codes div={div} {dtype}")


@pytest.mark.parametrize("div", [0, 2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: _DT[d])
def test_act_quant_division_paths(tk, monkeypatch, div, dtype):
    monkeypatch.setitem(tk.ACT_QUANT_TILE, "div", div)
    monkeypatch.setitem(tk.ACT_QUANT_TILE, "small_div", div)
    x = extreme_tiles(dtype)
    q, s = tk.act_quant_triton(x.cuda())
    qr, sr = ref.act_quant_torch(x)
    assert_same_bytes_but_nan_sign(s, sr, f"act scales div={div} {dtype}")
    assert_same_bytes_but_nan_sign(q, qr, f"act codes div={div} {dtype}")


# ---- FP4 (MX e2m1) dequantization --------------------------------------------------------------


def random_fp4(shape, g, nan_scales: bool = True):
    """Random code bytes [..., G, 16] and e8m0 scale bytes [..., G] over the whole exponent range
    (0 = 2**-127, a float32 subnormal; 255 = NaN where nan_scales)."""
    blocks = torch.randint(0, 256, shape, dtype=torch.int32, generator=g).to(torch.uint8)
    scales = torch.randint(0, 256 if nan_scales else 255, shape[:-1], dtype=torch.int32, generator=g)
    return blocks, scales.to(torch.uint8)


def assert_same_bytes_or_both_nan(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN in the same places (the GPU writes the canonical NaN, the CPU keeps the scale's payload);
    every other element bit for bit."""
    got = got.cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN in different places"
    keep = ~want.isnan()
    assert_same_bytes(got[keep], want[keep], what)


FP4_SHAPES = [(1, 16), (3, 16), (257, 16), (2, 7, 3, 16), (4, 640, 90, 16), (129, 1, 16)]


@pytest.mark.parametrize("shape", FP4_SHAPES, ids=["x".join(map(str, s)) for s in FP4_SHAPES])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: _DT[d])
def test_fp4_dequant_bit_exact(shape, out_dtype):
    """The Triton kernel against reference.fp4_dequant_torch on the CPU, every exponent byte."""
    from fp8conv.kernels import fp4

    blocks, scales = random_fp4(shape, _gen())
    want = ref.fp4_dequant_torch(blocks, scales, out_dtype)
    poison(want.numel() * want.element_size())
    got = fp4.fp4_dequant_triton(blocks.cuda(), scales.cuda(), out_dtype)
    assert got.shape == want.shape and got.dtype == out_dtype
    assert_same_bytes_or_both_nan(got, want, f"fp4 {shape} {out_dtype}")
    # again with the same shapes and new data: the cached launch state, launched directly
    blocks, scales = random_fp4(shape, _gen())
    got = fp4.fp4_dequant_triton(blocks.cuda(), scales.cuda(), out_dtype)
    assert_same_bytes_or_both_nan(got, ref.fp4_dequant_torch(blocks, scales, out_dtype), "fp4, second call")


def test_fp4_dequant_storage_dtypes_and_dispatch():
    """int8 code bytes and float8_e8m0fnu scales read as their bytes; the public dispatch takes the
    kernel on CUDA and writes into out=."""
    from fp8conv import kernels

    blocks, scales = random_fp4((3, 50, 16), _gen())
    want = ref.fp4_dequant_torch(blocks, scales)
    b, s = blocks.cuda(), scales.cuda()
    assert_same_bytes_or_both_nan(kernels.fp4_dequant(b.view(torch.int8), s), want, "int8 blocks")
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None:
        assert_same_bytes_or_both_nan(kernels.fp4_dequant(b, s.view(e8m0)), want, "e8m0 scales")
    out = torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    assert kernels.fp4_dequant(b, s, out=out) is out
    assert_same_bytes_or_both_nan(out, want, "out=")
    with pytest.raises(ValueError, match="shape"):
        kernels.fp4_dequant(b, s, out=out[:1])


# ---- channel_quant and mx_quant ------------------------------------------------------------------

# Rows below and above one register tile (18432 > 16384: the two-pass row path), ragged, 3-D experts.
SCHEME_SHAPES = [(576, 7168), (128, 18432), (7000, 1000), (1, 5), (211, 389), (4, 300, 260), (3, 96)]
MX_SHAPES = [(576, 7168), (64, 18432), (7000, 1024), (1, 32), (211, 4128), (4, 300, 256), (3, 96)]


def _scheme_params(shapes):
    out = []
    for shape in shapes:
        for dt in FLOAT_DTYPES:
            if dt == torch.bfloat16 or math.prod(shape) < 1_000_000:
                out.append(pytest.param(shape, dt, id=f"{'x'.join(map(str, shape))}-{_DT[dt]}"))
    return out


@pytest.mark.parametrize("shape, in_dtype", _scheme_params(SCHEME_SHAPES))
def test_channel_quant_bit_exact(tk, shape, in_dtype):
    g = _gen()
    x = random_weights(shape, in_dtype, g)
    poison(x.numel() * 2)
    q, s = tk.channel_quant_triton(x.cuda())
    qr, sr = ref.channel_quant_torch(x)
    assert s.shape == (*shape[:-1], 1)
    assert_same_bytes(s, sr, f"channel scales {shape} {in_dtype}")
    assert_same_bytes(q, qr, f"channel codes {shape} {in_dtype}")


def mx_weights(shape, dtype, g) -> torch.Tensor:
    """random_weights with the groups where the MX rules differ planted: amax exactly 1.75 * 2**k,
    an all-zero group, float32 / bf16 subnormals only, a group at float32's top."""
    x = random_weights(shape, torch.float32, g)
    grp = x.view(-1, 32)
    k = grp.shape[0]
    for i, fill in enumerate([None, 0.0, 2.0**-130, None]):
        if i < k and fill is not None:
            grp[i] = fill * (1 + torch.rand(32, generator=g))
    grp[0, 3] = 1.75 * 2.0 ** int(torch.randint(-20, 20, (1,), generator=g))
    if k > 3 and dtype != torch.float16:
        grp[3, 7] = 3.0e38
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


@pytest.mark.parametrize("rule", ["ceil", "ct"])
@pytest.mark.parametrize("shape, in_dtype", _scheme_params(MX_SHAPES))
def test_mx_quant_bit_exact(tk, shape, in_dtype, rule):
    g = _gen()
    x = mx_weights(shape, in_dtype, g)
    poison(x.numel() * 2)
    q, e = tk.mx_quant_triton(x.cuda(), rule)
    qr, er = ref.mx_quant_torch(x, rule)
    assert e.dtype == torch.uint8 and e.shape == (*shape[:-1], shape[-1] // 32)
    assert_same_bytes(e, er, f"mx exponents {shape} {in_dtype} {rule}")
    assert_same_bytes(q, qr, f"mx codes {shape} {in_dtype} {rule}")


def test_mx_quant_nonfinite_groups_and_validation(tk):
    x = torch.randn(4, 96)
    x[0, 3], x[2, 40], x[3, 95] = float("inf"), float("nan"), -float("inf")
    for rule in ("ceil", "ct"):
        e = tk.mx_quant_triton(x.cuda(), rule)[1].cpu()
        assert torch.equal(e, ref.mx_quant_torch(x, rule)[1])
        assert e[0, 0] == e[2, 1] == e[3, 2] == 255
    with pytest.raises(ValueError, match="multiple of 32"):
        tk.mx_quant_triton(torch.zeros(2, 48, device="cuda"))
    with pytest.raises(ValueError, match="rule"):
        tk.mx_quant_triton(torch.zeros(2, 64, device="cuda"), "floor")


def test_scheme_quantizers_dispatch_and_out(tk):
    """kernels.channel_quant / mx_quant take the Triton kernels on CUDA (a launch state appears) and
    write into out= buffers."""
    from fp8conv import kernels
    from fp8conv.kernels import common

    x = random_weights((300, 256), torch.bfloat16, _gen())
    xc = x.cuda()
    common.clear_launch_state()
    q, s = kernels.channel_quant(xc)
    q2, e = kernels.mx_quant(xc, "ct")
    assert len(common.launch_state_keys()) == 2
    assert_same_bytes(s, ref.channel_quant_torch(x)[1], "dispatch channel scales")
    assert_same_bytes(e, ref.mx_quant_torch(x, "ct")[1], "dispatch mx exponents")
    qo, so = torch.empty_like(q), torch.full_like(s, float("nan"))
    assert kernels.channel_quant(xc, out=(qo, so))[1] is so
    assert_same_bytes(so, s, "channel out=")
    qo, eo = torch.empty_like(q2), torch.zeros_like(e)
    r = kernels.mx_quant(xc, "ct", out=(qo, eo))
    assert r[0] is qo and r[1] is eo
    assert_same_bytes(qo, q2, "mx out=")
    assert_same_bytes(eo, e, "mx out= exponents")


# ---- out= buffers and the cached launch state --------------------------------------------------


def test_out_buffers_are_written_and_returned(tk, gk):
    from fp8conv import kernels

    g = _gen()
    x = random_weights((300, 260), torch.bfloat16, g).cuda()
    q_ref, s_ref = kernels.weight_quant(x)
    q_out = torch.empty_like(q_ref)
    s_out = torch.full_like(s_ref, float("nan"))
    q, s = kernels.weight_quant(x, out=(q_out, s_out))
    assert q is q_out and s is s_out
    assert_same_bytes(q, q_ref, "weight_quant out=")
    assert_same_bytes(s, s_ref, "weight_quant out= scales")
    y_out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    assert kernels.weight_dequant(q, s, out=y_out) is y_out
    assert_same_bytes(y_out, kernels.weight_dequant(q, s), "weight_dequant out=")
    for mn_major in (False, True):
        aq_ref, as_ref = kernels.act_quant(x, mn_major=mn_major)
        aq_out = torch.empty_like(aq_ref)
        as_out = ref.empty_scales((300,), 3, "cuda", mn_major).fill_(float("nan"))
        aq, as_ = kernels.act_quant(x, mn_major=mn_major, out=(aq_out, as_out))
        assert aq is aq_out and as_ is as_out
        assert_same_bytes(aq, aq_ref, "act_quant out=")
        assert_same_bytes(as_.contiguous(), as_ref.contiguous(), "act_quant out= scales")
    with pytest.raises(ValueError, match="strides"):
        kernels.act_quant(x, mn_major=True, out=(None, torch.empty(300, 3, device="cuda")))
    aq, as_ = kernels.act_quant(x)
    c_out = torch.full((300, 300), float("nan"), dtype=torch.float32, device="cuda")
    assert kernels.fp8_gemm(aq, as_, q, s, torch.float32, out=c_out) is c_out
    assert_same_bytes(c_out, kernels.fp8_gemm(aq, as_, q, s, torch.float32), "fp8_gemm out=")
    with pytest.raises(ValueError, match="dtype"):
        kernels.fp8_gemm(aq, as_, q, s, torch.bfloat16, out=c_out)


def test_launch_state_is_keyed_and_reused(tk, gk):
    """A repeated call reuses its state and launches the compiled kernel directly (same bits); a new
    shape, dtype, stride pattern or pointer alignment builds a new state, never a wrong one."""
    from fp8conv.kernels import common

    common.clear_launch_state()
    g = _gen()
    x = random_weights((256, 384), torch.bfloat16, g).cuda()
    q1, s1 = tk.weight_quant_triton(x)
    keys = common.launch_state_keys()
    assert len(keys) == 1
    q2, s2 = tk.weight_quant_triton(x.clone())
    assert common.launch_state_keys() == keys
    _, launch, _ = common.launch_state(keys[0])
    assert launch.direct >= 1, "the second call did not launch the compiled kernel directly"
    assert_same_bytes(q2, q1, "direct launch codes")
    assert_same_bytes(s2, s1, "direct launch scales")
    # other shape, dtype, and a view 2 bytes into its storage (not 16-byte aligned): new states, right bits
    others = [
        random_weights((128, 384), torch.bfloat16, g).cuda(),
        random_weights((256, 384), torch.float16, g).cuda(),
        torch.empty(256 * 384 + 8, dtype=torch.bfloat16, device="cuda")[1 : 1 + 256 * 384].view(256, 384),
    ]
    others[2].copy_(random_weights((256, 384), torch.bfloat16, g))
    for i, xo in enumerate(others):
        q, s = tk.weight_quant_triton(xo)
        qr, sr = ref.weight_quant_torch(xo.cpu())
        assert_same_bytes(q, qr, f"other input {i}")
        assert_same_bytes(s, sr, f"other input {i} scales")
        # and the first shape again still right after the others
        q, _ = tk.weight_quant_triton(x)
        assert_same_bytes(q, q1, f"first input after other {i}")
    assert len(common.launch_state_keys()) == 4
    # fp8_gemm: same shapes twice (direct), then transposed-layout scales (a new state)
    aq, as_, bq, bs = (t.cuda() for t in _gemm_operands(200, 384, 512, g))
    c1 = gk.fp8_gemm_triton(aq, as_, bq, bs, torch.float32)
    c2 = gk.fp8_gemm_triton(aq.clone(), as_.clone(), bq.clone(), bs.clone(), torch.float32)
    assert_same_bytes(c2, c1, "gemm direct launch")
    c3 = gk.fp8_gemm_triton(aq, ref.to_mn_major(as_), bq, bs, torch.float32)
    assert_same_bytes(c3, c1, "gemm with MN-major scales")
    common.Launch.enabled = False
    try:
        c4 = gk.fp8_gemm_triton(aq, as_, bq, bs, torch.float32)  # the JIT path, same bits
    finally:
        common.Launch.enabled = True
    assert_same_bytes(c4, c1, "gemm through the JIT")
