"""`fp8conv verify` and `fp8conv inspect`: check and describe FP8 / dequantized checkpoints."""

from fp8conv.verify.inspect import inspect_checkpoint
from fp8conv.verify.verify import TensorRecord, VerifyOptions, VerifyReport, verify_checkpoint

__all__ = ["TensorRecord", "VerifyOptions", "VerifyReport", "inspect_checkpoint", "verify_checkpoint"]
