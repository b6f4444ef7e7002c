import math

import pytest
import torch

from lowbit import UserError
from lowbit.hadamard import (
    _base_matrix,
    factor_order,
    hadamard_matrix,
    hadamard_transform,
    orthogonal_hadamard,
    random_signs,
)

# hidden, MLP and head sizes of SmolLM2, LLaMA-2-7B, LLaMA-3-8B / Mistral-7B, Qwen2.5 0.5B-7B, Gemma 3 270M-4B
MODEL_ORDERS = sorted(
    {
        576,
        1536,
        64,  # SmolLM2-135M
        4096,
        11008,
        128,  # LLaMA-2-7B
        14336,  # LLaMA-3-8B, Mistral-7B
        896,
        4864,
        8960,
        2048,
        3584,
        18944,  # Qwen2.5 0.5B, 1.5B, 3B (11008), 7B
        640,
        1152,
        6912,
        2560,
        10240,
        256,  # Gemma 3 270M, 1B, 4B
    }
)
DENSE_LIMIT = 4096


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 44, 60, 76, 108] + [n for n in MODEL_ORDERS if n <= DENSE_LIMIT])
def test_dense_matrix_is_hadamard(n):
    H = hadamard_matrix(n, torch.float64)
    assert H.shape == (n, n) and torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", MODEL_ORDERS)
def test_every_model_order_is_reachable_and_orthogonal(n):
    b, p = factor_order(n)
    assert b * p == n and p & (p - 1) == 0
    B = _base_matrix(b).double()
    assert torch.equal(B @ B.T, b * torch.eye(b, dtype=torch.float64))
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g, dtype=torch.float64)
    y = hadamard_transform(x)
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-9 * n)  # inner products preserved: orthogonal


@pytest.mark.parametrize("n", [12, 64, 576, 1536, 2048])
def test_fast_transform_equals_dense(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    H = hadamard_matrix(n, torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ H / math.sqrt(n), atol=1e-12)
    signs = random_signs(n, seed=3)
    assert torch.allclose(hadamard_transform(x, signs), x @ orthogonal_hadamard(n, signs), atol=1e-12)


def test_fast_transform_large_order_against_dense_rows():
    n = 11008
    rows = torch.tensor([0, 1, 5503, 5504, 11007])
    H_rows = hadamard_matrix(n)[rows].double()
    eye = torch.zeros(len(rows), n, dtype=torch.float64)
    eye[torch.arange(len(rows)), rows] = 1
    assert torch.allclose(hadamard_transform(eye), H_rows / math.sqrt(n), atol=1e-12)


def test_random_signs_are_seeded():
    assert torch.equal(random_signs(64, 1), random_signs(64, 1))
    assert not torch.equal(random_signs(64, 1), random_signs(64, 2))
    assert set(random_signs(64, 1).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("n, why", [(6, "multiples of 4"), (10, "multiples of 4"), (172, "not reachable|none of the orders"), (0, "positive")])
def test_impossible_orders_say_why(n, why):
    with pytest.raises(UserError, match=why):
        hadamard_matrix(n)
