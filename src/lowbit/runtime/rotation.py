"""Online Hadamard rotation: x -> x diag(signs) H / sqrt(n), applied where it cannot be fused
(H block-diagonal with blocks of `block` channels if set)."""

from __future__ import annotations

import torch
from torch import nn

from ..hadamard import check_block, factor_order, hadamard_transform


class OnlineHadamard(nn.Module):
    def __init__(self, size: int, signs: torch.Tensor | None = None, block: int | None = None) -> None:
        super().__init__()
        if block is None:
            factor_order(size)  # fails early for an order with no Hadamard matrix
        check_block(size, block)
        self.size = size
        self.block = block
        self.register_buffer("signs", signs.clone().float() if signs is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.signs, self.block)

    def extra_repr(self) -> str:
        block = f", block={self.block}" if self.block is not None else ""
        return f"{self.size}, random_signs={self.signs is not None}{block}"
