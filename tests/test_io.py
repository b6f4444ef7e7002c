"""Native save and load: every scheme and transform round-trips with identical logits; damaged,
incomplete or newer saved models fail with a clear UserError."""

import json
import math

import pytest
import torch
from conftest import FAMILIES, old_paley, tiny_config, tiny_model, word_tokenizer

import lowbit
from lowbit import UserError
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.io import load_quantized, save_quantized
from lowbit.io.native import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from lowbit.runtime import QuantLinear
from lowbit.scheme import parse_scheme
from lowbit.transforms.apply import TransformConfig


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibration(n=4, length=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


@torch.no_grad()
def assert_round_trip(q, path, tokenizer=None):
    x = tokens()
    ref = q(x).logits
    save_quantized(q, path, tokenizer)
    loaded, tok = load_quantized(path)
    assert torch.equal(loaded(x).logits, ref)  # identical, not close
    assert lowbit.quantization_state(loaded).scheme == lowbit.quantization_state(q).scheme
    # the same modules in the same places
    kinds = {n: type(m).__name__ for n, m in q.named_modules()}
    assert {n: type(m).__name__ for n, m in loaded.named_modules()} == kinds
    return loaded, tok


# ---------------------------------------------------------------- round trips

SCHEMES = [
    "W4A16",  # per-channel weight-only
    "W4g16aA16",  # group, asymmetric
    "W3g32A16",
    "W8A8",  # per-token dynamic activations
    "W4A8KV4",  # KV cache per token
    "W8tA8tKV8a",  # per-tensor, asymmetric KV
    "W4mA4c90KV4",  # MSE observer, clipped activations
    "W4g16fA8fKV4",  # full-range symmetric grid (compressed-tensors' grid)
    "W16A8KV8",  # activations only
]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_every_scheme_rtn(scheme, tmp_path):
    assert_round_trip(lowbit.quantize(tiny_model("llama"), scheme, progress=False), tmp_path / "m")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transform", ["none", "smooth", "rotate", "smoothrot"])
def test_round_trip_every_transform_and_family(family, transform, tmp_path):
    q = lowbit.quantize(tiny_model(family), "W4A8KV4", transform=transform, calibration=calibration(), progress=False)
    assert_round_trip(q, tmp_path / "m")


@pytest.mark.parametrize(
    "transform",
    [
        TransformConfig(kind="rotate", fuse_r1=False, fold_norms=False),  # online R1, norms kept
        TransformConfig(kind="rotate", seed=7),  # random-sign Hadamard (signs stored)
        TransformConfig(kind="smoothrot", smooth_all=True, alpha=None),  # online R1 + per-layer alpha
    ],
    ids=["online-r1", "random-hadamard", "smoothrot-all"],
)
def test_round_trip_online_rotations(transform, tmp_path):
    q = lowbit.quantize(tiny_model("qwen2"), "W4g16A8KV4", transform=transform, calibration=calibration(), progress=False)
    assert any(m.input_rotation is not None for m in q.modules() if isinstance(m, QuantLinear))
    assert_round_trip(q, tmp_path / "m")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "scheme,algorithm,transform",
    [
        ("W4g16aA16", "gptq", "none"),
        ("W3A16", "gptq", "rotate"),
        ("W4A8sKV8s", "gptq", "smoothrot"),  # static activation and KV ranges
        ("W4g16A16", "awq", "none"),
        ("W8A8s", "awq", "smooth"),
    ],
)
def test_round_trip_calibrated_algorithms(family, scheme, algorithm, transform, tmp_path):
    q = lowbit.quantize(
        tiny_model(family),
        scheme,
        transform=transform,
        algorithm=GPTQConfig(act_order=True) if algorithm == "gptq" else algorithm,
        calibration=calibration(),
        progress=False,
    )
    assert_round_trip(q, tmp_path / "m")


