"""Apply an equivalent transformation (smooth, rotate, smoothrot) to a stock transformers model.

Every decoder layer is handled one input group at a time (norm -> q,k,v; v -> o;
norm -> gate,up; up -> down). For a group reading X with weights W:

- smooth:    X / s and W * s; 1/s is folded into the producer of X (the norm's gain, or the rows
             of v_proj / up_proj), so smoothing costs nothing at run time.
- rotate:    the norm's gain is folded into W, then X R and W R with a Hadamard R (QuaRot's R1 on
             the residual-stream readers, R4 on down_proj, a full rotation on o_proj's input on
             top of the per-head R2 fused into v_proj / o_proj), and R3 on queries and keys after
             RoPE inside attention, so the KV cache is quantized in the rotated basis.
- smoothrot: smoothing first, then rotation ("Turning LLM Activations Quantization-Friendly"), by default only where massive outliers
             live (down_proj), optionally at every rotated input.
- auto:      for each group, whichever of none, smooth, rotate and smoothrot gives the lowest
             quantized output error ||X W^T - Q(X) Q(W)^T||^2 on the group's sampled calibration
             rows, under the scheme's weight and input quantizers (the measurement of the alpha
             search, `search_alpha`, which also picks the smoothing alphas). "Turning LLM
             Activations Quantization-Friendly" shows rotation alone can be worse than nothing
             where massive outliers live; which input has them differs by model and layer, so it is
             measured instead of assumed. Weights are measured after round-to-nearest with MinMax
             scales even when GPTQ or MSE-searched scales follow: simple and fast, and those then
             lower the weight part of the chosen one. A choice
             per group needs R1 online in front of each group (not fused into the residual stream)
             and the norms' gains left in place, so auto sets fuse_r1 and fold_norms off; R3 is as
             in rotate.

R1 is fused into the weights as QuaRot does it: every norm's gain is folded into the linears that
read it, and the residual stream is rotated (embeddings, the readers q/k/v, gate/up and lm_head,
the writers o_proj and down_proj; tied embeddings are untied). Where that is impossible (Gemma's
sandwich norms normalise a block's output before the residual add, and smoothrot with
`smooth_all` puts a scale between norm and rotation) R1 runs online instead, an `OnlineHadamard`
in front of the readers, which quantizes exactly the same rotated activations. R2 is fused; R3
and R4 run online.

Learned R1 (`learn_rotation`, `transforms.learn`): the Hadamard R1 is the start of an orthogonal
matrix fitted to calibration rows of the readers' inputs (every layer's attention and MLP input,
as the readers see them once the transform is done: without the norm gain where it is folded).
Fused, one matrix is the residual stream's basis for the whole model. Online, one matrix shared by
every layer by default, or one per input group (`learn_per_layer`), in an `OnlineRotation`.

Mixture of experts: the block's input norm is read by the router and by every expert's gate/up
(and a shared expert): they are one group here (`arch.norm_merged_groups`). The router takes the
folded norm gain, the fused R1 and any smoothing scale like every other reader, so it computes the
same logits (up to rounding) and stays in full precision. Each expert's down is a residual writer
and gets its own R4 online and its own smoothing scale (folded into that expert's up rows, from
the tokens routed to it). Online R1 is refused for MoE models: the router would have to rotate
its input online too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import (
    ArchSpec,
    backbone,
    decoder_layers,
    get_module,
    head_dim,
    is_linear_path,
    kv_groups,
    kv_head_channels,
    layer_residual_writers,
    linear_shapes,
    norm_merged_groups,
    set_module,
    tie_kv_heads,
)
from ..distributed import all_reduce_, gather_rows, reduce_count, share, world_size
from ..errors import UserError
from ..hadamard import check_block, factor_order, hadamard_transform, orthogonal_hadamard, random_signs
from ..progress import progress_bar
from ..runtime.experts import swap_in_experts
from ..runtime.linear import QuantLinear
from ..runtime.rotation import OnlineHadamard, OnlineRotation
from ..scheme import Scheme
from .learn import check_learning, learn_rotation
from .rotate import (
    fold_norm_into_readers,
    norm_bias,
    norm_gain,
    rotate_embedding,
    rotate_head_inputs,
    rotate_head_outputs,
    rotate_input_columns,
    rotate_output_rows,
    scale_input_columns,
    scale_norm_output,
    scale_output_rows,
)
from .smooth import check_alpha, quantized_output_error, search_alpha, smooth_scales

TRANSFORMS = ("none", "smooth", "rotate", "smoothrot", "auto")
SAMPLE_ROWS = 256  # calibration rows kept per group for the alpha search
# Calibration rows a learned R1 is fitted to: this many in all for a rotation shared by every layer
# (on SmolLM2-135M they take the held-out 4-bit activation error ~40% below the Hadamard's), this
# many per input group for one rotation per group (README: measured worse than one shared rotation)
LEARN_ROWS = 4096
LEARN_ROWS_PER_GROUP = 256


@dataclass(frozen=True)
class TransformConfig:
    """Which equivalent transformation, and its knobs. `alpha=None` searches alpha per layer."""

    kind: str = "none"
    # smoothing strength, also of auto's smoothing candidates; left at "default": 0.5, and a
    # search per input group for auto (as recipes and the CLI)
    alpha: float | str | None = "default"
    smooth_all: bool = False  # smoothrot: smooth every rotated input, not only down_proj
    r1: bool = True  # rotate the inputs of q/k/v and gate/up
    r2: bool = True  # per-head rotation of v/o and a full rotation of o_proj's input
    r3: bool = True  # rotate queries and keys (after RoPE) inside attention
    r4: bool = True  # rotate the input of down_proj
    fuse_r1: bool = True  # rotate the residual stream (False: rotate the readers' inputs online)
    fold_norms: bool = True  # with online R1: fold norm gains into the readers first (as QuaRot)
    seed: int | None = None  # random-sign Hadamard if set
    # Block-diagonal Hadamard rotations of this size (the block of the format: 16 for NVFP4, 32 for
    # MX), as MR-GPTQ and BRQ use them: outliers spread within each scale block only, and every
    # rotation stays cheap online. None: full rotations.
    rotation_block: int | None = None
    # Learned R1 ("KurTail: Kurtosis-based LLM Quantization"): start from the Hadamard R1 and lower
    # the kurtosis of the rotated calibration activations, `learn_steps` Adam steps of rate
    # `learn_lr`. Online R1 only: `learn_per_layer` fits one rotation per input group, not one shared.
    learn_rotation: str | None = None
    learn_steps: int = 100
    learn_lr: float = 1e-3
    learn_per_layer: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORMS:
            raise UserError(f"unknown transform {self.kind!r}; available: {', '.join(TRANSFORMS)}")
        if isinstance(self.alpha, str):
            if self.alpha != "default":
                raise UserError(f"alpha must be a number in [0, 1], None (search per layer) or left at its default; got {self.alpha!r}")
            object.__setattr__(self, "alpha", None if self.kind == "auto" else 0.5)
        check_alpha(self.alpha)
        if self.kind == "auto":  # a choice per group: R1 in front of each group, norms as they are (module docstring)
            object.__setattr__(self, "fuse_r1", False)
            object.__setattr__(self, "fold_norms", False)
        if self.rotation_block is not None:
            if isinstance(self.rotation_block, bool) or not isinstance(self.rotation_block, int) or self.rotation_block < 2:
                raise UserError(f"rotation_block must be an integer of at least 2 (16 or 32 for NVFP4 / MX); got {self.rotation_block!r}")
            if not self.rotates:
                raise UserError(f"rotation_block sizes the Hadamard rotations: it needs transform 'rotate', 'smoothrot' or 'auto', not {self.kind!r}")
        if self.learn_rotation is not None:
            check_learning(self.learn_rotation, self.learn_steps, self.learn_lr)
            if self.kind != "rotate" or not self.r1:
                raise UserError(f"learn_rotation learns R1: it needs transform 'rotate' with r1 on, not {self.kind!r} with r1={self.r1}")
            if self.rotation_block is not None:
                raise UserError("learn_rotation learns a dense rotation: it cannot be combined with block-diagonal rotations (rotation_block)")
        if not isinstance(self.learn_per_layer, bool):
            raise UserError(f"learn_per_layer must be true or false; got {self.learn_per_layer!r}")
        if self.learn_per_layer and self.learn_rotation is None:
            raise UserError("learn_per_layer needs learn_rotation (e.g. learn_rotation: kurtail)")

    @property
    def rotates(self) -> bool:
        """May rotate some input (auto: where it measures best); R3 and the Hadamard checks follow."""
        return self.kind in ("rotate", "smoothrot", "auto")

    @property
    def needs_calibration(self) -> bool:
        return self.kind in ("smooth", "smoothrot", "auto") or self.learn_rotation is not None

    @property
    def keep_rows(self) -> int:
        """Calibration rows sampled per group for the alpha search and auto's measurements (a learned
        R1 may want more: `_keep_rows`)."""
        return SAMPLE_ROWS if self.alpha is None or self.kind == "auto" else 0


def check_transform(model: nn.Module, spec: ArchSpec, config: TransformConfig, calibration=()) -> None:
    """Fail before any work: unsupported family, missing calibration, no Hadamard matrix.
    `calibration=()` (the default) skips the calibration check, for callers that get it later."""
    if config.kind == "none":
        return
    if config.needs_calibration and calibration is None:
        what = "a learned rotation" if config.learn_rotation is not None else f"transform {config.kind!r}"
        why = "the activations it is fitted to" if config.learn_rotation is not None else "its smoothing scales"
        raise UserError(f"{what} needs calibration data (--calib) for {why}")
    if config.kind == "auto":
        missing = [k for k in ("smooth", "rotate") if k not in spec.transforms]
        if missing:
            raise UserError(f"transform 'auto' chooses among smooth and rotate per group; {spec.family} does not support {' or '.join(missing)}")
        if spec.moe is not None:
            raise UserError(f"transform 'auto' is not supported for {spec.family} (mixture of experts): its R1 runs online, which MoE refuses")
    elif config.kind not in spec.transforms:
        raise UserError(f"transform {config.kind!r} is not supported for {spec.family} yet; supported: {', '.join(spec.transforms)}")
    if config.learn_per_layer and _fuses_r1(spec, config):
        raise UserError("learn_per_layer fits one R1 per layer, which only online R1 allows: add fuse_r1: false (--set fuse_r1=false)")
    if spec.moe is not None and config.rotates and config.r1 and not _fuses_r1(spec, config):
        raise UserError(
            f"{spec.family} is a mixture of experts: R1 can only be fused there (its router reads the rotated residual stream), "
            "not run online; drop fuse_r1=false / smooth_all, or turn R1 off (r1=false)"
        )
    if config.rotates:
        sizes = {head_dim(model.config)}
        for layer in decoder_layers(model, spec):  # every layer: dense and expert MLPs differ in width
            sizes |= {in_features for _, in_features in linear_shapes(layer, spec).values()}
        for n in sorted(sizes):
            if config.rotation_block is None:
                factor_order(n)  # raises a UserError that says why
            else:
                check_block(n, config.rotation_block)


class InputStats:
    """Per (layer, group role; `role.<e>` for expert e's group): channel max |X_j| over the
    calibration tokens, and a sample of about `keep_rows` rows, an equal share taken from every
    batch as it passes (memory stays near that size). Hooks attach to one layer at a time
    (`attach`), so a pass that holds one layer in memory collects the same statistics as a forward
    of the whole model: each (layer, role) samples its rows with generators of its own, one per
    batch, seeded by the batch's index (counted by the layer's own calls, which an expert's linear
    also sees when no token of a batch is routed to it), so the sample does not depend on which
    process ran the batch either.

    Under torch.distributed each rank runs its share of the batches (`first_batch` and
    `local_batches` of `batches`) and `combine()` gives every rank what one process collects:
    maxima reduced (MAX), sampled rows gathered in batch order."""

    def __init__(self, spec: ArchSpec, batches: int, keep_rows: int, first_batch: int = 0, local_batches: int | None = None) -> None:
        self.spec, self.keep_rows = spec, keep_rows
        self.share = -(-keep_rows // max(1, batches))  # rows kept per batch
        self.batches = batches
        self.first_batch = first_batch
        self.local_batches = batches if local_batches is None else local_batches
        self.stats: dict[tuple[int, str], dict] = {}
        # every attached key, in attach order (the same on every rank): its channels and seed
        self.keys: dict[tuple[int, str], tuple[int, int]] = {}

    def attach(self, i: int, layer: nn.Module) -> list:
        """Forward pre-hooks on every input group of layer `i` (remove them after)."""
        calls = {"batch": self.first_batch - 1}

        def count(module, args):  # runs before the layer's linears: the index of the batch they see
            calls["batch"] += 1

        hooks = [layer.register_forward_pre_hook(count)]
        for r, group in enumerate(norm_merged_groups(layer, self.spec)):
            key = _stats_key(i, group)
            seed = (1000 * i + r) << 32  # + the batch's index
            self.keys[key] = (get_module(layer, group.linears[0]).in_features, seed)

            def hook(module, args, key=key, seed=seed):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                entry = self.stats.get(key)
                if entry is None:
                    # One buffer per group, allocated once: appending a small tensor per batch
                    # instead pinned the allocator's heap between the forward's temporaries.
                    rows = torch.empty(self.share * self.local_batches if self.keep_rows else 0, x.shape[-1], dtype=torch.float64)
                    entry = self.stats[key] = {"absmax": torch.zeros(x.shape[-1], dtype=torch.float64), "rows": rows, "filled": 0}
                # the maximum in x's precision is exact; float64 copies of every batch cost as much as the forward
                torch.maximum(entry["absmax"], x.abs().amax(0).double(), out=entry["absmax"])
                if self.keep_rows:
                    gen = torch.Generator().manual_seed(seed + calls["batch"])
                    pick = torch.randperm(x.shape[0], generator=gen)[: self.share]
                    start = entry["filled"]
                    entry["rows"][start : start + len(pick)] = x[pick].double()
                    entry["filled"] = start + len(pick)

            # the router reads every token of its input; an expert's linear only those routed to it
            site = group.readers[0] if group.readers else group.linears[0]
            hooks.append(get_module(layer, site).register_forward_pre_hook(hook))
        return hooks

    def combine(self) -> None:
        """Under torch.distributed: every rank's statistics on every rank (call before `finish`).
        A key no sample of this rank's share reached takes part with empty statistics."""
        if world_size() == 1:
            return
        for key, (n, _) in self.keys.items():
            entry = self.stats.get(key)
            if not reduce_count(entry is not None):
                continue
            if entry is None:
                entry = self.stats[key] = {"absmax": torch.zeros(n, dtype=torch.float64), "rows": torch.empty(0, n, dtype=torch.float64), "filled": 0}
            all_reduce_(entry["absmax"], "max")
            if self.keep_rows:
                entry["rows"] = gather_rows(entry["rows"][: entry["filled"]])
                entry["filled"] = entry["rows"].shape[0]

    def finish(self, i: int | None = None) -> dict[tuple[int, str], dict]:
        """Trim the sampled rows (of layer `i`, or of every layer) to `keep_rows`; the statistics."""
        for key, entry in self.stats.items():
            if (i is not None and key[0] != i) or "filled" not in entry:
                continue
            rows = entry["rows"][: entry.pop("filled")] if self.keep_rows else None
            if rows is not None and rows.shape[0] > self.keep_rows:
                gen = torch.Generator().manual_seed(self.keys[key][1] + self.batches)  # an index no batch has
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[: self.keep_rows]]
            entry["rows"] = rows
        return self.stats


