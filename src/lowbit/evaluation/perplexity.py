"""Token-level perplexity with the protocol of GPTQ, SmoothQuant, QuaRot and SpinQuant.

The whole text is tokenized once and cut into non-overlapping windows of `seq_len` tokens;
each window is one forward pass with no context from the previous one; perplexity is
exp(total NLL / number of predicted tokens), each window predicting its last seq_len - 1 tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_arch, get_module
from ..errors import UserError
from ..progress import progress_bar

HEAD_CHUNK = 64  # tokens per lm_head slice (64 x 49152 fp32 logits = 12.6 MB)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(token_ids: torch.Tensor, seq_len: int, windows: int | None = None) -> torch.Tensor:
    """The [windows, seq_len] evaluation windows; `windows=None` takes every full window."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2; got {seq_len}")
    available = token_ids.numel() // seq_len
    if available == 0:
        raise UserError(
            f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seq_len}; use a longer text or a smaller --seq-len"
        )
    if windows is not None and windows < 1:
        raise UserError(f"windows must be at least 1; got {windows}")
    count = available if windows is None else min(windows, available)
    return token_ids[: count * seq_len].view(count, seq_len)


def head_nll(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None = None) -> float:
    """Summed NLL of `targets` given the final hidden states [tokens, hidden] (after the final norm)."""
    total = 0.0
    # The head runs on slices of the window: full-vocabulary logits of 2048 tokens would
    # otherwise take more memory than a small model's weights.
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = lm_head(hidden[start : start + HEAD_CHUNK]).float()
        if softcap:  # Gemma 2/3 cap the final logits the way their forward does
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, targets[start : start + HEAD_CHUNK], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 2048,
    windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    batches = eval_windows(token_ids, seq_len, windows)
    device = next(model.parameters()).device
    spec = get_arch(model)
    backbone, lm_head = get_module(model, spec.layers.rsplit(".", 1)[0]), get_module(model, spec.lm_head)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total_nll, total_tokens = 0.0, 0
    for window in progress_bar(batches, desc=desc, unit="window", disable=not progress, leave=False):
        window = window.to(device).unsqueeze(0)
        hidden = backbone(input_ids=window, use_cache=False).last_hidden_state[0, :-1]
        total_nll += head_nll(hidden, window[0, 1:], lm_head, softcap)
        total_tokens += window.shape[1] - 1
    nll = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=total_tokens, windows=len(batches), seq_len=seq_len)