@pytest.mark.parametrize("scheme", ["W4g16A8KV8", "W8aA16"])
def test_round_trip_bfloat16_model(scheme, tmp_path):
    from transformers import AutoModelForCausalLM

    # built in bf16 (as from_pretrained(dtype=bf16) would): `.to(bf16)` would also round the
    # rotary frequencies, which are not saved but recomputed from the config on load
    fp32 = tiny_model("llama")
    model = AutoModelForCausalLM.from_config(fp32.config, dtype=torch.bfloat16).eval()
    model.load_state_dict(fp32.state_dict())
    q = lowbit.quantize(model, scheme, progress=False)
    loaded, _ = assert_round_trip(q, tmp_path / "m")
    assert loaded.model.layers[0].mlp.down_proj.dense_weight(torch.bfloat16).dtype == torch.bfloat16
    assert loaded.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16


def test_round_trip_quantized_lm_head_and_tokenizer(tmp_path):
    from dataclasses import replace

    scheme = replace(parse_scheme("W4A8"), quantize_lm_head=True)
    q = lowbit.quantize(tiny_model("mistral"), scheme, progress=False)
    assert isinstance(q.lm_head, QuantLinear)
    _, tok = assert_round_trip(q, tmp_path / "m", word_tokenizer())
    assert tok("the quick brown fox")["input_ids"] == word_tokenizer()("the quick brown fox")["input_ids"]


@pytest.mark.parametrize("transform", ["none", "rotate"])  # fused R1 unties the embeddings
def test_tied_embeddings_stay_tied_and_are_stored_once(transform, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    q = lowbit.quantize(model, "W4A8", transform=transform, progress=False)
    loaded, _ = assert_round_trip(q, tmp_path / "m")
    tied = q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied == (transform == "none")


def test_saved_size_is_near_the_bit_width(tmp_path):
    model = tiny_model("llama")
    q = lowbit.quantize(model, "W4A16", progress=False)
    save_quantized(q, tmp_path / "m")
    linears = sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, QuantLinear))
    others = sum(p.numel() for n, p in model.named_parameters() if "layers" not in n or "norm" in n)
    stored = (tmp_path / "m" / WEIGHTS_FILE).stat().st_size
    # 4-bit codes + a float32 scale per row, other tensors fp32, plus the safetensors header
    assert stored < linears * 0.5 + others * 4 + 64 * 1024
    assert stored > linears * 0.5


def test_save_leaves_the_model_untouched_and_no_temp_files(tmp_path):
    q = lowbit.quantize(tiny_model("llama"), "W4A8KV4", transform="rotate", progress=False)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    save_quantized(q, tmp_path / "m")
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ---------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path):
    q = lowbit.quantize(tiny_model("llama"), "W4A8KV4", progress=False)
    path = tmp_path / "m"
    save_quantized(q, path, word_tokenizer())
    return path


def test_missing_file_is_a_clear_error(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="incomplete: tokenizer.json is missing"):
        load_quantized(saved)


def test_corrupted_weights_are_a_clear_error(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_quantized(saved)


def test_truncated_weights_are_a_clear_error(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupted"):
        load_quantized(saved)


def test_corrupted_config_is_a_clear_error(saved):
    (saved / CONFIG_FILE).write_text((saved / CONFIG_FILE).read_text()[:100])
    with pytest.raises(UserError, match="corrupted"):
        load_quantized(saved)


def test_newer_format_version_is_a_clear_error(saved):
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError, match="upgrade lowbit"):
        load_quantized(saved)


def test_not_a_saved_model_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="not a lowbit saved model"):
        load_quantized(tiny_model_dir)
    with pytest.raises(UserError, match="not a lowbit saved model"):
        load_quantized(tmp_path / "nowhere")


def test_existing_folder_is_refused_unless_overwrite(saved):
    q = lowbit.quantize(tiny_model("llama", seed=1), "W8A8", progress=False)
    with pytest.raises(UserError, match="exists"):
        save_quantized(q, saved)
    save_quantized(q, saved, overwrite=True)
    loaded, tok = load_quantized(saved)
    assert lowbit.quantization_state(loaded).scheme.name == lowbit.quantization_state(q).scheme.name and tok is None


