"""`quant_method: mxfp4` (gpt-oss; transformers `integrations/mxfp4.py`).

Experts are stored as `X_blocks` uint8 [E, rows, G, 16] (two e2m1 codes a byte, low nibble the even
element, 32 elements a group) and `X_scales` uint8 [E, rows, G] (e8m0 exponent bytes). A bf16 gpt-oss
names them `X` and holds them transposed, as transformers' `convert_moe_packed_tensors` returns them
(`gate_up_proj` [E, hidden, 2*intermediate], `down_proj` [E, intermediate, hidden]; modeling_gpt_oss.py).
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.formats.base import Detection, Layout, add_fp4
from fp8conv.formats.settings import Settings

QUANT_METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"


class Mxfp4(Layout):
    name = "mxfp4"
    title = "MXFP4 (gpt-oss: *_blocks / *_scales experts)"

    def claims(self, settings: Settings) -> bool:
        return settings.config is not None and settings.config.get("quant_method") == QUANT_METHOD

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        for name in ckpt.weight_map:
            if not name.endswith(BLOCKS):
                continue
            base = name[: -len(BLOCKS)]
            info = ckpt.info(name)
            # only stacked experts [E, rows, G, 16]: the orientation transformers loads is defined for them
            if base + SCALES in ckpt and info.dtype == "U8" and len(info.shape) == 4 and base not in ckpt:
                add_fp4(found, ckpt, name, base + SCALES, base, grouped=True, transpose=True)
