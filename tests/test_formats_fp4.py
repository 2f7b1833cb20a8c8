"""FP4 (e2m1) decode: the torch path against transformers' own MXFP4 decoder and an independent formula."""

from __future__ import annotations

import pytest
import torch

from fp8conv.kernels import fp4_dequant
from fp8conv.kernels.reference import FP4_E2M1_VALUES, fp4_dequant_torch

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _random(shape, seed=0, lo=0, hi=255):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(lo, hi, shape[:-1], generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def _formula(blocks, scales, dtype):
    """Element by element from the e2m1 definition (sign, 2 exponent bits, 1 mantissa bit; bias 1)."""
    b = blocks.to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*b.shape[:-1], 32)
    sign = torch.where(codes & 8 != 0, -1.0, 1.0)
    exp, man = (codes >> 1) & 3, (codes & 1).to(torch.float64)
    mag = torch.where(exp == 0, man * 0.5, (1 + man * 0.5) * torch.pow(2.0, (exp - 1).to(torch.float64)))
    val = sign * mag
    scale = torch.pow(2.0, scales.to(torch.float64) - 127).unsqueeze(-1)
    return (val * scale).to(dtype).reshape(*b.shape[:-2], b.shape[-2] * 32)


def test_table_is_the_e2m1_definition():
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes[0::2] | (codes[1::2] << 4)).repeat(2).reshape(1, 16)  # 32 codes: 0..15 twice
    one = torch.tensor([127], dtype=torch.uint8)
    out = fp4_dequant_torch(blocks, one, torch.float32)
    assert out.tolist() == list(FP4_E2M1_VALUES) * 2
    assert torch.equal(_bits(out), _bits(_formula(blocks, one, torch.float32)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64, 5, 16), (2, 7, 3, 16), (1, 1, 16)])
def test_matches_transformers_convert_moe_packed_tensors(shape, dtype):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = _random(shape)
    mine = fp4_dequant(blocks, scales, dtype)
    assert mine.shape == (*shape[:-2], shape[-2] * 32) and mine.dtype == dtype
    if len(shape) >= 4:  # transformers returns the expert matrices transposed (gpt-oss orientation)
        ref = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(_bits(ref), _bits(mine.transpose(1, 2)))
    assert torch.equal(_bits(mine), _bits(_formula(blocks, scales, dtype)))


def test_extreme_exponents_are_exact():
    blocks, _ = _random((4, 16), seed=3)
    scales = torch.tensor([0, 1, 254, 127], dtype=torch.uint8)  # 2**-127 (subnormal), 2**-126, 2**127
    for dtype in DTYPES:
        assert torch.equal(_bits(fp4_dequant(blocks, scales, dtype)), _bits(_formula(blocks, scales, dtype)))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="16"):
        fp4_dequant_torch(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales"):
        fp4_dequant_torch(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        fp4_dequant_torch(torch.zeros(2, 16, dtype=torch.float16), torch.zeros(2, dtype=torch.uint8))
