"""GPTQ against a direct implementation of the same update, its error against RTN's, and its errors."""

import logging

import pytest
import torch

from lowbit import UserError
from lowbit.algorithms.gptq import GPTQ, GPTQConfig, gptq_quantize, output_error
from lowbit.algorithms.rtn import rtn_weight
from lowbit.quant.fake import QParams, as_rows, compute_qparams, fake_rows
from lowbit.scheme import Granularity, parse_scheme


def layer_inputs(n=2048, d=128, seed=0):
    """Correlated inputs with a few large channels, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.2
    x[:, :4] *= 8
    return x


def hessian_of(x):
    h = GPTQ(x.shape[1])
    for part in x.split(500):  # several batches: the running mean must equal the one-shot one
        h.add_batch(part)
    return h


def direct_gptq(weight, hessian, args, damp=0.01, order=None):
    """Algorithm 1 of the paper without its optimisations: one column at a time, the full inverse
    Hessian of the remaining columns updated by Gaussian elimination after each step, scales of a
    group taken from the updated weights when the group starts (or fixed up front)."""
    W = weight.double().clone()
    H = hessian.double().clone()
    H += damp * H.diag().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    cols = W.shape[1]
    order = list(range(cols)) if order is None else order
    group = args.group_size if args.granularity is Granularity.GROUP else None
    fixed = None
    if group is None:
        fixed = compute_qparams(as_rows(W.float(), args), args)  # one row per channel, or one for the tensor
        fixed = QParams(fixed.scale.expand(W.shape[0], 1), fixed.zero.expand(W.shape[0], 1))
    static = None
    if group is not None and order != list(range(cols)):
        static = [compute_qparams(W[:, g : g + group].float(), args) for g in range(0, cols, group)]
    W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    qp = fixed
    for j in range(cols):
        if static is not None:
            qp = static[order[j] // group]
        elif group is not None and j % group == 0:
            qp = compute_qparams(W[:, j : j + group].float(), args)
        q = fake_rows(W[:, j : j + 1].float(), qp, args).double()
        Q[:, j : j + 1] = q
        err = (W[:, j : j + 1] - q) / Hinv[j, j]
        W[:, j:] -= err @ Hinv[j : j + 1, j:]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    inverse = torch.argsort(torch.tensor(order))
    return Q[:, inverse].float()


SETTINGS = ["W4A16", "W3A16", "W4aA16", "W4g32A16", "W3g32aA16", "W4tA16", "W4mA16"]


@pytest.mark.parametrize("scheme", SETTINGS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_direct_update(scheme, act_order):
    args = parse_scheme(scheme).weights
    x = layer_inputs()
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    h = hessian_of(x)
    fast = h.quantize(weight, args, GPTQConfig(block_size=32, act_order=act_order)).dequantize()
    order = torch.argsort(torch.diag(h.hessian), descending=True).tolist() if act_order else None
    slow = direct_gptq(weight, h.hessian, args, order=order)
    # float32 blocked updates vs float64 elimination: the same grid points except a rare tie
    assert torch.isclose(fast, slow, atol=1e-4).float().mean() > 0.99
    assert output_error(weight, fast, h.hessian) == pytest.approx(output_error(weight, slow, h.hessian), rel=2e-2)


def test_hessian_running_mean():
    x = layer_inputs(n=1000)
    assert torch.allclose(hessian_of(x).hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", SETTINGS + ["W2A16", "W8A16", "W2g16A16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_output_error_never_worse_than_rtn(scheme, seed):
    args = parse_scheme(scheme).weights
    x = layer_inputs(seed=seed)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed + 10))
    h = hessian_of(x)
    for act_order in (False, True):
        q = h.quantize(weight, args, GPTQConfig(act_order=act_order)).dequantize()
        assert output_error(weight, q, h.hessian) <= output_error(weight, rtn_weight(weight, args).dequantize(), h.hessian)


@pytest.mark.parametrize("scheme,act_order", [("W4A16", False), ("W3aA16", False), ("W4g32A16", True)])
def test_gptq_weights_lie_on_the_grid_of_the_original_scales(scheme, act_order):
    """Per-channel scales (and static group scales) come from the weights before any update, so
    every GPTQ weight is an integer multiple of its row's step, within the code range."""
    args = parse_scheme(scheme).weights
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    q = hessian_of(layer_inputs()).quantize(weight, args, GPTQConfig(act_order=act_order)).dequantize()
    qp = compute_qparams(as_rows(weight, args), args)
    codes = (as_rows(q, args) - qp.zero) / qp.scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= args.qmin and codes.round().max() <= args.qmax


def test_dead_inputs_are_zeroed_and_do_not_break_cholesky():
    x = layer_inputs()
    x[:, 5] = 0
    weight = torch.randn(8, 128)
    q = hessian_of(x).quantize(weight, parse_scheme("W4A16").weights).dequantize()
    assert torch.all(q[:, 5] == 0) and torch.isfinite(q).all()


def test_non_positive_definite_hessian_recovers_with_more_damping(caplog):
    x = layer_inputs()
    h = hessian_of(x)
    h.hessian -= 0.05 * torch.diag(h.hessian).mean() * torch.eye(128)  # an eigenvalue below zero
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        q = h.quantize(torch.randn(8, 128), parse_scheme("W4A16").weights).dequantize()
    assert torch.isfinite(q).all()
    assert "not positive definite" in caplog.text and "succeeded with damping" in caplog.text


def test_hopeless_hessian_is_a_clear_error():
    h = GPTQ(16)
    h.add_batch(torch.randn(32, 16))
    # diagonal 1, off-diagonal -1000: the eigenvalue along ones(16) is -14999, beyond any damping
    h.hessian = 1001 * torch.eye(16) - 1000 * torch.ones(16, 16)
    with pytest.raises(UserError, match="not positive definite even with damping"):
        h.quantize(torch.randn(4, 16), parse_scheme("W4A16").weights)


def test_act_order_with_dynamic_groups_is_refused():
    args = parse_scheme("W4g32A16").weights
    with pytest.raises(UserError, match="act-order with dynamic groups"):
        GPTQConfig(act_order=True, static_groups=False).check(args)
    GPTQConfig(act_order=True, static_groups=False).check(parse_scheme("W4A16").weights)  # per-channel: fine


@pytest.mark.parametrize("kwargs,match", [({"damp": 0}, "damping"), ({"damp": 1.5}, "damping"), ({"block_size": 0}, "block size")])
def test_bad_gptq_settings(kwargs, match):
    with pytest.raises(UserError, match=match):
        GPTQConfig(**kwargs).check()


def test_quantize_before_any_batch_is_an_error():
    with pytest.raises(RuntimeError, match="before any add_batch"):
        GPTQ(8).quantize(torch.randn(2, 8), parse_scheme("W4A16").weights)


def test_functional_form_matches_the_class():
    x = layer_inputs()
    h = hessian_of(x)
    weight = torch.randn(8, 128)
    args = parse_scheme("W4A16").weights
    a, b = h.quantize(weight, args), gptq_quantize(weight, h.hessian, args)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
