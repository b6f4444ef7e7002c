"""Quantizer math: scales and zero points, fake quantization with a straight-through estimator,
integer packing. Tensors in, tensors out; nothing here knows about models."""

from .fake import QParams, as_rows, compute_qparams, dequantize, fake_quantize, quantize, range_qparams
from .packing import pack, packed_nbytes, signed_codes, unpack, unsigned_codes

__all__ = [
    "QParams",
    "as_rows",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
    "range_qparams",
    "pack",
    "packed_nbytes",
    "signed_codes",
    "unpack",
    "unsigned_codes",
]
