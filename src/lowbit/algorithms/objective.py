"""What the calibration-based algorithms fit: a layer's output error on its calibration inputs,
and the weighting of those inputs' tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch


def clip_token_norms(x: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Rows (tokens) of x [n, d] whose norm exceeds `factor` x the median row norm, scaled down
    to that norm. Squared-error objectives are otherwise owned by a few massive-activation
    tokens ("Turning LLM Activations Quantization-Friendly"), and fitting those makes every other token worse. None: unchanged."""
    weights = token_weights(x, factor)
    return x if weights is None else x * weights


def token_weights(x: torch.Tensor, factor: float | None) -> torch.Tensor | None:
    """The factors [n, 1] `clip_token_norms` scales the rows of x by (None: all 1), so that
    another tensor of the same tokens (GPTAQ's full-precision inputs) can be weighted alike."""
    if factor is None:
        return None
    norms = x.norm(dim=1, keepdim=True)
    limit = factor * norms.median()
    return torch.clamp(limit / norms.clamp(min=1e-30), max=1.0)


def output_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor, energy: float | None = None) -> float:
    """Relative quantized-output error on the calibration inputs, from the Hessian (or Gram matrix):
    ||X dW^T||^2 / ||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T) (the denominator: `energy`, if known)."""
    num = _quadratic_form(lambda rows: weight[rows].float() - qweight[rows].float(), weight.shape[0], hessian)
    den = output_energy(weight, hessian) if energy is None else energy
    return num / den if den > 0 else 0.0


ERROR_ROWS = 1024  # rows of a weight per product with H: [rows, in] temporaries, not [out, in]


def _quadratic_form(rows_of: Callable[[slice], torch.Tensor], count: int, hessian: torch.Tensor) -> float:
    """sum over rows w of w H w^T, a block of rows at a time."""
    total = 0.0
    for start in range(0, count, ERROR_ROWS):
        w = rows_of(slice(start, start + ERROR_ROWS)).to(hessian.device)
        total += torch.einsum("oi,ij,oj->", w, hessian, w).item()
    return total


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X W^T||^2 = tr(W H W^T): the denominator of `output_error`, a sum over output rows."""
    return _quadratic_form(lambda rows: weight[rows].float(), weight.shape[0], hessian)
