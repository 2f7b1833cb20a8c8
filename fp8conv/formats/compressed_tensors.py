"""compressed-tensors (llm-compressor, RedHatAI releases): `quant_method: compressed-tensors` under
`quantization_config` or the old `compression_config` key.

Public facts this module follows (FORMATS.md; compressed-tensors `config/base.py` CompressionFormat,
`compressors/naive_quantized`, `compressors/mxfp8/base.py`, `quantization/quant_scheme.py`):
- `format: float-quantized` (also per config group): `X.weight` e4m3 + `X.weight_scale` in the original
  weight's dtype; weights `strategy` tensor ([1]), channel ([out, 1], FP8_DYNAMIC), block
  (`block_structure` [bm, bn], ragged edges), group ([out, in/group_size]).
- `format: mxfp8-quantized`: `strategy: group`, `group_size: 32`, `weight_scale` uint8 exponent bytes.
- static schemes add `X.input_scale` (and `output_scale`); `kv_cache_scheme` adds `self_attn.k_scale` /
  `v_scale` (or on k_proj / v_proj).
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
from fp8conv.formats.scheme import MX_GROUP, Granularity
from fp8conv.formats.settings import Settings

QUANT_METHOD = "compressed-tensors"
SCALE_SUFFIX = "_scale"  # X.weight -> X.weight_scale
FORMATS = ("float-quantized", "naive-quantized", "mxfp8-quantized")
STATUSES = (None, "compressed")
STRATEGIES = {
    "tensor": Granularity.TENSOR,
    "channel": Granularity.CHANNEL,
    "block": Granularity.BLOCK,
    "group": Granularity.GROUP,
}


def _groups(qc: dict) -> list[dict]:
    groups = qc.get("config_groups")
    return [g for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []


class CompressedTensors(Layout):
    name = "compressed-tensors"
    title = "compressed-tensors FP8 (float-quantized: tensor / channel / block / group; mxfp8-quantized)"

    def claims(self, settings: Settings) -> bool:
        return settings.config is not None and settings.config.get("quant_method") == QUANT_METHOD

    def check_settings(self, settings: Settings, ckpt: Checkpoint) -> None:
        qc = settings.config or {}
        where = ckpt.root / "config.json"

        def refuse(rule: str) -> None:
            raise InvalidCheckpoint(rule, file=where, hint=f"fp8conv reads the formats {', '.join(FORMATS)}")

        if qc.get("format") not in FORMATS:
            refuse(f"compressed-tensors format {qc.get('format')!r} is not one fp8conv understands")
        if qc.get("quantization_status") not in STATUSES:
            status = qc.get("quantization_status")
            refuse(f"quantization_status {status!r}: only compressed checkpoints are read")
        sparsity = qc.get("sparsity_config")
        if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
            refuse(f"sparsity_config format {sparsity.get('format')!r} is not supported")
        if not _groups(qc):
            refuse("compressed-tensors quantization_config has no config_groups")
        for g in _groups(qc):
            w = g.get("weights")
            if g.get("format") not in (None, *FORMATS):
                refuse(f"config group format {g.get('format')!r} is not one fp8conv understands")
            if not isinstance(w, dict):
                continue  # activation-only group: nothing stored for the weights
            if w.get("num_bits") != 8 or w.get("type") != "float":
                refuse(f"weights of {w.get('num_bits')}-bit {w.get('type')!r}: only 8-bit float is supported")
            if w.get("strategy") not in STRATEGIES:
                refuse(f"weights strategy {w.get('strategy')!r} is not one of {', '.join(STRATEGIES)}")
            if w.get("symmetric") is False:
                refuse("asymmetric weights (zero points) are not supported")

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        qc = settings.config or {}
        tiles: list[tuple[Granularity, tuple[int, int] | None]] = []
        for g in _groups(qc):
            w = g.get("weights")
            if not isinstance(w, dict):
                continue
            gran = STRATEGIES[w["strategy"]]
            tile = None
            if gran is Granularity.BLOCK:
                bs = w.get("block_structure")
                tile = tuple(bs) if isinstance(bs, list) and len(bs) == 2 else None
            elif gran is Granularity.GROUP:
                tile = (1, int(w.get("group_size") or MX_GROUP))
            tiles.append((gran, tile))
        for name in ckpt.weight_map:
            if not is_fp8(ckpt.info(name)):
                continue
            err = None
            for gran, tile in tiles or [(Granularity.TENSOR, None)]:
                try:
                    if add_fp8(found, ckpt, name, [name + SCALE_SUFFIX], {gran}, tile):
                        break
                except InvalidCheckpoint as e:  # the next group's scheme may fit
                    err = e
            else:
                if err is not None:
                    raise err
        add_activation_artifacts(found, ckpt, ACTIVATION_KINDS)


def ct_block_config(block: tuple[int, int], ignore: list[str]) -> dict:
    """`quantization_config` of compressed-tensors' FP8 block scheme (llm-compressor FP8_BLOCK)."""
    bm, bn = block
    return {
        "quant_method": QUANT_METHOD,
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "strategy": "block",
                    "block_structure": [bm, bn],
                    "dynamic": False,
                    "observer": "minmax",
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 128,
                    "dynamic": True,
                    "observer": None,
                },
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
