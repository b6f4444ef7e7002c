"""GPTAQ (asymmetric GPTQ, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration"): the blocked implementation against an explicit greedy re-solve of its objective
||W X~ - Q X||^2, its objective against GPTQ's, GPTQ itself when the two streams agree, and the
pipeline and recipe knob end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quantize_args, run_cli, tiny_model
from test_moe import tiny_moe

import lowbit
from lowbit import UserError
from lowbit.algorithms.gptq import GPTQ, GPTQConfig
from lowbit.quant.fake import QParams, as_rows, compute_qparams, fake_rows
from lowbit.recipes import load_recipe
from lowbit.scheme import Granularity, parse_scheme


def stream_inputs(n=1500, d=64, drift=0.3, seed=0):
    """(x_fp, x): correlated inputs with a few large channels, and the same tokens after an
    upstream quantization error: x = x_fp + a perturbation that is partly a fixed linear map of
    x_fp (systematic, which a weight can correct) and partly noise."""
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.2
    x_fp[:, :4] *= 8
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = x_fp + drift * (x_fp @ mix + torch.randn(n, d, generator=g) * x_fp.std())
    return x_fp, x


def statistics(x_fp, x, asymmetric=True, batches=3):
    stats = GPTQ(x.shape[1], asymmetric=asymmetric)
    for a, b in zip(x_fp.chunk(batches), x.chunk(batches)):  # several batches: sums, not one product
        stats.add_batch(b, a if asymmetric else None)
    return stats


def direct_gptaq(weight, x_fp, x, args, damp=0.01, order=None, alpha=1.0):
    """The greedy minimisation of f(Q) = ||W (X + alpha dX) - Q X||^2 + lambda ||W - Q||^2 (GPTQ's
    damping as a ridge term) in float64, one column at a time in `order`: before rounding each
    column, the columns not yet rounded are re-solved from scratch as the least-squares optimum
    given the ones already rounded. Scales: per channel (or static groups with an order) from the
    unconstrained optimum, dynamic groups from the current optimum when a group starts."""
    X, Xt = x.double().T, x_fp.double().T  # [in, tokens]
    W = weight.double()
    n = x.shape[0]
    H = 2 * X @ X.T / n
    lam = damp * H.diag().mean()
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype)  # the quadratic term of f (on GPTQ's 2/n scale)
    target = W @ (X + alpha * (Xt - X))
    b = 2 * target @ X.T / n + lam * W  # the linear term: f = Q A Q^T - 2 Q b^T + const
    cols = W.shape[1]
    order = list(range(cols)) if order is None else order
    group = args.group_size if args.granularity is Granularity.GROUP else None
    optimum = torch.linalg.solve(A, b.T).T
    fixed, static = None, None
    if group is None:
        fixed = compute_qparams(as_rows(optimum.float(), args), args)
        fixed = QParams(fixed.scale.expand(W.shape[0], 1), fixed.zero.expand(W.shape[0], 1))
    elif order != list(range(cols)):
        static = [compute_qparams(optimum[:, g : g + group].float(), args) for g in range(0, cols, group)]
    Q = torch.zeros_like(W)
    done: list[int] = []
    qp = fixed
    for step, j in enumerate(order):
        rest = order[step:]
        v = torch.linalg.solve(A[rest][:, rest], (b[:, rest] - Q[:, done] @ A[done][:, rest]).T).T if done else optimum[:, rest]
        current = torch.zeros_like(W)
        current[:, rest] = v
        if static is not None:
            qp = static[j // group]
        elif group is not None and step % group == 0:
            qp = compute_qparams(current[:, j : j + group].float(), args)
        Q[:, j : j + 1] = fake_rows(current[:, j : j + 1].float(), qp, args).double()
        done.append(j)
    return Q.float()


def objective(weight, q, x_fp, x):
    """||W X~ - Q X||^2 (tokens as rows)."""
    return ((x_fp.double() @ weight.double().T - x.double() @ q.double().T) ** 2).sum().item()


SETTINGS = ["W4A16", "W3aA16", "W4g16A16", "W3g16aA16", "W4tA16"]


@pytest.mark.parametrize("scheme", SETTINGS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_gptaq_equals_the_direct_greedy_solution(scheme, act_order, alpha):
    args = parse_scheme(scheme).weights
    x_fp, x = stream_inputs()
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    stats = statistics(x_fp, x)
    order = torch.argsort(torch.diag(stats.hessian), descending=True).tolist() if act_order else None
    config = GPTQConfig(block_size=16, act_order=act_order, asymmetric=True, asymmetric_alpha=alpha)
    fast = stats.quantize(weight, args, config).dequantize()
    slow = direct_gptaq(weight, x_fp, x, args, order=order, alpha=alpha)
    # float32 blocked updates vs float64 re-solves: every weight on the same grid point here
    # (a value within ~1e-6 of a rounding boundary could tie differently; none does)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert objective(weight, fast, x_fp, x) == pytest.approx(objective(weight, slow, x_fp, x), rel=1e-6)


@pytest.mark.parametrize("scheme", ["W4A16", "W3A16", "W4g16A16", "W2g16A16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptaq_lowers_its_objective_below_gptq(scheme, seed):
    """On the same two streams, GPTAQ's ||W X~ - Q X||^2 is below GPTQ's (which fits W X instead)."""
    args = parse_scheme(scheme).weights
    x_fp, x = stream_inputs(seed=seed)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed + 10))
    for act_order in (False, True):
        plain = statistics(x_fp, x, asymmetric=False).quantize(weight, args, GPTQConfig(act_order=act_order)).dequantize()
        asym = statistics(x_fp, x).quantize(weight, args, GPTQConfig(act_order=act_order, asymmetric=True)).dequantize()
        assert objective(weight, asym, x_fp, x) < 0.9 * objective(weight, plain, x_fp, x)


@pytest.mark.parametrize("scheme", ["W4A16", "W4g16aA16", "W4tA16"])
@pytest.mark.parametrize("act_order", [False, True])
def test_equal_streams_give_gptq_exactly(scheme, act_order):
    """X~ == X: dX X^T is exactly zero and GPTAQ returns GPTQ's codes and scales, bit for bit."""
    args = parse_scheme(scheme).weights
    _, x = stream_inputs()
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    plain = statistics(x, x, asymmetric=False).quantize(weight, args, GPTQConfig(act_order=act_order))
    asym = statistics(x, x).quantize(weight, args, GPTQConfig(act_order=act_order, asymmetric=True))
    assert torch.equal(plain.codes, asym.codes) and torch.equal(plain.scale, asym.scale)


