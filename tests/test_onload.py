"""Sequential onloading: a model read from disk one decoder layer at a time quantizes and evaluates
bit for bit as the same model loaded whole, keeps layer inputs on disk beyond a budget, and fails
early, in one line, on bad input."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.activations import ActivationStore
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.errors import UserError
from lowbit.evaluation.perplexity import perplexity
from lowbit.io.native import load_quantized
from lowbit.onload import Checkpoint, build_skeleton, check_complete, offload, onload
from lowbit.pipeline import PipelineConfig
from lowbit.scheme import parse_scheme
from lowbit.streaming import OnloadSettings, perplexity_onloaded, quantize_onloaded
from lowbit.transforms.apply import TransformConfig

VOCAB = 512
SEQ = 64


def saved_folder(tmp_path, family="llama", model=None, shard="100KB", dtype=torch.float32):
    model = model or tiny_model(family)
    folder = tmp_path / f"src-{family}-{str(dtype).removeprefix('torch.')}"
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def calibration(n=6, length=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, length), generator=gen) for _ in range(n)]


def eval_ids(seed=1):
    return torch.randint(0, VOCAB, (SEQ * 4,), generator=torch.Generator().manual_seed(seed))


def in_memory(folder, scheme, transform, algorithm, calib, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fp = perplexity(model, ids, SEQ, None, progress=False)
    # the onloading pipeline restarts each layer per input group: so does this one, so that AWQ
    # (equal only up to float rounding in one pass) compares to the bit; GPTQ in one pass is
    # bit-identical to restarting (test_single_pass)
    q = lowbit.quantize(
        model,
        parse_scheme(scheme),
        transform=TransformConfig(kind=transform),
        algorithm=algorithm,
        calibration=calib,
        inplace=True,
        progress=False,
        pipeline=PipelineConfig(single_pass=False),
    )
    return fp, q, perplexity(q, ids, SEQ, None, progress=False)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


Case = namedtuple("Case", "family scheme transform algorithm max_memory")
CASES = [
    Case("llama", "W4A16", "none", "gptq", None),
    Case("llama", "W4A4KV4", "rotate", "gptq", 4096),  # fused R1 + R2/R3/R4, KV, layer inputs on disk
    Case("qwen3", "W8A8", "smooth", "rtn", 0),  # smoothing statistics from the onloaded FP stream
    Case("mistral", "W4A16", "smoothrot", "awq", None),
    Case("gemma2", "W4A8KV4", "rotate", "gptq", None),  # online R1, tied embeddings
    Case("gemma3", "W8A8KV8s", "smooth", "gptq", 20000),  # static KV calibrated in the pipeline
    Case("qwen2", "W8A8s", "none", "rtn", None),  # RTN with static input scales observed layer by layer
    # GPTAQ: the calibration samples' full-precision stream through each layer's FP twin, on disk
    Case("llama", "W4A4KV4", "rotate", GPTQConfig(asymmetric=True), 4096),
    Case("llama", "W8A8sKV8sP1", "none", "rtn", None),  # full-precision prefix: static ranges without it
    Case("qwen3", "W4A8sKV4P2", "rotate", "gptq", None),  # the pipeline's static input ranges without it
    Case("llama", "W4A4KV4", "auto", "rtn", None),  # a choice per input group, from rows sampled from the onloaded FP stream
]


def _case_id(c: Case) -> str:
    algorithm = c.algorithm if isinstance(c.algorithm, str) else "gptaq"
    return f"{c.family}-{c.scheme}-{c.transform}-{algorithm}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_onloaded_quantization_is_bit_identical_to_the_in_memory_path(tmp_path, case):
    folder = saved_folder(tmp_path, case.family)
    calib, ids = calibration(), eval_ids()
    fp, q, qppl = in_memory(folder, case.scheme, case.transform, case.algorithm, calib, ids)
    result = quantize_onloaded(
        folder,
        parse_scheme(case.scheme),
        TransformConfig(kind=case.transform),
        case.algorithm,
        calib,
        ids,
        seq_len=SEQ,
        settings=OnloadSettings(max_memory=case.max_memory, offload_dir=str(tmp_path)),
        save_to=tmp_path / "out",
        progress=False,
    )
    assert result.fp.ppl == fp.ppl and result.fp.tokens == fp.tokens
    assert result.quantized.ppl == qppl.ppl
    if case.max_memory is not None:
        assert result.offloaded_bytes > 0
    assert not list(tmp_path.glob(".*lowbit-*")), "offloaded activations and staged tensors are removed"
    loaded, _ = load_quantized(tmp_path / "out")
    assert_same_state(q, loaded)
    with pytest.raises(UserError, match="exists; pass overwrite=True"):  # refused before any work, the first output kept
        quantize_onloaded(
            folder, parse_scheme(case.scheme), TransformConfig(kind=case.transform), case.algorithm, calib, ids, save_to=tmp_path / "out"
        )
    x = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        assert torch.equal(q(x).logits, loaded(x).logits)


def test_onloaded_mixture_of_experts_reads_per_expert_checkpoints(tmp_path):
    from test_moe import tiny_moe

    folder = saved_folder(tmp_path, "mixtral", model=tiny_moe("mixtral"))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in Checkpoint(folder)  # transformers 5 saves experts one by one
    calib, ids = calibration(), eval_ids()
    _, q, qppl = in_memory(folder, "W4A16", "rotate", "gptq", calib, ids)
    result = quantize_onloaded(
        folder, parse_scheme("W4A16"), TransformConfig(kind="rotate"), "gptq", calib, ids, seq_len=SEQ, save_to=tmp_path / "out", progress=False
    )
    assert result.quantized.ppl == qppl.ppl
    assert_same_state(q, load_quantized(tmp_path / "out")[0])


def test_bfloat16_checkpoint_reads_as_from_pretrained_float32(tmp_path):
    folder = saved_folder(tmp_path, "qwen2", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model, checkpoint = build_skeleton(folder), Checkpoint(folder)
    layer = model.model.layers[1]
    onload(layer, "model.layers.1", checkpoint)
    for name, param in layer.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, ref.model.layers[1].get_parameter(name)), name
    offload(layer)
    assert all(p.is_meta for p in layer.parameters())
    ids = eval_ids()
    assert perplexity_onloaded(folder, ids, SEQ, progress=False).ppl == perplexity(ref.eval(), ids, SEQ, progress=False).ppl


def test_activation_store_keeps_entries_beyond_the_budget_on_disk(tmp_path):
    store = ActivationStore(budget_bytes=3 * 4 * 8, folder=tmp_path)
    values = [torch.randn(1, 3, 8), torch.randn(1, 3, 8).bfloat16(), torch.randn(2, 3, 8)]
    for v in values:
        store.append(v)
    assert store.resident_bytes == 96 and store.disk_bytes == 48 + 192
    for j, v in enumerate(values):
        assert torch.equal(store[j], v)
        store[j] = v * 2
        assert torch.equal(store[j], (v * 2).to(v.dtype))
    store.close()
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------- bad input


def test_missing_shard_fails_before_any_work(tmp_path):
    folder = saved_folder(tmp_path)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(UserError, match=f"shard {shards[1].name} .* is missing"):
        Checkpoint(folder)


def test_truncated_shard_and_missing_tensor_fail_in_one_line(tmp_path):
    folder = saved_folder(tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        Checkpoint(folder)
    folder = saved_folder(tmp_path, "qwen2")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.down_proj.weight"
    index["weight_map"].pop(victim)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for file in folder.glob("model-*.safetensors"):  # drop the tensor from its shard too
        from safetensors.torch import load_file, save_file

        tensors = load_file(file)
        if victim in tensors:
            tensors.pop(victim)
            save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"lacks 1 of the model's tensors \\(first: {victim}\\)"):
        check_complete(build_skeleton(folder), Checkpoint(folder))


def test_no_space_for_offloaded_activations_fails_before_the_model_loads(tmp_path, monkeypatch):
    from lowbit import activations
    from lowbit.jobs import CalibrationSettings, EvalSettings, quantize_job
    from lowbit.recipes import Recipe

    folder = saved_folder(tmp_path)
    _tokenizer_into(folder)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    loaded = []
    monkeypatch.setattr("lowbit.streaming.build_skeleton", lambda *a: loaded.append(a))
    with pytest.raises(UserError, match="offloaded activations need .* GiB on disk in .* free space there"):
        quantize_job(
            str(folder),
            Recipe(scheme=parse_scheme("W4A16"), algorithm="gptq"),
            evaluation=EvalSettings(None, 2, SEQ),
            calibration=CalibrationSettings(None, 4, 32),
            onload=OnloadSettings(max_memory=0, offload_dir=str(tmp_path)),
            progress=False,
        )
    assert not loaded


def _tokenizer_into(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_cli_onload_equals_in_memory_and_bad_options_exit_2(tmp_path, capsys):
    from click.testing import CliRunner

    from lowbit.cli import cli, main

    folder = saved_folder(tmp_path)
    _tokenizer_into(folder)
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (6000,), generator=gen)))
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (6000,), generator=gen)))
    common = ["-q", "quantize", "--model", str(folder), "--scheme", "W4A16", "--algorithm", "gptq", "--calib", str(calib), "--calib-samples", "4"]
    common += ["--calib-seq-len", "32", "--data", str(text), "--windows", "3", "--seq-len", str(SEQ)]
    reports = {}
    for flag in ("--onload", "--no-onload"):
        out = tmp_path / f"run{flag}"
        result = CliRunner().invoke(cli, [*common, flag, "--out", str(out)])
        assert result.exit_code == 0, result.output
        reports[flag] = json.loads((out / "report.json").read_text())
    a, b = reports["--onload"], reports["--no-onload"]
    assert a["fp"]["ppl"] == b["fp"]["ppl"] and a["quantized"]["ppl"] == b["quantized"]["ppl"]
    assert a["quantized"]["size_bytes"] == b["quantized"]["size_bytes"] and a["layer_errors"] == b["layer_errors"]
    assert "onload" in a and "onload" not in b
    assert_same_state(load_quantized(tmp_path / "run--onload")[0], load_quantized(tmp_path / "run--no-onload")[0])
    evaluated = CliRunner().invoke(
        cli, ["-q", "evaluate", str(folder), "--data", str(text), "--windows", "3", "--seq-len", str(SEQ), "--onload", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["fp"]["ppl"] == b["fp"]["ppl"]
    for bad, message in [
        (["--no-onload", "--max-memory", "1GB"], "--max-memory and --offload-dir apply to layer-by-layer onloading"),
        (["--onload", "--max-memory", "lots"], "is not a size"),
        (["--onload", "--calib", "generated"], "--calib generated needs the whole model"),
    ]:
        args = [a for a in common if a not in ("--calib", str(calib))] + bad + ["--out", str(tmp_path / "bad")]
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, err
        assert not (tmp_path / "bad").exists()
    shutil.rmtree(tmp_path / "run--onload")


def test_a_model_that_does_not_fit_is_onloaded_automatically(tmp_path, monkeypatch):
    from lowbit.jobs import EvalSettings, evaluate_job

    folder = saved_folder(tmp_path)
    _tokenizer_into(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 500}" for i in range(3000)))
    monkeypatch.setattr("lowbit.jobs.available_memory_bytes", lambda: 1000)
    report = evaluate_job(str(folder), evaluation=EvalSettings(str(text), 2, SEQ), cost_schemes=None, progress=False)
    assert "onload" in report
    monkeypatch.setattr("lowbit.jobs.available_memory_bytes", lambda: 10**12)
    whole = evaluate_job(str(folder), evaluation=EvalSettings(str(text), 2, SEQ), cost_schemes=None, progress=False)
    assert "onload" not in whole and whole["fp"]["ppl"] == report["fp"]["ppl"]
