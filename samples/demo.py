"""`make demo`: the main jobs on the bundled samples, through the real command line.

quantize the tiny bf16 Llama -> verify it against its source -> dequantize it back -> verify that;
then dequantize the DeepSeek-layout FP8 sample (sharded, ragged tiles, experts) and verify it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
S = "samples"


def fp8conv(*args: str) -> None:
    cmd = [sys.executable, "-m", "fp8conv.cli", *args]
    print(f"\n$ fp8conv {shlex.join(args)}", flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        sys.exit(f"demo failed: fp8conv {args[0]} exited {rc}")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    o = "demo-out"
    fp8conv("inspect", f"{S}/llama-tiny-bf16")
    fp8conv("quantize", f"{S}/llama-tiny-bf16", f"{o}/llama-fp8", "--dry-run")
    fp8conv("quantize", f"{S}/llama-tiny-bf16", f"{o}/llama-fp8")
    fp8conv("verify", f"{o}/llama-fp8", "--reference", f"{S}/llama-tiny-bf16")
    fp8conv("dequantize", f"{o}/llama-fp8", f"{o}/llama-bf16")
    fp8conv("verify", f"{o}/llama-bf16", "--reference", f"{o}/llama-fp8")
    fp8conv("dequantize", f"{S}/deepseek-tiny-fp8", f"{o}/deepseek-bf16")
    fp8conv("verify", f"{o}/deepseek-bf16", "--reference", f"{S}/deepseek-tiny-fp8")
    print(f"\ndemo ok: outputs in {OUT}")


if __name__ == "__main__":
    main()
