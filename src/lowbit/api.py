"""The public quantization API: `quantize` a stock transformers causal LM, `calibrate_static`
quantizers, `check_scheme` before any work.

Every linear of every decoder layer becomes a `QuantLinear` (a `QuantizedWeight`, a
fake-quantized input); keys and values are fake-quantized per token as attention reads them.
Embeddings and lm_head stay in full precision unless the scheme says otherwise.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict

import torch
from torch import nn

from .algorithms.registry import GroupContext, resolve_algorithm
from .arch import (
    ArchSpec,
    arch_for_model_type,
    attention_modules,
    backbone,
    decoder_layers,
    get_arch,
    get_module,
    head_dim,
    layer_linears,
    linear_shapes,
    set_module,
)
from .distributed import all_reduce_, check_processes, rank, share, world_size
from .errors import UserError
from .memory import release_mapped_pages
from .pipeline import PipelineConfig, check_distributed, check_fp_inputs, quantize_sequential
from .progress import progress_bar
from .runtime.experts import swap_in_experts
from .runtime.kv import install_kv_quantizers
from .runtime.linear import QuantLinear
from .runtime.prefix import install_prefix_hooks
from .runtime.quantizer import TensorQuantizer
from .runtime.state import QuantizationState, set_quantization_state
from .scheme import Granularity, QuantArgs, Scheme, parse_scheme
from .transforms.apply import TransformConfig, apply_transform, check_transform


def check_scheme(model: nn.Module, spec: ArchSpec, scheme: Scheme) -> None:
    """Fail before touching anything if the scheme cannot apply to this model."""
    inputs = {}
    for layer in decoder_layers(model, spec):  # every layer: an MoE model may mix dense and expert layers
        for name, (_, in_features) in linear_shapes(layer, spec).items():
            inputs.setdefault(name, in_features)
    _check_prefix(scheme, spec)
    _check_dims(inputs, head_dim(model.config), scheme)


def check_scheme_for_config(config, scheme: Scheme) -> None:
    """`check_scheme` from a model's config alone, before its weights load: the inputs of the
    attention and MLP linears and the head dimension."""
    if scheme.fp_prefix:
        _check_prefix(scheme, arch_for_model_type(getattr(config, "model_type", None)))
    dim = head_dim(config)
    inputs = {"hidden states (q/k/v, gate/up)": config.hidden_size, "attention output (o_proj)": config.num_attention_heads * dim}
    if getattr(config, "intermediate_size", None):
        inputs["MLP activations (down_proj)"] = config.intermediate_size
    if getattr(config, "moe_intermediate_size", None):  # Qwen-MoE experts (Mixtral's use intermediate_size)
        inputs["expert activations (experts' down_proj)"] = config.moe_intermediate_size
    _check_dims(inputs, dim, scheme)


def _check_prefix(scheme: Scheme, spec: ArchSpec) -> None:
    """Full-precision prefix tokens need every quantized linear to see its tokens in sequence order."""
    if scheme.fp_prefix and spec.moe is not None:
        raise UserError(
            f"{scheme.name}: P{scheme.fp_prefix} (full-precision prefix tokens) is not supported for mixture-of-experts models "
            "(the experts see their routed tokens regrouped, not in sequence order); drop the P suffix"
        )


def _block_name(args) -> str:
    """How an error names the group: 'group size 64', or 'the 16-value blocks of nvfp4'."""
    if args.scale_format in ("e8m0", "float8_e4m3"):
        return f"the {args.group_size}-value blocks of {args.format_name}"
    return f"group size {args.group_size}"


def _check_dims(inputs: dict[str, int], dim: int, scheme: Scheme) -> None:
    for name, in_features in inputs.items():
        for what, args in (("weight", scheme.weights), ("activation", scheme.inputs)):
            if args is not None and args.granularity is Granularity.GROUP and in_features % args.group_size:
                if args.scale_format in ("e8m0", "float8_e4m3"):
                    hint = "fp8 or an integer format (a group size that divides it)"
                    if args.group_size == 32 and in_features % 16 == 0:
                        hint = "nvfp4 (blocks of 16), " + hint
                else:
                    divisors = [str(g) for g in (32, 64, 128, 192, 256) if in_features % g == 0]
                    hint = "a group size that divides every layer's input, e.g. " + (" or ".join(divisors) if divisors else "per-channel")
                raise UserError(f"{what} quantization with {_block_name(args)} does not divide in_features={in_features} of {name}; use {hint}")
    for what, args in (("key", scheme.keys), ("value", scheme.values)):
        if args is None:
            continue
        if args.granularity is Granularity.TENSOR and args.dynamic:
            raise UserError(
                f"dynamic per-tensor {what} quantization would depend on the whole context; use per-token (KV4) or static per-tensor (KV8s)"
            )
        if args.granularity is Granularity.GROUP and dim % args.group_size:
            raise UserError(f"{what} quantization with {_block_name(args)} does not divide head_dim={dim}; use a per-token KV format (KV8, KVfp8)")


def quantize(
    model: nn.Module,
    scheme,
    *,
    transform: TransformConfig | str = "none",
    algorithm="rtn",
    calibration: Iterable[torch.Tensor] | None = None,
    pipeline: PipelineConfig | None = None,
    inplace: bool = False,
    trainable: bool = False,
    progress: bool = True,
) -> nn.Module:
    """A quantized copy of `model` (or `model` itself with `inplace=True`).

    `scheme` is a scheme name (``W4A8KV4``), a `Scheme`, or a `Recipe` (which then also gives the
    transform and algorithm). `transform` (none, smooth, rotate, smoothrot, or a
    `TransformConfig`) is applied first. `algorithm` is a registered name (rtn, gptq, awq, ...)
    or a config instance (`GPTQConfig(damp=0.05)`); calibration-based ones run layer by layer
    (`lowbit.pipeline`, options in `pipeline`) on `calibration` (token-id batches), which
    smoothing and static quantizers need too. Per-layer errors of the pipeline are in the
    model's `QuantizationState` (`lowbit.quantization_state(model).layer_errors`).

    Quantized weights are held as codes and scales (`QuantizedWeight`). With `trainable=True`
    (quantization-aware training) every `QuantLinear` keeps a full-precision latent weight,
    fake-quantized in forward: with RTN on MinMax scales recomputed each time, as LLM-QAT does;
    with a calibrated algorithm the latent weight starts at its quantized weight and is
    re-quantized on the algorithm's own fixed grid.

    Under torch.distributed (an initialised process group of more than one process, e.g. from
    `torchrun`) pass the same `calibration` on every rank: each rank runs its contiguous share of
    the samples, the statistics are combined over the ranks and the work of quantizing is shared
    out (`lowbit.distributed`), and every rank returns the same quantized model, the one process
    would make up to the order of floating-point sums.
    """
    from .recipes import Recipe

    if isinstance(scheme, Recipe):
        scheme, transform, algorithm = scheme.scheme, scheme.transform, scheme.algorithm_config
    scheme = parse_scheme(scheme)
    transform = transform if isinstance(transform, TransformConfig) else TransformConfig(kind=transform)
    algo, algo_config = resolve_algorithm(algorithm)
    algo.check(algo_config, scheme.weights)
    spec = get_arch(model)
    check_scheme(model, spec, scheme)
    check_transform(model, spec, transform, calibration)
    pipeline = pipeline or PipelineConfig()
    if algo.calibrated:
        pipeline.check()
        if calibration is None:
            raise UserError(f"{algo.name} needs calibration data (--calib: a text file, a dataset, or 'generated')")
        check_distributed(algo, algo_config, spec)  # torchrun: before any work
        check_fp_inputs(algo, algo_config, spec)  # GPTAQ on experts: before any work
    if scheme.needs_calibration and calibration is None:
        raise UserError("static (s) activation or KV quantization needs calibration data (--calib)")
    if not inplace:
        model = copy.deepcopy(model)
    progress = progress and rank() == 0
    swap_in_experts(model, spec)  # one linear per expert (MoE), before transforms and quantization see them
    if calibration is not None:
        calibration = list(calibration)
        if world_size() > 1:
            check_processes(len(calibration))
    transform_info = apply_transform(model, spec, transform, scheme, calibration, progress)
    install_kv_quantizers(model, attention_modules(model, spec), scheme.keys, scheme.values, scheme.fp_prefix)
    if scheme.fp_prefix:  # linears learn where each forward's tokens start (incremental decoding)
        install_prefix_hooks(model)
    layer_errors = []
    if algo.calibrated:
        layer_errors = quantize_sequential(model, spec, scheme, calibration, algo, algo_config, pipeline, progress)
        if trainable and scheme.weights is not None:  # QAT from GPTQ/AWQ: train on the algorithm's own grid
            for layer in decoder_layers(model, spec):
                for linear in layer_linears(layer, spec).values():
                    linear.train_on_fixed_grid()
    elif scheme.weights is not None or scheme.inputs is not None:
        for layer in progress_bar(decoder_layers(model, spec), desc=f"quantizing ({algo.name})", unit="layer", disable=not progress, leave=False):
            for name, linear in layer_linears(layer, spec).items():
                set_module(layer, name, _quant_linear(linear, scheme.weights, scheme.inputs, algo, algo_config, trainable, scheme.fp_prefix))
    if scheme.quantize_lm_head:  # RTN: the head's input is the last layer's output, no pipeline step
        head = get_module(model, spec.lm_head)
        if head.weight.data_ptr() == get_module(model, spec.embed).weight.data_ptr():
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # tied: keep the embeddings exact
            model.config.tie_word_embeddings = False
        rtn, rtn_config = resolve_algorithm("rtn")
        set_module(model, spec.lm_head, _quant_linear(head, scheme.weights, scheme.inputs, rtn, rtn_config, trainable, scheme.fp_prefix))
    if scheme.needs_calibration:  # the pipeline calibrated the decoder layers' quantizers already
        calibrate_static(model, calibration, progress=progress, only_uncalibrated=True)
    set_quantization_state(
        model,
        QuantizationState(
            scheme=scheme,
            transform={**asdict(transform), **transform_info},
            algorithm=algo.name,
            algorithm_config=asdict(algo_config),
            layer_errors=layer_errors,
        ),
    )
    return model


def _quant_linear(linear: nn.Module, w: QuantArgs | None, a: QuantArgs | None, algo, config, trainable: bool, fp_prefix: int = 0) -> QuantLinear:
    """Quantize a linear (an nn.Linear, or a QuantLinear a transform made, keeping its rotation)
    with an algorithm that needs no calibration. A memory-mapped checkpoint's
    pages of the float weight are given back once the codes replace it."""
    weight = linear.weight.detach()
    rotation = getattr(linear, "input_rotation", None)
    if w is None:
        return QuantLinear(weight, linear.bias, None, a, rotation, fp_prefix=fp_prefix)
    if trainable:  # the latent weight stays full precision; forward fake-quantizes it
        return QuantLinear(weight, linear.bias, w, a, rotation, trainable=True, fp_prefix=fp_prefix)
    with torch.no_grad():
        qweight = algo.quantize(weight.float(), None, w, config, GroupContext(input_args=a)).qweight
    release_mapped_pages(weight)
    return QuantLinear(qweight, linear.bias, None, a, rotation, fp_prefix=fp_prefix)


@torch.no_grad()
def calibrate_static(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = True, only_uncalibrated: bool = False) -> None:
    """Record the ranges of every static quantizer (or of those without a range yet) over `batches`.
    Under torch.distributed each rank runs its share of `batches` and the ranges are combined."""
    static = [m for m in model.modules() if isinstance(m, TensorQuantizer) and not m.args.dynamic]
    if only_uncalibrated:
        static = [q for q in static if not q.calibrated]
    if not static:
        return
    device = next(model.parameters()).device
    # the decoder backbone alone when every static quantizer is inside it: the LM head's output
    # over every calibration token is not needed (unless the head itself is quantized)
    stem = backbone(model, get_arch(model))
    inside = {id(m) for m in stem.modules()}
    runner = stem if all(id(q) in inside for q in static) else model
    for q in static:
        q.observing = True
    batches = list(batches)
    try:
        for batch in progress_bar(batches[share(len(batches))], desc="calibrating", unit="sample", disable=not progress, leave=False):
            runner(input_ids=batch.to(device), use_cache=False)
    finally:
        for q in static:
            q.observing = False
    for q in static:  # the range over every rank's samples (the same list on every rank)
        all_reduce_(q.observed_min, "min")
        all_reduce_(q.observed_max, "max")
