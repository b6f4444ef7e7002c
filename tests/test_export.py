"""Export to compressed-tensors: transformers, in a process that never imports lowbit, reloads every
exportable recipe and computes lowbit's logits; recipes the format (as vLLM runs it) cannot express
are refused with the reason, and nothing is written."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import lowbit
from lowbit import UserError
from lowbit.io import export_compressed_tensors, export_model, save_quantized
from lowbit.models import cast_model
from lowbit.runtime.kv import set_attention_implementation
from lowbit.runtime.linear import QuantLinear
from lowbit.runtime.quantizer import TensorQuantizer
from lowbit.transforms.apply import TransformConfig

pytest.importorskip("compressed_tensors")


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibration(n=4, length=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


FUSED_ROTATION = TransformConfig(kind="rotate", r2=False, r3=False, r4=False)  # only R1, fused into the weights

# (name, family, scheme, transform, algorithm, compressed-tensors format)
EXPORTS = [
    ("w4", "llama", "W4A16", "none", "rtn", "pack-quantized"),
    ("w4g16-gptq", "qwen2", "W4g16A16", "none", "gptq", "pack-quantized"),  # biases, groups, GPTQ codes
    ("w4f", "gemma3", "W4fA16", "none", "rtn", "pack-quantized"),
    ("w8-awq", "mistral", "W8A16", "none", "awq", "pack-quantized"),
    ("w8a8-smooth", "llama", "W8A8", "smooth", "rtn", "int-quantized"),  # SmoothQuant W8A8
    ("w8a8-rot-gptq", "qwen3", "W8A8", FUSED_ROTATION, "gptq", "int-quantized"),
    ("w8a8-static", "mistral", "W8A8s", "none", "rtn", "int-quantized"),  # calibrated per-tensor input scales
    ("fp8", "llama", "Wfp8Afp8", "none", "rtn", "float-quantized"),
    ("fp8-static", "qwen2", "Wfp8tAfp8s", "none", "rtn", "float-quantized"),
    ("fp8-kv", "llama", "Wfp8Afp8KVfp8s", "none", "rtn", "float-quantized"),
    ("nvfp4a16-gptq", "llama", "Wnvfp4A16", "none", "gptq", "nvfp4-pack-quantized"),
    ("nvfp4", "qwen3", "Wnvfp4Anvfp4s", "none", "rtn", "nvfp4-pack-quantized"),
    ("mxfp4a16", "llama", "Wmxfp4A16", "none", "rtn", "mxfp4-pack-quantized"),
    ("mxfp8a16", "qwen2", "Wmxfp8A16", "none", "rtn", "mxfp8-quantized"),
]

# compressed-tensors 0.20 unpacks FP4 and MX codes to bfloat16 whatever the model's dtype, and its
# run-compressed forward dequantizes them there (scale and value rounded to bfloat16 separately): these
# are exported in bfloat16 and reloaded dequantized (`dequantize=True`), which drops the activation
# quantization
BFLOAT16_ONLY = ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized")

# KV_NOT_APPLIED: compressed-tensors 0.20 attaches its KV-cache quantization only to attention modules
# whose forward takes `past_key_values`, which transformers 5 renamed: transformers reloads the FP8 KV
# cache export without quantizing the cache (vLLM does quantize it: benchmarks/engine_agreement.py), so
# that case is compared with lowbit's model without its KV quantizers

RELOAD = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
assert "lowbit" not in sys.modules
root = Path(sys.argv[1])
x = load_file(str(root / "tokens.safetensors"))["x"]
out = {}
for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    fmt = json.loads((folder / "config.json").read_text())["quantization_config"]["format"]
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fmt in sys.argv[2:] else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", **options)
    with torch.no_grad():
        out[folder.name] = model(x).logits.float().contiguous()
    out[folder.name + ".down_proj"] = model.model.layers[0].mlp.down_proj.weight.float().contiguous()
assert "lowbit" not in sys.modules
save_file(out, str(root / "logits.safetensors"))
"""