@torch.no_grad()
def collect_input_stats(
    model: nn.Module, spec: ArchSpec, batches: Iterable[torch.Tensor], keep_rows: int, progress: bool = True
) -> dict[tuple[int, str], dict]:
    """`InputStats` of every decoder layer over `batches`, in forwards of the whole model. Under
    torch.distributed (the same `batches` on every rank) each rank runs its contiguous share and
    every rank gets the statistics of all of them."""
    batches = list(batches)
    mine = share(len(batches))
    collector = InputStats(spec, len(batches), keep_rows, mine.start, mine.stop - mine.start)
    hooks = [h for i, layer in enumerate(decoder_layers(model, spec)) for h in collector.attach(i, layer)]
    device = next(model.parameters()).device
    stem = backbone(model, spec)  # the LM head's output is not needed
    try:
        for batch in progress_bar(batches[mine], desc="calibration statistics", unit="sample", disable=not progress, leave=False):
            stem(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    collector.combine()
    return collector.finish()


def apply_transform(
    model: nn.Module,
    spec: ArchSpec,
    config: TransformConfig,
    scheme: Scheme,
    calibration: Iterable[torch.Tensor] | None = None,
    progress: bool = True,
) -> dict:
    """Edit `model` in place; returns what was done per layer (alphas; auto: the choices), for the report."""
    check_transform(model, spec, config, calibration)
    if config.kind == "none":
        return {}
    swap_in_experts(model, spec)  # MoE: one linear per expert to transform (done already by `quantize`)
    stats = {}
    if config.needs_calibration:
        stats = collect_input_stats(model, spec, calibration, _keep_rows(model, spec, config), progress)
    plan = LayerTransform(model.config, spec, config, scheme, stats)
    if config.learn_rotation is not None:
        plan.learn_r1(model, progress)
    if plan.fused_r1:
        embed, lm_head = get_module(model, spec.embed), get_module(model, spec.lm_head)
        if lm_head.weight.data_ptr() == embed.weight.data_ptr():  # tied: they will differ from now on
            lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        plan.transform_head(get_module(model, spec.final_norm), lm_head)
        plan.transform_embedding(embed)
    layers = progress_bar(decoder_layers(model, spec), desc=f"transform ({config.kind})", unit="layer", disable=not progress, leave=False)
    for i, layer in enumerate(layers):
        plan.transform_layer(i, layer)
    return plan.info()


class LayerTransform:
    """The transform of one model, applied a part at a time: the embedding, each decoder layer,
    the final norm and head. The parts edit disjoint tensors, so any order gives the same weights;
    the sequential onloading pipeline transforms each layer as it reads it from disk.

    `stats` are the calibration statistics of `collect_input_stats` (smoothing, a learned R1)."""

    def __init__(self, model_config, spec: ArchSpec, config: TransformConfig, scheme: Scheme, stats: dict | None = None) -> None:
        self.spec, self.config, self.scheme, self.stats = spec, config, scheme, stats or {}
        self.dim, self.n_rep, self.hidden = head_dim(model_config), kv_groups(model_config), model_config.hidden_size
        self.alphas: dict[str, float] = {}
        self.choices: dict[str, dict] = {}  # auto: per group, the option chosen, its alpha and every option's error
        self._signs: dict[int, torch.Tensor | None] = {}
        self.fused_r1 = config.rotates and config.r1 and _fuses_r1(spec, config)
        # learned R1 (`learn_r1`): the matrix (float64) of every (layer, role) of an R1 input group,
        # one matrix for all of them unless learned per layer; their online modules, one per matrix
        self.learned: dict[tuple[int, str], torch.Tensor] = {}
        self.learned_shared: torch.Tensor | None = None
        self.learned_info: dict[str, dict] = {}
        self._online: dict[int, OnlineRotation] = {}

    def signs(self, n: int) -> torch.Tensor | None:
        if self.config.seed is None:
            return None
        if n not in self._signs:
            self._signs[n] = random_signs(n, self.config.seed + n)
        return self._signs[n]

    def info(self) -> dict:
        info = {"alphas": self.alphas} if self.alphas else {}
        if self.choices:
            info["choices"] = self.choices
        if self.learned_info:
            info["learned_rotation"] = self.learned_info
        return info

    def learn_r1(self, model: nn.Module, progress: bool = True) -> None:
        """Fit the learned R1 (`config.learn_rotation`) to the sampled rows of `self.stats`, before
        any weight is edited (the rows are mapped into the basis the readers will see: without the
        norm's gain and bias where those fold into the readers)."""
        spec, config = self.spec, self.config
        rows: dict[tuple[int, str], torch.Tensor] = {}
        for i, layer in enumerate(decoder_layers(model, spec)):
            for group in norm_merged_groups(layer, spec):
                key = _stats_key(i, group)
                if group.rotation != "r1" or is_linear_path(spec, group.source) or key not in self.stats:
                    continue
                x = self.stats[key]["rows"]
                if self.fused_r1 or config.fold_norms:
                    norm = get_module(layer, group.source)
                    bias = norm_bias(norm)
                    x = (x - (bias if bias is not None else 0.0)) / norm_gain(norm, spec.norm_weight_offset)
                rows[key] = x.detach()
        if not rows:
            raise UserError("learn_rotation found no calibration rows at the R1 inputs (the calibration data is empty?)")
        start = orthogonal_hadamard(self.hidden, self.signs(self.hidden))
        steps, lr = config.learn_steps, config.learn_lr
        if config.learn_per_layer:
            for key, x in progress_bar(rows.items(), desc="learn R1 per layer", unit="group", disable=not progress, leave=False):
                name = ".".join(map(str, key))
                self.learned[key], history = learn_rotation(x, start, steps, lr, desc=f"learn R1 {name}", progress=False)
                self.learned_info[name] = _learned_summary(config, history)
        else:
            self.learned_shared, history = learn_rotation(torch.cat(list(rows.values())), start, steps, lr, desc="learn R1", progress=progress)
            self.learned = dict.fromkeys(rows, self.learned_shared)
            self.learned_info["r1"] = _learned_summary(config, history)

    def _online_r1(self, matrix: torch.Tensor) -> OnlineRotation:
        """The online module of a learned matrix, one for every linear that reads through it."""
        if id(matrix) not in self._online:
            self._online[id(matrix)] = OnlineRotation(matrix)
        return self._online[id(matrix)]

    def transform_embedding(self, embed: nn.Module) -> None:
        """Fused R1: the embedding writes the rotated residual stream."""
        if self.fused_r1:
            rotate_embedding(embed, self.signs(self.hidden), self.config.rotation_block, self.learned_shared)

    def transform_head(self, final_norm: nn.Module, lm_head: nn.Module) -> None:
        """Fused R1: the final norm's gain folds into lm_head (untied already), which reads the
        rotated stream."""
        if self.fused_r1:
            fold_norm_into_readers(final_norm, [lm_head], self.spec.norm_weight_offset)
            rotate_input_columns(lm_head, self.signs(self.hidden), self.config.rotation_block, self.learned_shared)

    def transform_layer(self, i: int, layer: nn.Module) -> None:
        """Everything the transform does inside decoder layer `i` (its experts swapped in already)."""
        spec, config, block, offset = self.spec, self.config, self.config.rotation_block, self.spec.norm_weight_offset
        dim, n_rep, signs, r1 = self.dim, self.n_rep, self.signs, self.learned_shared
        if self.fused_r1:  # fold norm gains into the stream's readers (and a router); rotate readers and writers
            for group in norm_merged_groups(layer, spec):
                if not is_linear_path(spec, group.source):
                    readers = [get_module(layer, n) for n in group.linears + group.readers]
                    fold_norm_into_readers(get_module(layer, group.source), readers, offset)
                    for lin in readers:
                        rotate_input_columns(lin, signs(self.hidden), block, r1)
            for name in layer_residual_writers(layer, spec):
                rotate_output_rows(get_module(layer, name), signs(self.hidden), block, r1)
        groups = norm_merged_groups(layer, spec)
        if config.kind == "auto":
            # consumers first: the o and down groups edit the rows of their producers (v_proj, up_proj),
            # so qkv and gate_up are then measured in the weights they will be quantized with
            groups = groups[::-1]
        choices = {}  # auto: this layer's, reported in the layer's group order
        for group in groups:
            linears = [get_module(layer, n) for n in group.linears]
            online_r1 = config.r1 and not self.fused_r1
            rotate = config.rotates and {"r1": online_r1, "r2": config.r2, "r4": config.r4}[group.rotation]
            smooth = config.kind == "smooth" or (config.kind == "smoothrot" and (config.smooth_all or group.massive_outliers))
            source_is_norm = not is_linear_path(spec, group.source)
            entry = self.stats.get(_stats_key(i, group))
            if smooth and entry is None and group.expert is not None:
                smooth = False  # an expert no calibration token was routed to: no statistics, its input stays unscaled
            act_absmax = entry["absmax"] if entry else None
            rows = entry["rows"] if entry else None
            chosen = None
            if config.kind == "auto":
                chosen = self.choose(group, linears, act_absmax, rows, rotate)
                choices[".".join(map(str, _stats_key(i, group)))] = {k: v for k, v in chosen.items() if k != "scales"}
                rotate, smooth = chosen["choice"] in ("rotate", "smoothrot"), chosen["choice"] in ("smooth", "smoothrot")
            if rotate and source_is_norm and config.fold_norms:
                norm = get_module(layer, group.source)
                gain, bias = norm_gain(norm, offset), norm_bias(norm)
                fold_norm_into_readers(norm, linears, offset, f"layer {i} {group.source}")
                if act_absmax is not None:  # the stats saw the norm's output y = x gain + bias
                    # with a bias only a bound of the channel maximum follows: (max|y| + |bias|) / |gain|
                    shift = bias.abs() if bias is not None else 0.0
                    act_absmax = (act_absmax + shift) / gain.abs().clamp(min=1e-12)
                    rows = (rows - (bias if bias is not None else 0.0)) / gain if rows is not None else None
            if smooth:
                if chosen is not None:
                    s, alpha = chosen["scales"], chosen["alpha"]
                else:
                    rotation = hadamard_transform if rotate and block is None else None
                    s, alpha = _smoothing(group, linears, act_absmax, rows, config, self.scheme, n_rep, dim, rotation)
                self.alphas[".".join(map(str, _stats_key(i, group)))] = alpha
                if source_is_norm:
                    scale_norm_output(get_module(layer, group.source), 1 / s, offset)
                    for reader in group.readers:  # the router reads x / s now: its columns take s (exact, full precision)
                        scale_input_columns(get_module(layer, reader), s)
                else:
                    producer = get_module(layer, group.source)
                    scale_output_rows(producer, 1 / (kv_head_channels(s, n_rep, dim) if group.kv_tied else s))
                for lin in linears:
                    scale_input_columns(lin, s)
            if not rotate:
                continue
            if group.rotation == "r2":
                rotate_head_outputs(get_module(layer, group.source), dim, block)  # R2 on v_proj
                for lin in linears:
                    rotate_head_inputs(lin, dim, block)
            n = linears[0].in_features
            learned = self.learned.get(_stats_key(i, group)) if group.rotation == "r1" else None
            for name, lin in zip(group.linears, linears):
                rotate_input_columns(lin, signs(n), block, learned)
                online = OnlineHadamard(n, signs(n), block) if learned is None else self._online_r1(learned)
                set_module(layer, name, QuantLinear(lin.weight.detach(), lin.bias, None, None, online))
        self.choices.update(reversed(choices.items()))
        if config.rotates and config.r3:
            get_module(layer, spec.attention).lowbit_qk_rotation = OnlineHadamard(dim, signs(dim), block)

    def choose(self, group, linears: list[nn.Module], act_absmax: torch.Tensor, rows: torch.Tensor, rotatable: bool) -> dict:
        """auto: of none, smooth, rotate and smoothrot (the last two only if `rotatable`), the one with the lowest quantized
        output error on the group's sampled rows: {"choice", "alpha" (None unless smoothed),
        "errors" (every option measured), "scales" (the smoothing's, or None)}."""
        weight = torch.cat([lin.weight.float() for lin in linears])
        rows = rows.float()
        smoothing = (group, linears, act_absmax, rows, self.config, self.scheme, self.n_rep, self.dim)
        options = {"none": (None, None, None), "smooth": (*_smoothing(*smoothing), None)}  # (scales, alpha, rotation)
        if rotatable:
            rotation = self.rotation(group, linears[0].in_features)
            options["rotate"] = (None, None, rotation)
            options["smoothrot"] = (*_smoothing(*smoothing, rotation), rotation)
        errors = {}
        for name, (s, _, rot) in options.items():
            x, w = (rows, weight) if s is None else (rows / s.float(), weight * s.float())
            x, w = (rot(x), rot(w)) if rot is not None else (x, w)
            errors[name] = quantized_output_error(x, w, self.scheme.weights, self.scheme.inputs)
        choice = min(errors, key=errors.get)  # the first of the lowest: a tie keeps the cheaper option
        s, alpha, _ = options[choice]
        return {"choice": choice, "alpha": alpha, "errors": errors, "scales": s}

    def rotation(self, group, n: int):
        """The rotation `transform_layer` gives the input of `group` (n channels), as a function of
        rows (X -> X R; W -> W R): the online Hadamard, after R2's per-head one on o_proj's input."""
        online = OnlineHadamard(n, self.signs(n), self.config.rotation_block)
        if group.rotation != "r2":
            return online
        dim, block = self.dim, self.config.rotation_block

        def heads_then_full(t: torch.Tensor) -> torch.Tensor:
            return online(hadamard_transform(t.reshape(*t.shape[:-1], -1, dim), block=block).reshape(t.shape))

        return heads_then_full


def _keep_rows(model: nn.Module, spec: ArchSpec, config: TransformConfig) -> int:
    """Calibration rows to sample per input group: for the alpha search, for a learned R1."""
    keep = config.keep_rows
    if config.learn_rotation is not None:
        layers = decoder_layers(model, spec)
        groups = sum(g.rotation == "r1" for g in norm_merged_groups(layers[0], spec)) * len(layers) if len(layers) else 1
        keep = max(keep, LEARN_ROWS_PER_GROUP if config.learn_per_layer else -(-LEARN_ROWS // max(1, groups)))
    return keep


def _learned_summary(config: TransformConfig, history: list[float]) -> dict:
    """What the report says of one learned rotation: the objective at its Hadamard start and at the end."""
    return {"objective": config.learn_rotation, "steps": config.learn_steps, "start": history[0], "end": history[-1]}


def _stats_key(layer: int, group) -> tuple[int, str]:
    """(layer, role), the role of one expert's group suffixed with the expert (`down.3`)."""
    return (layer, group.role if group.expert is None else f"{group.role}.{group.expert}")


def _fuses_r1(spec: ArchSpec, config: TransformConfig) -> bool:
    """R1 can be fused into the weights: RMSNorms with nothing between them and their readers."""
    return config.fuse_r1 and not spec.post_norms and spec.rms_norm and not (config.kind == "smoothrot" and config.smooth_all)


def _smoothing(group, linears, act_absmax, rows, config, scheme, n_rep, dim, rotation=None):
    """The group's smoothing scales and alpha (`config.alpha`, or searched on `rows`, measured
    after `rotation` if given, a function of rows applied to X / s and W * s)."""
    weight = torch.cat([lin.weight.double() for lin in linears])
    w_absmax = weight.abs().amax(0)
    if group.kv_tied:
        # channels of the heads that share one KV head must share a scale (it is folded into that
        # KV head's rows of the source): pool their statistics
        act_absmax, w_absmax = tie_kv_heads(act_absmax, n_rep, dim, "amax"), tie_kv_heads(w_absmax, n_rep, dim, "amax")
    if config.alpha is not None:
        return smooth_scales(act_absmax, w_absmax, config.alpha), config.alpha
    # float32 is plenty to rank alphas and twice as fast as the float64 used for the weight edits
    alpha, _ = search_alpha(rows.float(), weight.float(), act_absmax.float(), w_absmax.float(), scheme.weights, scheme.inputs, rotation)
    return smooth_scales(act_absmax, w_absmax, alpha), alpha
