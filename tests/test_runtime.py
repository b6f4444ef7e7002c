"""Quantized models at run time, on tiny random models of every supported family."""

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import lowbit
from lowbit import QuantArgs, UserError
from lowbit.quant import fake_quantize
from lowbit.runtime import QuantLinear, TensorQuantizer


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_16_bit_scheme_is_bit_identical(family):
    model = tiny_model(family)
    x = tokens()
    q = lowbit.quantize(model, "W16A16KV16", progress=False)
    assert torch.equal(q(x).logits, model(x).logits)


@torch.no_grad()
def test_w8a8kv8_is_close_and_w4a4kv4_is_not(family):
    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    err8 = (lowbit.quantize(model, "W8A8KV8", progress=False)(x).logits - ref).abs().max()
    err4 = (lowbit.quantize(model, "W4A4KV4", progress=False)(x).logits - ref).abs().max()
    assert 0 < err8 < 0.15 * ref.abs().max()
    assert err4 > 3 * err8


@torch.no_grad()
def test_every_decoder_linear_is_quantized_and_lm_head_is_not(family):
    model = tiny_model(family)
    q = lowbit.quantize(model, "W4A8", progress=False)
    swapped = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == 7 * model.config.num_hidden_layers
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, QuantLinear)
    layer = q.model.layers[0]
    orig = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(layer.mlp.down_proj.dense_weight(), fake_quantize(orig, QuantArgs(bits=4)))
    assert len(torch.unique(layer.mlp.down_proj.dense_weight()[0])) <= 16


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gemma2"])  # gemma2: tied embeddings
def test_lm_head_quantized_when_asked(name):
    from dataclasses import replace

    model = tiny_model(name)
    scheme = replace(lowbit.parse_scheme("W4A16"), quantize_lm_head=True)
    q = lowbit.quantize(model, scheme, progress=False)
    assert isinstance(q.lm_head, QuantLinear)
    if name == "gemma2":  # tied: the quantized head must not drag the embeddings along
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
        assert not torch.equal(q.lm_head.dense_weight(), q.model.embed_tokens.weight)


def test_inplace_quantization_keeps_no_float_copy():
    """In place, the quantized linears replace the float ones: codes and scales, no float weight."""
    model = tiny_model("llama")
    q = lowbit.quantize(model, "W4A16", inplace=True, progress=False)
    down = q.model.layers[0].mlp.down_proj
    assert q is model and down.weight is None and down.weight_codes.dtype == torch.uint8


@torch.no_grad()
def test_input_model_is_not_modified(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    x = tokens()
    ref = model(x).logits
    lowbit.quantize(model, "W4A4KV4", progress=False)
    assert model.config._attn_implementation == impl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (QuantLinear, TensorQuantizer)) for m in model.modules())
    assert torch.equal(model(x).logits, ref)


@torch.no_grad()
def test_kv_quantization_same_in_full_forward_and_cached_decoding(family):
    # float64: a 1-token and a 28-token matmul differ by float rounding, which in float32 can move a
    # value across a rounding step of the 8-bit activation or 4-bit KV grid (a flip unrelated to
    # how the cache is quantized); in float64 such a tie is vanishingly rare
    model = tiny_model(family).double()
    q = lowbit.quantize(model, "W4A8KV4", progress=False)
    x = tokens(length=28)
    full = q(x).logits
    out = q(x[:, :9], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(9, x.shape[1]):
        out = q(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_generation_with_cache_matches_full_forward():
    model = tiny_model("llama")
    q = lowbit.quantize(model, "W4A8KV4", progress=False)
    prompt = tokens(batch=1, length=6)
    generated = q.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    seq = prompt
    for _ in range(10):  # no cache: every step recomputes the whole sequence
        nxt = q(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


@torch.no_grad()
def test_attention_receives_per_token_quantized_keys_and_values():
    model = tiny_model("llama")
    q = lowbit.quantize(model, "W16A16K4V3", progress=False)
    seen = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, mask, **kw):
        seen.append((key.clone(), value.clone()))
        return original(module, query, key, value, mask, **kw)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        q(tokens())
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    assert len(seen) == model.config.num_hidden_layers
    for key, value in seen:
        # one scale per (batch, head, token) vector: at most 2^bits distinct values in each
        for vec in key.reshape(-1, key.shape[-1])[:20]:
            assert len(torch.unique(vec)) <= 16
        for vec in value.reshape(-1, value.shape[-1])[:20]:
            assert len(torch.unique(vec)) <= 8
        assert torch.equal(key, fake_quantize(key, QuantArgs(bits=4, granularity="token")))


@torch.no_grad()
def test_static_activation_and_kv_need_and_use_calibration():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="calibration"):
        lowbit.quantize(model, "W8A8sKV8s", progress=False)
    calib = [tokens(1, 32, seed=s) for s in range(3)]
    q = lowbit.quantize(model, "W8A8sKV8s", calibration=calib, progress=False)
    quantizers = [m for m in q.modules() if isinstance(m, TensorQuantizer)]
    assert quantizers and all(m.calibrated for m in quantizers)
    x = tokens()
    ref = model(x).logits
    assert 0 < (q(x).logits - ref).abs().max() < 0.25 * ref.abs().max()


def test_group_size_that_does_not_divide_fails_early():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(UserError, match="group size 48 does not divide in_features=64"):
        lowbit.quantize(model, "W4g48A16", progress=False)
    with pytest.raises(UserError, match="does not divide head_dim=16"):
        lowbit.quantize(model, "W16A16KV4g12", progress=False)
    with pytest.raises(UserError, match="dynamic per-tensor key"):
        lowbit.quantize(model, "W16A16KV8t", progress=False)


def test_group_quantization_applies():
    model = tiny_model("qwen2")
    q = lowbit.quantize(model, "W4g32A16", progress=False)
    w = q.model.layers[0].self_attn.q_proj.dense_weight()
    for group in w.reshape(-1, 32)[:10]:
        assert len(torch.unique(group)) <= 16


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama.*qwen2"):
        lowbit.quantize(model, "W8A8", progress=False)


def test_unknown_algorithm():
    with pytest.raises(UserError, match="unknown algorithm"):
        lowbit.quantize(tiny_model("llama"), "W4A16", algorithm="magic", progress=False)
