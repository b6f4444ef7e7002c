"""Scales, zero points and (fake) quantization as plain tensor functions.

MinMax quantizer of LLM-QAT (eq. 1-3): ``Q(x) = a * round((x - b) / a) + b`` with
symmetric ``a = max|x| / (2^(N-1) - 1), b = 0`` (or, with `full_range`, ``max|x| / (2^(N-1) - 1/2)``
as in the GPTQ reference code) or asymmetric ``a = (max x - min x) / (2^N - 1),
b = min x``. The range is shrunk by `clip_ratio`, or searched per row (`Observer.MSE`).

Floating-point elements (`quant.formats`) use the same rows: the scale maps the row's largest
magnitude to the element format's largest value (FP8 per channel / token / group), or is the
block scale of a microscaling format (MX: a power of two by the OCP MX specification; NVFP4: an
FP8 E4M3 scale under a float32 global scale, by NVIDIA's recipe), and values round to the nearest
element, ties to even, saturating.

Every granularity is handled by viewing the tensor as rows that each share one scale:
per-tensor = one row, per-channel / per-token = one row per entry of the leading dims,
per-group = rows of `group_size` consecutive elements of the last dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..scheme import Granularity, Observer, QuantArgs
from .formats import FLOAT_ELEMENTS, FP8_E4M3, e8m0_scale, round_e8m0

SCALE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3": torch.float8_e4m3fn,
    "e8m0": torch.float8_e8m0fnu,
}
# The MSE observer: ratios 1.0, 0.99, ... 0.81 of the range, the one with the least sum |error|^2.4
# per row: llm-compressor's MSE observer's grid (steps of 1/100, shrinking by up to 0.2) and GPTQ's
# reference quantizer's norm, searched to the end (no early stop). Measured on SmolLM2-135M W4 per
# channel, RTN, 3 WikiText-2 windows: minmax 58.7; ratios down to 0.5 with squared error 79.1
# (outlier weights clipped away); down to 0.8: norm 2 48.6, 2.4 46.4, 3 43.6 (benchmarks/compare
# has the full comparison with GPTQ). With steps of 1/200 (40 candidates)
# the recommended w4a16 quantized in 163 s, with 1/100 in 155 s (benchmarks/compare, 2 commits apart).
MSE_GRID = 20
MSE_MIN_RATIO = 0.8
MSE_NORM = 2.4
# MX scales are powers of two: the candidates are the specification's exponent and its neighbours
# (one up never saturates the block's maximum; one down trades it for a finer step)
MX_MSE_RATIOS = (1.0, 2.0, 0.5)
NVFP4_MIN_BLOCK_SCALE = 2.0**-9  # the smallest positive E4M3 value: a block scale never rounds to 0


@dataclass
class QParams:
    """Per-row scale and offset (`zero` is the float offset b of LLM-QAT; zero for symmetric).
    NVFP4 adds the global scale the block scales are relative to: the step is scale / global_scale
    (the convention of NVIDIA's recipe, compressed-tensors and vLLM)."""

    scale: torch.Tensor  # [rows, 1]
    zero: torch.Tensor  # [rows, 1]
    global_scale: torch.Tensor | None = None  # a scalar, or [rows, 1] (per token)

    @property
    def step(self) -> torch.Tensor:
        """The value of one unit of the element grid, per row."""
        return self.scale if self.global_scale is None else self.scale / self.global_scale


def as_rows(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View `x` as [rows, cols] where each row shares one scale."""
    if args.granularity is Granularity.TENSOR:
        return x.reshape(1, -1)
    if args.granularity is Granularity.GROUP:
        if x.shape[-1] % args.group_size:
            raise UserError(f"group size {args.group_size} does not divide the last dimension {x.shape[-1]}; choose a divisor of {x.shape[-1]}")
        return x.reshape(-1, args.group_size)
    return x.reshape(-1, x.shape[-1])


def row_range(rows: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's range as `minmax_qparams` reads it: its largest magnitude (symmetric grids and
    floating-point elements) and None, or its minimum and maximum."""
    if args.is_float:
        return rows.abs().amax(dim=1, keepdim=True), None
    if args.symmetric:  # amin and amax: no |rows| copy, and 3x faster than torch.aminmax's one pass on CPU
        return torch.maximum(-rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)), None
    return rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)


