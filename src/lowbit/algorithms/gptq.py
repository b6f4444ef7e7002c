"""GPTQ (Frantar et al., 2022): quantize weight columns one by one, each time updating the
columns not yet quantized to compensate the error, using the inverse Hessian of the layer's
squared output error, H = 2/n sum x x^T over the calibration inputs.

This is the paper's algorithm 1: Cholesky factor of H^-1, lazy batched updates in blocks of
columns, optional act-order (columns by decreasing H_jj) and group quantization. With act-order,
groups keep their contiguous columns in the original order, with scales computed before any
update ("static groups"), so the result stores like any group-quantized weight.

With `asymmetric=True` it is GPTAQ ("GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration", formerly GPTQv2): the quantized layer fits the full-precision model's outputs W X~
(X~: the layer's inputs in the full-precision model) from the quantized model's inputs X, that is
it minimises ||W X~ - Q X||^2 instead of ||W X - Q X||^2, so each layer also undoes the error the
layers before it left in its inputs. With dX = X~ - X and the damped H = X X^T + lambda I, the
objective (ridge term lambda ||W - Q||^2 as in GPTQ) is (Q - W') H (Q - W')^T + const with
W' = W + W (dX X^T) H^-1, the unconstrained optimum: GPTAQ is GPTQ run on W' with the same H. W'
costs one [in, in] statistic beside the Hessian (the sum of dX X^T, the paper's dXX^T) and two
products with GPTQ's own Cholesky factor U of H^-1 = U^T U. So every column is rounded from the
weights that are greedily optimal for the asymmetric objective given the columns before it (the
test checks this against an explicit re-solve per column). The paper's released code folds the
correction into the column loop instead (P = triu(dXX^T U^T, 1) U, applied from each column's
weight as it is reached, scaled by alpha = 0.25): a different recursion, which leaves each column's
own asymmetry to the columns after it and never moves the first ones; in one check on random
problems (32 inputs, drifted streams) it lowered the objective 3% below GPTQ's, this form 20%.
The errors reported per group stay GPTQ's (||(W - Q) X|| relative to ||W X||, on the quantized
stream), so with `asymmetric` they measure the fit to the quantized inputs GPTAQ trades away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed import all_reduce_, reduce_count
from ..errors import UserError
from ..quant.fake import (
    QParams,
    as_rows,
    compute_qparams,
    dequantize_rows,
    quantize_rows,
)
from ..quant.qweight import QuantizedWeight, quantize_weight
from ..scheme import Granularity, QuantArgs
from .objective import output_energy, output_error, token_weights
from .registry import AlgorithmResult, GroupContext, register_algorithm

log = logging.getLogger("lowbit")

MAX_DAMP_RETRIES = 6  # damping x10 each time: 1% of the mean diagonal -> at most 1e4 x that


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    # Columns in order of decreasing H_jj (on by default, as in llm-compressor and GPTQModel: the
    # columns with the largest inputs are quantized first, while the most columns can compensate).
    act_order: bool = True
    static_groups: bool = True  # with act_order: group scales from the weights before updates
    # Optional: tokens whose input norm exceeds token_clip x the batch median enter the Hessian
    # scaled down to that norm, so a few massive-activation tokens ("Turning LLM Activations Quantization-Friendly") cannot own it.
    # None (default): the paper's plain Hessian.
    token_clip: float | None = None
    # GPTAQ (module docstring): fit the full-precision model's outputs from the quantized model's
    # inputs; the pipeline then also runs the full-precision layers beside the quantized ones
    asymmetric: bool = False
    # scales the asymmetric correction: the target is W (X + alpha dX); 1 is the exact objective,
    # smaller values shrink toward GPTQ (0). 0.25 is what GPTAQ's reference implementation applies
    # (as GPTQModel's GPTAQConfig documents it); lowbit's W4A4KV4 row with 1 was far worse than GPTQ
    # (58.1 vs 38.5, benchmarks/compare row w4a4kv4-online-gptaq-a1)
    asymmetric_alpha: float = 0.25

    def check(self, args: QuantArgs | None = None) -> None:
        if self.block_size < 1:
            raise UserError(f"GPTQ block size must be at least 1; got {self.block_size}")
        if self.token_clip is not None and self.token_clip <= 0:
            raise UserError(f"GPTQ token_clip must be positive (or None for the plain Hessian); got {self.token_clip}")
        if not 0.0 < self.asymmetric_alpha <= 1.0:
            raise UserError(f"GPTQ asymmetric_alpha must be in (0, 1] (the share of the asymmetric correction); got {self.asymmetric_alpha}")
        if not 0.0 < self.damp < 1.0:
            raise UserError(f"GPTQ damping must be in (0, 1) (a fraction of the mean Hessian diagonal); got {self.damp}")
        if args is not None and self.act_order and args.granularity is Granularity.GROUP and not self.static_groups:
            raise UserError(
                "act-order with dynamic groups would give each group columns scattered over the input, "
                "which the packed group format cannot store; use static groups (the default) or drop act-order"
            )
        if args is not None and args.granularity is Granularity.TOKEN:
            raise UserError("per-token granularity is for activations; weights are per-channel, per-group or per-tensor")


class GPTQ:
    """Accumulates the Hessian of one input shared by one or more linears, then quantizes them."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", token_clip: float | None = None, asymmetric: bool = False) -> None:
        self.columns = columns
        # sum x x^T in float64 over fp32 batch products: the sum no longer depends on how the
        # batches are grouped (one process or several, `reduce`) beyond float64 rounding, which
        # the fp32 Hessian does not see; a fp32 running mean differed in its last bits, enough to
        # move GPTQ's codes on an ill-conditioned Hessian. Only its upper triangle (diagonal
        # included) is summed, ~0.6x the products; the lower one is filled in when it is read.
        self._sum: torch.Tensor | None = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self._hessian: torch.Tensor | None = None
        self.samples = 0
        self.token_clip = token_clip
        # GPTAQ: the sum of (x~ - x) x^T, x~ the full-precision model's input for the same token;
        # `fp_inputs` tells the pipeline to feed add_batch both inputs
        self.fp_inputs = asymmetric
        self._cross_sum: torch.Tensor | None = torch.zeros(columns, columns, dtype=torch.float64, device=device) if asymmetric else None

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n sum x x^T in fp32, made from the sum once, which it replaces (GPTQ's peak
        memory is the quantizing, not the summing); setting it replaces the sum too."""
        if self._hessian is None:  # scaled in place: a second float64 matrix would be the peak
            _mirror_upper(self._sum)
            self._hessian = self._sum.mul_(2 / max(self.samples, 1)).float()
            self._sum = None
        return self._hessian

    @hessian.setter
    def hessian(self, value: torch.Tensor) -> None:
        self._hessian, self._sum = value, None

    @hessian.deleter
    def hessian(self) -> None:  # quantizing is done
        self._hessian = self._sum = self._cross_sum = None

    def cross(self) -> torch.Tensor | None:
        """GPTAQ's dX X^T = 2/n sum (x~ - x) x^T in fp32, on the Hessian's scale (None without
        `asymmetric`); made from the sum, which it replaces (read it once, to quantize)."""
        if self._cross_sum is None:
            return None
        cross = self._cross_sum.mul_(2 / max(self.samples, 1)).float()
        self._cross_sum = None
        return cross

    def _summed(self) -> torch.Tensor:
        if self._sum is None:  # more batches after the Hessian was read: back to a sum
            self._sum = self._hessian.double() * (max(self.samples, 1) / 2)
            self._hessian = None
        return self._sum

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add inputs x [..., columns] to the sum of x x^T; with `asymmetric`, `x_fp` are the
        full-precision model's inputs for the same tokens, added to the sum of (x_fp - x) x^T."""
        x = x.reshape(-1, self.columns).float()
        weights = token_weights(x, self.token_clip)  # clipped tokens weigh the same in both sums
        if weights is not None:
            x = x * weights
        if self.fp_inputs:
            if x_fp is None:
                raise RuntimeError("asymmetric GPTQ (GPTAQ) needs the full-precision inputs beside the quantized ones")
            dx = x_fp.reshape(-1, self.columns).float()
            dx = (dx * weights if weights is not None else dx) - x
            _add_products(self._cross_sum, dx, x)
            del dx
        _add_gram(self._summed(), x)
        self.samples += x.shape[0]

    @torch.no_grad()
    def reduce(self) -> None:
        """Under torch.distributed: the sums and counts over every rank's inputs, on every rank."""
        all_reduce_(self._summed(), "sum")
        if self._cross_sum is not None:
            all_reduce_(self._cross_sum, "sum")
        self.samples = reduce_count(self.samples)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, args: QuantArgs, config: GPTQConfig = GPTQConfig()) -> QuantizedWeight:
        """The GPTQ-quantized `weight` [out, in] (rows of all linears reading this input)."""
        config.check(args)
        if self.samples == 0:
            raise RuntimeError("GPTQ.quantize called before any add_batch")
        if config.asymmetric != self.fp_inputs:
            raise RuntimeError("GPTQ statistics and config disagree on asymmetric (GPTAQ)")
        return gptq_quantize(weight, self.hessian, args, config, self.cross())


