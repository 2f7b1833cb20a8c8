"""Mistral's native format: `consolidated.safetensors` with `params.json`, whose `quantization` object
(`qformat_weight`, ...) holds the settings; vLLM reads it with `--config-format mistral --load-format
mistral`. FP8 releases (Ministral-3, Devstral-2, Mistral-Large-3) ship it beside HF shards whose config.json
says `quant_method: fp8` (the fp8 family reads those and calls `add_native_mistral` for the native
tensors); a folder may also hold the native files alone.

Tensors (vLLM `model_executor/models/llama.py` `LlamaForCausalLM.mistral_mapping`: `qscale_weight` ->
`weight_scale`, `qscale_act` -> `input_scale`, `{kv,q,k,v}_fake_quantizer.qscale_act` -> kv-cache and
query scales): `X.weight` e4m3 + `X.qscale_weight`, one scale per tensor ([] or [1]) or per output row
([out], which vLLM permutes with the rows of wq / wk); the same values as the HF shards'
`weight_scale_inv` / `activation_scale` (vllm#39293). The dequantized output keeps the native names and
drops `quantization` from params.json, so vLLM's Mistral format reads a bf16 model.
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.formats.base import (
    ACTIVATION_KINDS,
    Detection,
    Layout,
    add_activation_artifacts,
    add_fp8,
    is_fp8,
)
from fp8conv.formats.scheme import Granularity
from fp8conv.formats.settings import Settings

SCALE = "qscale_weight"


def add_native_mistral(found: Detection, ckpt: Checkpoint, name: str) -> bool:
    """Record a native FP8 weight `X.weight` with its `X.qscale_weight` (per tensor or per row)."""
    if not name.endswith(".weight"):
        return False
    sname = name[: -len("weight")] + SCALE
    return add_fp8(found, ckpt, name, [sname], (Granularity.TENSOR, Granularity.CHANNEL), None)


class MistralNative(Layout):
    name = "mistral"
    title = "Mistral native (consolidated.safetensors + params.json quantization: qscale_weight / qscale_act)"

    def claims(self, settings: Settings) -> bool:
        return settings.config is None and settings.hf_quant is None and settings.params_quant is not None

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        for name in ckpt.weight_map:
            if is_fp8(ckpt.info(name)):
                add_native_mistral(found, ckpt, name)
        add_activation_artifacts(found, ckpt, ACTIVATION_KINDS)
