"""The layer-by-layer pipeline with GPTQ and AWQ on every family: plumbing, ordering, errors."""

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import lowbit
from lowbit import UserError
from lowbit import pipeline as pipeline_module
from lowbit.algorithms import awq as awq_module
from lowbit.algorithms.gptq import GPTQ, GPTQConfig
from lowbit.data import generate_samples
from lowbit.pipeline import PipelineConfig
from lowbit.runtime import QuantLinear
from lowbit.transforms.apply import TransformConfig


def calib(n=6, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def probe(seed=9):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_pipeline_without_quantization_reproduces_the_model(family):
    """Nothing to quantize: the pipeline's captured inputs, masks and rotary embeddings flow
    through every layer exactly as in the stock forward (sliding-window layers included)."""
    model = tiny_model(family)
    out = lowbit.quantize(model, "W16A16", algorithm="gptq", calibration=calib(), pipeline=PipelineConfig(batch_size=4), progress=False)
    x = probe()
    assert torch.allclose(out(x).logits, model(x).logits, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_layer_errors_never_worse_than_rtn(family, algorithm):
    model = tiny_model(family)
    data = calib(n=16, length=64)  # enough tokens that the Hessian of the 128-wide MLP input is well estimated
    q = lowbit.quantize(model, "W4g16A16", algorithm=algorithm, calibration=data, progress=False)
    assert len(lowbit.quantization_state(q).layer_errors) == model.config.num_hidden_layers
    for entry in lowbit.quantization_state(q).layer_errors:
        for group in ("qkv", "o", "gate_up", "down"):
            assert entry[group][algorithm] <= entry[group]["rtn"] * (1 + 1e-6), (entry["layer"], group)
    assert all(isinstance(m, QuantLinear) for name, m in q.named_modules() if name.endswith("proj"))
    x = torch.cat(data[:4])  # end to end on calibration text (a random tiny model has no held-out signal to speak of)
    rtn = lowbit.quantize(model, "W4g16A16", progress=False)
    fp = model(x).logits
    assert (q(x).logits - fp).pow(2).mean() < (rtn(x).logits - fp).pow(2).mean()


@torch.no_grad()
def test_groups_are_calibrated_on_inputs_from_the_quantized_parts_before_them(monkeypatch):
    """The input GPTQ saw for the last down_proj equals what that down_proj receives in the
    finished model: every earlier layer and group (weights, activations and KV cache) was
    already quantized when it was captured."""
    seen = []
    original = GPTQ.add_batch

    def spy(self, x):
        seen.append(x.detach().clone())
        original(self, x)

    monkeypatch.setattr(GPTQ, "add_batch", spy)
    model = tiny_model("llama")
    data = calib(n=4)
    q = lowbit.quantize(model, "W4A4KV4", algorithm="gptq", calibration=data, pipeline=PipelineConfig(batch_size=4), progress=False)
    captured = seen[-1]  # one batch of 4 samples for the last group of the last layer
    inside = []
    handle = q.model.layers[-1].mlp.down_proj.register_forward_pre_hook(lambda m, a: inside.append(a[0]))
    q(torch.cat(data))
    handle.remove()
    assert torch.allclose(captured, inside[0], atol=1e-5)


@torch.no_grad()
def test_awq_scales_are_folded_exactly(family):
    """On a lossless grid (8 bits, one scale per weight: W8g1) AWQ's scaling alone must leave the
    function unchanged: 1/s folded into norms and into the quantized v_proj / up_proj rows' scales
    (shared across heads of a KV group)."""
    model = tiny_model(family)
    config = awq_module.AWQConfig(search_clip=False)
    q = lowbit.quantize(model, "W8g1A16", algorithm=config, calibration=calib(), progress=False)
    assert all(e[g].get("scaled") for e in lowbit.quantization_state(q).layer_errors for g in ("qkv", "o", "gate_up", "down"))
    x = probe()
    assert torch.allclose(q(x).logits, model(x).logits, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_after_rotation(algorithm):
    """Rotation then GPTQ/AWQ: online rotations are kept; AWQ does not scale rotated inputs."""
    model = tiny_model("llama")
    transform = TransformConfig("rotate")
    data = calib(n=16, length=64)
    q = lowbit.quantize(model, "W4A8KV8", transform=transform, algorithm=algorithm, calibration=data, progress=False)
    assert q.model.layers[0].mlp.down_proj.input_rotation is not None
    if algorithm == "awq":
        assert not lowbit.quantization_state(q).layer_errors[0]["down"].get("scaled")
        assert lowbit.quantization_state(q).layer_errors[0]["qkv"].get("scaled")  # fused R1: the norm still takes a scale
    for entry in lowbit.quantization_state(q).layer_errors:
        assert all(entry[g][algorithm] <= entry[g]["rtn"] * (1 + 1e-6) for g in ("qkv", "o", "gate_up", "down"))
    if algorithm == "gptq":  # on a random tiny model AWQ's gain is too small to show end to end
        rtn = lowbit.quantize(model, "W4A8KV8", transform=transform, calibration=data, progress=False)
        x = torch.cat(data[:4])
        fp = model(x).logits
        assert (q(x).logits - fp).pow(2).mean() < (rtn(x).logits - fp).pow(2).mean()


@torch.no_grad()
def test_static_activations_and_kv_are_calibrated_in_the_pipeline():
    model = tiny_model("qwen2")
    q = lowbit.quantize(model, "W4A8sKV8s", algorithm="gptq", calibration=calib(), progress=False)
    quantizers = [m for m in q.modules() if isinstance(m, lowbit.runtime.quantizer.TensorQuantizer)]
    assert quantizers and all(m.calibrated for m in quantizers)
    assert torch.isfinite(q(probe()).logits).all()


def test_input_model_is_untouched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowbit.quantize(model, "W4A16", algorithm="awq", calibration=calib(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pipeline_errors():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="gptq needs calibration data"):
        lowbit.quantize(model, "W4A16", algorithm="gptq", progress=False)
    with pytest.raises(UserError, match="share one length"):
        lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=[calib(1, 16)[0], calib(1, 32)[0]], progress=False)
    with pytest.raises(UserError, match="act-order with dynamic groups"):
        lowbit.quantize(
            model,
            "W4g16A16",
            algorithm=GPTQConfig(act_order=True, static_groups=False),
            calibration=calib(),
            progress=False,
        )
    with pytest.raises(UserError, match="does not divide"):
        lowbit.quantize(model, "W4g48A16", algorithm="gptq", calibration=calib(), progress=False)
    with pytest.raises(UserError, match="device 'nonsense"):
        lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=calib(), pipeline=PipelineConfig(device="nonsense:0"), progress=False)
    with pytest.raises(UserError, match="unknown algorithm"):
        lowbit.quantize(model, "W4A16", algorithm="obq", calibration=calib(), progress=False)


@torch.no_grad()
def test_generated_calibration_is_seeded_and_hybrid():
    model = tiny_model("llama")
    tok = word_tokenizer()
    a = generate_samples(model, tok, 3, 12, seed=4, batch_size=2, progress=False)
    b = generate_samples(model, tok, 3, 12, seed=4, batch_size=2, progress=False)
    assert len(a) == 3 and all(s.shape == (1, 12) for s in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    special = set(tok.all_special_ids)
    assert all(int(s[0, 0]) not in special for s in a)
    for s in a:  # the first three tokens after the start are the model's argmax
        for t in range(1, 4):
            assert int(s[0, t]) == int(model(s[:, :t]).logits[0, -1].argmax())


def test_every_named_recipe_builds():
    from lowbit.recipes import NAMED, RECOMMENDED, load_recipe

    assert list(NAMED)[: len(RECOMMENDED)] == list(RECOMMENDED)
    for name in NAMED:
        recipe = load_recipe(name)
        assert recipe.scheme.name and recipe.algorithm in ("rtn", "gptq", "awq")
    assert load_recipe("w4a4kv4-rotate-gptq").transform.kind == "rotate"
    assert load_recipe("w8a8-smoothquant").transform.alpha == 0.5
    assert load_recipe("mxfp4-bh-gptq").transform.rotation_block == 32 and load_recipe("nvfp4-bh-gptq").scheme.weights.format_name == "nvfp4"


def test_recipe_yaml_with_gptq_and_awq_knobs(tmp_path):
    from lowbit.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("scheme: W4g32A16\nalgorithm: gptq\nclip_tokens: 3\n")
    with pytest.raises(UserError, match="unknown keys clip_tokens"):
        load_recipe(str(path))
    path.write_text("scheme: W4g32A16\nalgorithm: gptq\ntoken_clip: null\n")
    assert load_recipe(str(path)).algorithm_config.token_clip is None
    path.write_text("scheme: W4g32A16\nalgorithm: gptq\nact_order: true\ndamp: 0.02\n")
    recipe = load_recipe(str(path))
    assert recipe.algorithm_config.act_order and recipe.algorithm_config.damp == 0.02
    path.write_text("scheme: W4A16\nalgorithm: awq\nclip_grid: 10\n")
    assert load_recipe(str(path)).algorithm_config.clip_grid == 10
    path.write_text("scheme: W4A16\nalgorithm: awq\ndamp: 0.1\n")  # a knob of another algorithm
    with pytest.raises(UserError, match="unknown keys damp for algorithm awq.*belong to gptq"):
        load_recipe(str(path))
    for bad, needle in (
        ("damp: abc", "damp must be a number"),
        ("act_order: 'false'", "act_order must be true/false"),
        ("block_size: 'x'", "block_size must be an integer"),
        ("fuse_r1: 'false'", "fuse_r1 must be true/false"),
    ):
        path.write_text(f"scheme: W4A16\nalgorithm: gptq\n{bad}\n")
        with pytest.raises(UserError, match=needle):
            load_recipe(str(path))
    path.write_text("scheme: W4g32A16\nalgorithm: gptq\nact_order: true\nstatic_groups: false\n")
    with pytest.raises(UserError, match="act-order with dynamic groups"):
        load_recipe(str(path))


def test_awq_clip_search_never_worse_than_minmax():
    from lowbit.quant import fake_quantize
    from lowbit.scheme import parse_scheme

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    weight = torch.randn(32, 64, generator=g)
    weight[:, 3] *= 10  # a few large weights make clipping worthwhile
    for scheme in ("W4A16", "W3g16A16", "W4tA16", "W4aA16"):
        args = parse_scheme(scheme).weights
        clipped = awq_module.clipped_quantize(x, weight, args, awq_module.AWQConfig()).dequantize()
        plain = fake_quantize(weight, args)
        err = lambda q: (x @ (weight - q).T).pow(2).sum()
        assert err(clipped) <= err(plain) * (1 + 1e-6), scheme


def test_awq_scale_search_includes_no_scaling():
    """Exponent 0 of the grid gives s = 1, so the searched scales never do worse than none."""
    from lowbit.scheme import parse_scheme

    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    x[:, 5] *= 30
    weight = torch.randn(16, 32, generator=g)
    args = parse_scheme("W3A16").weights
    s = awq_module.awq_scales(x, weight, x.abs().mean(0), args, grid=20)
    from lowbit.quant import fake_quantize

    err_scaled = (x @ weight.T - (x / s) @ fake_quantize(weight * s, args).T).pow(2).sum()
    err_plain = (x @ weight.T - x @ fake_quantize(weight, args).T).pow(2).sum()
    assert err_scaled <= err_plain * (1 + 1e-6)
    assert s[5] > s.median()  # the large channel is protected (scaled up)


@torch.no_grad()
def test_bfloat16_calibration_forwards_stay_close_to_float32(monkeypatch):
    model = tiny_model("llama")
    data = calib(n=8, length=32)
    stored = []
    capture = pipeline_module._capture_layer_inputs

    def spy(*args):
        hidden, kwargs = capture(*args)
        stored.append({h.dtype for h in hidden})
        return hidden, kwargs

    monkeypatch.setattr(pipeline_module, "_capture_layer_inputs", spy)
    fp32 = lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=data, progress=False)
    bf16 = lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=data, pipeline=PipelineConfig(dtype="bfloat16"), progress=False)
    assert next(bf16.parameters()).dtype == torch.float32  # only the calibration passes ran in bf16
    assert stored == [{torch.float32}, {torch.bfloat16}]  # layer inputs kept at the pipeline's precision
    x = probe()
    fp = model(x).logits
    assert (bf16(x).logits - fp).pow(2).mean() < 2 * (fp32(x).logits - fp).pow(2).mean()
    with pytest.raises(UserError, match="float32 or bfloat16"):
        PipelineConfig(dtype="float16").check()


@torch.no_grad()
def test_pipeline_on_a_bfloat16_model():
    model = tiny_model("qwen2").to(torch.bfloat16)
    q = lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=calib(n=4), progress=False)
    assert next(q.parameters()).dtype == torch.bfloat16
    x = probe()
    err = (q(x).logits.float() - model(x).logits.float()).pow(2).mean()
    rtn = lowbit.quantize(model, "W4A16", progress=False)
    assert err < 2 * (rtn(x).logits.float() - model(x).logits.float()).pow(2).mean()


@torch.no_grad()
def test_awq_keeps_a_bounded_uniform_sample_of_its_inputs():
    """However many batches pass, AWQ holds at most `sample_rows` rows: real input rows, drawn
    evenly from early and late batches, and its channel means still count every row."""
    collector = awq_module.AWQ(4, sample_rows=300, seed=1)
    batches = [torch.full((2, 50, 4), float(i)) + torch.arange(4.0) / 10 for i in range(40)]  # 100 rows each
    for batch in batches:
        collector.add_batch(batch)
        assert collector.sample().shape[0] <= 300
    rows = collector.sample()
    assert rows.shape == (300, 4)
    assert torch.allclose(rows - rows[:, :1], (torch.arange(4.0) / 10).expand(300, 4), atol=1e-5)  # real rows
    per_batch = torch.bincount(rows[:, 0].round().long(), minlength=40)
    assert per_batch[:20].sum() > 100 and per_batch[20:].sum() > 100  # 150 each expected: not the last batches only
    assert collector.count == 4000
    assert torch.allclose(collector.abs_sum / collector.count, torch.stack(batches).abs().mean((0, 1, 2)).double())
