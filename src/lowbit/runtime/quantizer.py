"""`TensorQuantizer`: a module that fake-quantizes the tensors passing through it.

Dynamic quantizers compute scales from each input; static ones use a range observed during
calibration (`observing = True` records min/max and passes the input through unchanged).

With `fp_prefix` = N > 0 the first N tokens of every sequence pass through in full precision
(the attention sink; IntactKV, PrefixQuant) and only the rest is quantized and observed: a static
range, or a dynamic per-tensor scale, then comes from the ordinary tokens alone, which is the
point of PrefixQuant ("PrefixQuant: Eliminating Outliers by Prefixed Tokens for Large Language
Models Quantization"). Tokens lie along dim -2 (linear inputs [.., tokens, hidden], keys and
values [batch, heads, tokens, head_dim]); `forward(x, offset)` is told how many tokens of the
sequence come before x's first one (incremental decoding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import fake_quantize, range_qparams
from ..quant.fake import range_global_scale
from ..scheme import QuantArgs


class TensorQuantizer(nn.Module):
    def __init__(self, args: QuantArgs, fp_prefix: int = 0) -> None:
        super().__init__()
        self.args = args
        self.fp_prefix = fp_prefix  # leading tokens of each sequence kept in full precision
        self.observing = False
        if not args.dynamic:
            self.register_buffer("observed_min", torch.tensor(float("inf")))
            self.register_buffer("observed_max", torch.tensor(float("-inf")))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the calibrated range: static scales are float32
        kept = {name: self._buffers[name] for name in ("observed_min", "observed_max") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    @property
    def calibrated(self) -> bool:
        return self.args.dynamic or bool(torch.isfinite(self.observed_min))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """`x` fake-quantized; `offset`: how many tokens of the sequence precede x's first token."""
        kept = min(max(0, self.fp_prefix - offset), x.shape[-2]) if self.fp_prefix and x.dim() >= 2 else 0
        if not kept:
            return self._quantize(x)
        # Every granularity is per token or computed over the tokens given, so quantizing the rest
        # alone is exactly "quantize everything but the prefix"; the prefix takes no part in it.
        head, rest = x[..., :kept, :], x[..., kept:, :]
        if rest.shape[-2] == 0:
            return x
        return torch.cat((head, self._quantize(rest)), dim=-2)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.args.dynamic:
            return fake_quantize(x, self.args)
        if self.observing:
            with torch.no_grad():
                self.observed_min.copy_(torch.minimum(self.observed_min, x.detach().min().float()))
                self.observed_max.copy_(torch.maximum(self.observed_max, x.detach().max().float()))
            return x
        if not self.calibrated:
            raise RuntimeError("static quantizer used before calibration; run lowbit.calibrate_static first")
        if self.args.global_scale is not None:  # static NVFP4: a calibrated global scale, block scales from x
            return fake_quantize(x, self.args, global_scale=range_global_scale(self.observed_min, self.observed_max, self.args))
        return fake_quantize(x, self.args, range_qparams(self.observed_min, self.observed_max, self.args))

    def extra_repr(self) -> str:
        prefix = f", first {self.fp_prefix} tokens in full precision" if self.fp_prefix else ""
        return f"{self.args.name()}, {self.args.granularity.value}{prefix}"
