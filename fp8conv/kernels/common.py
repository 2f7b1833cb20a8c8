"""What the kernel families share: launch options, argument checks, the cached launch state, and the
Triton helpers more than one family calls. Imports nothing from the family files (no import circle).

Cached launch state: each public launcher keys its per-shape state (grid, constexprs, tile choices,
TMA descriptor templates) on everything its checks and Triton's specialization look at: shapes,
strides, dtypes, devices, 16-byte alignment of every pointer, and the other arguments (block sizes,
formats, output dtype). The tuning tables and FP8CONV_GEMM_* switches are read when a state is built:
after changing one, call clear_launch_state(). The first call with a key validates the arguments, builds the
state and launches through Triton's JIT (`kernel[grid](...)`), which compiles and returns the compiled
kernel; later calls with that key launch the compiled kernel directly (`CompiledKernel.run`, as the JIT
does after its own cache lookup), so they skip the JIT's argument binding, specialization and cache
key (most of fp8_gemm's host time per call, bench/NOTES.md). Under the interpreter, or with a Triton
launch hook set (profilers), every launch goes through the JIT.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from fp8conv.kernels.checks import (  # noqa: F401  (re-exported for the family files)
    FLOAT_DTYPES,
    FP8_DTYPES,
    align,
    check_block,
    check_out,
    check_scale_fmt,
    check_tensor,
    state_key,
    tensor_key,
)

# Compile options every launch passes. Floating-point contraction stays on, as the GPU tests measured
# it (the GEMMs' `acc += p * s` is one fma; the quantizers use explicit fma and no contractible
# pairs): Triton 3.9 warns that its default turns off in 3.10, and this pins it either way.
LAUNCH_OPTS = {"enable_fp_fusion": True}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Triton helpers shared by families
# ----------------------------------------------------------------------------------------------


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile number pid's (tile row, tile column) in grouped order: GROUP_M row tiles sweep the N tiles
    together, so B tiles stay in L2 (the Triton GEMMs and the persistent Gluon one)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_in = pid - group_id * num_in_group
    return first_m + pid_in % group_size, pid_in // group_size


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def desc_like(tmpl, base):
    """A copy of host tensor descriptor tmpl over base (same shape, strides, block and layout; the
    caller's launch-state key covers base's alignment), without the constructor's validation."""
    d = object.__new__(type(tmpl))
    d.__dict__.update(tmpl.__dict__)
    d.base = base
    return d


# ----------------------------------------------------------------------------------------------
# Cached launch state
# ----------------------------------------------------------------------------------------------

_STATE: dict = {}
# Bounds the cache; a process that sees more distinct keys than this starts over (rebuilding a state
# costs one JIT launch, not a compile).
STATE_LIMIT = 4096


def launch_state(key):
    """The state cached for key, or None."""
    return _STATE.get(key)


def store_state(key, state):
    if len(_STATE) >= STATE_LIMIT:
        _STATE.clear()
    _STATE[key] = state
    return state


def clear_launch_state() -> None:
    """Forget every cached launch state: needed after changing a tuning table or an FP8CONV_GEMM_*
    switch, which are read when a state is built."""
    _STATE.clear()


def launch_state_keys() -> list:
    return list(_STATE)


def _hook_set(hook) -> bool:
    # Triton 3.6 keeps each hook as a HookChain (empty by default), 3.9 as None or a callable
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else hook is not None


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)


def _hooks_set() -> bool:
    """Whether a Triton launch hook (a profiler's) is set: then every launch goes through the JIT,
    which calls it."""
    rt = _RUNTIME_KNOBS
    if rt is None:
        return False
    return _hook_set(getattr(rt, "launch_enter_hook", None)) or _hook_set(
        getattr(rt, "launch_exit_hook", None)
    )


_driver = None


def _active_driver():
    global _driver
    if _driver is None:
        from triton.runtime import driver

        _driver = driver.active
    return _driver


class Launch:
    """One kernel launch with its grid, constexprs and options fixed (one per key).

    Called with the kernel's runtime arguments, in the kernel's parameter order (constexprs come
    last in every fp8conv kernel). The first call goes through Triton's JIT; when that returns a
    compiled kernel whose parameters are the runtime arguments followed by these constexprs, later
    calls launch it directly."""

    __slots__ = ("fn", "grid", "constexprs", "options", "compiled", "device", "tail", "direct")

    # off-switch for the direct path, for tests and for a Triton whose CompiledKernel differs
    enabled = True

    def __init__(self, fn, grid: tuple, constexprs: dict, options: dict):
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs = constexprs
        self.options = options
        self.compiled = None
        self.device = None  # the current device the compiled kernel was loaded on
        self.tail = tuple(constexprs.values())
        self.direct = 0  # launches that took the direct path (tests read it)

    def __call__(self, *args) -> None:
        ck = self.compiled
        if ck is not None and Launch.enabled and not _hooks_set():
            drv = _active_driver()
            dev = drv.get_current_device()
            if dev != self.device:  # the JIT keeps one compiled kernel per current device
                self.fn[self.grid](*args, **self.constexprs, **self.options)
                return
            stream = drv.get_current_stream(dev)
            g0, g1, g2 = self.grid
            ck.run(g0, g1, g2, stream, ck.function, ck.packed_metadata, None, None, None, *args, *self.tail)
            self.direct += 1
            return
        ck = self.fn[self.grid](*args, **self.constexprs, **self.options)
        if self.compiled is None and not interpreting() and self._direct_ok(ck, len(args)):
            self.device = _active_driver().get_current_device()
            self.compiled = ck

    def _direct_ok(self, ck, n_args: int) -> bool:
        names = getattr(self.fn, "arg_names", None)
        if names is None or not all(hasattr(ck, a) for a in ("run", "function", "packed_metadata")):
            return False
        # runtime arguments first, then exactly these constexprs in this order
        return list(names) == list(names[:n_args]) + list(self.constexprs) and len(names) == n_args + len(
            self.constexprs
        )
