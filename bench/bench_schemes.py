"""Per-channel and MXFP8 quantizers against a device copy of the same bytes (ratios in one process).

    python bench/bench_schemes.py [--device cuda] [--shape 7168x18432]

Prints one row per quantizer: milliseconds, GB/s of bf16 read + e4m3 written, and the ratio to torch's
own bf16 -> e4m3 cast of the same tensor (the same bytes moved, no scale to find) on the same device,
timed in the same run; the torch paths (reference.py) beside the public functions on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8conv.kernels import channel_quant, mx_quant, weight_quant  # noqa: E402
from fp8conv.kernels.reference import channel_quant_torch, mx_quant_torch  # noqa: E402


def timed(fn, device, reps):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="7168x18432")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    device = torch.device(a.device)
    m, n = (int(v) for v in a.shape.split("x"))
    x = torch.randn(m, n, device=device).bfloat16()
    out = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=device)
    moved = x.numel() * 3  # bf16 read + one byte written
    # the baseline: torch's own bf16 -> e4m3 cast, the quantizers' traffic with no scale to find
    copy = timed(lambda: out.copy_(x), device, a.reps)
    rows = [("torch cast bf16 -> e4m3 (same bytes)", copy)]
    rows.append(("block 128x128 (weight_quant)", timed(lambda: weight_quant(x), device, a.reps)))
    rows.append(("fp8-channel (channel_quant)", timed(lambda: channel_quant(x), device, a.reps)))
    rows.append(("mxfp8 ceil (mx_quant)", timed(lambda: mx_quant(x, "ceil"), device, a.reps)))
    rows.append(("mxfp8 ct (mx_quant)", timed(lambda: mx_quant(x, "ct"), device, a.reps)))
    if device.type == "cuda":
        rows.append(("fp8-channel, torch path", timed(lambda: channel_quant_torch(x), device, a.reps)))
        rows.append(("mxfp8 ceil, torch path", timed(lambda: mx_quant_torch(x, "ceil"), device, a.reps)))
    print(f"{m}x{n} bf16 on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})")
    print(f"{'quantizer':38s} {'ms':>9s} {'GB/s':>8s} {'x cast':>8s}")
    for name, sec in rows:
        print(f"{name:38s} {sec * 1e3:9.3f} {moved / sec / 1e9:8.1f} {copy / sec:8.3f}")


if __name__ == "__main__":
    main()