def with_full_range_inputs(model):
    """transformers' reference path for compressed-tensors' dynamic int8 activations uses scale
    max/127.5 (lowbit's A8f) where vLLM's kernels use max/127 (A8): the model it computes. Static
    scales are the stored ones in both."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.input_quant is not None and m.input_quant.args.element == "int" and m.input_quant.args.dynamic:
            m.input_quant = TensorQuantizer(replace(m.input_quant.args, full_range=True))
    return model


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Export every recipe (float32 dense tensors), reload all in one transformers process without
    lowbit, and return ({name: lowbit's logits}, {name: transformers' logits}, root)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("exports")
    x = tokens()
    save_file({"x": x}, str(root / "tokens.safetensors"))
    ours = {}
    for name, family, scheme, transform, algorithm, fmt in EXPORTS:
        q = lowbit.quantize(tiny_model(family), scheme, transform=transform, algorithm=algorithm, calibration=calibration(), progress=False)
        with torch.no_grad():
            before = q(x).logits
        dtype = "bfloat16" if fmt in BFLOAT16_ONLY else "float32"
        export_compressed_tensors(q, root / name, word_tokenizer(), dtype=dtype)
        with torch.no_grad():
            assert torch.equal(q(x).logits, before), f"{name}: the export changed the model it exported"
        q = cast_model(q, getattr(torch, dtype))
        if fmt in BFLOAT16_ONLY:  # transformers dequantizes these weights and runs them unquantized (see BFLOAT16_ONLY)
            for m in q.modules():
                if isinstance(m, QuantLinear):
                    m.input_quant = None
        if q.config._attn_implementation.startswith("lowbit_"):  # see KV_NOT_APPLIED
            set_attention_implementation(q, "sdpa")
        with torch.no_grad():
            ours[name] = with_full_range_inputs(q)(x).logits.float()
            ours[name + ".down_proj"] = q.model.layers[0].mlp.down_proj.dense_weight(torch.float32).to(q.dtype).float()
    subprocess.run([sys.executable, "-c", RELOAD, str(root), *BFLOAT16_ONLY], check=True, timeout=600)
    return ours, load_file(str(root / "logits.safetensors")), root


@pytest.mark.parametrize("name,family,scheme,transform,algorithm,fmt", EXPORTS, ids=[e[0] for e in EXPORTS])
def test_transformers_reloads_the_export_with_identical_logits(reloaded, name, family, scheme, transform, algorithm, fmt):
    """Tolerance: none. The exported codes and scales are lowbit's own, the calibrated static scales
    (activations, KV cache) are lowbit's, and compressed-tensors' float grids round as lowbit's do,
    so the reloaded model computes the same float32 numbers (with A8f grids for int8 activations:
    transformers' arithmetic, not vLLM's, see `with_full_range_inputs`)."""
    ours, theirs, root = reloaded
    config = json.loads((root / name / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert torch.equal(theirs[name + ".down_proj"], ours[name + ".down_proj"])
    assert torch.equal(theirs[name], ours[name])


def test_kv_cache_scheme_and_scales_are_written(reloaded):
    from safetensors import safe_open

    _, _, root = reloaded
    config = json.loads((root / "fp8-kv" / "config.json").read_text())["quantization_config"]
    kv = config["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"]) == (8, "float", "tensor", False)
    with safe_open(str(root / "fp8-kv" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.k_scale", "model.layers.0.self_attn.v_scale"} <= names


@torch.no_grad()
def test_bfloat16_export_is_what_lowbit_evaluates_in_bfloat16(tmp_path):
    """The default dtype: dense tensors in bfloat16 (the embedding is most of a small model), and
    a model with bfloat16 scales reloads to the logits lowbit computes at --dtype bfloat16."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    q = lowbit.quantize(tiny_model("llama"), "W4g32bA16", progress=False)
    export_model(q, tmp_path / "ct")  # compressed-tensors, bfloat16 by default
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
    x = tokens()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(reloaded(x).logits, cast_model(q, torch.bfloat16)(x).logits)


