"""The layouts `fp8conv quantize` writes: the scale's name and the quantization_config, by --format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fp8conv.formats import compressed_tensors, fp8_block


@dataclass(frozen=True)
class Writer:
    format: str  # the --format value
    scale_suffix: str  # X.weight -> X.weight + scale_suffix
    config: Callable[[tuple[int, int], list[str], str], dict]  # (block, skipped modules, scale_fmt) -> qc

    def scale_name(self, weight: str) -> str:
        return weight + self.scale_suffix


WRITERS = {
    "fp8": Writer("fp8", fp8_block.SCALE_SUFFIX, fp8_block.fp8_config),
    "compressed-tensors": Writer(
        "compressed-tensors",
        compressed_tensors.SCALE_SUFFIX,
        lambda block, skipped, scale_fmt: compressed_tensors.ct_block_config(block, skipped),
    ),
}


def writer(fmt: str) -> Writer:
    return WRITERS[fmt]
