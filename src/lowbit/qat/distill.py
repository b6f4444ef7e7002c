"""Distillation losses of LLM-QAT (LLM-QAT, section 2.2 and its ablation, Table 5).

The student is the quantized model, the teacher the full-precision one. Every loss averages over
the predicted positions selected by `mask` ([batch, tokens], 1 where a token is real):

- logits: soft cross-entropy over the whole vocabulary against the teacher's probabilities,
  -1/n sum_i sum_c p_T(c|x_i) log p_S(c|x_i) (eq. 4; the paper's choice);
- label:  hard-label cross-entropy against the next token of the (generated) data;
- hidden: mean squared error between student and teacher hidden states of every layer;
- attention: cross-entropy between teacher and student attention probabilities.
`top-k` logits distillation uses only the teacher's k most likely tokens, renormalised, so
the teacher's output can be cached in little memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError

LOSSES = ("logits", "label", "hidden", "attention")


def check_losses(losses: dict[str, float]) -> None:
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown or not losses:
        raise UserError(f"unknown or no distillation loss {unknown or ''}; choose from {', '.join(LOSSES)} (e.g. logits)")
    if any(w < 0 for w in losses.values()):
        raise UserError(f"loss weights must be non-negative; got {losses}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 4: cross-entropy against the teacher's full-vocabulary probabilities."""
    p_teacher = teacher_logits.float().softmax(-1)
    return _masked_mean(-(p_teacher * student_logits.float().log_softmax(-1)).sum(-1), mask)


def topk_cross_entropy(student_logits: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy against the teacher's top-k probabilities (renormalised over those k)."""
    p_teacher = top_values.float().softmax(-1)
    log_p = student_logits.float().log_softmax(-1).gather(-1, top_ids)
    return _masked_mean(-(p_teacher * log_p).sum(-1), mask)


def label_cross_entropy(student_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the data itself (position i predicts token i + 1)."""
    logits, targets = student_logits[:, :-1].float(), input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)
    return _masked_mean(nll, mask[:, 1:] * mask[:, :-1])


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the per-token mean squared error of hidden states."""
    losses = [_masked_mean((s.float() - t.float()).pow(2).mean(-1), mask) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(losses).mean()


def attention_cross_entropy(student_attn: tuple[torch.Tensor, ...], teacher_attn: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the cross-entropy between teacher and student attention rows."""
    losses = []
    for s, t in zip(student_attn, teacher_attn):
        ce = -(t.float() * s.float().clamp(min=1e-12).log()).sum(-1).mean(1)  # [batch, tokens], heads averaged
        losses.append(_masked_mean(ce, mask))
    return torch.stack(losses).mean()
