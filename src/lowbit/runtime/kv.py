"""KV-cache quantization on stock transformers attention, without touching modeling code.

transformers 5 routes every attention call through `ALL_ATTENTION_FUNCTIONS`, with keys (after
RoPE) and values as they are stored in the cache, shaped [batch, kv_heads, tokens, head_dim].
We register a wrapper implementation, ``lowbit_<base>``, that fake-quantizes them with the
quantizers attached to the attention module, then calls the base implementation (sdpa, eager, ...).

Keys and values are quantized per token and head (one scale per head_dim vector), or with static
per-tensor scales. Each token's values then depend only on that token, so quantizing the whole
cache at every step gives exactly the numbers that quantize-on-write would give, in a full
forward pass and in incremental decoding alike.

With a full-precision prefix (``P<N>``) the first N tokens of the sequence keep exact keys and
values. transformers 5 hands the attention function the whole cache, position 0 first, except
that a sliding-window cache past its window has dropped its oldest entries: `kv_offset` gives
the position of the first key either way.
"""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..scheme import QuantArgs
from .prefix import kv_offset
from .quantizer import TensorQuantizer

PREFIX = "lowbit_"
KEY_QUANT, VALUE_QUANT = "lowbit_key_quant", "lowbit_value_quant"
QK_ROTATION = "lowbit_qk_rotation"  # R3: an OnlineHadamard over head_dim for queries and keys


@cache
def _eager_attention(module_class: type):
    # Each modeling file has its own eager function (softcapping, sinks, ...): use that one.
    return inspect.getmodule(module_class).eager_attention_forward


def _base_attention(module: nn.Module, base: str):
    return _eager_attention(type(module)) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        qk_rotation = getattr(module, QK_ROTATION, None)
        if qk_rotation is not None:  # q R (k R)^T = q k^T
            query, key = qk_rotation(query), qk_rotation(key)
        key_quant = getattr(module, KEY_QUANT, None)
        value_quant = getattr(module, VALUE_QUANT, None)
        offset = kv_offset(query, key)  # position of key[..., 0, :] in the sequence (fp_prefix)
        if key_quant is not None:
            key = key_quant(key, offset)
        if value_quant is not None:
            value = value_quant(value, offset)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def register_attention(base: str) -> str:
    """Register ``lowbit_<base>`` (attention and mask) and return its name."""
    if base.startswith(PREFIX):
        return base
    name = f"{PREFIX}{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _make_attention(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Point the model's config (and any sub-config modules read) at attention `name`."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for config in configs.values():
        config._attn_implementation = name


def install_kv_quantizers(
    model: nn.Module, attentions: list[nn.Module], keys: QuantArgs | None, values: QuantArgs | None, fp_prefix: int = 0
) -> None:
    """Attach key/value quantizers to each attention module and switch the model to the wrapper
    (also needed, with no quantizers, when a transform rotated queries and keys); the first
    `fp_prefix` tokens' keys and values stay in full precision."""
    rotated = any(getattr(a, QK_ROTATION, None) is not None for a in attentions)
    if keys is None and values is None and not rotated:
        return
    base = model.config._attn_implementation or "eager"
    name = register_attention(base)
    for attention in attentions:
        if keys is not None:
            setattr(attention, KEY_QUANT, TensorQuantizer(keys, fp_prefix))
        if values is not None:
            setattr(attention, VALUE_QUANT, TensorQuantizer(values, fp_prefix))
    set_attention_implementation(model, name)
