"""`quant_method: fp8`: DeepSeek-V3/R1/V3.1/V3.2/V4, Kimi-K2, Qwen3 (dense, MoE, Next, VL), MiniMax-M2,
transformers' fine-grained FP8 (fused 3-D experts, static fused experts, MXFP8 bytes), Mistral's HF FP8
shards and AutoFP8's legacy static checkpoints: they share the config key and differ in scale names and
tiles, all told apart by the scale's name and shape.

Public facts this module follows (FORMATS.md "Published layouts"):
- `X.weight` e4m3 + `X.weight_scale_inv` [ceil(m/bm), ceil(n/bn)] for `weight_block_size: [bm, bn]`
  (DeepSeek-V3 README_WEIGHTS.md; transformers integrations/finegrained_fp8.py); fp32, bf16 (Qwen3-1.7B-FP8)
  or fp16 (Qwen3-4B-Instruct-2507-FP8) scales; `scale_fmt: ue8m0` power-of-two scales (V3.1/V3.2), as fp32
  or as e8m0 / uint8 exponent bytes; `weight_block_size: [1, 32]` with uint8 exponents (MXFP8 bytes).
- stacked experts `experts.gate_up_proj` [E, 2I, H] + `gate_up_proj_scale_inv` [E, ceil(2I/bm), ceil(H/bn)];
  static fused experts: `gate_up_proj_scale_inv` [E, 2, 1] (one scale per gate / up half) and
  `*_activation_scale`.
- `weight_block_size: null` with `activation_scheme: static` (Mistral HF FP8): scalar `weight_scale_inv`
  and `activation_scale`; AutoFP8: scalar `weight_scale` + `input_scale`.
- DeepSeek-V4: block scales named `X.scale` (e8m0), experts FP4 (int8 bytes, two e2m1 codes each, low
  nibble first) with e8m0 `X.scale` per 1 x 32 (transformers renames `.scale` to `weight_scale_inv` and
  unpacks int8 experts in Fp8Dequantize._unpack_fp4).
- Mistral's native `consolidated.safetensors` beside the HF shards: `X.qscale_weight` (see mistral.py).
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.base import (
    ACTIVATION_KINDS,
    Detection,
    Layout,
    add_activation_artifacts,
    add_fp4,
    add_fp8,
    is_fp8,
    looks_packed,
)
from fp8conv.formats.mistral import add_native_mistral
from fp8conv.formats.scheme import MX_GROUP, Granularity, grid_of
from fp8conv.formats.settings import Settings

QUANT_METHOD = "fp8"
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # what fp8conv writes
FMTS = (None, "e4m3", "float8_e4m3fn", "e5m2", "float8_e5m2")
ACTIVATION_SCHEMES = (None, "dynamic", "static")
SCALE_FMTS = (None, "ue8m0", "float")


def block_of(qc: dict | None) -> tuple[int, int] | None:
    """The configured tile: `weight_block_size`, the default 128 x 128 when absent, None when null."""
    if qc is None or "weight_block_size" not in qc:
        return DEFAULT_BLOCK
    wbs = qc["weight_block_size"]
    if wbs is None:
        return None
    if isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(v, int) and v > 0 for v in wbs):
        return int(wbs[0]), int(wbs[1])
    raise ValueError(wbs)


def scale_names(name: str) -> list[str]:
    """Where an FP8 weight's scale may be: `X_scale_inv`, `X_scale`, and DeepSeek-V4's `.scale`."""
    out = [name + SCALE_SUFFIX, name + "_scale"]
    if name.endswith(".weight"):
        out.append(name[: -len(".weight")] + ".scale")
    return out


class Fp8Block(Layout):
    name = "fp8"
    title = "fine-grained FP8 (DeepSeek, Kimi-K2, Qwen3, MiniMax-M2, Mistral HF FP8, AutoFP8, transformers)"

    def claims(self, settings: Settings) -> bool:
        return settings.config is not None and settings.config.get("quant_method") == QUANT_METHOD

    def check_settings(self, settings: Settings, ckpt: Checkpoint) -> None:
        qc = settings.config or {}
        where = ckpt.root / "config.json"
        checks = (("fmt", FMTS), ("activation_scheme", ACTIVATION_SCHEMES), ("scale_fmt", SCALE_FMTS))
        for key, allowed in checks:
            if qc.get(key) not in allowed:
                raise InvalidCheckpoint(
                    f"quantization_config {key} {qc.get(key)!r} is not one fp8conv supports "
                    f"({', '.join(str(a) for a in allowed if a)})",
                    file=where,
                )
        try:
            block_of(qc)
        except ValueError:
            raise InvalidCheckpoint(
                f"quantization_config weight_block_size {qc.get('weight_block_size')!r} is not [rows, cols] "
                "of positive integers or null",
                file=where,
            ) from None

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        block = block_of(settings.config)
        allowed = {Granularity.TENSOR, Granularity.EXPERT, Granularity.HALF}
        if block is not None:
            allowed.add(Granularity.GROUP if block == (1, MX_GROUP) else Granularity.BLOCK)
        for name in ckpt.weight_map:
            info = ckpt.info(name)
            if is_fp8(info):
                if not add_fp8(found, ckpt, name, scale_names(name), allowed, block):
                    add_native_mistral(found, ckpt, name)
            elif looks_packed(info) and name.endswith(".weight"):
                sname = name[: -len(".weight")] + ".scale"
                if sname in ckpt and _fits_fp4(info.shape, ckpt.info(sname).shape):
                    add_fp4(found, ckpt, name, sname, name, grouped=False)
        add_activation_artifacts(found, ckpt, ACTIVATION_KINDS)


def _fits_fp4(codes: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    return tuple(scale) == grid_of((*codes[:-1], codes[-1] * 2), (1, MX_GROUP))


def fp8_config(
    block: tuple[int, int] = DEFAULT_BLOCK, skipped: list[str] | None = None, scale_fmt: str = "float"
) -> dict:
    """`quantization_config` of the block-FP8 layout (DeepSeek-V3, transformers' FP8 loader)."""
    qc: dict = {
        "quant_method": QUANT_METHOD,
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    if skipped is not None:
        qc["modules_to_not_convert"] = skipped
    if scale_fmt == "ue8m0":
        qc["scale_fmt"] = "ue8m0"
    return qc
