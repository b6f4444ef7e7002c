"""Learned R1: an orthogonal rotation of the residual stream fitted to calibration activations.

"KurTail: Kurtosis-based LLM Quantization" starts from a (random-signed) Hadamard matrix and lowers
the kurtosis of the rotated activations: a light-tailed token spends the quantization grid evenly,
where a tailed one wastes it on a few large values. The objective is layer-wise (rotated
activations only, no forward of the model), so it is cheap enough for a CPU. The kurtosis is taken
per token, over its channels, because activations are quantized per token: that is the
distribution one grid has to cover.

The objective is the mean kurtosis itself, not KurTail's distance to the uniform's 1.8: a probe on
SmolLM2-135M's R1 inputs (4096 rows, 100 steps, held-out rows) measured per-token 4-bit error
0.0133 at the Hadamard, 0.0077 for |kurtosis - 1.8|, 0.0075 for the Whip loss of "DartQuant:
Efficient Rotational Distribution Calibration for LLM Quantization" and 0.0065 for the plain mean.
Pulling a token up to 1.8 hurts: a token whose few massive channels the Hadamard spreads out has
values near +-c (kurtosis near 1), which a max-scaled grid already covers well.

Orthogonality holds by construction: R = R0 (I - S)^-1 (I + S), the Cayley transform of a skew
matrix S = P - P^T, starts at R0 (P = 0) and is orthogonal for every P. Adam steps on P in float32;
the final R is evaluated in float64, so that R R^T = I to rounding (about 1e-14).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..progress import progress_bar

OBJECTIVES = ("kurtail",)


def check_learning(objective, steps, lr) -> None:
    """One-line UserErrors for the knobs of a learned rotation."""
    if objective not in OBJECTIVES:
        raise UserError(f"learn_rotation must be one of {', '.join(OBJECTIVES)} (or unset); got {objective!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"learn_steps must be a positive integer; got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"learn_lr must be a positive number; got {lr!r}")


def cayley(param: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """start (I - S)^-1 (I + S), S = param - param^T: orthogonal for any `param`, `start` at 0.
    I - S is well conditioned (its singular values are at least 1), so the solve is stable."""
    skew = param - param.T
    eye = torch.eye(skew.shape[0], dtype=skew.dtype)
    return start.to(skew.dtype) @ torch.linalg.solve(eye - skew, eye + skew)


def kurtosis_loss(y: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (rows) of the kurtosis E[y^4] / E[y^2]^2 of each row over its channels
    (about the mean 0: a rotation keeps a token's norm, and symmetric grids are centred at 0)."""
    second = y.pow(2).mean(-1)
    return (y.pow(4).mean(-1) / second.pow(2).clamp(min=1e-30)).mean()


def learn_rotation(
    rows: torch.Tensor, start: torch.Tensor, steps: int, lr: float, *, desc: str = "learn rotation", progress: bool = True
) -> tuple[torch.Tensor, list[float]]:
    """An orthogonal R (float64) from `start` (an orthogonal matrix) that lowers `kurtosis_loss(rows R)`,
    and the objective before and after every step (steps + 1 values). Full-batch Adam: the same
    rows and start always give the same R."""
    x = rows.detach().float()
    x = x[x.pow(2).sum(-1) > 0]  # an all-zero row has no kurtosis
    param = torch.zeros(start.shape, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([param], lr=lr)
    history = []
    for _ in progress_bar(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        with torch.enable_grad():  # callers often quantize under torch.no_grad()
            loss = kurtosis_loss(x @ cayley(param, start))
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rotation = cayley(param.detach().double(), start.double())
        history.append(kurtosis_loss(x.double() @ rotation).item())
    return rotation, history
