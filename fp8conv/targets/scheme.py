"""The quantization facts the serving rules need, read through the layouts layer (`fp8conv.formats`).

Where the settings live (config.json `quantization_config`, also under `text_config`, the old
`compression_config`, `hf_quant_config.json`) is `formats.read_settings`' job. The block a server sees
is read the server's way: vLLM's and SGLang's `Fp8Config` take `weight_block_size` as written, so a
missing one means per-tensor there (fp8conv's own dequantizer assumes 128 x 128 for it, as
transformers does).
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.formats import read_settings


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
    settings = read_settings(ckpt)
    qc = settings.config if settings.config is not None else settings.hf_quant
    if qc is None:
        return Scheme(None, None, None, None, None, None, None, None, None)
    if settings.config is None and isinstance(qc.get("quantization"), dict):  # hf_quant_config.json
        qc = qc["quantization"]
    where = settings.where()
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
