"""Benchmark of fp8conv's Triton kernels on a CUDA GPU; prints one table.

    python bench/bench_kernels.py [--quick] [--sweep [KERNEL]] [--only mem|gemm]

Rows: the device-to-device copy ceiling (bytes read + written, a large buffer), then weight_dequant
(fp8 -> bf16), weight_quant (bf16 -> fp8) and act_quant (bf16 -> fp8, 1 x 128 groups) in GB/s
(bytes in + out: fp8 1 B, bf16 2 B, fp32 scales) and % of copy, with torch eager
`(q.float() * s_expanded).to(bf16)` for reference; then fp8_gemm in TFLOP/s beside cuBLAS blockwise
FP8 (`torch._scaled_mm`) and bf16 `torch.matmul`, with each one's relative Frobenius error against a
float64 product of the dequantized operands.

Two timings. `triton.testing.do_bench` medians (it zeroes a 256 MB buffer before each run to flush
the L2; for kernels of a few microseconds its dirty lines and the host launch overhead can add tens of
microseconds, so small shapes read low there). And CUDA-graph replay of a round of calls over
rotating buffers (>= 256 MB per round, so inputs come from memory, not the L2): the GPU time of the
kernels. --sweep also times tile variants of every kernel, or of one (for choosing defaults).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fp8conv.kernels import reference as ref  # noqa: E402
from fp8conv.kernels import triton_kernels as tk  # noqa: E402

MEM_SHAPES = [(7168, 18432), (16384, 7168), (576, 7168), (7000, 1000)]
GEMM_NK = [(7168, 18432), (24576, 1536), (4096, 7168), (7168, 2048)]
SWEEP_SHAPES = MEM_SHAPES


def bench(fn, quick: bool) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def copy_bandwidth(quick: bool) -> float:
    n = (256 if quick else 1024) * 2**20  # bytes
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), quick)
    return 2 * n / ms / 1e6


def rand_codes(shape) -> torch.Tensor:
    c = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    c[(c & 0x7F) == 0x7F] = 0x7E  # no NaN codes
    return c.view(torch.float8_e4m3fn)


def graph_ms(calls: list, reps: int = 20) -> float:
    """Median milliseconds per call, the calls (each on its own buffers, together several times the
    L2) captured in one CUDA graph and replayed: GPU time without host launch overhead."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    keep = []
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in calls:
            keep.append(fn())  # keep outputs alive: every call writes its own memory
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / len(calls))
    del g, keep
    return sorted(times)[len(times) // 2]


def mem_shape_rows(m: int, n: int, quick: bool, copy_gbs: float, sweep: str | None) -> list[tuple]:
    rows = []
    sm, sn = triton.cdiv(m, 128), triton.cdiv(n, 128)
    b_dq = m * n * 1 + sm * sn * 4 + m * n * 2
    b_wq = m * n * 2 + m * n * 1 + sm * sn * 4
    b_aq = m * n * 2 + m * n * 1 + m * sn * 4
    # enough buffer sets that one round of calls moves >= 256 MB (5x the H100's L2)
    n_sets = max(2, -(-256 * 2**20 // b_dq))
    qs = [rand_codes((m, n)) for _ in range(n_sets)]
    ss = [torch.rand(sm, sn, device="cuda") + 0.5 for _ in range(n_sets)]
    xs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    s_exp = [ref.expand_scales(s, (m, n), (128, 128)).contiguous() for s in ss]
    # a copy-like elementwise kernel over the same byte count (half read, half written), timed the
    # same way: what plain streaming reaches at this size
    half = b_dq // 2
    srcs = [torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda") for _ in range(n_sets)]
    dsts = [torch.empty_like(t) for t in srcs]
    same_copy = (
        2
        * half
        / graph_ms([lambda i=i: torch.bitwise_not(srcs[i], out=dsts[i]) for i in range(n_sets)])
        / 1e6
    )

    def row(name, nbytes, make):
        ms = bench(lambda: make(0), quick)
        gbs = nbytes / ms / 1e6
        gms = graph_ms([lambda i=i: make(i) for i in range(n_sets)])
        ggbs = nbytes / gms / 1e6
        rows.append(
            (
                name,
                f"{m}x{n}",
                f"{ms * 1e3:7.1f} us",
                f"{gbs:5.0f}",
                f"{100 * gbs / copy_gbs:5.1f}%",
                f"{gms * 1e3:7.1f} us",
                f"{ggbs:5.0f}",
                f"{100 * ggbs / copy_gbs:5.1f}%",
                f"{100 * ggbs / same_copy:5.1f}%",
            )
        )

    def dequant(i):
        return tk.weight_dequant_triton(qs[i], ss[i])

    def wquant(i):
        return tk.weight_quant_triton(xs[i])

    def aquant(i):
        return tk.act_quant_triton(xs[i])

    row("weight_dequant triton", b_dq, dequant)
    row("weight_dequant torch eager", b_dq, lambda i: (qs[i].float() * s_exp[i]).to(torch.bfloat16))
    row("weight_quant triton", b_wq, wquant)
    row("act_quant triton", b_aq, aquant)
    if sweep in ("all", "dequant"):
        saved = dict(tk.DEQUANT_TILE)
        for bm, bn, nw in ((64, 128, 4), (32, 256, 4), (16, 256, 4)):
            tk.DEQUANT_TILE.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
            row(f"  dequant tile {bm}x{bn} w{nw}", b_dq, dequant)
        tk.DEQUANT_TILE.update(saved)
    if sweep in ("all", "act_quant"):
        saved = dict(tk.ACT_QUANT_TILE)
        for key in ("ELEMS", "small_ELEMS"):  # whichever this shape uses
            for elems, nw in ((2048, 4), (4096, 4), (8192, 8)):
                for div in (0, 2):
                    tk.ACT_QUANT_TILE[key] = elems
                    tk.ACT_QUANT_TILE[key.replace("ELEMS", "num_warps")] = nw
                    tk.ACT_QUANT_TILE[key.replace("ELEMS", "div")] = div
                    row(f"  act_quant {key} {elems} w{nw} div{div}", b_aq, aquant)
                tk.ACT_QUANT_TILE.update(saved)
        # whole short rows (shapes that take that path; row_ELEMS 0 turns it off)
        for elems, nw in ((0, 2), (1024, 2), (1024, 4), (2048, 4)):
            tk.ACT_QUANT_TILE.update(row_ELEMS=elems, row_num_warps=nw)
            row(f"  act_quant row_ELEMS {elems} w{nw}", b_aq, aquant)
        tk.ACT_QUANT_TILE.update(saved)
    if sweep in ("all", "weight_quant"):
        saved = dict(tk.WEIGHT_QUANT)
        for nw in (4, 8, 16):
            for div in (0, 1, 2):
                tk.WEIGHT_QUANT.update(num_warps=nw, div=div)
                row(f"  weight_quant w{nw} div{div}", b_wq, wquant)
        tk.WEIGHT_QUANT.update(saved)
    rows.append(("(same-size copy, graph)", f"{m}x{n}", "", "", "", "", f"{same_copy:5.0f}", "", ""))
    return rows


def mem_rows(quick: bool, copy_gbs: float, sweep: str | None) -> list[tuple]:
    rows = []
    shapes = MEM_SHAPES[:1] + MEM_SHAPES[2:] if quick else MEM_SHAPES
    for m, n in shapes:
        rows += mem_shape_rows(m, n, quick, copy_gbs, sweep if (m, n) in SWEEP_SHAPES else None)
        torch.cuda.empty_cache()
    return rows


def rel_err(c: torch.Tensor, r64: torch.Tensor) -> float:
    c = c.double()
    if not torch.isfinite(c).all():
        return float("nan")
    return ((c - r64).norm() / r64.norm()).item()


def gemm_shape(m: int, n: int, k: int, quick: bool, sweep: bool, notes: list[str]) -> tuple:
    flop = 2.0 * m * n * k
    # operand sets rotated through in the graph timings, >= 256 MB per round (5x the L2)
    n_sets = max(1, -(-256 * 2**20 // (m * k + n * k + 2 * m * n)))
    xbs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    wbs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    # A scales MN-major, the layout cuBLAS's blockwise GEMM requires; both GEMMs get the same tensors
    xqs = [tk.act_quant_triton(xb, mn_major=True) for xb in xbs]
    xs_rows = [xs.contiguous() for _, xs in xqs]  # the same scales row-major, as act_quant's default
    wqs = [tk.weight_quant_triton(wb) for wb in wbs]
    (xq, xs), (wq, ws) = xqs[0], wqs[0]
    a64 = xq.double() * ref.expand_scales(xs, (m, k), (1, 128)).double()
    b64 = wq.double() * ref.expand_scales(ws, (n, k), (128, 128)).double()
    r64 = a64 @ b64.t()
    del a64, b64

    def tflops(ms):
        return flop / ms / 1e9

    def ours(i):
        return tk.fp8_gemm_triton(*xqs[i], *wqs[i])

    c = ours(0)
    e_ours = rel_err(c, r64)
    t_api = bench(lambda: ours(0), quick)
    t_ours = graph_ms([lambda i=i: ours(i) for i in range(n_sets)])
    t_rows = graph_ms([lambda i=i: tk.fp8_gemm_triton(xqs[i][0], xs_rows[i], *wqs[i]) for i in range(n_sets)])
    try:

        def cublas(i):
            return torch._scaled_mm(
                xqs[i][0], wqs[i][0].t(), scale_a=xqs[i][1], scale_b=wqs[i][1].t(), out_dtype=torch.bfloat16
            )

        e_cb = f"{rel_err(cublas(0), r64):.1e}"
        t_cb = graph_ms([lambda i=i: cublas(i) for i in range(n_sets)])
        cb, ratio = f"{tflops(t_cb):7.0f}", f"{t_cb / t_ours:5.2f}x"
    except Exception as ex:  # noqa: BLE001
        cb, ratio, e_cb = "n/a", "n/a", "n/a"
        notes.append(f"cuBLAS blockwise at {m}x{n}x{k}: {type(ex).__name__}: {str(ex)[:120]}")
    t_bf = graph_ms([lambda i=i: torch.matmul(xbs[i], wbs[i].t()) for i in range(n_sets)])
    if sweep:
        best = None
        tail = (c, xs_rows[0], ws, m, n, k, triton.cdiv(k, 128), tk._m_bucket(m))
        for kind, cfg in SWEEP_CONFIGS:
            bm, bn, gm, nw, ns = cfg
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=gm, num_warps=nw, num_stages=ns)
            if kind == "tma":
                from triton.tools.tensor_descriptor import TensorDescriptor

                a_desc = TensorDescriptor.from_tensor(xq, [bm, 128])
                b_desc = TensorDescriptor.from_tensor(wq, [bn, 128])

                def run(grid=grid, kw=kw, a_desc=a_desc, b_desc=b_desc):
                    tk._fp8_gemm_tma_kernel[grid](a_desc, b_desc, *tail, **kw, **tk.LAUNCH_OPTS)
            else:

                def run(grid=grid, kw=kw):
                    tk._fp8_gemm_kernel[grid](xq, wq, *tail, EVEN_K=k % 128 == 0, **kw, **tk.LAUNCH_OPTS)

            try:
                t = bench(run, True)
            except Exception as ex:  # noqa: BLE001
                notes.append(f"sweep {kind} {cfg} at {m}x{n}x{k}: {type(ex).__name__}: {str(ex)[:80]}")
                continue
            if best is None or t < best[0]:
                best = (t, kind, cfg)
            notes.append(f"sweep {m}x{n}x{k} {kind} {cfg}: {tflops(t):.0f} TFLOP/s")
        if best:
            notes.append(f"BEST {m}x{n}x{k}: {best[1]} {best[2]} {tflops(best[0]):.0f} TFLOP/s")
    return (
        f"{m}x{n}x{k}",
        f"{tflops(t_ours):7.0f}",
        cb,
        ratio,
        f"{tflops(t_rows):7.0f}",
        f"{tflops(t_bf):7.0f}",
        f"{tflops(t_api):7.0f}",
        f"{e_ours:.1e}",
        e_cb,
    )


def gemm_rows(quick: bool, sweep: bool) -> tuple[list[tuple], list[str]]:
    rows, notes = [], []
    for m in (128,) if quick else (4096, 128):
        for n, k in GEMM_NK:
            rows.append(gemm_shape(m, n, k, quick, sweep, notes))
            torch.cuda.empty_cache()
    return rows, notes


# (kernel, (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages))
SWEEP_CONFIGS = [
    ("tma", (128, 128, 8, 8, 3)),
    ("tma", (128, 128, 8, 8, 4)),
    ("tma", (128, 128, 8, 8, 5)),
    ("tma", (128, 128, 16, 8, 4)),
    ("tma", (64, 128, 8, 4, 4)),
    ("tma", (128, 64, 8, 4, 4)),
    ("tma", (64, 64, 8, 4, 5)),
    ("tma", (64, 64, 8, 4, 6)),
    ("ptr", (128, 128, 8, 8, 4)),
    ("ptr", (64, 64, 8, 4, 5)),
]


def table(header: tuple, rows: list[tuple]) -> str:
    cols = list(zip(header, *rows, strict=True))
    widths = [max(len(str(v)) for v in col) for col in cols]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    ap.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        choices=("all", "dequant", "act_quant", "weight_quant", "gemm"),
        help="also time tile variants (of one kernel)",
    )
    ap.add_argument("--only", choices=("mem", "gemm"), help="only the memory-bound kernels or only fp8_gemm")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(args.quick)
    mem = mem_rows(args.quick, copy_gbs, args.sweep) if args.only != "gemm" else []
    gemm, notes = gemm_rows(args.quick, args.sweep in ("all", "gemm")) if args.only != "mem" else ([], [])
    for line in notes:
        print(line)
    print()
    print(
        f"# fp8conv kernels on {torch.cuda.get_device_name()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)")
    print(
        "GB/s = (bytes in + out) / time. do_bench: median, L2 flushed before each run. graph: CUDA-graph"
        " replay over rotating buffers (>= 256 MB per round), no host overhead."
    )
    print(
        table(
            ("kernel", "shape", "do_bench", "GB/s", "% copy", "graph", "GB/s", "% copy", "% same-size copy"),
            mem,
        )
    )
    print()
    print(
        "fp8_gemm TFLOP/s (bf16 out), CUDA-graph replay over rotating operands; fp8conv and cuBLAS get"
        " the same operands, A scales MN-major (act_quant(..., mn_major=True), the layout cuBLAS requires);"
        " speed = cuBLAS time / fp8conv time; 'row-major a_s' = fp8conv with act_quant's default layout;"
        " 'do_bench' = the public call under do_bench (L2 flushed, host launch overhead can show);"
        " err = rel. Frobenius vs float64 of the dequantized operands"
    )
    print(
        table(
            (
                "MxNxK",
                "fp8conv",
                "cuBLAS fp8 blockwise",
                "speed vs cuBLAS",
                "fp8conv, row-major a_s",
                "bf16 matmul",
                "fp8conv do_bench",
                "err fp8conv",
                "err cuBLAS",
            ),
            gemm,
        )
    )


if __name__ == "__main__":
    main()
