"""FP8 / FP4 kernels and the one place that picks a backend.

Public functions take tensors on any device: CUDA tensors go to the Triton kernels, CPU tensors to
the torch paths (`reference.py`). The outputs of every function but fp8_gemm are byte-identical on
both. Every function takes `out=` (buffers on the input's device to write into and return; for the
quantizers a pair (codes, scales), either of which may be None).

    weight_dequant(q, s, block_size=(128, 128), out_dtype=torch.bfloat16, out=None) -> y
    weight_quant(x, block_size=(128, 128), scale_fmt="float", out=None) -> (q, s)
    act_quant(x, group_size=128, scale_fmt="float", mn_major=False, out=None) -> (q, s)
    fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, out=None) -> a @ b.T, dequantized
    fp4_dequant(blocks, scales, out_dtype=torch.bfloat16, out=None) -> y   (MX FP4: e2m1 codes, e8m0 scales)
    channel_quant(x, out=None) -> (q, s)            per-channel FP8: float32 scales [..., M, 1]
    mx_quant(x, rule="ceil", out=None) -> (q, e)    MXFP8: uint8 e8m0 exponents [..., M, N/32]

fp8_gemm takes a_scale row-major (as act_quant returns it by default) or MN-major
(act_quant(..., mn_major=True), the layout cuBLAS's blockwise GEMM takes); on Hopper the MN-major
one is faster to read (bench/NOTES.md).

Kernel families, one file each (each @triton.jit kernel directly above its launcher): `quant.py`
(weight_dequant, weight_quant, act_quant, channel_quant, mx_quant), `gemm.py` (the Triton GEMMs and
fp8_gemm's launcher), `gluon_gemm.py` (the Hopper GEMM), `fp4.py` (FP4 e2m1 dequantization);
`common.py` holds what they share (launch options, the cached launch state), `checks.py` the argument
checks. The GPU launchers keep per-shape launch state, so a repeated call with the same shapes costs
little host time.
"""

from __future__ import annotations

import functools

import torch

from fp8conv.errors import UsageError
from fp8conv.kernels.checks import check_out, check_tensor
from fp8conv.kernels.reference import (
    BLOCK,
    FP8_E4M3_MAX,
    SCALE_FLOOR,
    act_quant_torch,
    channel_quant_torch,
    fp4_dequant_torch,
    fp8_gemm_torch,
    mx_quant_torch,
    scale_grid,
    scale_to_float32,
    weight_dequant_torch,
    weight_quant_torch,
)

__all__ = [
    "BLOCK",
    "FP8_E4M3_MAX",
    "SCALE_FLOOR",
    "act_quant",
    "channel_quant",
    "fp4_dequant",
    "fp8_gemm",
    "mx_quant",
    "resolve_device",
    "scale_grid",
    "scale_to_float32",
    "triton_status",
    "weight_dequant",
    "weight_quant",
]

Out = tuple[torch.Tensor | None, torch.Tensor | None] | None


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(usable, reason): Triton imports and a CUDA GPU is there to run it."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    try:
        import triton  # noqa: F401

        from fp8conv.kernels import gemm, quant  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"Triton is not usable: {e}"
    return True, "ok"


def resolve_device(spec: str = "auto") -> tuple[torch.device, str | None]:
    """Turn --device into a torch device; returns (device, note) where note says why auto fell back.

    'auto' takes the GPU when one is there and Triton runs on it, else the CPU. An explicitly requested
    GPU that cannot run is an error (exit 2), never a silent fallback.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        ok, why = triton_status()
        if ok:
            return torch.device("cuda", torch.cuda.current_device()), None
        return torch.device("cpu"), f"using the CPU: {why}"
    if spec == "cpu":
        return torch.device("cpu"), None
    if spec == "cuda" or spec.startswith("cuda:"):
        ok, why = triton_status()
        if not ok:
            raise UsageError(f"--device {spec} requested but {why}", hint="use --device cpu or auto")
        dev = torch.device(spec)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", index), None
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def _into(name: str, result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The torch paths' result written into a caller's buffer (checked first)."""
    if out is None:
        return result
    check_out(name, out, result.shape, result.dtype, result.device)
    return out.copy_(result)


