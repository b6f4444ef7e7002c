"""Full-precision prefix tokens (P<N>, IntactKV / PrefixQuant): the scheme grammar, the function
(position 0 exact, the rest quantized), incremental decoding, static ranges without the prefix,
save and load, refusals and costs."""

import json

import pytest
import torch
from conftest import quantize_args, run_cli, tiny_model, word_tokenizer
from test_moe import tiny_moe
from transformers import DynamicCache

import lowbit
from lowbit import UserError
from lowbit.api import check_scheme_for_config
from lowbit.evaluation import kv_cache_bytes, model_ops, scheme_cost
from lowbit.io import export_model, load_quantized, save_quantized
from lowbit.io.description import description_checksum
from lowbit.io.native import CONFIG_FILE
from lowbit.runtime import QuantLinear, TensorQuantizer, convert_to_int_kernels
from lowbit.runtime.kv import KEY_QUANT, VALUE_QUANT
from lowbit.scheme import Scheme, parse_scheme


def tokens(batch=2, length=20, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibration(n=3, length=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def quantizers(model):
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


@torch.no_grad()
def incremental(model, ids, prefill):
    """Logits of `ids` fed as a prefill of `prefill` tokens and then one token at a time, with a cache."""
    cache = DynamicCache(config=model.config)
    out = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    "name, prefix, canonical",
    [
        ("W4A4KV4P1", 1, "W4A4KV4P1"),
        ("W4fA4fKV4fP1", 1, "W4fA4fKV4fP1"),
        ("W4-A4-KV4-P2", 2, "W4A4KV4P2"),
        ("W8A8sKV8sP16", 16, "W8A8sKV8sP16"),
        ("W4A16KV4P1", 1, "W4A16KV4P1"),  # KV only
        ("W16A8P1", 1, "W16A8KV16P1"),  # activations only
        ("W4A4KV4", 0, "W4A4KV4"),
    ],
)
def test_parse_name_and_dict_round_trip(name, prefix, canonical):
    scheme = parse_scheme(name)
    assert scheme.fp_prefix == prefix and scheme.name == canonical
    assert parse_scheme(scheme.name) == scheme
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    assert scheme.to_dict()["fp_prefix"] == prefix


def test_a_dict_without_the_key_has_no_prefix():
    data = parse_scheme("W4A4KV4").to_dict()
    del data["fp_prefix"]  # a description written before prefix tokens existed
    assert Scheme.from_dict(data).fp_prefix == 0


@pytest.mark.parametrize(
    "name, message",
    [
        ("W4A4KV4P0", "drop P0"),
        ("W4A16P1", "nothing to keep"),
        ("W4P1", "nothing to keep"),
        ("W4P1A4", "cannot parse"),
        ("W4A4KV4P", "cannot parse"),
        ("W4A4KV4P1P2", "cannot parse"),
        ("W4A4KV4p1", "unknown suffix"),
        ("P1", "cannot parse"),
    ],
)
def test_bad_prefixes_are_refused(name, message):
    with pytest.raises(UserError, match=message):
        parse_scheme(name)


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_bad_fp_prefix_values_are_refused(value):
    with pytest.raises(UserError, match="fp_prefix"):
        Scheme(inputs=parse_scheme("W4A4").inputs, fp_prefix=value)


# ---------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("suffix", ["4", "4g16", "8t", "4a", "nvfp4", "mxfp4"])
def test_the_prefix_passes_and_the_rest_is_quantized_alone(suffix):
    args = parse_scheme(f"W16A{suffix}").inputs
    x = torch.randn(2, 9, 64) * torch.linspace(1, 30, 9)[:, None]
    x[:, 0] *= 100  # a massive first token
    q = TensorQuantizer(args, fp_prefix=2)
    plain = TensorQuantizer(args)
    y = q(x)
    assert torch.equal(y[:, :2], x[:, :2])
    assert torch.equal(y[:, 2:], plain(x[:, 2:]))
    # offset: a step after the prefix quantizes everything; a chunk straddling it keeps what is left of it
    assert torch.equal(q(x[:, 5:], offset=5), plain(x[:, 5:]))
    assert torch.equal(q(x[:, 1:], offset=1)[:, :1], x[:, 1:2])
    assert torch.equal(q(x[:, :1]), x[:, :1])  # all prefix
    if args.granularity.value != "tensor":  # per-token: the same as quantizing all and putting the prefix back
        assert torch.equal(y[:, 2:], plain(x)[:, 2:])


def test_a_static_range_is_observed_without_the_prefix():
    args = parse_scheme("W16A8s").inputs
    q = TensorQuantizer(args, fp_prefix=1)
    x = torch.randn(1, 6, 8)
    x[0, 0, 0] = 1000.0
    q.observing = True
    q(x)
    assert q.observed_max.item() == x[:, 1:].max().item() and q.observed_min.item() == x[:, 1:].min().item()
    q(torch.full((1, 1, 8), 5000.0))  # a lone prefix token observes nothing
    assert q.observed_max.item() == x[:, 1:].max().item()


# ---------------------------------------------------------------- the function


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3"])
@torch.no_grad()
def test_position_0_is_exactly_the_weight_only_model(family):
    model = tiny_model(family)
    x = tokens()
    prefix = lowbit.quantize(model, "W4A4KV4P1", progress=False)(x).logits
    weight_only = lowbit.quantize(model, "W4A16", progress=False)(x).logits
    full = lowbit.quantize(model, "W4A4KV4", progress=False)(x).logits
    # token 0 attends only to itself, and its activations, key and value stay exact: the same weight codes
    assert torch.equal(prefix[:, 0], weight_only[:, 0])
    assert not torch.equal(prefix[:, 0], full[:, 0])
    # every later token reads quantized activations of its own
    assert (prefix[:, 1:] - weight_only[:, 1:]).abs().amax(-1).min() > 0
    assert not torch.equal(prefix[:, 1:], full[:, 1:])


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 8}), ("gemma2", {})])
def test_incremental_decoding_equals_one_forward(family, overrides, prefix):
    # Mistral and Gemma 2 with a window shorter than the sequence: the sliding cache drops its
    # first entries, so the keys it returns no longer start at position 0
    model = lowbit.quantize(tiny_model(family, **overrides), f"W4A4KV4P{prefix}", progress=False)
    x = tokens(batch=1, length=28)
    with torch.no_grad():
        full = model(input_ids=x).logits
    for prefill in (1, 5):
        assert torch.allclose(incremental(model, x, prefill), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_decodes_what_full_forwards_predict():
    model = lowbit.quantize(tiny_model("llama"), "W4A4KV4P1", progress=False)
    seq = tokens(batch=1, length=4)
    out = model.generate(seq, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for _ in range(8):
        seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_an_exception_inside_a_forward_leaves_no_offset_behind():
    from lowbit.runtime.prefix import token_offset

    model = lowbit.quantize(tiny_model("llama"), "W4A4KV4P1", progress=False)
    cache = DynamicCache(config=model.config)
    model(input_ids=tokens(batch=1, length=3), cache=cache, use_cache=True)
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 1), 10**6), cache=cache, use_cache=True)  # an index out of the embedding
    assert token_offset() == 0


