"""Calibration-token weighting shared by the algorithms that fit a layer's output error."""

from __future__ import annotations

import torch


def clip_token_norms(x: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Rows (tokens) of x [n, d] whose norm exceeds `factor` x the median row norm, scaled down
    to that norm. Squared-error objectives are otherwise owned by a few massive-activation
    tokens (seed 003), and fitting those makes every other token worse. None: unchanged."""
    if factor is None:
        return x
    norms = x.norm(dim=1, keepdim=True)
    limit = factor * norms.median()
    return x * torch.clamp(limit / norms.clamp(min=1e-30), max=1.0)