def _add_products(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a^T b: fp32 products (a bf16 Hessian is often not positive definite) in blocks of
    rows, so that the temporary stays near 64 MB beside the float64 sum."""
    columns = total.shape[0]
    step = max(1, (1 << 24) // columns)
    for start in range(0, columns, step):
        total[start : start + step] += a[:, start : start + step].T @ b


def _gram_block(columns: int) -> int:
    """Rows per strip of the upper triangle: about a sixth of the columns (fewer strips waste
    more of the lower triangle, more are smaller, slower products), in multiples of 64, and
    a temporary of at most ~64 MB."""
    return max(64, min(-(-columns // 6 // 64) * 64, (1 << 24) // columns // 64 * 64))


def _add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """The upper triangle (diagonal included) of total += x^T x, strip by strip, fp32 products."""
    columns = total.shape[0]
    step = _gram_block(columns)
    for start in range(0, columns, step):
        total[start : start + step, start:] += x[:, start : start + step].T @ x[:, start:]


def _mirror_upper(total: torch.Tensor) -> None:
    """Fill the lower triangle of a square matrix from its upper one, in place, strip by strip."""
    columns = total.shape[0]
    step = _gram_block(columns)
    for start in range(0, columns, step):
        end = min(start + step, columns)
        block = total[start:end, start:end]
        block.copy_(block.triu() + block.triu(1).T)
        total[end:, start:end] = total[start:end, end:].T


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, config: GPTQConfig = GPTQConfig(), cross: torch.Tensor | None = None
) -> QuantizedWeight:
    """GPTQ's codes for `weight` [out, in], with the scales and offsets it quantized them with.
    With `cross` (GPTAQ's dX X^T on the Hessian's scale), the codes of the asymmetric objective."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    diag = torch.diag(hessian).float()
    dead = diag == 0  # inputs that are always zero: their weights do not matter
    diag[dead] = 1
    perm = torch.argsort(diag, descending=True) if config.act_order else None
    dead_in_order = dead[perm] if perm is not None else dead

    def prepared() -> torch.Tensor:
        """A copy of H (permuted, dead inputs' diagonal set to 1) to damp and factor in place: at
        14k inputs each [in, in] float32 copy is 0.8 GB, and the layer-by-layer peak is GPTQ's."""
        H = hessian.float()[perm][:, perm] if perm is not None else hessian.float().clone()
        H[dead_in_order, dead_in_order] = 1
        return H

    Hinv = _inverse_hessian_factor(prepared, config.damp)
    if cross is not None:  # GPTAQ: GPTQ on the asymmetric objective's optimum (module docstring)
        W = _asymmetric_target(W, cross, Hinv, perm, config.asymmetric_alpha)
    W[:, dead] = 0
    group = args.group_size if args.granularity is Granularity.GROUP else None
    # Scales before any update: always for per-channel / per-tensor, with act-order (static groups),
    # and for floating-point formats, whose block scales MR-GPTQ ("Bridging the Gap Between Promise
    # and Performance for Microscaling FP4 Quantization") fixes before the column updates.
    upfront = compute_qparams(as_rows(W, args), args) if group is None or config.act_order or args.is_float else None
    if group is None:
        kept = upfront
        fixed = kept
        if args.granularity is Granularity.TENSOR:
            fixed = QParams(kept.scale.expand(rows, 1), kept.zero.expand(rows, 1))
        groups = None
    elif upfront is not None:
        groups = QParams(upfront.scale.reshape(rows, -1), upfront.zero.reshape(rows, -1), upfront.global_scale)
    else:  # one (scale, zero) per row and group, filled as each group is reached
        groups = QParams(torch.ones(rows, cols // group), torch.zeros(rows, cols // group))

    if perm is not None:
        W = W[:, perm]
    codes = torch.zeros_like(W)
    qp = fixed if group is None else None
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group is not None:
                j = (int(perm[col]) if perm is not None else col) // group
                if upfront is None and col % group == 0:  # scales of a new group, from the already-updated weights
                    columns = W1[:, i : i + group]
                    if columns.shape[1] < group:  # the group runs past this block (block not a multiple of group)
                        columns = torch.cat([columns, W[:, i2 : i2 + group - columns.shape[1]]], dim=1)
                    found = compute_qparams(columns, args)
                    groups.scale[:, j : j + 1], groups.zero[:, j : j + 1] = found.scale, found.zero
                qp = QParams(groups.scale[:, j : j + 1], groups.zero[:, j : j + 1], groups.global_scale)
            w = W1[:, i : i + 1]
            c = quantize_rows(w, qp, args)
            codes[:, col : col + 1] = c
            # symmetric offsets are zero: adding them would be a pass for nothing, as in fake_rows
            err = (w - (c * qp.step if args.symmetric else dequantize_rows(c, qp))) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    if groups is not None:
        kept = QParams(groups.scale.reshape(-1, 1), groups.zero.reshape(-1, 1), groups.global_scale)
    return QuantizedWeight.from_qparams(as_rows(codes, args), kept, weight.shape, args)


def _asymmetric_target(W: torch.Tensor, cross: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """W' = W + alpha W (dX X^T) H^-1, the least-squares fit of W (X + alpha dX) from X (ridge
    lambda ||W' - W||^2), with H^-1 = U^T U from GPTQ's factor U (`Hinv`, in act-order's column
    order): two [out, in] x [in, in] products, no inverse formed. W's columns of dead inputs stay
    in W dX X^T (their full-precision inputs are part of the target); dX X^T's columns there are 0."""
    shift = W @ cross.to(W.device)
    if perm is not None:  # (W D)[:, perm] = W[:, perm] D[perm][:, perm]: H^-1's order
        shift = shift[:, perm]
    shift = (shift @ Hinv.T) @ Hinv
    if perm is not None:
        shift = shift[:, torch.argsort(perm)]
    return W.add_(shift, alpha=alpha)


def _inverse_hessian_factor(prepared: Callable[[], torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = damp * mean diag(H), H from
    `prepared()` (a fresh copy: it is damped and factored in place, so one [in, in] matrix is
    alive beside the result). A Hessian that is not positive definite (too few or degenerate
    samples) is retried with ten times the damping."""
    H = prepared()
    undamped = torch.diag(H).clone()
    mean_diag = torch.mean(undamped).item()
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        d = damp * 10**attempt
        if H is None:  # the failed attempt factored it in place
            H = prepared()
        H.diagonal().copy_(undamped + d * mean_diag)  # H + lambda I
        L, info = torch.linalg.cholesky_ex(H, out=(H, info))
        H = None
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True, out=(Hinv, info))
            if info == 0:
                if attempt:
                    log.warning(
                        "GPTQ: the Hessian was not positive definite with damping %.3g; succeeded with damping %.3g "
                        "(use more calibration samples, or set damp higher)",
                        damp,
                        d,
                    )
                return U
    raise UserError(
        f"GPTQ: the Hessian is not positive definite even with damping {damp * 10**MAX_DAMP_RETRIES:g}; "
        "the calibration inputs of this layer are degenerate; use more or longer calibration samples"
    )


def _gptq_statistics(columns: int, config: GPTQConfig, device) -> GPTQ:
    return GPTQ(columns, device=device, token_clip=config.token_clip, asymmetric=config.asymmetric)


# rows are independent given the Hessian: a group's linears may be quantized apart (on different ranks)
@register_algorithm("gptq", GPTQConfig, statistics=_gptq_statistics, separable_rows=True, input_scales=False)
def gptq(weight: torch.Tensor, stats: GPTQ, args: QuantArgs, config: GPTQConfig, context: GroupContext) -> AlgorithmResult:
    qweight = stats.quantize(weight, args, config)
    h = stats.hessian
    energy = output_energy(weight, h)  # the errors' denominator, once
    errors = {"gptq": output_error(weight, qweight.dequantize(), h, energy)}  # one dequantized copy alive at a time
    errors["rtn"] = output_error(weight, quantize_weight(weight, args).dequantize(), h, energy)
    del stats.hessian
    return AlgorithmResult(qweight, errors=errors, error_weight=energy)
