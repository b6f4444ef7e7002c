"""Full-precision prefix tokens: where each forward's tokens start in their sequence.

A scheme with ``P<N>`` keeps the first N tokens of every sequence (the attention sink, whose
activations are massive in SmolLM2 and most LLMs) in full precision: their linear inputs and
their keys and values (IntactKV: "IntactKV: Improving Large Language Model Quantization by
Keeping Pivot Tokens Intact"; PrefixQuant: "PrefixQuant: Eliminating Outliers by Prefixed Tokens
for Large Language Models Quantization").

During incremental decoding a linear layer sees only the new tokens, so it must know how many
came before. A forward pre-hook on the model (and on its decoder stack, which may be called by
itself) reads that from the cache the call carries and sets a context variable for the duration
of the forward; `QuantLinear` reads it. Decoder layers called directly with whole sequences
(the layer-by-layer pipeline, onloading, perplexity) see the default, 0, which is right there.

Keys and values reach the attention function as the whole cache (past and new tokens). A
sliding-window cache (Mistral, Gemma 2/3 sliding layers) drops its oldest tokens once the
window is full, so its first entry is then not position 0: `kv_offset` derives where the keys
start from the queries' offset (the new tokens are the last ones of the keys).
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("lowbit_token_offset", default=0)
HOOKED = "lowbit_prefix_hooked"  # set on a module whose forwards set the offset


def token_offset() -> int:
    """How many tokens of the sequence precede the tokens of the forward running now (0 outside one)."""
    return _OFFSET.get()


def kv_offset(query: torch.Tensor, key: torch.Tensor) -> int:
    """The position of the first key in its sequence: the queries are the last tokens of the keys
    and start at `token_offset()`. 0 for a full cache (the keys hold everything from position 0),
    the number of dropped tokens for a sliding-window cache past its window."""
    return max(0, token_offset() + query.shape[-2] - key.shape[-2])


def _cache_length(args: tuple, kwargs: dict) -> int:
    """Tokens already in the cache a forward call carries (0 without one)."""
    position = kwargs.get("cache_position")  # transformers < 5.x passed the new tokens' positions
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    from transformers.cache_utils import Cache

    # transformers 5 names it `cache` (`past_key_values` before); it may come positionally too
    for value in (kwargs.get("cache"), kwargs.get("past_key_values"), *args):
        if isinstance(value, Cache):
            return int(value.get_seq_length())
    return 0


def _enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module._lowbit_offset_tokens.append(_OFFSET.set(_cache_length(args, kwargs)))


def _leave(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    # registered with always_call: runs when the forward raises too, so no offset outlives its call
    tokens = module._lowbit_offset_tokens
    if tokens:
        _OFFSET.reset(tokens.pop())


def install_prefix_hooks(model: nn.Module) -> None:
    """Make every forward of `model` (a causal LM: the head's input is quantized too with
    quantize_lm_head) and of its decoder stack (which may be called by itself) set the token
    offset from the cache it is given. Idempotent; a deepcopy keeps the hooks."""
    from ..arch import get_arch, get_module

    owner = get_arch(model).layers.rpartition(".")[0]
    for module in (model, get_module(model, owner) if owner else None):
        if module is None or getattr(module, HOOKED, False):
            continue
        object.__setattr__(module, "_lowbit_offset_tokens", [])
        module.register_forward_pre_hook(_enter, with_kwargs=True)
        module.register_forward_hook(_leave, with_kwargs=True, always_call=True)
        object.__setattr__(module, HOOKED, True)
