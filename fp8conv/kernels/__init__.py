"""Block-FP8 kernels and the one place that picks a backend.

Public functions take tensors on any device: CUDA tensors go to the Triton kernels
(`triton_kernels.py`), CPU tensors to the torch paths (`reference.py`). The outputs of
`weight_dequant`, `weight_quant` and `act_quant` are byte-identical on both.

    weight_dequant(q, s, block_size=(128, 128), out_dtype=torch.bfloat16) -> y
    weight_quant(x, block_size=(128, 128), scale_fmt="float") -> (q, s)
    act_quant(x, group_size=128, scale_fmt="float", mn_major=False) -> (q, s)
    fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> a @ b.T, dequantized
    fp4_dequant(blocks, scales, out_dtype=torch.bfloat16) -> y   (MX FP4: e2m1 codes, e8m0 scales)

fp8_gemm takes a_scale row-major (as act_quant returns it by default) or MN-major
(act_quant(..., mn_major=True), the layout cuBLAS's blockwise GEMM takes); on Hopper the MN-major
one is faster to read (bench/NOTES.md).
"""

from __future__ import annotations

import functools

import torch

from fp8conv.errors import UsageError
from fp8conv.kernels.reference import (
    BLOCK,
    FP8_E4M3_MAX,
    SCALE_FLOOR,
    act_quant_torch,
    fp4_dequant_torch,
    fp8_gemm_torch,
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
    "fp4_dequant",
    "fp8_gemm",
    "resolve_device",
    "scale_grid",
    "scale_to_float32",
    "triton_status",
    "weight_dequant",
    "weight_quant",
]


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(usable, reason): Triton imports and a CUDA GPU is there to run it."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    try:
        import triton  # noqa: F401

        from fp8conv.kernels import triton_kernels  # noqa: F401
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


def _backend(t: torch.Tensor):
    if t.is_cuda:
        from fp8conv.kernels import triton_kernels

        return triton_kernels, "triton"
    return None, "torch"


def weight_dequant(q, s, block_size=(BLOCK, BLOCK), out_dtype=torch.bfloat16):
    """Dequantize FP8 weights [..., M, N] with block scales (float32, e8m0 or uint8 exponents)."""
    s = scale_to_float32(s)
    mod, _ = _backend(q)
    if mod is None:
        return weight_dequant_torch(q, s, tuple(block_size), out_dtype)
    return mod.weight_dequant_triton(q, s, tuple(block_size), out_dtype)


def weight_quant(x, block_size=(BLOCK, BLOCK), scale_fmt="float"):
    """Quantize float weights [..., M, N] to e4m3 codes and float32 block scales."""
    mod, _ = _backend(x)
    if mod is None:
        return weight_quant_torch(x, tuple(block_size), scale_fmt)
    return mod.weight_quant_triton(x, tuple(block_size), scale_fmt)


def act_quant(x, group_size=BLOCK, scale_fmt="float", mn_major=False):
    """Quantize activations [..., K] per 1 x group_size group (an all-zero group gets a finite scale).
    mn_major=True stores the scales [..., G] with stride 1 along the leading dimensions (same values)."""
    mod, _ = _backend(x)
    if mod is None:
        return act_quant_torch(x, group_size, scale_fmt, mn_major=mn_major)
    return mod.act_quant_triton(x, group_size, scale_fmt, mn_major=mn_major)


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """C = A @ B^T from FP8 operands: A [..., K] with 1x128 group scales [..., ceil(K/128)], B [N, K]
    with 128x128 block scales [ceil(N/128), ceil(K/128)]. Any M, N, K. Triton on CUDA, torch on CPU."""
    mod, _ = _backend(a)
    if mod is None:
        return fp8_gemm_torch(a, a_scale, b, b_scale, out_dtype)
    return mod.fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype)


def fp4_dequant(blocks, scales, out_dtype=torch.bfloat16):
    """Dequantize MX FP4 blocks uint8 [..., G, 16] (two e2m1 codes a byte, low nibble first) with e8m0
    exponent bytes [..., G]; returns [..., G*32]. The torch path on every device for now (its
    elementwise ops run on the tensor's device); a Triton kernel goes here, bit-exact to it."""
    return fp4_dequant_torch(blocks, scales, out_dtype)
