"""Systematic and massive outliers ("Turning LLM Activations Quantization-Friendly", section IV-A), found with stated thresholds.

- systematic: channel j is systematic in an input if |x_tj| >= `systematic_ratio` x (median over
  channels of |x_t|) in at least `systematic_fraction` of the tokens: a channel large across most
  tokens (the kind smoothing targets; "Turning LLM Activations Quantization-Friendly" sees them at the attention and gate/up inputs).
- massive: entry x_tj is massive if |x_tj| >= `massive_ratio` x M, where M is the median over the
  sample's tokens of the token's largest |x|: a single token far above what the typical token's
  largest value is ("Turning LLM Activations Quantization-Friendly" sees > 1000 in down_proj of LLaMA2-7B, where typical values are ~1).

Both tests are relative, so they carry across models whose activations differ in scale. The
per-token and per-channel sums they need stream: `InputScan.update` sees one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class OutlierConfig:
    massive_ratio: float = 50.0
    systematic_ratio: float = 10.0
    systematic_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.massive_ratio > 1:
            raise UserError(f"the massive-outlier ratio must be above 1 (a multiple of the typical token maximum); got {self.massive_ratio}")
        if not self.systematic_ratio > 1:
            raise UserError(f"the systematic-outlier ratio must be above 1 (a multiple of the token median); got {self.systematic_ratio}")
        if not 0 < self.systematic_fraction <= 1:
            raise UserError(f"the systematic-outlier token fraction must be in (0, 1]; got {self.systematic_fraction}")


class InputScan:
    """What one pass over the sample learns about one linear input [tokens, channels]:
    per-channel max |x| (for smoothing scales), per-token max and median |x|, and per channel how
    often it clears the systematic test and its mean |x|."""

    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self.channel_absmax: torch.Tensor | None = None
        self.channel_abs_sum: torch.Tensor | None = None
        self.systematic_count: torch.Tensor | None = None
        self.token_max: list[torch.Tensor] = []
        self.token_median: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float()
        med = a.median(dim=1).values
        hits = (a >= self.config.systematic_ratio * med[:, None]).sum(dim=0)
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_abs_sum, self.systematic_count = a.amax(0), a.sum(0, dtype=torch.float64), hits
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, a.amax(0))
            self.channel_abs_sum += a.sum(0, dtype=torch.float64)
            self.systematic_count += hits
        self.token_max.append(a.amax(1))
        self.token_median.append(med)

    @property
    def tokens(self) -> int:
        return sum(t.numel() for t in self.token_max)

    @property
    def token_maxima(self) -> torch.Tensor:
        return torch.cat(self.token_max)

    @property
    def typical_token_max(self) -> float:
        """M: the median over tokens of each token's largest |x|."""
        return float(self.token_maxima.median())

    @property
    def massive_threshold(self) -> float:
        return self.config.massive_ratio * self.typical_token_max

    def massive_tokens(self) -> list[int]:
        """Indices (in sample order) of the tokens holding at least one massive entry."""
        return torch.nonzero(self.token_maxima >= self.massive_threshold).flatten().tolist()

    def systematic_channels(self) -> list[dict]:
        """Channels that clear the systematic test in enough tokens, largest share first."""
        n = self.tokens
        share = self.systematic_count.double() / n
        mean_abs = self.channel_abs_sum / n
        typical = float(torch.cat(self.token_median).median())
        found = torch.nonzero(share >= self.config.systematic_fraction).flatten().tolist()
        rows = [
            {
                "channel": c,
                "token_share": float(share[c]),
                "mean_abs": float(mean_abs[c]),
                "mean_abs_over_typical_median": float(mean_abs[c]) / typical if typical > 0 else float("inf"),
            }
            for c in found
        ]
        return sorted(rows, key=lambda r: (-r["token_share"], -r["mean_abs"]))


def massive_entries(row: torch.Tensor, threshold: float) -> tuple[list[int], list[float]]:
    """The channels of one token whose |x| clears `threshold`, and their (signed) values."""
    channels = torch.nonzero(row.abs() >= threshold).flatten().tolist()
    return channels, [float(row[c]) for c in channels]
