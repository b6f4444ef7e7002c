"""What the calibration-based algorithms fit: a layer's output error on its calibration inputs,
and the weighting of those inputs' tokens."""

from __future__ import annotations

import torch


def clip_token_norms(x: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Rows (tokens) of x [n, d] whose norm exceeds `factor` x the median row norm, scaled down
    to that norm. Squared-error objectives are otherwise owned by a few massive-activation
    tokens ("Turning LLM Activations Quantization-Friendly"), and fitting those makes every other token worse. None: unchanged."""
    if factor is None:
        return x
    norms = x.norm(dim=1, keepdim=True)
    limit = factor * norms.median()
    return x * torch.clamp(limit / norms.clamp(min=1e-30), max=1.0)


def output_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor, energy: float | None = None) -> float:
    """Relative quantized-output error on the calibration inputs, from the Hessian (or Gram matrix):
    ||X dW^T||^2 / ||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T) (the denominator: `energy`, if known)."""
    dw = (weight.float() - qweight.float()).to(hessian.device)
    num = torch.einsum("oi,ij,oj->", dw, hessian, dw).item()
    den = output_energy(weight, hessian) if energy is None else energy
    return num / den if den > 0 else 0.0


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X W^T||^2 = tr(W H W^T): the denominator of `output_error`, a sum over output rows."""
    w = weight.float().to(hessian.device)
    return torch.einsum("oi,ij,oj->", w, hessian, w).item()
