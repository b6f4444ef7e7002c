"""Learned R1 (KurTail): orthogonal by construction, function-preserving fused and online, a lower
objective than its Hadamard start, saved and reloaded with identical logits, knobs checked early."""

import json

import pytest
import torch
from conftest import quantize_args, run_cli, tiny_model

import lowbit
from lowbit import UserError
from lowbit.hadamard import orthogonal_hadamard, random_signs
from lowbit.io import load_quantized, save_quantized
from lowbit.io.compressed_tensors_export import export_compressed_tensors
from lowbit.io.gguf_export import export_gguf
from lowbit.io.native import CONFIG_FILE
from lowbit.recipes import recipe_from_dict
from lowbit.runtime.rotation import OnlineHadamard, OnlineRotation
from lowbit.transforms.apply import TransformConfig
from lowbit.transforms.learn import kurtosis_loss, learn_rotation

ATOL = 1e-4  # as the other transform tests: fp32 logits of magnitude ~10
STEPS = 10


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


CALIB = [tokens(1, 32, seed=s) for s in range(4)]


def learned(**knobs) -> TransformConfig:
    return TransformConfig("rotate", learn_rotation="kurtail", learn_steps=STEPS, **knobs)


def tailed_rows(n=64, count=512):
    """Rows with a few outlier channels: heavy-tailed, as LLM activations are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(count, n, generator=g, dtype=torch.float64)
    x[:, :3] *= 20
    return x


def test_learned_rotation_is_orthogonal_lowers_the_objective_and_is_deterministic():
    x = tailed_rows()
    start = orthogonal_hadamard(64, random_signs(64, 5))
    r, history = learn_rotation(x, start, 30, 1e-2, progress=False)
    assert r.dtype == torch.float64
    assert (r @ r.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-10
    assert len(history) == 31
    assert history[0] == pytest.approx(kurtosis_loss(x @ start).item(), rel=1e-5)  # it starts at the Hadamard
    assert history[-1] < 0.95 * history[0]
    again, _ = learn_rotation(x, start, 30, 1e-2, progress=False)
    assert torch.equal(r, again)


@torch.no_grad()
@pytest.mark.parametrize(
    "knobs",
    [dict(), dict(seed=7), dict(fuse_r1=False, fold_norms=False), dict(fuse_r1=False), dict(fuse_r1=False, fold_norms=False, learn_per_layer=True)],
    ids=["fused", "fused-signs", "online", "online-fold", "online-per-layer"],
)
def test_learned_r1_preserves_the_function(family, knobs):
    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    q = lowbit.quantize(model, "W16A16KV16", transform=learned(**knobs), calibration=CALIB, progress=False)
    assert (q(x).logits - ref).abs().max() < ATOL
    info = lowbit.quantization_state(q).transform["learned_rotation"]
    assert all(entry["end"] < entry["start"] for entry in info.values())  # lower than at the Hadamard start
    online = [getattr(m, "input_rotation", None) for n, m in q.named_modules() if n.endswith(("q_proj", "gate_proj"))]
    fused = "fuse_r1" not in knobs and family not in ("gemma2", "gemma3")  # sandwich norms: R1 runs online
    if fused:
        assert all(r is None for r in online)
    else:
        assert all(isinstance(r, OnlineRotation) for r in online)
        assert len({id(r) for r in online}) == (len(online) if knobs.get("learn_per_layer") else 1)


@torch.no_grad()
def test_learned_r1_makes_4_bit_activations_more_accurate_than_the_hadamard():
    """The reason for learning it: on an outlier-heavy model, W16A4 output error below the Hadamard's."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:  # outlier channels in the residual stream's readers' input
            layer.input_layernorm.weight[:2] = 30.0
            layer.post_attention_layernorm.weight[:2] = 30.0
    x = tokens()
    ref = model(x).logits

    def error(transform):
        q = lowbit.quantize(model, "W16A4", transform=transform, calibration=CALIB, progress=False)
        return (q(x).logits - ref).pow(2).mean().item()

    base = dict(fuse_r1=False, fold_norms=False)
    assert error(TransformConfig("rotate", learn_rotation="kurtail", learn_steps=100, **base)) < error(TransformConfig("rotate", **base))


@torch.no_grad()
@pytest.mark.parametrize("per_layer", [False, True])
def test_online_learned_r1_saves_and_loads_with_identical_logits(per_layer, tmp_path):
    transform = learned(fuse_r1=False, fold_norms=False, learn_per_layer=per_layer)
    q = lowbit.quantize(tiny_model("llama"), "W4A8KV4", transform=transform, calibration=CALIB, progress=False)
    x = tokens()
    save_quantized(q, tmp_path / "m")
    loaded, _ = load_quantized(tmp_path / "m")
    assert torch.equal(loaded(x).logits, q(x).logits)
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["format_version"] == 6
    rotations = {type(m.input_rotation) for m in loaded.modules() if hasattr(m, "input_rotation") and m.input_rotation is not None}
    assert rotations == {OnlineRotation, OnlineHadamard}  # learned R1, Hadamard R2 (o_proj) and R4
    kept = loaded.model.layers[0].self_attn
    assert kept.q_proj.input_rotation is kept.k_proj.input_rotation  # shared, stored once


