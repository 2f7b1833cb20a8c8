"""The per-weight loader rules: can a loader load, and run, one FP8 weight of this shape stored this way?

One function, `weight_refusal`, holds them. The planners ask it before they write a weight in FP8
(`fp8conv quantize --target`, `fp8conv convert --target`: a refused weight is written bf16 instead);
verify's loader check (`loaders.check_loaders`) asks it of the FP8 weights a written checkpoint holds.

- ragged tiles, transformers with quant_method fp8: transformers infers the block as weight shape /
  scale grid (integrations/finegrained_fp8.py Fp8Dequantize). A grid the shape does not divide is
  refused on load; one that divides a ragged shape unevenly (130 rows, 2 scale rows) makes it infer the
  wrong block (65) and dequantize wrong without an error. compressed-tensors takes the block from its
  settings and pads edge tiles, as vLLM and SGLang do.
- the activation group: the input of a block-FP8 layer is quantized per 1 x group at run time, so K (the
  weight's columns) must be a multiple of the group, or the forward pass fails. compressed-tensors'
  FP8_BLOCK preset sets the group (128) in its settings and every loader of that layout applies it;
  with quant_method fp8, vLLM's and SGLang's per-token-group quantization of the input uses block_k and
  asserts `K % group_size == 0` (vllm model_executor/layers/quantization/utils/fp8_utils.py, sglang
  srt/layers/quantization/fp8_kernel.py); transformers' fp8 method dequantizes on the CPU and has no
  such rule there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fp8conv.targets import sources

ACTIVATION_GROUP_SOURCES = {
    "compressed-tensors": sources.COMPRESSED_TENSORS,
    "vllm": sources.VLLM_FP8_UTILS,
    "sglang": sources.SGLANG_FP8_KERNEL,
}


_WHOSE = {"compressed-tensors": "compressed-tensors'", "vllm": "vLLM's", "sglang": "SGLang's"}


@dataclass(frozen=True)
class Refusal:
    target: str
    rule: str  # "ragged tiles" | "activation group"
    message: str  # the loader's own error text where it has one
    source: str

    @property
    def reason(self) -> str:
        """The refusal as a planner's reason for keeping the weight bf16: `<target>: <rule>: <message>`."""
        return f"{self.target}: {self.rule}: {self.message}"


def weight_refusal(
    target: str,
    method: str | None,
    shape: tuple[int, ...],
    block: tuple[int, int] | None,
    act_group: int | None = None,
    grid: tuple[int, int] | None = None,
    layer: str | None = None,
) -> Refusal | None:
    """Why `target` could not load or run one FP8 weight [..., M, K], or None.

    method: the quant_method it is stored under ("fp8" | "compressed-tensors"); block: its [block_n,
    block_k] tile when block-scaled, else None; act_group: compressed-tensors' input activation group
    size (None: not group-quantized); grid: the stored scale grid's last two sides (default the
    [ceil(M/bn), ceil(K/bk)] grid fp8conv writes); layer: the serving layer, named in the message."""
    rows, cols = shape[-2], shape[-1]
    if target == "transformers" and method == "fp8" and block is not None:
        bn, bk = block
        srows, scols = grid if grid is not None else (math.ceil(rows / bn), math.ceil(cols / bk))
        if rows % srows or cols % scols:
            return Refusal(
                target,
                "ragged tiles",
                f"Weight shape ({rows}, {cols}) not divisible by scale grid ({srows}, {scols}). "
                "(transformers infers the block from the grid when it dequantizes, e.g. on CPU)",
                sources.TRANSFORMERS_FP8,
            )
        if rows // srows != bn or cols // scols != bk:
            return Refusal(
                target,
                "ragged tiles",
                f"transformers would infer block [{rows // srows}, {cols // scols}] from shape "
                f"({rows}, {cols}) and grid ({srows}, {scols}) instead of [{bn}, {bk}]: it loads "
                "but dequantizes wrong",
                sources.TRANSFORMERS_FP8,
            )
    if method == "compressed-tensors":
        group, who = act_group, "compressed-tensors"
    elif method == "fp8" and block is not None and target in ("vllm", "sglang"):
        group, who = block[1], target
    else:
        group, who = None, None
    if group and cols % group:
        of = f" of {layer}" if layer else ""
        return Refusal(
            target,
            "activation group",
            f"input size K = {cols}{of} is not a multiple of the activation group {group}: "
            f"{_WHOSE[who]} per-group quantization of the input fails in the forward pass",
            ACTIVATION_GROUP_SOURCES[who],
        )
    return None
