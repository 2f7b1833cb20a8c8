"""Argument checks of the public kernel functions and the pieces of a launch-state key: torch only,
so the dispatch in __init__ can use them without importing Triton."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def align(n: int) -> int:
    """Largest power of two <= 16 that divides n (the row length, in elements)."""
    a = 16
    while n % a:
        a //= 2
    return a


def check_block(block_size) -> tuple[int, int]:
    try:
        bm, bn = (int(v) for v in block_size)
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be two positive integers, not {block_size!r}") from None
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block_size must be two positive integers, not {block_size!r}")
    return bm, bn


def check_tensor(name: str, t, dtypes, device=None, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other operand is on {device}")


def check_out(name: str, out, shape, dtype, device) -> torch.Tensor:
    """An `out=` buffer: a contiguous tensor of exactly this shape, dtype and device."""
    check_tensor(name, out, (dtype,), device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}; expected {tuple(shape)}")
    return out


def check_scale_fmt(scale_fmt: str) -> bool:
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt must be 'float' or 'ue8m0', not {scale_fmt!r}")
    return scale_fmt == "ue8m0"


def tensor_key(t) -> tuple | None:
    """What a launch state depends on in a tensor: shape, strides, dtype, device (its CUDA index, -1
    off the GPU), 16-byte alignment (Triton specializes pointers on it). None for None."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() % 16 == 0)


def state_key(*parts):
    """A launch-state key: tensors as tensor_key gives them (inlined: this runs on every call), lists
    as tuples, the rest as given; None where a part cannot be hashed (the checks then say why)."""
    key = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = (p.shape, p.stride(), p.dtype, p.get_device(), p.data_ptr() % 16 == 0)
        elif isinstance(p, list):
            p = tuple(p)
        key.append(p)
    key = tuple(key)
    try:
        hash(key)
    except TypeError:
        return None
    return key
