import math

import pytest
import torch
from conftest import is_prime, old_paley

from lowbit import UserError, hadamard
from lowbit.hadamard import (
    _base_construction,
    _base_matrix,
    _legacy_construction,
    _paley1,
    _paley2,
    _primitive_powers,
    _quadratic_character,
    check_base,
    factor_order,
    hadamard_matrix,
    hadamard_transform,
    legacy_base,
    orthogonal_hadamard,
    random_signs,
    sylvester,
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
        5120,
        13824,
        27648,  # Qwen2.5 14B, 32B
        29568,  # Qwen2.5 72B (odd part 231: a Paley II base of order 924)
        2816,  # Qwen1.5-0.5B MLP
    }
)
DENSE_LIMIT = 4096
SMALL_ORDERS = list(range(4, 257, 4))  # every multiple of 4 up to 256 has a known Hadamard matrix


@pytest.mark.parametrize("n", [1, 2] + SMALL_ORDERS + [n for n in MODEL_ORDERS if n <= DENSE_LIMIT])
def test_dense_matrix_is_hadamard(n):
    H = hadamard_matrix(n, torch.float64)
    assert H.shape == (n, n) and torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", SMALL_ORDERS)
def test_every_base_up_to_256_is_hadamard_in_integers(n):
    b, p = factor_order(n)
    assert b * p == n and p & (p - 1) == 0
    B = _base_matrix(b)
    assert B.dtype == torch.int64 and torch.equal(B @ B.T, b * torch.eye(b, dtype=torch.int64))


def test_bases_are_the_smallest_and_the_stored_data_is_used_where_needed():
    assert factor_order(92) == (92, 1) and _base_construction(92) == "williamson"
    assert factor_order(184) == (92, 2)
    assert factor_order(188) == (188, 1) and _base_construction(188) == "turyn-type"
    assert factor_order(236) == (236, 1) and _base_construction(236) == "turyn-type"
    assert factor_order(11008) == (172, 64) and _base_construction(172) == "williamson"
    assert factor_order(52) == (52, 1) and _base_construction(52) == "paley2"  # GF(25)
    assert factor_order(244) == (244, 1) and _base_construction(244) == "paley1"  # GF(243)
    assert factor_order(224) == (28, 8) and _base_construction(28) == "paley2"  # GF(13), not GF(27): as before prime powers
    assert factor_order(100) == (100, 1) and _base_construction(100) == "paley2"  # GF(49)
    assert factor_order(29568) == (924, 32)  # 231 * 4 is past the stored orders: Paley II over GF(461)


@pytest.mark.parametrize("p, e", [(3, 1), (3, 2), (3, 3), (5, 2), (7, 2), (3, 5), (11, 2), (13, 2), (5, 3)])
def test_field_generator_lists_every_nonzero_element_once(p, e):
    powers = _primitive_powers(p, e)
    assert sorted(powers) == list(range(1, p**e))


@pytest.mark.parametrize("q", [3, 7, 11, 13, 17, 19, 43, 53, 139, 461, 5503])
def test_prime_field_character_is_the_squares(q):
    # saved models rebuild H from its order: prime-field matrices must stay as they were before prime powers
    squares = {x * x % q for x in range(1, q)}
    assert _quadratic_character(q, 1) == [0] + [1 if a in squares else -1 for a in range(1, q)]


@pytest.mark.parametrize("q", [9, 25, 27, 49, 81, 121, 125, 169, 243, 343])
def test_paley_over_prime_power_fields(q):
    H = _paley1(q) if q % 4 == 3 else _paley2(q)
    n = H.shape[0]
    assert n == (q + 1 if q % 4 == 3 else 2 * (q + 1))
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64))


def test_a_wrong_stored_row_is_caught(monkeypatch):
    a, b, c, d = hadamard._WILLIAMSON[23]
    wrong = list(b)
    for i in (3, len(wrong) - 3):  # flip a symmetric pair: still a symmetric circulant, no longer Williamson
        wrong[i] = "-" if wrong[i] == "+" else "+"
    monkeypatch.setitem(hadamard._WILLIAMSON, 23, (a, "".join(wrong), c, d))
    _base_matrix.cache_clear()
    try:
        with pytest.raises(AssertionError, match="williamson construction of order 92"):
            _base_matrix(92)
    finally:
        _base_matrix.cache_clear()


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


