"""fp8conv: convert large-model checkpoints between BF16 and block-scaled FP8, and verify them.

    import fp8conv
    plan = fp8conv.quantize("ckpt", options=fp8conv.QuantizeOptions(dry_run=True))  # writes nothing
    summary = fp8conv.quantize("ckpt")            # -> ckpt-fp8/, a tqdm bar (progress=False: none)
    report = fp8conv.verify("ckpt-fp8", reference="ckpt")
    info = fp8conv.inspect("ckpt-fp8")

Sources are folders, Hugging Face cache snapshots or repo ids (`org/name`, `org/name@rev`).
`import fp8conv` is light: torch is imported when a conversion, check or kernel first needs it.
"""

from __future__ import annotations

import os
import sys
import types
from typing import TYPE_CHECKING, Any

from fp8conv.convert import (
    DequantizeOptions,
    QuantizeOptions,
    dequantize,
    plan_for_dequantize,
    plan_for_quantize,
    quantize,
)
from fp8conv.errors import Fp8convError

if TYPE_CHECKING:
    from fp8conv.convert.engine import Summary
    from fp8conv.convert.plan import Plan
    from fp8conv.verify.verify import VerifyOptions, VerifyReport

__version__ = "0.1.0"

# Version of the JSON documents the CLI writes (--json) and the dicts the API returns for them;
# bumped when a field changes meaning or goes away (adding a field does not bump it). docs/api.md.
JSON_SCHEMA_VERSION = 1

__all__ = [
    "JSON_SCHEMA_VERSION",
    "DequantizeOptions",
    "Fp8convError",
    "Plan",
    "QuantizeOptions",
    "Summary",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
    "dequantize",
    "inspect",
    "plan_for_dequantize",
    "plan_for_quantize",
    "quantize",
    "verify",
]


def _verify(
    ckpt: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = None,
    options: VerifyOptions | None = None,
    progress: Any = True,
    *,
    revision: str | None = None,
    **option_fields: Any,
) -> VerifyReport:
    """Check an FP8 or dequantized checkpoint (a folder, cache snapshot or repo id).

    reference: the source it was made from (bf16 for an FP8 checkpoint, FP8 for a dequantized one).
    Other keyword arguments are VerifyOptions fields (tensors, sample, rows, seed, min_sqnr,
    experts, device); or pass a whole `options`. progress: True for a tqdm bar, False for none.
    Returns the VerifyReport (`report.ok`, `report.failures`, `report.to_dict()`); a failed check
    is reported, not raised. Raises fp8conv.errors types for what is not a checkpoint at all.
    """
    import dataclasses

    from fp8conv.checkpoint.source import resolve_source
    from fp8conv.convert import _progress
    from fp8conv.verify.verify import VerifyOptions, verify_checkpoint

    if reference is not None:
        option_fields["reference"] = resolve_source(reference)
    opts = dataclasses.replace(options or VerifyOptions(), **option_fields)
    return verify_checkpoint(resolve_source(ckpt, revision), opts, _progress(progress, "verify"))


def inspect(ckpt: str | os.PathLike[str], progress: Any = False, *, revision: str | None = None) -> dict:
    """Describe a checkpoint (a folder, cache snapshot or repo id): format, quantization config,
    shards, tensors by dtype and role, and anything odd, as a JSON-ready dict (docs/verify.md).
    progress: True for a tqdm bar (where the inspection reports progress), False for none."""
    from inspect import signature

    from fp8conv.checkpoint.source import resolve_source
    from fp8conv.convert import _progress
    from fp8conv.verify.inspect import inspect_checkpoint

    path = resolve_source(ckpt, revision)
    if "progress" in signature(inspect_checkpoint).parameters:
        return inspect_checkpoint(path, progress=_progress(progress, "inspect"))
    return inspect_checkpoint(path)


class _CallableModule(types.ModuleType):
    """`fp8conv.verify` is both the subpackage (fp8conv.verify.verify_checkpoint, ...) and a
    function: calling the module runs `_verify`. A plain function named `verify` here would be
    replaced by the subpackage the first time anything imports `fp8conv.verify.<module>`."""

    def __call__(self, *args: Any, **kwargs: Any) -> VerifyReport:
        return _verify(*args, **kwargs)

    __call__.__doc__ = _verify.__doc__


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system sets `fp8conv.verify` when the subpackage loads: make it callable then.
        if name == "verify" and isinstance(value, types.ModuleType):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "verify":
            import fp8conv.verify as v  # the import makes it callable (above)

            return v
        if name in ("Summary", "Plan"):
            from fp8conv import convert

            return getattr(convert, name)
        if name in ("VerifyOptions", "VerifyReport"):
            from fp8conv.verify import verify as v

            return getattr(v, name)
        raise AttributeError(f"module 'fp8conv' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
