"""fp8conv's GPU kernels compiled for sm_90a (Hopper) with the installed Triton, on a machine without
a GPU: Triton's APIs move between releases (Gluon renamed its TMA and cp.async copies in 3.9, for one),
and this is where such a change shows first. Running them is the GPU tests' job."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


def _compile(source_cls, kernel, sig: dict, cons: dict, **opts):
    """kernel compiled for sm_90a as its launcher would: sig the runtime arguments' types, cons the
    constexprs, pointers 16-byte aligned (as torch allocates them), fp8conv's launch options."""
    GPUTarget = _private("triton.backends.compiler.GPUTarget")
    from fp8conv.kernels.common import LAUNCH_OPTS

    sig = {**sig, **{k: "constexpr" for k in cons}}
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(names) if sig[k].startswith("*")}
    src = source_cls(
        fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in cons.items()}, attrs=attrs
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={**opts, **LAUNCH_OPTS})


def _private(what: str):
    """Private entry points of Triton's compiler, as its own tests use them; if they move, the test
    is skipped rather than failed (the kernels are not what broke)."""
    import importlib

    try:
        mod, name = what.rsplit(".", 1)
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as ex:
        pytest.skip(f"Triton {triton.__version__} lacks {what}: {ex}")


def _compile_gluon(block_n: int):
    gl = _private("triton.experimental.gluon.language")
    TensorDescriptor = _private("triton.experimental.gluon.nvidia.hopper.TensorDescriptor")
    mangle_type = _private("triton.runtime.jit.mangle_type")
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
        **dict.fromkeys(("M", "N", "KB", "sam", "sak"), "i32"),
    }
    cfg = G.WGMMA_CONFIG
    cons = {
        "GROUP_M": cfg["GROUP_M"],
        "STAGES": cfg[f"STAGES_{block_n}"],
        "CONSUMER_REGS": cfg["CONSUMER_REGS"],
        "PRODUCER_REGS": cfg["PRODUCER_REGS"],
    }
    source = _private("triton.experimental.gluon._runtime.GluonASTSource")
    return _compile(source, G._fp8_gemm_wgmma_kernel, sig, cons, num_warps=4)  # as fp8_gemm_wgmma


def _compile_triton(kernel, sig: dict, cons: dict, **opts):
    return _compile(_private("triton.compiler.compiler.ASTSource"), kernel, sig, cons, **opts)


def _triton_cases():
    from fp8conv.kernels import fp4 as f4
    from fp8conv.kernels import gemm as gk
    from fp8conv.kernels import quant as tk

    dq = dict.fromkeys(("M", "N_div", "bm", "bn", "sm", "sn", "n_tiles_n"), "i32")
    wq = dict.fromkeys(("M", "N_div", "bm", "sm", "sn"), "i32")
    aq = dict.fromkeys(("R", "K_div", "n_groups", "s_stride_r", "s_stride_g"), "i32")
    gm = dict.fromkeys(("M", "N", "K", "KB", "M_BUCKET"), "i32")
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)
    wq_c = dict(BN=128, ALIGN=8, BM_P=128, BN_P=128, SINGLE=True, OFFS64=False, FMAX=448.0, UE8M0=False)
    return {
        "weight_dequant": (
            tk._weight_dequant_kernel,
            {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", **dq},
            dict(ALIGN=16, BLOCK_M=32, BLOCK_N=256, ROW_UNIFORM=True, COL_UNIFORM=False),
            {"num_warps": tk.DEQUANT_TILE["num_warps"]},
            ["cvt.rn.f16x2.e4m3x2"],  # fp8 codes decoded in pairs
        ),
        "weight_quant narrow, capped": (
            tk._weight_quant_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", **wq},
            dict(wq_c, DIV=tk.WEIGHT_QUANT["div"]),
            {"num_warps": tk.WEIGHT_QUANT["num_warps"], "maxnreg": tk.WEIGHT_QUANT["maxnreg_narrow"]},
            ["cvt.rn.satfinite.e4m3x2.f32", f".maxnreg {tk.WEIGHT_QUANT['maxnreg_narrow']}"],
        ),
        "weight_quant two-pass ue8m0": (
            tk._weight_quant_kernel,
            {"x_ptr": "*fp32", "q_ptr": "*fp8e5", "s_ptr": "*fp32", **wq},
            dict(wq_c, BN=512, ALIGN=16, BM_P=32, BN_P=256, SINGLE=False, OFFS64=True, UE8M0=True, DIV=2),
            {"num_warps": 8},
            ["cvt.rn.satfinite.e5m2x2.f32"],
        ),
        "act_quant": (
            tk._act_quant_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", **aq},
            dict(G=128, ALIGN=16, BLOCK_R=16, G_P=128, NG_B=1, FMAX=448.0, UE8M0=False, DIV=2),
            {"num_warps": 4},
            ["cvt.rn.satfinite.e4m3x2.f32"],
        ),
        "act_quant whole rows": (
            tk._act_quant_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", **aq},
            dict(G=128, ALIGN=8, BLOCK_R=1, G_P=128, NG_B=8, FMAX=448.0, UE8M0=False, DIV=2),
            {"num_warps": tk.ACT_QUANT_TILE["row_num_warps"]},
            ["cvt.rn.satfinite.e4m3x2.f32"],
        ),
        "fp4_dequant": (
            f4._fp4_dequant_kernel,
            {"b_ptr": "*u8", "s_ptr": "*u8", "y_ptr": "*bf16", "R": "i32"},
            dict(BLOCK_R=f4.FP4_TILE["GROUPS"]),
            {"num_warps": f4.FP4_TILE["num_warps"]},
            # 16-byte code loads and 16-byte output stores (each thread writes 32 contiguous outputs)
            ["ld.global.v4.b32", "st.global.v4.b32"],
        ),
        "fp8_gemm pointers": (
            gk._fp8_gemm_kernel,
            {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32"}
            | gm,
            dict(tile, EVEN_K=True),
            {"num_warps": 8, "num_stages": 4},
            ["wgmma.mma_async", "e4m3"],  # Triton's dot on Hopper, on fp8 operands
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_triton_cases()))
def test_triton_kernels_compile_for_sm90a(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel, sig, cons, opts, expect = _triton_cases()[name]
    compiled = _compile_triton(kernel, sig, cons, **opts)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx and len(compiled.asm["cubin"]) > 0
    for text in expect:
        assert text in ptx, f"{name}: {text!r} not in the PTX"


@pytest.mark.slow
@pytest.mark.parametrize("block_n", [64, 128])
def test_gluon_gemm_compiles_for_sm90a(block_n, monkeypatch, tmp_path):
    # a fresh cache: Triton's cache key does not see module-level aliases the kernel calls through
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled = _compile_gluon(block_n)
    ptx = compiled.asm["ptx"]
    # the tensor-core and copy instructions the design rests on are there
    assert "wgmma.mma_async" in ptx and "e4m3" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA tiles
    assert "cp.async.ca.shared.global" in ptx or "cp.async.cg.shared.global" in ptx  # the scales
    assert "setmaxnreg" in ptx  # warp-specialized register split
    assert len(compiled.asm["cubin"]) > 0
    # the shared-memory budget of an H100 (227 KB per block)
    assert compiled.metadata.shared <= 227 * 1024
