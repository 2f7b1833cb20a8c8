"""Start-up of the `fp8conv` command: seconds from exec to exit, each in a fresh process.

Times `fp8conv --help`, `-h`, `--version` and `quantize --help` (which must answer without importing
torch) beside, in the same run, a bare `python -c pass` and `python -c "import torch"`: the
interpreter's own start and what a command pays once it converts. Median of --repeat runs; one table.
Usage: python bench/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = [
    ("python -c pass", ["-c", "pass"]),
    ("fp8conv --version", ["-m", "fp8conv", "--version"]),
    ("fp8conv -h", ["-m", "fp8conv", "-h"]),
    ("fp8conv --help", ["-m", "fp8conv", "--help"]),
    ("fp8conv quantize --help", ["-m", "fp8conv", "quantize", "--help"]),
    ("python -c 'import torch'", ["-c", "import torch"]),
]


def once(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    rows = []
    for label, args in CASES:
        once(args)  # warm the page cache and .pyc files
        times = [once(args) for _ in range(a.repeat)]
        rows.append((label, statistics.median(times), min(times), max(times)))
    base = rows[0][1]
    print(f"start-up, median of {a.repeat} fresh processes ({os.cpu_count()} CPUs, {sys.version.split()[0]})")
    print(f"{'command':<26} {'median s':>9} {'min s':>7} {'max s':>7} {'over python':>12}")
    for label, med, lo, hi in rows:
        print(f"{label:<26} {med:9.3f} {lo:7.3f} {hi:7.3f} {med - base:12.3f}")


if __name__ == "__main__":
    main()
