"""What `fp8conv quantize --scheme S --format F` writes: the scale's name and dtype, the tile each scale
covers, how an MX exponent is chosen, and the quantization_config its loaders expect.

Which loader reads which combination (the reasons behind REFUSED):

| scheme      | --format fp8 (quant_method fp8)                 | --format compressed-tensors              |
|-------------|-------------------------------------------------|------------------------------------------|
| fp8-block   | transformers FP8, vLLM / SGLang Fp8Config        | FP8_BLOCK: compressed-tensors, vLLM      |
| fp8-channel | refused: no loader reads per-row scales there    | FP8_DYNAMIC: compressed-tensors, vLLM    |
| mxfp8       | transformers' MXFP8 bytes (`[1, 32]`, ue8m0)     | MXFP8 (mxfp8-quantized): compressed-     |
|             |                                                 | tensors, vLLM                            |

- transformers `integrations/finegrained_fp8.py` FP8Linear: `weight_block_size` null means one scalar
  `weight_scale_inv`, otherwise a `[ceil(M/bm), ceil(N/bn)]` grid; uint8 scales are e8m0 bytes.
- vLLM / SGLang `Fp8Config`: block scales with `weight_block_size`, else per-tensor `weight_scale`.
- compressed-tensors `quantization/quant_scheme.py` presets FP8_DYNAMIC, FP8_BLOCK, MXFP8: the configs
  below are those presets as compressed-tensors serialises them (tests compare field by field).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fp8conv.choices import FORMAT_CHOICES as FORMATS
from fp8conv.choices import SCHEMES
from fp8conv.errors import UsageError
from fp8conv.formats import compressed_tensors, fp8_block
from fp8conv.formats.scheme import MX_GROUP, Granularity

# The --scheme a stored e4m3 weight's scale granularity is (what `convert` and `--like` read back).
SCHEME_OF_GRANULARITY = {
    Granularity.BLOCK: "fp8-block",
    Granularity.CHANNEL: "fp8-channel",
    Granularity.GROUP: "mxfp8",
}
# Each --format and --scheme in an output folder's default name (`ckpt-fp8`, `ckpt-mxfp8-ct`).
FORMAT_TAGS = {"fp8": "fp8", "compressed-tensors": "ct"}
SCHEME_TAGS = {"fp8-block": "fp8", "fp8-channel": "fp8-channel", "mxfp8": "mxfp8"}
# compressed-tensors' FP8_BLOCK preset quantizes activations per 1 x 128 group (dynamic).
CT_BLOCK_ACT_GROUP = 128

REFUSED = {
    ("fp8-channel", "fp8"): (
        "quant_method fp8 has no per-channel form: transformers' FP8 loader reads a block grid or one scale "
        "per tensor (weight_block_size null), vLLM's and SGLang's Fp8Config the same; per-channel FP8 is "
        "compressed-tensors' FP8_DYNAMIC: use --format compressed-tensors"
    ),
}


@dataclass(frozen=True)
class Writer:
    scheme: str  # the --scheme value
    format: str  # the --format value
    scale_suffix: str  # X.weight -> X.weight + scale_suffix
    scale_dtype: str  # safetensors dtype of the scale: F32 (multipliers) or U8 (e8m0 exponent bytes)
    mx_rule: str | None  # MXFP8 only: "ceil" or "ct" (fp8conv.kernels.reference.mx_exponents)
    act_group: int | None  # the loader quantizes activations per 1 x act_group: K must be a multiple
    config: Callable[[tuple[int, int], list[str], str], dict]  # (block, skipped modules, scale_fmt) -> qc

    def scale_name(self, weight: str) -> str:
        return weight + self.scale_suffix

    def tile(self, shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
        """The rows x columns one scale covers for a weight [..., M, N]."""
        if self.scheme == "fp8-channel":
            return 1, shape[-1]
        if self.scheme == "mxfp8":
            return 1, MX_GROUP
        return block

    def unfit(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight [..., M, N] cannot be stored in this scheme at all (MXFP8 needs K a multiple of
        its 32-wide groups), or None: quantize and convert leave such a weight bf16."""
        if self.scheme == "mxfp8" and shape[-1] % MX_GROUP:
            return f"K = {shape[-1]} is not a multiple of {MX_GROUP} (MXFP8 groups)"
        return None

    def scale_shape(self, shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
        bm, bn = self.tile(shape, block)
        *lead, m, n = shape
        return (*lead, math.ceil(m / bm), math.ceil(n / bn))

    def fixed_tile(self) -> bool:
        """The scheme fixes its tile (--block-size does not apply)."""
        return self.scheme != "fp8-block"

    @property
    def dst_suffix(self) -> str:
        """The scheme and layout in a default output folder name: `fp8`, `fp8-channel-ct`, `mxfp8`, ..."""
        tag = SCHEME_TAGS[self.scheme]
        return tag if self.format == "fp8" else f"{tag}-{FORMAT_TAGS[self.format]}"


def _ct_config(fmt: str, weights: dict, inputs: dict, ignore: list[str]) -> dict:
    """compressed-tensors' QuantizationConfig with one group on Linear, as its model_dump writes it."""
    return {
        "quant_method": compressed_tensors.QUANT_METHOD,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def _float8(strategy: str, dynamic: bool, **extra) -> dict:
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": dynamic,
        **extra,
    }


def ct_channel_config(block: tuple[int, int], ignore: list[str], scale_fmt: str) -> dict:
    """FP8_DYNAMIC: per-channel weights, per-token dynamic activations."""
    return _ct_config(
        "float-quantized",
        _float8("channel", False, group_size=None),
        _float8("token", True, group_size=None),
        ignore,
    )


def ct_mxfp8_config(block: tuple[int, int], ignore: list[str], scale_fmt: str) -> dict:
    """MXFP8: 1 x 32 weight groups with uint8 (e8m0) scales, activations the same, dynamic."""
    group = {"group_size": MX_GROUP, "scale_dtype": "torch.uint8"}
    return _ct_config(
        "mxfp8-quantized", _float8("group", False, **group), _float8("group", True, **group), ignore
    )


def fp8_mxfp8_config(block: tuple[int, int], skipped: list[str], scale_fmt: str) -> dict:
    """transformers' MXFP8 bytes: the fp8 method with a [1, 32] block and ue8m0 scales."""
    return fp8_block.fp8_config((1, MX_GROUP), skipped, "ue8m0")


WRITERS = {
    ("fp8-block", "fp8"): Writer(
        "fp8-block", "fp8", fp8_block.SCALE_SUFFIX, "F32", None, None, fp8_block.fp8_config
    ),
    ("fp8-block", "compressed-tensors"): Writer(
        "fp8-block",
        "compressed-tensors",
        compressed_tensors.SCALE_SUFFIX,
        "F32",
        None,
        CT_BLOCK_ACT_GROUP,
        lambda block, skipped, scale_fmt: compressed_tensors.ct_block_config(block, skipped),
    ),
    ("fp8-channel", "compressed-tensors"): Writer(
        "fp8-channel",
        "compressed-tensors",
        compressed_tensors.SCALE_SUFFIX,
        "F32",
        None,
        None,
        ct_channel_config,
    ),
    ("mxfp8", "fp8"): Writer(
        "mxfp8", "fp8", fp8_block.SCALE_SUFFIX, "U8", "ceil", MX_GROUP, fp8_mxfp8_config
    ),
    ("mxfp8", "compressed-tensors"): Writer(
        "mxfp8", "compressed-tensors", compressed_tensors.SCALE_SUFFIX, "U8", "ct", MX_GROUP, ct_mxfp8_config
    ),
}


def format_of(family: str) -> str:
    """The --format a detected family is written back in: compressed-tensors' own layout, else fp8."""
    return "compressed-tensors" if family == compressed_tensors.QUANT_METHOD else "fp8"


def writer(fmt: str, scheme: str = "fp8-block") -> Writer:
    """The writer of a --format / --scheme pair; a pair no loader reads is a UsageError with the reason."""
    if scheme not in SCHEMES:
        raise UsageError(f"--scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if (scheme, fmt) in REFUSED:
        raise UsageError(f"--scheme {scheme} --format {fmt}: {REFUSED[scheme, fmt]}")
    return WRITERS[scheme, fmt]
