"""AWQ (Lin et al., 2023): activation-aware weight quantization.

For the linears that read one input X, search per-input-channel scales s = mean|X|^r over a grid
of exponents r in [0, 1); quantize W * s and divide X by s (1/s is folded into the op that
produces X, so it costs nothing). Then search, per output row (or group), the clipping of the
weight range that minimises the output error. Both searches minimise ||X W^T - X Q(W)^T||^2 on a
sample of the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import all_reduce_, gather_rows, rank, reduce_count
from ..quant.fake import QParams, as_rows, fake_quantize, fake_rows, minmax_qparams
from ..quant.qweight import QuantizedWeight, quantize_weight
from ..scheme import Granularity, QuantArgs
from .objective import clip_token_norms, output_error
from .registry import AlgorithmResult, GroupContext, register_algorithm

SAMPLE_ROWS = 4096  # calibration tokens kept per input for the searches
SEARCH_ROWS_WITH_ACT_QUANT = 1024  # rows for the scale search when activations are quantized too


@dataclass(frozen=True)
class AWQConfig:
    scale_grid: int = 20  # exponents 0, 1/20, ..., 19/20
    clip_grid: int = 20  # clip ratios 1, 0.975, ..., down to 0.5 + 1/40
    max_shrink: float = 0.5
    search_scales: bool = True
    search_clip: bool = True
    token_clip: float | None = None  # optional: massive tokens count at most token_clip x the median norm


class AWQ:
    """Collects a sample of one input (shared by the group's linears) and mean |X| per channel."""

    def __init__(self, columns: int, sample_rows: int = SAMPLE_ROWS, seed: int = 0, token_clip: float | None = None) -> None:
        self.columns = columns
        self.token_clip = token_clip
        self.sample_rows = sample_rows
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)
        self.count = 0
        # A uniform sample of all rows seen, at most `sample_rows`: every row gets a random key and
        # the rows with the largest keys are kept (the same rows however the batches fall). The
        # buffers are allocated once and updated in place, nothing re-allocated per batch.
        self.rows = torch.empty(sample_rows, columns)
        # float64 keys: the float32 draw plus the row's position x 2^-52 (exact, below the draws'
        # 2^-24 steps), so equal draws are ordered by position and the kept set and its order are
        # one function of the rows, whichever process saw them (`reduce`)
        self.keys = torch.empty(sample_rows, dtype=torch.float64)
        self.filled = 0
        self.position = 0  # rows drawn for so far (on this rank: including the ranks before it)
        self.generator = torch.Generator().manual_seed(seed)

    def _keys(self, n: int) -> torch.Tensor:
        draws = torch.rand(n, generator=self.generator).double()
        keys = draws + torch.arange(self.position, self.position + n, dtype=torch.float64) * 2.0**-52
        self.position += n
        return keys

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).float()
        self.abs_sum += x.abs().sum(0).double().cpu()
        self.count += x.shape[0]
        x = clip_token_norms(x, self.token_clip).cpu()
        keys = self._keys(x.shape[0])
        free = min(self.sample_rows - self.filled, x.shape[0])  # still filling: take rows as they come
        self.rows[self.filled : self.filled + free] = x[:free]
        self.keys[self.filled : self.filled + free] = keys[:free]
        self.filled += free
        x, keys = x[free:], keys[free:]
        if keys.numel():  # full: new rows whose keys beat the smallest kept ones replace those
            kept = torch.zeros(self.sample_rows + keys.numel(), dtype=torch.bool)
            kept[torch.cat([self.keys, keys]).topk(self.sample_rows).indices] = True
            slots = (~kept[: self.sample_rows]).nonzero().squeeze(1)
            entering = kept[self.sample_rows :].nonzero().squeeze(1)
            self.rows[slots] = x[entering]
            self.keys[slots] = keys[entering]

    def skip(self, rows: int) -> None:
        """Draw the keys of `rows` rows other ranks see (torch's CPU generator gives the same
        numbers drawn in parts or at once), so this rank's rows get the keys one process gives them."""
        for start in range(0, rows, 1 << 20):
            self._keys(min(1 << 20, rows - start))

    @torch.no_grad()
    def reduce(self) -> None:
        """Under torch.distributed: channel sums and counts summed; the kept rows become the
        `sample_rows` rows with the largest keys over every rank's kept rows, which are those one
        process keeps over all rows. Every rank then holds the same sample in key order."""
        all_reduce_(self.abs_sum, "sum")
        self.count = reduce_count(self.count)
        keys = gather_rows(self.keys[: self.filled])  # every rank's kept keys, in rank order
        counts = gather_rows(torch.tensor([self.filled], dtype=torch.int64))
        chosen = keys.topk(min(self.sample_rows, keys.numel())).indices  # into `keys`, by decreasing key
        owner = torch.bucketize(chosen, counts.cumsum(0), right=True)
        # each rank sends its chosen rows (in final order); final[p] is the row chosen[p] names
        start = int(counts[: rank()].sum())
        gathered = gather_rows(self.rows[chosen[owner == rank()] - start])
        places = torch.cat([(owner == r).nonzero().squeeze(1) for r in range(counts.numel())])
        self.filled = chosen.numel()
        self.rows[places] = gathered
        self.keys[: self.filled] = keys[chosen]

    def sample(self) -> torch.Tensor:
        """The kept rows, in order of decreasing key (an order that does not depend on how the
        batches fell, so `x[:n]` is a uniform sample too)."""
        order = self.keys[: self.filled].argsort(descending=True)
        self.rows[: self.filled] = self.rows[: self.filled][order]
        self.keys[: self.filled] = self.keys[: self.filled][order]
        return self.rows[: self.filled]

    @torch.no_grad()
    def quantize(
        self,
        weight: torch.Tensor,
        args: QuantArgs,
        config: AWQConfig = AWQConfig(),
        scalable: bool = True,
        tie=None,
        input_args: QuantArgs | None = None,
    ) -> tuple[QuantizedWeight, torch.Tensor | None]:
        """(the quantized weight for the *scaled* input, input scales s or None).

        The caller divides the input by s (folds 1/s into the producer); the returned weight
        already includes W * s. `scalable=False` (an input that cannot absorb a scale, e.g. one
        rotated online) searches only the clipping. `tie` maps the per-channel activation means to
        values shared where channels must share a scale; `input_args` (activation quantization)
        is applied to X / s inside the scale search, so the search sees what the model will run."""
        x = self.sample().to(weight.device)
        w = weight.detach().float()
        scales = None
        if scalable and config.search_scales:
            act_mean = self.abs_sum.float().to(w.device) / max(self.count, 1)
            if tie is not None:
                act_mean = tie(act_mean)
            scales = awq_scales(x, w, act_mean, args, config.scale_grid, input_args)
            w = w * scales
            x = x / scales
        if config.search_clip:
            return clipped_quantize(x, w, args, config), scales
        return quantize_weight(w, args, minmax_qparams(as_rows(w, args), args)), scales


