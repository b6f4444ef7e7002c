"""Online Hadamard rotation: x -> x diag(signs) H / sqrt(n), applied where it cannot be fused."""

from __future__ import annotations

import torch
from torch import nn

from ..hadamard import factor_order, hadamard_transform


class OnlineHadamard(nn.Module):
    def __init__(self, size: int, signs: torch.Tensor | None = None) -> None:
        super().__init__()
        factor_order(size)  # fails early for an order with no Hadamard matrix
        self.size = size
        self.register_buffer("signs", signs.clone().float() if signs is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.signs)

    def extra_repr(self) -> str:
        return f"{self.size}, random_signs={self.signs is not None}"