def test_unquantized_or_training_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="not quantized by lowbit"):
        save_quantized(tiny_model("llama"), tmp_path / "a")
    q = lowbit.quantize(tiny_model("llama"), "W4A16", trainable=True, progress=False)  # latent weights, not codes
    with pytest.raises(UserError, match="freeze_student"):
        save_quantized(q, tmp_path / "b")
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 33, 1000])
def test_fast_packing_has_the_bit_stream_layout(bits, count):
    from lowbit.quant.packing import pack, pack_bitstream, unpack

    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack(codes, bits)
    assert torch.equal(packed, pack_bitstream(codes.to(torch.int32), bits))
    assert torch.equal(unpack(packed, bits, count), codes.to(torch.uint8))


@torch.no_grad()
def assert_stored_logits(logits: torch.Tensor, stored: torch.Tensor) -> None:
    """Codes and scales load exactly; online Hadamard rotations are recomputed in every forward, and
    the fast transform's summation order has changed since these folders were written (Kronecker
    factors instead of butterflies), so the logits agree to float32 rounding, not bit for bit."""
    torch.testing.assert_close(logits, stored, rtol=0, atol=2e-5)


def test_format_version_2_folders_still_load_with_the_same_logits():
    """A folder saved before the floating-point formats (format 2) loads unchanged."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "format_v2"
    name = "w4g16h_a8kv4b_rotate_gptq"
    expected = load_file(str(folder / f"{name}.expected.safetensors"))
    assert json.loads((folder / name / CONFIG_FILE).read_text())["format_version"] == 2
    model, _ = load_quantized(folder / name)
    assert_stored_logits(model(expected["input_ids"]).logits, expected["logits"])
    assert lowbit.quantization_state(model).scheme.name == "W4g16hA8KV4b"


@pytest.mark.parametrize("name", ["w4g16a_a8kv4", "w3_a16_rotate"])
@torch.no_grad()
def test_format_version_1_folders_still_load_with_the_same_logits(name):
    """Folders saved before the quantized weight became a value (format 1) load unchanged."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "format_v1"
    expected = load_file(str(folder / f"{name}.expected.safetensors"))
    assert json.loads((folder / name / CONFIG_FILE).read_text())["format_version"] == 1
    model, tok = load_quantized(folder / name)
    assert_stored_logits(model(expected["input_ids"]).logits, expected["logits"])
    assert (tok is not None) == name.startswith("w4")
    assert all(m.is_quantized for m in model.modules() if isinstance(m, QuantLinear))


# ---------------------------------------------------------------- Hadamard base orders (format 5)


def rotations(model) -> dict:
    """The online rotations of `model` by owner path (shared ones once)."""
    from lowbit.runtime.kv import QK_ROTATION

    found = {}
    for name, m in model.named_modules():
        r = getattr(m, "input_rotation", None) or getattr(m, QK_ROTATION, None)
        if r is not None and all(r is not seen for seen in found.values()):
            found[name] = r
    return found


