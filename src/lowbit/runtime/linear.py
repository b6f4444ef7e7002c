"""`QuantLinear`: the module swapped in for each quantized `nn.Linear`.

It holds the weight after weight quantization (dequantized, so any matmul runs it), an optional
online rotation of its input (an equivalent transformation whose inverse is already in the
weight) and a quantizer for its input activations. The original `nn.Linear` is not kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..scheme import QuantArgs
from .quantizer import TensorQuantizer


class QuantLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_args: QuantArgs | None,
        input_args: QuantArgs | None,
        input_rotation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)  # shares `weight`'s storage
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.weight_args = weight_args
        self.input_rotation = input_rotation
        self.input_quant = TensorQuantizer(input_args) if input_args is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_args.name() if self.weight_args else "16"
        a = self.input_quant.args.name() if self.input_quant else "16"
        return f"in_features={self.in_features}, out_features={self.out_features}, W{w}A{a}"
