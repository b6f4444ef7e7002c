"""`QuantizedWeight`: a quantized weight as the value every algorithm produces.

It holds the integer codes, the scales (in the scheme's scale format), the offsets of an
asymmetric grid, an optional global scale and the `QuantArgs` that produced them; `dequantize()`
is ``code * scale + zero`` (times the global scale), the same arithmetic as fake quantization, so
a model that holds a `QuantizedWeight` computes exactly what lowbit evaluated. Saving, packing,
integer kernels, export and QAT's fixed grid read codes and scales from here: nothing is ever
recovered from float values.

Rows follow `as_rows`: one row per output channel (per-channel), per group of `group_size`
consecutive inputs (per-group, row-major) or a single row (per-tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..scheme import Granularity, QuantArgs
from .fake import SCALE_DTYPES, QParams, as_rows, compute_qparams, quantize_rows
from .packing import pack, packed_nbytes, signed_codes, unpack, unsigned_codes


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # int16 [rows, cols]: signed for symmetric, 0..2^N-1 for asymmetric
    scale: torch.Tensor  # [rows, 1] in the scale format's dtype
    zero: torch.Tensor | None  # [rows, 1] in the scale format's dtype, asymmetric only
    shape: tuple[int, ...]  # the weight's shape ([out, in])
    args: QuantArgs
    global_scale: torch.Tensor | None = None  # a float32 scalar multiplying every scale (two-level formats)

    @classmethod
    def from_qparams(cls, codes: torch.Tensor, qparams: QParams, shape, args: QuantArgs) -> QuantizedWeight:
        """From codes and the (float32) parameters a quantizer chose; they are stored in the scale format."""
        dtype = SCALE_DTYPES[args.scale_format]
        zero = None if args.symmetric else qparams.zero.reshape(-1, 1).to(dtype)
        return cls(codes.to(torch.int16), qparams.scale.reshape(-1, 1).to(dtype), zero, tuple(shape), args)

    @property
    def qparams(self) -> QParams:
        """The float32 scale and offset per row, the global scale applied."""
        scale = self.scale.float()
        if self.global_scale is not None:
            scale = scale * self.global_scale.float()
        zero = self.zero.float() if self.zero is not None else torch.zeros_like(scale)
        return QParams(scale, zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qp = self.qparams
        values = self.codes.float() * qp.scale
        if self.zero is not None:  # symmetric: adding the zero offset would be a pass over the weight for nothing
            values = values + qp.zero
        return values.reshape(self.shape).to(dtype)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def packed(self) -> torch.Tensor:
        """The codes at their bit width, as a flat uint8 bit stream (`quant.packing`)."""
        return pack(unsigned_codes(self.codes, self.args.bits, self.args.symmetric), self.args.bits)

    @classmethod
    def from_packed(
        cls,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        shape,
        args: QuantArgs,
        global_scale: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        count = int(torch.Size(shape).numel())
        codes = signed_codes(unpack(packed, args.bits, count), args.bits, args.symmetric)
        return cls(
            codes.reshape(scale.numel(), -1), scale.reshape(-1, 1), None if zero is None else zero.reshape(-1, 1), tuple(shape), args, global_scale
        )

    def nbytes(self) -> int:
        """Bytes at rest: packed codes plus scales (and offsets) in their format."""
        return quantized_nbytes(self.codes.numel(), self.scale.numel(), self.args) + (4 if self.global_scale is not None else 0)

    def _rows_per_output(self) -> int:
        return self.scale.numel() // self.out_features

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Split along the output dimension (a group's stacked linears back into each linear)."""
        if sum(sizes) != self.out_features:
            raise ValueError(f"sizes {sizes} do not add up to {self.out_features} output rows")
        cols = self.shape[1]
        if self.args.granularity is Granularity.TENSOR:  # one scale, shared by every part
            parts, start = [], 0
            codes = self.codes.reshape(self.shape)
            for n in sizes:
                parts.append(replace(self, codes=codes[start : start + n].reshape(1, -1), shape=(n, cols)))
                start += n
            return parts
        per = self._rows_per_output()
        bounds = [n * per for n in sizes]
        zero = self.zero.split(bounds) if self.zero is not None else [None] * len(sizes)
        return [
            replace(self, codes=c, scale=s, zero=z, shape=(n, cols))
            for c, s, z, n in zip(self.codes.split(bounds), self.scale.split(bounds), zero, sizes)
        ]

    def scale_output_rows(self, factor: torch.Tensor) -> QuantizedWeight:
        """The weight with output row r multiplied by factor[r], on the same codes: the row's scales
        (and offsets) are multiplied instead, then stored in the scale format again."""
        if self.args.granularity is Granularity.TENSOR:
            raise ValueError("a per-row factor cannot keep a per-tensor grid")
        f = factor.double().reshape(-1).repeat_interleave(self._rows_per_output()).reshape(-1, 1)
        dtype = SCALE_DTYPES[self.args.scale_format]
        scale = (self.scale.double() * f).to(dtype)
        zero = None if self.zero is None else (self.zero.double() * f).to(dtype)
        return replace(self, scale=scale, zero=zero)


def scale_count(rows: int, cols: int, args: QuantArgs) -> int:
    """Scales of a [rows, cols] tensor (rows: output channels or tokens; groups along cols)."""
    if args.granularity is Granularity.TENSOR:
        return 1
    if args.granularity is Granularity.GROUP:
        return rows * cols // args.group_size
    return rows


def quantized_nbytes(count: int, scales: int, args: QuantArgs) -> int:
    """Bytes of `count` values at their bit width with `scales` scales (and offsets, asymmetric)
    in the scale format: the one place sizes are accounted."""
    scale_bytes = torch.finfo(SCALE_DTYPES[args.scale_format]).bits // 8
    return packed_nbytes(count, args.bits) + scales * scale_bytes * (1 if args.symmetric else 2)


def quantize_weight(weight: torch.Tensor, args: QuantArgs, qparams: QParams | None = None) -> QuantizedWeight:
    """Round-to-nearest onto the grid of `qparams` (per row as `as_rows` views the weight), or onto
    the grid the scheme's observer chooses from the weight itself."""
    rows = as_rows(weight.detach().float(), args)
    qp = qparams if qparams is not None else compute_qparams(rows, args)
    return QuantizedWeight.from_qparams(quantize_rows(rows, qp, args), qp, weight.shape, args)
