"""The quantized model at run time: quantized linears, KV-cache quantization, integer kernels."""

from .apply import calibrate_static, check_scheme, quantize_model
from .int_linear import Int4Linear, Int8Linear, convert_to_int_kernels
from .linear import QuantLinear, compact_weights, expand_weights
from .quantizer import TensorQuantizer

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "QuantLinear",
    "TensorQuantizer",
    "calibrate_static",
    "check_scheme",
    "compact_weights",
    "convert_to_int_kernels",
    "expand_weights",
    "quantize_model",
]
