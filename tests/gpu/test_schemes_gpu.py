"""Per-channel and MXFP8 quantization on the GPU write the CPU's bytes (run by `make test-gpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp8conv.cli import app
from fp8conv.kernels import channel_quant, mx_quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
runner = CliRunner()


def edge_data(m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, n, generator=g) * torch.logspace(-30, 30, m).unsqueeze(1)
    x[0] = 0
    x[1, :32] = 1.75
    x[2, :32] = 2.0**-130
    return x.bfloat16()


@pytest.mark.parametrize("shape", [(256, 4096), (1000, 8640), (3, 96)])
def test_channel_and_mx_quant_gpu_equal_cpu(shape):
    x = edge_data(*shape)
    q, s = channel_quant(x)
    qg, sg = channel_quant(x.cuda())
    assert torch.equal(s, sg.cpu()), "channel scales"
    assert torch.equal(q.view(torch.uint8), qg.cpu().view(torch.uint8)), "channel codes"
    for rule in ("ceil", "ct"):
        q, e = mx_quant(x, rule)
        qg, eg = mx_quant(x.cuda(), rule)
        assert torch.equal(e, eg.cpu()), f"mx {rule} exponents"
        assert torch.equal(q.view(torch.uint8), qg.cpu().view(torch.uint8)), f"mx {rule} codes"


@pytest.mark.parametrize(
    "scheme,fmt", [("fp8-channel", "compressed-tensors"), ("mxfp8", "fp8"), ("mxfp8", "compressed-tensors")]
)
def test_quantize_scheme_gpu_equals_cpu(tmp_path, scheme, fmt):
    src = SAMPLES / "llama-tiny-bf16"
    outs = {}
    for device in ("cpu", "cuda"):
        dst = tmp_path / device
        r = runner.invoke(
            app,
            ["quantize", str(src), str(dst), "--scheme", scheme, "--format", fmt, "--device", device, "-q"],
        )
        assert r.exit_code == 0, r.output
        outs[device] = {p.name: p.read_bytes() for p in sorted(dst.glob("*.safetensors"))}
    assert outs["cpu"] == outs["cuda"]
