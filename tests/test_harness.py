"""lm-evaluation-harness on lowbit's models in memory, with a task defined from local files."""

import json
import math

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import lowbit
from lowbit import UserError
from lowbit.evaluation.harness import HarnessConfig, evaluate_tasks, parse_tasks, preset_fewshot

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The quick brown fox", "choices": ["jumps over the lazy dog", "reads text", "is measured"], "label": 0},
    {"question": "A model reads text and", "choices": ["predicts the next word", "the fox", "dog"], "label": 0},
    {"question": "Quantization maps real numbers to", "choices": ["a small set of integers", "the lazy fox", "text"], "label": 0},
    {"question": "and the error it adds is", "choices": ["quick", "measured", "brown fox jumps"], "label": 1},
    {"question": "The lazy dog", "choices": ["maps", "reads the next word", "jumps"], "label": 2},
]
TASK = "lowbit_tiny_mc"


def write_task(folder, docs=DOCS, name=TASK, dataset_path="json"):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    kwargs = f"dataset_kwargs:\n  data_files:\n    test: {data}\n" if dataset_path == "json" else ""
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: {dataset_path}\n{kwargs}output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    return folder


@torch.no_grad()
def reference_scores(model, tokenizer, docs):
    """acc and acc_norm computed directly: sum of log-probabilities of ' ' + choice after the prompt
    (acc_norm divides by the choice's length in bytes), the way lm-eval defines them."""
    acc = acc_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            full = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            cont = full[len(ctx) :]
            logits = model(torch.tensor([full])).logits[0].log_softmax(-1)
            ll = sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            scores.append((ll, ll / len((" " + choice).encode())))
        acc += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["label"]
        acc_norm += max(range(len(scores)), key=lambda i: scores[i][1]) == doc["label"]
    return acc / len(docs), acc_norm / len(docs)


def test_presets_and_names():
    assert parse_tasks("llm-qat")[:2] == ["boolq", "piqa"] and len(parse_tasks("llm-qat")) == 8
    assert parse_tasks("seed001") == parse_tasks("llm-qat")  # the first name still works
    assert parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert preset_fewshot("llm-qat-fewshot") == preset_fewshot("seed001-fewshot") == 5 and preset_fewshot("piqa") is None
    with pytest.raises(UserError, match="no task names"):
        parse_tasks(" , ")


@pytest.mark.parametrize("kind", ["fake", "int"])
def test_local_task_on_quantized_model_matches_direct_scoring(tmp_path, kind):
    from lowbit.runtime.int_linear import convert_to_int_kernels

    tokenizer = word_tokenizer()
    model = lowbit.quantize(tiny_model("llama"), "W8A8", progress=False)
    if kind == "int":
        model = convert_to_int_kernels(model)
    config = HarnessConfig(tasks=[TASK], task_paths=[str(write_task(tmp_path))])
    out = evaluate_tasks(model, tokenizer, config, progress=False)
    result = out["results"][TASK]
    assert result["samples"] == len(DOCS) and result["num_fewshot"] == 0
    acc, acc_norm = reference_scores(model, tokenizer, DOCS)
    assert math.isclose(result["acc"], acc) and math.isclose(result["acc_norm"], acc_norm)
    assert "acc_stderr" in result and out["lm_eval_version"]


def test_limit_and_fewshot(tmp_path):
    config = HarnessConfig(tasks=[TASK], task_paths=[str(write_task(tmp_path))], limit=2, num_fewshot=1)
    # few-shot examples come from the same split when a task has no training split
    result = evaluate_tasks(tiny_model("qwen2"), word_tokenizer(), config, progress=False)["results"][TASK]
    assert result["samples"] == 2 and result["num_fewshot"] == 1


def test_unknown_task_is_a_clear_error(tmp_path):
    config = HarnessConfig(tasks=["lowbit_tiny_mcq"], task_paths=[str(write_task(tmp_path))])
    with pytest.raises(UserError, match="unknown task 'lowbit_tiny_mcq': did you mean lowbit_tiny_mc"):
        evaluate_tasks(tiny_model("llama"), word_tokenizer(), config, progress=False)


def test_unreachable_dataset_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # what an offline machine sees, without waiting for network retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_task(tmp_path, name="lowbit_hub_task", dataset_path="lowbit-tests/no-such-dataset")
    config = HarnessConfig(tasks=["lowbit_hub_task"], task_paths=[str(tmp_path)])
    with pytest.raises(UserError, match="cannot load the dataset of task 'lowbit_hub_task'.*--task-path"):
        evaluate_tasks(tiny_model("llama"), word_tokenizer(), config, progress=False)


def run_cli(args, capsys):
    from lowbit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_evaluate_tasks_costs_and_int_kernels(tiny_model_dir, sample_text_file, tmp_path, capsys):
    (tmp_path / "tasks").mkdir()
    tasks = write_task(tmp_path / "tasks")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        [
            "-q",
            "evaluate",
            str(tiny_model_dir),
            "--data",
            str(sample_text_file),
            "--seq-len",
            "32",
            "--windows",
            "2",
            "--scheme",
            "W8A8",
            "--int-kernels",
            "--tasks",
            TASK,
            "--task-path",
            str(tasks),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kernels"] == "int" and report["scheme"] == "W8A8KV16" and report["quantized"]["ppl"] > 1
    result = report["tasks"]["results"][TASK]
    assert 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1 and result["samples"] == len(DOCS)
    schemes = [row["scheme"] for row in report["cost_table"]]
    assert schemes == ["FP16", "W8A8KV8", "W4A16KV16", "W4A8KV4", "W4A4KV4", "W8A8KV16"]
    assert report["cost_table"][-1]["size_bytes"] == report["quantized"]["size_bytes"]
    md = (out / "report.md").read_text()
    assert "| task | shots | samples | acc | acc_norm |" in md and f"| {TASK} | 0 | {len(DOCS)} |" in md
    assert "| W4A4KV4 |" in md and "KV 32k" in md and "integer kernels" in md and md.strip() in stdout


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--tasks", "lowbit_tiny_mcq"], "unknown task 'lowbit_tiny_mcq'"),
        (["--int-kernels"], "give a --scheme"),
        (["--scheme", "W8A16", "--int-kernels"], "2-4 bit"),
        (["--limit", "3"], "add --tasks"),
    ],
)
def test_cli_evaluate_errors(tiny_model_dir, sample_text_file, tmp_path, capsys, extra, needle):
    args = ["-q", "evaluate", str(tiny_model_dir), "--data", str(sample_text_file), "--seq-len", "32", "--windows", "1"]
    code, _, err = run_cli(args + ["--task-path", str(write_task(tmp_path))] * ("--tasks" in extra) + extra, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
