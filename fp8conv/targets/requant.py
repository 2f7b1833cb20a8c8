"""The loss a Blackwell server adds at load: DeepGEMM's UE8M0 requantization of float block scales.

On SM100, vLLM (`requant_weight_ue8m0_inplace`, on by default with DeepGEMM) and SGLang rewrite every
block-FP8 weight that DeepGEMM will run: dequantize with the checkpoint's float scales (fp32), then
quantize again with power-of-two scales (DeepGEMM `per_block_cast_to_fp8(use_ue8m0=True)`). The torch
code below re-implements those two steps (it has to: neither vLLM nor DeepGEMM runs here) and measures
what the rewrite changes against the checkpoint's own dequantized weight. A checkpoint whose scales are
already powers of two (`--scale-fmt ue8m0`) comes through unchanged.

vLLM sends a dense linear to DeepGEMM only when its per-rank weight is a multiple of 128 in both
dimensions (`should_use_deepgemm_for_fp8_linear`); other shapes keep their scales (CUTLASS/Triton).
Expert weights always go to DeepGEMM when it runs the MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepGEMM clamps a tile's amax to this before dividing
DEEPGEMM_ALIGN = 128


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The next power of two >= |x|, by exponent bits (DeepGEMM `ceil_to_ue8m0`): exact where log2 is not."""
    bits = x.abs().float().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).bool().int()
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def _expand(s: torch.Tensor, rows: int, cols: int, bm: int, bn: int) -> torch.Tensor:
    return s.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)[..., :rows, :cols]


def requant_ue8m0(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the server holds after load: (e4m3 codes, power-of-two fp32 scales) for codes `q`, scales `s`.
    2-D or stacked 3-D; edge tiles padded with zeros as DeepGEMM pads them."""
    bm, bn = block
    rows, cols = q.shape[-2], q.shape[-1]
    w = q.float() * _expand(s.float(), rows, cols, bm, bn)  # the dequantized weight, fp32
    pr, pc = -(-rows // bm) * bm, -(-cols // bn) * bn
    lead = w.shape[:-2]
    padded = torch.zeros((*lead, pr, pc), dtype=torch.float32)
    padded[..., :rows, :cols] = w
    tiles = padded.view(*lead, pr // bm, bm, pc // bn, bn)
    amax = tiles.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=AMAX_FLOOR)
    sf = ceil_to_ue8m0(amax / FP8_E4M3_MAX)
    codes = (tiles * (1.0 / sf)).to(torch.float8_e4m3fn)
    return codes.view(*lead, pr, pc)[..., :rows, :cols].contiguous(), sf.view(*lead, pr // bm, pc // bn)


@dataclass(frozen=True)
class RequantLoss:
    tensor: str
    requantized: bool  # False: the server keeps this tensor's scales (shape not DeepGEMM-aligned)
    rel_error: float  # ||W_server - W_checkpoint||_F / ||W_checkpoint||_F
    max_abs_error: float
    scales_changed: float  # fraction of scale tiles that were not already a power of two
    note: str | None = None


def requant_loss(
    name: str, q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], expert: bool
) -> RequantLoss:
    """The error the UE8M0 requant at load adds to one tensor, against the checkpoint's dequantized weight."""
    rows, cols = q.shape[-2], q.shape[-1]
    if not expert and (rows % DEEPGEMM_ALIGN or cols % DEEPGEMM_ALIGN):
        return RequantLoss(
            name, False, 0.0, 0.0, 0.0, f"{rows} x {cols} is not 128-aligned: vLLM runs it without DeepGEMM"
        )
    bm, bn = block
    ref = (q.float() * _expand(s.float(), rows, cols, bm, bn)).double()  # fp32 products, as vLLM dequantizes
    q2, s2 = requant_ue8m0(q, s, block)
    got = (q2.float() * _expand(s2, rows, cols, bm, bn)).double()
    diff = got - ref  # norms in float64: the figure is compared with other runs to 1e-9
    denom = float(ref.norm())
    rel = float(diff.norm()) / denom if denom > 0 else 0.0
    sf = s.float()
    changed = float((ceil_to_ue8m0(sf) != sf.abs()).float().mean()) if sf.numel() else 0.0
    return RequantLoss(name, True, rel, float(diff.abs().max()) if diff.numel() else 0.0, changed)
