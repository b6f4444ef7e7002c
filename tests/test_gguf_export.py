"""Export to GGUF: the blocks llama.cpp dequantizes are lowbit's dequantized weights bit for bit,
transformers' own GGUF loader (in a process without lowbit) reproduces lowbit's logits, and what
llama.cpp cannot run is refused with what to change."""

import functools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model, word_tokenizer

import lowbit
from lowbit import UserError
from lowbit.io import check_gguf_exportable, export_gguf
from lowbit.io.gguf_export import GGUF_TYPES, _pre_tokenizer_name
from lowbit.runtime.linear import QuantLinear

gguf = pytest.importorskip("gguf")

GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
SCHEMES = {"W8g32h": "Q8_0", "W4g32fh": "Q4_0", "W4g32h": "Q4_0", "W4g32ah": "Q4_1"}


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (GPT-2 style, as SmolLM2 and Qwen use), trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def calibration(n=4, length=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def quantized(family, scheme, algorithm="rtn", attn=None, **overrides):
    model = tiny_model(family, attn=attn or ("eager" if overrides else None), **overrides)
    return lowbit.quantize(model, scheme, algorithm=algorithm, calibration=calibration(), progress=False)


def read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def gguf_name(arch, module_name, n_layers=2):
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    return names.get_name(module_name)


def unpermute(w, heads):
    """transformers' inverse of llama.cpp's q/k row permutation (llama architecture)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def test_layouts_table_and_activation_scheme_parse():
    for name, qtype in GGUF_TYPES.items():
        assert lowbit.scheme.parse_scheme(name).weights is not None and qtype in ("Q4_0", "Q4_1", "Q8_0")
    s = lowbit.scheme.parse_scheme("W4g32fhA8g32h")
    assert s.inputs.group_size == 32 and s.inputs.scale_format == "float16" and s.inputs.dynamic


# --------------------------------------------------------------------------- 1. exact blocks


@torch.no_grad()
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_blocks_dequantize_to_lowbits_weights_exactly(family, scheme, algorithm, tmp_path):
    """Tolerance: none. gguf.quants.dequantize (llama.cpp's reference dequantization: d * (q - 8),
    d * q + m, d * q in float32 from the float16 d, m) of every quantized tensor equals the
    model's dequantized weight bit for bit, after undoing the llama q/k row permutation."""
    q = quantized(family, scheme, algorithm)
    types = check_gguf_exportable(q)
    assert set(types.values()) == {SCHEMES[scheme]}
    path = export_gguf(q, tmp_path / "m.gguf", bpe_tokenizer())
    reader, tensors = read(path)
    arch = field(reader, "general.architecture")
    assert arch == {"llama": "llama", "mistral": "llama", "gemma3": "gemma3"}.get(family, family)
    cfg = q.config
    for name, module in q.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        t = tensors[gguf_name(arch, name) + ".weight"]
        assert t.tensor_type.name == SCHEMES[scheme]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if arch == "llama" and name.endswith("q_proj"):
            w = unpermute(w, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj"):
            w = unpermute(w, cfg.num_key_value_heads)
        assert w.dtype == np.float32 and np.array_equal(w, module.dense_weight().numpy()), name


def test_nibble_packing_matches_ggml(tmp_path):
    """Q4_0 blocks built from lowbit's codes decode with gguf.quants to the same codes: value j of
    a block in the low nibble of byte j, value j + 16 in its high nibble."""
    from lowbit.io.gguf_export import _blocks
    from lowbit.quant.qweight import QuantizedWeight
    from lowbit.scheme import parse_scheme

    args = parse_scheme("W4g32fh").weights
    codes = (torch.arange(64, dtype=torch.int16) % 16 - 8).reshape(2, 32)  # two blocks, every code
    qw = QuantizedWeight(codes, torch.ones(2, 1, dtype=torch.float16), None, (1, 64), args)
    raw = _blocks(qw, "Q4_0")
    assert raw.shape == (1, 36) and raw[0, 2] == (0 | (0 << 4)) and raw[0, 3] == (1 | (1 << 4))  # codes -8, -7 -> q 0, 1
    assert np.array_equal(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0), codes.reshape(1, 64).float().numpy())


# --------------------------------------------------------------------------- 2. transformers reloads

# transformers' GGUF loader (unlike llama.cpp) reads no head_dim for qwen3 and no
# query_pre_attn_scalar for Gemma: those cases use its config defaults (head_dim 128; 256 and 256)
QWEN3 = dict(head_dim=128)
GEMMA = dict(head_dim=256, query_pre_attn_scalar=256)
RELOAD_CASES = {
    "llama-W4g32fh-gptq": ("llama", "W4g32fh", "gptq", {}),
    "mistral-W8g32h-rtn": ("mistral", "W8g32h", "rtn", {}),
    "qwen2-W4g32ah-gptq": ("qwen2", "W4g32ah", "gptq", {}),
    "qwen3-W4g32h-rtn": ("qwen3", "W4g32h", "rtn", QWEN3),
    "gemma2-W4g32fh-rtn": ("gemma2", "W4g32fh", "rtn", GEMMA),
    "gemma3-W4g32ahA8g32h-gptq": ("gemma3", "W4g32ahA8g32h", "gptq", GEMMA),  # engine-style activations: compared weight-only
    "qwen2-W8g32hA8g32h-rtn": ("qwen2", "W8g32hA8g32h", "rtn", {}),
}
TOKENS = [[5, 17, 300, 42, 7, 99, 256, 3, 511, 64, 1, 2, 128, 77, 400, 31, 8, 250, 19, 480]]
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, cases, tokens, text = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    for name in cases:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name + ".gguf", dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            np.save(f"{folder}/{name}.logits.npy", model(torch.tensor(tokens)).logits.numpy())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=cases[0] + ".gguf")
    np.save(f"{folder}/tokens.npy", np.array(tok(text)["input_ids"], dtype=np.int64))
    assert "lowbit" not in sys.modules
    """
)
TEXT = "The quick brown fox jumps over the lazy dog. Quantization 123 maps real numbers!"


def weight_only(model):
    """lowbit's model without its input quantization: the same weights, float activations."""
    import copy

    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, QuantLinear):
            m.input_quant = None
    return plain


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every case exported with float32 dense tensors, reloaded by transformers in one child process."""
    folder = tmp_path_factory.mktemp("gguf-reload")
    expected = {}
    for name, (family, scheme, algorithm, overrides) in RELOAD_CASES.items():
        q = quantized(family, scheme, algorithm, attn="eager", **overrides)
        export_gguf(q, folder / f"{name}.gguf", bpe_tokenizer(), dtype="float32")
        with torch.no_grad():
            expected[name] = weight_only(q)(torch.tensor(TOKENS)).logits.numpy()
    args = [str(folder), json.dumps(list(RELOAD_CASES)), json.dumps(TOKENS), TEXT]
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, expected


@pytest.mark.parametrize("case", list(RELOAD_CASES))
def test_transformers_gguf_loader_reproduces_the_logits(case, reloaded):
    """Tolerance: 1e-5 relative to the largest logit. The weights llama.cpp's dequantization gives
    are lowbit's exactly (test above) and the dense tensors are float32; what is left is the float
    arithmetic of two runs of the same eager model code (Gemma's norms travel as 1 + w and back).
    Observed: bit-identical logits for every case."""
    folder, expected = reloaded
    got = np.load(folder / f"{case}.logits.npy", allow_pickle=False)
    ref = expected[case]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_transformers_rebuilds_the_tokenizer_from_the_file(reloaded):
    folder, _ = reloaded
    ids = np.load(folder / "tokens.npy", allow_pickle=False)
    assert ids.tolist() == bpe_tokenizer()(TEXT)["input_ids"]


# --------------------------------------------------------------------------- metadata


def test_vocabulary_and_config_metadata(tmp_path):
    tok = bpe_tokenizer()
    q = quantized("qwen2", "W4g32fh")
    reader, tensors = read(export_gguf(q, tmp_path / "m.gguf", tok))
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == q.config.vocab_size == 512  # the embedding's rows; unused ones are [PAD<i>]
    for i in range(len(tok)):
        assert tokens[i] == tok.convert_ids_to_tokens(i)
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert tokens[400] == "[PAD400]" and types[400] == gguf.TokenType.UNUSED
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id and field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field(reader, "qwen2.block_count") == 2 and field(reader, "qwen2.attention.head_count_kv") == 2
    assert field(reader, "qwen2.rope.freq_base") == q.config.rope_parameters["rope_theta"]
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["token_embd.weight"].tensor_type.name == "F16"  # the default dtype
    assert tensors["output.weight"].tensor_type.name == "F16"  # an untied lm_head, unquantized


def test_gemma_norms_are_stored_as_one_plus_weight(tmp_path):
    q = quantized("gemma3", "W4g32fh")
    _, tensors = read(export_gguf(q, tmp_path / "m.gguf", bpe_tokenizer(), dtype="bfloat16"))
    norm = q.model.layers[0].self_attn.q_norm.weight.detach()
    assert np.array_equal(tensors["blk.0.attn_q_norm.weight"].data, (norm + 1).numpy())
    assert tensors["token_embd.weight"].tensor_type.name == "BF16"
    assert "output.weight" not in tensors  # tied to the embedding: llama.cpp reads token_embd


@pytest.mark.parametrize(
    "pre,source,name",
    [
        (
            {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]},
            "",
            "smollm",
        ),
        ({"type": "ByteLevel", "use_regex": True}, "/cache/models/smollm2-135m", "smollm"),  # flattened by a conversion
        ({"type": "ByteLevel", "use_regex": True}, "", "gpt-2"),
        ({"type": "Whitespace"}, "", "default"),
    ],
)
def test_pre_tokenizer_names(pre, source, name):
    assert _pre_tokenizer_name(pre, source) == name


def test_the_input_model_is_not_modified(tmp_path):
    q = quantized("llama", "W4g32ah")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    export_gguf(q, tmp_path / "m.gguf", bpe_tokenizer())
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- 3. refusals


@pytest.mark.parametrize(
    "scheme,transform,message",
    [
        ("W4g64h", "none", "blocks of 32 with float16 scales; quantize with W4g32fh (Q4_0) or W4g32ah (Q4_1)"),
        ("W4g32", "none", "blocks of 32 with float16 scales"),  # float32 scales
        ("W4g32b", "none", "blocks of 32 with float16 scales"),
        ("W4h", "none", "blocks of 32 with float16 scales"),  # per channel
        ("W8g64h", "none", "W8g32h (Q8_0)"),
        ("W8g32ah", "none", "Q8_0 is symmetric"),
        ("W3g32h", "none", "3-bit weights"),
        ("Wmxfp4", "none", "mxfp4 elements"),
        ("Wfp8", "none", "fp8 elements"),
        ("W4g32fhKV8", "none", "KV-cache"),
        ("W4g32fhA8", "none", "llama.cpp quantizes activations itself"),
        ("W4g32fhA8g32fh", "none", "llama.cpp quantizes activations itself"),
        ("A8g32h", "none", "has none"),
        ("W4g32fh", "rotate", "rotate their input online"),
    ],
)
def test_refused_with_the_reason(scheme, transform, message, tmp_path):
    q = lowbit.quantize(tiny_model("llama"), scheme, transform=transform, progress=False)
    with pytest.raises(UserError, match="GGUF") as exc:
        export_gguf(q, tmp_path / "m.gguf", bpe_tokenizer())
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_model_lowbit_did_not_quantize(tmp_path):
    with pytest.raises(UserError, match="not quantized by lowbit"):
        export_gguf(tiny_model("llama"), tmp_path / "m.gguf", bpe_tokenizer())


def test_refuses_a_tokenizer_it_cannot_write(tmp_path):
    q = quantized("llama", "W4g32fh")
    with pytest.raises(UserError, match="byte-level BPE"):
        export_gguf(q, tmp_path / "m.gguf", word_tokenizer())
    with pytest.raises(UserError, match="tokenizer"):
        export_gguf(q, tmp_path / "m.gguf", None)
    with pytest.raises(UserError, match="dtype"):
        export_gguf(q, tmp_path / "m.gguf", bpe_tokenizer(), dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_refuses_gemma_attention_scales_llama_cpp_does_not_compute(tmp_path):
    q = quantized("gemma3", "W4g32fh")
    q.config.query_pre_attn_scalar = 32
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        export_gguf(q, tmp_path / "m.gguf", bpe_tokenizer())


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    q = quantized("llama", "W8g32h")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists"):
        export_gguf(q, out, bpe_tokenizer())
    assert out.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    export_gguf(q, out, bpe_tokenizer(), overwrite=True)
    assert read(out)[0].fields["general.architecture"].contents() == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left beside it


# --------------------------------------------------------------------------- 4. size


def test_q4_0_file_size(tmp_path):
    """Quantized linears take 4.5 / 32 of their float32 bytes (18-byte blocks of 32 values);
    everything else is the dense tensors plus the metadata (vocabulary, tensor infos, alignment)."""
    q = quantized("llama", "W4g32fh")
    tok = bpe_tokenizer()
    path = export_gguf(q, tmp_path / "m.gguf", tok, dtype="float32")
    reader, tensors = read(path)
    linear_numel = sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, QuantLinear))
    quant_bytes = sum(int(t.n_bytes) for t in tensors.values() if t.tensor_type.name == "Q4_0")
    assert quant_bytes == linear_numel * 4 * 4.5 / 32  # float32 bytes of the linears x 4.5 / 32
    dense_bytes = sum(int(t.n_bytes) for t in tensors.values() if t.tensor_type.name == "F32")
    assert dense_bytes == sum(p.numel() for p in q.parameters()) * 4  # embeddings, norms, lm_head (a tied one once)
    strings = sum(len(s.encode()) + 8 for s in field(reader, "tokenizer.ggml.tokens") + field(reader, "tokenizer.ggml.merges"))
    overhead = strings + 4 * len(field(reader, "tokenizer.ggml.token_type")) + len(tensors) * (96 + 32) + 4096
    size = path.stat().st_size
    assert quant_bytes + dense_bytes < size <= quant_bytes + dense_bytes + overhead


# --------------------------------------------------------------------------- the bundled model


@pytest.mark.slow
def test_default_model_exports_with_its_tokenizer(default_model, tmp_path):
    from lowbit.models import DEFAULT_MODEL, packaged_gguf

    model, tok = default_model
    q = lowbit.quantize(model, "W4g32fh", progress=False)
    reader, tensors = read(export_gguf(q, tmp_path / "smollm2.gguf", tok))
    assert field(reader, "tokenizer.ggml.pre") == "smollm" and len(field(reader, "tokenizer.ggml.tokens")) == 49152
    t = tensors["blk.3.ffn_down.weight"]
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(w, q.model.layers[3].mlp.down_proj.dense_weight().numpy())
    # what llama.cpp's own converter wrote for this model (the packaged GGUF lowbit loaded it from)
    original, original_tensors = read(packaged_gguf(DEFAULT_MODEL))
    assert set(tensors) == set(original_tensors)
    for t in original_tensors.values():
        assert tensors[t.name].shape.tolist() == t.shape.tolist(), t.name
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token"):
        assert field(reader, f"tokenizer.ggml.{key}") == field(original, f"tokenizer.ggml.{key}"), key
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):  # rows in llama.cpp's RoPE order, as its converter wrote them
        ours, theirs = (gguf.quants.dequantize(x[name].data, x[name].tensor_type) for x in (tensors, original_tensors))
        assert np.linalg.norm(ours - theirs) < 0.25 * np.linalg.norm(theirs)  # 4-bit noise; a wrong row order gives ~1.4
    shape_keys = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv")
    for key in (*shape_keys, "rope.freq_base"):
        assert field(reader, f"llama.{key}") == field(original, f"llama.{key}"), key
