"""Shared fixtures: tiny random-config models of every supported family, and the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def tiny_config(family: str):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
    }
    extra = {}
    if family in ("gemma2", "gemma3"):
        extra = dict(sliding_window=16, query_pre_attn_scalar=16)
    if family == "mistral":
        extra = dict(sliding_window=None)
    return classes[family](**TINY, **extra)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def tiny_model(family: str, seed: int = 0, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    # Gemma 2 has no sdpa path in transformers; it runs eager.
    config._attn_implementation = attn or ("eager" if family == "gemma2" else "sdpa")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; scale up so quantization error is visible in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            if "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def default_model():
    """The bundled SmolLM2-135M (converted once into the cache)."""
    import lowbit

    return lowbit.load_model()


@pytest.fixture(scope="session")
def wikitext_path():
    if not SHARED_DATA.is_file():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
