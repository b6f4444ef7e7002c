"""Mixture-of-experts models (Mixtral, Qwen3-MoE with a dense layer, Qwen2-MoE with a shared
expert) in transformers 5's fused-experts layout: the per-expert swap reproduces the stock experts,
every expert is quantized (RTN, GPTQ, AWQ) and calibrated on its routed tokens only, starved
experts fall back to RTN and are reported, transforms preserve the function (the router takes
the folded norm, R1 and smoothing scales), save + reload is bit for bit, costs count top-k
experts, and layouts lowbit does not know fail in one line."""

import json
import logging

import pytest
import torch
from conftest import run_cli, word_tokenizer
from test_io import assert_round_trip
from torch import nn

import lowbit
from lowbit import UserError
from lowbit.algorithms import gptq as gptq_module
from lowbit.arch import decoder_layers, get_arch, get_module, layer_linear_names
from lowbit.evaluation import model_ops, model_size_bytes, scheme_cost
from lowbit.io import save_quantized
from lowbit.io.native import CONFIG_FILE
from lowbit.pipeline import PipelineConfig
from lowbit.quant.qweight import quantize_weight
from lowbit.report import layer_error_table
from lowbit.runtime import QuantLinear
from lowbit.runtime.experts import QuantExperts
from lowbit.scheme import parse_scheme
from lowbit.transforms.apply import TransformConfig, check_transform

MOE_FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe"]
EXPERTS, TOP_K, HIDDEN, INNER = 4, 2, 64, 32


def moe_config(family: str, **overrides):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=512,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=256,
    )
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=INNER, num_local_experts=EXPERTS, **common)
    elif family == "qwen3_moe":  # layer 0 is a dense Qwen3MoeMLP (mlp_only_layers); real Qwen3-MoE normalises top-k
        config = Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=INNER, num_experts=EXPERTS, mlp_only_layers=[0], norm_topk_prob=True, **common
        )
    else:  # a shared expert beside the routed ones, gated by its own linear
        config = Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=INNER, shared_expert_intermediate_size=INNER, num_experts=EXPERTS, **common
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_moe(family: str, seed: int = 0, **overrides):
    """A tiny random MoE model: hidden 64, 4 experts, top-2, expert inner size 32, 2 layers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = moe_config(family, **overrides)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights (router and fused experts too) so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            if "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request):
    return request.param


def calibration(n=8, length=64, seed=1):
    """512 tokens: 256 per expert on average with top-2 of 4, above the default threshold (64)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def probe():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9))


def moe_layers(model):
    spec = get_arch(model)
    return [(i, layer) for i, layer in enumerate(decoder_layers(model, spec)) if hasattr(layer.mlp, "experts")]


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- the swapped experts module


@torch.no_grad()
def test_swapped_experts_reproduce_the_stock_experts(moe_family):
    """Given the router's output, QuantExperts (float linears) computes what the stock experts
    compute: bit for bit against the stock eager forward, within 1e-6 of the default grouped_mm."""
    model = tiny_moe(moe_family)
    spec = get_arch(model)
    for _, layer in moe_layers(model):
        stock = layer.mlp.experts
        swapped = QuantExperts.from_stock(stock, spec.moe)
        h = torch.randn(40, HIDDEN)
        _, weights, index = layer.mlp.gate(h)
        model.config._experts_implementation = "eager"
        eager = stock(h, index, weights)
        model.config._experts_implementation = "grouped_mm"
        grouped = stock(h, index, weights)
        ours = swapped(h, index, weights)
        assert torch.equal(ours, eager)
        assert torch.allclose(ours, grouped, atol=1e-6, rtol=0)
        # one expert's linears are the fused tensors' slices: gate rows, then up rows
        assert torch.equal(swapped.expert(1).gate_proj.weight, stock.gate_up_proj[1, :INNER])
        assert torch.equal(swapped.expert(1).up_proj.weight, stock.gate_up_proj[1, INNER:])
        assert torch.equal(swapped.expert(1).down_proj.weight, stock.down_proj[1])


