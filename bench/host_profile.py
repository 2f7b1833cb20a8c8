"""Where the host time of one public kernel call goes (CUDA GPU): each piece timed on the CPU clock over
many calls, the GPU kept busy so launches queue; then a cProfile of fp8_gemm's calls. Prints lines.

    python bench/host_profile.py
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import fp8conv.kernels as K  # noqa: E402
from fp8conv.kernels import common, gemm  # noqa: E402


def per_call_us(fn, n: int = 300) -> float:
    best = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(best)[2]


def main() -> None:
    m, n, k = 128, 24576, 1536
    xq, xs = K.act_quant(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), mn_major=True)
    wq, ws = K.weight_quant(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    c = K.fp8_gemm(xq, xs, wq, ws)
    key = common.state_key("gemm", xq, xs, wq, ws, torch.bfloat16, None)
    st = common.launch_state(key)
    run = st.run
    lines = [
        ("fp8_gemm public call", lambda: K.fp8_gemm(xq, xs, wq, ws)),
        ("fp8_gemm public call, out=", lambda: K.fp8_gemm(xq, xs, wq, ws, out=c)),
        ("  fp8_gemm_triton, out=", lambda: gemm.fp8_gemm_triton(xq, xs, wq, ws, torch.bfloat16, c)),
        ("  state_key", lambda: common.state_key("gemm", xq, xs, wq, ws, torch.bfloat16, None)),
        ("  tensor_key (one tensor)", lambda: common.tensor_key(xq)),
        ("  torch.empty of the output", lambda: torch.empty((m, n), dtype=torch.bfloat16, device="cuda")),
        ("  run (descriptors + launch)", lambda: run(xq, xs, wq, ws, c)),
        (
            "  two descriptor copies",
            lambda: (common.desc_like(run.a_tmpl, xq), common.desc_like(run.b_tmpl, wq)),
        ),
        ("  current device + stream", lambda: common._active_driver().get_current_stream(0)),
        (
            "torch._scaled_mm",
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16),
        ),
        ("torch.empty_like + copy_ (small)", lambda: torch.empty_like(xq).copy_(xq)),
    ]
    x = torch.randn(576, 7168, device="cuda", dtype=torch.bfloat16)
    q, s = K.weight_quant(x)
    aq, as_ = K.act_quant(x)
    y = K.weight_dequant(q, s)
    b4 = torch.randint(0, 256, (576, 224, 16), dtype=torch.uint8, device="cuda")
    s4 = torch.randint(120, 130, (576, 224), dtype=torch.uint8, device="cuda")
    y4 = K.fp4_dequant(b4, s4)
    lines += [
        ("weight_quant 576x7168", lambda: K.weight_quant(x)),
        ("weight_quant 576x7168, out=", lambda: K.weight_quant(x, out=(q, s))),
        ("act_quant 576x7168", lambda: K.act_quant(x)),
        ("act_quant 576x7168, out=", lambda: K.act_quant(x, out=(aq, as_))),
        ("weight_dequant 576x7168", lambda: K.weight_dequant(q, s)),
        ("weight_dequant 576x7168, out=", lambda: K.weight_dequant(q, s, out=y)),
        ("fp4_dequant 576x7168", lambda: K.fp4_dequant(b4, s4)),
        ("fp4_dequant 576x7168, out=", lambda: K.fp4_dequant(b4, s4, out=y4)),
    ]
    for name, fn in lines:
        fn()
        print(f"{name:40s} {per_call_us(fn):7.1f} us")
    prof = cProfile.Profile()
    torch.cuda._sleep(100_000_000)
    prof.enable()
    for _ in range(300):
        K.fp8_gemm(xq, xs, wq, ws, out=c)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
