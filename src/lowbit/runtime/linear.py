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

`compact()` holds the quantized weight at its bit width (packed codes, per-row scales) instead of
float values and dequantizes it in each forward: a W4 layer then takes an eighth of the memory.
The pipeline compacts each layer once it is done and `lowbit quantize` evaluates compacted, so
memory stays near one float layer; `expand()` (or `expand_weights(model)`) brings the float
weight back, bit for bit, for whatever edits or saves the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import fake_quantize
from ..memory import release_mapped_pages
from ..quant.codes import InexactCodesError, WeightCodes, encode_weight, exact_codes
from ..quant.fake import QParams, as_rows, compute_qparams
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
        self.codes: WeightCodes | None = None  # the weight while compacted (then `weight` is None)
        self._dense: tuple[torch.dtype, torch.device] | None = None  # the float weight's dtype and device

    @property
    def compacted(self) -> bool:
        return self.codes is not None

    @torch.no_grad()
    def compact(self) -> bool:
        """Hold the weight as packed integer codes; False (and nothing changes) where it cannot be:
        no weight quantization, a trainable latent weight, a non-CPU weight, values off the grid."""
        if self.codes is not None:
            return True
        if self.weight_args is None or self.trainable or self.weight.device.type != "cpu":
            return False
        try:
            codes = encode_weight(self.weight, self.weight_args)
        except InexactCodesError:
            return False
        dense, self._dense = self.weight, (self.weight.dtype, self.weight.device)
        self.codes, self.weight = codes, None
        release_mapped_pages(dense)  # a memory-mapped checkpoint's pages would stay resident otherwise
        return True

    @torch.no_grad()
    def expand(self) -> None:
        """Back to a float weight (bit-identical to the one compacted)."""
        if self.codes is not None:
            self.weight = nn.Parameter(self._dense_weight(), requires_grad=False)
            self.codes = None

    def _dense_weight(self) -> torch.Tensor:
        dtype, device = self._dense
        return self.codes.dequantize(self.weight_args).to(device=device, dtype=dtype)

    def _weight_grid(self) -> QParams | None:
        return None if self.weight_scale is None else QParams(self.weight_scale, self.weight_zero)

    def quantized_weight(self) -> torch.Tensor:
        if self.codes is not None:
            return self._dense_weight()
        if self.trainable and self.weight_args is not None:
            return fake_quantize(self.weight, self.weight_args, self._weight_grid())
        return self.weight

    @torch.no_grad()
    def train_on_fixed_grid(self) -> None:
        """Make the (already quantized) weight a trainable latent weight on its own grid: the scales
        and offsets that reproduce it exactly are kept fixed during training."""
        if self.weight_args is None:
            raise ValueError("this linear has no quantized weight to train")
        self.expand()
        _, scale, zero = exact_codes(self.weight, self.weight_args)
        self.weight_scale, self.weight_zero = scale.to(self.weight.device), zero.to(self.weight.device)
        self.trainable = True

    @torch.no_grad()
    def learn_weight_scale(self) -> None:
        """Train the per-row weight scales too (LSQ), starting from the grid in use: the fixed grid
        of a calibrated start, or the MinMax grid of the latent weight (so the function is unchanged)."""
        if not self.trainable or self.weight_args is None:
            raise ValueError("only a trainable quantized weight can learn its scales")
        if isinstance(self.weight_scale, nn.Parameter):
            return
        if self.weight_scale is None:
            qp = compute_qparams(as_rows(self.weight.detach().float(), self.weight_args), self.weight_args)
            self.weight_zero = qp.zero.to(self.weight.device)
            scale = qp.scale
        else:
            scale = self.weight_scale
        self.weight_scale = nn.Parameter(scale.detach().clone().to(self.weight.device))

    @property
    def learns_weight_scale(self) -> bool:
        return isinstance(self.weight_scale, nn.Parameter)

    @torch.no_grad()
    def freeze(self) -> None:
        """End training: keep the quantized weight (the latent one is dropped)."""
        self.expand()
        if self.trainable and self.weight_args is not None:
            grid = self._weight_grid()
            if grid is not None:
                grid = QParams(grid.scale.detach(), grid.zero)
            q = fake_quantize(self.weight.detach().float(), self.weight_args, grid)
            self.weight.copy_(q.to(self.weight.dtype))
        self.trainable = False
        self._parameters.pop("weight_scale", None)  # a learned scale is a parameter: back to a buffer
        self.register_buffer("weight_scale", None)
        self.weight_zero = None
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
        state = ", trainable" if self.trainable else ", compacted" if self.codes is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, W{w}A{a}{state}"


def compact_weights(module: nn.Module) -> int:
    """Compact every `QuantLinear` inside `module` that can be; returns how many were."""
    return sum(m.compact() for m in module.modules() if isinstance(m, QuantLinear))


def expand_weights(module: nn.Module) -> None:
    """Expand every compacted `QuantLinear` inside `module` back to a float weight."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.expand()
