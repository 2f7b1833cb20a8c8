"""`fp8conv verify` and `fp8conv inspect`: check and describe FP8 / dequantized checkpoints.

Modules, one job each: scan (read a folder, damage included), layouts (what each tensor is), context
(what checks see; the Check kinds), structure / numerics / compare (the checks), stream (tensor data
through the data checks), report (findings, JSON, renderer helpers), verify (the verifier), inspect.
"""

from fp8conv.verify.inspect import inspect_checkpoint
from fp8conv.verify.report import TensorRecord, VerifyReport, render_table, summary_line
from fp8conv.verify.verify import VerifyOptions, verify_checkpoint

__all__ = [
    "TensorRecord",
    "VerifyOptions",
    "VerifyReport",
    "inspect_checkpoint",
    "render_table",
    "summary_line",
    "verify_checkpoint",
]