@torch.no_grad()
def test_unquantized_swap_keeps_the_model_and_the_router():
    model = tiny_moe("qwen3_moe")
    model.config._experts_implementation = "eager"
    q = lowbit.quantize(model, "W16A16", progress=False)
    x = probe()
    assert torch.equal(q(x).logits, model(x).logits)
    assert isinstance(q.model.layers[1].mlp.experts, QuantExperts) and not hasattr(q.model.layers[0].mlp, "experts")


# ---------------------------------------------------------------- quantization


@torch.no_grad()
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", ["W4A16", "W4A8"])
def test_every_expert_is_quantized_and_the_router_untouched(moe_family, algorithm, scheme):
    """Logits finite and close to FP (relative L2 error below 0.8 at 4 bits; tiny random dense
    models of the same size give 0.36-0.49 with RTN W4A16), a QuantLinear with codes for every
    linear of every expert, routers bit-identical and in full precision."""
    model = tiny_moe(moe_family)
    q = lowbit.quantize(model, scheme, algorithm=algorithm, calibration=calibration(), progress=False)
    x = probe()
    out, fp = q(x).logits, model(x).logits
    assert torch.isfinite(out).all() and relative(out, fp) < 0.8
    spec = get_arch(q)
    for i, layer in enumerate(decoder_layers(q, spec)):
        for name in layer_linear_names(layer, spec):
            linear = get_module(layer, name)
            assert isinstance(linear, QuantLinear) and linear.is_quantized and linear.weight_codes is not None, (i, name)
            assert (linear.input_quant is not None) == (scheme == "W4A8")
    for i, layer in moe_layers(q):
        assert len([n for n in layer_linear_names(layer, spec) if ".experts." in n]) == 3 * EXPERTS
        stock_router = model.model.layers[i].mlp.gate
        assert type(layer.mlp.gate) is type(stock_router) and torch.equal(layer.mlp.gate.weight, stock_router.weight)
        if moe_family == "qwen2_moe":  # the shared expert is quantized, its gate is not
            assert layer.mlp.shared_expert.down_proj.is_quantized
            assert type(layer.mlp.shared_expert_gate) is nn.Linear
            assert torch.equal(layer.mlp.shared_expert_gate.weight, model.model.layers[i].mlp.shared_expert_gate.weight)
    if algorithm == "gptq":
        for entry in lowbit.quantization_state(q).layer_errors:
            for role in ("gate_up", "down"):
                experts = entry[role].get("experts")
                if experts is None:  # Qwen3-MoE's dense layer 0
                    continue
                assert experts["rtn_fallback"] == [] and sum(experts["tokens"]) == 8 * 64 * TOP_K
                for errors in experts["errors"]:  # each expert's GPTQ error on its own tokens is at most RTN's
                    assert errors["gptq"] <= errors["rtn"] * (1 + 1e-6)


@torch.no_grad()
def test_awq_scales_each_experts_down_into_its_up():
    """AWQ folds each expert's down-input scales into that expert's up rows; gate/up are not
    scaled (the norm's output is shared by the router and every expert)."""
    model = tiny_moe("mixtral")
    q = lowbit.quantize(model, "W4A16", algorithm="awq", calibration=calibration(), progress=False)
    for entry in lowbit.quantization_state(q).layer_errors:
        assert all(e.get("scaled") for e in entry["down"]["experts"]["errors"])
        assert not any(e.get("scaled") for e in entry["gate_up"]["experts"]["errors"])
        assert entry["down"]["awq"] <= entry["down"]["rtn"] * (1 + 1e-6)
    x = probe()
    assert relative(q(x).logits, model(x).logits) < 0.8


def starved_model(family="mixtral"):
    """Expert 3 never wins: residual channel 0 holds a constant 1 for every token (written by the
    embeddings only, read by nothing but the router), a bias that the router's row of expert 3
    reads with weight -100."""
    model = tiny_moe(family)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).weight[:, 0] = 0.0
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.experts.gate_up_proj[:, :, 0] = 0.0
            layer.mlp.experts.down_proj[:, 0] = 0.0
            layer.mlp.gate.weight[:, 0] = 0.0
            layer.mlp.gate.weight[3, 0] = -100.0
    return model