def test_token_clip_weighs_both_streams_alike():
    """With token_clip, a clipped token enters dX X^T with the factor it enters X X^T with."""
    x_fp, x = stream_inputs(n=300)
    x[7] *= 50  # one massive token
    clipped = GPTQ(64, token_clip=3.0, asymmetric=True)
    clipped.add_batch(x, x_fp)
    norms = x.norm(dim=1, keepdim=True)
    factor = torch.clamp(3.0 * norms.median() / norms, max=1.0)
    manual = GPTQ(64, asymmetric=True)
    manual.add_batch(x * factor, x_fp * factor)
    assert torch.allclose(clipped.hessian, manual.hessian, rtol=1e-5, atol=1e-5)
    assert torch.allclose(clipped.cross(), manual.cross(), rtol=1e-5, atol=1e-5)


def test_gptaq_settings_are_checked():
    with pytest.raises(UserError, match="asymmetric_alpha"):
        GPTQConfig(asymmetric=True, asymmetric_alpha=0.0).check()
    with pytest.raises(UserError, match="asymmetric_alpha"):
        GPTQConfig(asymmetric=True, asymmetric_alpha=1.5).check()
    stats = GPTQ(8, asymmetric=True)
    with pytest.raises(RuntimeError, match="full-precision inputs"):
        stats.add_batch(torch.randn(4, 8))
    stats.add_batch(torch.randn(16, 8), torch.randn(16, 8))
    with pytest.raises(RuntimeError, match="disagree"):
        stats.quantize(torch.randn(2, 8), parse_scheme("W4A16").weights, GPTQConfig())


# ---------------------------------------------------------------- the pipeline, recipes and CLI


def _calibration(n=48, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_runs():
    """A tiny Llama at W3 quantized by GPTQ and by GPTAQ on the same calibration, and the FP logits
    of the calibration tokens."""
    calib = _calibration()
    ids = torch.cat(calib[:8])
    with torch.no_grad():
        fp = tiny_model("llama")(ids).logits
    runs = {}
    for asymmetric in (False, True):
        model = lowbit.quantize(tiny_model("llama"), "W3A16", algorithm=GPTQConfig(asymmetric=asymmetric), calibration=calib, progress=False)
        with torch.no_grad():
            runs[asymmetric] = (model, model(ids).logits)
    return fp, runs


def _weight(model, name):
    return model.get_submodule(name).quantized_weight.dequantize()


def test_the_pipeline_feeds_gptaq_both_streams(tiny_runs):
    """Layer 0's q/k/v read the embeddings in both streams (dX = 0): GPTQ's codes exactly; every
    later group sees a quantized stream that drifted, and the whole model's outputs on the
    calibration tokens come closer to the full-precision model's than GPTQ's do."""
    fp, runs = tiny_runs
    (plain, plain_logits), (asym, asym_logits) = runs[False], runs[True]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert torch.equal(_weight(plain, name), _weight(asym, name))
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert not torch.equal(_weight(plain, name), _weight(asym, name))
    plain_error, asym_error = ((plain_logits - fp) ** 2).mean().item(), ((asym_logits - fp) ** 2).mean().item()
    assert asym_error < 0.9 * plain_error, (asym_error, plain_error)


def test_recipe_knobs_parse(tmp_path):
    path = tmp_path / "gptaq.yaml"
    path.write_text("scheme: W4A16\nalgorithm: gptq\nasymmetric: true\nasymmetric_alpha: 0.5\n")
    recipe = load_recipe(str(path))
    assert recipe.algorithm == "gptq" and recipe.algorithm_config.asymmetric and recipe.algorithm_config.asymmetric_alpha == 0.5
    path.write_text("scheme: W4A16\nalgorithm: gptq\nasymmetric: maybe\n")
    with pytest.raises(UserError, match="asymmetric must be true/false"):
        load_recipe(str(path))


def test_gptaq_from_the_cli(tiny_model_dir, sample_text_file, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])
    out = tmp_path / "run"
    extra = ["--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "16", "--out", str(out)]
    args = quantize_args(tiny_model_dir, sample_text_file, *extra, "--algorithm", "gptq", "--scheme", "W4A16", "--set", "asymmetric=true")
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["algorithm"] == "gptq" and report["algorithm_args"]["asymmetric"] is True
    assert len(report["layer_errors"]) == 2


def test_mixture_of_experts_is_refused_in_one_line():
    with pytest.raises(UserError, match="does not support mixture-of-experts"):
        lowbit.quantize(tiny_moe("mixtral"), "W4A16", algorithm=GPTQConfig(asymmetric=True), calibration=_calibration(4), progress=False)
