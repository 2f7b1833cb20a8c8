"""The loss Blackwell's UE8M0 requant adds: the figure equals the measured error of an independent requant.

The independent requant below follows DeepGEMM deep_gemm/utils/math.py
@54e22612409371d6364144b69086735beb54e98b (ceil_to_ue8m0, per_block_cast_to_fp8 with use_ue8m0=True) applied
the way vLLM vllm/model_executor/layers/quantization/utils/fp8_utils.py
@007d50058a06dec0f82472d63c819244d460c40d requant_weight_ue8m0_inplace does it (dequantize in fp32 with the
old scales, expanded with repeat_interleave and cropped; requantize; one 2-D matrix at a time), written
out in the statement order of those files rather than through fp8conv's helpers.
"""

from __future__ import annotations

import json

import pytest
import torch

from fp8conv.checkpoint.safetensors_io import save_file
from fp8conv.kernels import weight_quant
from fp8conv.targets import serving_report
from fp8conv.targets.requant import ceil_to_ue8m0, requant_loss, requant_ue8m0
from tests.deepgemm_reference import deepgemm_ceil_to_ue8m0, deepgemm_per_block_cast_to_fp8


def vllm_requant(w_q, s_old, block=(128, 128)):
    m_cur, k_cur = w_q.shape
    s_exp = torch.repeat_interleave(torch.repeat_interleave(s_old.float(), block[0], 0), block[1], 1)
    w_dq = w_q.to(torch.float32) * s_exp[:m_cur, :k_cur]
    return deepgemm_per_block_cast_to_fp8(w_dq)


def dequant(q, s):
    e = torch.repeat_interleave(torch.repeat_interleave(s.float(), 128, -2), 128, -1)
    return q.float() * e[..., : q.shape[-2], : q.shape[-1]]


SHAPES = [(256, 512), (576, 7168 // 8), (384, 130), (1, 128), (300, 257)]


@pytest.mark.parametrize("shape", SHAPES)
def test_requant_is_the_independent_one_bit_for_bit(shape):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[1])).bfloat16()
    q, s = weight_quant(w)
    q2, s2 = requant_ue8m0(q, s, (128, 128))
    rq, rs = vllm_requant(q, s)
    assert torch.equal(q2.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s2, rs)


@pytest.mark.parametrize("shape", [(256, 512), (384, 256)])
def test_loss_figure_equals_the_measured_error_of_the_independent_requant(shape):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    q, s = weight_quant(w)
    rq, rs = vllm_requant(q, s)
    before, after = dequant(q, s).double(), dequant(rq, rs).double()
    measured = float((after - before).norm() / before.norm())
    loss = requant_loss("w", q, s, (128, 128), expert=False)
    assert loss.requantized
    assert measured > 0.01  # float scales lose accuracy (FORMATS.md cites 0.026 from vllm PR #58157)
    assert loss.rel_error == pytest.approx(measured, rel=1e-9, abs=0)
    assert loss.max_abs_error == float((after - before).abs().max())
    assert loss.scales_changed == 1.0


def test_power_of_two_scales_lose_nothing():
    w = (torch.randn(256, 384) * 0.02).bfloat16()
    q, s = weight_quant(w, scale_fmt="ue8m0")
    loss = requant_loss("w", q, s, (128, 128), expert=False)
    assert (
        loss.requantized and loss.rel_error == 0.0 and loss.max_abs_error == 0.0 and loss.scales_changed == 0
    )


def test_ceil_is_by_bits_not_log2():
    # just above a power of two, float32 log2 rounds to the integer; DeepGEMM's bit test does not
    x = torch.tensor([2.0**-10 * (1 + 2**-23), 2.0**-10, 3.0, 0.0])
    assert ceil_to_ue8m0(x).tolist() == [2.0**-9, 2.0**-10, 4.0, 2.0**-126]
    assert torch.equal(ceil_to_ue8m0(x), deepgemm_ceil_to_ue8m0(x))


def test_unaligned_dense_weight_is_not_requantized_but_an_expert_is():
    w = (torch.randn(576, 256) * 0.02).bfloat16()
    q, s = weight_quant(w)
    dense = requant_loss("kv_a", q, s, (128, 128), expert=False)
    assert not dense.requantized and "576 x 256" in dense.note
    assert requant_loss("e", q, s, (128, 128), expert=True).requantized


def test_report_lists_tensors_worst_first(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i, spread in enumerate((0.0, 2.0, 4.0)):
        w = (torch.randn(256, 256, generator=g) * torch.logspace(-spread, 0, 256)).bfloat16()
        q, s = weight_quant(w)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = q
        tensors[f"model.layers.{i}.mlp.down_proj.weight_scale_inv"] = s
    save_file(tensors, tmp_path / "model.safetensors", {"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 2,
        "quantization_config": {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    report = serving_report(tmp_path, (1,), blackwell=True)
    errors = [r.rel_error for r in report.requant]
    assert errors == sorted(errors, reverse=True) and len(errors) == 3
    for r in report.requant:
        q, s = tensors[r.tensor], tensors[r.tensor + "_scale_inv"]
        assert r == requant_loss(r.tensor, q, s, (128, 128), expert=False)
    assert report.to_dict()["blackwell_requant"][0]["tensor"] == report.requant[0].tensor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 14336), (576, 7168), (384, 130)])
def test_requant_on_the_gpu_is_the_cpu_one(shape):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    q, s = weight_quant(w)
    q2, s2 = requant_ue8m0(q, s, (128, 128))
    gq, gs = requant_ue8m0(q.cuda(), s.cuda(), (128, 128))
    assert torch.equal(gq.cpu().view(torch.uint8), q2.view(torch.uint8)) and torch.equal(gs.cpu(), s2)
    cpu = requant_loss("w", q, s, (128, 128), expert=True)
    gpu = requant_loss("w", q.cuda(), s.cuda(), (128, 128), expert=True)
    assert gpu.max_abs_error == cpu.max_abs_error and gpu.scales_changed == cpu.scales_changed
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-9, abs=0)
