"""Architectures described as data: where the decoder layers, norms and linears of a model are.

This is the only module that knows attribute names inside a transformers model. A new family
is a new `ArchSpec` entry, not new code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import UserError

ATTN_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ROTATIONS = ("r1", "r2", "r4")


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same tensor, the module that produces it, and what the tensor is.

    `source` is a norm (whose weight can absorb a smoothing scale or be folded into the linears)
    or a linear (up -> down, v -> o)."""

    source: str
    linears: tuple[str, ...]
    role: str  # its name in reports: qkv, o, gate_up, down for the Llama layout
    # the rotation of QuaRot that applies to this input: r1 (the residual stream, read after a
    # norm), r2 (the attention output, per head and in full), r4 (the MLP's inner activations)
    rotation: str
    reads_attention_output: bool = False  # the KV cache is computed before this input
    # input channels come in heads, and heads sharing a KV head are produced by the same rows of
    # the source (o_proj reading v_proj under grouped-query attention): they share any scale
    kv_tied: bool = False
    massive_outliers: bool = False  # where massive outliers live: smooth rotation smooths it by default
    # Mixture of experts: the expert these linears belong to (None: a dense group). Every expert is
    # calibrated on the tokens routed to it, so the pipeline handles the groups of one role of all
    # experts together, each expert with its own statistics.
    expert: int | None = None
    # modules that read the same input but stay in full precision (the MoE router, Qwen2-MoE's
    # shared-expert gate): a transform edits their columns like the group's linears; never quantized
    readers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise ValueError(f"input group {self.role!r}: rotation must be one of {', '.join(ROTATIONS)}; got {self.rotation!r}")


def llama_groups(attn_norm: str = "input_layernorm", mlp_norm: str = "post_attention_layernorm") -> tuple[InputGroup, ...]:
    """The four inputs of a Llama-layout decoder layer."""
    return (
        InputGroup(attn_norm, ATTN_LINEARS[:3], "qkv", "r1"),
        InputGroup("self_attn.v_proj", ("self_attn.o_proj",), "o", "r2", reads_attention_output=True, kv_tied=True),
        InputGroup(mlp_norm, MLP_LINEARS[:2], "gate_up", "r1"),
        InputGroup("mlp.up_proj", ("mlp.down_proj",), "down", "r4", massive_outliers=True),
    )


@dataclass(frozen=True)
class MoESpec:
    """Where a sparse mixture-of-experts block sits in a decoder layer and how its experts are stored.

    The experts are stored FUSED, as transformers 5 holds them: `gate_up` [experts, 2 x inter,
    hidden] (the gate's rows, then the up projection's: the stock forward chunks it in two) and
    `down` [experts, hidden, inter]. lowbit swaps the experts module for a `QuantExperts` holding
    one linear per expert and projection, named `expert_linears` (gate, up, down), so every expert
    is quantized, calibrated and saved like a dense MLP. Layers whose MLP has no experts module
    (Qwen3-MoE's `mlp_only_layers`) keep the family's dense groups."""

    block: str = "mlp"  # the MoE block (the module that replaces the dense MLP)
    router: str = "mlp.gate"  # computes top-k experts and weights from the block's input; never quantized
    experts: str = "mlp.experts"
    gate_up: str = "gate_up_proj"  # fused parameter names of the experts module
    down: str = "down_proj"
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # a dense MLP every token goes through beside the routed experts, and the linear gating its
    # output (Qwen2-MoE: shared_expert, shared_expert_gate); None where the family has none
    shared_expert: str | None = None
    shared_expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert_gate: str | None = None
    top_k: str = "num_experts_per_tok"  # config attribute: experts each token is routed to
    # How checkpoints on disk store the experts (transformers 5 saves them back in the original
    # layout and fuses them as it loads): the block's name there and each expert's (gate, up,
    # down) weight names, `<block>.experts.<e>.<name>.weight`. Read by sequential onloading.
    checkpoint_block: str = "mlp"
    checkpoint_expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @property
    def readers(self) -> tuple[str, ...]:
        """Full-precision modules reading the block's input beside the experts."""
        return (self.router,) + ((self.shared_expert_gate,) if self.shared_expert_gate else ())


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    linears: tuple[str, ...] = ATTN_LINEARS + MLP_LINEARS
    input_groups: tuple[InputGroup, ...] = llama_groups()
    # RMSNorm computes x * (offset + weight): 0 for Llama-style, 1 for Gemma.
    norm_weight_offset: float = 0.0
    # per-head RMSNorm on queries and keys after projection (Qwen3, Gemma 3)
    qk_norm: bool = False
    # norms applied to a block's output before the residual add (Gemma 2/3 "sandwich" norms)
    post_norms: tuple[str, ...] = ()
    # RMSNorms (no mean subtraction): the residual stream may then be rotated with R1 fused into
    # the weights (QuaRot); a LayerNorm's mean subtraction is not rotation-invariant, so R1 runs online
    rms_norm: bool = True
    # linears that write into the residual stream (their outputs are rotated by a fused R1)
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # equivalent transformations known to preserve this family's function (tested)
    transforms: tuple[str, ...] = ("smooth", "rotate", "smoothrot")
    # a sparse mixture-of-experts block in place of the dense MLP (in every layer, or in those that
    # have one); `linears`, `input_groups` and `residual_writers` then describe the dense layers
    moe: MoESpec | None = None


