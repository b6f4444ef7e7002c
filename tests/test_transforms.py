"""Equivalent transformations: function preservation on every family, the math, and bad input."""

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit import UserError
from lowbit.arch import decoder_layers, get_arch, get_module
from lowbit.quant import fake_quantize
from lowbit.runtime import QuantLinear
from lowbit.runtime.rotation import OnlineHadamard
from lowbit.scheme import QuantArgs
from lowbit.transforms.apply import TransformConfig, collect_input_stats
from lowbit.transforms.smooth import ALPHA_GRID, quantized_output_error, search_alpha, smooth_scales

ATOL = 1e-4  # fp32 logits of magnitude ~10: transforms must agree to 1e-5 relative


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


CALIB = [tokens(1, 32, seed=s) for s in range(4)]


@torch.no_grad()
@pytest.mark.parametrize(
    "config",
    [
        TransformConfig("smooth"),
        TransformConfig("smooth", alpha=None),
        TransformConfig("rotate"),
        TransformConfig("rotate", seed=7),
        TransformConfig("smoothrot"),
        TransformConfig("smoothrot", alpha=None, smooth_all=True),
        TransformConfig("rotate", r1=False, r3=False),
        TransformConfig("rotate", r2=False, r4=False),
        TransformConfig("rotate", fuse_r1=False, fold_norms=False),
        TransformConfig("smoothrot", fuse_r1=False, fold_norms=False, alpha=None),
        TransformConfig("rotate", rotation_block=16),
        TransformConfig("rotate", rotation_block=8, seed=3, fuse_r1=False, fold_norms=False),
        TransformConfig("smoothrot", rotation_block=8, alpha=None, smooth_all=True),
    ],
    ids=lambda c: (
        f"{c.kind}-a{c.alpha}-all{int(c.smooth_all)}-seed{c.seed}-r{int(c.r1)}{int(c.r2)}{int(c.r3)}{int(c.r4)}"
        f"-fuse{int(c.fuse_r1)}-fold{int(c.fold_norms)}-block{c.rotation_block}"
    ),
)
def test_transforms_preserve_the_function(family, config):
    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    t = lowbit.quantize(model, "W16A16KV16", transform=config, calibration=CALIB, progress=False)
    assert (t(x).logits - ref).abs().max() < ATOL
    # and the weights really changed (it is not a no-op)
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    changed = [n for n in names if not torch.allclose(t.model.layers[0].get_submodule(n).weight, model.model.layers[0].get_submodule(n).weight)]
    assert changed


@torch.no_grad()
def test_smoothing_is_folded_with_no_runtime_modules():
    model = tiny_model("qwen2")  # q/k/v biases and GQA: v_proj absorbs o_proj's scales per KV head
    t = lowbit.quantize(model, "W16A16KV16", transform="smooth", calibration=CALIB, progress=False)
    assert not any(isinstance(m, (QuantLinear, OnlineHadamard)) for m in t.modules())
    assert t.config._attn_implementation == model.config._attn_implementation


@torch.no_grad()
def test_r1_is_fused_into_the_residual_stream_where_the_architecture_allows():
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    t = lowbit.quantize(model, "W16A16KV16", transform="rotate", progress=False)
    layer = t.model.layers[0]
    assert not isinstance(layer.self_attn.q_proj, QuantLinear) and not isinstance(layer.mlp.up_proj, QuantLinear)  # fused R1
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # R2 (+ full rotation) and R4 run online
        assert isinstance(layer.get_submodule(name).input_rotation, OnlineHadamard)
    assert isinstance(layer.self_attn.lowbit_qk_rotation, OnlineHadamard)  # R3
    assert torch.allclose(layer.input_layernorm.weight, torch.ones(64)) and torch.allclose(t.model.norm.weight, torch.ones(64))
    assert not torch.allclose(t.model.embed_tokens.weight, model.model.embed_tokens.weight)
    # tied embeddings are untied, and the function is still the same
    config = tiny_model("llama").config
    config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(config).eval()
    x = tokens()
    t = lowbit.quantize(tied, "W16A16KV16", transform="rotate", progress=False)
    assert t.lm_head.weight.data_ptr() != t.model.embed_tokens.weight.data_ptr()
    assert (t(x).logits - tied(x).logits).abs().max() < ATOL
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()  # the input stays tied


@torch.no_grad()
def test_r1_runs_online_for_sandwich_norm_architectures():
    t = lowbit.quantize(tiny_model("gemma3"), "W16A16KV16", transform="rotate", progress=False)
    layer = t.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert isinstance(layer.get_submodule(name).input_rotation, OnlineHadamard)


@torch.no_grad()
def test_keys_are_quantized_in_the_rotated_basis():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama")
    t = lowbit.quantize(model, "W16A16KV4", transform="rotate", progress=False)
    seen = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = lambda m, q, k, v, mask, **kw: (seen.append(k), original(m, q, k, v, mask, **kw))[1]
    try:
        t(tokens())
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    for k in seen:
        assert torch.equal(k, fake_quantize(k, QuantArgs(bits=4, granularity="token")))


@torch.no_grad()
def test_transforms_tame_outlier_channels():
    model = tiny_model("llama")
    for layer in model.model.layers:  # systematic outlier channels in the inputs of q/k/v and gate/up
        layer.input_layernorm.weight.data[9] = 60.0
        layer.post_attention_layernorm.weight.data[5] = 60.0
    x = tokens()
    ref = model(x).logits
    err = {}
    for kind in ("none", "smooth", "rotate", "smoothrot"):
        q = lowbit.quantize(model, "W16A6", transform=TransformConfig(kind, smooth_all=True), calibration=CALIB, progress=False)
        err[kind] = (q(x).logits - ref).pow(2).mean().item()
    assert err["smooth"] < 0.5 * err["none"]  # measured 0.031 vs 0.307
    assert err["rotate"] < 0.75 * err["none"]  # measured 0.160
    assert err["smoothrot"] < 0.75 * err["none"]  # measured 0.125