@pytest.mark.parametrize("n", SMALL_ORDERS + [576, 1536, 2048, 2816])
def test_fast_transform_equals_dense(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    H = hadamard_matrix(n, torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ H / math.sqrt(n), atol=1e-12)
    signs = random_signs(n, seed=3)
    assert torch.allclose(hadamard_transform(x, signs), x @ orthogonal_hadamard(n, signs), atol=1e-12)


def dense_rows(n: int, rows: list[int]) -> torch.Tensor:
    """Rows of H_n = H_{2^k} (x) H_b without building the n x n matrix: row i is S[i // b] (x) B[i % b]."""
    b, p = factor_order(n)
    S, B = sylvester(p), _base_matrix(b)
    return torch.stack([torch.kron(S[i // b], B[i % b]) for i in rows]).double()


@pytest.mark.parametrize("n", MODEL_ORDERS)
def test_fast_transform_large_order_against_dense_rows(n):
    b, _ = factor_order(n)
    rows = sorted({0, 1, b - 1, b % n, n // 2, n - 1})
    if n <= 1024:  # the helper agrees with the dense matrix
        assert torch.equal(dense_rows(n, rows), hadamard_matrix(n, torch.float64)[rows])
    eye = torch.zeros(len(rows), n, dtype=torch.float64)
    eye[torch.arange(len(rows)), rows] = 1
    assert torch.allclose(hadamard_transform(eye), dense_rows(n, rows) / math.sqrt(n), atol=1e-12)


def test_random_signs_are_seeded():
    assert torch.equal(random_signs(64, 1), random_signs(64, 1))
    assert not torch.equal(random_signs(64, 1), random_signs(64, 2))
    assert set(random_signs(64, 1).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize(
    "n, why",
    [
        (6, "multiples of 4"),
        (10, "multiples of 4"),
        (258, "multiples of 4"),
        (668, "none of the orders"),
        (1336, "none of the orders"),
        (0, "positive"),
    ],
)
def test_impossible_orders_say_why(n, why):
    with pytest.raises(UserError, match=why):
        hadamard_matrix(n)


# ---------------------------------------------------------------- base orders of saved models


def _old_base(n: int) -> int | None:
    """The base lowbit chose before prime powers, Williamson and Goethals-Seidel: 1 for a power of
    two, else the smallest n / 2^j that is a prime-field Paley I / II order (None: none, refused)."""
    if n & (n - 1) == 0:
        return 1
    b = n // (n & -n) * 4
    while b <= n and not (is_prime(b - 1) and b % 4 == 0 or is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1):
        b *= 2
    return b if b <= n else None


def test_legacy_base_is_the_old_choice():
    for n in range(4, 8193, 4):
        if _old_base(n) is None:  # refused then (52, 92, ...): no saved model has a rotation of that order
            with pytest.raises(UserError, match="before format version 5"):
                legacy_base(n)
        else:
            assert legacy_base(n) == _old_base(n), n
    # orders whose smallest base changed: the model of tests/data/format_v3_hadamard, Llama-2's MLP
    assert [(n, legacy_base(n), factor_order(n)[0]) for n in (104, 208, 11008)] == [(104, 104, 52), (208, 104, 52), (11008, 5504, 172)]


@pytest.mark.parametrize("b", [b for b in range(4, 520, 4) if _legacy_construction(b)])
def test_every_legacy_base_still_builds_its_old_matrix(b):
    # saved models without recorded bases (format <= 4) rotate with these: they must not change
    assert torch.equal(_base_matrix(b), old_paley(b))


def test_the_newer_bases_up_to_256_are_pinned():
    # saved models record only a base order: its matrix must stay the one it was saved with
    import hashlib

    bases = [b for b in range(2, 257) if _base_construction(b) and not _legacy_construction(b)]
    assert bases == [52, 92, 100, 116, 156, 172, 188, 236, 244]
    digest = hashlib.sha256()
    for b in bases:
        digest.update(str(b).encode())
        digest.update(_base_matrix(b).to(torch.int8).numpy().tobytes())
    assert digest.hexdigest() == "2bb85c72f3185ba3ad872bba2265c3908124fbab487c6508f28570602e056e5d"


@pytest.mark.parametrize("n, base", [(104, 104), (104, 52), (208, 104), (208, 52), (64, 1), (16, 8)])
def test_a_chosen_base_builds_that_kronecker_product(n, base):
    H = hadamard_matrix(n, torch.float64, base=base)
    assert torch.equal(H, torch.kron(sylvester(n // base), _base_matrix(base)).double())
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n + base))
    signs = random_signs(n, 1).double()
    assert torch.allclose(hadamard_transform(x, signs, base=base), x @ orthogonal_hadamard(n, signs, base=base), atol=1e-12)
    # block-diagonal: the base is that of each block
    blocks = hadamard_transform(x, block=n // 2, base=base // 2) if base % 8 == 0 else None
    if blocks is not None:
        R = orthogonal_hadamard(n // 2, base=base // 2)
        assert torch.allclose(blocks, (x.view(3, 2, n // 2) @ R).view(3, n), atol=1e-12)


@pytest.mark.parametrize("n, base", [(104, 26), (104, 13), (208, 208 * 2), (1336, 668), (104, 0), (104, True)])
def test_a_base_that_cannot_build_the_order_is_refused(n, base):
    with pytest.raises(UserError, match="base order"):
        check_base(n, base)