@torch.no_grad()
def test_exports_refuse_an_online_learned_rotation(tmp_path):
    transform = learned(fuse_r1=False, fold_norms=False)
    q = lowbit.quantize(tiny_model("llama"), "W4A16", transform=transform, calibration=CALIB, progress=False)
    with pytest.raises(UserError, match="rotate their input online"):
        export_compressed_tensors(q, tmp_path / "ct")
    q = lowbit.quantize(tiny_model("llama"), "W4g32fh", transform=transform, calibration=CALIB, progress=False)
    with pytest.raises(UserError, match="rotate their input online"):
        export_gguf(q, tmp_path / "m.gguf", None)


@pytest.mark.parametrize(
    "knobs,message",
    [
        (dict(learn_rotation="spinquant"), "learn_rotation must be one of kurtail"),
        (dict(learn_rotation="kurtail", learn_steps=0), "learn_steps must be a positive integer"),
        (dict(learn_rotation="kurtail", learn_steps=2.5), "learn_steps must be a positive integer"),
        (dict(learn_rotation="kurtail", learn_lr=0.0), "learn_lr must be a positive number"),
        (dict(learn_rotation="kurtail", learn_lr=float("nan")), "learn_lr must be a positive number"),
        (dict(learn_rotation="kurtail", kind="smoothrot"), "needs transform 'rotate'"),
        (dict(learn_rotation="kurtail", r1=False), "needs transform 'rotate' with r1 on"),
        (dict(learn_rotation="kurtail", rotation_block=16), "block-diagonal"),
        (dict(learn_per_layer=True), "learn_per_layer needs learn_rotation"),
    ],
)
def test_bad_knobs_fail_with_one_line_user_errors(knobs, message):
    knobs = {"kind": "rotate", **knobs}
    with pytest.raises(UserError, match=message) as err:
        TransformConfig(**knobs)
    assert "\n" not in str(err.value)


def test_learned_rotation_needs_calibration_and_online_r1_for_per_layer():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="needs calibration data"):
        lowbit.quantize(model, "W4A4", transform=learned(), progress=False)
    with pytest.raises(UserError, match="only online R1 allows"):
        lowbit.quantize(model, "W4A4", transform=learned(learn_per_layer=True), calibration=CALIB, progress=False)


def test_recipes_set_the_learning_knobs():
    recipe = recipe_from_dict(
        {"scheme": "W4fA4fKV4f", "transform": "rotate", "fuse_r1": False, "learn_rotation": "kurtail", "learn_steps": 50, "learn_lr": 0.002}, "test"
    )
    assert (recipe.transform.learn_rotation, recipe.transform.learn_steps, recipe.transform.learn_lr) == ("kurtail", 50, 0.002)
    assert recipe.transform.needs_calibration
    with pytest.raises(UserError, match="learn_steps must be"):
        recipe_from_dict({"scheme": "W4A4", "transform": "rotate", "learn_rotation": "kurtail", "learn_steps": "many"}, "test")


def test_cli_sets_the_learning_knobs(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out, calib = tmp_path / "run", tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])  # never the evaluation text
    learn = ["--set", "learn_rotation=kurtail", "--set", "learn_steps=5"]
    args = quantize_args(tiny_model_dir, sample_text_file, "--scheme", "W4A4", "--transform", "rotate", "--online-r1", *learn)
    code, _, err = run_cli([*args, "--calib", str(calib), "--calib-samples", "2", "--calib-seq-len", "16", "--out", str(out)], capsys)
    assert code == 0, err
    transform = json.loads((out / "report.json").read_text())["transform_args"]
    assert (transform["learn_rotation"], transform["learn_steps"], transform["fuse_r1"]) == ("kurtail", 5, False)
    assert transform["learned_rotation"]["r1"]["end"] < transform["learned_rotation"]["r1"]["start"]
    code, _, err = run_cli([*args, "--set", "learn_lr=-1"], capsys)
    assert code == 2 and "learn_lr must be a positive number" in err, err


def test_onloading_refuses_a_learned_rotation(tiny_model_dir):
    from lowbit.scheme import parse_scheme
    from lowbit.streaming import quantize_onloaded

    with pytest.raises(UserError, match="load the model whole"):
        quantize_onloaded(tiny_model_dir, parse_scheme("W4A4"), learned(fuse_r1=False), "rtn", CALIB, None, progress=False)


@torch.no_grad()
@pytest.mark.parametrize("moe_family", ["mixtral", "qwen2_moe"])
def test_learned_r1_is_fused_into_mixture_of_experts_routers(moe_family):
    from test_moe import calibration, probe, relative, tiny_moe

    model = tiny_moe(moe_family)
    q = lowbit.quantize(model, "W16A16", transform=learned(), calibration=calibration(), progress=False)
    x = probe()
    assert relative(q(x).logits, model(x).logits) < 1e-4
    with pytest.raises(UserError, match="mixture of experts"):  # online R1 stays refused there
        lowbit.quantize(model, "W16A16", transform=learned(fuse_r1=False), calibration=calibration(), progress=False)
