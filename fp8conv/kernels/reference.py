"""Torch paths of the block-FP8 kernels: the CPU implementation and the oracle for the Triton ones.

Every function here has a Triton twin in `triton_kernels.py` with the same signature and, for
`weight_dequant`, `weight_quant` and `act_quant`, the same output bytes. The numerics, fixed for both:

  dequantize:  y = cast_out(fp32(q) * s)                         one fp32 multiply, one RNE cast
  quantize:    amax = max|x| over the tile's real elements         (x upcast to fp32, exact)
               s = max(amax / 448, 2**-126)                        fp32 IEEE division; the floor keeps
                                                                   all-zero and tiny tiles finite
               ue8m0: s = 2 ** ceil(log2(s))                        by exponent bits, exact
               q = e4m3(clamp(x / s, -448, 448))                   IEEE division, RNE cast

The CPU code works in chunks of whole tiles sized to stay in cache (CHUNK_ELEMS), and decodes e4m3
through float16 bit patterns because torch's float8 -> float32 conversion is scalar on CPU (2.95 vs
1.06 GB/s, measured in BASELINE.md).
"""

from __future__ import annotations

import math

import torch

FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
FP8_MAX = {torch.float8_e4m3fn: FP8_E4M3_MAX, torch.float8_e5m2: FP8_E5M2_MAX}
# Smallest normal float32: the floor on a quantization scale (an all-zero tile would give 0 / 0).
SCALE_FLOOR = 2.0**-126
BLOCK = 128
# fp16 bit patterns built from e4m3 bits are the e4m3 value times 2**-8; this folds it back.
_E4M3_VIA_F16 = 256.0
# Above this, scale * 256 could overflow float32; such bands take the plain path.
_FAST_SCALE_LIMIT = 2.0**119

Block = tuple[int, int]


def scale_to_float32(s: torch.Tensor) -> torch.Tensor:
    """Scales as float32: float8_e8m0fnu / uint8 exponent bytes become 2**(e-127) (255 -> NaN)."""
    if s.dtype == torch.float32:
        return s
    if s.dtype == torch.uint8 or s.dtype == getattr(torch, "float8_e8m0fnu", None):
        e = s.view(torch.uint8).to(torch.int32)
        bits = torch.where(e == 255, torch.full_like(e, 0x7FC00000), e << 23)
        # e == 0 is 2**-127, a float32 subnormal: bit pattern 0x00400000.
        bits = torch.where(e == 0, torch.full_like(e, 0x00400000), bits)
        return bits.view(torch.float32)
    if s.dtype in (torch.bfloat16, torch.float16, torch.float64):
        return s.to(torch.float32)
    raise TypeError(f"unsupported scale dtype {s.dtype}")


def scale_grid(shape: tuple[int, ...], block_size: Block) -> tuple[int, ...]:
    """Scale shape for a weight of `shape`: leading dims kept, last two ceil-divided by the block."""
    *lead, m, n = shape
    return (*lead, math.ceil(m / block_size[0]), math.ceil(n / block_size[1]))


