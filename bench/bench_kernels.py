"""Benchmark of fp8conv's kernels on a CUDA GPU, through the public functions (fp8conv.kernels);
prints two tables.

    python bench/bench_kernels.py [--quick] [--sweep [KERNEL]] [--only mem|gemm]

Rows: the device-to-device copy ceiling (bytes read + written, a large buffer), then weight_dequant
(fp8 -> bf16), weight_quant (bf16 -> fp8), act_quant (bf16 -> fp8, 1 x 128 groups), channel_quant (one
scale per row) and mx_quant (MXFP8, 1 x 32 groups), each beside the torch path, and fp4_dequant
(MX FP4 -> bf16) in % of that copy (bytes in + out: fp8 1 B, bf16 2 B, fp4 half a byte, scales), and
in % of a same-size copy-like kernel timed the same way; then fp8_gemm beside cuBLAS blockwise FP8
(`torch._scaled_mm`, same operands) with each one's relative Frobenius error against a float64
product of the dequantized operands.

Three timings, all over a round of calls on rotating buffers (>= 256 MB per round, so inputs come from
memory, not the L2), medians of several rounds:
- eager: the calls issued back to back from Python, as a user calls them; where the host takes longer
  per call than the GPU, the host time shows.
- graph: the same round captured in one CUDA graph and replayed: GPU time without host overhead.
- host: the Python time per call alone (the calls queued on a busy GPU, no synchronization inside).
--sweep also times tile variants of every kernel, or of one (for choosing defaults).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fp8conv.kernels as K  # noqa: E402
from fp8conv.kernels import fp4 as f4  # noqa: E402
from fp8conv.kernels import gemm as gk  # noqa: E402
from fp8conv.kernels import quant as tk  # noqa: E402
from fp8conv.kernels import reference as ref  # noqa: E402
from fp8conv.kernels.common import LAUNCH_OPTS, clear_launch_state  # noqa: E402

MEM_SHAPES = [(7168, 18432), (16384, 7168), (576, 7168), (7000, 1000)]
GEMM_NK = [(7168, 18432), (24576, 1536), (4096, 7168), (7168, 2048)]
SWEEP_SHAPES = MEM_SHAPES[:2]


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


def eager_ms(calls: list, reps: int = 20) -> float:
    """Median milliseconds per call, the round of calls issued eagerly back to back (events around
    the round)."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for fn in calls:
            fn()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / len(calls))
    return sorted(times)[len(times) // 2]


def host_us(calls: list, reps: int = 5) -> float:
    """Median host microseconds per call: the round of calls timed on the CPU clock while the GPU is
    still busy with a spin issued first (so the launches queue), synchronizing after the clock stops."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU work ahead of the calls
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out.append((t1 - t0) / len(calls) * 1e6)
    return sorted(out)[len(out) // 2]


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
    copies = [lambda i=i: torch.bitwise_not(srcs[i], out=dsts[i]) for i in range(n_sets)]
    same_copy = 2 * half / graph_ms(copies) / 1e6
    same_copy_eager = 2 * half / eager_ms(copies * max(1, 16 // n_sets)) / 1e6
    # torch's own elementwise kernels with the quantizers' and fp4_dequant's traffic (read 2 B, write
    # 1 B; read 1 B, write 4 B): what a plain stream of that read / write mix reaches here
    casts = [torch.empty(m, n, dtype=torch.float8_e4m3fn, device="cuda") for _ in range(n_sets)]
    fp4_like = [torch.empty(m, n // 4, dtype=torch.int32, device="cuda") for _ in range(n_sets)]
    bytes_src = [torch.randint(0, 255, (m, n // 4), dtype=torch.uint8, device="cuda") for _ in range(n_sets)]

    def row(name, nbytes, make, host=True, graph=True):
        """graph=False: eager only (torch paths that copy a host constant cannot be captured)."""
        clear_launch_state()  # the sweeps change tuning tables, read when a launch state is built
        calls = [lambda i=i: make(i) for i in range(n_sets)]
        ems = eager_ms(calls * max(1, 16 // n_sets))  # >= 16 calls a round: its first launch amortized
        egbs = nbytes / ems / 1e6
        graph_cols = ("", "", "")
        if graph:
            gms = graph_ms(calls)
            ggbs = nbytes / gms / 1e6
            graph_cols = (
                f"{gms * 1e3:7.1f} us",
                f"{100 * ggbs / copy_gbs:5.1f}%",
                f"{100 * ggbs / same_copy:5.1f}%",
            )
        hu = f"{host_us(calls * max(1, 64 // n_sets)):5.1f}" if host else ""
        rows.append(
            (
                name,
                f"{m}x{n}",
                f"{ems * 1e3:7.1f} us",
                f"{100 * egbs / copy_gbs:5.1f}%",
                f"{100 * egbs / same_copy_eager:5.1f}%",
                *graph_cols,
                hu,
            )
        )

    def dequant(i):
        return K.weight_dequant(qs[i], ss[i])

    def wquant(i):
        return K.weight_quant(xs[i])

    def aquant(i):
        return K.act_quant(xs[i])

    # FP4: m rows of n4 = n rounded down to 32 outputs, as blocks [m, n4/32, 16] and e8m0 scales
    n4 = n - n % 32
    b_f4 = m * n4 // 2 + m * n4 // 32 + m * n4 * 2
    f4b = [torch.randint(0, 256, (m, n4 // 32, 16), dtype=torch.uint8, device="cuda") for _ in range(n_sets)]
    f4s = [torch.randint(110, 140, (m, n4 // 32), dtype=torch.uint8, device="cuda") for _ in range(n_sets)]

    def fp4(i):
        return K.fp4_dequant(f4b[i], f4s[i])

    row("weight_dequant", b_dq, dequant)
    row("weight_dequant, torch eager", b_dq, lambda i: (qs[i].float() * s_exp[i]).to(torch.bfloat16), False)
    row("weight_quant", b_wq, wquant)
    row("act_quant", b_aq, aquant)
    # per-channel and MXFP8 (bf16 in, e4m3 out, one float32 per row / one byte per 32), beside the
    # torch ops they replaced on the GPU (reference.py, same bytes)
    b_ch = m * n * 3 + m * 4
    row("channel_quant", b_ch, lambda i: K.channel_quant(xs[i]))
    row("channel_quant, torch eager", b_ch, lambda i: ref.channel_quant_torch(xs[i]), False, False)
    if n % 32 == 0:
        b_mx = m * n * 3 + m * n // 32
        row("mx_quant (ceil)", b_mx, lambda i: K.mx_quant(xs[i], "ceil"))
        row("mx_quant (ct)", b_mx, lambda i: K.mx_quant(xs[i], "ct"), False)
        row("mx_quant, torch eager", b_mx, lambda i: ref.mx_quant_torch(xs[i], "ceil"), False, False)
    row(f"fp4_dequant ({m}x{n4})", b_f4, fp4)
    row("  torch bf16 -> fp8 cast (quantizer traffic)", 3 * m * n, lambda i: casts[i].copy_(xs[i]), False)
    row(
        "  torch uint8 -> int32 (fp4_dequant traffic)",
        5 * m * (n // 4),
        lambda i: fp4_like[i].copy_(bytes_src[i]),
        False,
    )
    if sweep in ("all", "fp4") or (sweep == "quant" and "fp4" != "dequant"):
        saved = dict(f4.FP4_TILE)
        for groups, nw in ((64, 2), (64, 4), (128, 2), (128, 4), (256, 4), (256, 8)):
            f4.FP4_TILE.update(GROUPS=groups, num_warps=nw)
            row(f"  fp4 {groups} groups w{nw}", b_f4, fp4, False)
        f4.FP4_TILE.update(saved)
    if sweep in ("all", "dequant") or (sweep == "quant" and "dequant" != "dequant"):
        saved = dict(tk.DEQUANT_TILE)
        for bm, bn, nw in ((64, 128, 4), (32, 256, 4), (16, 256, 4)):
            tk.DEQUANT_TILE.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
            row(f"  dequant tile {bm}x{bn} w{nw}", b_dq, dequant, False)
        tk.DEQUANT_TILE.update(saved)
    if sweep in ("all", "act_quant") or (sweep == "quant" and "act_quant" != "dequant"):
        saved = dict(tk.ACT_QUANT_TILE)
        for key in ("ELEMS", "small_ELEMS"):  # whichever this shape uses
            for elems, nw in ((4096, 4), (8192, 8), (8192, 16), (16384, 8), (16384, 16)):
                for div in (0, 2):
                    tk.ACT_QUANT_TILE[key] = elems
                    tk.ACT_QUANT_TILE[key.replace("ELEMS", "num_warps")] = nw
                    tk.ACT_QUANT_TILE[key.replace("ELEMS", "div")] = div
                    row(f"  act_quant {key} {elems} w{nw} div{div}", b_aq, aquant, False)
                tk.ACT_QUANT_TILE.update(saved)
        # whole short rows (shapes that take that path; row_ELEMS 0 turns it off)
        for elems, nw in ((0, 2), (1024, 2), (1024, 4), (2048, 4)):
            tk.ACT_QUANT_TILE.update(row_ELEMS=elems, row_num_warps=nw)
            row(f"  act_quant row_ELEMS {elems} w{nw}", b_aq, aquant, False)
        tk.ACT_QUANT_TILE.update(saved)
    if sweep in ("all", "weight_quant") or (sweep == "quant" and "weight_quant" != "dequant"):
        saved = dict(tk.WEIGHT_QUANT)
        for nw in (4, 8, 16):
            for div in (0, 1, 2):
                tk.WEIGHT_QUANT.update(num_warps=nw, div=div)
                row(f"  weight_quant w{nw} div{div}", b_wq, wquant, False)
        tk.WEIGHT_QUANT.update(saved)
    rows.append(
        (
            "(same-size copy)",
            f"{m}x{n}",
            "",
            f"{100 * same_copy_eager / copy_gbs:5.1f}%",
            "",
            "",
            f"{100 * same_copy / copy_gbs:5.1f}%",
            "",
            "",
        )
    )
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
    # operand sets rotated through, >= 256 MB per round (several times the L2)
    n_sets = max(1, -(-256 * 2**20 // (m * k + n * k + 2 * m * n)))
    xbs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    wbs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    # A scales MN-major, the layout cuBLAS's blockwise GEMM requires; both GEMMs get the same tensors
    xqs = [K.act_quant(xb, mn_major=True) for xb in xbs]
    xs_rows = [xs.contiguous() for _, xs in xqs]  # the same scales row-major, as act_quant's default
    wqs = [K.weight_quant(wb) for wb in wbs]
    del xbs, wbs
    (xq, xs), (wq, ws) = xqs[0], wqs[0]
    a64 = xq.double() * ref.expand_scales(xs, (m, k), (1, 128)).double()
    b64 = wq.double() * ref.expand_scales(ws, (n, k), (128, 128)).double()
    r64 = a64 @ b64.t()
    del a64, b64
    rounds = max(1, 16 // n_sets)  # eager rounds of >= 16 calls

    def ours(i):
        return K.fp8_gemm(*xqs[i], *wqs[i])

    def cublas(i):
        return torch._scaled_mm(
            xqs[i][0], wqs[i][0].t(), scale_a=xqs[i][1], scale_b=wqs[i][1].t(), out_dtype=torch.bfloat16
        )

    c = ours(0)
    e_ours = rel_err(c, r64)
    calls = [lambda i=i: ours(i) for i in range(n_sets)]
    t_eager = eager_ms(calls * rounds)
    t_graph = graph_ms(calls)
    h_ours = host_us(calls * max(1, 64 // n_sets))
    t_rows = graph_ms([lambda i=i: K.fp8_gemm(xqs[i][0], xs_rows[i], *wqs[i]) for i in range(n_sets)])
    try:
        e_cb = f"{rel_err(cublas(0), r64):.1e}"
        cb_calls = [lambda i=i: cublas(i) for i in range(n_sets)]
        tc_eager = eager_ms(cb_calls * rounds)
        tc_graph = graph_ms(cb_calls)
        h_cb = f"{host_us(cb_calls * max(1, 64 // n_sets)):5.1f}"
        cb = (f"{tc_eager * 1e3:7.1f}", f"{tc_eager / t_eager:5.2f}x", f"{tc_graph * 1e3:7.1f}")
        cb += (f"{tc_graph / t_graph:5.2f}x", h_cb, f"{tc_graph / t_rows:5.2f}x")
    except Exception as ex:  # noqa: BLE001
        cb, e_cb = ("n/a",) * 6, "n/a"
        notes.append(f"cuBLAS blockwise at {m}x{n}x{k}: {type(ex).__name__}: {str(ex)[:120]}")
    if sweep:
        best = None
        tail = (c, xs_rows[0], ws, m, n, k, triton.cdiv(k, 128), gk._m_bucket(m))
        for kind, cfg in SWEEP_CONFIGS:
            bm, bn, gm, nw, ns = cfg
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=gm, num_warps=nw, num_stages=ns)
            if kind == "tma":
                from triton.tools.tensor_descriptor import TensorDescriptor

                a_desc = TensorDescriptor.from_tensor(xq, [bm, 128])
                b_desc = TensorDescriptor.from_tensor(wq, [bn, 128])

                def run(grid=grid, kw=kw, a_desc=a_desc, b_desc=b_desc):
                    gk._fp8_gemm_tma_kernel[grid](a_desc, b_desc, *tail, **kw, **LAUNCH_OPTS)
            else:

                def run(grid=grid, kw=kw):
                    gk._fp8_gemm_kernel[grid](xq, wq, *tail, EVEN_K=k % 128 == 0, **kw, **LAUNCH_OPTS)

            try:
                t = bench(run, True)
            except Exception as ex:  # noqa: BLE001
                notes.append(f"sweep {kind} {cfg} at {m}x{n}x{k}: {type(ex).__name__}: {str(ex)[:80]}")
                continue
            if best is None or t < best[0]:
                best = (t, kind, cfg)
            notes.append(f"sweep {m}x{n}x{k} {kind} {cfg}: {flop / t / 1e9:.0f} TFLOP/s")
        if best:
            notes.append(f"BEST {m}x{n}x{k}: {best[1]} {best[2]} {flop / best[0] / 1e9:.0f} TFLOP/s")
    return (
        f"{m}x{n}x{k}",
        f"{t_eager * 1e3:7.1f}",
        cb[0],
        cb[1],
        f"{t_graph * 1e3:7.1f}",
        cb[2],
        cb[3],
        f"{flop / t_graph / 1e9:6.0f}",
        f"{h_ours:5.1f}",
        cb[4],
        cb[5],
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
        choices=("all", "dequant", "act_quant", "weight_quant", "fp4", "quant", "gemm"),
        help="also time tile variants (of one kernel; quant: the quantizers and fp4_dequant)",
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
        "% copy = (bytes in + out) / time / copy bandwidth; % same = against a same-size copy-like kernel"
        " timed the same way (eager or graph); host = Python microseconds per call."
    )
    if mem:
        hdr = ("kernel", "shape", "eager", "% copy", "% same", "graph", "% copy", "% same", "host us")
        print(table(hdr, mem))
    print()
    if gemm:
        print(
            "fp8_gemm (public fp8conv.kernels.fp8_gemm, bf16 out) against cuBLAS blockwise (_scaled_mm),"
            " same operands, A scales MN-major (the layout cuBLAS requires); times in us per call; ratio ="
            " cuBLAS time / fp8conv time; 'row-major a_s' = graph ratio with act_quant's default layout;"
            " err = rel. Frobenius vs float64 of the dequantized operands"
        )
        hdr = (
            "MxNxK",
            "eager fp8conv",
            "eager cuBLAS",
            "eager ratio",
            "graph fp8conv",
            "graph cuBLAS",
            "graph ratio",
            "TFLOP/s graph",
            "host us fp8conv",
            "host us cuBLAS",
            "row-major a_s",
            "err fp8conv",
            "err cuBLAS",
        )
        print(table(hdr, gemm))


if __name__ == "__main__":
    main()