def rotated_104():
    """A tiny Llama whose online rotations are at orders whose smallest Hadamard base changed when
    constructions past prime-field Paley were added: 104 (R1, was Paley I over GF(103), now 2 x 52
    over GF(25)) and 208 (R4), with R3 at 16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=104, intermediate_size=208, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16
    )
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    transform = TransformConfig(kind="rotate", fuse_r1=False, fold_norms=False, seed=3)
    return lowbit.quantize(model, "W4A8KV4", transform=transform, calibration=calibration(), progress=False)


def rewrite(path, edit) -> None:
    """Edit the description of a saved model and re-sign it, as a writer of that content would have."""
    from lowbit.io.description import CHECKSUM_KEY, description_checksum

    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    config[CHECKSUM_KEY] = description_checksum(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def entries(config) -> list[dict]:
    """Every rotation entry of a description that is not a reference to another."""
    modules = config["modules"]
    found = [e["input_rotation"] for e in modules["linears"].values()] + [e["qk_rotation"] for e in modules["attention"].values()]
    return [e for e in found if e is not None and "same_as" not in e]


def test_online_rotations_record_their_base_order(tmp_path):
    from lowbit.hadamard import factor_order

    q = rotated_104()
    assert {r.size: r.base for r in rotations(q).values()} == {104: 52, 208: 52, 64: 1, 16: 1}
    loaded, _ = assert_round_trip(q, tmp_path / "m")  # bit-identical logits
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["format_version"] == 5
    assert all(e["base"] == factor_order(e["size"])[0] for e in entries(config)) and {e["base"] for e in entries(config)} == {52, 1}
    assert {n: (r.size, r.base) for n, r in rotations(loaded).items()} == {n: (r.size, r.base) for n, r in rotations(q).items()}


@torch.no_grad()
def test_a_rotation_saved_without_its_base_order_uses_the_old_matrix(tmp_path):
    """A version 3/4 entry (no `base`) rotates with the matrix the lowbit that wrote it built: the
    smallest prime-field Paley base, Paley I over GF(103) for 104."""
    from lowbit.hadamard import hadamard_matrix, sylvester

    save_quantized(rotated_104(), tmp_path / "m")

    def as_version_3(config):
        config["format_version"] = 3
        for e in entries(config):
            del e["base"]

    rewrite(tmp_path / "m", as_version_3)
    loaded, _ = load_quantized(tmp_path / "m")
    found = {r.size: r for r in rotations(loaded).values()}
    assert {size: r.base for size, r in found.items()} == {104: 104, 208: 104, 64: 1, 16: 1}
    for size in (104, 208):
        old = torch.kron(sylvester(size // 104), old_paley(104)).double()
        assert torch.equal(hadamard_matrix(size, torch.float64, base=found[size].base), old)
        R = found[size].signs.double()[:, None] * old / math.sqrt(size)  # what the rotation applies
        assert torch.allclose(found[size](torch.eye(size, dtype=torch.float64)), R, atol=1e-12)


@torch.no_grad()
def test_a_format_3_folder_with_online_rotations_loads_with_its_matrices():
    """Saved by lowbit before base orders were recorded, with rotations at 104 and 208, whose
    smallest base has changed since: the logits are those that lowbit computed."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "format_v3_hadamard"
    name = "w4a8kv4_online_r1_104_r4_208"
    expected = load_file(str(folder / f"{name}.expected.safetensors"))
    assert json.loads((folder / name / CONFIG_FILE).read_text())["format_version"] == 3
    model, _ = load_quantized(folder / name)
    assert {r.size: r.base for r in rotations(model).values()} == {104: 104, 208: 104, 64: 1, 16: 1}
    assert_stored_logits(model(expected["input_ids"]).logits, expected["logits"])


def test_block_rotation_without_its_base_order_uses_the_old_base_of_the_block():
    from lowbit.io.native import _rotation

    rotation = _rotation({"size": 416, "block": 208, "random_signs": False}, {}, "x")
    assert (rotation.block, rotation.base) == (208, 104)
    assert _rotation({"size": 416, "block": 208, "base": 52, "random_signs": False}, {}, "x").base == 52


@pytest.mark.parametrize(
    "version, edit, match",
    [
        (3, lambda e: None, "damaged or was edited: the rotation of"),  # format 3 knew no base
        (5, lambda e: e.pop("base"), "damaged or was edited: the rotation of"),  # format 5 always records it
        (5, lambda e: e.update(base="52"), "the rotation base of"),
        (5, lambda e: e.update(base=208), "damaged: the rotation of .*cannot have base order 208"),
        (5, lambda e: e.update(base=26), "damaged: the rotation of .*base order 26"),
    ],
    ids=["base-in-v3", "no-base-in-v5", "not-a-number", "larger-than-the-order", "no-construction"],
)
def test_a_bad_base_order_is_refused(tmp_path, version, edit, match):
    save_quantized(rotated_104(), tmp_path / "m")

    def change(config):
        config["format_version"] = version
        edit(next(e for e in entries(config) if e["size"] == 104))

    rewrite(tmp_path / "m", change)
    with pytest.raises(UserError, match=match):
        load_quantized(tmp_path / "m")