def round_scale_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(s)) for positive normal float32 s, exactly: bump the exponent if any mantissa bit."""
    bits = s.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    # the leading size spelled out: reshape(-1, ...) is ambiguous for a tensor with no elements
    return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1])


# Elements per chunk: the ~9 elementwise passes of a chunk then run on int16/fp32 temporaries that
# stay in this machine's 2 MiB L2. Whole 128-row bands of a 7168 x 16384 weight (8 MiB of fp32)
# ran at 0.73 GB/s; see bench/NOTES.md.
CHUNK_ELEMS = 1 << 18


def _chunks(m: int, n: int, bm: int, bn: int):
    """(r0, r1, c0, c1) covering an [m, n] matrix: whole tiles, about CHUNK_ELEMS elements each;
    a chunk spans several tile rows only when they are all complete, else it is one tile row."""
    if m == 0 or n == 0:
        return
    bme, bne = min(bm, m), min(bn, n)
    if bme * n <= CHUNK_ELEMS:
        rows, cols = max(1, CHUNK_ELEMS // (n * bme)) * bme, n
    else:
        rows, cols = bme, max(1, CHUNK_ELEMS // (bme * bne)) * bne
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        spans = [(r0, r1)]
        if (r1 - r0) > bm and (r1 - r0) % bm:  # complete tile rows, then the ragged last one
            cut = r1 - (r1 - r0) % bm
            spans = [(r0, cut), (cut, r1)]
        for a, b in spans:
            for c0 in range(0, n, cols):
                yield a, b, c0, min(n, c0 + cols)


def _tiles_view(t: torch.Tensor, bm: int) -> torch.Tensor:
    """[R, C] -> [k, R/k, C]: k tile rows when R is whole tiles, else one (the ragged last)."""
    r, c = t.shape
    k = r // bm if r % bm == 0 and r >= bm else 1
    return t.view(k, r // k, c)


def _chunk_scales(s2: torch.Tensor, r0: int, r1: int, c0: int, c1: int, bm: int, bn: int):
    """The chunk's scales spread over its columns: [k, 1, c1-c0], broadcasting over tile rows."""
    i0, j0 = r0 // bm, c0 // bn
    k = (r1 - r0) // bm if (r1 - r0) % bm == 0 and (r1 - r0) >= bm else 1
    cols = s2[i0 : i0 + k, j0 : math.ceil(c1 / bn)].repeat_interleave(bn, dim=1)
    off = c0 - j0 * bn
    return cols[:, off : off + (c1 - c0)].unsqueeze(1)


class _Scratch:
    """Reusable temporaries for one call: fresh multi-MB allocations per chunk cost page faults that
    made abs() and to() ten times slower than on warm memory (390 vs 30 us per 256K elements)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, tag: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get((tag, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(tag, dtype)] = torch.empty(max(n, CHUNK_ELEMS), dtype=dtype)
        return buf[:n].view(shape)


def _decode_chunk(chunk: torch.Tensor, scale: torch.Tensor, bm: int, tmp: _Scratch) -> torch.Tensor:
    """fp32(q) * scale for a chunk of codes [R, C]; scale is [k, 1, C]. Returns [R, C] float32
    (a view of scratch memory, valid until the next chunk)."""
    shape = tuple(chunk.shape)
    out = tmp.get("f32", torch.float32, shape)
    if chunk.dtype == torch.float8_e4m3fn and float(scale.abs().max()) < _FAST_SCALE_LIMIT:
        b = tmp.get("b", torch.int16, shape)
        b.copy_(chunk.view(torch.uint8))
        mag = torch.bitwise_and(b, 0x7F, out=tmp.get("mag", torch.int16, shape))
        h = torch.bitwise_left_shift(mag, 7, out=tmp.get("h", torch.int16, shape))
        b.bitwise_and_(0x80).bitwise_left_shift_(8)
        h.bitwise_or_(b)
        out.copy_(h.view(torch.float16))
        _tiles_view(out, bm).mul_(scale * _E4M3_VIA_F16)
        if int(mag.view(-1).max()) == 0x7F:  # NaN codes: the fp16 pattern would read as finite
            out.masked_fill_(mag == 0x7F, float("nan"))
        return out
    if chunk.dtype == torch.float8_e5m2:
        # e5m2 is the upper byte of float16, NaN and Inf included.
        b = tmp.get("b", torch.int16, shape)
        b.copy_(chunk.view(torch.uint8))
        out.copy_(b.bitwise_left_shift_(8).view(torch.float16))
    else:
        out.copy_(chunk)
    _tiles_view(out, bm).mul_(scale)
    return out


def weight_dequant_torch(
    q: torch.Tensor,
    s: torch.Tensor,
    block_size: Block = (BLOCK, BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize block-FP8 weights [..., M, N] with scales [..., ceil(M/bm), ceil(N/bn)].

    `out` (CPU path only): a preallocated result tensor of q's shape and `out_dtype`."""
    bm, bn = block_size
    if q.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    if tuple(s.shape) != scale_grid(tuple(q.shape), block_size):
        raise ValueError(
            f"scale shape {tuple(s.shape)} does not match weight {tuple(q.shape)} with block {block_size}"
        )
    s = scale_to_float32(s)
    q3, s3 = _as_3d(q), _as_3d(s)
    y = torch.empty(q.shape, dtype=out_dtype, device=q.device) if out is None else out
    y3 = _as_3d(y)
    m, n = q3.shape[-2:]
    tmp = _Scratch()
    for e in range(q3.shape[0]):
        for r0, r1, c0, c1 in _chunks(m, n, bm, bn):
            scale = _chunk_scales(s3[e], r0, r1, c0, c1, bm, bn)
            y3[e, r0:r1, c0:c1].copy_(_decode_chunk(q3[e, r0:r1, c0:c1], scale, bm, tmp))
    return y


