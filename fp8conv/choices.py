"""The choices of the conversion options, spelled once: the CLI's and the API's `Literal` types (through
convert/options.py) and the layouts' writers (formats/writers.py) read them here. Imports nothing, so
the CLI answers `--help` without torch."""

from __future__ import annotations

from typing import Literal, get_args

OutDtype = Literal["bf16", "fp16", "fp32"]
QuantFormat = Literal["fp8", "compressed-tensors"]
ScaleFmt = Literal["float", "ue8m0"]
Scheme = Literal["fp8-block", "fp8-channel", "mxfp8"]
Target = Literal["any", "transformers", "vllm", "sglang"]

OUT_DTYPE_CHOICES: tuple[str, ...] = get_args(OutDtype)
FORMAT_CHOICES: tuple[str, ...] = get_args(QuantFormat)
SCALE_FMT_CHOICES: tuple[str, ...] = get_args(ScaleFmt)
SCHEMES: tuple[str, ...] = get_args(Scheme)
TARGETS: tuple[str, ...] = get_args(Target)
