"""Where quantization settings live: the four places a loader reads them.

1. config.json `quantization_config` (also nested under `text_config`, as multimodal configs do);
2. config.json `compression_config`, compressed-tensors' old key (vLLM and SGLang read it when
   `quantization_config` is absent);
3. `hf_quant_config.json`, written by NVIDIA ModelOpt (<= 0.29 writes only this file; vLLM and SGLang read
   it when config.json has no quantization_config);
4. params.json `quantization`, Mistral's native format (vLLM's `--config-format mistral`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.checkpoint.layout import Checkpoint, load_json
from fp8conv.errors import InvalidCheckpoint

HF_QUANT_CONFIG = "hf_quant_config.json"
PARAMS_JSON = "params.json"
CONFIG_KEYS = ("quantization_config", "compression_config")


def find_quantization_config(config: dict | None) -> dict | None:
    """config.json's quantization settings: `quantization_config`, else the one under `text_config`,
    else the old `compression_config` key."""
    if not config:
        return None
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            for key in CONFIG_KEYS:
                if isinstance(holder.get(key), dict):
                    return holder[key]
    return None


def config_locations(config: dict | None) -> list[str]:
    """Dotted paths of every quantization setting in config.json (`text_config.quantization_config`)."""
    out: list[str] = []
    if not isinstance(config, dict):
        return out
    for prefix, holder in (("", config), ("text_config.", config.get("text_config"))):
        if isinstance(holder, dict):
            out += [prefix + key for key in CONFIG_KEYS if key in holder]
    return out


@dataclass(frozen=True)
class Settings:
    """Every quantization setting of a checkpoint, from all four places, with where each came from."""

    config: dict | None  # config.json's settings (find_quantization_config)
    config_keys: tuple[str, ...]  # where they are in config.json
    hf_quant: dict | None  # hf_quant_config.json, parsed
    params: dict | None  # params.json, parsed (its `quantization` is params_quant)
    params_quant: dict | None
    files: tuple[str, ...] = field(default=())  # the side files among them that exist

    @property
    def quantized(self) -> bool:
        return bool(self.config_keys or self.hf_quant is not None or self.params_quant is not None)

    def where(self) -> str:
        """The first place that holds a setting, for messages."""
        if self.config_keys:
            return f"config.json {self.config_keys[0]}"
        if self.hf_quant is not None:
            return HF_QUANT_CONFIG
        return f"{PARAMS_JSON} quantization"


def _side_json(ckpt: Checkpoint, rel: str) -> dict | None:
    if rel not in ckpt.other_files:
        return None
    path = Path(ckpt.root) / rel
    data = load_json(path, rel)
    if not isinstance(data, dict):
        raise InvalidCheckpoint(f"{rel} is not a JSON object", file=path)
    return data


def read_settings(ckpt: Checkpoint) -> Settings:
    hf_quant = _side_json(ckpt, HF_QUANT_CONFIG)
    params = _side_json(ckpt, PARAMS_JSON)
    pq = params.get("quantization") if params is not None else None
    if pq is not None and not isinstance(pq, dict):
        raise InvalidCheckpoint("params.json `quantization` is not an object", file=ckpt.root / PARAMS_JSON)
    files = tuple(f for f, d in ((HF_QUANT_CONFIG, hf_quant), (PARAMS_JSON, pq)) if d is not None)
    return Settings(
        find_quantization_config(ckpt.config),
        tuple(config_locations(ckpt.config)),
        hf_quant,
        params,
        pq,
        files,
    )


def strip_config(config: dict | None, dtype_name: str) -> dict | None:
    """config.json of a dequantized output: no quantization setting anywhere in it, the dtype stated."""
    if config is None:
        return None
    out = {k: v for k, v in config.items() if k not in CONFIG_KEYS}
    if isinstance(out.get("text_config"), dict):
        tc = {k: v for k, v in out["text_config"].items() if k not in CONFIG_KEYS}
        if "torch_dtype" in tc or "dtype" in tc:
            tc["torch_dtype" if "torch_dtype" in tc else "dtype"] = dtype_name
        out["text_config"] = tc
    key = "torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"
    out[key] = dtype_name
    return out


def strip_params(params: dict) -> bytes:
    """params.json of a dequantized output: its `quantization` removed, everything else as it was."""
    out = {k: v for k, v in params.items() if k != "quantization"}
    return (json.dumps(out, indent=2) + "\n").encode()
