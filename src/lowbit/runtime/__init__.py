"""The quantized model at run time (modules only): quantized linears, KV-cache quantization,
online rotations, integer kernels, and the quantization state a model carries."""

from .int_linear import Int4Linear, Int8Linear, convert_to_int_kernels
from .linear import QuantLinear
from .quantizer import TensorQuantizer
from .rotation import OnlineHadamard, OnlineRotation
from .state import QuantizationState, quantization_state

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "OnlineHadamard",
    "OnlineRotation",
    "QuantLinear",
    "QuantizationState",
    "TensorQuantizer",
    "convert_to_int_kernels",
    "quantization_state",
]
