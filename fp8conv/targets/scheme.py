"""The quantization facts the serving rules need, read from a checkpoint's settings in one place.

A small adapter: the layouts layer (`fp8conv/formats/`) will own reading schemes; until it does, this
reads `quantization_config` (also under `text_config`), `compression_config` and `hf_quant_config.json`
the way vLLM and SGLang look for them, and nothing else reads them in this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.formats import find_quantization_config


@dataclass(frozen=True)
class Scheme:
    method: str | None  # quant_method: "fp8", "compressed-tensors", ...; None: not quantized
    block: tuple[int, int] | None  # weight tile [block_n, block_k]; None: not block-quantized
    scale_suffix: str | None  # the scale name a loader of `method` reads
    activation_scheme: str | None
    scale_fmt: str | None
    strategy: str | None  # compressed-tensors weights strategy (block / channel / tensor / group)
    act_group: int | None  # compressed-tensors input activation group size
    where: str | None  # where the settings were found
    config: dict | None  # the settings object itself


def _block(value) -> tuple[int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    return None


def read_scheme(ckpt: Checkpoint) -> Scheme:
    qc, where = find_quantization_config(ckpt.config), "config.json quantization_config"
    if qc is None and ckpt.config and isinstance(ckpt.config.get("compression_config"), dict):
        qc, where = ckpt.config["compression_config"], "config.json compression_config"
    hf_quant = Path(ckpt.root) / "hf_quant_config.json"
    if qc is None and hf_quant.is_file():
        try:
            data = json.loads(hf_quant.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            qc, where = data.get("quantization", data), "hf_quant_config.json"
    if qc is None:
        return Scheme(None, None, None, None, None, None, None, None, None)
    method = qc.get("quant_method") or (qc.get("quant_algo") and "modelopt")
    if method == "compressed-tensors":
        weights, acts = {}, {}
        for group in (qc.get("config_groups") or {}).values():
            if isinstance(group, dict):
                weights = group.get("weights") or {}
                acts = group.get("input_activations") or {}
                break
        strategy = weights.get("strategy")
        block = _block(weights.get("block_structure")) if strategy == "block" else None
        group = acts.get("group_size") if acts.get("strategy") == "group" else None
        return Scheme(method, block, "weight_scale", None, None, strategy, group, where, qc)
    block = _block(qc.get("weight_block_size"))
    suffix = "weight_scale_inv" if method == "fp8" and block is not None else "weight_scale"
    return Scheme(
        method, block, suffix, qc.get("activation_scheme"), qc.get("scale_fmt"), None, None, where, qc
    )
