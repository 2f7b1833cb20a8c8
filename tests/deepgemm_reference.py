"""DeepGEMM's UE8M0 block cast, written out statement for statement, as the independent oracle the tests
compare fp8conv's requant with.

DeepGEMM deep_gemm/utils/math.py @54e22612409371d6364144b69086735beb54e98b: `ceil_to_ue8m0` and
`per_block_cast_to_fp8(use_ue8m0=True)`; vLLM's `requant_weight_ue8m0_inplace`
(vllm/model_executor/layers/quantization/utils/fp8_utils.py @007d50058a06dec0f82472d63c819244d460c40d)
applies it to a weight dequantized in float32 with its old scales.
"""

from __future__ import annotations

import math

import torch


def deepgemm_ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    bits = x.abs().float().view(torch.int)
    exp = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).bool().int()
    return (exp.clamp(1, 254) << 23).view(torch.float)


def deepgemm_per_block_cast_to_fp8(x: torch.Tensor, gran: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape
    x_padded = torch.zeros((math.ceil(m / gran) * gran, math.ceil(n / gran) * gran), dtype=x.dtype)
    x_padded[:m, :n] = x
    x_view = x_padded.view(-1, gran, x_padded.size(1) // gran, gran)
    x_amax = x_view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = deepgemm_ceil_to_ue8m0(x_amax / 448.0)
    x_scaled = (x_view * (1.0 / sf)).to(torch.float8_e4m3fn)
    return x_scaled.view_as(x_padded)[:m, :n].contiguous(), sf.view(x_view.size(0), x_view.size(2))
