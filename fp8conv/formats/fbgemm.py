"""`quant_method: fbgemm_fp8` (Llama-4 FP8 releases; transformers `integrations/fbgemm_fp8.py`).

- linear layers: `X.weight` e4m3 [out, in] + `X.weight_scale` fp32 [out, 1], one scale per output row;
- fused experts (`FbgemmFp8Llama4TextExperts`): `gate_up_proj` [E, H, 2I] + `gate_up_proj_scale`
  [E, 1, 2I] and `down_proj` [E, I, H] + `down_proj_scale` [E, H, 1]: one scale per output column of
  an [in, out] matrix (transformers quantizes the transposed matrix per row and reshapes the scales to
  these shapes; its forward reads `down_proj_scale[i].view(-1, 1)`, the same elements as [E, 1, H]).
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.formats.base import ArtifactKind, Detection, Layout, add_activation_artifacts, add_fp8, is_fp8
from fp8conv.formats.scheme import Granularity
from fp8conv.formats.settings import Settings

QUANT_METHOD = "fbgemm_fp8"


class Fbgemm(Layout):
    name = "fbgemm"
    title = "fbgemm_fp8 (Llama-4: per-row linear scales, per-column fused-expert scales)"

    def claims(self, settings: Settings) -> bool:
        return settings.config is not None and settings.config.get("quant_method") == QUANT_METHOD

    def scan(self, ckpt: Checkpoint, settings: Settings, found: Detection) -> None:
        for name in ckpt.weight_map:
            info = ckpt.info(name)
            if is_fp8(info):
                allowed = (Granularity.CHANNEL,) if len(info.shape) == 2 else (Granularity.COLUMN,)
                add_fp8(found, ckpt, name, [name + "_scale"], allowed, None)
        add_activation_artifacts(found, ckpt, (ArtifactKind.INPUT_SCALE,))