_GEMMA_GROUPS = llama_groups(mlp_norm="pre_feedforward_layernorm")

ARCHITECTURES: list[ArchSpec] = [
    ArchSpec("llama", ("llama",)),
    ArchSpec("mistral", ("mistral",)),
    ArchSpec("qwen2", ("qwen2",)),
    ArchSpec("qwen3", ("qwen3",), qk_norm=True),
    ArchSpec("mixtral", ("mixtral",), moe=MoESpec(checkpoint_block="block_sparse_moe", checkpoint_expert_linears=("w1", "w3", "w2"))),
    ArchSpec("qwen2_moe", ("qwen2_moe",), moe=MoESpec(shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate")),
    ArchSpec("qwen3_moe", ("qwen3_moe",), qk_norm=True, moe=MoESpec()),
    ArchSpec(
        "gemma2",
        ("gemma2",),
        input_groups=_GEMMA_GROUPS,
        norm_weight_offset=1.0,
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
    ArchSpec(
        "gemma3",
        ("gemma3_text",),
        input_groups=_GEMMA_GROUPS,
        norm_weight_offset=1.0,
        qk_norm=True,
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
]


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add an architecture (a new family is data: an `ArchSpec`); a model type already known is refused."""
    taken = set(spec.model_types) & set(supported_model_types())
    if taken:
        raise ValueError(f"model types {', '.join(sorted(taken))} already have an architecture")
    ARCHITECTURES.append(spec)
    return spec


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def arch_for_model_type(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UserError(f"unsupported architecture {model_type!r}; lowbit supports model_type {', '.join(supported_model_types())}")


def get_arch(model: nn.Module) -> ArchSpec:
    """The spec for a transformers causal LM, checked against the model's actual modules (every
    layer: a mixture-of-experts model may mix dense and sparse layers)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UserError("expected a transformers causal LM (a model with a .config.model_type)")
    try:
        spec = arch_for_model_type(model_type)
    except UserError:
        if _has_experts(model):
            raise UserError(
                f"mixture-of-experts model_type {model_type!r} has no lowbit architecture entry, so the layout of its experts "
                f"is unknown; lowbit supports MoE model_type {', '.join(moe_model_types())}"
            ) from None
        raise
    for i, layer in enumerate(decoder_layers(model, spec)):
        if is_moe_layer(layer, spec):  # the experts' layout checked here, their linears exist once swapped in
            expert_dims(get_module(layer, spec.moe.experts), spec.moe, f"layer {i} {spec.moe.experts}")
            names = [n for n in layer_linear_names(layer, spec) if not _under(n, spec.moe.experts)] + list(spec.moe.readers)
        elif _has_experts(layer):
            raise UserError(
                f"{type(model).__name__} ({model_type}) layer {i} has a mixture-of-experts block that the {spec.family} entry does not "
                "describe; its layout is not supported"
            )
        else:
            names = list(spec.linears)
        missing = [name for name in names if not _has(layer, name)]
        if missing:
            raise UserError(f"{type(model).__name__} ({model_type}) has no {', '.join(missing)}; its layout is not supported")
    return spec


def moe_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES if spec.moe is not None for t in spec.model_types)


def _has_experts(module: nn.Module) -> bool:
    return any(name.rpartition(".")[2] == "experts" for name, _ in module.named_modules())


def is_moe_layer(layer: nn.Module, spec: ArchSpec) -> bool:
    """The layer's MLP is the family's mixture-of-experts block (not a dense MLP)."""
    return spec.moe is not None and _has(layer, spec.moe.experts)


def expert_dims(experts: nn.Module, moe: MoESpec, where: str = "experts") -> tuple[int, int, int]:
    """(experts, hidden size, expert inner size) of a stock fused experts module, or of the
    `QuantExperts` lowbit swapped in; a layout lowbit does not read is a one-line UserError."""
    if getattr(experts, "lowbit_experts", False):
        return experts.dims
    cls = type(experts).__name__
    gate_up, down = getattr(experts, moe.gate_up, None), getattr(experts, moe.down, None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3):
        raise UserError(
            f"{where} ({cls}) does not hold its experts as fused 3-D parameters {moe.gate_up} and {moe.down}; "
            "lowbit reads only that layout (transformers 5)"
        )
    n, rows, hidden = gate_up.shape
    layout_flags = (
        getattr(experts, "is_transposed", False),
        not getattr(experts, "is_concatenated", True),
        getattr(experts, "has_bias", False),
        not getattr(experts, "has_gate", True),
    )
    if rows % 2 or tuple(down.shape) != (n, hidden, rows // 2) or any(layout_flags) or not hasattr(experts, "act_fn"):
        raise UserError(
            f"{where} ({cls}): {moe.gate_up} {list(gate_up.shape)} and {moe.down} {list(down.shape)} are not the layout lowbit reads "
            "([experts, 2 x inner, hidden] with gate rows then up rows, [experts, hidden, inner], no bias, an act_fn)"
        )
    return n, hidden, rows // 2


def _under(path: str, block: str) -> bool:
    return path.startswith(block + ".")


def _moe_paths(layer: nn.Module, spec: ArchSpec) -> list[tuple[int | None, str, tuple[str, ...]]]:
    """(expert index or None for the shared expert, path prefix, its linear names) for each
    MLP-like member of an MoE block."""
    moe = spec.moe
    n = expert_dims(get_module(layer, moe.experts), moe)[0]
    members = [(e, f"{moe.experts}.{e}", moe.expert_linears) for e in range(n)]
    if moe.shared_expert:
        members.append((None, moe.shared_expert, moe.shared_expert_linears))
    return members


def _dense_mlp(spec: ArchSpec) -> list[str]:
    """The dense MLP's linears (gate, up, down for the Llama layout), in the order the MoE spec
    names each expert's."""
    return [n for n in spec.linears if _under(n, spec.moe.block)]


def _member_path(path: str, spec: ArchSpec, prefix: str, names: tuple[str, ...]) -> str:
    """A dense MLP path mapped onto one expert's (or the shared expert's) linear of the same role."""
    dense = _dense_mlp(spec)
    return f"{prefix}.{names[dense.index(path)]}" if path in dense else path


def layer_linear_names(layer: nn.Module, spec: ArchSpec) -> list[str]:
    """Paths of the quantizable linears of one decoder layer; in an MoE layer the experts'
    linears (`mlp.experts.<e>.gate_proj`, ...: the modules lowbit swaps in) replace the dense MLP's."""
    if not is_moe_layer(layer, spec):
        return list(spec.linears)
    dense = _dense_mlp(spec)
    names = [n for n in spec.linears if n not in dense]
    for _, prefix, member in _moe_paths(layer, spec):
        names += [_member_path(n, spec, prefix, member) for n in dense]
    return names


def linear_shapes(layer: nn.Module, spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """(out, in) features of every quantizable linear of a layer, by path; works before lowbit
    swapped the stock fused experts for per-expert linears (their shapes come from the fused tensors)."""
    shapes = {}
    for name in layer_linear_names(layer, spec):
        try:
            module = get_module(layer, name)
            shapes[name] = (module.out_features, module.in_features)
        except AttributeError:  # a stock fused expert: gate and up [inner, hidden], down [hidden, inner]
            _, hidden, inner = expert_dims(get_module(layer, spec.moe.experts), spec.moe)
            is_down = name.rpartition(".")[2] == spec.moe.expert_linears[2]
            shapes[name] = (hidden, inner) if is_down else (inner, hidden)
    return shapes


def layer_input_groups(layer: nn.Module, spec: ArchSpec) -> tuple[InputGroup, ...]:
    """The input groups of one decoder layer. In an MoE layer the dense MLP's groups become one
    per expert (its gate/up read the block's input norm, its down reads its up), then the shared
    expert's where there is one; the router (and shared-expert gate) are full-precision readers of
    the norm's output. Ordered: all experts' gate/up, then all experts' down."""
    if not is_moe_layer(layer, spec):
        return spec.input_groups
    dense = _dense_mlp(spec)
    inside = [g for g in spec.input_groups if g.linears[0] in dense]
    groups = [g for g in spec.input_groups if g.linears[0] not in dense]
    members = _moe_paths(layer, spec)
    for template in inside:
        readers = () if template.source in dense else spec.moe.readers
        for expert, prefix, names in members:
            groups.append(
                replace(
                    template,
                    source=_member_path(template.source, spec, prefix, names),
                    linears=tuple(_member_path(n, spec, prefix, names) for n in template.linears),
                    role=template.role if expert is not None else f"shared_{template.role}",
                    expert=expert,
                    readers=readers,
                )
            )
    return tuple(groups)


def norm_merged_groups(layer: nn.Module, spec: ArchSpec) -> list[InputGroup]:
    """The layer's input groups with every group reading one norm merged into one (all their
    linears, their full-precision readers once): a transform edits a norm once, for everything
    that reads it (in an MoE layer: the router, every expert's gate/up, the shared expert)."""
    merged: list[InputGroup] = []
    by_norm: dict[str, int] = {}
    for group in layer_input_groups(layer, spec):
        if is_linear_path(spec, group.source):
            merged.append(group)
        elif group.source in by_norm:
            i = by_norm[group.source]
            readers = merged[i].readers + tuple(r for r in group.readers if r not in merged[i].readers)
            merged[i] = replace(merged[i], linears=merged[i].linears + group.linears, readers=readers)
        else:
            by_norm[group.source] = len(merged)
            merged.append(replace(group, expert=None))
    return merged


def layer_residual_writers(layer: nn.Module, spec: ArchSpec) -> list[str]:
    """Linears of a layer that write into the residual stream (every expert's down in an MoE layer)."""
    if not is_moe_layer(layer, spec):
        return list(spec.residual_writers)
    dense = _dense_mlp(spec)
    writers = [w for w in spec.residual_writers if w not in dense]
    for _, prefix, names in _moe_paths(layer, spec):
        writers += [_member_path(w, spec, prefix, names) for w in spec.residual_writers if w in dense]
    return writers


def is_linear_path(spec: ArchSpec, path: str) -> bool:
    """Is the module at `path` (inside a layer) a quantizable linear (else: a norm)?"""
    if path in spec.linears:
        return True
    return spec.moe is not None and _under(path, spec.moe.block) and path not in spec.moe.readers


def head_dim(config) -> int:
    """Per-head dimension: config.head_dim where set, else hidden_size / attention heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_groups(config) -> int:
    """Query heads per KV head (1 without grouped-query attention)."""
    return config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def tie_kv_heads(v: torch.Tensor, n_rep: int, dim: int, reduce: str = "mean") -> torch.Tensor:
    """A per-channel vector over the attention output (heads x dim), made equal across the `n_rep`
    query heads that share one KV head (their channels come from the same v_proj rows): the mean
    or the max of those heads, repeated for each."""
    if n_rep <= 1:
        return v
    heads = v.view(-1, n_rep, dim)
    pooled = heads.mean(1, keepdim=True) if reduce == "mean" else heads.amax(1, keepdim=True)
    return pooled.expand(-1, n_rep, -1).reshape(-1)


def kv_head_channels(v: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """From a vector tied by `tie_kv_heads`, one value per KV-head channel (the source's rows)."""
    return v.view(-1, n_rep, dim)[:, 0].reshape(-1) if n_rep > 1 else v


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, new)


def backbone(model: nn.Module, spec: ArchSpec) -> nn.Module:
    """The module holding the decoder layers (embeddings, layers, final norm): calibration passes
    run it rather than the whole model, whose LM head would cost more than the layers."""
    return get_module(model, spec.layers.rsplit(".", 1)[0])


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        return get_module(model, spec.layers)
    except AttributeError:
        raise UserError(f"{type(model).__name__} has no {spec.layers}; expected a *ForCausalLM model") from None


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The quantizable linears of one decoder layer, by their path inside the layer (an MoE layer's
    experts once lowbit swapped in per-expert linears: `runtime.experts.swap_in_experts`)."""
    return {name: get_module(layer, name) for name in layer_linear_names(layer, spec)}


def attention_modules(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    return [get_module(layer, spec.attention) for layer in decoder_layers(model, spec)]


def _has(module: nn.Module, path: str) -> bool:
    try:
        get_module(module, path)
        return True
    except AttributeError:
        return False