def test_rotation_lowers_the_layerwise_error_of_an_outlier_channel():
    from lowbit.hadamard import hadamard_transform

    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=g, dtype=torch.float64)
    x[:, 7] *= 25
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    wq, aq = QuantArgs(bits=4), QuantArgs(bits=4, granularity="token")
    plain = quantized_output_error(x, w, wq, aq)
    rotated = quantized_output_error(hadamard_transform(x), hadamard_transform(w), wq, aq)
    assert torch.allclose(hadamard_transform(x) @ hadamard_transform(w).T, x @ w.T)
    assert rotated < 0.5 * plain


def test_smooth_scales_by_hand():
    act = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    w_absmax = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    s = smooth_scales(act, w_absmax, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 6.0], dtype=torch.float64))
    assert torch.allclose(smooth_scales(act, w_absmax, 1.0), act)
    assert torch.allclose(smooth_scales(act, w_absmax, 0.0), 1 / w_absmax)


def test_alpha_search_picks_the_grid_minimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, dtype=torch.float64)
    x[:, 3] *= 30
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    wq, aq = QuantArgs(bits=4), QuantArgs(bits=4, granularity="token")
    act, wmax = x.abs().amax(0), w.abs().amax(0)
    alpha, s = search_alpha(x, w, act, wmax, wq, aq)
    errors = {a: quantized_output_error(x / smooth_scales(act, wmax, a), w * smooth_scales(act, wmax, a), wq, aq) for a in ALPHA_GRID}
    assert errors[alpha] == min(errors.values())
    assert errors[alpha] < quantized_output_error(x, w, wq, aq)


@torch.no_grad()
@pytest.mark.parametrize("keep_rows", [0, 6, 1000])
def test_input_stats_are_the_true_max_and_real_rows(keep_rows):
    model = tiny_model("llama")
    spec = get_arch(model)
    seen = {}

    def record(module, args, key):
        seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

    layer = decoder_layers(model, spec)[1]
    hooks = [get_module(layer, g.linears[0]).register_forward_pre_hook(lambda m, a, key=g.role: record(m, a, key)) for g in spec.input_groups]
    stats = collect_input_stats(model, spec, CALIB, keep_rows, progress=False)
    for h in hooks:
        h.remove()
    for group in spec.input_groups:
        inputs = torch.cat(seen[group.role])
        entry = stats[(1, group.role)]
        assert torch.equal(entry["absmax"], inputs.abs().amax(0))
        if not keep_rows:
            assert entry["rows"] is None
            continue
        # an equal share from each batch, capped at keep_rows; every kept row is a real input row
        assert entry["rows"].shape[0] == min(keep_rows, -(-keep_rows // len(CALIB)) * len(CALIB), inputs.shape[0])
        assert all((inputs == row).all(1).any() for row in entry["rows"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(UserError, match=r"alpha must be in \[0, 1\]"):
        TransformConfig("smooth", alpha=alpha)


def test_unknown_transform_and_missing_calibration():
    with pytest.raises(UserError, match="unknown transform 'spin'"):
        TransformConfig("spin")
    with pytest.raises(UserError, match="needs calibration data"):
        lowbit.quantize(tiny_model("llama"), "W8A8", transform="smooth", progress=False)


def test_hidden_size_with_no_hadamard_matrix():
    # 668 = 4 x 167 is the smallest order with no known Hadamard matrix
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=668, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=16
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match="no Hadamard matrix of order 668"):
        lowbit.quantize(model, "W4A4", transform="rotate", progress=False)
    lowbit.quantize(model, "W4A4", transform="smooth", calibration=[torch.zeros(1, 8, dtype=torch.long)], progress=False)


@torch.no_grad()
def test_rotation_at_orders_from_stored_hadamard_data():
    from transformers import AutoModelForCausalLM, LlamaConfig

    # hidden 188 = 4 x 47 (Goethals-Seidel, Turyn-type data), MLP 184 = 2 x 92 (Williamson)
    config = LlamaConfig(
        vocab_size=64, hidden_size=188, intermediate_size=184, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=16
    )
    model = AutoModelForCausalLM.from_config(config)
    x = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model(x).logits
    t = lowbit.quantize(model, "W16A16KV16", transform="rotate", progress=False)
    assert (t(x).logits - ref).abs().max() < ATOL
    assert not torch.allclose(t.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)  # really rotated


def test_transform_on_an_architecture_that_does_not_support_it(monkeypatch):
    from dataclasses import replace

    from lowbit import arch

    patched = tuple(replace(s, transforms=("smooth",)) if s.family == "llama" else s for s in arch.ARCHITECTURES)
    monkeypatch.setattr(arch, "ARCHITECTURES", patched)
    with pytest.raises(UserError, match="transform 'rotate' is not supported for llama yet"):
        lowbit.quantize(tiny_model("llama"), "W4A4", transform="rotate", progress=False)


@torch.no_grad()
def test_input_model_untouched_by_transforms():
    model = tiny_model("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowbit.quantize(model, "W4A4KV4", transform=TransformConfig("smoothrot", smooth_all=True), calibration=CALIB, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
