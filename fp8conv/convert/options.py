"""Options for the conversion commands: frozen, validated once, built by the CLI or by callers."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from fp8conv.errors import UsageError

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


@dataclass(frozen=True)
class DequantizeOptions:
    dtype: str = "bf16"
    device: str = "auto"
    overwrite: bool = False
    part: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in OUT_DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, not {self.dtype!r}")
        object.__setattr__(self, "part", parse_part(self.part))

    @property
    def torch_dtype(self) -> torch.dtype:
        return OUT_DTYPES[self.dtype]

    @property
    def dtype_name(self) -> str:
        return DTYPE_CONFIG_NAMES[self.dtype]

    def job_key(self) -> dict:
        """What makes two runs the same job (device and part don't change the bytes)."""
        return {"command": "dequantize", "dtype": self.dtype}


SCHEMES = ("fp8-block", "fp8-channel", "mxfp8")
TARGETS = ("any", "transformers", "vllm", "sglang")


@dataclass(frozen=True)
class QuantizeOptions:
    format: str = "fp8"
    scheme: str = "fp8-block"
    target: str = "any"  # the loader the output must load and run in; any: no loader's restrictions
    like: str | None = None  # --like REF: scheme, layout, block, scale format and FP8 set of REF
    block_size: tuple[int, int] = (128, 128)
    scale_fmt: str = "float"
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    dry_run: bool = False
    device: str = "auto"
    overwrite: bool = False
    part: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.format not in ("fp8", "compressed-tensors"):
            raise UsageError(f"--format must be fp8 or compressed-tensors, not {self.format!r}")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise UsageError(f"--scale-fmt must be float or ue8m0, not {self.scale_fmt!r}")
        if self.scheme not in SCHEMES:
            raise UsageError(f"--scheme must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, not {self.target!r}")
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
        from fp8conv.formats.writers import writer

        writer(self.format, self.scheme)  # refuses a pair no loader reads, with the reason
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "only", tuple(self.only))
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
