"""Round-to-nearest weight quantization: each weight to its nearest grid point, no calibration."""

from __future__ import annotations

import torch

from ..quant import fake_quantize
from ..scheme import QuantArgs


@torch.no_grad()
def rtn_weight(weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The dequantized RTN weight ([out, in], rows = output channels, groups along the input)."""
    return fake_quantize(weight.detach(), args)