# ---------------------------------------------------------------- static ranges


def _observed_inputs(model, batches):
    """Every static quantizer's inputs (x and the offset it is given) over `batches`."""
    seen, hooks = {}, []
    for q in quantizers(model):
        if not q.args.dynamic:
            hooks.append(q.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), []).append(args)))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def sink_model(family="llama", sink=7):
    """A tiny model whose token `sink`, which begins every calibration sample, has one massive
    channel: an attention sink's outlier, in the first layer's inputs already."""
    model = tiny_model(family)
    with torch.no_grad():
        model.model.embed_tokens.weight[sink] = 0.0
        model.model.embed_tokens.weight[sink, 0] = 100.0
    return model


def sink_calibration(sink=7):
    batches = calibration()
    for b in batches:
        b[b == sink] = sink + 1  # the sink begins each sample, and only there
        b[:, 0] = sink
    return batches


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_static_ranges_exclude_the_prefix(algorithm):
    batches = sink_calibration()
    model = lowbit.quantize(sink_model(), "W8A8sKV8sP1", calibration=batches, algorithm=algorithm, progress=False)
    static = {n: q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and not q.args.dynamic}
    assert len(static) == 2 * 7 + 2 * 2 and all(q.fp_prefix == 1 for q in static.values())
    ranges = {n: (q.observed_min.clone(), q.observed_max.clone()) for n, q in static.items()}
    for q in static.values():  # observe again, now recording what each one is given
        q.observing = True
    seen = _observed_inputs(model, batches)
    for q in static.values():
        q.observing = False
    first = [f"model.layers.0.self_attn.{p}_proj.input_quant" for p in "qkv"]
    # RTN observes in the model's own forward, every quantizer; GPTQ's pipeline takes input ranges
    # from its own statistics at its own stage of the layer, which the final model reproduces
    # exactly only for the first layer's q/k/v inputs (nothing before them is quantized)
    for name in static if algorithm == "rtn" else first:
        xs = seen[id(static[name])]
        lo, hi = min(x[..., 1:, :].min() for x, *_ in xs), max(x[..., 1:, :].max() for x, *_ in xs)
        assert torch.equal(ranges[name][0], lo) and torch.equal(ranges[name][1], hi), name
    for name in first:  # the sink's massive channel no longer sets the range (PrefixQuant's point)
        whole = max(x.abs().max() for x, *_ in seen[id(static[name])])
        assert whole > 2 * ranges[name][1].abs().max() and whole > 2 * ranges[name][0].abs().max()