@torch.no_grad()
def test_an_expert_without_calibration_tokens_falls_back_to_rtn_and_is_reported(caplog):
    model = starved_model()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        q = lowbit.quantize(model, "W4A8s", algorithm="gptq", calibration=calibration(), progress=False)
    errors = lowbit.quantization_state(q).layer_errors
    for entry in errors:
        for role in ("gate_up", "down"):
            experts = entry[role]["experts"]
            assert experts["tokens"][3] == 0 and experts["rtn_fallback"] == [3] and experts["min_tokens"] == HIDDEN
            assert experts["errors"][3] is None and all(experts["errors"][e] is not None for e in range(3))
    assert caplog.text.count("were routed fewer than 64 calibration tokens") == 4  # 2 layers x (gate/up, down)
    assert "experts [3] RTN" in "\n".join(layer_error_table(errors, "gptq"))
    for i, layer in moe_layers(q):
        stock = model.model.layers[i].mlp.experts
        gate = layer.mlp.experts.expert(3).gate_proj
        rtn = quantize_weight(stock.gate_up_proj[3, :INNER].float(), parse_scheme("W4A8s").weights)
        assert torch.equal(gate.quantized_weight.dequantize(), rtn.dequantize())  # RTN on the scheme's grid
        assert gate.input_quant.calibrated  # its static input range: all experts' inputs together
    assert torch.isfinite(q(probe()).logits).all()


@torch.no_grad()
def test_experts_with_few_tokens_fall_back_below_the_threshold():
    """`min_expert_tokens` sets the threshold: exactly the experts routed fewer tokens use RTN."""
    model = tiny_moe("qwen3_moe")
    first = lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=calibration(), progress=False)
    tokens = lowbit.quantization_state(first).layer_errors[1]["gate_up"]["experts"]["tokens"]
    threshold = sorted(tokens)[2]  # the two least-used experts fall below it
    q = lowbit.quantize(
        model, "W4A16", algorithm="gptq", calibration=calibration(), pipeline=PipelineConfig(min_expert_tokens=threshold), progress=False
    )
    experts = lowbit.quantization_state(q).layer_errors[1]["gate_up"]["experts"]
    assert experts["tokens"] == tokens and experts["min_tokens"] == threshold
    assert experts["rtn_fallback"] == [e for e in range(EXPERTS) if tokens[e] < threshold] and len(experts["rtn_fallback"]) == 2
    with pytest.raises(UserError, match="min_expert_tokens"):
        lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=calibration(), pipeline=PipelineConfig(min_expert_tokens=-1), progress=False)


