"""Export to compressed-tensors: transformers' own loader reproduces lowbit's logits; recipes the
format cannot express are refused with the reason."""

import json

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import lowbit
from lowbit import UserError
from lowbit.io import export_compressed_tensors, save_quantized
from lowbit.transforms.apply import TransformConfig

pytest.importorskip("compressed_tensors")


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibration(n=4, length=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


FUSED_ROTATION = TransformConfig(kind="rotate", r2=False, r3=False, r4=False)  # only R1, fused into the weights


@torch.no_grad()
@pytest.mark.parametrize(
    "family,scheme,transform,algorithm,fmt",
    [
        ("llama", "W4A16", "none", "rtn", "pack-quantized"),
        ("qwen2", "W4g16A16", "none", "gptq", "pack-quantized"),  # biases, groups, GPTQ codes
        ("gemma3", "W4fA16", "none", "rtn", "pack-quantized"),
        ("mistral", "W8A16", "none", "awq", "pack-quantized"),
        ("llama", "W8A8f", "smooth", "rtn", "int-quantized"),  # SmoothQuant W8A8
        ("qwen3", "W8fA8f", FUSED_ROTATION, "gptq", "int-quantized"),
    ],
)
def test_transformers_reloads_the_export_with_identical_logits(family, scheme, transform, algorithm, fmt, tmp_path):
    """Tolerance: none. The exported codes and scales are lowbit's own (recovered exactly) and
    compressed-tensors' dynamic per-token int8 activation grid is lowbit's A8f grid, so the
    reloaded model computes the same float32 numbers."""
    from transformers import AutoModelForCausalLM

    q = lowbit.quantize(tiny_model(family), scheme, transform=transform, algorithm=algorithm, calibration=calibration(), progress=False)
    x = tokens()
    ref = q(x).logits
    export_compressed_tensors(q, tmp_path / "ct", word_tokenizer())
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.equal(reloaded(x).logits, ref)
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]


def test_export_packs_4_bit_weights(tmp_path):
    from safetensors import safe_open

    q = lowbit.quantize(tiny_model("llama"), "W4g32A16", progress=False)
    export_compressed_tensors(q, tmp_path / "ct")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert packed.dtype == torch.int32 and packed.numel() * 8 == 64 * 128  # 8 codes per int32
    assert scale.shape == (64, 128 // 32)


@pytest.mark.parametrize(
    "scheme,transform,message",
    [
        ("W4g16aA16", "none", "asymmetric weights"),
        ("W3A16", "none", "3-bit weights"),
        ("W4A4", "none", "activations must be 16 bit"),
        ("W8A8", "none", "full signed range"),
        ("W8A8sf", "none", "dynamic per token"),
        ("W8fA8fKV8", "none", "KV cache"),
        ("W4A16", "rotate", "rotate their input online"),
        ("W16A8f", "none", "needs quantized weights"),
        ("W8g32A8f", "none", "per-channel weights"),
        ("Wnvfp4A16", "none", "integer formats so far"),
        ("W8fAfp8", "none", "integer formats so far"),
    ],
)
def test_recipes_the_format_cannot_express_are_refused(scheme, transform, message, tmp_path):
    q = lowbit.quantize(tiny_model("llama"), scheme, transform=transform, calibration=calibration(), progress=False)
    with pytest.raises(UserError, match=message):
        export_compressed_tensors(q, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_export_of_a_saved_model(tmp_path, capsys):
    from lowbit.cli import main

    q = lowbit.quantize(tiny_model("llama"), "W4g32A16", progress=False)
    save_quantized(q, tmp_path / "saved", word_tokenizer())
    with pytest.raises(SystemExit) as exc:
        main(["-q", "export", str(tmp_path / "saved"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")])
    assert exc.value.code == 0 and (tmp_path / "ct" / "config.json").is_file() and (tmp_path / "ct" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit) as exc:  # exists
        main(["-q", "export", str(tmp_path / "saved"), "--out", str(tmp_path / "ct")])
    assert exc.value.code == 2
    q = lowbit.quantize(tiny_model("llama"), "W8fA8fKV8", progress=False)
    save_quantized(q, tmp_path / "kv")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["-q", "export", str(tmp_path / "kv"), "--out", str(tmp_path / "ct2")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "KV cache" in err and len(err.strip().splitlines()) == 1
