"""Architectures described as data: where the decoder layers, norms and linears of a model are.

This is the only module that knows attribute names inside a transformers model. A new family
is a new `ArchSpec` entry, not new code.
"""

from __future__ import annotations

from dataclasses import dataclass

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


_GEMMA_GROUPS = llama_groups(mlp_norm="pre_feedforward_layernorm")

ARCHITECTURES: list[ArchSpec] = [
    ArchSpec("llama", ("llama",)),
    ArchSpec("mistral", ("mistral",)),
    ArchSpec("qwen2", ("qwen2",)),
    ArchSpec("qwen3", ("qwen3",), qk_norm=True),
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
    """The spec for a transformers causal LM, checked against the model's actual modules."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UserError("expected a transformers causal LM (a model with a .config.model_type)")
    spec = arch_for_model_type(model_type)
    layers = decoder_layers(model, spec)
    missing = [name for name in spec.linears if not _has(layers[0], name)]
    if missing:
        raise UserError(f"{type(model).__name__} ({model_type}) has no {', '.join(missing)}; its layout is not supported")
    return spec


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


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    try:
        return get_module(model, spec.layers)
    except AttributeError:
        raise UserError(f"{type(model).__name__} has no {spec.layers}; expected a *ForCausalLM model") from None


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The quantizable linears of one decoder layer, by their path inside the layer."""
    return {name: get_module(layer, name) for name in spec.linears}


def attention_modules(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    return [get_module(layer, spec.attention) for layer in decoder_layers(model, spec)]


def _has(module: nn.Module, path: str) -> bool:
    try:
        get_module(module, path)
        return True
    except AttributeError:
        return False
