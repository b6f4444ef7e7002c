"""Quantize and evaluate a model that does not fit in memory, one decoder layer at a time.

The model is a skeleton with its parameters on the meta device (`lowbit.onload`). Every set of
batches that flows through the layers is a stream: its layer inputs (an `ActivationStore`, on disk
beyond `--max-memory`) and the keyword arguments each layer receives, captured from the stock
model as the in-memory pipeline captures them. For each decoder layer, in order:

1. read the layer's weights from the checkpoint (float32);
2. the full-precision streams pass through it: the calibration samples that smoothing's
   statistics are taken on (`InputStats`, as a forward of the whole model takes them) and the
   evaluation windows of the full-precision perplexity;
3. the transform edits the layer (smoothing, rotation), its KV quantizers are attached, and the
   algorithm quantizes it on the calibration stream (`quantize_layer`, GPTQ/AWQ) or each linear
   by itself (RTN), static quantizers observing their ranges; GPTAQ also runs the calibration
   samples' full-precision stream through a full-precision twin of the transformed layer, as the
   in-memory pipeline does;
4. the quantized layer produces the next inputs of the calibration and evaluation streams;
5. its tensors (codes, scales, norms) go to the output file, and the layer returns to meta.

The embedding is read at the start (for the streams' first inputs) and lm_head at the end (for
the perplexities). Every step is the in-memory path's own code, so the result is the same, bit for
bit, and peak memory is one layer's float weights, the embedding or head, and the layer inputs
kept in memory: it does not grow with the number of layers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .activations import ActivationStore, check_free_space
from .algorithms.registry import resolve_algorithm
from .api import _quant_linear, check_scheme
from .arch import decoder_layers, get_arch, get_module, head_dim, kv_groups, layer_linears, set_module
from .errors import UserError
from .evaluation.perplexity import PerplexityResult, eval_windows, head_nll
from .files import staging_dir, write_dir_atomically
from .io.native import _check_savable, finish_weights, write_description
from .io.tensorfile import SafetensorsSpill
from .memory import map_large_allocations, release_freed_memory
from .onload import Checkpoint, build_skeleton, check_complete, offload, onload
from .pipeline import PipelineConfig, _capture_layer_inputs, _LayerRunner, _log_layer, check_fp_inputs, fp_twin, needs_fp_inputs, quantize_layer
from .progress import progress_bar
from .runtime.experts import swap_in_layer_experts
from .runtime.kv import install_kv_quantizers, register_attention, set_attention_implementation
from .runtime.linear import drop_dense_caches
from .runtime.prefix import install_prefix_hooks
from .runtime.quantizer import TensorQuantizer
from .runtime.state import QuantizationState, set_quantization_state
from .scheme import Scheme
from .transforms.apply import InputStats, LayerTransform, TransformConfig, check_transform

log = logging.getLogger("lowbit")


@dataclass(frozen=True)
class OnloadSettings:
    """Where layer inputs live: up to `max_memory` bytes in memory (all of them with None), the
    rest in files under `offload_dir` (default: the system's temporary folder)."""

    max_memory: int | None = None
    offload_dir: str | None = None

    def folder(self) -> Path:
        return Path(self.offload_dir) if self.offload_dir else Path(tempfile.gettempdir())


@dataclass
class _Stream:
    """Batches flowing through the layers: their current layer inputs and each layer's kwargs."""

    store: ActivationStore
    kwargs: list[list[dict]]
    targets: torch.Tensor | None = None  # evaluation windows: the token ids the perplexity predicts

    def through(self, layer: nn.Module, i: int, bf16: bool = False, reference: _LayerRunner | None = None) -> _LayerRunner:
        return _LayerRunner(layer, self.store, self.kwargs[i], torch.device("cpu"), torch.float32, bf16, reference=reference)


@dataclass
class OnloadedResult:
    """What a streamed quantization measured and wrote."""

    fp: PerplexityResult | None = None
    quantized: PerplexityResult | None = None
    layer_errors: list[dict] = field(default_factory=list)
    transform_info: dict = field(default_factory=dict)
    quantize_seconds: float = 0.0
    offloaded_bytes: int = 0
    model: nn.Module | None = None  # the quantized model's structure, its decoder layers on the meta device


def activation_bytes(config, rows: int, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one stream's layer inputs: rows x tokens x hidden."""
    return rows * tokens * config.hidden_size * torch.empty(0, dtype=dtype).element_size()


def check_offload_space(settings: OnloadSettings, needed: int) -> None:
    """Before any work: the activations beyond `max_memory` fit on the offload folder's disk."""
    if settings.max_memory is None or needed <= settings.max_memory:
        return
    folder = settings.folder()
    if not folder.is_dir():
        raise UserError(f"--offload-dir {folder} is not a folder")
    check_free_space(folder, needed - settings.max_memory)


class _Budget:
    """One memory budget shared by the streams, in the order they are created."""

    def __init__(self, settings: OnloadSettings) -> None:
        self.left, self.folder = settings.max_memory, settings.offload_dir or None

    def store(self) -> ActivationStore:
        return ActivationStore(self.left, self.folder)

    def spend(self, store: ActivationStore) -> None:
        if self.left is not None:
            self.left = max(0, self.left - store.resident_bytes)


def _capture(model, spec, ids: torch.Tensor, batch_size: int, budget: _Budget, dtype=None, targets=None) -> _Stream:
    store = budget.store()
    _, kwargs = _capture_layer_inputs(model, spec, ids, batch_size, dtype, store)
    budget.spend(store)
    return _Stream(store, kwargs, targets)


def _nll(stream: _Stream, norm: nn.Module, lm_head: nn.Module, softcap) -> PerplexityResult:
    total, tokens = 0.0, 0
    for j in range(len(stream.store)):
        hidden = norm(stream.store[j])[0, :-1]
        targets = stream.targets[j, 1:]
        total += head_nll(hidden, targets, lm_head, softcap)
        tokens += targets.numel()
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=len(stream.store), seq_len=stream.targets.shape[1])


def _spill(spill: SafetensorsSpill, prefix: str, module: nn.Module) -> None:
    """Write the module's tensors to the output (in a function of its own: a loop variable left
    behind would keep the last tensor, say the whole embedding, alive)."""
    for key, value in module.state_dict().items():
        spill.add(f"{prefix}.{key}", value)


def _observing(layer: nn.Module):
    """The uncalibrated static quantizers of `layer`, set to observe."""
    static = [m for m in layer.modules() if isinstance(m, TensorQuantizer) and not m.args.dynamic and not m.calibrated]
    for q in static:
        q.observing = True
    return static


def _head(model, spec, checkpoint: Checkpoint, tied: bool) -> nn.Module:
    """lm_head read from the checkpoint (a tied head: the embedding's tensor), float32."""
    lm_head = get_module(model, spec.lm_head)
    name = f"{spec.embed}.weight" if tied and f"{spec.lm_head}.weight" not in checkpoint else f"{spec.lm_head}.weight"
    lm_head.weight = nn.Parameter(checkpoint.read(name), requires_grad=False)
    if getattr(lm_head, "bias", None) is not None and lm_head.bias.device.type == "meta":
        onload(lm_head, spec.lm_head, checkpoint)
    return lm_head


@torch.no_grad()
def quantize_onloaded(
    folder: str | Path,
    scheme: Scheme,
    transform: TransformConfig,
    algorithm,
    calibration: list[torch.Tensor] | None,
    eval_ids: torch.Tensor | None,
    *,
    seq_len: int = 2048,
    windows: int | None = None,
    evaluate_fp: bool = True,
    pipeline: PipelineConfig | None = None,
    settings: OnloadSettings = OnloadSettings(),
    save_to: str | Path | None = None,
    tokenizer=None,
    source_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> OnloadedResult:
    """Quantize the model in `folder` reading one decoder layer at a time; evaluate perplexity on
    `eval_ids` (FP and quantized) on the way; save the quantized model to `save_to` (lowbit's
    format) when given. The same computation as `lowbit.quantize` on the loaded model."""
    pipeline = pipeline or PipelineConfig()
    algo, algo_config = resolve_algorithm(algorithm)
    if save_to is not None and Path(save_to).exists() and not overwrite:  # before hours of work, not after
        raise UserError(f"{save_to} exists; pass overwrite=True or choose another folder")
    map_large_allocations()  # a layer's freed temporaries go back to the OS, not into a growing heap
    checkpoint = Checkpoint(folder)
    model = build_skeleton(folder)
    spec = get_arch(model)
    check_complete(model, checkpoint, spec.moe)
    check_scheme(model, spec, scheme)
    check_transform(model, spec, transform, calibration)
    if transform.learn_rotation is not None:  # every layer's activations come before the first layer's edit
        raise UserError("a learned rotation (learn_rotation) is fitted to every layer's activations at once: load the model whole (--no-onload)")
    algo.check(algo_config, scheme.weights)
    if algo.calibrated:
        check_fp_inputs(algo, algo_config, spec)
        pipeline.check()
        if pipeline.device is not None:
            raise UserError("layer-by-layer onloading runs on the CPU; drop --device (or load the model whole)")
    if (algo.calibrated or scheme.needs_calibration or transform.needs_calibration) and not calibration:
        raise UserError(f"{algo.name} / {scheme.name} / {transform.kind} needs calibration data (--calib)")
    model.lowbit_source = source_name or str(folder)
    result = OnloadedResult()
    t0 = time.time()
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed, norm = get_module(model, spec.embed), get_module(model, spec.final_norm)
    onload(embed, spec.embed, checkpoint)
    onload(norm, spec.final_norm, checkpoint)
    budget = _Budget(settings)
    calib_ids = None
    if calibration:
        calib_ids = torch.cat([c.reshape(1, -1) for c in calibration]).long()
    kv_or_r3 = scheme.keys is not None or scheme.values is not None or (transform.rotates and transform.r3)
    if kv_or_r3:  # lowbit's attention wrapper; a layer without quantizers or rotation computes as the stock one
        set_attention_implementation(model, register_attention(model.config._attn_implementation or "eager"))
    plan = LayerTransform(config, spec, transform, scheme) if transform.kind != "none" else None
    stats = None
    # full-precision streams: the windows of the FP perplexity, the samples smoothing measures
    windows_ids = eval_windows(eval_ids, seq_len, windows) if eval_ids is not None else None
    eval_fp = _capture(model, spec, windows_ids, 1, budget, targets=windows_ids) if windows_ids is not None and evaluate_fp else None
    stats_fp = None
    if transform.needs_calibration:
        stats = InputStats(spec, len(calibration), transform.keep_rows)
        stats_fp = _capture(model, spec, calib_ids, 1, budget)
        plan.stats = stats.stats
    if plan is not None:
        plan.transform_embedding(embed)
    store_dtype = torch.bfloat16 if pipeline.dtype == "bfloat16" else None
    observe = scheme.needs_calibration and not algo.calibrated  # RTN with static quantizers: observe as calibrate_static does
    calib = (
        _capture(model, spec, calib_ids, pipeline.batch() if algo.calibrated else 1, budget, store_dtype) if (algo.calibrated or observe) else None
    )
    # GPTAQ: the calibration samples' full-precision stream, in the transformed basis like `calib`
    calib_fp = None
    if algo.calibrated and needs_fp_inputs(algo, algo_config):
        calib_fp = _capture(model, spec, calib_ids, pipeline.batch(), budget, store_dtype)
    eval_q = _capture(model, spec, windows_ids, 1, budget, targets=windows_ids) if windows_ids is not None else None
    # the output's tensors go to a staging folder beside it as each layer finishes (a killed run's
    # is removed by the next run writing there), and into the saved model at the end
    staging = staging_dir(save_to) if save_to is not None else contextlib.nullcontext()
    with staging as spill_dir:
        spill = SafetensorsSpill(spill_dir) if spill_dir is not None else None
        if spill is not None:
            _spill(spill, spec.embed, embed)
        offload(embed)
        release_freed_memory()
        dim, n_rep = head_dim(config), kv_groups(config)
        layers = decoder_layers(model, spec)
        bf16 = pipeline.dtype == "bfloat16"
        bar = progress_bar(layers, desc=f"{algo.name} layer by layer (onloaded)", unit="layer", disable=not progress, leave=False)
        for i, layer in enumerate(bar):
            prefix = f"{spec.layers}.{i}"
            onload(layer, prefix, checkpoint, moe=spec.moe)
            swap_in_layer_experts(layer, spec)  # MoE: one linear per expert (computes as the stock experts)
            if stats_fp is not None:
                hooks = stats.attach(i, layer)
                try:
                    stats_fp.through(layer, i).run_all()
                finally:
                    for h in hooks:
                        h.remove()
                stats.finish(i)
            if eval_fp is not None:
                eval_fp.through(layer, i).run_all()
            if plan is not None:
                plan.transform_layer(i, layer)
            install_kv_quantizers(model, [get_module(layer, spec.attention)], scheme.keys, scheme.values, scheme.fp_prefix)
            if algo.calibrated:
                reference = calib_fp.through(fp_twin(layer), i, bf16) if calib_fp is not None else None
                runner = calib.through(layer, i, bf16, reference)
                entry = quantize_layer(i, layer, spec, scheme, algo, algo_config, runner, dim, n_rep, pipeline.min_expert_tokens)
                runner.run_all()  # and the full-precision twin's, if any
                del runner, reference
                drop_dense_caches(layer)
                result.layer_errors.append(entry)
                bar.set_postfix_str(_log_layer(entry, algo))
            else:
                if scheme.weights is not None or scheme.inputs is not None:
                    for name, linear in layer_linears(layer, spec).items():
                        set_module(layer, name, _quant_linear(linear, scheme.weights, scheme.inputs, algo, algo_config, False, scheme.fp_prefix))
                if observe:
                    static = _observing(layer)
                    try:
                        calib.through(layer, i).run_all()
                    finally:
                        for q in static:
                            q.observing = False
            if eval_q is not None:
                eval_q.through(layer, i).run_all()
            if stats is not None:  # this layer's statistics are spent
                for key in [k for k in stats.stats if k[0] == i]:
                    del stats.stats[key]
            if spill is not None:
                _check_savable(layer)
                _spill(spill, prefix, layer)
            offload(layer)
            release_freed_memory()  # the layer's float weights and temporaries, before the next layer's peak
        softcap = getattr(config, "final_logit_softcapping", None)
        lm_head = _head(model, spec, checkpoint, tied)
        if eval_fp is not None:
            result.fp = _nll(eval_fp, norm, lm_head, softcap)
            eval_fp.store.close()
        if plan is not None and plan.fused_r1:
            plan.transform_head(norm, lm_head)
            config.tie_word_embeddings = False
            tied = False
        aliases = {f"{spec.lm_head}.weight": f"{spec.embed}.weight"} if tied else {}
        if scheme.quantize_lm_head:
            rtn, rtn_config = resolve_algorithm("rtn")
            lm_head = _quant_linear(lm_head, scheme.weights, scheme.inputs, rtn, rtn_config, False, scheme.fp_prefix)
            set_module(model, spec.lm_head, lm_head)
            config.tie_word_embeddings = False
            aliases = {}
            if lm_head.input_quant is not None and not lm_head.input_quant.args.dynamic:  # observe on the last layer's outputs
                lm_head.input_quant.observing = True
                for j in range(len(calib.store)):
                    lm_head(norm(calib.store[j]))
                lm_head.input_quant.observing = False
        if eval_q is not None:
            result.quantized = _nll(eval_q, norm, lm_head, softcap)
        result.quantize_seconds = time.time() - t0
        result.transform_info = plan.info() if plan is not None else {}
        for stream in (stats_fp, calib, calib_fp, eval_q):
            if stream is not None:
                result.offloaded_bytes += stream.store.disk_bytes
                stream.store.close()
        if scheme.fp_prefix:  # incremental decoding of the model in memory: linears learn where tokens start
            install_prefix_hooks(model)
        set_quantization_state(
            model,
            QuantizationState(
                scheme=scheme,
                transform={**asdict(transform), **result.transform_info},
                algorithm=algo.name,
                algorithm_config=asdict(algo_config),
                layer_errors=result.layer_errors,
            ),
        )
        if spill is not None:
            for key, value in model.state_dict().items():
                if key not in spill and key not in aliases and value.device.type != "meta":
                    spill.add(key, value)
            weights = {}

            def fill(tmp: Path) -> None:
                weights.update(finish_weights(tmp, spill, model))
                write_description(tmp, model, weights, aliases, tokenizer)

            write_dir_atomically(save_to, fill, overwrite=overwrite)
            log.info("saved quantized model (%s) to %s", scheme.name, save_to)
    result.model = model
    return result


@torch.no_grad()
def perplexity_onloaded(
    folder: str | Path,
    eval_ids: torch.Tensor,
    seq_len: int = 2048,
    windows: int | None = None,
    settings: OnloadSettings = OnloadSettings(),
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of the model in `folder` with one decoder layer in memory at a time: every window
    through layer i, then layer i+1 (the same numbers as `perplexity` on the loaded model)."""
    map_large_allocations()
    checkpoint = Checkpoint(folder)
    model = build_skeleton(folder)
    spec = get_arch(model)
    check_complete(model, checkpoint, spec.moe)
    embed, norm = get_module(model, spec.embed), get_module(model, spec.final_norm)
    onload(embed, spec.embed, checkpoint)
    onload(norm, spec.final_norm, checkpoint)
    ids = eval_windows(eval_ids, seq_len, windows)
    stream = _capture(model, spec, ids, 1, _Budget(settings), targets=ids)
    offload(embed)
    try:
        for i, layer in enumerate(
            progress_bar(decoder_layers(model, spec), desc="perplexity (onloaded)", unit="layer", disable=not progress, leave=False)
        ):
            onload(layer, f"{spec.layers}.{i}", checkpoint, moe=spec.moe)
            stream.through(layer, i).run_all()
            offload(layer)
            release_freed_memory()
        lm_head = _head(model, spec, checkpoint, bool(getattr(model.config, "tie_word_embeddings", False)))
        return _nll(stream, norm, lm_head, getattr(model.config, "final_logit_softcapping", None))
    finally:
        stream.store.close()
