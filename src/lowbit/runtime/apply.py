"""Turn a stock transformers causal LM into a quantized one: module swaps and attention hooks.

Every linear of every decoder layer becomes a `QuantLinear` (quantized weight, fake-quantized
input); keys and values are fake-quantized per token as attention reads them (see `kv`).
Embeddings and lm_head stay in full precision unless the scheme says otherwise.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS, rtn_weight
from ..arch import (
    ArchSpec,
    attention_modules,
    decoder_layers,
    get_arch,
    get_module,
    head_dim,
    layer_linears,
    set_module,
)
from ..errors import UserError
from ..pipeline import SEQUENTIAL_ALGORITHMS, PipelineConfig, quantize_sequential
from ..scheme import Granularity, QuantArgs, Scheme, parse_scheme
from ..transforms.apply import TransformConfig, apply_transform, check_transform
from .kv import install_kv_quantizers
from .linear import QuantLinear, compact_weights, expand_weights
from .quantizer import TensorQuantizer


def check_scheme(model: nn.Module, spec: ArchSpec, scheme: Scheme) -> None:
    """Fail before touching anything if the scheme cannot apply to this model."""
    layer = decoder_layers(model, spec)[0]
    for name, linear in layer_linears(layer, spec).items():
        for what, args in (("weight", scheme.weights), ("activation", scheme.inputs)):
            if args is not None and args.granularity is Granularity.GROUP and linear.in_features % args.group_size:
                divisors = [str(g) for g in (32, 64, 128, 192, 256) if linear.in_features % g == 0]
                hint = " or ".join(divisors) if divisors else "per-channel"
                raise UserError(
                    f"{what} group size {args.group_size} does not divide in_features={linear.in_features} of {name}; "
                    f"use a group size that divides every layer's input (e.g. {hint})"
                )
    dim = head_dim(model.config)
    for what, args in (("key", scheme.keys), ("value", scheme.values)):
        if args is None:
            continue
        if args.granularity is Granularity.TENSOR and args.dynamic:
            raise UserError(
                f"dynamic per-tensor {what} quantization would depend on the whole context; "
                "use per-token (KV4) or static per-tensor (KV8s)"
            )
        if args.granularity is Granularity.GROUP and dim % args.group_size:
            raise UserError(f"{what} group size {args.group_size} does not divide head_dim={dim}")


def quantize_model(
    model: nn.Module,
    scheme: Scheme | str,
    *,
    transform: TransformConfig | str = "none",
    algorithm: str = "rtn",
    calibration: Iterable[torch.Tensor] | None = None,
    pipeline: PipelineConfig | None = None,
    inplace: bool = False,
    trainable: bool = False,
    compact: bool = False,
    progress: bool = True,
) -> nn.Module:
    """A quantized copy of `model` (or `model` itself with `inplace=True`).

    `transform` (none, smooth, rotate, smoothrot, or a `TransformConfig`) is applied first;
    `calibration` (token-id batches) is needed for smoothing, static quantizers, GPTQ and AWQ.
    GPTQ and AWQ run layer by layer (`lowbit.pipeline`); `pipeline` holds their options.
    Per-layer errors of the pipeline are left in `model.lowbit_layer_errors`.
    With `trainable=True` (quantization-aware training) every `QuantLinear` keeps the full-precision
    (transformed) weight as a latent weight and fake-quantizes it in forward: with RTN on MinMax
    scales recomputed each time, as LLM-QAT does (its forward equals the RTN model's); with GPTQ/AWQ
    the latent weight starts at the algorithm's quantized weight and is re-quantized on the
    algorithm's own, fixed per-row grid (its forward equals the GPTQ/AWQ model's).
    With `compact=True` quantized weights are left packed at their bit width (`QuantLinear.compact`;
    the forward is the same, memory is a fraction; `expand_weights` restores float weights).
    """
    scheme = parse_scheme(scheme)
    transform = transform if isinstance(transform, TransformConfig) else TransformConfig(kind=transform)
    spec = get_arch(model)
    check_scheme(model, spec, scheme)
    check_transform(model, spec, transform, calibration)
    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algorithm!r}; available: {', '.join(ALGORITHMS)}")
    sequential = algorithm in SEQUENTIAL_ALGORITHMS
    if sequential:
        pipeline = replace(pipeline or PipelineConfig(), algorithm=algorithm)
        pipeline.check(scheme)
        if calibration is None:
            raise UserError(f"{algorithm} needs calibration data (--calib: a text file, a dataset, or 'generated')")
    if scheme.needs_calibration and calibration is None:
        raise UserError("static (s) activation or KV quantization needs calibration data (--calib)")
    if not inplace:
        model = copy.deepcopy(model)
    if calibration is not None:
        calibration = list(calibration)
    transform_info = apply_transform(model, spec, transform, scheme, calibration, progress)
    install_kv_quantizers(model, attention_modules(model, spec), scheme.keys, scheme.values)
    model.lowbit_layer_errors = []
    if sequential:
        model.lowbit_layer_errors = quantize_sequential(model, spec, scheme, calibration, pipeline, progress)
        if not compact:  # the pipeline packs each finished layer
            expand_weights(model)
        if trainable and scheme.weights is not None:  # QAT from GPTQ/AWQ: train on the algorithm's own grid
            for layer in decoder_layers(model, spec):
                for linear in layer_linears(layer, spec).values():
                    linear.train_on_fixed_grid()
    quantize_weight = rtn_weight
    layers = decoder_layers(model, spec)
    if not sequential and (scheme.weights is not None or scheme.inputs is not None):
        for layer in tqdm(layers, desc=f"quantizing ({algorithm})", unit="layer", disable=not progress, leave=False):
            for name, linear in layer_linears(layer, spec).items():
                set_module(layer, name, _quant_linear(linear, scheme.weights, scheme.inputs, quantize_weight, trainable))
            if compact:
                compact_weights(layer)
    if scheme.quantize_lm_head:  # RTN: the head's input is the last layer's output, no pipeline step
        head = get_module(model, spec.lm_head)
        if head.weight.data_ptr() == get_module(model, spec.embed).weight.data_ptr():
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # tied: keep the embeddings exact
            model.config.tie_word_embeddings = False
        set_module(model, spec.lm_head, _quant_linear(head, scheme.weights, scheme.inputs, quantize_weight, trainable))
        if compact:
            compact_weights(get_module(model, spec.lm_head))
    if scheme.needs_calibration:  # the pipeline calibrated the decoder layers' quantizers already
        calibrate_static(model, calibration, progress=progress, only_uncalibrated=True)
    model.lowbit_scheme = scheme
    model.lowbit_transform = {"kind": transform.kind, **transform_info}
    return model


def _quant_linear(
    linear: nn.Module, w: QuantArgs | None, a: QuantArgs | None, quantize_weight, trainable: bool = False
) -> QuantLinear:
    """Quantize a linear (an nn.Linear, or a QuantLinear a transform made, keeping its rotation).

    The quantized values are written into the weight's own storage, so no second copy of the
    model's weights is ever resident (a memory-mapped checkpoint is copy-on-write: the file on
    disk is not touched)."""
    weight = linear.weight.detach()
    if trainable:  # the latent weight stays full precision; forward fake-quantizes it
        return QuantLinear(weight, linear.bias, w, a, getattr(linear, "input_rotation", None), trainable=True)
    if w is not None:
        with torch.no_grad():
            weight.copy_(quantize_weight(weight.float(), w).to(weight.dtype))
    return QuantLinear(weight, linear.bias, w, a, getattr(linear, "input_rotation", None))


@torch.no_grad()
def calibrate_static(
    model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = True, only_uncalibrated: bool = False
) -> None:
    """Record the ranges of every static quantizer (or of those without a range yet) over `batches`."""
    static = [m for m in model.modules() if isinstance(m, TensorQuantizer) and not m.args.dynamic]
    if only_uncalibrated:
        static = [q for q in static if not q.calibrated]
    if not static:
        return
    device = next(model.parameters()).device
    for q in static:
        q.observing = True
    try:
        for batch in tqdm(list(batches), desc="calibrating", unit="sample", disable=not progress, leave=False):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for q in static:
            q.observing = False
