"""End-to-end conversion benchmark: every figure a ratio measured in this run, on this disk.

Builds a synthetic DeepSeek-V3-shaped FP8 checkpoint (real layer shapes, random finite codes, ragged
576-row tiles, scales in float32) of --gb gigabytes, then times, each in a fresh process:
  floor-deq   read the FP8 input and write a bf16-sized file with `cat` (+ fsync), the I/O floor;
              beside it the disk's write ceiling (in this process: fp8conv's way of writing, no
              reading or converting) and the start-up of a Python process that imports torch
  dequantize  fp8conv dequantize (--device)
  no-wb       the same with FP8CONV_WRITEBACK=0 (no early-writeback hints), into another folder
  floor-q     read the bf16 output and write an FP8-sized file with `cat` (+ fsync)
  quantize    fp8conv quantize of that bf16 output
  reference   DeepSeek's fp8_cast_bf16.py, when --reference-script PATH is given (GPU only), as it
              is and followed by `sync` (fp8conv fsyncs its output, the script does not)
  floor-c     read the FP8 input and write an FP8-sized file with `cat` (+ fsync)
  convert     fp8conv convert (--device): a relayout (codes copied), then the lossy requants: UE8M0
              scales, per-channel and MXFP8 scales (band by band, loss measured against the source)
and prints one table: seconds, ratio to the I/O floor, peak RSS over the largest tensor; then, for
each fp8conv run, the seconds per stage from its --json summary (summed over threads).
Usage: python bench/bench_convert.py [--gb 1.0] [--device cpu|cuda] [--only all|convert] [--dir bench-out]
[--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fp8conv.checkpoint.output import start_writeback  # noqa: E402
from fp8conv.checkpoint.safetensors_io import save_file  # noqa: E402
from fp8conv.convert.plan import native_fp8_config  # noqa: E402

# (name, rows, cols) of one DeepSeek-V3 MoE layer's FP8 weights, trimmed to 8 routed experts.
LAYER = [
    ("self_attn.q_a_proj", 1536, 7168),
    ("self_attn.q_b_proj", 24576, 1536),
    ("self_attn.kv_a_proj_with_mqa", 576, 7168),
    ("self_attn.kv_b_proj", 32768, 512),
    ("self_attn.o_proj", 7168, 16384),
    *[
        (f"mlp.experts.{e}.{p}", r, c)
        for e in range(8)
        for p, r, c in (("gate_proj", 2048, 7168), ("up_proj", 2048, 7168), ("down_proj", 7168, 2048))
    ],
]


def build(root: Path, gb: float, shard_gb: float) -> int:
    """Write the synthetic checkpoint; return the largest tensor's bf16 size in bytes."""
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    # Codes are sliced from one random pool (timing does not depend on which finite codes they are);
    # drawing every byte afresh took minutes for 8 GB.
    pool = torch.randint(0, 256, (256 << 20,), generator=gen, dtype=torch.int32).to(torch.uint8)
    pool[(pool & 0x7F) == 0x7F] = 0x3C
    target = int(gb * 1e9)
    shard_cap = int(shard_gb * 1e9)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = cur = 0
    largest = 0
    layer = 0
    while size < target:
        for name, r, c in LAYER:
            if size >= target:
                break
            off = int(torch.randint(0, pool.numel() - r * c, (1,), generator=gen))
            b = pool[off : off + r * c].view(r, c)
            w = f"model.layers.{layer}.{name}.weight"
            s = torch.rand(math.ceil(r / 128), math.ceil(c / 128), generator=gen) * 1e-3 + 1e-4
            if cur + b.numel() > shard_cap and shards[-1]:
                shards.append({})
                cur = 0
            shards[-1][w] = b.view(torch.float8_e4m3fn)
            shards[-1][w + "_scale_inv"] = s
            shards[-1][f"model.layers.{layer}.{name}.norm.weight"] = torch.ones(c, dtype=torch.bfloat16)
            cur += b.numel()
            size += b.numel() + s.numel() * 4
            largest = max(largest, r * c * 2)
        layer += 1
    n = len(shards)
    weight_map = {}
    for i, t in enumerate(shards, 1):
        fn = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(t, root / fn, {"format": "pt"})
        weight_map.update({k: fn for k in t})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map})
    )
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "deepseek_v3",
                "torch_dtype": "bfloat16",
                "quantization_config": native_fp8_config(),
            }
        )
    )
    return largest


