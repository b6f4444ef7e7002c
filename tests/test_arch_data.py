"""A family is data: OPT (the model family of the GPTQ, SmoothQuant and AWQ papers), whose modules
have none of the Llama names (model.decoder.layers, self_attn.out_proj, fc1, fc2,
self_attn_layer_norm, final_layer_norm) and whose norms are LayerNorms with a bias, is described
here as an `ArchSpec` and nothing else, then quantized, rotated, smoothed, saved and reloaded."""

import pytest
import torch

import lowbit
from lowbit import ArchSpec, InputGroup, register_arch
from lowbit.arch import ARCHITECTURES
from lowbit.runtime import QuantLinear

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPT = ArchSpec(
    "opt",
    ("opt",),
    layers="model.decoder.layers",
    embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    linears=(*ATTN, "self_attn.out_proj", "fc1", "fc2"),
    input_groups=(
        InputGroup("self_attn_layer_norm", ATTN, "qkv", "r1"),
        InputGroup("self_attn.v_proj", ("self_attn.out_proj",), "o", "r2", reads_attention_output=True, kv_tied=True),
        InputGroup("final_layer_norm", ("fc1",), "fc1", "r1"),
        # ReLU is positively homogeneous, so fc1's rows can absorb a positive scale of fc2's input
        InputGroup("fc1", ("fc2",), "fc2", "r4", massive_outliers=True),
    ),
    residual_writers=("self_attn.out_proj", "fc2"),
    rms_norm=False,
)


@pytest.fixture(scope="module", autouse=True)
def opt_registered():
    if not any("opt" in spec.model_types for spec in ARCHITECTURES):
        register_arch(OPT)
    yield


def tiny_opt(seed=0):
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=512,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
        do_layer_norm_before=True,
        enable_bias=True,
    )
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 0.1)
            if "layer_norm.weight" in name:
                p.add_(1.0)
    return model.eval()


def tokens():
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))


def calibration():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 512, (1, 32), generator=g) for _ in range(4)]


@pytest.mark.parametrize("transform", ["smooth", "rotate", "smoothrot"])
@torch.no_grad()
def test_transforms_keep_the_function_of_a_layernorm_family(transform):
    """Without quantization an equivalent transformation changes nothing: the LayerNorm biases are
    folded into the readers' biases (rotation) or scaled with the gains (smoothing)."""
    model = tiny_opt()
    q = lowbit.quantize(model, "W16A16", transform=transform, calibration=calibration(), progress=False)
    torch.testing.assert_close(q(tokens()).logits, model(tokens()).logits, atol=2e-4, rtol=1e-4)
    if transform != "smooth":  # R1 runs online (a LayerNorm's mean subtraction is not rotation-invariant)
        assert q.model.decoder.layers[0].fc1.input_rotation is not None


@pytest.mark.parametrize(
    "scheme, transform, algorithm",
    [("W4A8KV4", "rotate", "gptq"), ("W8A8", "smooth", "awq"), ("W4g16A16", "none", "awq"), ("W4A8KV4", "smoothrot", "rtn")],
)
@torch.no_grad()
def test_quantize_save_and_reload_a_family_given_as_data(scheme, transform, algorithm, tmp_path):
    model = tiny_opt()
    x = tokens()
    q = lowbit.quantize(model, scheme, transform=transform, algorithm=algorithm, calibration=calibration(), progress=False)
    linears = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 6 and all(q.get_submodule(n).is_quantized for n in linears)
    errors = lowbit.quantization_state(q).layer_errors  # per layer and input group, named by the spec's roles
    assert algorithm == "rtn" or set(errors[0]) == {"layer", "qkv", "o", "fc1", "fc2"}
    fp, out = model(x).logits, q(x).logits
    assert not torch.equal(out, fp)
    assert (out - fp).norm() / fp.norm() < 0.5  # quantized, not broken
    lowbit.save_quantized(q, tmp_path / "opt")
    loaded, _ = lowbit.load_quantized(tmp_path / "opt")
    assert torch.equal(loaded(x).logits, out)


def test_architecture_entries_are_checked():
    with pytest.raises(ValueError, match="already have an architecture"):
        register_arch(ArchSpec("llama-again", ("llama",)))
    with pytest.raises(ValueError, match="rotation must be one of"):
        InputGroup("norm", ("a",), "a", "r9")
