"""`QuantLinear`: the module swapped in for each quantized `nn.Linear`.

It holds the weight after weight quantization (dequantized, so any matmul runs it), an optional
online rotation of its input (an equivalent transformation whose inverse is already in the
weight) and a quantizer for its input activations. The original `nn.Linear` is not kept.

For quantization-aware training (`trainable=True`) the weight is instead the full-precision
latent weight, fake-quantized in every forward with the straight-through estimator, so the
optimizer updates the latent weight while the forward sees only quantized values; `freeze()`
writes the quantized weight back and returns to the plain quantized form. Starting from a
calibrated result (GPTQ, AWQ), `train_on_fixed_grid()` keeps the algorithm's own scales: the
latent weight starts at the quantized weight and is re-quantized on that fixed grid, so training
starts exactly from the PTQ model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import fake_quantize
from ..quant.codes import exact_codes
from ..quant.fake import QParams
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
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)  # shares `weight`'s storage
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.weight_args = weight_args
        self.input_rotation = input_rotation
        self.input_quant = TensorQuantizer(input_args) if input_args is not None else None
        self.trainable = trainable
        # fixed per-row weight grid for QAT from a calibrated start (None: MinMax of the latent weight)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero", None)

    def _weight_grid(self) -> QParams | None:
        return None if self.weight_scale is None else QParams(self.weight_scale, self.weight_zero)

    def quantized_weight(self) -> torch.Tensor:
        if self.trainable and self.weight_args is not None:
            return fake_quantize(self.weight, self.weight_args, self._weight_grid())
        return self.weight

    @torch.no_grad()
    def train_on_fixed_grid(self) -> None:
        """Make the (already quantized) weight a trainable latent weight on its own grid: the scales
        and offsets that reproduce it exactly are kept fixed during training."""
        if self.weight_args is None:
            raise ValueError("this linear has no quantized weight to train")
        _, scale, zero = exact_codes(self.weight, self.weight_args)
        self.weight_scale, self.weight_zero = scale.to(self.weight.device), zero.to(self.weight.device)
        self.trainable = True

    @torch.no_grad()
    def freeze(self) -> None:
        """End training: keep the quantized weight (the latent one is dropped)."""
        if self.trainable and self.weight_args is not None:
            q = fake_quantize(self.weight.detach().float(), self.weight_args, self._weight_grid())
            self.weight.copy_(q.to(self.weight.dtype))
        self.trainable = False
        self.weight_scale = self.weight_zero = None
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        w = self.weight_args.name() if self.weight_args else "16"
        a = self.input_quant.args.name() if self.input_quant else "16"
        latent = ", trainable" if self.trainable else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, W{w}A{a}{latent}"
