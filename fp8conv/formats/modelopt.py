"""NVIDIA ModelOpt FP8 exports: `quant_method: modelopt`, `quant_algo: FP8` in config.json and/or
`hf_quant_config.json` (ModelOpt <= 0.29 writes only that file; vLLM's and SGLang's modelopt loaders read
it when config.json has no quantization_config: vLLM `model_executor/layers/quantization/modelopt.py`).

Tensors (FORMATS.md): `X.weight` e4m3 + scalar fp32 `X.weight_scale` (one per tensor; stacked experts one
per expert), `X.input_scale`, and kv-cache scales `k_proj.k_scale` / `v_proj.v_scale` (or on the
attention module). Only FP8 weights are read here: NVFP4 and the other algorithms are refused.
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.base import (
    ACTIVATION_KINDS,
    Detection,
    Layout,
    add_activation_artifacts,
    add_fp8,
    is_fp8,
)
from fp8conv.formats.scheme import Granularity
from fp8conv.formats.settings import HF_QUANT_CONFIG, Settings

QUANT_METHOD = "modelopt"
QUANT_ALGOS = ("FP8",)
KV_ALGOS = (None, "FP8")


def _algo(settings: Settings) -> tuple[dict, str]:
    """ModelOpt's settings (the `quantization` object of hf_quant_config.json, or config.json's own) and
    the place they came from."""
    qc = settings.config
    if qc is not None and qc.get("quant_method") == QUANT_METHOD:
        inner = qc.get("quantization")
        return (inner if isinstance(inner, dict) else qc), "config.json"
    hq = settings.hf_quant or {}
    inner = hq.get("quantization")
    return (inner if isinstance(inner, dict) else hq), HF_QUANT_CONFIG


class ModelOpt(Layout):
    name = "modelopt"
    title = "NVIDIA ModelOpt FP8 (config.json and/or hf_quant_config.json)"

    def claims(self, settings: Settings) -> bool:
        if settings.config is not None:
            return settings.config.get("quant_method") == QUANT_METHOD
        return settings.hf_quant is not None

    def check_settings(self, settings: Settings, ckpt: Checkpoint) -> None:
        algo, where = _algo(settings)
        qa, kv = algo.get("quant_algo"), algo.get("kv_cache_quant_algo")
        if qa not in QUANT_ALGOS:
            raise InvalidCheckpoint(
                f"ModelOpt quant_algo {qa!r} is not supported (fp8conv reads {', '.join(QUANT_ALGOS)})",
                file=ckpt.root / where,
            )
        if kv not in KV_ALGOS:
            raise InvalidCheckpoint(
                f"ModelOpt kv_cache_quant_algo {kv!r} is not supported (fp8conv reads FP8 or none)",
                file=ckpt.root / where,
            )

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        allowed = (Granularity.TENSOR, Granularity.EXPERT)
        for name in ckpt.weight_map:
            if is_fp8(ckpt.info(name)):
                add_fp8(found, ckpt, name, [name + "_scale"], allowed, None)
        add_activation_artifacts(found, ckpt, ACTIVATION_KINDS)
