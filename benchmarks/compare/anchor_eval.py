"""What the runners share: their command line and the process's peak memory; and for the anchors,
lowbit's perplexity formula, written without lowbit (the anchors' environments do not have it).

Token-level perplexity exp(total NLL / predicted tokens): each window of the prepared evaluation ids
predicts its last len - 1 tokens from the ones before, with no BOS added, as lowbit's `perplexity`
does."""

from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LOGIT_CHUNK = 256  # tokens of logits at a time: 2048 x 49152 float32 logits would take 400 MB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def perplexity(model, eval_ids: torch.Tensor) -> tuple[float, float]:
    """(perplexity, mean NLL) of a transformers causal LM on eval_ids [windows, seq_len]."""
    total_nll, total_tokens = 0.0, 0
    for window in eval_ids:
        window = window.unsqueeze(0)
        hidden = model.model(input_ids=window, use_cache=False).last_hidden_state[0, :-1]
        targets = window[0, 1:]
        for start in range(0, hidden.shape[0], LOGIT_CHUNK):
            logits = model.lm_head(hidden[start : start + LOGIT_CHUNK]).float()
            total_nll += F.cross_entropy(logits, targets[start : start + LOGIT_CHUNK], reduction="sum").item()
        total_tokens += targets.numel()
    nll = total_nll / total_tokens
    return math.exp(nll), nll


def row_parser(doc: str, rows) -> argparse.ArgumentParser:
    """The command line of a runner: the prepared data, the row, the threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--row", required=True, choices=["fp", *rows])
    parser.add_argument("--threads", type=int, default=2)
    return parser


def evaluate_into(result: dict, model, eval_ids: torch.Tensor) -> dict:
    """The peak memory so far (the quantization's), then the perplexity, into `result`."""
    result["peak_rss_gib_quant"] = peak_rss_gib()
    start = time.perf_counter()
    ppl, nll = perplexity(model, eval_ids)
    result.update(ppl=ppl, nll=nll, windows=int(eval_ids.shape[0]), eval_seconds=time.perf_counter() - start)
    return result
