"""Weight edits for equivalent transformations, in the nn.Linear layout (weight [out, in], y = x W^T).

An input transform x -> x A is compensated by W -> W A^{-T}: for a rotation R that is W R, for a
smoothing x / s it is W * s. Output-side edits (rows) let a producer absorb a transform of its
consumer's input. All edits are computed in float64 and written back in the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..hadamard import hadamard_transform


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)  # converts to param's dtype in the same pass (rounds as .to() does)


def scale_input_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    """W <- W diag(scale): the linear now expects its input divided by `scale`."""
    scale = scale.double()
    _edit_rows(linear.weight, lambda block: block * scale)


def scale_output_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
    """Rows (and bias) times `scale`: the linear's output becomes y * scale."""
    _write(linear.weight, linear.weight.double() * scale.double()[:, None])
    if linear.bias is not None:
        _write(linear.bias, linear.bias.double() * scale.double())


ROW_BLOCK = 4096  # rows edited at a time: float64 copies of a whole vocabulary matrix are large


def _edit_rows(weight: torch.Tensor, edit) -> None:
    """weight <- edit(weight) for a row-wise `edit`, in float64, a block of rows at a time, in place
    (a whole vocabulary matrix in float64 is a large transient)."""
    for start in range(0, weight.shape[0], ROW_BLOCK):
        block = weight[start : start + ROW_BLOCK]
        _write(block, edit(block.double()))


def _rotate(x: torch.Tensor, signs: torch.Tensor | None, block: int | None, matrix: torch.Tensor | None) -> torch.Tensor:
    """x R (rows of x): the Hadamard R, or the dense orthogonal `matrix` in its place (a learned rotation)."""
    return x @ matrix.to(x.dtype) if matrix is not None else hadamard_transform(x, signs, block)


def _rotate_rows(weight: torch.Tensor, signs: torch.Tensor | None, block: int | None, matrix: torch.Tensor | None = None) -> None:
    """Each row w <- w R."""
    _edit_rows(weight, lambda rows: _rotate(rows, signs, block, matrix))


# R = diag(signs) H / sqrt(n) below, H block-diagonal with blocks of `block` channels if set; or R
# = `matrix`, a dense orthogonal matrix (float64), when one is given.


def rotate_input_columns(linear: nn.Linear, signs: torch.Tensor | None, block: int | None = None, matrix: torch.Tensor | None = None) -> None:
    """W <- W R: the linear now expects its input times R."""
    _rotate_rows(linear.weight, signs, block, matrix)


def rotate_output_rows(linear: nn.Module, signs: torch.Tensor | None, block: int | None = None, matrix: torch.Tensor | None = None) -> None:
    """W <- R^T W, b <- b R: the linear's output becomes y R."""
    _write(linear.weight, _rotate(linear.weight.double().T, signs, block, matrix).T)
    if linear.bias is not None:
        _write(linear.bias, _rotate(linear.bias.double(), signs, block, matrix))


def rotate_embedding(embedding: nn.Embedding, signs: torch.Tensor | None, block: int | None = None, matrix: torch.Tensor | None = None) -> None:
    """Each embedding vector e <- e R."""
    _rotate_rows(embedding.weight, signs, block, matrix)


def rotate_head_outputs(linear: nn.Linear, head_dim: int, block: int | None = None) -> None:
    """Per output head h: W_h <- R^T W_h, b_h <- b_h R (R of order head_dim): outputs become y_h R."""
    out_features, in_features = linear.weight.shape
    w = linear.weight.double().view(out_features // head_dim, head_dim, in_features).transpose(1, 2)
    _write(linear.weight, hadamard_transform(w, block=block).transpose(1, 2).reshape(out_features, in_features))
    if linear.bias is not None:
        _write(linear.bias, hadamard_transform(linear.bias.double().view(-1, head_dim), block=block).reshape(-1))


def rotate_head_inputs(linear: nn.Linear, head_dim: int, block: int | None = None) -> None:
    """W <- W blockdiag(R, ..., R): the linear now expects each input head rotated by R."""
    out_features, in_features = linear.weight.shape
    w = linear.weight.double().view(out_features, in_features // head_dim, head_dim)
    _write(linear.weight, hadamard_transform(w, block=block).reshape(out_features, in_features))


def norm_gain(norm: nn.Module, offset: float) -> torch.Tensor:
    """The effective per-channel gain of a norm: offset + weight (Gemma stores weight - 1)."""
    return norm.weight.double() + offset


def set_norm_gain(norm: nn.Module, gain: torch.Tensor, offset: float) -> None:
    _write(norm.weight, gain.double() - offset)


def norm_bias(norm: nn.Module) -> torch.Tensor | None:
    """The bias of a LayerNorm (None for an RMSNorm)."""
    bias = getattr(norm, "bias", None)
    return None if bias is None else bias.double()


def scale_norm_output(norm: nn.Module, factor: torch.Tensor, offset: float) -> None:
    """The norm's output becomes y * factor (gain and, for a LayerNorm, bias)."""
    set_norm_gain(norm, norm_gain(norm, offset) * factor.double(), offset)
    if getattr(norm, "bias", None) is not None:
        _write(norm.bias, norm.bias.double() * factor.double())


def fold_norm_into_readers(norm: nn.Module, linears: list[nn.Module], offset: float, name: str = "norm") -> None:
    """Move the norm's affine part into the linears that read it: W <- W diag(gain) and, for a
    LayerNorm, b <- b + W bias; the norm then only normalizes (gain 1, bias 0)."""
    gain, bias = norm_gain(norm, offset), norm_bias(norm)
    for lin in linears:
        if bias is not None:
            if lin.bias is None:
                raise UserError(
                    f"cannot fold the bias of {name} into a linear without a bias; rotate without folding the norms "
                    "(fold_norms: false, --no-fold-norms)"
                )
            _write(lin.bias, lin.bias.double() + lin.weight.double() @ bias)
        scale_input_columns(lin, gain)
    set_norm_gain(norm, torch.ones_like(gain), offset)
    if bias is not None:
        _write(norm.bias, torch.zeros_like(bias))
