"""One band of rows of a weight quantized in the per-channel or MXFP8 scheme (the engine's quantize
step for those schemes; block FP8 goes through kernels.weight_quant).

Both are plain torch ops on the tensor's device (kernels.channel_quant / kernels.mx_quant), so the CPU
and a GPU write the same bytes; a band holds whole rows, and every scale covers part of one row.
"""

from __future__ import annotations

import torch

from fp8conv.convert.plan import TensorJob
from fp8conv.kernels import channel_quant, mx_quant

QUANTIZERS = ("channel", "mx-ceil", "mx-ct")


def scale_dtype(job: TensorJob) -> torch.dtype:
    """The dtype of the scale tensor a quantize job fills: e8m0 exponent bytes for MXFP8."""
    return torch.uint8 if job.quantizer.startswith("mx-") else torch.float32


def quantize_band(job: TensorJob, src: torch.Tensor, dst: torch.Tensor, device: torch.device):
    """Quantize rows `src` [R, N] into the e4m3 codes `dst` [R, N] (CPU memory); returns the band's
    scales on the CPU and whether every one is finite (a NaN or Inf weight makes it False)."""
    x = src if device.type == "cpu" else src.to(device, non_blocking=True)
    if job.quantizer == "channel":
        q, s = channel_quant(x)
        finite = bool(torch.isfinite(s).all())
    elif job.quantizer in ("mx-ceil", "mx-ct"):
        q, s = mx_quant(x, job.quantizer[3:])
        finite = not bool((s == 255).any())
    else:
        raise ValueError(f"unknown quantizer {job.quantizer!r}")
    dst.view(torch.uint8).copy_(q.view(torch.uint8))
    return s.cpu(), finite
