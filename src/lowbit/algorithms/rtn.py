"""Round-to-nearest weight quantization: each weight to its nearest grid point, no calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.qweight import QuantizedWeight, quantize_weight
from ..scheme import QuantArgs
from .registry import AlgorithmResult, GroupContext, register_algorithm


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no knobs: the grid is the scheme's (observer, clipping, granularity)."""


@torch.no_grad()
def rtn_weight(weight: torch.Tensor, args: QuantArgs) -> QuantizedWeight:
    """The RTN-quantized weight ([out, in], rows = output channels, groups along the input)."""
    return quantize_weight(weight, args)


@register_algorithm("rtn", RTNConfig)
def rtn(weight: torch.Tensor, stats: None, args: QuantArgs, config: RTNConfig, context: GroupContext) -> AlgorithmResult:
    return AlgorithmResult(rtn_weight(weight, args))