# ---------------------------------------------------------------- save and load


def test_save_and_load_keep_the_prefix(tmp_path):
    model = lowbit.quantize(tiny_model("llama"), "W4A4KV4sP1", calibration=calibration(), progress=False)
    x = tokens(batch=1, length=16)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    save_quantized(model, tmp_path / "m", word_tokenizer())
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["format_version"] == 5  # older lowbit refuses it
    loaded, _ = load_quantized(tmp_path / "m")
    assert lowbit.quantization_state(loaded).scheme.fp_prefix == 1
    assert all(q.fp_prefix == 1 for q in quantizers(loaded)) and quantizers(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, ref)
    assert torch.allclose(incremental(loaded, x, 1), ref, atol=1e-5, rtol=0)  # the hooks are installed on loading


def _edit_description(path, edit):
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    config["description_sha256"] = description_checksum(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def test_an_older_description_loads_without_a_prefix(tmp_path):
    model = lowbit.quantize(tiny_model("llama"), "W4A4KV4", progress=False)
    save_quantized(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["format_version"] == 3 and config["scheme"]["fp_prefix"] == 0  # no prefix: still what older lowbit reads
    _edit_description(tmp_path / "m", lambda c: c["scheme"].pop("fp_prefix"))
    loaded, _ = load_quantized(tmp_path / "m")
    assert lowbit.quantization_state(loaded).scheme.fp_prefix == 0
    assert all(q.fp_prefix == 0 for q in quantizers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens()).logits, model(input_ids=tokens()).logits)


def test_a_prefix_in_an_older_format_version_is_refused(tmp_path):
    save_quantized(lowbit.quantize(tiny_model("llama"), "W4A4KV4P1", progress=False), tmp_path / "m")
    _edit_description(tmp_path / "m", lambda c: c.update(format_version=3))
    with pytest.raises(UserError, match="needs format version 5"):
        load_quantized(tmp_path / "m")


# ---------------------------------------------------------------- refusals


def test_moe_models_are_refused():
    model = tiny_moe("mixtral")
    with pytest.raises(UserError, match="mixture-of-experts"):
        lowbit.quantize(model, "W4A4KV4P1", progress=False)
    with pytest.raises(UserError, match="mixture-of-experts"):
        check_scheme_for_config(model.config, parse_scheme("W8A8P1"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any work


def test_int_kernels_are_refused(tiny_model_dir, capsys):
    code, _, err = run_cli(["-q", "evaluate", str(tiny_model_dir), "--scheme", "W8A8P1", "--int-kernels", "--seq-len", "32"], capsys)
    assert code == 2 and "P<N>" in err and err.count("\n") == 1
    model = lowbit.quantize(tiny_model("llama"), "W8A8P1", progress=False)
    with pytest.raises(UserError, match="full-precision prefix"):
        convert_to_int_kernels(model)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gguf"])
def test_exports_are_refused(fmt, tmp_path):
    model = lowbit.quantize(tiny_model("llama"), "W8A8KV8P1", progress=False)
    with pytest.raises(UserError, match="cannot express full-precision prefix"):
        export_model(model, tmp_path / "out", fmt=fmt)
    assert not (tmp_path / "out").exists()


def test_the_cli_quantizes_saves_and_refuses_to_export(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(quantize_args(tiny_model_dir, sample_text_file, "--scheme", "W4A4KV4P1", "--out", str(out)), capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"] == "W4A4KV4P1" and report["scheme_args"]["fp_prefix"] == 1
    assert "first 1 tokens (P<N>)" in (out / "report.md").read_text()
    code, _, err = run_cli(["-q", "export", str(out), "--out", str(tmp_path / "ct")], capsys)
    assert code == 2 and "cannot express full-precision prefix" in err and err.count("\n") == 1


# ---------------------------------------------------------------- costs


def test_costs_count_the_prefix_at_16_bits():
    model = tiny_model("llama")
    c = model.config
    seq_len, p = 32, 2
    base, prefixed = scheme_cost(model, "W4A4KV4", seq_len), scheme_cost(model, f"W4A4KV4P{p}", seq_len)
    assert prefixed["size_bytes"] == base["size_bytes"] and prefixed["macs"] == base["macs"]
    # linears: the prefix tokens' inputs at 16 instead of 4 bits, weights still 4
    decoder_macs = sum(m.in_features * m.out_features for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    linear_extra = decoder_macs * p * 4 * (16 - 4)
    # attention: key / value j is read by seq_len - j queries; the prefix's at 16 instead of 4 bits, for K and V
    pairs = sum(seq_len - j for j in range(p))
    attention_extra = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * pairs * 16 * (16 - 4)
    assert prefixed["ops"] - base["ops"] == linear_extra + attention_extra
    # KV cache: each prefix token's key and value per layer and KV head at 16 bits, without a scale
    per_vector = c.head_dim * 2 - (c.head_dim * 4 // 8 + 4)
    for context, size in prefixed["kv_cache_bytes"].items():
        assert base["kv_cache_bytes"][context] - size == -2 * c.num_hidden_layers * c.num_key_value_heads * p * per_vector
    assert kv_cache_bytes(c, parse_scheme("W4A4KV4P2"), 1) == kv_cache_bytes(c, None, 1)  # all prefix: FP16
    # the quantized model counts the same OPs
    quantized = lowbit.quantize(model, f"W4A4KV4P{p}", progress=False)
    assert model_ops(quantized, lowbit.quantization_state(quantized).scheme, seq_len).ops == prefixed["ops"]


def test_kv_quantizers_get_the_prefix():
    model = lowbit.quantize(tiny_model("llama"), "W16A16KV4P3", progress=False)
    attention = model.model.layers[0].self_attn
    assert getattr(attention, KEY_QUANT).fp_prefix == 3 and getattr(attention, VALUE_QUANT).fp_prefix == 3


def test_the_analysis_refuses_a_prefix():
    from lowbit.analysis.job import AnalysisConfig

    with pytest.raises(UserError, match="drop the P1 suffix"):
        AnalysisConfig(scheme="W4A4P1").quant_args()