def _quant_chunk(
    x: torch.Tensor,
    bm: int,
    bn: int,
    scale_fmt: str,
    fp8_dtype: torch.dtype,
    q_out: torch.Tensor,
    tmp: _Scratch,
) -> torch.Tensor:
    """Quantize a chunk [R, C] of whole tiles into q_out; return its scales [k, ceil(C/bn)].

    The clamp to +-FP8_MAX is a no-op here by construction: s = fl(amax / 448) makes
    |x / s| <= 448 (1 + 2^-23), which the round-to-nearest-even cast takes to 448 (the next e4m3 value
    is 480); skipping it saves a pass. The Triton kernel clamps; tests compare both bit for bit.
    Measured per 256K-element chunk, one core, warm memory: float32 copy 36 us, abs+amax 68, div 32,
    the cast to e4m3 150 (bf16 reductions without the copy were slower, 174-287 us)."""
    fmax = FP8_MAX[fp8_dtype]
    r, c = x.shape
    xf = tmp.get("x", torch.float32, (r, c))
    xf.copy_(x)
    tiles = _tiles_view(xf, bm)
    k, rows = tiles.shape[:2]
    pad = -c % bn
    a = tmp.get("a", torch.float32, (k, rows, c + pad))
    torch.abs(tiles, out=a[:, :, :c])
    if pad:
        a[:, :, c:].zero_()
    amax = a.view(k, rows, (c + pad) // bn, bn).amax(dim=(1, 3))
    s = (amax / fmax).clamp_min_(SCALE_FLOOR)
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    tiles.div_(s.repeat_interleave(bn, dim=1)[:, :c].unsqueeze(1))
    q_out.copy_(xf)
    return s


def weight_quant_torch(
    x: torch.Tensor,
    block_size: Block = (BLOCK, BLOCK),
    scale_fmt: str = "float",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float weights [..., M, N] to FP8 codes and float32 scales, one per block tile.

    `q_out` (CPU path only): a preallocated codes tensor of x's shape and `fp8_dtype`."""
    bm, bn = block_size
    if x.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions")
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt must be 'float' or 'ue8m0', not {scale_fmt!r}")
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device) if q_out is None else q_out
    s = torch.empty(scale_grid(tuple(x.shape), block_size), dtype=torch.float32, device=x.device)
    x3, q3, s3 = _as_3d(x), _as_3d(q), _as_3d(s)
    m, n = x3.shape[-2:]
    tmp = _Scratch()
    for e in range(x3.shape[0]):
        for r0, r1, c0, c1 in _chunks(m, n, bm, bn):
            sc = _quant_chunk(x3[e, r0:r1, c0:c1], bm, bn, scale_fmt, fp8_dtype, q3[e, r0:r1, c0:c1], tmp)
            s3[e, r0 // bm : r0 // bm + sc.shape[0], c0 // bn : c0 // bn + sc.shape[1]] = sc
    return q, s


def empty_scales(
    lead: tuple[int, ...], n_groups: int, device, mn_major: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """An uninitialised scale tensor [*lead, n_groups]: row-major, or MN-major (stride 1 along the
    flattened leading dimensions, the group index outermost), the layout cuBLAS's blockwise FP8
    GEMM requires for A and in which fp8_gemm reads the scales of one K block as one run."""
    if not mn_major:
        return torch.empty((*lead, n_groups), dtype=dtype, device=device)
    rows = math.prod(lead)
    return torch.empty((n_groups, rows), dtype=dtype, device=device).t().reshape(*lead, n_groups)


def to_mn_major(s: torch.Tensor) -> torch.Tensor:
    """The same scales [..., G] stored MN-major (see empty_scales)."""
    out = empty_scales(tuple(s.shape[:-1]), s.shape[-1], s.device, True, s.dtype)
    return out.copy_(s)


def act_quant_torch(
    x: torch.Tensor,
    group_size: int = BLOCK,
    scale_fmt: str = "float",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    mn_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [..., K] per 1 x group_size group: codes [..., K], scales [..., ceil(K/g)]
    (row-major, or MN-major with mn_major=True: same values, see empty_scales)."""
    k = x.shape[-1]
    q, s = weight_quant_torch(x.reshape(-1, k), (1, group_size), scale_fmt, fp8_dtype)
    s = s.reshape(*x.shape[:-1], s.shape[-1])
    return q.reshape(x.shape), to_mn_major(s) if mn_major else s


def expand_scales(s: torch.Tensor, shape: tuple[int, ...], block_size: Block) -> torch.Tensor:
    """Scales repeated over their tiles and cropped to `shape` (straightforward; for references)."""
    s = scale_to_float32(s)
    bm, bn = block_size
    return s.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)[..., : shape[-2], : shape[-1]]


def fp8_gemm_torch(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: Block = (BLOCK, BLOCK),
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C = A @ B^T for A [..., K] (1 x 128 group scales) and B [N, K] (block scales), from dequantized
    operands in `acc_dtype` (float32 on CPU by default; float64 for references)."""
    k = a.shape[-1]
    a2 = a.reshape(-1, k)
    af = a2.to(acc_dtype) * expand_scales(
        a_scale.reshape(-1, a_scale.shape[-1]), tuple(a2.shape), (1, block_size[1])
    ).to(acc_dtype)
    bf = b.to(acc_dtype) * expand_scales(b_scale, tuple(b.shape), block_size).to(acc_dtype)
    c = af @ bf.t()
    return c.to(out_dtype).reshape(*a.shape[:-1], b.shape[0])


# ------------------------------------------------------------------------------------------ FP4 (e2m1)
# The sixteen e2m1 values by code (sign bit 3, two exponent bits, one mantissa bit), the table of
# transformers' integrations/mxfp4.py FP4_VALUES and of its Fp8Dequantize._FP4_E2M1_LUT.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32  # elements per e8m0 scale (MX formats): 16 bytes of packed codes
FP4_GROUP_BYTES = FP4_GROUP // 2


def fp4_dequant_torch(
    blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantize MX FP4 (e2m1) codes: blocks uint8 [..., G, 16], two codes a byte, the low nibble the
    even element; scales uint8 e8m0 exponent bytes [..., G] (value 2**(e-127); 255 is NaN). Returns
    [..., G*32] of `out_dtype`: cast_out(fp32(e2m1) * fp32(2**(e-127))), one rounding.

    Bit-identical to transformers' integrations/mxfp4.py `_convert_moe_packed_tensors` before its final
    transpose: there the table is in the output dtype and `torch.ldexp(sub, exp)` multiplies by
    2**(e-127) in float32 and rounds once into the output; every e2m1 value times a power of two in
    [2**-127, 2**127] is exact in float32, so the two agree for bf16, fp16 and fp32 outputs."""
    if blocks.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"FP4 blocks must be uint8 or int8 bytes, not {blocks.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != FP4_GROUP_BYTES:
        raise ValueError(f"FP4 blocks must be [..., G, {FP4_GROUP_BYTES}], not {tuple(blocks.shape)}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"FP4 scales {tuple(scales.shape)} must be blocks' shape without its last dim")
    b = blocks.view(torch.uint8)
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=b.device)
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    s = scale_to_float32(scales.view(torch.uint8))
    y = vals.reshape(*b.shape[:-1], FP4_GROUP) * s.unsqueeze(-1)
    return y.to(out_dtype).reshape(*b.shape[:-2], b.shape[-2] * FP4_GROUP)