def shard_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Seconds, peak RSS (GB) and stdout of a command run in a fresh process (with `env` added to
    the environment), after flushing earlier writes (background writeback of the previous step would
    otherwise be charged to this one). The child writes to the wrapper's stdout; the wrapper's own
    JSON line comes last."""
    os.sync()
    wrapper = (
        "import resource,subprocess,sys,time,json;t=time.perf_counter();"
        "rc=subprocess.call(sys.argv[1:]);dt=time.perf_counter()-t;"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024;"
        "print(json.dumps([rc,dt,r]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    *child, last = out.stdout.rstrip("\n").split("\n")
    rc, dt, rss = json.loads(last)
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return dt, rss / 1e9, "\n".join(child)


def stage_seconds(stdout: str) -> dict[str, float]:
    """stage_seconds from the JSON summary an fp8conv command printed (--json -)."""
    return json.loads(stdout)["stage_seconds"]


def write_ceiling(dst_file: Path, nbytes: int, writers: int = 4, chunk: int = 64 << 20) -> float:
    """Seconds to put nbytes on disk the way fp8conv writes (positional writes from `writers`
    threads to disjoint 64 MiB ranges, a writeback hint after each, fsync): what this disk allows an
    output of that size, with no reading or converting. (On a GPU machine: 1.64-1.71 GB/s with 1, 4
    or 8 writers and writeback hints, 1.45-1.65 GB/s with O_DIRECT; bench/NOTES.md.)"""
    block = os.urandom(1 << 20) * (chunk >> 20)
    os.sync()
    t = time.perf_counter()
    fd = os.open(dst_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:

        def work(k: int) -> None:
            view = memoryview(block)
            for off in range(k * chunk, nbytes, writers * chunk):
                n, pos = min(chunk, nbytes - off), 0
                while pos < n:
                    pos += os.pwrite(fd, view[pos:n], off + pos)
                start_writeback(fd, off, n)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(writers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    dst_file.unlink()
    return dt


def floor_cmd(src: Path, out_bytes: int, dst_file: Path) -> list[str]:
    """cat the input shards (twice if the output is larger), keep out_bytes, fsync the file. `tee -p`
    drains the whole input after head has its bytes: without it, an output smaller than the input
    (quantize) would stop cat halfway and the floor would read only part of the input."""
    shards = " ".join(str(p) for p in sorted(src.glob("*.safetensors")))
    reps = max(1, math.ceil(out_bytes / shard_bytes(src)))
    return [
        "bash",
        "-c",
        f"cat {' '.join([shards] * reps)} | tee -p /dev/null | head -c {out_bytes} > {dst_file} "
        f"&& sync {dst_file} && rm {dst_file}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=str(ROOT / "bench-out"))
    ap.add_argument("--reference-script", default=None, help="DeepSeek's fp8_cast_bf16.py")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", choices=("all", "convert"), default="all", help="convert: only FP8 -> FP8 rows")
    args = ap.parse_args()
    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    t = time.perf_counter()
    largest = build(work / "fp8", args.gb, args.shard_gb)
    print(
        f"built {shard_bytes(work / 'fp8') / 1e9:.2f} GB FP8 checkpoint in "
        f"{time.perf_counter() - t:.0f}s; largest tensor {largest / 1e6:.0f} MB in bf16",
        flush=True,
    )
    fp8 = [sys.executable, "-m", "fp8conv.cli"]
    in_fp8 = shard_bytes(work / "fp8")
    rows = []
    out_bf16 = int(in_fp8 * 2)  # close enough for the floor; measured size replaces it below
    # warm the page cache equally for the floor and the tool
    subprocess.run(["bash", "-c", f"cat {work}/fp8/*.safetensors > /dev/null"])
    stages: list[tuple[str, dict[str, float]]] = []  # (row, stage_seconds) per fp8conv run
    if args.only == "all":
        fl, _, _ = timed(floor_cmd(work / "fp8", out_bf16, work / "floor.bin"))

        def dequantize(dst: Path, env: dict[str, str] | None = None) -> tuple[float, float, dict]:
            cmd = [*fp8, "dequantize", str(work / "fp8"), str(dst), "--quiet", "--json", "-"]
            dt, rss, stdout = timed([*cmd, "--device", args.device], env)
            return dt, rss, stage_seconds(stdout)

        dq, dq_rss, dq_st = dequantize(work / "bf16")
        out_bf16 = shard_bytes(work / "bf16")
        rows.append(("I/O floor: FP8 in, bf16-sized out (cat)", fl, None, None))
        # what neither tool can beat: the disk's write speed, and starting Python with torch
        ceil = write_ceiling(work / "ceiling.bin", out_bf16)
        rows.append(("  disk write ceiling, bf16-sized (4 writers)", ceil, ceil / fl, None))
        start, _, _ = timed([sys.executable, "-c", "import torch"])
        rows.append(("  start-up: python -c 'import torch'", start, None, None))
        what = f"fp8conv dequantize ({args.device})"
        rows.append((what, dq, dq / fl, dq_rss))
        stages.append((what, dq_st))
        # A/B of the early-writeback hint in the same run, on the same disk
        nowb, nowb_rss, nowb_st = dequantize(work / "bf16-nowb", {"FP8CONV_WRITEBACK": "0"})
        shutil.rmtree(work / "bf16-nowb", ignore_errors=True)
        what = f"  same, FP8CONV_WRITEBACK=0 ({args.device})"
        rows.append((what, nowb, nowb / fl, nowb_rss))
        stages.append((what, nowb_st))
        if args.reference_script:
            ref_cmd = [
                sys.executable,
                args.reference_script,
                "--input-fp8-hf-path",
                str(work / "fp8"),
                "--output-bf16-hf-path",
                str(work / "ref"),
            ]
            ref, ref_rss, _ = timed(ref_cmd)
            shutil.rmtree(work / "ref", ignore_errors=True)
            # fp8conv's time includes the fsync of every file it writes; the script leaves its output in
            # the page cache, so this row charges it the same durability
            ref_s, ref_s_rss, _ = timed(["bash", "-c", f"{shlex.join(ref_cmd)} && sync"])
            shutil.rmtree(work / "ref", ignore_errors=True)
            rows.append(("DeepSeek fp8_cast_bf16.py (GPU)", ref, ref / fl, ref_rss))
            rows.append(("  speed-up of fp8conv over it", ref / dq, None, None))
            rows.append(("DeepSeek fp8_cast_bf16.py + sync", ref_s, ref_s / fl, ref_s_rss))
            rows.append(("  speed-up of fp8conv over it (+ sync)", ref_s / dq, None, None))
        out_q = in_fp8
        flq, _, _ = timed(floor_cmd(work / "bf16", out_q, work / "floor.bin"))
        q, q_rss, q_out = timed(
            [*fp8, "quantize", str(work / "bf16"), str(work / "q"), "--quiet", "--json", "-"]
            + ["--device", args.device]
        )
        rows.append(("I/O floor: bf16 in, FP8-sized out (cat)", flq, None, None))
        what = f"fp8conv quantize ({args.device})"
        rows.append((what, q, q / flq, q_rss))
        stages.append((what, stage_seconds(q_out)))
        # the other schemes, against the same floor (the same bytes in, about the same out)
        for label, extra in (
            (
                "--scheme fp8-channel --format compressed-tensors",
                ["--scheme", "fp8-channel", "--format", "compressed-tensors"],
            ),
            ("--scheme mxfp8", ["--scheme", "mxfp8"]),
        ):
            dst = work / "q-scheme"
            sec, rss, so = timed(
                [
                    *fp8,
                    "quantize",
                    str(work / "bf16"),
                    str(dst),
                    "--quiet",
                    "--json",
                    "-",
                    "--device",
                    args.device,
                ]
                + extra
            )
            shutil.rmtree(dst, ignore_errors=True)
            what = f"  quantize {label} ({args.device})"
            rows.append((what, sec, sec / flq, rss))
            stages.append((what, stage_seconds(so)))
    # FP8 -> FP8: FP8 in, FP8 out
    flc, _, _ = timed(floor_cmd(work / "fp8", in_fp8, work / "floor.bin"))
    rows.append(("I/O floor: FP8 in, FP8-sized out (cat)", flc, None, None))
    for label, extra in (
        ("--format compressed-tensors (relayout)", ["--format", "compressed-tensors"]),
        ("--scale-fmt ue8m0 (requant)", ["--scale-fmt", "ue8m0"]),
        (
            "--scheme fp8-channel --format compressed-tensors (requant)",
            ["--scheme", "fp8-channel", "--format", "compressed-tensors"],
        ),
        ("--scheme mxfp8 (requant)", ["--scheme", "mxfp8"]),
    ):
        dst = work / "converted"
        sec, rss, so = timed(
            [*fp8, "convert", str(work / "fp8"), str(dst), "--quiet", "--json", "-", "--device", args.device]
            + extra
        )
        shutil.rmtree(dst, ignore_errors=True)
        what = f"fp8conv convert {label} ({args.device})"
        rows.append((what, sec, sec / flc, rss))
        stages.append((what, stage_seconds(so)))
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
    print(
        f"\n{in_fp8 / 1e9:.2f} GB FP8 <-> {out_bf16 / 1e9:.2f} GB bf16 on {dev}, "
        f"{time.strftime('%Y-%m-%d')}; largest tensor {largest / 1e6:.0f} MB (bf16)"
    )
    w = max(len(what) for what, *_ in rows) + 2
    print(f"{'what':<{w}}{'seconds':>9}{'x floor':>9}{'peak RSS GB':>13}{'RSS/largest':>13}")
    for what, sec, ratio, rss in rows:
        r = f"{ratio:.2f}" if ratio is not None else ""
        m = f"{rss:.2f}" if rss is not None else ""
        rl = f"{rss * 1e9 / largest:.2f}" if rss is not None else ""
        print(f"{what:<{w}}{sec:>9.2f}{r:>9}{m:>13}{rl:>13}")
    print("\nseconds per stage, summed over threads (read, convert and write overlap):")
    for what, st in stages:
        print(f"  {what.strip():<{w}}" + "  ".join(f"{k} {v:.2f}" for k, v in st.items()))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
