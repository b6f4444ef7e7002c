"""Quantizer math: scales and zero points, fake quantization with a straight-through estimator,
integer packing, and the `QuantizedWeight` value. Tensors in, tensors out; nothing here knows
about models."""

from .fake import (
    QParams,
    as_rows,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    range_qparams,
)
from .packing import pack, packed_nbytes, signed_codes, unpack, unsigned_codes
from .qweight import QuantizedWeight, quantize_weight

__all__ = [
    "QParams",
    "QuantizedWeight",
    "as_rows",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "pack",
    "packed_nbytes",
    "quantize",
    "quantize_weight",
    "range_qparams",
    "signed_codes",
    "unpack",
    "unsigned_codes",
]