def test_export_packs_4_bit_weights(tmp_path):
    from safetensors import safe_open

    q = lowbit.quantize(tiny_model("llama"), "W4g32A16", progress=False)
    export_compressed_tensors(q, tmp_path / "ct", dtype="float32")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert packed.dtype == torch.int32 and packed.numel() * 8 == 64 * 128  # 8 codes per int32
    assert scale.shape == (64, 128 // 32)


@pytest.mark.parametrize(
    "scheme,transform,message",
    [
        ("W4g16abA16", "none", "asymmetric weights"),
        ("W3A16", "none", "3-bit weights"),
        ("W4A4", "none", "W8A8: 8-bit per-channel weights"),
        ("W8A8f", "none", "max/127"),
        ("W8A8c90", "none", "without clipping"),
        ("W8KV8", "none", "not servable in vLLM"),
        ("Wfp8Afp8KVfp8", "none", "one static scale per tensor"),
        ("W4bA16", "rotate", "rotate their input online"),
        ("W16A8", "none", "quantized weights"),
        ("W8g32A8", "none", "8-bit per-channel weights"),
        ("W4g32A16", "none", "served dtype bfloat16"),
        ("Wnvfp4Anvfp4", "none", "Anvfp4s"),
        ("Wfp8e5m2A16", "none", "E5M2"),
        ("Wfp8g32A16", "none", "per channel or per tensor"),
        ("W8Afp8", "none", "FP8 weights"),
        ("Wmxfp4Amxfp4", "none", "OCP MX floor"),
        ("Wmxfp8Amxfp8", "none", "OCP MX floor"),
    ],
)
def test_recipes_the_format_cannot_express_are_refused(scheme, transform, message, tmp_path):
    q = lowbit.quantize(tiny_model("llama"), scheme, transform=transform, calibration=calibration(), progress=False)
    with pytest.raises(UserError, match=message):
        export_compressed_tensors(q, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_export_of_a_saved_model(tmp_path, capsys):
    from conftest import run_cli

    q = lowbit.quantize(tiny_model("llama"), "W4g32bA16", progress=False)
    save_quantized(q, tmp_path / "saved", word_tokenizer())
    code, _, _ = run_cli(["-q", "export", str(tmp_path / "saved"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")], capsys)
    assert code == 0 and (tmp_path / "ct" / "config.json").is_file() and (tmp_path / "ct" / "tokenizer.json").is_file()
    code, _, err = run_cli(["-q", "export", str(tmp_path / "saved"), "--out", str(tmp_path / "ct")], capsys)  # exists
    assert code == 2 and "exists" in err
    code, _, err = run_cli(["-q", "export", str(tmp_path / "saved"), "--dtype", "float64", "--out", str(tmp_path / "ct3")], capsys)
    assert code == 2 and "unknown --dtype 'float64'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["-q", "export", str(tmp_path / "saved"), "--format", "onnx", "--out", str(tmp_path / "ct3")], capsys)
    assert code == 2 and "unknown export format" in err
    code, _, err = run_cli(["-q", "export", str(tmp_path / "nothing"), "--out", str(tmp_path / "ct3")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    run = tmp_path / "run"  # a run folder quantized with --no-save-model: a report, no model
    run.mkdir()
    (run / "report.json").write_text("{}")
    code, _, err = run_cli(["-q", "export", str(run), "--out", str(tmp_path / "ct3")], capsys)
    assert code == 2 and "without a saved model" in err and len(err.strip().splitlines()) == 1
    q = lowbit.quantize(tiny_model("llama"), "W8A8KV8", progress=False)
    save_quantized(q, tmp_path / "kv")
    code, _, err = run_cli(["-q", "export", str(tmp_path / "kv"), "--out", str(tmp_path / "ct2")], capsys)
    assert code == 2 and "not servable in vLLM" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ct2").exists() and not (tmp_path / "ct3").exists()


def test_cli_exports_gguf_and_evaluates_in_the_served_dtype(tmp_path, capsys):
    """`lowbit export --format gguf` writes the file (and refuses an existing one); `lowbit evaluate
    --dtype bfloat16` computes the model as an engine serving it in bfloat16 (cast_model)."""
    from conftest import SAMPLE_TEXT, run_cli
    from test_gguf_export import bpe_tokenizer

    q = lowbit.quantize(tiny_model("llama"), "W4g32fhA8g32h", progress=False)
    save_quantized(q, tmp_path / "saved", bpe_tokenizer())
    gguf = tmp_path / "model.gguf"
    code, _, err = run_cli(["-q", "export", str(tmp_path / "saved"), "--format", "gguf", "--out", str(gguf)], capsys)
    assert code == 0 and gguf.stat().st_size > 0, err
    before = gguf.read_bytes()
    code, _, err = run_cli(["-q", "export", str(tmp_path / "saved"), "--format", "gguf", "--out", str(gguf)], capsys)
    assert code == 2 and "exists" in err and gguf.read_bytes() == before
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    args = ["-q", "evaluate", str(tmp_path / "saved"), "--data", str(text), "--windows", "1", "--seq-len", "32", "--json", "--cost-schemes", "none"]
    code, out, err = run_cli([*args, "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["dtype"] == "bfloat16"
    ids = bpe_tokenizer()(SAMPLE_TEXT * 4, return_tensors="pt").input_ids[0]
    expected = lowbit.perplexity(cast_model(lowbit.load_quantized(tmp_path / "saved")[0], torch.bfloat16), ids, 32, 1, progress=False)
    assert report["quantized"]["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    code, _, err = run_cli([*args, "--dtype", "half"], capsys)
    assert code == 2 and "unknown --dtype 'half'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("recipe,fmt", [("gguf-q4_0", "gguf"), ("gguf-q8_0", "gguf"), ("vllm-w4a16-gptq", "compressed-tensors")])
def test_export_ready_recipes_export(recipe, fmt, tmp_path):
    from test_gguf_export import bpe_tokenizer

    from lowbit.recipes import load_recipe

    chosen = load_recipe(recipe)
    model = tiny_model("qwen2")
    q = lowbit.quantize(model, chosen.scheme, transform=chosen.transform, algorithm=chosen.algorithm, calibration=calibration(), progress=False)
    out = export_model(q, tmp_path / ("m.gguf" if fmt == "gguf" else "m"), bpe_tokenizer(), fmt=fmt)
    assert out.exists()


@pytest.mark.slow
def test_default_model_w4a16_g32_export_is_a_quarter_of_fp32(default_model, tmp_path):
    """The default model's W4A16 group-32 export (bfloat16 dense tensors and scales) takes at most
    0.25x of its float32 folder."""
    from lowbit.models import resolve_model

    model, tokenizer = default_model
    fp32_bytes = sum(p.stat().st_size for p in Path(resolve_model("smollm2-135m")).glob("*.safetensors"))
    q = lowbit.quantize(model, "W4g32bA16", progress=False)
    out = export_model(q, tmp_path / "w4", tokenizer)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size <= 0.25 * fp32_bytes, (size, fp32_bytes)
