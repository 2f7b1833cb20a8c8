"""Mistral's native format: `params.json` with a `quantization` object (`qformat_weight`, ...), read by
vLLM's `--config-format mistral` / `--load-format mistral` (`transformers_utils/config.py`); its tensors
`consolidated.safetensors` carry `qscale_weight` / `qscale_act` (vllm#39293). Releases ship it beside HF
shards whose config.json says `quant_method: fp8` (handled by the fp8 family); this module owns only the
params.json setting, which a dequantized output loses with the rest."""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.base import Detection, Layout
from fp8conv.formats.settings import PARAMS_JSON, Settings


class MistralNative(Layout):
    name = "mistral"
    title = "Mistral native params.json quantization (beside HF FP8 shards)"
    rewrite_params = True

    def claims(self, settings: Settings) -> bool:
        return settings.config is None and settings.hf_quant is None and settings.params_quant is not None

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        raise InvalidCheckpoint(
            f"{PARAMS_JSON} has a `quantization` setting, but config.json has no quantization_config: the "
            "native consolidated.safetensors tensors are not read by fp8conv",
            file=ckpt.root / PARAMS_JSON,
            hint="convert the HF shards of the release (model-*.safetensors with config.json)",
        )