def weight_dequant(
    q: torch.Tensor,
    s: torch.Tensor,
    block_size: tuple[int, int] = (BLOCK, BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize FP8 weights [..., M, N] with block scales (float32, e8m0 or uint8 exponents)."""
    s = scale_to_float32(s)
    if q.is_cuda:
        from fp8conv.kernels.quant import weight_dequant_triton

        return weight_dequant_triton(q, s, tuple(block_size), out_dtype, out=out)
    if out is not None:
        check_out("out", out, q.shape, out_dtype, q.device)
    return weight_dequant_torch(q, s, tuple(block_size), out_dtype, out=out)


def weight_quant(
    x: torch.Tensor,
    block_size: tuple[int, int] = (BLOCK, BLOCK),
    scale_fmt: str = "float",
    out: Out = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float weights [..., M, N] to e4m3 codes and float32 block scales."""
    if x.is_cuda:
        from fp8conv.kernels.quant import weight_quant_triton

        return weight_quant_triton(x, tuple(block_size), scale_fmt, out=out)
    q_out, s_out = (None, None) if out is None else out
    if q_out is not None:
        check_out("out[0]", q_out, x.shape, torch.float8_e4m3fn, x.device)
    q, s = weight_quant_torch(x, tuple(block_size), scale_fmt, q_out=q_out)
    return q, _into("out[1]", s, s_out)


def act_quant(
    x: torch.Tensor,
    group_size: int = BLOCK,
    scale_fmt: str = "float",
    mn_major: bool = False,
    out: Out = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [..., K] per 1 x group_size group (an all-zero group gets a finite scale).
    mn_major=True stores the scales [..., G] with stride 1 along the leading dimensions (same values)."""
    if x.is_cuda:
        from fp8conv.kernels.quant import act_quant_triton

        return act_quant_triton(x, group_size, scale_fmt, mn_major=mn_major, out=out)
    q_out, s_out = (None, None) if out is None else out
    q, s = act_quant_torch(x, group_size, scale_fmt, mn_major=mn_major)
    if s_out is not None:
        check_tensor("out[1]", s_out, (torch.float32,), x.device, contiguous=False)
        if tuple(s_out.shape) != tuple(s.shape) or s_out.stride() != s.stride():
            raise ValueError(
                f"out[1] has shape {tuple(s_out.shape)} and strides {s_out.stride()}; expected "
                f"{tuple(s.shape)} and {s.stride()} ({'MN-major' if mn_major else 'row-major'})"
            )
        s = s_out.copy_(s)
    return _into("out[0]", q, q_out), s


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = A @ B^T from FP8 operands: A [..., K] with 1x128 group scales [..., ceil(K/128)], B [N, K]
    with 128x128 block scales [ceil(N/128), ceil(K/128)]. Any M, N, K. Triton on CUDA, torch on CPU."""
    if a.is_cuda:
        from fp8conv.kernels.gemm import fp8_gemm_triton

        return fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype, out=out)
    return _into("out", fp8_gemm_torch(a, a_scale, b, b_scale, out_dtype), out)


def fp4_dequant(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize MX FP4 blocks uint8 [..., G, 16] (two e2m1 codes a byte, low nibble first) with e8m0
    exponent bytes [..., G]; returns [..., G*32]. Triton on CUDA (fp4.py, bit-identical to the torch
    path), torch on CPU."""
    if blocks.is_cuda:
        from fp8conv.kernels.fp4 import fp4_dequant_triton

        return fp4_dequant_triton(blocks, scales.to(blocks.device, non_blocking=True), out_dtype, out=out)
    return _into("out", fp4_dequant_torch(blocks, scales, out_dtype), out)


def channel_quant(x: torch.Tensor, out: Out = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 of weights [..., M, N]: e4m3 codes and one float32 scale per row [..., M, 1].
    Triton on CUDA (quant.py, bit-identical to the torch path), torch on CPU."""
    if x.is_cuda:
        from fp8conv.kernels.quant import channel_quant_triton

        return channel_quant_triton(x, out=out)
    q_out, s_out = (None, None) if out is None else out
    q, s = channel_quant_torch(x)
    return _into("out[0]", q, q_out), _into("out[1]", s, s_out)


def mx_quant(x: torch.Tensor, rule: str = "ceil", out: Out = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 of weights [..., M, N] (N % 32 == 0): e4m3 codes and uint8 e8m0 exponents [..., M, N/32];
    rule "ceil" (OCP / DeepGEMM / transformers) or "ct" (compressed-tensors). Triton on CUDA (quant.py,
    bit-identical to the torch path), torch on CPU."""
    if x.is_cuda:
        from fp8conv.kernels.quant import mx_quant_triton

        return mx_quant_triton(x, rule, out=out)
    q_out, s_out = (None, None) if out is None else out
    q, e = mx_quant_torch(x, rule)
    return _into("out[0]", q, q_out), _into("out[1]", e, s_out)