@torch.no_grad()
def test_gptq_hessian_of_each_expert_uses_only_its_routed_tokens(monkeypatch):
    """The Hessian GPTQ quantizes expert e's gate/up with is 2/n_e sum x x^T over exactly the
    tokens the router sent to e (computed here directly from the router's choices)."""
    hessians = []
    original = gptq_module.gptq_quantize

    def spy(weight, hessian, args, config, cross=None):
        hessians.append(hessian.clone())
        return original(weight, hessian, args, config, cross)

    monkeypatch.setattr(gptq_module, "gptq_quantize", spy)
    model = tiny_moe("mixtral", num_hidden_layers=1)
    data = calibration()
    q = lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=data, progress=False)
    gate_up = hessians[2 : 2 + EXPERTS]  # order: qkv, o, then every expert's gate/up, then every down

    # the router's input in the finished model is what the experts' gate/up saw during calibration
    # (only q/k/v/o were quantized before them), and the router decides which tokens reach each
    seen = []
    router = q.model.layers[0].mlp.gate
    handle = router.register_forward_hook(lambda m, args, out: seen.append((args[0].reshape(-1, HIDDEN), out[2])))
    for sample in data:
        q(sample)
    handle.remove()
    x = torch.cat([s[0] for s in seen])
    chosen = torch.cat([s[1] for s in seen])
    tokens = lowbit.quantization_state(q).layer_errors[0]["gate_up"]["experts"]["tokens"]
    for e in range(EXPERTS):
        routed = x[(chosen == e).any(dim=1)]
        assert routed.shape[0] == tokens[e] < x.shape[0]
        direct = 2 * routed.T @ routed / routed.shape[0]
        assert torch.allclose(gate_up[e], direct, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(gate_up[e], 2 * x.T @ x / x.shape[0], rtol=1e-2)  # not all tokens


# ---------------------------------------------------------------- transforms


@torch.no_grad()
@pytest.mark.parametrize(
    "transform",
    ["smooth", "rotate", "smoothrot", TransformConfig(kind="rotate", seed=3), TransformConfig(kind="smooth", alpha=None)],
    ids=["smooth", "rotate", "smoothrot", "rotate-random-signs", "smooth-searched-alpha"],
)
def test_transforms_preserve_the_function(moe_family, transform):
    """Without quantization the transformed model computes the FP logits (1e-4 relative): the
    router reads the rotated / smoothed norm output through columns that took the same edit."""
    model = tiny_moe(moe_family)
    q = lowbit.quantize(model, "W16A16", transform=transform, calibration=calibration(), progress=False)
    x = probe()
    assert relative(q(x).logits, model(x).logits) < 1e-4
    for i, layer in moe_layers(q):
        router = layer.mlp.gate
        assert type(router) is type(model.model.layers[i].mlp.gate)  # still the stock router, full precision
        assert not torch.equal(router.weight, model.model.layers[i].mlp.gate.weight)  # it took the fold / rotation / scale
        kind = transform if isinstance(transform, str) else transform.kind
        if kind != "smooth":  # R4 online on every expert's down
            assert all(layer.mlp.experts.expert(e).down_proj.input_rotation is not None for e in range(EXPERTS))


@torch.no_grad()
def test_rotation_and_gptq_round_trip_in_one():
    """W4A8KV4 with rotation and GPTQ (the QuaRot recipe) on an MoE model: finite, close to FP."""
    model = tiny_moe("qwen3_moe")
    q = lowbit.quantize(model, "W4A8KV4", transform="rotate", algorithm="gptq", calibration=calibration(), progress=False)
    x = probe()
    assert relative(q(x).logits, model(x).logits) < 0.8


@pytest.mark.parametrize(
    "transform",
    [TransformConfig(kind="rotate", fuse_r1=False), TransformConfig(kind="smoothrot", smooth_all=True)],
    ids=["online-r1", "smoothrot-all"],
)
def test_online_r1_is_refused_before_any_work(transform):
    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as exc:
        check_transform(model, get_arch(model), transform, calibration())
    assert "\n" not in str(exc.value) and "router" in str(exc.value)
    with pytest.raises(UserError):
        lowbit.quantize(model, "W4A16", transform=transform, calibration=calibration(), inplace=True, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was touched
    assert not isinstance(model.model.layers[0].mlp.experts, QuantExperts)


# ---------------------------------------------------------------- save and reload


@pytest.mark.parametrize(
    "scheme, algorithm, transform",
    [("W4A8KV4", "rtn", "none"), ("W4g16A16", "gptq", "rotate"), ("W8A8s", "awq", "smooth")],
    ids=["rtn", "gptq-rotate", "awq-smooth-static"],
)
def test_save_and_reload_bit_for_bit(moe_family, scheme, algorithm, transform, tmp_path):
    q = lowbit.quantize(tiny_moe(moe_family), scheme, algorithm=algorithm, transform=transform, calibration=calibration(), progress=False)
    loaded, _ = assert_round_trip(q, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    # rotate leaves R3 and R4 online, whose entries record their base order (format 5)
    assert config["format_version"] == (5 if transform == "rotate" else 4)
    assert set(config["modules"]["experts"]) == {f"model.layers.{i}.mlp.experts" for i, _ in moe_layers(q)}
    assert isinstance(loaded.model.layers[1].mlp.experts.expert(3).down_proj, QuantLinear)


def test_a_starved_experts_model_saves_and_reloads(tmp_path):
    q = lowbit.quantize(starved_model(), "W4A8s", algorithm="gptq", calibration=calibration(), progress=False)
    assert_round_trip(q, tmp_path / "m")


def test_dense_models_are_still_written_as_format_3(tmp_path):
    from conftest import tiny_model

    save_quantized(lowbit.quantize(tiny_model("llama"), "W4A16", progress=False), tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["format_version"] == 3 and "experts" not in config["modules"]


# ---------------------------------------------------------------- costs and info


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["W4A16", "W4A8KV4"])
def test_costs_count_every_expert_in_size_and_top_k_in_ops(moe_family, scheme):
    model = tiny_moe(moe_family)
    q = lowbit.quantize(model, scheme, progress=False)
    predicted = scheme_cost(model, scheme, 128)  # from the stock fused experts, without quantizing
    ops = model_ops(q, parse_scheme(scheme), 128)
    assert predicted["size_bytes"] == model_size_bytes(q) and predicted["macs"] == ops.macs and predicted["ops"] == ops.ops
    assert model_ops(model, None, 128).macs == ops.macs  # the same MACs counted from the fused tensors
    # MACs by hand: dense linears for every token, each MoE block's experts for top_k of them, the router
    dense = sum(m.in_features * m.out_features for n, m in q.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and ".experts." not in n)
    experts = len(moe_layers(q)) * TOP_K * 3 * HIDDEN * INNER
    routers = len(moe_layers(q)) * EXPERTS * HIDDEN
    attention = 2 * 2 * 4 * 16 * 128 * 129 // 2  # Q K^T and P V, causal, 2 layers x 4 heads x head_dim 16
    assert ops.macs == 128 * (dense + experts + routers) + attention


def test_info_on_an_moe_model(tmp_path, capsys):
    path = tmp_path / "tiny-qwen3-moe"
    tiny_moe("qwen3_moe").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    code, out, _ = run_cli(["-q", "info", "--model", str(path), "--scheme", "W4A8KV4"], capsys)
    info = json.loads(out)
    assert code == 0 and info["family"] == "qwen3_moe"
    assert info["moe"] == {"experts": 4, "experts_per_token": 2, "moe_layers": [1], "router": "mlp.gate", "shared_expert": None}
    assert "model.layers.{1}.mlp.experts.{0..3}.down_proj" in info["quantized_linears"]
    assert info["quantized_linear_count"] == 4 * 2 + 3 + 3 * EXPERTS


# ---------------------------------------------------------------- layouts lowbit does not know


def one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_an_moe_model_type_without_an_entry_is_one_line():
    from transformers import AutoModelForCausalLM, OlmoeConfig

    config = OlmoeConfig(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, num_experts=4)
    with pytest.raises(UserError) as exc:
        lowbit.quantize(AutoModelForCausalLM.from_config(config), "W4A16", progress=False)
    message = one_line(exc)
    assert "'olmoe'" in message and "mixture-of-experts" in message and "mixtral" in message


def test_an_unknown_moe_model_type_exits_2_from_the_cli(tmp_path, capsys):
    from transformers import OlmoeConfig

    OlmoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path / "olmoe")
    code, _, err = run_cli(["info", "--model", str(tmp_path / "olmoe")], capsys)
    assert code == 2 and "'olmoe'" in err and len(err.strip().splitlines()) == 1


class PerExpertMLPs(nn.ModuleList):
    """Experts as a list of MLP modules (the pre-transformers-5 layout), not fused tensors."""


@pytest.mark.parametrize("damage", ["transposed", "per-expert-modules", "flag"])
def test_an_unexpected_experts_layout_is_one_line(damage):
    model = tiny_moe("mixtral")
    experts = model.model.layers[1].mlp.experts
    if damage == "transposed":  # [E, hidden, 2 x inner] and [E, inner, hidden] (gpt-oss's layout)
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())
        experts.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())
    elif damage == "per-expert-modules":
        model.model.layers[1].mlp.experts = PerExpertMLPs([nn.Linear(HIDDEN, INNER) for _ in range(EXPERTS)])
    else:
        experts.is_transposed = True
    with pytest.raises(UserError) as exc:
        lowbit.quantize(model, "W4A16", progress=False)
    message = one_line(exc)
    assert "layer 1 mlp.experts" in message and "layout" in message
