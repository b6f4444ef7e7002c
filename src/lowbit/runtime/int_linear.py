"""Linear layers that really compute with integer weights (CPU), next to the fake-quantized reference.

- `Int8Linear` (W<=8 A<=8, symmetric): int8 weight codes, activations quantized to int8 codes per
  token (or with a static per-tensor scale) and multiplied with `torch._int_mm` (int8 x int8 ->
  int32 accumulation); the int32 result is scaled by (activation scale x weight scale). Every
  product and sum of codes is exact, so the output equals `QuantLinear`'s up to the fp32 rounding
  of the reference matmul.
- `Int4Linear` (W<=4 A16): weights packed two per byte with one (scale, zero) per group, multiplied
  by torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`). That kernel is fast only in bfloat16,
  so by default activations and scales are rounded to bfloat16 (the 4-bit codes stay exact) and the
  output is cast back; `compute_dtype=torch.float32` runs the same kernel exactly but ~50x slower.

`convert_to_int_kernels` swaps the `QuantLinear`s of a quantized model for these modules; they
take the codes and scales of the `QuantLinear`'s `QuantizedWeight` as they are, so the
conversion works after RTN, GPTQ or AWQ alike.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import UserError
from ..quant import compute_qparams, range_qparams
from ..scheme import Granularity
from .linear import QuantLinear

log = logging.getLogger("lowbit")

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what torch's CPU int4 kernel accepts
INT4_OUT_MULTIPLE = 16  # its packing needs out_features % 16 == 0
INT4_TILES = 1  # innerKTiles of the CPU packing (the CPU kernel ignores the tiling)


class Int8Linear(nn.Module):
    """y = (codes_x @ codes_w^T) x scale_x x scale_w + bias, with int32 accumulation."""

    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        w_args, a_args = linear.weight_args, linear.input_quant.args
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.weight_args, self.input_args = w_args, a_args
        qweight = linear.quantized_weight
        codes = qweight.codes.reshape(self.out_features, self.in_features)
        scale = _per_output(qweight.qparams.scale, self.out_features)
        self.register_buffer("weight_codes", codes.to(torch.int8).t().contiguous())  # [in, out]: _int_mm's layout
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.bias = linear.bias
        self.input_rotation = linear.input_rotation
        quant = linear.input_quant
        if a_args.dynamic:
            self.static_scale = None
        else:
            self.register_buffer("static_scale", range_qparams(quant.observed_min, quant.observed_max, a_args).scale.reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        codes, scale = self.quantize_input(x)
        acc = torch._int_mm(codes, self.weight_codes)  # int32 [tokens, out]
        y = acc.float() * scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and their scale ([tokens, 1] or a scalar), the same as `fake_quantize` computes."""
        if self.static_scale is not None:
            scale = self.static_scale
        elif self.input_args.granularity is Granularity.TENSOR:
            scale = compute_qparams(x.reshape(1, -1), self.input_args).scale.reshape(())
        else:
            scale = compute_qparams(x, self.input_args).scale
        codes = torch.clamp(torch.round(x / scale), self.input_args.qmin, self.input_args.qmax)
        return codes.to(torch.int8), scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W{self.weight_args.name()}A{self.input_args.name()}, int8 x int8"


class Int4Linear(nn.Module):
    """Weight-only int4: packed codes and per-group (scale, zero), torch's CPU int4 matmul."""

    def __init__(self, linear: QuantLinear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        args = linear.weight_args
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.weight_args, self.compute_dtype = args, compute_dtype
        qweight = linear.quantized_weight
        codes, scale, zero = qweight.codes, qweight.qparams.scale, qweight.qparams.zero
        n, k = self.out_features, self.in_features
        group = args.group_size if args.granularity is Granularity.GROUP else next(g for g in INT4_GROUP_SIZES if k % g == 0)
        # per-channel / per-tensor: every kernel group of a row repeats the row's scale (exact)
        if args.granularity is Granularity.TENSOR:  # one scale for all rows
            scale, zero = scale.expand(n, 1), zero.expand(n, 1)
        codes, scale, zero = (t.reshape(n, -1) for t in (codes, scale, zero))
        repeat = k // group // scale.shape[1]
        scale, zero = scale.repeat_interleave(repeat, dim=1), zero.repeat_interleave(repeat, dim=1)
        # the kernel computes (q - 8) x scale + zero with q in 0..15: signed codes shift by 8,
        # unsigned (asymmetric) codes keep their value and move 8 x scale into the offset
        q = codes.reshape(n, k).to(torch.int32) + (8 if args.symmetric else 0)
        kernel_zero = zero if args.symmetric else zero + 8 * scale
        self.group_size = group
        self.register_buffer("weight_packed", torch._convert_weight_to_int4pack_for_cpu(q, INT4_TILES))  # [out, in/2] uint8
        scale_zero = torch.stack((scale.t(), kernel_zero.t()), dim=-1).contiguous()  # [in/group, out, 2]
        self.register_buffer("scale_zero", scale_zero.to(compute_dtype))
        self.bias = linear.bias
        self.input_rotation = linear.input_rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = torch._weight_int4pack_mm_for_cpu(x, self.weight_packed, self.group_size, self.scale_zero).to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, W{self.weight_args.name()}A16, "
            f"packed int4, group {self.group_size}, {str(self.compute_dtype).removeprefix('torch.')}"
        )


