"""Exhaustive check of the quantizers' division (fp8conv.kernels.quant._markstein) on a GPU.

    python bench/div_check.py [--fp32-seconds 600]

The quantizers compute x / s as q = RN(x r), r = RN(1/s), then q + (x - q s) r with fmas. This script
compares that with div.rn.f32 (tl.math.div_rn) bit for bit, for s = 1.m over all 2^23 significands and
x = 1.n over all significands of bf16 (2^7), fp16 (2^10) and float32 (2^23: 2^46 pairs, about a
minute on an H100). Scaling x and s by powers of two scales every step exactly, so these pairs
stand for every x and s whose intermediate values stay normal, which the kernels ensure by falling
back (or rescaling) outside s in [2^-90, 2^100]. Prints the number of pairs that differ (must be 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fp8conv.kernels.quant import _markstein  # noqa: E402


@triton.jit
def _check_kernel(
    cnt_ptr, S_BASE, XPER, SHIFT: tl.constexpr, BS: tl.constexpr, BX: tl.constexpr, NAIVE: tl.constexpr
):
    """Count pairs (s = 1.(S_BASE + pid_s BS + i), x = 1.(xm << SHIFT)) where the two quotients differ.
    NAIVE: check RN(x * r) instead (it differs; shows that the check can fail)."""
    sm = S_BASE + tl.program_id(0) * BS + tl.arange(0, BS)
    s = ((127 << 23) | sm).to(tl.float32, bitcast=True)
    r = tl.math.div_rn(1.0, s)
    bad = tl.zeros((BS, BX), dtype=tl.int32)
    for i in range(0, XPER, BX):
        xm = tl.program_id(1) * XPER + i + tl.arange(0, BX)
        x = ((127 << 23) | (xm << SHIFT)).to(tl.float32, bitcast=True)
        if NAIVE:
            got = x[None, :] * r[:, None]
        else:
            got = _markstein(x[None, :], s[:, None], r[:, None])
        want = tl.math.div_rn(x[None, :], s[:, None])
        bad += (got.to(tl.int32, bitcast=True) != want.to(tl.int32, bitcast=True)).to(tl.int32)
    tl.atomic_add(cnt_ptr, tl.sum(tl.sum(bad, 1), 0))


def exhaustive(
    x_bits: int, budget_s: float = float("inf"), naive: bool = False
) -> tuple[int, int, int, float]:
    """(pairs that differ, pairs checked, all pairs, seconds) for x with x_bits significand bits."""
    shift = 23 - x_bits
    n_x = 1 << x_bits
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    bs, bx = 32, min(128, n_x)
    xper = min(n_x, 1 << 14)
    chunk = 1 << 15 if x_bits > 10 else 1 << 23  # s values per launch
    checked = 0
    t0 = time.perf_counter()
    for base in range(0, 1 << 23, chunk):
        _check_kernel[(chunk // bs, n_x // xper)](
            cnt, base, xper, SHIFT=shift, BS=bs, BX=bx, NAIVE=naive, num_warps=4
        )
        torch.cuda.synchronize()
        checked += chunk * n_x
        if time.perf_counter() - t0 > budget_s:
            break
    return int(cnt.item()), checked, (1 << 23) * n_x, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32-seconds", type=float, default=600.0, help="stop the float32 sweep after this")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}")
    for name, bits, budget in (
        ("bf16", 7, float("inf")),
        ("fp16", 10, float("inf")),
        ("fp32", 23, args.fp32_seconds),
    ):
        bad, done, total, dt = exhaustive(bits, budget)
        print(
            f"{name}: {bad} of {done} pairs differ ({100 * done / total:.1f}% of {total} checked, {dt:.1f} s)"
        )


if __name__ == "__main__":
    main()
