"""convert's requant band against the straightforward one, in the same process on the same data.

The straightforward band (what convert computed until the band rewrite): `q.float() * expand_scales`,
`requant_ue8m0` from the codes (a second dequantization) or channel_quant / mx_quant, the new codes
`.float()` times their expanded scales, and the loss as `(g64 - r64).pow(2).sum()` over float64 copies.
The band `_requantize` runs now (fp8conv/convert/fp8_to_fp8.py `_requant_band`): codes decoded once by
table, scales multiplied tile by tile, the UE8M0 cast of the float band (the per-channel and MXFP8
quantizers in row pieces on the CPU), float64 terms summed per row. Prints ms per
band, ns per element and the ratio (min over --repeats, the two alternated), and checks that both
give the same codes and scales and loss sums within 1e-15.
Usage: python bench/bench_requant.py [--device cpu|cuda] [--rows 256] [--cols 7168] [--repeats 7]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8conv.convert.fp8_to_fp8 import QUANT_PIECE_ELEMS, _Buffers, _requant_band  # noqa: E402
from fp8conv.kernels import channel_quant, mx_quant, scale_to_float32  # noqa: E402
from fp8conv.kernels.reference import expand_scales  # noqa: E402
from fp8conv.targets.requant import requant_ue8m0  # noqa: E402

BLOCK = (128, 128)


def plain(kind, q, s):
    m, n = q.shape
    ref = q.float() * expand_scales(s, (m, n), BLOCK)
    if kind == "ue8m0":
        q2, s2, tile = *requant_ue8m0(q, s, BLOCK), BLOCK
    elif kind == "fp8-channel":
        q2, s2, tile = *channel_quant(ref), (1, n)
    else:
        q2, ex = mx_quant(ref)
        s2, tile = scale_to_float32(ex), (1, 32)
    got = q2.float() * expand_scales(s2, (m, n), tile)
    g64, r64 = got.double(), ref.double()
    return q2, s2, float((g64 - r64).pow(2).sum()), float(r64.pow(2).sum())


def banded(kind, q, s, buf, q_out):
    rule = {"ue8m0": "ue8m0", "fp8-channel": "fp8-channel", "mxfp8": "ceil"}[kind]
    pieces = q.shape[0] if q.is_cuda else max(1, QUANT_PIECE_ELEMS // q.shape[1])
    s2, sums = _requant_band(q, s, BLOCK, rule, q_out, None, buf, pieces)
    err, ref_sq = sums.tolist()
    return q_out, s2, math.fsum(err), math.fsum(ref_sq)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the conversion runs each band: one band per core
    m, n = args.rows, args.cols
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 256, (m, n), generator=g, dtype=torch.int32).to(torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0x3C
    q = b.view(torch.float8_e4m3fn).to(device)
    s = (torch.rand(math.ceil(m / 128), math.ceil(n / 128), generator=g) * 1e-3 + 1e-4).to(device)
    buf, q_out = _Buffers(device), torch.empty((m, n), dtype=torch.float8_e4m3fn, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, one thread"
    print(f"{m} x {n} band on {name}; ms per band (ns per element), min of {args.repeats}")
    print(f"{'requant':<14}{'straightforward':>22}{'band':>20}{'ratio':>8}")
    for kind in ("ue8m0", "fp8-channel", "mxfp8"):
        best = {"plain": math.inf, "band": math.inf}
        for _ in range(args.repeats):
            for what, fn in (
                ("plain", lambda kind=kind: plain(kind, q, s)),
                ("band", lambda kind=kind: banded(kind, q, s, buf, q_out)),
            ):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                best[what] = min(best[what], time.perf_counter() - t)
        a, z = plain(kind, q, s), banded(kind, q, s, buf, q_out)
        assert torch.equal(a[0].view(torch.uint8), z[0].view(torch.uint8)) and torch.equal(a[1], z[1]), kind
        assert all(abs(x - y) <= 1e-15 * abs(x) for x, y in zip(a[2:], z[2:], strict=True)), (
            kind,
            a[2:],
            z[2:],
        )
        cell = {k: f"{v * 1e3:.2f} ({v * 1e9 / (m * n):.1f})" for k, v in best.items()}
        print(f"{kind:<14}{cell['plain']:>22}{cell['band']:>20}{best['plain'] / best['band']:>7.2f}x")


if __name__ == "__main__":
    main()
