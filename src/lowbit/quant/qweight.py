"""`QuantizedWeight`: a quantized weight as the value every algorithm produces.

It holds the codes (integers, or the bit patterns of a floating-point element format), the scales
(in the scheme's scale format), the offsets of an asymmetric grid, NVFP4's global scale and the
`QuantArgs` that produced them; `dequantize()` is ``value(code) * scale + zero`` (the scale divided
by the global scale), the same arithmetic as fake quantization, so
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
from .fake import SCALE_DTYPES, QParams, as_rows, compute_qparams, decode_values, encode_values, quantize_rows
from .packing import pack, packed_nbytes, signed_codes, unpack, unsigned_codes


@dataclass
class QuantizedWeight:
    # int16 [rows, cols]: integers (signed for symmetric, 0..2^N-1 for asymmetric), or the bit
    # patterns of a floating-point element format
    codes: torch.Tensor
    scale: torch.Tensor  # [rows, 1] in the scale format's dtype
    zero: torch.Tensor | None  # [rows, 1] in the scale format's dtype, asymmetric only
    shape: tuple[int, ...]  # the weight's shape ([out, in])
    args: QuantArgs
    # NVFP4: a float32 scalar dividing every block scale (448 * 6 / amax of the tensor, as NVIDIA's
    # recipe, compressed-tensors and vLLM store it)
    global_scale: torch.Tensor | None = None

    @classmethod
    def from_qparams(cls, values: torch.Tensor, qparams: QParams, shape, args: QuantArgs) -> QuantizedWeight:
        """From grid values (`quantize_rows`) and the (float32) parameters a quantizer chose; the
        scales are stored in the scale format."""
        dtype = SCALE_DTYPES[args.scale_format]
        zero = None if args.symmetric else qparams.zero.reshape(-1, 1).to(dtype)
        gs = qparams.global_scale
        if gs is not None:
            if gs.numel() != 1:
                raise ValueError("a weight has one global scale")
            gs = gs.float().reshape(())
        return cls(encode_values(values, args), qparams.scale.reshape(-1, 1).to(dtype), zero, tuple(shape), args, gs)

    @property
    def qparams(self) -> QParams:
        """The float32 scale and offset per row, and the global scale."""
        scale = self.scale.float()
        zero = self.zero.float() if self.zero is not None else torch.zeros_like(scale)
        return QParams(scale, zero, None if self.global_scale is None else self.global_scale.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qp = self.qparams
        values = decode_values(self.codes, self.args) * qp.step
        if self.zero is not None:  # symmetric: adding the zero offset would be a pass over the weight for nothing
            values = values + qp.zero
        return values.reshape(self.shape).to(dtype)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def packed(self) -> torch.Tensor:
        """The codes at their bit width, as a flat uint8 bit stream (`quant.packing`)."""
        if self.args.is_float:  # bit patterns are unsigned already
            return pack(self.codes.to(torch.uint8), self.args.bits)
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
        codes = unpack(packed, args.bits, count)
        codes = codes.to(torch.int16) if args.is_float else signed_codes(codes, args.bits, args.symmetric)
        return cls(
            codes.reshape(scale.numel(), -1), scale.reshape(-1, 1), None if zero is None else zero.reshape(-1, 1), tuple(shape), args, global_scale
        )

    def nbytes(self) -> int:
        """Bytes at rest: packed codes plus scales (and offsets) in their format."""
        return quantized_nbytes(self.codes.numel(), self.scale.numel(), self.args, 0 if self.global_scale is None else 1)

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
        (and offsets) are multiplied instead, then stored in the scale format again. Block formats
        (power-of-two or FP8 block scales) cannot hold an arbitrary product: the scaled weight is
        quantized again onto its format."""
        if self.args.granularity is Granularity.TENSOR:
            raise ValueError("a per-row factor cannot keep a per-tensor grid")
        if self.args.scale_format in ("e8m0", "float8_e4m3"):
            return quantize_weight(self.dequantize() * factor.float().reshape(-1, 1), self.args)
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


def quantized_nbytes(count: int, scales: int, args: QuantArgs, global_scales: int = 0) -> int:
    """Bytes of `count` values at their bit width with `scales` scales (and offsets, asymmetric)
    in the scale format, and `global_scales` float32 global scales (NVFP4): the one place sizes
    are accounted."""
    scale_bytes = torch.finfo(SCALE_DTYPES[args.scale_format]).bits // 8
    return packed_nbytes(count, args.bits) + scales * scale_bytes * (1 if args.symmetric else 2) + 4 * global_scales


def quantize_weight(weight: torch.Tensor, args: QuantArgs, qparams: QParams | None = None) -> QuantizedWeight:
    """Round-to-nearest onto the grid of `qparams` (per row as `as_rows` views the weight), or onto
    the grid the scheme's observer chooses from the weight itself."""
    rows = as_rows(weight.detach().float(), args)
    qp = qparams if qparams is not None else compute_qparams(rows, args)
    return QuantizedWeight.from_qparams(quantize_rows(rows, qp, args), qp, weight.shape, args)
