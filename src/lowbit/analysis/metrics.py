"""Seed 003's metrics as tensor functions and streaming accumulators.

- layer-wise error   E = ||X W - Q(X) Q(W)||_F^2          (eq. 2; nn.Linear layout: X W^T)
- difficulty         std of the channel magnitudes, a channel magnitude being the L2 norm of one
                     input channel (a column of X; a column of an nn.Linear weight [out, in])
- kurtosis and max |x|, as flatness measures beside it.

Everything a metric needs is a sum over tokens (squared error, squared channel norms, raw
moments), so the statistics stream: each captured batch updates the sums and is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..hadamard import hadamard_transform
from ..quant import fake_quantize
from ..scheme import QuantArgs

TRANSFORMS = ("none", "smooth", "rotate", "smoothrot")


def channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each input channel: columns of activations [tokens, c] or of weights [out, c]."""
    return x.double().pow(2).sum(dim=0).sqrt()


def difficulty(magnitudes: torch.Tensor) -> float:
    """Seed 003's quantization difficulty: standard deviation (population) of channel magnitudes."""
    return float(magnitudes.double().std(correction=0))


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis of all entries, E[(x - mean)^4] / var^2 (3 for a normal distribution)."""
    c = x.detach().reshape(-1).float()
    c = c - c.mean()
    c2 = c * c
    var = float(c2.mean())
    return float((c2 * c2).mean()) / var**2 if var > 0 else math.nan


def layer_error(x: torch.Tensor, weight: torch.Tensor, w_args: QuantArgs | None, a_args: QuantArgs | None) -> float:
    """||X W^T - Q(X) Q(W)^T||_F^2 with the reference computed from the same X and W."""
    with torch.no_grad():
        return quantized_error(x @ weight.T, quantize_input(x, a_args), weight, w_args)


def quantize_input(x: torch.Tensor, a_args: QuantArgs | None) -> torch.Tensor:
    """Q(X), computed once and shared by every linear that reads X."""
    return fake_quantize(x, a_args) if a_args is not None else x


def quantized_error(reference: torch.Tensor, qx: torch.Tensor, weight: torch.Tensor, w_args: QuantArgs | None) -> float:
    """||reference - Q(X) Q(W)^T||_F^2; `reference` is the untransformed X W^T, so a transformed
    pair is measured against the original layer output."""
    with torch.no_grad():
        qw = fake_quantize(weight, w_args) if w_args is not None else weight
        diff = reference - qx @ qw.T
        return float((diff * diff).sum())  # torch's cascade sum keeps fp32 accurate, 25x faster than float64


def transform_pair(kind: str, x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(X A, [W A^-T ...]) in nn.Linear layout for one transform: smooth X / s, W * s (s per input
    channel); rotate X R, W R with the deterministic Hadamard R (no random signs, as "Turning LLM Activations Quantization-Friendly");
    smoothrot both, smoothing first. X W^T is unchanged by each."""
    if kind in ("smooth", "smoothrot"):
        x = x / scales
        weights = [w * scales for w in weights]
    if kind in ("rotate", "smoothrot"):
        x = hadamard_transform(x)
        weights = [hadamard_transform(w) for w in weights]
    elif kind not in ("none", "smooth"):
        raise ValueError(f"unknown transform {kind!r}")
    return x, weights


@dataclass
class Moments:
    """Streaming sums of one tensor's entries (float64): count, raw moments 1-4, max |x|."""

    count: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    absmax: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)  # fp32 cascade sums: accurate to ~1e-6, far faster than float64
        x2 = x * x
        self.count += x.numel()
        for k, p in enumerate((x, x2, x2 * x, x2 * x2)):
            self.sums[k] += float(p.sum())
        self.absmax = max(self.absmax, float(x.abs().max()))

    @property
    def mean(self) -> float:
        return self.sums[0] / self.count

    @property
    def variance(self) -> float:
        m = self.mean
        return max(self.sums[1] / self.count - m * m, 0.0)

    @property
    def kurtosis(self) -> float:
        n, (s1, s2, s3, s4) = self.count, self.sums
        m = s1 / n
        central4 = s4 / n - 4 * m * s3 / n + 6 * m * m * s2 / n - 3 * m**4
        var = self.variance
        return central4 / var**2 if var > 0 else math.nan


@dataclass
class ActivationStats:
    """Streaming statistics of one (transformed) input: channel squared norms and moments."""

    channel_sq: torch.Tensor | None = None
    moments: Moments = field(default_factory=Moments)

    def update(self, x: torch.Tensor) -> None:
        sq = (x * x).sum(dim=0).double()
        self.channel_sq = sq if self.channel_sq is None else self.channel_sq + sq
        self.moments.update(x)

    def summary(self) -> dict:
        mags = self.channel_sq.sqrt()
        return {"difficulty": difficulty(mags), "kurtosis": self.moments.kurtosis, "max_abs": self.moments.absmax}


def weight_summary(weights: list[torch.Tensor]) -> dict:
    """Difficulty, kurtosis and max |w| of the stacked weights of the linears that share one input
    (channel magnitude = norm of an input channel over all their rows)."""
    stacked = torch.cat(weights, dim=0)
    return {
        "difficulty": difficulty(channel_magnitudes(stacked)),
        "kurtosis": kurtosis(stacked),
        "max_abs": float(stacked.abs().max()),
    }


def pearson(a: list[float], b: list[float]) -> float:
    """Pearson correlation of two equally long lists (nan for fewer than 3 points or no spread)."""
    if len(a) < 3:
        return math.nan
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation: Pearson of the ranks (no ties expected among measured errors)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    return pearson(ranks(a), ranks(b))
