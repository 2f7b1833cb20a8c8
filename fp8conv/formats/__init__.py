"""Checkpoint layout families: every piece of knowledge about how a quantized checkpoint is laid out.

convert, verify and inspect read layouts only through this package (see README.md here):

    detect(ckpt) -> Detection        family, settings, quantized weights (scale + ScaleLayout), artifacts,
                                     config keys and side files it owns; refuses what it cannot explain
    dequantized_leftovers(...)       what a dequantized output must not contain, as findings
    strip_config / strip_params      config.json / params.json of a dequantized output
    writer(fmt)                      the layout `fp8conv quantize --format fmt` writes
"""

from __future__ import annotations

from fp8conv.formats.base import Artifact, ArtifactKind, Detection, Layout, QuantizedWeight
from fp8conv.formats.leftovers import Leftover, dequantized_leftovers
from fp8conv.formats.registry import FAMILIES, PLAIN, detect, family, known
from fp8conv.formats.scheme import Element, Granularity, ScaleEncoding, ScaleLayout, WeightScheme
from fp8conv.formats.settings import (
    HF_QUANT_CONFIG,
    PARAMS_JSON,
    Settings,
    config_locations,
    find_quantization_config,
    read_settings,
    strip_config,
    strip_params,
)
from fp8conv.formats.writers import Writer, writer

__all__ = [
    "FAMILIES",
    "HF_QUANT_CONFIG",
    "PARAMS_JSON",
    "PLAIN",
    "Artifact",
    "ArtifactKind",
    "Detection",
    "Element",
    "Granularity",
    "Layout",
    "Leftover",
    "QuantizedWeight",
    "ScaleEncoding",
    "ScaleLayout",
    "Settings",
    "WeightScheme",
    "Writer",
    "config_locations",
    "dequantized_leftovers",
    "detect",
    "family",
    "find_quantization_config",
    "known",
    "read_settings",
    "strip_config",
    "strip_params",
    "writer",
]
