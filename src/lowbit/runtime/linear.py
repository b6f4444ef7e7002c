"""`QuantLinear`: the module swapped in for each quantized `nn.Linear`.

It takes one of three forms:

- quantized: it holds a `QuantizedWeight` (packed codes, scales in their format, offsets) as
  buffers and dequantizes it in each forward, so a W4 layer takes an eighth of the memory of its
  float weight and computes exactly what was evaluated and saved;
- float: `weight` is a plain parameter (activation-only schemes, or a transform's wrapper that
  only rotates its input);
- trainable (quantization-aware training): `weight` is the full-precision latent weight,
  fake-quantized in every forward with the straight-through estimator, on MinMax scales
  recomputed each step (LLM-QAT) or on a fixed grid (`weight_scale`, `weight_zero`) taken from a
  calibrated start (`train_on_fixed_grid`), optionally learned (`learn_weight_scale`, LSQ);
  `freeze()` quantizes the latent weight onto its grid and returns to the quantized form.

Each form may also rotate its input online (an equivalent transformation whose inverse is
already in the weight) and quantize its input activations.

Dequantizing in every forward keeps memory at the codes' size but costs a pass over the weight
per call, which dominates short inputs (token-by-token decoding, many small task requests). Inside
`dense_weights_cached(model)` each quantized linear keeps the weight it dequantized (the same
values, recomputed from the codes) until the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import fake_quantize
from ..quant.fake import QParams, as_rows, at_least_float32, compute_qparams, in_scale_format
from ..quant.qweight import QuantizedWeight, quantize_weight
from ..scheme import QuantArgs
from .prefix import token_offset
from .quantizer import TensorQuantizer

CODES, SCALE, ZERO, GLOBAL_SCALE = "weight_codes", "weight_scale", "weight_zero", "weight_global_scale"
QUANTIZED_BUFFERS = (CODES, SCALE, ZERO, GLOBAL_SCALE)


class QuantLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor | QuantizedWeight,
        bias: torch.Tensor | None,
        weight_args: QuantArgs | None = None,
        input_args: QuantArgs | None = None,
        input_rotation: nn.Module | None = None,
        trainable: bool = False,
        fp_prefix: int = 0,
    ) -> None:
        """`weight` is a `QuantizedWeight` (the quantized form), or a float tensor: with
        `weight_args` and `trainable` the latent weight of QAT, without `weight_args` a float weight.
        `fp_prefix`: the first tokens of each sequence whose inputs stay in full precision."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_rotation = input_rotation
        self.input_quant = TensorQuantizer(input_args, fp_prefix) if input_args is not None else None
        self.trainable = False
        self.cache_dense = False  # keep the dequantized weight between forwards (dense_weights_cached)
        self._dense_cache: torch.Tensor | None = None
        for name in QUANTIZED_BUFFERS:
            self.register_buffer(name, None)
        self.weight_args: QuantArgs | None = None
        if isinstance(weight, QuantizedWeight):
            if weight_args is not None and weight_args != weight.args:
                raise ValueError("weight_args differ from the QuantizedWeight's own arguments")
            self.weight = None
            self.set_quantized_weight(weight)
        else:
            if weight_args is not None and not trainable:
                raise ValueError("a float weight with weight_args must be trainable; quantize it to a QuantizedWeight instead")
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares `weight`'s storage
            self.weight_args = weight_args
            self.trainable = trainable

    # ------------------------------------------------------------------ forms

    @property
    def is_quantized(self) -> bool:
        """Holds a `QuantizedWeight` (codes and scales), not a float weight."""
        return getattr(self, CODES) is not None

    @property
    def quantized_weight(self) -> QuantizedWeight:
        if not self.is_quantized:
            raise ValueError("this linear holds no quantized weight (a float or a trainable latent weight)")
        return QuantizedWeight.from_packed(
            getattr(self, CODES),
            getattr(self, SCALE),
            getattr(self, ZERO),
            (self.out_features, self.in_features),
            self.weight_args,
            getattr(self, GLOBAL_SCALE),
        )

    @torch.no_grad()
    def set_quantized_weight(self, qweight: QuantizedWeight) -> None:
        """Hold `qweight` (any float or latent weight is dropped)."""
        if tuple(qweight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of shape {qweight.shape} for a {self.out_features}x{self.in_features} linear")
        device = self.bias.device if self.bias is not None else qweight.scale.device
        self._dense_cache = None
        self.weight = None
        self.weight_args = qweight.args
        self.trainable = False
        self._set_buffer(CODES, qweight.packed().to(device))
        self._set_buffer(SCALE, qweight.scale.reshape(-1).to(device))
        self._set_buffer(ZERO, None if qweight.zero is None else qweight.zero.reshape(-1).to(device))
        gs = qweight.global_scale
        self._set_buffer(GLOBAL_SCALE, None if gs is None else gs.reshape(()).to(device))

    def _set_buffer(self, name: str, value: torch.Tensor | None) -> None:
        self._parameters.pop(name, None)  # a learned scale was a parameter
        self._buffers.pop(name, None)
        self.register_buffer(name, value)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the forward uses it: dequantized codes, the (fake-quantized) latent weight
        while training, or the float weight. Quantized forms come out in `dtype` (float32 default)."""
        if self.is_quantized:
            dtype = dtype or torch.float32
            if not self.cache_dense:
                return self.quantized_weight.dequantize(dtype)
            cached = self._dense_cache
            if cached is None or cached.dtype != dtype or cached.device != self.weight_codes.device:
                cached = self._dense_cache = self.quantized_weight.dequantize(dtype)
            return cached
        if self.trainable and self.weight_args is not None:
            weight = fake_quantize(self.weight, self.weight_args, self._weight_grid())
        else:
            weight = self.weight
        return weight if dtype is None else weight.to(dtype)

    def _weight_grid(self) -> QParams | None:
        scale = getattr(self, SCALE)
        return None if scale is None else QParams(scale, getattr(self, ZERO), getattr(self, GLOBAL_SCALE))

    def _apply(self, fn, recurse=True):
        # A dtype change (model.to(torch.bfloat16)) must not round the stored scales: they keep their
        # own number format and only follow the module's device.
        self._dense_cache = None
        kept = {name: self._buffers[name] for name in (SCALE, ZERO, GLOBAL_SCALE) if self.is_quantized and self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    # ------------------------------------------------------------------ QAT

    @torch.no_grad()
    def train_on_fixed_grid(self) -> None:
        """Make the quantized weight a trainable latent weight on its own grid: its scales and
        offsets stay fixed during training, so training starts exactly from the quantized model."""
        qweight = self.quantized_weight
        qp = qweight.qparams
        self.set_latent_weight(qweight.dequantize(), qweight.args)
        self._set_buffer(SCALE, qp.scale.to(self.weight.device))
        self._set_buffer(ZERO, qp.zero.to(self.weight.device))
        self._set_buffer(GLOBAL_SCALE, None if qp.global_scale is None else qp.global_scale.to(self.weight.device))

    @torch.no_grad()
    def set_latent_weight(self, weight: torch.Tensor, args: QuantArgs) -> None:
        """Train a full-precision latent weight, fake-quantized with `args` on a MinMax grid."""
        for name in QUANTIZED_BUFFERS:
            self._set_buffer(name, None)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.weight_args = args
        self.trainable = True

    @torch.no_grad()
    def learn_weight_scale(self) -> None:
        """Train the per-row weight scales too (LSQ), starting from the grid in use: the fixed grid
        of a calibrated start, or the MinMax grid of the latent weight (so the function is unchanged)."""
        if not self.trainable or self.weight_args is None:
            raise ValueError("only a trainable quantized weight can learn its scales")
        if self.learns_weight_scale:
            return
        scale = getattr(self, SCALE)
        if scale is None:
            qp = compute_qparams(as_rows(self.weight.detach().float(), self.weight_args), self.weight_args)
            self._set_buffer(ZERO, qp.zero.to(self.weight.device))
            self._set_buffer(GLOBAL_SCALE, None if qp.global_scale is None else qp.global_scale.to(self.weight.device))
            scale = qp.scale
        self._buffers.pop(SCALE, None)
        self.weight_scale = nn.Parameter(scale.detach().clone().to(self.weight.device))

    @property
    def learns_weight_scale(self) -> bool:
        return isinstance(self._parameters.get(SCALE), nn.Parameter)

    @torch.no_grad()
    def freeze(self) -> None:
        """End training: quantize the latent weight onto its grid (the latent weight is dropped)."""
        if not self.trainable:
            return
        grid = self._weight_grid()
        if grid is not None:  # a learned scale is stored in the scale format like any other
            stored = in_scale_format(grid.scale.detach().float(), grid.zero.float(), self.weight_args)
            grid = QParams(stored.scale, stored.zero, grid.global_scale)
        self.set_quantized_weight(quantize_weight(self.weight.detach().float(), self.weight_args, grid))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.input_quant is not None:
            offset = token_offset() if self.input_quant.fp_prefix else 0  # tokens before x's (incremental decoding)
            wide = at_least_float32(x)
            if wide is not x and self.is_quantized:
                # quantized activations times quantized weights in a bfloat16 / float16 model: serving
                # engines multiply the codes exactly (int8 / FP8 GEMMs accumulate in int32 / float32)
                # and scale in float32, and only the output takes the model's dtype
                bias = None if self.bias is None else self.bias.float()
                return F.linear(self.input_quant(wide, offset), self.dense_weight(torch.float32), bias).to(x.dtype)
            x = self.input_quant(x, offset)
        weight = self.dense_weight(x.dtype) if self.is_quantized else self.dense_weight()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_args.name() if self.weight_args else "16"
        a = self.input_quant.args.name() if self.input_quant else "16"
        state = ", trainable" if self.trainable else ", codes" if self.is_quantized else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, W{w}A{a}{state}"


def drop_dense_caches(module: nn.Module) -> None:
    """Stop caching dequantized weights in every `QuantLinear` of `module` and free the caches."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.cache_dense, m._dense_cache = False, None


@contextlib.contextmanager
def dense_weights_cached(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, quantized linears dequantize their codes once and reuse the result (the
    memory of a float copy, for the speed of short inputs); outside it they hold codes only."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.cache_dense = True
    try:
        yield module
    finally:
        drop_dense_caches(module)
