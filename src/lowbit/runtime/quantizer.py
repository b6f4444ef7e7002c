"""`TensorQuantizer`: a module that fake-quantizes the tensors passing through it.

Dynamic quantizers compute scales from each input; static ones use a range observed during
calibration (`observing = True` records min/max and passes the input through unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import fake_quantize, range_qparams
from ..quant.fake import range_global_scale
from ..scheme import QuantArgs


class TensorQuantizer(nn.Module):
    def __init__(self, args: QuantArgs) -> None:
        super().__init__()
        self.args = args
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return f"{self.args.name()}, {self.args.granularity.value}"
