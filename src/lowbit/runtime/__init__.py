"""The quantized model at run time: quantized linears, KV-cache quantization."""

from .apply import calibrate_static, check_scheme, quantize_model
from .linear import QuantLinear
from .quantizer import TensorQuantizer

__all__ = ["QuantLinear", "TensorQuantizer", "calibrate_static", "check_scheme", "quantize_model"]
