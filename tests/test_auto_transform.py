"""transform 'auto': per input group, the option of lowest measured quantized output error."""

import copy

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit import UserError
from lowbit.arch import decoder_layers, get_arch, get_module
from lowbit.hadamard import orthogonal_hadamard
from lowbit.recipes import load_recipe, recipe_from_dict
from lowbit.runtime import QuantLinear
from lowbit.scheme import parse_scheme
from lowbit.transforms.apply import SAMPLE_ROWS, TransformConfig, apply_transform, collect_input_stats
from lowbit.transforms.smooth import quantized_output_error, search_alpha

AUTO = TransformConfig("auto", alpha=None)
SCHEME = parse_scheme("W4A4KV4")
CALIB = [torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
X = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def outlier_model():
    """Tiny Llama with a massive channel in layer 0's attention input and in its down_proj input."""
    model = tiny_model("llama")
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.input_layernorm.weight[5] *= 40
        layer.mlp.up_proj.weight[3] *= 40
    return model


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("block", [None, 8])
def test_auto_preserves_the_function(family, block):
    model = tiny_model(family)
    ref = model(X).logits
    info = apply_transform(model, get_arch(model), TransformConfig("auto", alpha=None, rotation_block=block), SCHEME, CALIB, progress=False)
    assert (model(X).logits - ref).abs().max() < 1e-4
    assert {c["choice"] for c in info["choices"].values()} - {"none"}  # it did transform something
    for key, c in info["choices"].items():
        assert (c["alpha"] is not None) == (c["choice"] in ("smooth", "smoothrot"))
        assert info.get("alphas", {}).get(key) == c["alpha"] or c["alpha"] is None


def _rotation_matrix(group, n: int, head_dim: int) -> torch.Tensor:
    """The rotation auto applies to a group's input, as an explicit matrix (R2: per head, then full)."""
    full = orthogonal_hadamard(n, dtype=torch.float32)
    if group.rotation != "r2":
        return full
    return torch.block_diag(*[orthogonal_hadamard(head_dim, dtype=torch.float32)] * (n // head_dim)) @ full


@torch.no_grad()
def test_the_chosen_option_has_the_smallest_measured_error():
    model = outlier_model()
    spec = get_arch(model)
    stats = collect_input_stats(model, spec, CALIB, SAMPLE_ROWS, progress=False)
    original = copy.deepcopy(model)
    info = apply_transform(model, spec, AUTO, SCHEME, CALIB, progress=False)
    w_args, a_args = SCHEME.weights, SCHEME.inputs
    applied = {}
    for i, (before, after) in enumerate(zip(decoder_layers(original, spec), decoder_layers(model, spec))):
        for group in spec.input_groups:
            chosen = info["choices"][f"{i}.{group.role}"]
            assert chosen["choice"] == min(chosen["errors"], key=chosen["errors"].get)
            linears = [get_module(after, n) for n in group.linears]
            rotation = getattr(linears[0], "input_rotation", None)
            assert (rotation is not None) == (chosen["choice"] in ("rotate", "smoothrot"))
            applied[f"{i}.{group.role}"] = linears, rotation
            if group.role not in ("o", "down"):
                continue  # qkv and gate_up are measured after o and down edited the rows of v_proj and up_proj
            # every option's error, computed directly with explicit matrices (o and down: from the original weights)
            x, act = stats[(i, group.role)]["rows"].float(), stats[(i, group.role)]["absmax"].float()
            w = torch.cat([get_module(before, n).weight for n in group.linears])
            if group.kv_tied:  # o_proj's channels share v_proj's scale per KV head: their maxima are pooled
                act = act.view(-1, 2, 16).amax(1, keepdim=True).expand(-1, 2, -1).reshape(-1)
            wmax = w.abs().amax(0)
            if group.kv_tied:
                wmax = wmax.view(-1, 2, 16).amax(1, keepdim=True).expand(-1, 2, -1).reshape(-1)
            r = _rotation_matrix(group, x.shape[1], 16)
            errors = {"none": quantized_output_error(x, w, w_args, a_args), "rotate": quantized_output_error(x @ r, w @ r, w_args, a_args)}
            for name, rot in (("smooth", None), ("smoothrot", lambda t, r=r: t @ r)):
                _, s = search_alpha(x, w, act, wmax, w_args, a_args, rot)
                rot = rot or (lambda t: t)
                errors[name] = quantized_output_error(rot(x / s), rot(w * s), w_args, a_args)
            assert chosen["errors"] == pytest.approx(errors, rel=1e-3)
    # and the model computes the chosen option: the error of the transformed layer is the one measured
    after_stats = collect_input_stats(model, spec, CALIB, SAMPLE_ROWS, progress=False)  # the same token positions are sampled
    for key, (linears, rotation) in applied.items():
        i, role = key.split(".")
        chosen = info["choices"][key]
        x = after_stats[(int(i), role)]["rows"].float()
        w = torch.cat([lin.weight.float() for lin in linears])  # W s R already: only the input rotates online
        x = rotation(x) if rotation is not None else x
        assert quantized_output_error(x, w, w_args, a_args) == pytest.approx(chosen["errors"][chosen["choice"]], rel=1e-3)
    # the planted outliers: layer 0's attention input and down_proj input are transformed
    assert info["choices"]["0.qkv"]["choice"] != "none" and info["choices"]["0.down"]["choice"] != "none"


@torch.no_grad()
def test_rotations_turned_off_are_not_candidates():
    model = outlier_model()
    info = apply_transform(model, get_arch(model), TransformConfig("auto", alpha=None, r2=False, r4=False), SCHEME, CALIB, progress=False)
    for key, chosen in info["choices"].items():
        rotatable = key.endswith(("qkv", "gate_up"))
        assert set(chosen["errors"]) == ({"none", "smooth", "rotate", "smoothrot"} if rotatable else {"none", "smooth"})


@torch.no_grad()
def test_auto_is_deterministic():
    a, b = outlier_model(), outlier_model()
    info_a = apply_transform(a, get_arch(a), AUTO, SCHEME, CALIB, progress=False)
    info_b = apply_transform(b, get_arch(b), AUTO, SCHEME, CALIB, progress=False)
    assert info_a == info_b
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@torch.no_grad()
def test_without_quantization_auto_changes_nothing():
    # every option then has zero error: the tie keeps "none"
    model = tiny_model("llama")
    info = apply_transform(model, get_arch(model), AUTO, parse_scheme("W16A16KV16"), CALIB, progress=False)
    assert {c["choice"] for c in info["choices"].values()} == {"none"}


@torch.no_grad()
def test_save_and_load_give_identical_logits(tmp_path):
    from lowbit.io import load_quantized, save_quantized
    from lowbit.runtime.state import quantization_state

    q = lowbit.quantize(outlier_model(), "W4A4KV4", transform=AUTO, calibration=CALIB, progress=False)
    transform = quantization_state(q).transform
    assert transform["kind"] == "auto" and transform["fuse_r1"] is False and transform["fold_norms"] is False
    assert set(transform["choices"]) == {f"{i}.{r}" for i in range(2) for r in ("qkv", "o", "gate_up", "down")}
    assert any(isinstance(m, QuantLinear) and m.input_rotation is not None for m in q.modules())
    save_quantized(q, tmp_path / "m")
    loaded, _ = load_quantized(tmp_path / "m")
    assert torch.equal(loaded(X).logits, q(X).logits)
    assert quantization_state(loaded).transform == transform
    from lowbit.report import report_markdown

    md = report_markdown({"model": "tiny", "transform": "auto", "transform_args": transform})
    assert f"| 0 | {transform['choices']['0.qkv']['choice']}" in md


def test_recipes_and_config():
    recipe = recipe_from_dict({"scheme": "W4fA4fKV4f", "transform": "auto"}, "test")
    assert recipe.transform.alpha is None  # searched unless fixed
    assert recipe_from_dict({"scheme": "W8A8", "transform": "auto", "alpha": 0.5}, "test").transform.alpha == 0.5
    assert load_recipe("w4a4kv4-auto-rtn").transform.kind == "auto"
    config = TransformConfig("auto", fuse_r1=True, fold_norms=True)  # a choice per group: R1 online, norms in place
    assert (config.fuse_r1, config.fold_norms, config.rotates, config.needs_calibration) == (False, False, True, True)
    # from Python as from recipes and the CLI: auto searches alpha unless given, smoothing takes 0.5
    assert config.alpha is None and TransformConfig("auto", alpha=0.3).alpha == 0.3
    assert TransformConfig("smooth").alpha == 0.5 and TransformConfig("smoothrot", alpha=None).alpha is None
    with pytest.raises(UserError, match="alpha must be a number"):
        TransformConfig("smooth", alpha="serch")


def test_bad_input():
    with pytest.raises(UserError, match="needs calibration data"):
        lowbit.quantize(tiny_model("llama"), "W4A4", transform="auto", progress=False)
    from test_moe import tiny_moe

    with pytest.raises(UserError, match="transform 'auto' is not supported for mixtral"):
        lowbit.quantize(tiny_moe("mixtral"), "W4A4", transform="auto", calibration=CALIB, progress=False)


def test_auto_on_an_architecture_without_rotation(monkeypatch):
    from dataclasses import replace

    from lowbit import arch

    patched = tuple(replace(s, transforms=("smooth",)) if s.family == "llama" else s for s in arch.ARCHITECTURES)
    monkeypatch.setattr(arch, "ARCHITECTURES", patched)
    with pytest.raises(UserError, match="transform 'auto' chooses among smooth and rotate per group; llama does not support rotate"):
        lowbit.quantize(tiny_model("llama"), "W4A4", transform="auto", calibration=CALIB, progress=False)


def test_cli_transform_auto_searches_alpha_unless_given():
    from lowbit.cli import _recipe_from_options

    options = dict.fromkeys(("recipe", "scheme", "algorithm", "alpha", "rotation_block", "act_order", "damp"))
    options.update(transform="auto", smooth_all=False, random_hadamard=False, online_r1=False, no_fold_norms=False, settings=(), seed=0)
    assert _recipe_from_options(options).transform.alpha is None
    assert _recipe_from_options({**options, "alpha": "0.3"}).transform.alpha == 0.3


@torch.no_grad()
def test_the_search_error_takes_minmax_weight_scales_whatever_the_observer():
    """Candidates are ranked with MinMax weight scales (an MSE search per candidate was the slow part
    of the search); the chosen weights get the scheme's own observer when they are quantized."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 32, generator=g), torch.randn(48, 32, generator=g)
    w[:, 3] *= 30  # outliers, so that MSE-searched scales differ from MinMax
    mse, minmax = parse_scheme("W4mA4"), parse_scheme("W4A4")
    assert quantized_output_error(x, w, mse.weights, mse.inputs) == quantized_output_error(x, w, minmax.weights, minmax.inputs)
    from lowbit.quant import fake_quantize

    assert not torch.equal(fake_quantize(w, mse.weights), fake_quantize(w, minmax.weights))
