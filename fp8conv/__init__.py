"""fp8conv: convert large-model checkpoints between BF16 and block-scaled FP8, and verify them."""

from fp8conv.convert import (
    DequantizeOptions,
    QuantizeOptions,
    Summary,
    dequantize,
    plan_for_quantize,
    quantize,
)
from fp8conv.errors import Fp8convError

__version__ = "0.1.0"
__all__ = [
    "DequantizeOptions",
    "Fp8convError",
    "QuantizeOptions",
    "Summary",
    "dequantize",
    "plan_for_quantize",
    "quantize",
    "__version__",
]