def awq_scales(
    x: torch.Tensor, weight: torch.Tensor, act_mean: torch.Tensor, args: QuantArgs, grid: int, input_args: QuantArgs | None = None
) -> torch.Tensor:
    """Per-channel scales s = act_mean^r / sqrt(max * min), r from the grid, lowest output error."""
    if input_args is None:
        # ||X W^T - (X/s) Q^T||^2 = tr(D G D^T) with D = W - Q diag(1/s), G = X^T X: cheaper than
        # multiplying the sample when it has more rows than the layer has inputs
        gram = x.T @ x
        ref = None
    else:
        x = x[:SEARCH_ROWS_WITH_ACT_QUANT]
        ref = x @ weight.T
    best_err, best = None, torch.ones_like(act_mean)
    for r in (i / grid for i in range(grid)):
        s = act_mean.clamp(min=1e-4).pow(r)
        s = s / (s.max() * s.min()).sqrt()
        rows = as_rows(weight * s, args)
        q = fake_rows(rows, minmax_qparams(rows, args), args).reshape(weight.shape)
        if ref is None:
            d = weight - q / s
            err = ((d @ gram) * d).sum().item()
        else:
            err = (ref - fake_quantize(x / s, input_args) @ q.T).pow(2).sum().item()
        if best_err is None or err < best_err:
            best_err, best = err, s
    return best


def clipped_quantize(x: torch.Tensor, weight: torch.Tensor, args: QuantArgs, config: AWQConfig) -> QuantizedWeight:
    """Quantize with, per row of scales (output channel or group), the clip ratio that minimises
    that row's contribution to the output error on `x` (per-tensor: one ratio for all)."""
    out, cols = weight.shape
    rows = as_rows(weight, args)
    if args.granularity is Granularity.TENSOR:
        gram = (x.T @ x).unsqueeze(0)  # [1, in, in]
        diff_view = (out, 1, cols)
    else:
        g = rows.shape[1]
        groups = cols // g
        xg = x.reshape(x.shape[0], groups, g)
        gram = torch.einsum("ngc,ngd->gcd", xg, xg)  # per-group Gram matrices [groups, g, g]
        diff_view = (out, groups, g)
    best = best_err = None
    for i in range(config.clip_grid):
        ratio = 1.0 - i * config.max_shrink / config.clip_grid
        qp = minmax_qparams(rows, args, ratio)
        diff = (rows - fake_rows(rows, qp, args)).reshape(diff_view)
        # ||x_group . diff_(row, group)||^2 over the sample = diff C_group diff^T
        err = (torch.einsum("ogc,gcd->ogd", diff, gram) * diff).sum(-1)
        err = err.sum().reshape(1, 1) if args.granularity is Granularity.TENSOR else err.reshape(-1, 1)
        if best_err is None:
            best_err, best = err, qp
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = QParams(torch.where(better, qp.scale, best.scale), torch.where(better, qp.zero, best.zero), best.global_scale)
    return quantize_weight(weight, args, best)


def _awq_statistics(columns: int, config: AWQConfig, device) -> AWQ:
    return AWQ(columns, token_clip=config.token_clip)


@register_algorithm("awq", AWQConfig, statistics=_awq_statistics)
def awq(weight: torch.Tensor, stats: AWQ, args: QuantArgs, config: AWQConfig, context: GroupContext) -> AlgorithmResult:
    qweight, scales = stats.quantize(weight, args, config, scalable=context.scalable, tie=context.tie, input_args=context.input_args)
    # errors on the kept sample through its Gram matrix (X (W - Q/s)^T in full took four output-
    # sized temporaries); the scaled input x / s times Q is x times Q / s
    x = stats.sample().to(weight.device)
    gram = x.T @ x
    q = qweight.dequantize()
    effective = q / scales.to(q.device) if scales is not None else q
    rtn = quantize_weight(weight, args).dequantize()
    errors = {"awq": output_error(weight, effective, gram), "rtn": output_error(weight, rtn, gram)}
    if scales is not None:
        errors["scaled"] = True
    return AlgorithmResult(qweight, input_scales=scales, errors=errors)