def _per_output(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """Per-output-channel scales from per-row scales (one row per channel, or one for the tensor)."""
    return scale.reshape(-1).expand(out_features) if scale.numel() == 1 else scale.reshape(out_features)


_PREFIX_REFUSAL = (
    "{name}: the CPU integer kernels quantize every token's input; full-precision prefix tokens (P<N>) run in emulation only: "
    "drop --int-kernels or the P suffix"
)


def check_integer_formats(scheme) -> None:
    """The integer kernels run integer codes only: a floating-point format (FP8, MXFP, NVFP4) is
    refused, before any model loads, with what to do instead."""
    if scheme.fp_prefix:
        raise UserError(_PREFIX_REFUSAL.format(name=scheme.name))
    for part, args in (("weights", scheme.weights), ("activations", scheme.inputs)):
        if args is not None and args.is_float:
            raise UserError(
                f"{scheme.name}: the CPU integer kernels run integer formats only, and the {part} are {args.format_name}; "
                "drop --int-kernels (lowbit evaluates the format exactly in emulation) or use an integer scheme such as W8A8 or W4A16"
            )


def int_kernel_for(linear: QuantLinear) -> str:
    """'int8' or 'int4' for a QuantLinear an integer kernel can run; UserError saying why not otherwise."""
    w = linear.weight_args
    a = linear.input_quant.args if linear.input_quant is not None else None
    name = f"W{w.name() if w else '16'}A{a.name() if a else '16'}"
    if w is None:
        raise UserError(f"{name}: unquantized weights have no integer kernel; quantize weights too (e.g. W8A8)")
    if w.is_float or (a is not None and a.is_float):
        raise UserError(f"{name}: the CPU integer kernels run integer formats only; drop --int-kernels for FP8, MXFP and NVFP4")
    if a is not None and linear.input_quant.fp_prefix:
        raise UserError(_PREFIX_REFUSAL.format(name=f"{name}P{linear.input_quant.fp_prefix}"))
    if getattr(linear, "trainable", False):  # its weight is the latent full-precision one
        raise UserError(f"{name}: a QAT student still holds latent weights; call lowbit.qat.freeze_student(model) first")
    if a is not None:
        if not (w.symmetric and a.symmetric):
            raise UserError(f"{name}: the int8 kernel needs symmetric weights and activations (drop the 'a' suffix)")
        if w.granularity is Granularity.GROUP or a.granularity is Granularity.GROUP:
            raise UserError(
                f"{name}: per-group scales vary along the summed dimension, so int32 sums cannot be rescaled once; "
                "use per-channel weights and per-token (or per-tensor) activations, e.g. W8A8"
            )
        return "int8"
    if w.bits > 4:
        raise UserError(f"{name}: weight-only kernels exist for 2-4 bit weights (packed int4); use W4A16 or add activations (W8A8)")
    if w.granularity is Granularity.GROUP and w.group_size not in INT4_GROUP_SIZES:
        raise UserError(f"{name}: the int4 kernel takes group sizes {', '.join(map(str, INT4_GROUP_SIZES))} (or per-channel)")
    if linear.out_features % INT4_OUT_MULTIPLE or linear.in_features % min(INT4_GROUP_SIZES):
        raise UserError(
            f"{name}: the int4 kernel needs out_features % {INT4_OUT_MULTIPLE} == 0 and in_features % 32 == 0; "
            f"got {linear.out_features} x {linear.in_features}"
        )
    return "int4"


def convert_to_int_kernels(model: nn.Module, *, inplace: bool = False, int4_compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every `QuantLinear` for an `Int8Linear` (W<=8 A<=8) or `Int4Linear` (W<=4 A16).

    All layers are checked before any is converted; a layer no kernel can run raises UserError.
    Only CPU is supported (torch's integer kernels used here are CPU ones). KV-cache quantization
    and embeddings are untouched (they stay on the fake-quantized / float path).
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not targets:
        raise UserError("no quantized linear layers to convert; run lowbit.quantize first (e.g. W8A8 or W4A16)")
    kinds = {}
    for name, linear in targets:
        device = linear.weight_codes.device if linear.is_quantized else linear.weight.device
        if device.type != "cpu":
            raise UserError(f"{name} is on {device}; the integer kernels are CPU kernels, move the model to CPU")
        try:
            kinds[name] = int_kernel_for(linear)
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, kind in kinds.items():
        parent, _, child = name.rpartition(".")
        linear = modules[name]
        new = Int8Linear(linear) if kind == "int8" else Int4Linear(linear, int4_compute_dtype)
        setattr(modules[parent] if parent else model, child, new)
    log.info(
        "integer kernels: %d int8 x int8 and %d packed int4 layers",
        sum(k == "int8" for k in kinds.values()),
        sum(k == "int4" for k in kinds.values()),
    )
    return model


INT_LINEARS = (Int8Linear, Int4Linear)
