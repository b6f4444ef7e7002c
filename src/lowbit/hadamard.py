"""Hadamard matrices of every order a model needs, and a fast transform.

An order n > 2 must be a multiple of 4. We write n = b * 2^k with a base order b that a known
construction reaches, and take H_n = H_{2^k} (Sylvester) (x) H_b (Kronecker product):

- Sylvester: H_{2m} = [[H_m, H_m], [H_m, -H_m]] for powers of two;
- Paley I: order q + 1 for a prime q = 3 (mod 4), from the quadratic character of GF(q);
- Paley II: order 2(q + 1) for a prime q = 1 (mod 4).

Among the reachable bases the smallest is used, so the dense part of the fast transform stays
small (576 = 2^4 x 36, 1536 = 2^7 x 12, 11008 = 2 x 5504, 14336 = 2^9 x 28). Prime fields cover
every order of the models we target; an order none of them reaches fails with the reason.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch

from .errors import UserError


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _quadratic_character(q: int) -> list[int]:
    """chi(a) for a in GF(q), q an odd prime: 0, +1 (square) or -1."""
    chi = [-1] * q
    chi[0] = 0
    for x in range(1, q):
        chi[x * x % q] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    chi = torch.tensor(_quadratic_character(q), dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime, q = 3 mod 4."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime, q = 1 mod 4."""
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    plus = torch.tensor([[1, 1], [1, -1]])
    minus = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int64), minus)


def _base_construction(b: int) -> str | None:
    """How order b (not a power of two) can be built, if it can."""
    if _is_prime(b - 1) and (b - 1) % 4 == 3:
        return "paley1"
    if b % 2 == 0 and _is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@cache
def factor_order(n: int) -> tuple[int, int]:
    """(base, power of two) with n = base * 2^k and base = 1 or a Paley order; the smallest base."""
    if not isinstance(n, int) or n < 1:
        raise UserError(f"a Hadamard matrix needs a positive integer order; got {n!r}")
    if _is_power_of_two(n):
        return 1, n
    if n % 4:
        raise UserError(f"no Hadamard matrix of order {n}: orders above 2 must be multiples of 4")
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    # try bases b = odd * 4, odd * 8, ... (smallest first)
    odd = n // power
    b = odd * 4
    while b <= n:
        if _base_construction(b):
            return b, n // b
        b *= 2
    raise UserError(
        f"no Hadamard matrix of order {n} = {odd} x 2^{int(math.log2(power))} is available: none of the orders "
        f"{odd}*2^j (j >= 2) is reachable by Paley I/II over a prime field; choose a size with another factorisation"
    )


@lru_cache(maxsize=16)
def _base_matrix(b: int) -> torch.Tensor:
    if b == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    kind = _base_construction(b)
    return _paley1(b - 1) if kind == "paley1" else _paley2(b // 2 - 1)


@lru_cache(maxsize=16)
def _base_matrix_as(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _base_matrix(b).to(device=device, dtype=dtype)  # cached: online rotations call this on every forward


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n x n matrix of +-1 with H @ H.T = n I (not normalised)."""
    b, p = factor_order(n)
    return torch.kron(sylvester(p), _base_matrix(b)).to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


def check_block(n: int, block: int | None) -> None:
    """A block-diagonal rotation of size `block` must tile `n` and have a Hadamard matrix."""
    if block is None:
        return
    if block < 1 or n % block:
        raise UserError(f"a block Hadamard of size {block} does not divide dimension {n}; choose a divisor of {n} (16 or 32 for NVFP4 / MX)")
    factor_order(block)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """x @ diag(signs) @ H_n / sqrt(n) along the last dimension, in O(n log n) on the power-of-two part.
    With `block`, H is block-diagonal: H_block on each run of `block` consecutive channels (the
    blocks of a microscaling format, so each block's outliers spread over that block only).

    With H_n = H_{2^k} (x) H_b, x viewed as [..., 2^k, b] is multiplied by H_b on the last axis
    and transformed with the butterfly on the 2^k axis."""
    n = x.shape[-1]
    if signs is not None:
        x = x * signs.to(device=x.device, dtype=x.dtype)
    if block is not None and block != n:
        check_block(n, block)
        return hadamard_transform(x.reshape(*x.shape[:-1], n // block, block)).reshape(x.shape)
    b, p = factor_order(n)
    shape = x.shape
    y = x.reshape(-1, p, b)
    if b > 1:
        y = y @ _base_matrix_as(b, x.dtype, x.device)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h, b)
        a, c = y[:, :, 0], y[:, :, 1]
        y = torch.stack([a + c, a - c], dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(n)).to(x.dtype)


def orthogonal_hadamard(n: int, signs: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense orthogonal matrix R = diag(signs) H / sqrt(n), so that x @ R = hadamard_transform(x, signs)."""
    R = hadamard_matrix(n, dtype) / math.sqrt(n)
    if signs is not None:
        R = signs.to(dtype)[:, None] * R
    return R
