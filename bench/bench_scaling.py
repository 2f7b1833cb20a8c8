"""How cost grows with the number of tensors, and what the content hash costs. Every figure is from
this run; ratios are against a baseline measured in the same process.

--scaling N [N ...]  a one-shard FP8 checkpoint of N tiny tensors (N/2 weights [1, 16] + their
                     scales, block 128) and a bf16 one of N tiny tensors, then the seconds of: the
                     header read (open_checkpoint, the baseline), inspect, verify --sample 10,
                     dequantize, quantize; each as a multiple of the header read, and the growth
                     factor from one size to the next (linear cost: growth = size ratio).
--hash MB            a FP8 checkpoint of about MB megabytes in 4 shards: dequantize with the content
                     checksum as shipped (CRC-32 per tensor), with sha256 per tensor instead, and
                     with it stubbed out (alternating, median of --repeat); the rerun that confirms
                     every shard by its checksum; sha256 and CRC-32 alone over a buffer.
Usage: python bench/bench_scaling.py [--scaling 10000 100000] [--hash 400] [--dir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fp8conv.checkpoint import output  # noqa: E402
from fp8conv.checkpoint.layout import open_checkpoint  # noqa: E402
from fp8conv.checkpoint.safetensors_io import save_file  # noqa: E402
from fp8conv.convert import (  # noqa: E402
    DequantizeOptions,
    QuantizeOptions,
    dequantize,
    engine,  # noqa: E402
    quantize,
)
from fp8conv.convert.plan import native_fp8_config  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def tiny_fp8(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    q = torch.zeros(1, 16).to(torch.float8_e4m3fn)
    s = torch.ones(1, 1)
    t = {}
    for i in range(n // 2):
        t[f"model.layers.{i}.mlp.down_proj.weight"] = q
        t[f"model.layers.{i}.mlp.down_proj.weight_scale_inv"] = s
    save_file(t, root / "model.safetensors", {"format": "pt"})
    import json

    cfg = {"model_type": "deepseek_v3", "quantization_config": native_fp8_config()}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def tiny_bf16(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    save_file(
        {f"model.layers.{i}.w.weight": x for i in range(n)}, root / "model.safetensors", {"format": "pt"}
    )
    return root


def scaling(sizes: list[int], base: Path) -> None:
    from fp8conv.verify import VerifyOptions, verify_checkpoint
    from fp8conv.verify.inspect import inspect_checkpoint

    rows = []
    for n in sizes:
        d = base / f"n{n}"
        fp8, bf16 = tiny_fp8(d / "fp8", n), tiny_bf16(d / "bf16", n)
        row = {"tensors": n}
        row["header"] = timed(lambda f=fp8: open_checkpoint(f))
        row["inspect"] = timed(lambda f=fp8: inspect_checkpoint(f))
        row["verify"] = timed(lambda f=fp8: verify_checkpoint(f, VerifyOptions(sample=10, device="cpu")))
        row["dequantize"] = timed(
            lambda f=fp8, o=d / "deq": dequantize(f, o, DequantizeOptions(device="cpu"))
        )
        row["quantize"] = timed(lambda f=bf16, o=d / "q": quantize(f, o, QuantizeOptions(device="cpu")))
        rows.append(row)
        shutil.rmtree(d)
        print(f"  measured {n} tensors", file=sys.stderr)
    cols = ["header", "inspect", "verify", "dequantize", "quantize"]
    print("| tensors | " + " | ".join(f"{c} s (x header)" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.2f} ({r[c] / r['header']:.1f}x)" for c in cols]
        print(f"| {r['tensors']:,} | " + " | ".join(cells) + " |")
    for a, b in zip(rows, rows[1:], strict=False):
        g = " | ".join(f"{b[c] / a[c]:.1f}" for c in cols)
        print(f"| growth {a['tensors']:,} -> {b['tensors']:,} (x{b['tensors'] / a['tensors']:.0f}) | {g} |")


def hash_cost(mb: int, base: Path, repeat: int) -> None:
    src = base / "src"
    src.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = max(128, int(mb * 1e6 / 4 / 4096) // 128 * 128)
    for i in range(1, 5):
        q = torch.randint(0, 0x7E, (rows, 4096), generator=g, dtype=torch.int32).to(torch.uint8)
        t = {
            f"model.layers.{i}.mlp.down_proj.weight": q.view(torch.float8_e4m3fn),
            f"model.layers.{i}.mlp.down_proj.weight_scale_inv": torch.rand(rows // 128, 32, generator=g)
            + 0.5,
            f"model.layers.{i}.input_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16),
            # a tensor kept as it is (copy_file_range), hashed from the source range
            f"model.layers.{i}.embed.weight": torch.randn(rows // 4, 4096, generator=g).bfloat16(),
        }
        save_file(t, src / f"model-{i:05d}-of-00004.safetensors", {"format": "pt"})
    import json

    wm = {}
    for p in sorted(src.glob("*.safetensors")):
        from fp8conv.checkpoint.safetensors_io import read_header

        wm.update({k: p.name for k in read_header(p).tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))

    real_hash = engine._ShardWriter._hash

    def no_hash(self, job, data):
        f: Future = Future()
        f.set_result(None)
        return f

    class Sha256:  # the alternative measured: same interface as output.Crc32
        def __init__(self) -> None:
            self.h = hashlib.sha256()

        def update(self, data) -> None:
            self.h.update(data)

        def digest(self) -> bytes:
            return self.h.digest()

    modes = ("crc32", "sha256", "stubbed")
    times: dict[str, list[float]] = {m: [] for m in modes}
    confirm: list[float] = []
    for _ in range(repeat):
        for mode in modes:
            dst = base / f"dst-{mode}"
            engine._ShardWriter._hash = no_hash if mode == "stubbed" else real_hash
            engine.Crc32 = Sha256 if mode == "sha256" else output.Crc32
            try:
                times[mode].append(timed(lambda d=dst: dequantize(src, d, DequantizeOptions(device="cpu"))))
            finally:
                engine._ShardWriter._hash = real_hash
                engine.Crc32 = output.Crc32
            if mode == "crc32":
                s = dequantize(src, dst, DequantizeOptions(device="cpu"))
                assert s.already_complete
                confirm.append(s.stage_seconds["confirm"])
            shutil.rmtree(dst)
    out_size = size * 2  # roughly: FP8 codes double, the bf16 tensors stay
    buf = os.urandom(64 << 20)
    t_sha = timed(lambda: [hashlib.sha256(buf).digest() for _ in range(4)])
    t_crc = timed(lambda: [zlib.crc32(buf) for _ in range(4)])
    st = statistics.median(times["stubbed"])
    print(f"FP8 input {size / 1e6:.0f} MB in 4 shards, dequantize on the CPU, median of {repeat}:")
    print("| what | seconds | ratio |")
    print("|---|---|---|")
    print(f"| dequantize, checksum stubbed out | {st:.2f} | 1.00 |")
    for mode, what in (("crc32", "CRC-32 per tensor (shipped)"), ("sha256", "sha256 per tensor")):
        m = statistics.median(times[mode])
        print(f"| dequantize, {what}, while written | {m:.2f} | {m / st:.2f} |")
    c = statistics.median(confirm)
    print(f"| rerun: confirm every shard (~{out_size / 1e6:.0f} MB read) | {c:.2f} | {c / st:.2f} |")
    print(f"| sha256 alone, one thread | {4 * 64 / 1024 / t_sha:.2f} GiB/s | |")
    print(f"| zlib.crc32 alone, one thread | {4 * 64 / 1024 / t_crc:.2f} GiB/s | |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scaling", type=int, nargs="*", default=[])
    ap.add_argument("--hash", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    base = Path(a.dir or tempfile.mkdtemp(prefix="fp8conv-bench-"))
    try:
        if a.hash:
            hash_cost(a.hash, base / "hash", a.repeat)
        if a.scaling:
            scaling(a.scaling, base / "scaling")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