def minmax_qparams(
    rows: torch.Tensor,
    args: QuantArgs,
    ratio: torch.Tensor | float | None = None,
    global_scale: torch.Tensor | None = None,
    span: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> QParams:
    """Scales from the per-row range (`span`, default `row_range(rows, args)`), shrunk by `ratio`
    (default `args.clip_ratio`). NVFP4's global scale is `global_scale`, or the one of all of
    `rows` (a weight: one per tensor), never clipped."""
    ratio = args.clip_ratio if ratio is None else ratio
    low, high = span if span is not None else row_range(rows, args)
    if args.is_float:
        return float_qparams(low * ratio, args, global_scale if global_scale is not None else _global_of(rows, args))
    if args.symmetric:
        scale = low * ratio / args.max_steps
        zero = torch.zeros_like(scale)
    else:
        lo = low * ratio
        hi = high * ratio
        scale = (hi - lo) / args.qmax
        zero = lo
    return in_scale_format(scale, zero, args)


def float_qparams(amax: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None) -> QParams:
    """Scales of floating-point elements from each row's largest magnitude `amax` [rows, 1]."""
    element = FLOAT_ELEMENTS[args.element]
    zero = torch.zeros_like(amax)
    if args.scale_format == "e8m0":
        return QParams(e8m0_scale(amax, element), zero)
    if args.scale_format == "float8_e4m3":
        # NVIDIA's published NVFP4 recipe ("Pretraining Large Language Models with NVFP4"; what
        # compressed-tensors and vLLM implement): the block scale amax / 6 times the global scale,
        # rounded to E4M3
        scale = FP8_E4M3.round(amax / element.max * global_scale)
        return QParams(torch.where(scale > 0, scale, torch.full_like(scale, NVFP4_MIN_BLOCK_SCALE)), zero, global_scale)
    return in_scale_format(amax / element.max, zero, args)


def nvfp4_global_scale(amax: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """NVFP4's global scale, 448 * 6 / amax (NVIDIA's recipe: it maps the largest block scale onto the
    largest E4M3 value); an all-zero tensor gets 1."""
    element = FLOAT_ELEMENTS[args.element]
    amax = amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = FP8_E4M3.max * element.max / amax
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))


def _global_of(rows: torch.Tensor, args: QuantArgs) -> torch.Tensor | None:
    """The global scale of all of `rows` as one tensor (None for formats without one)."""
    return nvfp4_global_scale(rows.abs().amax(), args) if args.global_scale is not None else None


def global_scales(x: torch.Tensor, args: QuantArgs) -> torch.Tensor | None:
    """NVFP4's global scale for `x`: per tensor (a scalar), or per token ([rows, 1] matching `as_rows`,
    each token's blocks sharing its token's scale)."""
    if args.global_scale != "token":
        return _global_of(x, args)
    per_token = nvfp4_global_scale(x.abs().amax(dim=-1).reshape(-1, 1), args)
    return per_token.repeat_interleave(x.shape[-1] // args.group_size, dim=0)


def in_scale_format(scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> QParams:
    """Scales and offsets as the scale format stores them (float32 tensors holding values of that
    format), so that what lowbit computes is what a checkpoint with such scales computes. An
    all-zero (or constant) row gets scale 1: its values are then represented exactly."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if args.scale_format == "e8m0":
        return QParams(round_e8m0(scale), zero)
    if args.scale_format == "float8_e4m3":
        return QParams(FP8_E4M3.round(scale).clamp(min=NVFP4_MIN_BLOCK_SCALE), zero)
    if args.scale_format != "float32":
        dtype = SCALE_DTYPES[args.scale_format]
        info = torch.finfo(dtype)
        # a scale must stay positive and finite in the format: clamp before rounding
        scale = scale.clamp(info.tiny, info.max).to(dtype).float()
        zero = zero.clamp(-info.max, info.max).to(dtype).float()
    return QParams(scale, zero)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> QParams:
    """Scales from an observed range (static quantization), shrunk by `args.clip_ratio`. For static
    NVFP4 only the global scale is calibrated (the block scales come from each block): see
    `range_global_scale`."""
    lo = lo.reshape(-1, 1) * args.clip_ratio
    hi = hi.reshape(-1, 1) * args.clip_ratio
    if args.granularity is not Granularity.TENSOR:
        raise ValueError(f"{args.name()}: only per-tensor scales are calibrated")
    if args.is_float:
        return float_qparams(torch.maximum(lo.abs(), hi.abs()), args)
    if args.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / args.max_steps
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / args.qmax
        zero = lo
    return in_scale_format(scale, zero, args)


def range_global_scale(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Static NVFP4: the global scale of an observed range (shrunk by `args.clip_ratio`)."""
    return nvfp4_global_scale(torch.maximum(lo.abs(), hi.abs()) * args.clip_ratio, args)


def mse_ratios(args: QuantArgs) -> list[float]:
    """Candidate range ratios of the MSE observer, the MinMax range first."""
    if args.scale_format == "e8m0":
        return list(MX_MSE_RATIOS)
    return [1.0 - i * (1.0 - MSE_MIN_RATIO) / MSE_GRID for i in range(MSE_GRID)]


def mse_qparams(rows: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None) -> QParams:
    """Per-row range ratio from a grid that minimises the row's sum of |quantization error|^MSE_NORM
    (for NVFP4 the block scales are searched under a fixed global scale)."""
    if global_scale is None:
        global_scale = _global_of(rows, args)
    best = best_err = None
    span = row_range(rows, args)  # the same for every candidate
    for ratio in mse_ratios(args):
        cand = minmax_qparams(rows, args, ratio, global_scale, span)
        err = (fake_rows(rows, cand, args) - rows).abs_().pow_(MSE_NORM).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = cand, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, cand.scale, best.scale), torch.where(better, cand.zero, best.zero), best.global_scale)
    return best


