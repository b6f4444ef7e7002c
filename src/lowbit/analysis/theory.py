"""Seed 003's predictions for a massive-outlier token t (outliers o_i at channels i in O, small
values eps elsewhere, d channels):

- eq. 8, after a Hadamard rotation:        max|t R| = sum_O |o_i| / sqrt(d) + |eps|
- eq. 9, after smoothing (alpha 0.5), then rotation:
                                            max|t diag(s)^-1 R| ~ sum_O sqrt(|o_i| max|W_i| / d)

eq. 8 is exact when some column of the Hadamard matrix has the same sign at every outlier
channel; |eps| is taken as the standard deviation of the token's other entries (the
paper models eps ~ N(0, sigma^2)). The measured maximum sits at the sign-aligned column with the largest
noise, so it exceeds the outlier part by a few sigma. eq. 9 assumes the token holds the channel
maximum max|X_i| = |o_i|, so that o_i / s_i = sqrt(|o_i| max|W_i|), and ignores eps; beside it we
give eq. 9 + sigma of the smoothed token's other entries, which matters once smoothing has shrunk
the outliers to the size of the rest.
"""

from __future__ import annotations

import math

import torch

from ..hadamard import hadamard_transform


def eq8_rotation_max(outliers: list[float], d: int, eps: float = 0.0) -> float:
    return sum(abs(o) for o in outliers) / math.sqrt(d) + abs(eps)


def eq9_smoothrot_max(outliers: list[float], w_absmax: list[float], d: int) -> float:
    return sum(math.sqrt(abs(o) * w / d) for o, w in zip(outliers, w_absmax))


def theory_check(token: torch.Tensor, channels: list[int], scales: torch.Tensor, w_absmax: torch.Tensor) -> dict:
    """Predicted (eq. 8, eq. 9) beside measured maxima of one token.

    `scales` are the smoothing scales the analysis uses for this input (alpha 0.5), `w_absmax` the
    per-input-channel max |W| of the linears reading it."""
    token = token.double()
    d = token.numel()
    outliers = [float(token[c]) for c in channels]
    rest = torch.ones(d, dtype=torch.bool)
    rest[channels] = False
    sigma = float(token[rest].std(correction=0)) if int(rest.sum()) > 1 else 0.0
    smoothed = token / scales.double()
    sigma_smoothed = float(smoothed[rest].std(correction=0)) if int(rest.sum()) > 1 else 0.0
    rotated = hadamard_transform(token[None])[0]
    smoothrot = hadamard_transform(smoothed[None])[0]
    eq9 = eq9_smoothrot_max(outliers, [float(w_absmax[c]) for c in channels], d)
    return {
        "outlier_channels": channels,
        "outlier_values": outliers,
        "d": d,
        "max_abs": float(token.abs().max()),
        "eps_sigma": sigma,
        "rotate_eq8_outlier_part": eq8_rotation_max(outliers, d),
        "rotate_eq8": eq8_rotation_max(outliers, d, sigma),
        "rotate_measured": float(rotated.abs().max()),
        "smoothrot_eq9": eq9,
        "smoothed_eps_sigma": sigma_smoothed,
        "smoothrot_eq9_plus_eps": eq9 + sigma_smoothed,
        "smoothrot_measured": float(smoothrot.abs().max()),
    }
