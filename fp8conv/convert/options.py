"""Options for the conversion commands: frozen, validated once, built by the CLI or by callers.

Choices are `Literal` types (fp8conv/choices.py), so type checkers flag a typo and the CLI shows and
validates the same choices. This module does not import torch (the CLI imports it to build its options
and answers `--help` without torch); the torch dtype is looked up when a conversion asks for it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fp8conv.choices import (  # noqa: F401  (the option types, re-exported for the CLI and callers)
    FORMAT_CHOICES,
    OUT_DTYPE_CHOICES,
    SCALE_FMT_CHOICES,
    SCHEMES,
    TARGETS,
    OutDtype,
    QuantFormat,
    ScaleFmt,
    Scheme,
    Target,
)
from fp8conv.errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPE_CONFIG_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_part(part: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'I/N' (1-based) -> (I, N)."""
    if part is None or isinstance(part, tuple):
        if part is not None and not (1 <= part[0] <= part[1]):
            raise UsageError(f"--part {part[0]}/{part[1]}: need 1 <= I <= N")
        return part
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise UsageError(f"--part must be I/N with 1 <= I <= N, not {part!r}")
    return int(m.group(1)), int(m.group(2))


def parse_block(block: str | int | tuple[int, int]) -> tuple[int, int]:
    """'128', 128, '128x64' or (128, 64) -> (rows, columns) of one scale tile."""
    if isinstance(block, tuple):
        bm, bn = block
    elif isinstance(block, int):
        bm = bn = block
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", block)
        if not m:
            raise UsageError(f"--block-size must be N or MxN, not {block!r}")
        bm = int(m.group(1))
        bn = int(m.group(2) or m.group(1))
    if bm < 1 or bn < 1 or bm > 65536 or bn > 65536:
        raise UsageError(f"--block-size {bm}x{bn} is out of range")
    return bm, bn


def _choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class DequantizeOptions:
    """How to dequantize: output dtype, device, and how to treat an existing DST.

    dtype: "bf16" | "fp16" | "fp32". device: "auto" | "cpu" | "cuda" | "cuda:N".
    overwrite: replace what DST holds. part: convert share I of N of the shards, (I, N) or "I/N".
    dry_run: plan only; `fp8conv.dequantize` then returns the plan and writes nothing.
    """

    dtype: OutDtype = "bf16"
    device: str = "auto"
    overwrite: bool = False
    part: tuple[int, int] | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        _choice("--dtype", self.dtype, OUT_DTYPE_CHOICES)
        object.__setattr__(self, "part", parse_part(self.part))

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    @property
    def dtype_name(self) -> str:
        return DTYPE_CONFIG_NAMES[self.dtype]

    def job_key(self) -> dict:
        """What makes two runs the same job (device and part don't change the bytes)."""
        return {"command": "dequantize", "dtype": self.dtype}


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize to FP8 (e4m3 codes with per-tile, per-row or 1 x 32 group scales).

    format: "fp8" (DeepSeek-V3 / transformers layout, `weight_scale_inv`) | "compressed-tensors"
    (`weight_scale`). scheme: "fp8-block" | "fp8-channel" | "mxfp8". target: the loader the output
    must load and run in ("any": no loader's restrictions). like: an FP8 checkpoint whose scheme,
    layout, block, scale format and FP8 tensor set to reproduce. block_size: tile shape, 128, "128",
    "128x128" or (128, 128). scale_fmt: "float" | "ue8m0" (power-of-two scales). skip / only: globs
    on tensor names or `re:` regular expressions. dry_run: plan only; `fp8conv.quantize` then returns
    the plan and writes nothing. device, overwrite, part: as for DequantizeOptions.
    """

    format: QuantFormat = "fp8"
    scheme: Scheme = "fp8-block"
    target: Target = "any"
    like: str | None = None
    block_size: tuple[int, int] = (128, 128)
    scale_fmt: ScaleFmt = "float"
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    dry_run: bool = False
    device: str = "auto"
    overwrite: bool = False
    part: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _choice("--format", self.format, FORMAT_CHOICES)
        _choice("--scale-fmt", self.scale_fmt, SCALE_FMT_CHOICES)
        _choice("--scheme", self.scheme, SCHEMES)
        _choice("--target", self.target, TARGETS)
        object.__setattr__(self, "block_size", parse_block(self.block_size))
        if self.scheme != "fp8-block" and self.block_size != (128, 128):
            raise UsageError(
                f"--block-size applies to --scheme fp8-block; {self.scheme} fixes its tile "
                "(fp8-channel: one scale per row, mxfp8: 1 x 32 groups)"
            )
        if self.scheme == "fp8-channel" and self.scale_fmt == "ue8m0":
            raise UsageError(
                "--scale-fmt ue8m0 applies to fp8-block (mxfp8 scales are always e8m0): compressed-tensors' "
                "FP8_DYNAMIC has float per-channel scales"
            )
        for field_name in ("skip", "only"):
            value = getattr(self, field_name)
            object.__setattr__(self, field_name, (value,) if isinstance(value, str) else tuple(value))
        for p in self.skip + self.only:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise UsageError(f"bad regular expression {p!r}: {e}") from None
        object.__setattr__(self, "part", parse_part(self.part))

    def job_key(self) -> dict:
        d = asdict(self)
        for k in ("dry_run", "device", "overwrite", "part"):
            d.pop(k)
        d["block_size"] = list(self.block_size)
        d["skip"], d["only"] = list(self.skip), list(self.only)
        return {"command": "quantize", **d}
