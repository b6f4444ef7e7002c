"""The sequential layer-by-layer pipeline for calibration-based weight quantization (GPTQ, AWQ).

1. The calibration samples go through the embeddings once; the inputs of decoder layer 0 are kept
   (one [samples, tokens, hidden] buffer) with the keyword arguments every layer receives
   (masks, rotary embeddings), captured from the stock model with each layer's forward replaced
   by a recorder.
2. For each layer, each input group in order (q/k/v, o, gate/up, down): run the layer on all
   samples up to where the group's input is read, with the groups before it already quantized
   (weights, activations, KV cache); feed that input to the algorithm; swap in the quantized
   linears, which hold the algorithm's `QuantizedWeight` (codes and scales), so float weights of
   only one layer are resident at a time. Then run the rest of the quantized layer to produce the
   next layer's inputs, written over the same buffer.

One pass per layer: every batch's forward runs on its own paused thread (`lowbit.pausable`),
paused at each group's input until the group is quantized, then resumed with the quantized
linears in place. The layer runs once, the cost of one forward, where restarting it for each
group costs ~2.6 forwards (each partial run repeats everything before its group); the results are
identical (the same operations in the same order). Input scales (AWQ) fold into a producer the
paused forwards already ran, so they divide the paused input on resuming instead: the same values
up to float rounding, not to the bit. It holds every batch's live activations at once, so it is
chosen only where they fit (40% of the available memory) and where nothing computed before
a pause changes later: not for mixtures of experts, input scales folded into v_proj behind a
quantized V cache, or static KV-cache ranges; those restart the layer per group
(`PipelineConfig.single_pass` forces either way).

The algorithm comes from the registry (`lowbit.algorithms.registry`): its statistics object sees
every calibration batch of an input, its function turns the stacked weights of the linears
reading that input into a `QuantizedWeight` (and, for AWQ, input scales folded into the producer).

Full-precision stream (GPTAQ, `GPTQConfig(asymmetric=True)`): an algorithm whose statistics ask
for it (`fp_inputs`) fits the full-precision model's outputs, so it needs each input's value in the
full-precision model beside the quantized one, for the same tokens. A second buffer holds the
layer inputs of the full-precision (transformed, unquantized) model; each layer runs beside a
full-precision twin (a copy taken before any of its groups is quantized, without activation or
KV quantizers), and for each group and batch the twin's input to the group and the quantized
layer's are handed to `add_batch(x, x_fp)` together (`_LayerRunner.run_until_paired`); the twin
then produces the next layer's full-precision inputs. The cost: one more [samples, tokens, hidden]
buffer, one more layer's float weights, and the twin's forwards. In one pass the twin's forwards
pause too, each batch's beside the quantized layer's, so both streams run once per layer (and
hold twice the paused activations). Mixtures of experts are refused
(the two streams' routers send different tokens to an expert, so no expert has paired inputs).

Only one layer's activations are alive at a time, and with `device` set only the current layer
and one batch of samples move to that device; the model stays where it is.

Mixture of experts: the experts' groups of one role (every expert's gate/up, then every
expert's down) are calibrated in one pass, hooks on each expert's linear seeing only the tokens
the router sent to it, so each expert's statistics (GPTQ's Hessian, AWQ's sample) come from its
routed tokens alone (`_quantize_experts`). An expert routed fewer than `min_expert_tokens` tokens
(default: its widest input, hidden or expert inner size, below which X^T X is singular) is
quantized with RTN instead, and listed in the report and a log line.

Under torch.distributed (`torchrun`) every rank gets the same calibration and runs its contiguous
share of the batches (`lowbit.distributed.share`); after each input's pass the statistics are
reduced (`reduce()`, static ranges MIN/MAX), the group's linears (or a block's experts, which are
independent of each other) are quantized by the ranks they are assigned to and sent to all
(`_quantize_shared`, `_quantize_experts_shared`), so every rank holds the same quantized layer
before it produces the next layer's inputs from its own samples.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .activations import ActivationStore
from .algorithms.registry import Algorithm, GroupContext
from .algorithms.rtn import rtn_weight
from .arch import (
    ArchSpec,
    InputGroup,
    backbone,
    decoder_layers,
    expert_dims,
    get_module,
    head_dim,
    is_linear_path,
    kv_groups,
    kv_head_channels,
    layer_input_groups,
    set_module,
    tie_kv_heads,
)
from .distributed import all_reduce_, assign_by_size, broadcast_object, check_device, check_processes, rank, share, world_size
from .errors import UserError
from .memory import available_memory_bytes, release_freed_memory, release_mapped_pages
from .pausable import PausableCall
from .progress import progress_bar
from .runtime.experts import swap_in_experts
from .runtime.kv import KEY_QUANT, VALUE_QUANT
from .runtime.linear import QuantLinear, drop_dense_caches
from .runtime.quantizer import TensorQuantizer
from .scheme import Granularity, Scheme
from .transforms.rotate import scale_norm_output, scale_output_rows

log = logging.getLogger("lowbit")


class _StopForward(Exception):
    """Raised from a hook once the input we wanted has been seen: the rest of the layer is skipped."""


@dataclass
class PipelineConfig:
    """How the layer-by-layer pipeline runs (not what it computes: that is the algorithm's config)."""

    # calibration samples per forward of a layer (memory ~ batch x seq_len). None: 16 in one pass
    # per layer (all batches are alive anyway: fewer threads and their duplicated state, larger
    # products; SmolLM2 W4A16 GPTQ: 3.55 -> 2.74 GiB peak, 3% faster than 4), else 4
    batch_size: int | None = None
    device: str | None = None  # run layers there (e.g. "cuda"); the model stays on its device
    # Precision of the calibration forwards and of the stored layer inputs: "float32", or
    # "bfloat16" (autocast, ~4x faster matmuls on CPUs with bf16 units, and half the memory for
    # the [samples, tokens, hidden] buffer). Hessians and quantized weights are always fp32.
    dtype: str = "float32"
    # Mixture of experts: an expert routed fewer calibration tokens than this is quantized with RTN
    # (and reported). None: its widest input (hidden or expert inner size), the fewest tokens for
    # which its inputs' X^T X can have full rank.
    min_expert_tokens: int | None = None
    # One pass per layer with paused forwards (module docstring): None chooses it where it applies
    # and fits in memory; True requires it, False restarts the layer for each input group.
    single_pass: bool | None = None

    def batch(self, single_pass: bool = False) -> int:
        """The batch size to run (`batch_size`, or its default for the pipeline's mode)."""
        if self.batch_size is not None:
            return self.batch_size
        return SINGLE_PASS_BATCH if single_pass and world_size() == 1 else 4

    def check(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"pipeline dtype must be float32 or bfloat16; got {self.dtype!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"batch size must be at least 1; got {self.batch_size}")
        if self.min_expert_tokens is not None and self.min_expert_tokens < 0:
            raise UserError(f"min_expert_tokens must be at least 0 (or None for the default); got {self.min_expert_tokens}")
        if self.device is not None:
            try:
                torch.empty(0, device=self.device)
            except (RuntimeError, AssertionError) as exc:
                raise UserError(f"device {self.device!r} is not usable here: {str(exc).splitlines()[0]}") from None
        check_device(self.device)


@torch.no_grad()
def quantize_sequential(
    model: nn.Module,
    spec: ArchSpec,
    scheme: Scheme,
    calibration: Sequence[torch.Tensor],
    algorithm: Algorithm,
    algorithm_config: object,
    config: PipelineConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Quantize every decoder linear of `model` in place with `algorithm`; returns per-layer,
    per-group errors as the algorithm reports them (GPTQ and AWQ: relative quantized-output error
    on the calibration inputs, next to plain RTN's)."""
    config = config or PipelineConfig()
    config.check()
    algorithm.check(algorithm_config, scheme.weights)
    home = next(model.parameters()).device
    device = torch.device(config.device) if config.device else home
    ids = _stack(calibration)
    feed = next(model.parameters()).dtype  # stored inputs go back to the layers in the model's dtype
    single_pass = _single_pass(model, spec, scheme, algorithm, algorithm_config, config, ids, feed)
    log.info("%s: %s", algorithm.name, "one pass per layer" if single_pass else "one pass per input group of each layer")
    batch_size = config.batch(single_pass)
    ids, tokens_before = _local_share(ids, batch_size)
    check_distributed(algorithm, algorithm_config, spec)
    check_fp_inputs(algorithm, algorithm_config, spec)
    swap_in_experts(model, spec)  # MoE: per-expert linears to calibrate (`quantize` did it already)
    layers = decoder_layers(model, spec)
    t0 = time.time()
    store = torch.bfloat16 if config.dtype == "bfloat16" else None
    hidden, kwargs_by_layer = _capture_layer_inputs(model, spec, ids, batch_size, store, ActivationStore())
    fp_hidden = None
    if needs_fp_inputs(algorithm, algorithm_config):  # GPTAQ: the full-precision model's layer inputs too
        fp_hidden = ActivationStore()
        for x in hidden:
            fp_hidden.append(x)
    log.debug("captured layer-0 inputs for %d samples in %.1f s", ids.shape[0], time.time() - t0)
    dim, n_rep = head_dim(model.config), kv_groups(model.config)
    report = []
    bar = progress_bar(layers, desc=f"{algorithm.name} layer by layer", unit="layer", disable=not progress or rank() != 0, leave=False)
    for i, layer in enumerate(bar):
        layer.to(device)
        kwargs = [_to(k, device) for k in kwargs_by_layer[i]]
        reference = None
        if fp_hidden is not None:
            reference = _LayerRunner(fp_twin(layer), fp_hidden, kwargs, device, feed, config.dtype == "bfloat16", tokens_before, None, single_pass)
        runner = _LayerRunner(layer, hidden, kwargs, device, feed, config.dtype == "bfloat16", tokens_before, reference, single_pass)
        try:
            entry = quantize_layer(i, layer, spec, scheme, algorithm, algorithm_config, runner, dim, n_rep, config.min_expert_tokens)
            runner.run_all()  # and the full-precision twin's, if any
        finally:
            runner.close()
        del runner, reference
        drop_dense_caches(layer)
        layer.to(home)
        release_freed_memory(1)  # this layer's temporaries (young objects), before the next layer's peak
        report.append(entry)
        bar.set_postfix_str(_log_layer(entry, algorithm))
    return report


def quantize_layer(
    i: int,
    layer: nn.Module,
    spec: ArchSpec,
    scheme: Scheme,
    algorithm: Algorithm,
    algorithm_config,
    runner: _LayerRunner,
    dim: int,
    n_rep: int,
    min_expert_tokens: int | None = None,
) -> dict:
    """Quantize decoder layer `i` one input group at a time on the inputs `runner` holds; its report entry."""
    entry = {"layer": i}
    groups = layer_input_groups(layer, spec)
    for group in groups:
        if group.expert is None:
            entry[group.role] = _quantize_group(layer, spec, group, scheme, algorithm, algorithm_config, runner, n_rep, dim)
        elif group.expert == 0:  # this input of every expert, in one pass: each sees only its routed tokens
            same = [g for g in groups if g.role == group.role and g.expert is not None]
            args = (scheme, algorithm, algorithm_config, runner, n_rep, dim, min_expert_tokens, i)
            entry[group.role] = _quantize_experts(layer, spec, same, *args)
    return entry


# of the available memory, for every batch's paused activations: GPTAQ's two streams on SmolLM2 at
# 128 x 512 tokens are estimated at 5.6 GiB (benchmarks/compare row w4a16-gptaq: 4.8 GiB peak), which a quarter of 21 GiB refused
SINGLE_PASS_MEMORY_SHARE = 0.4
SINGLE_PASS_MAX_BATCHES = 1024  # one thread each
SINGLE_PASS_BATCH = 16  # default samples per batch in one pass


def _single_pass(model, spec, scheme, algorithm: Algorithm, algorithm_config, config: PipelineConfig, ids: torch.Tensor, feed: torch.dtype) -> bool:
    """Whether each layer runs in one pass with paused forwards (module docstring); with
    `config.single_pass` True, a reason it cannot is a UserError."""
    if config.single_pass is False:
        return False
    reason = None
    if spec.moe is not None:
        reason = "a mixture of experts routes each batch's tokens in its own pass"
    elif algorithm.input_scales and scheme.values is not None:
        # dividing a paused input equals folding into its producer only where nothing in between
        # depends on the scale: the quantized V cache between v_proj and o_proj does
        reason = f"{algorithm.name} folds input scales into v_proj, in front of the quantized V cache the paused forwards already ran"
    elif any(a is not None and not a.dynamic for a in (scheme.keys, scheme.values)):
        reason = "static KV-cache ranges are observed before the attention output is read"
    elif -(-ids.shape[0] // config.batch(True)) > SINGLE_PASS_MAX_BATCHES:
        reason = f"more than {SINGLE_PASS_MAX_BATCHES} calibration batches (one thread each)"
    else:
        streams = 2 if needs_fp_inputs(algorithm, algorithm_config) else 1  # GPTAQ: the full-precision twin's paused forwards too
        needed, available = streams * _paused_bytes(model, spec, ids, feed), available_memory_bytes()
        if available is not None and needed > SINGLE_PASS_MEMORY_SHARE * available:
            reason = f"every batch's paused activations (~{needed / 2**30:.1f} GiB) exceed {SINGLE_PASS_MEMORY_SHARE:.0%} of the available memory"
    if reason is not None and config.single_pass:
        raise UserError(f"single_pass is not possible here: {reason}; leave it unset or False")
    if reason is not None:
        log.debug("one pass per input group: %s", reason)
    return reason is None


def _paused_bytes(model, spec, ids: torch.Tensor, feed: torch.dtype) -> int:
    """What every batch's forward holds while paused, estimated: per token, twenty hidden-sized
    tensors or four and six of the widest group input (SmolLM2, W4A16 GPTQ at 128 x 512 tokens:
    2.66 GiB more than restarting the layer with batches of 4, 19 x hidden per token), and the
    attention probabilities where attention runs eagerly."""
    layer = decoder_layers(model, spec)[0]
    widths = [get_module(layer, g.linears[0]).in_features for g in layer_input_groups(layer, spec)]
    hidden, widest = widths[0], max(widths)
    per_token = torch.empty(0, dtype=feed).element_size() * max(20 * hidden, 4 * hidden + 6 * widest)
    if getattr(model.config, "_attn_implementation", None) == "eager":
        per_token += 4 * (getattr(model.config, "num_attention_heads", 1) or 1) * ids.shape[1]
    return ids.numel() * per_token


def _log_layer(entry: dict, algorithm: Algorithm) -> str:
    summary = " ".join(f"{k}={v[algorithm.name]:.2e}" for k, v in entry.items() if k != "layer" and algorithm.name in v)
    log.debug("layer %d: relative output error (RTN in the report) %s", entry["layer"], summary)
    return summary.split()[-1] if summary else ""


def _stack(calibration: Sequence[torch.Tensor]) -> torch.Tensor:
    if not calibration:
        raise UserError("the sequential pipeline needs calibration samples; got none")
    rows = [c.reshape(1, -1) if c.dim() == 1 else c for c in calibration]
    lengths = {r.shape[1] for r in rows}
    if len(lengths) > 1:
        raise UserError(f"calibration samples must share one length for layer-by-layer quantization; got lengths {sorted(lengths)}")
    return torch.cat(rows).long()


def _capture_layer_inputs(model, spec, ids, batch_size, store_dtype=None, hidden=None):
    """Layer-0 inputs, one CPU tensor per batch of samples (in `store_dtype`, default their own),
    appended to `hidden` (a list or an `ActivationStore`; default a new list), and per layer the keyword arguments
    it receives for each batch (masks, rotary embeddings; batches of one shape share them).

    Every layer's forward is replaced by a recorder that returns its input unchanged, so the
    stock model computes the arguments (sliding-window masks, per-layer rotary bases) itself."""
    layers = decoder_layers(model, spec)
    device = next(model.parameters()).device
    batches = list(torch.split(ids, batch_size))
    hidden = [] if hidden is None else hidden
    kwargs_by_layer: list[list[dict]] = [[] for _ in layers]
    by_shape: dict[tuple, list[dict]] = {}
    current: dict = {}

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                hidden.append(hidden_states.detach().to("cpu", store_dtype or hidden_states.dtype, copy=True))
            if current["record"]:
                current["kwargs"][index] = {k: v for k, v in kwargs.items() if k != "past_key_values"}
            if not current["record"] and index == 0:
                raise _StopForward
            return hidden_states

        return forward

    stem = backbone(model, spec)
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # instance attribute shadows the class's forward
    try:
        for batch in batches:
            shape = tuple(batch.shape)
            current["record"] = shape not in by_shape
            current["kwargs"] = [None] * len(layers)
            try:
                stem(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            if current["record"]:
                by_shape[shape] = current["kwargs"]
            for i in range(len(layers)):
                kwargs_by_layer[i].append(by_shape[shape][i])
    finally:
        for layer in layers:
            del layer.forward
    return hidden, kwargs_by_layer


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def fp_twin(layer: nn.Module) -> nn.Module:
    """A full-precision copy of a decoder layer before its groups are quantized (GPTAQ's reference):
    transforms and online rotations kept, activation and KV quantizers dropped."""
    twin = copy.deepcopy(layer)
    for module in twin.modules():
        if isinstance(module, QuantLinear):
            if module.is_quantized:
                raise RuntimeError("the full-precision twin must be taken before the layer is quantized")
            module.input_quant = None
        for name in (KEY_QUANT, VALUE_QUANT):
            if getattr(module, name, None) is not None:
                setattr(module, name, None)
    return twin


class _LayerRunner:
    """Runs one layer over every batch of the current inputs, fed in the model's dtype whatever
    they are stored in (so an fp32 model keeps an fp32 residual stream under bf16 autocast).
    `reference`: the full-precision twin's runner on the full-precision stream (GPTAQ), or None."""

    def __init__(
        self,
        layer: nn.Module,
        hidden,  # a list of tensors or an ActivationStore
        kwargs: list[dict],
        device: torch.device,
        feed_dtype: torch.dtype = torch.float32,
        bf16: bool = False,
        tokens_before: int = 0,
        reference: _LayerRunner | None = None,
        single_pass: bool = False,
    ) -> None:
        self.layer, self.hidden, self.kwargs, self.device = layer, hidden, kwargs, device
        self.feed_dtype, self.bf16 = feed_dtype, bf16
        self.tokens_before = tokens_before  # calibration tokens the ranks before this one run (torchrun)
        self.reference = reference
        self.single_pass = single_pass
        self._calls: list[PausableCall] | None = None  # single pass: every batch's forward, paused
        self._running: PausableCall | None = None
        self._redirected: list[nn.Module] = []
        self._dividing: list = []  # single pass: hooks dividing the inputs of quantized linears (AWQ)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def run_until(self, modules: Sequence[nn.Module], on_input: Callable[[torch.Tensor], None]) -> None:
        """Forward every batch until the first of `modules` (linears sharing one input) is about to
        run; `on_input` sees its input. Single pass: the forwards pause there, and resume later
        with whatever module then sits at that place in the layer."""
        if self.single_pass:
            self._pause_at(modules, on_input)
            return

        def hook(_, args):
            on_input(args[0])
            raise _StopForward

        handles = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            for j in range(len(self.kwargs)):
                self._forward_stopped(j)
        finally:
            for handle in handles:
                handle.remove()

    def _start_calls(self) -> None:
        if self._calls is None:
            self._calls = [PausableCall(self._batch_forward(j)) for j in range(len(self.kwargs))]

    def _resume(self, j: int) -> None:
        """Batch j's paused forward, until it pauses again or ends."""
        self._running = self._calls[j]
        self._running.resume()

    def _pause_at(self, modules: Sequence[nn.Module], on_input: Callable[[torch.Tensor], None]) -> None:
        self._start_calls()
        for module in modules:
            self._redirect(module)

        def hook(_, args):
            on_input(args[0])
            self._running.pause()

        handles = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            for j in range(len(self._calls)):
                self._resume(j)
        finally:
            for handle in handles:
                handle.remove()

    def _redirect(self, module: nn.Module) -> None:
        """A forward paused in `module`'s pre-hook goes on into `module.forward`, bound before the
        hook ran; by then the quantized linear may have replaced it in the layer, so its forward
        hands the call to whatever sits at its place when it runs."""
        path = next(name for name, m in self.layer.named_modules() if m is module)
        own = module.forward

        def forward(*args, **kwargs):
            current = get_module(self.layer, path)
            return own(*args, **kwargs) if current is module else current(*args, **kwargs)

        module.forward = forward
        self._redirected.append(module)

    def divide_inputs(self, modules: Sequence[nn.Module], scales: torch.Tensor) -> None:
        """Single pass: `modules` (the quantized linears of a group) expect their input divided by
        `scales`, now folded into its producer, which the paused forwards ran before the fold; for
        the rest of this pass they divide it themselves (each batch reaches them once per pass)."""

        def divide(_, args):
            x = args[0]
            return ((x / scales.to(x.device)).to(x.dtype), *args[1:])

        self._dividing += [m.register_forward_pre_hook(divide) for m in modules]

    def _batch_forward(self, j: int) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            with torch.no_grad(), self._autocast():  # grad mode and autocast are per thread
                out = self.layer(self.hidden[j].to(self.device, self.feed_dtype), **self.kwargs[j])
            return out[0] if isinstance(out, tuple) else out

        return forward

    def close(self) -> None:
        """End paused forwards (after an error) and undo the redirections, the twin's too."""
        if self.reference is not None:
            self.reference.close()
        for call in self._calls or ():
            call.cancel()
        self._calls = None
        for module in self._redirected:
            module.__dict__.pop("forward", None)
        self._redirected = []
        for handle in self._dividing:
            handle.remove()
        self._dividing = []

    def run_through(self, module: nn.Module) -> None:
        """Forward every batch until `module` has run (the caller's hooks see inside it); the rest of
        the layer is skipped."""

        def hook(*_):
            raise _StopForward

        self._run_stopped(module.register_forward_hook(hook))

    def run_until_paired(self, module: nn.Module, twin_module: nn.Module, on_inputs: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Forward every batch through this layer until `module` is about to run and through the
        full-precision twin (`reference`) until its `twin_module` is; `on_inputs(x, x_fp)` sees both
        inputs of the batch's tokens."""
        if self.reference is None:
            raise UserError("this algorithm needs the full-precision model's inputs, and this pipeline runs no full-precision stream")
        if self.single_pass:
            self._pause_paired(module, twin_module, on_inputs)
            return
        seen: dict[str, torch.Tensor] = {}

        def catcher(key):
            def hook(_, args):
                seen[key] = args[0]
                raise _StopForward

            return hook

        handles = [module.register_forward_pre_hook(catcher("x")), twin_module.register_forward_pre_hook(catcher("fp"))]
        try:
            for j in range(len(self.kwargs)):
                self.reference._forward_stopped(j)
                self._forward_stopped(j)
                on_inputs(seen.pop("x"), seen.pop("fp"))
        finally:
            for handle in handles:
                handle.remove()

    def _pause_paired(self, module: nn.Module, twin_module: nn.Module, on_inputs: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Single pass: each batch's forward and its twin's pause at the group's input, in turn."""
        twin = self.reference
        self._start_calls()
        twin._start_calls()
        self._redirect(module)  # the twin's module is never replaced
        seen: dict[str, torch.Tensor] = {}

        def pauser(key, runner):
            def hook(_, args):
                seen[key] = args[0]
                runner._running.pause()

            return hook

        handles = [module.register_forward_pre_hook(pauser("x", self)), twin_module.register_forward_pre_hook(pauser("fp", twin))]
        try:
            for j in range(len(self._calls)):
                twin._resume(j)
                self._resume(j)
                on_inputs(seen.pop("x"), seen.pop("fp"))
        finally:
            for handle in handles:
                handle.remove()

    def _forward_stopped(self, j: int) -> None:
        """Batch j forward, up to where a hook raises."""
        try:
            with self._autocast():
                self.layer(self.hidden[j].to(self.device, self.feed_dtype), **self.kwargs[j])
        except _StopForward:
            pass

    def _run_stopped(self, handle) -> None:
        """Forward every batch up to where the hook behind `handle` raises; then remove it."""
        try:
            for j in range(len(self.kwargs)):
                self._forward_stopped(j)
        finally:
            handle.remove()

    def run_all(self) -> None:
        """The whole layer on every batch (single pass: the rest of it); its outputs overwrite its
        inputs (the next layer's). The full-precision twin, if any, does the same on its stream."""
        if self._calls is not None:
            for j, call in enumerate(self._calls):
                self._resume(j)
                self.hidden[j], call.result = call.result, None
            self._calls = None
        else:
            self._run_all_restarting()
        if self.reference is not None:
            self.reference.run_all()

    def _run_all_restarting(self) -> None:
        for j, kw in enumerate(self.kwargs):
            x = self.hidden[j]
            with self._autocast():
                out = self.layer(x.to(self.device, self.feed_dtype), **kw)
            self.hidden[j] = out[0] if isinstance(out, tuple) else out


def _quantize_group(layer, spec, group: InputGroup, scheme, algorithm: Algorithm, algorithm_config, runner: _LayerRunner, n_rep, dim) -> dict:
    linears = [get_module(layer, n) for n in group.linears]
    first = linears[0]
    rotation = getattr(first, "input_rotation", None)
    columns = first.in_features
    static_inputs = scheme.inputs is not None and not scheme.inputs.dynamic
    attention = get_module(layer, spec.attention)
    if group.reads_attention_output:
        _observe_static_kv(attention, first, runner)
    w_args = scheme.weights
    stats = algorithm.statistics(columns, algorithm_config, runner.device) if w_args is not None else None
    if stats is not None and runner.tokens_before and hasattr(stats, "skip"):
        stats.skip(runner.tokens_before)
    channel_range = {"lo": None, "hi": None}

    def on_input(x, x_fp=None):
        x = x.float()
        if rotation is not None:
            x = rotation(x)
        if x_fp is not None:  # GPTAQ: the twin's input, rotated alike (its online rotation is the same)
            x_fp = x_fp.float()
            x_fp = rotation(x_fp) if rotation is not None else x_fp
        if stats is not None and x_fp is not None:
            stats.add_batch(x, x_fp)
        elif stats is not None:
            stats.add_batch(x)
        if static_inputs:  # per-channel extremes: the per-tensor range after any AWQ scaling follows exactly
            # (without the full-precision prefix tokens, which the quantizer passes through: PrefixQuant)
            flat = x[..., scheme.fp_prefix :, :].reshape(-1, columns)
            lo, hi = flat.amin(0), flat.amax(0)
            channel_range["lo"] = lo if channel_range["lo"] is None else torch.minimum(channel_range["lo"], lo)
            channel_range["hi"] = hi if channel_range["hi"] is None else torch.maximum(channel_range["hi"], hi)

    if getattr(stats, "fp_inputs", False):
        runner.run_until_paired(first, get_module(runner.reference.layer, group.linears[0]) if runner.reference else first, on_input)
    else:
        runner.run_until(linears, on_input)
    if world_size() > 1:
        _reduce_group_statistics(stats, channel_range if static_inputs else None, columns, runner.device)
    scales = None
    if w_args is None:  # activations only: weights stay, only the input quantizers are added
        parts, errors = [lin.weight.detach() for lin in linears], {algorithm.name: 0.0, "rtn": 0.0}
    else:
        context = GroupContext(
            input_args=scheme.inputs,
            scalable=rotation is None and _scalable_source(layer, spec, group),
            tie=(lambda v: tie_kv_heads(v, n_rep, dim)) if group.kv_tied else None,
        )
        if world_size() > 1:
            parts, errors, scales = _quantize_shared(linears, stats, algorithm, w_args, algorithm_config, context)
        else:
            weight = torch.cat([lin.weight.detach().float() for lin in linears])
            result = algorithm.quantize(weight, stats, w_args, algorithm_config, context)
            del weight
            parts, errors, scales = result.qweight.split_rows([lin.out_features for lin in linears]), result.errors, result.input_scales
        del stats
        if scales is not None:
            if not algorithm.input_scales:
                raise RuntimeError(f"{algorithm.name} returned input scales but is registered with input_scales=False")
            _fold_input_scales(layer, spec, group, scales, n_rep, dim)
    quantized = []
    for name, lin, part in zip(group.linears, linears, parts):
        new = QuantLinear(part, lin.bias, None, scheme.inputs, rotation, fp_prefix=scheme.fp_prefix).to(runner.device)
        new.cache_dense = True  # the layer runs again (every later group when restarting, the final pass): dequantize once (dropped with the layer)
        if static_inputs:
            lo, hi = channel_range["lo"], channel_range["hi"]
            if scales is not None:
                lo, hi = lo / scales.to(lo.device), hi / scales.to(hi.device)
            new.input_quant.observed_min.copy_(lo.min())
            new.input_quant.observed_max.copy_(hi.max())
        set_module(layer, name, new)
        quantized.append(new)
        if w_args is not None:
            release_mapped_pages(lin.weight)  # a memory-mapped checkpoint's pages stay resident otherwise
    if scales is not None and runner.single_pass:  # the producer already ran in the paused forwards
        runner.divide_inputs(quantized, scales)
    if group.reads_attention_output and scales is not None:
        _observe_static_kv(attention, get_module(layer, group.linears[0]), runner)  # v_proj rows changed
    return errors


def _observe_static_kv(attention: nn.Module, o_proj: nn.Module, runner: _LayerRunner) -> None:
    """Static (per-tensor) KV quantizers of this layer observe their range, in a pass that stops
    before o_proj, so the groups after it see a calibrated, quantizing KV cache."""
    static = [
        q
        for q in (getattr(attention, KEY_QUANT, None), getattr(attention, VALUE_QUANT, None))
        if isinstance(q, TensorQuantizer) and not q.args.dynamic
    ]
    if not static:
        return
    for q in static:
        q.observed_min.fill_(float("inf"))
        q.observed_max.fill_(float("-inf"))
        q.observing = True
    try:
        runner.run_until([o_proj], lambda x: None)
    finally:
        for q in static:
            q.observing = False
    for q in static:  # the range over every rank's samples
        all_reduce_(q.observed_min, "min")
        all_reduce_(q.observed_max, "max")


def _scalable_source(layer, spec, group) -> bool:
    """Can the producer of this input absorb a per-channel 1/s? A linear can (its rows), a norm
    can if it has a gain. (An input rotated online cannot; the caller checks that.)"""
    if group.readers:  # the router (and other experts) read this norm's output too: a scale folded into it would change them
        return False
    source = get_module(layer, group.source)
    if is_linear_path(spec, group.source):  # a quantized one needs a scale per row to take the factor
        return not (isinstance(source, QuantLinear) and source.is_quantized and source.weight_args.granularity is Granularity.TENSOR)
    return getattr(source, "weight", None) is not None


def _fold_input_scales(layer, spec, group: InputGroup, scales, n_rep, dim) -> None:
    """The input of the group is now divided by `scales`: fold 1/s into its producer."""
    source = get_module(layer, group.source)
    if is_linear_path(spec, group.source):
        s = kv_head_channels(scales, n_rep, dim) if group.kv_tied else scales
        factor = 1 / s.to(scales.device)
        if isinstance(source, QuantLinear) and source.is_quantized:
            # already quantized (v_proj, up_proj): its scales take the factor, its codes stay
            source.set_quantized_weight(source.quantized_weight.scale_output_rows(factor))
            if source.bias is not None:
                source.bias.detach().copy_((source.bias.double() * factor.double()).to(source.bias.dtype))
        else:
            scale_output_rows(source, factor)
    else:
        scale_norm_output(source, 1 / scales.to(source.weight.device).double(), spec.norm_weight_offset)


def _quantize_experts(
    layer, spec, groups: list[InputGroup], scheme, algorithm: Algorithm, algorithm_config, runner: _LayerRunner, n_rep, dim, min_tokens, index
) -> dict:
    """Quantize one input of every expert of an MoE block (each expert's gate/up, or each one's
    down) in one pass over the calibration inputs: a hook on each expert's linear feeds that
    expert's own statistics, and the stock router decides which tokens reach it, so the Hessian
    (GPTQ) or sample (AWQ) of expert e holds only the tokens routed to e. Experts routed fewer
    than `min_tokens` tokens fall back to RTN; the report lists them with every expert's token count."""
    experts_module = get_module(layer, spec.moe.experts)
    _, hidden, inner = expert_dims(experts_module, spec.moe)
    threshold = max(hidden, inner) if min_tokens is None else min_tokens
    linears = [[get_module(layer, n) for n in g.linears] for g in groups]
    rotations = [getattr(lins[0], "input_rotation", None) for lins in linears]
    columns = linears[0][0].in_features
    w_args = scheme.weights
    static_inputs = scheme.inputs is not None and not scheme.inputs.dynamic
    # every expert's statistics are alive during the pass (GPTQ: experts x columns^2 floats); a
    # model with many wide experts could split the experts over several passes
    stats = [algorithm.statistics(columns, algorithm_config, runner.device) if w_args is not None else None for _ in groups]
    if any(getattr(s, "fp_inputs", False) for s in stats):  # check_fp_inputs refuses this before any work
        raise UserError(_MOE_FP_INPUTS.format(name=algorithm.name))
    tokens = [0] * len(groups)
    ranges: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(groups)

    def observer(k):
        def hook(_, args):
            x = args[0].float()
            if rotations[k] is not None:
                x = rotations[k](x)
            x = x.reshape(-1, columns)
            tokens[k] += x.shape[0]
            if stats[k] is not None:
                stats[k].add_batch(x)
            if static_inputs:
                lo, hi = x.amin(0), x.amax(0)
                ranges[k] = (lo, hi) if ranges[k] is None else (torch.minimum(ranges[k][0], lo), torch.maximum(ranges[k][1], hi))

        return hook

    handles = [lins[0].register_forward_pre_hook(observer(k)) for k, lins in enumerate(linears)]
    try:
        runner.run_through(experts_module)
    finally:
        for handle in handles:
            handle.remove()
    shared = None
    if world_size() > 1:  # every rank's tokens, statistics and ranges; experts shared out to quantize
        _reduce_expert_statistics(stats, tokens, ranges if static_inputs else None, columns, runner.device)
        if w_args is not None:
            args = (layer, spec, groups, linears, rotations, stats, tokens, threshold, scheme, algorithm, algorithm_config)
            shared = _quantize_experts_shared(*args)
    seen = [r for r in ranges if r is not None]
    # an expert below the threshold takes the range of all experts' inputs together (for gate/up:
    # the norm's whole output) rather than one from its few tokens
    union = (torch.stack([r[0] for r in seen]).amin(0), torch.stack([r[1] for r in seen]).amax(0)) if seen else None
    fallback, errors = [], []
    for k, (group, lins) in enumerate(zip(groups, linears)):
        scales, found = None, None
        if w_args is None:  # activations only: the weights stay
            parts = [lin.weight.detach() for lin in lins]
        else:
            if shared is not None:  # torchrun: quantized by its owner rank
                qweight, found, scales = shared[k]
            else:
                qweight, found, scales = _quantize_expert(
                    layer, spec, group, lins, rotations[k], stats[k], tokens[k], threshold, scheme, algorithm, algorithm_config
                )
            if scales is not None:
                _fold_input_scales(layer, spec, group, scales, n_rep, dim)
            if found is None:
                fallback.append(group.expert)
            stats[k] = None  # this expert's statistics are done with
            parts = qweight.split_rows([lin.out_features for lin in lins])
        errors.append(found)
        lo_hi = ranges[k] if tokens[k] >= threshold and ranges[k] is not None else union
        for name, lin, part in zip(group.linears, lins, parts):
            new = QuantLinear(part, lin.bias, None, scheme.inputs, rotations[k], fp_prefix=scheme.fp_prefix).to(runner.device)
            new.cache_dense = True  # dropped with the layer
            if static_inputs and lo_hi is not None:
                lo, hi = lo_hi
                if scales is not None:
                    lo, hi = lo / scales.to(lo.device), hi / scales.to(hi.device)
                new.input_quant.observed_min.copy_(lo.min())
                new.input_quant.observed_max.copy_(hi.max())
            set_module(layer, name, new)
    if fallback:
        log.warning(
            "layer %d: experts %s were routed fewer than %d calibration tokens (%s); their %s is quantized with RTN",
            index,
            fallback,
            threshold,
            ", ".join(str(tokens[e]) for e in fallback),
            groups[0].role,
        )
    return _experts_report(algorithm.name, w_args is not None, tokens, threshold, fallback, errors)


def _quantize_expert(layer, spec, group, lins, rotation, stats, tokens: int, threshold: int, scheme, algorithm: Algorithm, algorithm_config):
    """One expert's group: (its `QuantizedWeight`, the algorithm's errors or None where it falls
    back to RTN, input scales or None)."""
    weight = torch.cat([lin.weight.detach().float() for lin in lins])
    if tokens >= threshold and tokens > 0:
        context = GroupContext(input_args=scheme.inputs, scalable=rotation is None and _scalable_source(layer, spec, group))
        result = algorithm.quantize(weight, stats, scheme.weights, algorithm_config, context)
        return result.qweight, result.errors, result.input_scales
    return rtn_weight(weight, scheme.weights), None, None


def _experts_report(name: str, weights: bool, tokens: list[int], threshold: int, fallback: list[int], errors: list[dict | None]) -> dict:
    """One input of all experts: each error the algorithm reports, averaged over the calibrated
    experts weighted by their routed tokens (so it estimates the whole block's relative error), and
    per expert its tokens and errors; `rtn_fallback` lists the experts quantized with RTN."""
    report: dict = {name: 0.0, "rtn": 0.0} if not weights else {}
    calibrated = [(t, e) for t, e in zip(tokens, errors) if e is not None]
    total = sum(t for t, _ in calibrated)
    for key in {k for _, e in calibrated for k, v in e.items() if isinstance(v, float)}:
        report[key] = sum(t * e[key] for t, e in calibrated if key in e) / total if total else 0.0
    report["experts"] = {"tokens": tokens, "min_tokens": threshold, "rtn_fallback": fallback, "errors": errors}
    return report


# ---------------------------------------------------------------- torch.distributed (torchrun)


def _local_share(ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """This rank's contiguous share of the calibration rows, in whole batches where there are at
    least as many batches as ranks (so each batch is one a single process runs), and the tokens of
    the rows before it. One process: all rows, 0."""
    if world_size() == 1:
        return ids, 0
    check_processes(ids.shape[0])
    mine = share(ids.shape[0], batch_size)
    return ids[mine], mine.start * ids.shape[1]


def check_distributed(algorithm: Algorithm, config: object, spec: ArchSpec) -> None:
    """Under torch.distributed the algorithm's statistics must combine over ranks (`reduce()`);
    statistics that draw per row in order (`skip`, AWQ's sample) cannot on a mixture of experts,
    where no rank knows how many of an expert's routed rows the ranks before it saw."""
    if world_size() == 1 or algorithm.statistics is None:
        return
    probe = algorithm.statistics(1, config, "cpu")
    if not callable(getattr(probe, "reduce", None)):
        raise UserError(
            f"algorithm {algorithm.name!r}: its statistics have no reduce(), so they cannot be combined over processes; run it in one process"
        )
    if spec.moe is not None and hasattr(probe, "skip"):
        raise UserError(
            f"{algorithm.name} on a mixture of experts runs in one process: each expert's sample is drawn over its routed tokens "
            "in order, which a process cannot place without the others' counts; run it without torchrun, or use gptq"
        )


_MOE_FP_INPUTS = (
    "{name} with asymmetric=true (GPTAQ) does not support mixture-of-experts models: the full-precision and quantized "
    "streams route tokens to different experts, so an expert has no paired inputs; use asymmetric=false"
)


def needs_fp_inputs(algorithm: Algorithm, config: object) -> bool:
    """Do the algorithm's statistics take the full-precision model's inputs beside the quantized
    model's (`add_batch(x, x_fp)`, GPTAQ)? The pipelines then run a full-precision stream."""
    if algorithm.statistics is None:
        return False
    return bool(getattr(algorithm.statistics(1, config, "cpu"), "fp_inputs", False))


def check_fp_inputs(algorithm: Algorithm, config: object, spec: ArchSpec) -> None:
    """Before any work: an algorithm that needs the full-precision stream cannot calibrate experts."""
    if spec.moe is not None and needs_fp_inputs(algorithm, config):
        raise UserError(_MOE_FP_INPUTS.format(name=algorithm.name))


def _reduce_group_statistics(stats, channel_range: dict | None, columns: int, device: torch.device) -> None:
    """The statistics and static input ranges (if any) of one input over every rank's samples."""
    if stats is not None:
        stats.reduce()
    if channel_range is None:
        return
    if channel_range["lo"] is None:  # no sample of this rank reached the input: neutral extremes
        channel_range["lo"] = torch.full((columns,), float("inf"), device=device)
        channel_range["hi"] = torch.full((columns,), float("-inf"), device=device)
    all_reduce_(channel_range["lo"], "min")
    all_reduce_(channel_range["hi"], "max")


def _quantize_shared(linears: list[nn.Module], stats, algorithm: Algorithm, w_args, config, context: GroupContext):
    """Quantize one group's linears over the ranks: (a `QuantizedWeight` per linear, the group's
    errors, its input scales or None), the same on every rank.

    Where the algorithm quantizes rows apart (`separable_rows`, GPTQ) and the rows share no scale
    (not per-tensor, no global scale), each linear is a unit of work; otherwise (AWQ searches one
    input scale for all of them) the group is one. Units go to ranks greedily by weight size; each
    rank runs the algorithm once on the stacked linears it owns and sends the result to all. The
    groups of a layer stay in order: each one's inputs depend on the ones before it quantized."""
    shared_scale = w_args.granularity is Granularity.TENSOR or w_args.global_scale is not None
    units = [[i] for i in range(len(linears))] if algorithm.separable_rows and not shared_scale else [list(range(len(linears)))]
    owners = assign_by_size([sum(linears[i].weight.numel() for i in unit) for unit in units])
    mine = [i for unit, owner in zip(units, owners) for i in unit if owner == rank()]
    payload, failure = None, None
    if mine:
        try:
            weight = torch.cat([linears[i].weight.detach().float() for i in mine])
            result = algorithm.quantize(weight, stats, w_args, config, context)
            parts = result.qweight.split_rows([linears[i].out_features for i in mine])
            size = result.error_weight if result.error_weight is not None else float(weight.numel())
            payload = {"parts": dict(zip(mine, parts)), "errors": result.errors, "weight": size, "scales": result.input_scales}
        except Exception as exc:  # sent in place of the result: the other ranks raise too instead of waiting
            failure = exc
            payload = {"error": exc if isinstance(exc, UserError) else RuntimeError(f"rank {rank()} failed to quantize: {exc!r}")}
    device = linears[0].weight.device
    received = [broadcast_object(payload, src=r, device=device) for r in sorted(set(owners))]
    if failure is not None:
        raise failure
    for got in received:
        if "error" in got:
            raise got["error"]
    parts = {i: q for got in received for i, q in got["parts"].items()}
    return [parts[i] for i in range(len(linears))], _combine_errors(received), received[0]["scales"]


def _combine_errors(received: list[dict]) -> dict:
    """One group's errors from its parts': numbers weighted by each part's error weight (relative
    errors share their denominator's sum), anything else (flags) from the first part."""
    if len(received) == 1:
        return received[0]["errors"]
    total = sum(got["weight"] for got in received)
    errors = dict(received[0]["errors"])
    for key, value in errors.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            errors[key] = sum(got["errors"][key] * got["weight"] for got in received) / total if total > 0 else 0.0
    return errors


def _reduce_expert_statistics(stats: list, tokens: list[int], ranges: list | None, columns: int, device: torch.device) -> None:
    """One input of every expert over every rank's samples: routed token counts summed, statistics
    reduced, static ranges MIN/MAX (None for an expert no rank routed a token to)."""
    counts = all_reduce_(torch.tensor(tokens, dtype=torch.int64))
    tokens[:] = counts.tolist()
    for s in stats:
        if s is not None:
            s.reduce()
    if ranges is None:
        return
    for k, found in enumerate(ranges):
        lo, hi = (
            found
            if found is not None
            else (torch.full((columns,), float("inf"), device=device), torch.full((columns,), float("-inf"), device=device))
        )
        all_reduce_(lo, "min")
        all_reduce_(hi, "max")
        ranges[k] = (lo, hi) if tokens[k] else None


def _quantize_experts_shared(layer, spec, groups, linears, rotations, stats, tokens, threshold, scheme, algorithm: Algorithm, config) -> list:
    """Under torch.distributed: one input of every expert, each expert quantized by one rank (the
    experts' groups are independent of each other), assigned greedily by weight size, and sent to
    all; per expert (`QuantizedWeight`, errors or None for RTN, input scales or None)."""
    owners = assign_by_size([sum(lin.weight.numel() for lin in lins) for lins in linears])
    payload, failure = {}, None
    try:
        for k, (group, lins) in enumerate(zip(groups, linears)):
            if owners[k] == rank():
                payload[k] = _quantize_expert(layer, spec, group, lins, rotations[k], stats[k], tokens[k], threshold, scheme, algorithm, config)
            stats[k] = None  # quantized here or by its owner: done with
    except Exception as exc:  # sent in place of the results: the other ranks raise too instead of waiting
        failure = exc
        payload = {"error": exc if isinstance(exc, UserError) else RuntimeError(f"rank {rank()} failed to quantize: {exc!r}")}
    device = linears[0][0].weight.device
    received = [broadcast_object(payload, src=r, device=device) for r in sorted(set(owners))]
    if failure is not None:
        raise failure
    results = {}
    for got in received:
        if "error" in got:
            raise got["error"]
        results.update(got)
    return [results[k] for k in range(len(groups))]
