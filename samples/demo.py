"""`make demo`: the design card's commands on the bundled samples, through the real command line.

inspect the tiny bf16 Llama -> plan its quantization -> `fp8conv quantize samples/llama-tiny-bf16`
(writes samples/llama-tiny-bf16-fp8/ beside it) -> `fp8conv verify` inside that folder -> dequantize
it back; then dequantize the DeepSeek-layout FP8 sample (sharded, ragged tiles, experts) and verify
that. Outputs from an earlier demo are removed first.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S = "samples"
OUTPUTS = [f"{S}/llama-tiny-bf16-fp8", f"{S}/llama-tiny-bf16-fp8-bf16", f"{S}/deepseek-tiny-fp8-bf16"]


def fp8conv(*args: str, cwd: str = ".") -> None:
    where = "" if cwd == "." else f"(cd {cwd} && "
    print(f"\n$ {where}fp8conv {shlex.join(args)}{')' if where else ''}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "fp8conv", *args], cwd=ROOT / cwd)
    if rc != 0:
        sys.exit(f"demo failed: fp8conv {args[0]} exited {rc}")


def main() -> None:
    for o in OUTPUTS:
        shutil.rmtree(ROOT / o, ignore_errors=True)
    fp8conv("inspect", f"{S}/llama-tiny-bf16")
    fp8conv("quantize", f"{S}/llama-tiny-bf16", "--dry-run")
    fp8conv("quantize", f"{S}/llama-tiny-bf16")
    fp8conv("verify", "--reference", "../llama-tiny-bf16", cwd=f"{S}/llama-tiny-bf16-fp8")
    fp8conv("dequantize", f"{S}/llama-tiny-bf16-fp8")
    fp8conv("verify", f"{S}/llama-tiny-bf16-fp8-bf16", "--reference", f"{S}/llama-tiny-bf16-fp8")
    fp8conv("dequantize", f"{S}/deepseek-tiny-fp8")
    fp8conv("verify", "--reference", "../deepseek-tiny-fp8", cwd=f"{S}/deepseek-tiny-fp8-bf16")
    print(f"\ndemo ok: outputs in {', '.join(OUTPUTS)}")


if __name__ == "__main__":
    main()
