"""Scales, zero points and (fake) quantization as plain tensor functions.

MinMax quantizer of LLM-QAT (eq. 1-3): ``Q(x) = a * round((x - b) / a) + b`` with
symmetric ``a = max|x| / (2^(N-1) - 1), b = 0`` (or, with `full_range`, ``max|x| / (2^(N-1) - 1/2)``
as in the GPTQ reference code) or asymmetric ``a = (max x - min x) / (2^N - 1),
b = min x``. The range is shrunk by `clip_ratio`, or searched per row (`Observer.MSE`).

Every granularity is handled by viewing the tensor as rows that each share one scale:
per-tensor = one row, per-channel / per-token = one row per entry of the leading dims,
per-group = rows of `group_size` consecutive elements of the last dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..scheme import Granularity, Observer, QuantArgs

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MSE_GRID = 40  # ratios 1.0, 0.9875, ... down to 0.5125
MSE_MIN_RATIO = 0.5


@dataclass
class QParams:
    """Per-row scale and offset (`zero` is the float offset b of LLM-QAT; zero for symmetric)."""

    scale: torch.Tensor  # [rows, 1]
    zero: torch.Tensor  # [rows, 1]


def as_rows(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View `x` as [rows, cols] where each row shares one scale."""
    if args.granularity is Granularity.TENSOR:
        return x.reshape(1, -1)
    if args.granularity is Granularity.GROUP:
        if x.shape[-1] % args.group_size:
            raise UserError(f"group size {args.group_size} does not divide the last dimension {x.shape[-1]}; choose a divisor of {x.shape[-1]}")
        return x.reshape(-1, args.group_size)
    return x.reshape(-1, x.shape[-1])


def minmax_qparams(rows: torch.Tensor, args: QuantArgs, ratio: torch.Tensor | float | None = None) -> QParams:
    """Scales from the per-row range, shrunk by `ratio` (default `args.clip_ratio`)."""
    ratio = args.clip_ratio if ratio is None else ratio
    if args.symmetric:
        amax = rows.abs().amax(dim=1, keepdim=True) * ratio
        scale = amax / args.max_steps
        zero = torch.zeros_like(scale)
    else:
        lo = rows.amin(dim=1, keepdim=True) * ratio
        hi = rows.amax(dim=1, keepdim=True) * ratio
        scale = (hi - lo) / args.qmax
        zero = lo
    return in_scale_format(scale, zero, args)


def in_scale_format(scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> QParams:
    """Scales and offsets as the scale format stores them (float32 tensors holding values of that
    format), so that what lowbit computes is what a checkpoint with such scales computes. An
    all-zero (or constant) row gets scale 1: its values are then represented exactly."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if args.scale_format != "float32":
        dtype = SCALE_DTYPES[args.scale_format]
        info = torch.finfo(dtype)
        # a scale must stay positive and finite in the format: clamp before rounding
        scale = scale.clamp(info.tiny, info.max).to(dtype).float()
        zero = zero.clamp(-info.max, info.max).to(dtype).float()
    return QParams(scale, zero)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> QParams:
    """Scales from an observed range (static quantization), shrunk by `args.clip_ratio`."""
    lo = lo.reshape(-1, 1) * args.clip_ratio
    hi = hi.reshape(-1, 1) * args.clip_ratio
    if args.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / args.max_steps
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / args.qmax
        zero = lo
    return in_scale_format(scale, zero, args)


def mse_qparams(rows: torch.Tensor, args: QuantArgs) -> QParams:
    """Per-row clipping ratio from a grid that minimises the squared quantization error of the row."""
    best = minmax_qparams(rows, args, 1.0)
    best_err = (fake_rows(rows, best, args) - rows).pow(2).sum(dim=1, keepdim=True)
    for i in range(1, MSE_GRID):
        ratio = 1.0 - i * (1.0 - MSE_MIN_RATIO) / MSE_GRID
        cand = minmax_qparams(rows, args, ratio)
        err = (fake_rows(rows, cand, args) - rows).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, cand.scale, best.scale), torch.where(better, cand.zero, best.zero))
    return best


def compute_qparams(rows: torch.Tensor, args: QuantArgs) -> QParams:
    if args.observer is Observer.MSE:
        return mse_qparams(rows, args)
    return minmax_qparams(rows, args)


def quantize_rows(rows: torch.Tensor, qp: QParams, args: QuantArgs) -> torch.Tensor:
    """Integer codes (as a float tensor): signed for symmetric, 0..2^N-1 for asymmetric."""
    return torch.clamp(torch.round((rows - qp.zero) / qp.scale), args.qmin, args.qmax)


def dequantize_rows(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    return codes * qp.scale + qp.zero


def fake_rows(rows: torch.Tensor, qp: QParams, args: QuantArgs) -> torch.Tensor:
    return dequantize_rows(quantize_rows(rows, qp, args), qp)


def fake_quantize(x: torch.Tensor, args: QuantArgs, qparams: QParams | None = None) -> torch.Tensor:
    """Quantize and dequantize `x`; gradients pass straight through (STE: dQ(x)/dx = 1).

    With `qparams` (static quantization) those scales are used, otherwise they come from `x`.
    A scale that requires grad is learned (LSQ): see `learned_fake_quantize`.
    """
    if qparams is not None and qparams.scale.requires_grad:
        return learned_fake_quantize(x, args, qparams)
    rows = as_rows(x, args)
    with torch.no_grad():
        detached = rows.detach()
        qp = qparams if qparams is not None else compute_qparams(detached, args)
        q = fake_rows(detached, qp, args)
    out = q.reshape(x.shape).to(x.dtype)
    if x.requires_grad:
        out = x + (out - x).detach()
    return out


def learned_fake_quantize(x: torch.Tensor, args: QuantArgs, qparams: QParams) -> torch.Tensor:
    """Fake quantization whose scale learns too (LSQ, Esser et al. 2020): only the rounding is
    straight-through, so d/dscale = round(v) - v inside the range and the clamp bound outside,
    and values clamped at the range get no gradient. Same values as `fake_quantize`."""
    rows = as_rows(x, args)
    v = (rows - qparams.zero) / qparams.scale
    q = torch.clamp(v + (torch.round(v) - v).detach(), args.qmin, args.qmax)
    return (q * qparams.scale + qparams.zero).reshape(x.shape).to(x.dtype)


def quantize(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, QParams]:
    """Integer codes (int16 tensor shaped [rows, cols]) and their per-row parameters."""
    rows = as_rows(x.detach().float(), args)
    qp = compute_qparams(rows, args)
    return quantize_rows(rows, qp, args).to(torch.int16), qp


def dequantize(codes: torch.Tensor, qp: QParams, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_rows(codes.float(), qp).reshape(shape).to(dtype)
