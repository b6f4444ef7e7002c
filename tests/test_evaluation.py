import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import lowbit
from lowbit import UserError
from lowbit.evaluation import kv_cache_bytes, model_ops, model_size_bytes, perplexity
from lowbit.evaluation.perplexity import eval_windows


@torch.no_grad()
def test_perplexity_matches_a_direct_computation(family, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["lowbit.evaluation.perplexity"], "HEAD_CHUNK", 16)  # several lm_head slices per window
    model = tiny_model(family)
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seq_len=64, progress=False)
    assert result.windows == 4 and result.tokens == 4 * 63
    nll = []
    for w in range(4):
        window = ids[w * 64 : (w + 1) * 64]
        logp = F.log_softmax(model(window[None]).logits[0], -1)
        nll += [-logp[t, window[t + 1]].item() for t in range(63)]
    assert result.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_windows_are_capped_and_non_overlapping():
    ids = torch.arange(1000)
    w = eval_windows(ids, 100, windows=3)
    assert w.shape == (3, 100) and torch.equal(w[1], torch.arange(100, 200))
    assert eval_windows(ids, 100).shape == (10, 100)
    assert eval_windows(ids, 300, windows=50).shape == (3, 300)


def test_too_short_text_fails_clearly():
    with pytest.raises(UserError, match="fewer than one window of 2048"):
        eval_windows(torch.arange(100), 2048)
    with pytest.raises(UserError, match="windows must be at least 1"):
        eval_windows(torch.arange(100), 10, windows=0)


def test_model_size_by_hand():
    model = tiny_model("llama")  # hidden 64, inter 128, q 64, kv 32, 2 layers, vocab 512, untied
    fp = model_size_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert fp == 2 * n_params
    q = lowbit.quantize(model, "W4A8", progress=False)
    linear_params = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
    out_rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    # 4-bit codes and one float32 scale per output row (the default scale format)
    expected = 2 * (n_params - linear_params) + linear_params // 2 + 4 * out_rows
    assert model_size_bytes(q) == expected
    h = lowbit.quantize(model, "W4hA8", progress=False)  # float16 scales: two bytes each
    assert model_size_bytes(h) == expected - 2 * out_rows
    g = lowbit.quantize(model, "W3g32aA16", progress=False)
    groups = linear_params // 32  # a float32 scale and a float32 offset per group
    assert model_size_bytes(g) == 2 * (n_params - linear_params) + (linear_params * 3 + 7) // 8 + 8 * groups


def test_tied_embeddings_counted_once():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model_size_bytes(model) == 2 * sum(unique.values())


def test_ops_by_hand():
    model = tiny_model("llama")
    L = 10
    linear_macs = L * (2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 64 * 512)
    attn = 2 * 4 * 16 * L * (L + 1) // 2  # layers x heads x head_dim x causal pairs
    fp = model_ops(model, None, L)
    assert fp.macs == linear_macs + 2 * attn
    assert fp.ops == fp.macs * 256
    scheme = lowbit.parse_scheme("W4A8KV4")
    q = model_ops(lowbit.quantize(model, scheme, progress=False), scheme, L)
    lm_head = L * 64 * 512
    assert q.ops == (linear_macs - lm_head) * 32 + lm_head * 256 + 2 * attn * 16 * 4
    # block formats count their scales' share: NVFP4 4.5 bits, MXFP8 8.25
    scheme = lowbit.parse_scheme("Wnvfp4Amxfp8KVfp8")
    q = model_ops(lowbit.quantize(model, scheme, progress=False), scheme, L)
    assert q.ops == round((linear_macs - lm_head) * 4.5 * 8.25 + lm_head * 256 + 2 * attn * 16 * 8)


def test_kv_cache_bytes_by_hand():
    config = tiny_model("llama").config  # 2 layers, 2 kv heads, head_dim 16
    vectors = 2 * 2 * 1000
    assert kv_cache_bytes(config, None, 1000) == 2 * vectors * 16 * 2
    scheme = lowbit.parse_scheme("W4A8KV4")  # one float32 scale per token and head
    assert kv_cache_bytes(config, scheme, 1000) == 2 * (vectors * 16 // 2 + vectors * 4)
    half = lowbit.parse_scheme("W4A8KV4h")  # float16 scales
    assert kv_cache_bytes(config, half, 1000) == 2 * (vectors * 16 // 2 + vectors * 2)
    asym = lowbit.parse_scheme("W4A8K8aV4")
    assert kv_cache_bytes(config, asym, 1000) == vectors * 16 + vectors * 8 + vectors * 8 + vectors * 4
    fp = lowbit.parse_scheme("W16A16KVfp8")  # one byte a value, a float32 scale per token and head
    assert kv_cache_bytes(config, fp, 1000) == 2 * (vectors * 16 + vectors * 4)
    nv = lowbit.parse_scheme("W16A16KVnvfp4")  # 4 bits a value, an E4M3 scale per 16, a float32 scale per token and head
    assert kv_cache_bytes(config, nv, 1000) == 2 * (vectors * 16 // 2 + vectors + vectors * 4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: tied embeddings
@pytest.mark.parametrize("name", ["W8A8KV8", "W4A16", "W4g32aA8KV4", "W16A16KV4", "Wnvfp4Anvfp4KVnvfp4", "Wmxfp4Afp8", "Wfp8g16hA16KVfp8"])
def test_scheme_cost_equals_the_quantized_models_cost(family, name):
    from dataclasses import replace

    from lowbit.evaluation import scheme_cost
    from lowbit.jobs import cost_summary

    model = tiny_model(family)
    for scheme in (lowbit.parse_scheme(name), replace(lowbit.parse_scheme(name), quantize_lm_head=True)):
        predicted = scheme_cost(model, scheme, 64)
        measured = cost_summary(lowbit.quantize(model, scheme, progress=False), scheme, 64)
        for key in ("size_bytes", "ops", "macs", "kv_cache_bytes"):
            assert predicted[key] == measured[key], (scheme.name, key)
    assert scheme_cost(model, None, 64)["size_bytes"] == model_size_bytes(model)


def test_integer_kernels_cost_like_the_fake_quantized_model():
    from lowbit.evaluation import stored_bytes
    from lowbit.runtime.int_linear import convert_to_int_kernels

    model = tiny_model("llama")
    for name in ("W8A8", "W4A16"):
        q = lowbit.quantize(model, name, progress=False)
        qi = convert_to_int_kernels(q)
        assert model_size_bytes(qi) == model_size_bytes(q)
        assert model_ops(qi, lowbit.quantization_state(q).scheme, 16) == model_ops(q, lowbit.quantization_state(q).scheme, 16)
        assert stored_bytes(q) < stored_bytes(model) and stored_bytes(qi) < stored_bytes(model)  # codes, not fp32 weights
    assert stored_bytes(model) == 4 * sum(p.numel() for p in model.parameters()) + sum(b.untyped_storage().nbytes() for b in model.buffers())