def compute_qparams(rows: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None) -> QParams:
    """The scheme observer's scales for `rows`; NVFP4's global scale is `global_scale`, or the one of
    all of `rows`."""
    if args.observer is Observer.MSE:
        return mse_qparams(rows, args, global_scale)
    return minmax_qparams(rows, args, global_scale=global_scale)


def quantize_rows(rows: torch.Tensor, qp: QParams, args: QuantArgs) -> torch.Tensor:
    """Values on the element grid (as a float tensor): integer codes, signed for symmetric and
    0..2^N-1 for asymmetric, or the element format's values (`quant.formats`)."""
    if args.is_float:
        return FLOAT_ELEMENTS[args.element].round(rows / qp.step)
    # symmetric offsets are zero: subtracting them would be a pass over the tensor for nothing
    scaled = rows / qp.scale if args.symmetric else (rows - qp.zero) / qp.scale
    return scaled.round_().clamp_(args.qmin, args.qmax)


def dequantize_rows(values: torch.Tensor, qp: QParams) -> torch.Tensor:
    return values * qp.step + qp.zero


def fake_rows(rows: torch.Tensor, qp: QParams, args: QuantArgs) -> torch.Tensor:
    if args.symmetric:  # the offset is zero: adding it would be a pass over the tensor for nothing
        return quantize_rows(rows, qp, args) * qp.step
    return dequantize_rows(quantize_rows(rows, qp, args), qp)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is a narrower float (bfloat16, float16); float32 and float64 as they are."""
    return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


def fake_quantize(x: torch.Tensor, args: QuantArgs, qparams: QParams | None = None, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize `x`; gradients pass straight through (STE: dQ(x)/dx = 1).

    With `qparams` (static quantization, a fixed grid) those scales are used, otherwise they come
    from `x` (under NVFP4's `global_scale` if given: static NVFP4 calibrates only that one).
    A scale that requires grad is learned (LSQ): see `learned_fake_quantize`.
    """
    if qparams is not None and qparams.scale.requires_grad:
        return learned_fake_quantize(x, args, qparams)
    # scales and codes in float32 whatever x's dtype (as serving engines compute them from bf16 /
    # fp16 activations); only the result returns to x's dtype
    with torch.no_grad():
        wide = at_least_float32(x.detach())
        detached = as_rows(wide, args)
        if qparams is not None:
            qp = qparams
        else:
            qp = compute_qparams(detached, args, global_scale if global_scale is not None else global_scales(wide, args))
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
    # the forward uses the scale as its format stores it (so freezing keeps the trained function);
    # its gradient passes straight through that rounding
    scale = qparams.scale
    scale = scale + (in_scale_format(scale.detach(), qparams.zero, args).scale - scale).detach()
    step = QParams(scale, qparams.zero, qparams.global_scale).step
    v = (rows - qparams.zero) / step
    if args.is_float:
        element = FLOAT_ELEMENTS[args.element]
        v = torch.clamp(v, -element.max, element.max)
        q = v + (element.round(v) - v).detach()
    else:
        q = torch.clamp(v + (torch.round(v) - v).detach(), args.qmin, args.qmax)
    return (q * step + qparams.zero).reshape(x.shape).to(x.dtype)


def encode_values(values: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Codes (int16) of grid values: the integers themselves, or the element format's bit patterns."""
    if args.is_float:
        return FLOAT_ELEMENTS[args.element].encode(values)
    return values.to(torch.int16)


def decode_values(codes: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Grid values (float32) of codes: inverse of `encode_values`."""
    if args.is_float:
        return FLOAT_ELEMENTS[args.element].decode(codes)
    return codes.float()


def quantize(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, QParams]:
    """Codes (int16 tensor shaped [rows, cols]) and their per-row parameters."""
    rows = as_rows(x.detach().float(), args)
    qp = compute_qparams(rows, args, global_scales(x.detach(), args))
    return encode_values(quantize_rows(rows, qp, args), args), qp


def dequantize(codes: torch.Tensor, qp: QParams, shape: torch.Size, args: QuantArgs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_rows(decode_values(codes, args), qp).reshape(shape).to(dtype)
