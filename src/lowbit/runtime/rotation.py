"""Online rotations, applied where they cannot be fused: the Hadamard x -> x diag(signs) H / sqrt(n)
(H block-diagonal with blocks of `block` channels if set), or a dense learned rotation x -> x R."""

from __future__ import annotations

import torch
from torch import nn

from ..hadamard import check_base, check_block, factor_order, hadamard_transform
from ..quant.fake import at_least_float32


class OnlineHadamard(nn.Module):
    """`base`: the base order of H (of each block's H with `block`), H = H_{2^k} (x) H_base. Default
    the smallest one `factor_order` reaches now; a saved model records it, because which base is the
    smallest changes as constructions are added, and a reload must rotate with the same matrix."""

    def __init__(self, size: int, signs: torch.Tensor | None = None, block: int | None = None, base: int | None = None) -> None:
        super().__init__()
        order = size if block is None else block
        check_block(size, block)  # fails early for a block that does not tile `size`
        if base is None:
            base = factor_order(order)[0]  # fails early for an order with no Hadamard matrix
        check_base(order, base)
        self.size = size
        self.block = block
        self.base = base
        self.register_buffer("signs", signs.clone().float() if signs is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.signs, self.block, self.base)

    def extra_repr(self) -> str:
        block = f", block={self.block}" if self.block is not None else ""
        return f"{self.size}, random_signs={self.signs is not None}{block}, base={self.base}"


class OnlineRotation(nn.Module):
    """x -> x R for a dense orthogonal R (a learned rotation, which has no fast transform): a
    matrix product computed in at least float32, whatever x's dtype."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a rotation is a square matrix; got shape {tuple(matrix.shape)}")
        self.size = matrix.shape[0]
        self.register_buffer("matrix", matrix.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = at_least_float32(x)
        return (wide @ self.matrix.to(wide.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.size}, dense"
