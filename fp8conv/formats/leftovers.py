"""What a dequantized output must not contain: the check verify runs over names, dtypes, config and side
files (nothing is read but headers and small JSON files)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fp8conv.formats.base import SCALE_LIKE
from fp8conv.formats.scheme import ELEMENTS, PACKED_DTYPES
from fp8conv.formats.settings import HF_QUANT_CONFIG, PARAMS_JSON, config_locations


@dataclass(frozen=True)
class Leftover:
    """One piece of quantization left in a dequantized checkpoint.

    kind: "fp8_tensor" | "packed_tensor" | "scale_tensor" | "config_key" | "side_file" | "params_key";
    where: the file ("config.json", a shard name, ...); name: the tensor, key or file."""

    kind: str
    where: str
    name: str
    rule: str


def dequantized_leftovers(
    tensors: Mapping[str, tuple[str, str]],
    config: dict | None,
    files: list[str] | tuple[str, ...],
    params: dict | None = None,
) -> list[Leftover]:
    """Every leftover in an output. tensors: name -> (safetensors dtype, shard file); files: the other
    files of the folder (relative paths); params: params.json parsed, if there is one."""
    out: list[Leftover] = []
    for name, (dtype, shard) in sorted(tensors.items()):
        if dtype in ELEMENTS:
            out.append(Leftover("fp8_tensor", shard, name, f"{dtype} tensor left in a dequantized output"))
        elif dtype == "F8_E8M0":
            out.append(Leftover("scale_tensor", shard, name, "e8m0 exponents (a scale) left"))
        elif SCALE_LIKE.search(name):
            kind = "packed_tensor" if name.endswith("_blocks") and dtype in PACKED_DTYPES else "scale_tensor"
            out.append(Leftover(kind, shard, name, "scale or packed codes left"))
        elif name.endswith(".scale") and name[: -len(".scale")] + ".weight" in tensors:
            out.append(Leftover("scale_tensor", shard, name, "`.scale` of a weight left"))
    for key in config_locations(config):
        out.append(Leftover("config_key", "config.json", key, "quantization setting left in config.json"))
    if HF_QUANT_CONFIG in files:
        out.append(Leftover("side_file", HF_QUANT_CONFIG, HF_QUANT_CONFIG, "ModelOpt settings file left"))
    if isinstance(params, dict) and "quantization" in params:
        out.append(Leftover("params_key", PARAMS_JSON, "quantization", "quantization setting left"))
    return out
