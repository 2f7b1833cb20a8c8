"""The Hopper fp8_gemm kernel (Gluon) compiled for sm_90a with the installed Triton, on a machine
without a GPU: Gluon's API changes between Triton releases (names of the TMA and cp.async copies,
for one), and this is where such a change shows first. Running it is the GPU tests' job."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


def _compile(block_n: int):
    # Private entry points of Triton's compiler, as its own tests use them; if they move, this test
    # is skipped rather than failed (the kernel itself is not what broke).
    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        from triton.runtime.jit import mangle_type
    except ImportError as ex:
        pytest.skip(f"Triton {triton.__version__} lacks the entry points this test uses: {ex}")
    from fp8conv.kernels import gluon_gemm as G

    t = torch.empty(256, 256, dtype=torch.float8_e4m3fn)
    lay_a = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    lay_b = gl.NVMMASharedLayout.get_default_for([block_n, 128], gl.float8e4nv)
    sig = {
        "a_desc": mangle_type(TensorDescriptor.from_tensor(t, [64, 128], lay_a)),
        "b_desc": mangle_type(TensorDescriptor.from_tensor(t, [block_n, 128], lay_b)),
        "c_ptr": "*bf16",
        "as_ptr": "*fp32",
        "bs_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "KB": "i32",
        "sam": "i32",
        "sak": "i32",
    }
    cfg = G.WGMMA_CONFIG
    cons = {
        "GROUP_M": cfg["GROUP_M"],
        "STAGES": cfg["STAGES"][block_n],
        "CONSUMER_REGS": cfg["CONSUMER_REGS"],
        "PRODUCER_REGS": cfg["PRODUCER_REGS"],
    }
    sig.update({k: "constexpr" for k in cons})
    names = list(sig)
    src = GluonASTSource(
        fn=G._fp8_gemm_wgmma_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in cons.items()}
    )
    opts = {"num_warps": 4, **G.LAUNCH_OPTS}  # as fp8_gemm_wgmma launches it
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


@pytest.mark.slow
@pytest.mark.parametrize("block_n", [64, 128])
def test_gluon_gemm_compiles_for_sm90a(block_n, monkeypatch, tmp_path):
    # a fresh cache: Triton's cache key does not see module-level aliases the kernel calls through
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled = _compile(block_n)
    ptx = compiled.asm["ptx"]
    # the tensor-core and copy instructions the design rests on are there
    assert "wgmma.mma_async" in ptx and "e4m3" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA tiles
    assert "cp.async.ca.shared.global" in ptx or "cp.async.cg.shared.global" in ptx  # the scales
    assert "setmaxnreg" in ptx  # warp-specialized register split
    assert len(compiled.asm["cubin"]) > 0
    # the shared-memory budget of an H100 (227 KB per block)
    assert compiled.metadata.shared <= 227 * 1024
