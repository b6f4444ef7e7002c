"""Functions the task YAMLs of this folder name with `!function` (lm-eval loads this file by path).

The prompt logic reproduces lm-eval's own tasks for the same datasets (hellaswag/utils.py,
winogrande/preprocess_winogrande.py in lm-eval 0.4.13), so that scores compare with published
lm-eval numbers; tests/test_offline_tasks.py checks the requests are equal."""

from __future__ import annotations

import re

from lowbit.evaluation.offline_tasks import load_split


def load(subset: str, split: str = "validation", **_metadata):
    """`custom_dataset`: lm-eval calls it with the task's metadata and dataset_kwargs (`subset`)."""
    return load_split(subset, split)


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry "[title]"-style markup; lm-eval removes it the same way
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """Adds `query` (activity label, context) and cleaned `choices` to each HellaSwag row.

    Built as plain columns rather than with `dataset.map`, which would draw a progress bar on
    every load."""
    query, choices, gold = [], [], []
    for doc in dataset:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        query.append(_hellaswag_clean(doc["activity_label"] + ": " + context))
        choices.append([_hellaswag_clean(ending) for ending in doc["endings"]])
        gold.append(int(doc["label"]))
    return dataset.add_column("query", query).add_column("choices", choices).add_column("gold", gold)


# WinoGrande is scored by partial evaluation: each option fills the blank in the context, and
# the continuation (the rest of the sentence) is scored after each of them.
def winogrande_gold(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    prefix = doc["sentence"][: doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]
