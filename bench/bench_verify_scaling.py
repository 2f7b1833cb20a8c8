"""How inspect and verify grow with the number of tensors: a table, not a timed test.

Builds FP8 checkpoints of 10^4, 10^5 and 10^6 tiny tensors (half FP8 weights [1, 16], half their
float32 scales [1, 1]; shards of at most 200,000 tensors behind an index, so a header stays under the
100 MB limit), then times, each in a fresh process: `fp8conv inspect` and `fp8conv verify --sample 10`
(structure over every tensor, data checks on 10 weights and non-finite checks on every scale), and
prints seconds, peak RSS and the growth factor per 10x more tensors (1.0x per 10x would be constant
time; 10x is linear; a list membership test makes it ~100x).
Usage: python bench/bench_verify_scaling.py [--sizes 10000,100000,1000000] [--dir bench-scaling] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARD_TENSORS = 200_000
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"],
    },
}


def _shard(path: Path, names: list[str]) -> None:
    """One shard of weights [1, 16] (FP8 codes 0x38 = 1.0) and scales [1, 1] (float32 1.0), written
    directly: header, then the data (safetensors' layout, see fp8conv/checkpoint/safetensors_io.py)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for n in names:
        header[n] = {"dtype": "F8_E4M3", "shape": [1, 16], "data_offsets": [off, off + 16]}
        off += 16
        header[n + "_scale_inv"] = {"dtype": "F32", "shape": [1, 1], "data_offsets": [off, off + 4]}
        off += 4
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    record = b"\x38" * 16 + struct.pack("<f", 1.0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.write(record * len(names))


def build(root: Path, tensors: int) -> None:
    root.mkdir(parents=True)
    weights = [f"model.layers.{i}.mlp.proj.weight" for i in range(tensors // 2)]
    per = SHARD_TENSORS // 2
    chunks = [weights[i : i + per] for i in range(0, len(weights), per)]
    wm = {}
    for k, chunk in enumerate(chunks, 1):
        name = f"model-{k:05d}-of-{len(chunks):05d}.safetensors"
        _shard(root / name, chunk)
        for n in chunk:
            wm[n] = name
            wm[n + "_scale_inv"] = name
    index = {"metadata": {"total_size": 20 * len(weights)}, "weight_map": wm}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps(CONFIG))


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of a fresh process (GNU time's %M)."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t
    rss = int(r.stderr.strip().splitlines()[-1]) / 1024
    return dt, rss, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dir", default="bench-scaling")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(args.dir).resolve()
    py = [sys.executable, "-m", "fp8conv.cli"]
    runs = {
        "inspect": lambda p: [*py, "inspect", str(p), "--json", str(p.parent / "inspect.json")],
        "verify --sample 10": lambda p: [*py, "verify", str(p), "--sample", "10", "--device", "cpu", "-q"],
    }
    rows = []
    try:
        for n in sizes:
            root = base / f"t{n}"
            if not root.exists():
                t = time.perf_counter()
                build(root, n)
                print(f"built {n:,} tensors in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            for what, cmd in runs.items():
                dt, rss, code = timed(cmd(root))
                rows.append((what, n, dt, rss, code))
                print(f"{what:20s} {n:>9,} {dt:8.2f}s {rss:8.0f} MB exit {code}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(
        f"\n{'command':20s} {'tensors':>10s} {'seconds':>9s} {'peak MB':>9s} {'exit':>5s} {'x per 10x':>10s}"
    )
    prev: dict[str, float] = {}
    for what, n, dt, rss, code in rows:
        growth = f"{dt / prev[what]:.1f}x" if what in prev else ""
        prev[what] = dt
        print(f"{what:20s} {n:>10,} {dt:9.2f} {rss:9.0f} {code:>5d} {growth:>10s}")


if __name__ == "__main__":
    main()
