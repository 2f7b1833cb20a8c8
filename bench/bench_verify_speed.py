"""verify against the conversions on the same checkpoint and machine: a table of seconds and ratios.

Builds a bf16 checkpoint of --gb gigabytes (Llama-like 2-D weights, 4096 x 4096 and 11008 x 4096, in
shards of --shard-gb), then times, each in a fresh process on --device:
  quantize        fp8conv quantize of it (the baseline every ratio is against)
  verify fp8      fp8conv verify of the FP8 output (structure, non-finite, NaN codes, scales, GEMM)
  verify fp8 ref  the same with --reference (exact re-quantization and statistics)
  dequantize      fp8conv dequantize of the FP8 output
  verify bf16     fp8conv verify of the dequantized output
  verify bf16 ref the same with --reference the FP8 output (bit equality)
Usage: python bench/bench_verify_speed.py [--gb 1.0] [--device cpu|cuda] [--dir bench-speed] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fp8conv.checkpoint.safetensors_io import save_file  # noqa: E402

SHAPES = [("self_attn.q_proj", 4096, 4096), ("self_attn.o_proj", 4096, 4096), ("mlp.up_proj", 11008, 4096)]


def build(root: Path, gb: float, shard_gb: float) -> None:
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    layer = 0
    while total < gb * 1e9:
        for name, r, c in SHAPES:
            t = (torch.randn(r, c, generator=gen) * 0.02).to(torch.bfloat16)
            if size + t.nbytes > shard_gb * 1e9 and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][f"model.layers.{layer}.{name}.weight"] = t
            shards[-1][f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(c, dtype=torch.bfloat16)
            size += t.nbytes
            total += t.nbytes
        layer += 1
    n = len(shards)
    wm = {}
    for i, tensors in enumerate(shards, 1):
        fn = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, root / fn, {"format": "pt"})
        wm.update(dict.fromkeys(tensors, fn))
    index = {"metadata": {"total_size": total}, "weight_map": wm}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(cfg))


def timed(args: list[str]) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "fp8conv.cli", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t, r.returncode, (r.stderr or r.stdout).strip().splitlines()[-1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="bench-speed")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    src, q, dq = base / "bf16", base / "fp8", base / "deq"
    build(src, args.gb, args.shard_gb)
    dev = ["--device", args.device]
    steps = [
        ("quantize", ["quantize", str(src), str(q), *dev, "-q"]),
        ("verify fp8", ["verify", str(q), *dev, "-q"]),
        ("verify fp8 ref", ["verify", str(q), "--reference", str(src), *dev, "-q"]),
        ("dequantize", ["dequantize", str(q), str(dq), *dev, "-q"]),
        ("verify bf16", ["verify", str(dq), *dev, "-q"]),
        ("verify bf16 ref", ["verify", str(dq), "--reference", str(q), *dev, "-q"]),
    ]
    rows = []
    try:
        for what, cmd in steps:
            dt, code, last = timed(cmd)
            rows.append((what, dt, code))
            print(f"{what:16s} {dt:7.2f}s exit {code} {' '.join(last)[:120]}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    base_s = rows[0][1]
    print(f"\n{args.gb:.2f} GB of bf16 weights, device {args.device}, {torch.get_num_threads()} threads")
    print(f"{'step':16s} {'seconds':>8s} {'vs quantize':>12s} {'exit':>5s}")
    for what, dt, code in rows:
        print(f"{what:16s} {dt:8.2f} {dt / base_s:11.2f}x {code:>5d}")


if __name__ == "__main__":
    main()
