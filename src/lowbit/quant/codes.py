"""Integer codes of an already-quantized weight, recovered exactly from its values.

lowbit keeps a quantized weight as its dequantized values ``code * scale + zero`` (what every
algorithm returns, computed in float32). To store it at its bit width we need codes, scales and
zero points whose dequantization gives back *the same bits*, not just nearly the same numbers:
a saved model must reload with identical logits.

Re-running the scheme's observer on the quantized values does not always give that: GPTQ's
scales come from the weights before quantization (the largest code of a row may be below the
maximum), clipping and symmetric grids can use the extra negative code -2^(N-1), and
``(k * s) / k`` is not always ``s`` in floating point. So per row (or group) we search: assume
the row's largest magnitude sits on code c (the maximum first, then the others), take the
scale that implies and its float neighbours a few ulps away, and keep the first candidate whose
codes are in range and dequantize bit for bit to the row. Asymmetric rows take their minimum as
the zero point (code 0). A row none of this reproduces is reported, never stored approximately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheme import Granularity, QuantArgs
from .fake import QParams, as_rows, dequantize_rows
from .packing import pack, signed_codes, unpack, unsigned_codes

ULP_STEPS = (0, -1, 1, -2, 2, -3, 3)


class InexactCodesError(ValueError):
    """The values are not on any grid of the scheme's bit width (not a lowbit-quantized weight)."""


@dataclass
class WeightCodes:
    """A quantized weight at its bit width: packed unsigned codes and per-row float32 parameters."""

    packed: torch.Tensor  # uint8, ceil(numel * bits / 8) bytes
    scale: torch.Tensor  # float32 [rows]
    zero: torch.Tensor | None  # float32 [rows], asymmetric only
    shape: tuple[int, ...]

    def dequantize(self, args: QuantArgs) -> torch.Tensor:
        count = int(torch.Size(self.shape).numel())
        rows = self.scale.numel()
        codes = signed_codes(unpack(self.packed, args.bits, count), args.bits, args.symmetric).float().reshape(rows, -1)
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return dequantize_rows(codes, QParams(self.scale.reshape(-1, 1), zero.reshape(-1, 1))).reshape(self.shape)


def _step(s: torch.Tensor, ulps: int) -> torch.Tensor:
    toward = torch.full_like(s, float("inf") if ulps > 0 else float("-inf"))
    for _ in range(abs(ulps)):
        s = torch.nextafter(s, toward)
    return s


def _candidate_codes(args: QuantArgs) -> list[int]:
    """Code magnitudes the largest value of a row may sit on, most likely first."""
    top = args.qmax
    order = [top]
    if args.symmetric:
        order.append(top + 1)  # -2^(N-1), reachable by clipping or GPTQ
    order += list(range(top - 1, 0, -1))
    return order


@torch.no_grad()
def encode_weight(weight: torch.Tensor, args: QuantArgs, name: str = "weight") -> WeightCodes:
    """Codes, scales and zero points that dequantize to exactly `weight`, packed (raises if none exist)."""
    codes, scale, zero = exact_codes(weight, args, name)
    packed = pack(unsigned_codes(codes, args.bits, args.symmetric), args.bits)
    return WeightCodes(packed, scale.reshape(-1), None if args.symmetric else zero.reshape(-1), tuple(weight.shape))


@torch.no_grad()
def exact_codes(weight: torch.Tensor, args: QuantArgs, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes [rows, cols] (int16, signed for symmetric) and per-row float32 scale and zero
    [rows, 1] (rows as `as_rows` views them) that dequantize to exactly `weight`; raises
    `InexactCodesError` if the weight is not on a grid of the scheme's bit width."""
    rows = as_rows(weight.detach().float(), args)
    dtype = weight.dtype  # a bf16 / fp16 weight holds float32 grid values rounded once more: compare in its dtype
    n = rows.shape[0]
    if args.symmetric:
        zero = torch.zeros(n, 1)
        span = rows.abs().amax(dim=1, keepdim=True)
    else:
        zero = rows.amin(dim=1, keepdim=True)
        span = (rows.double().amax(dim=1, keepdim=True) - zero.double()).float()
    scale = torch.ones(n, 1)
    codes = torch.zeros_like(rows)
    done = (span == 0).reshape(-1)  # constant rows: code 0 with scale 1 (and zero = the value) is exact
    for c in _candidate_codes(args):
        for ulps in ULP_STEPS:
            todo = (~done).nonzero().reshape(-1)
            if todo.numel() == 0:
                break
            s = _step((span[todo].double() / c).float(), ulps)
            s = torch.where(s > 0, s, torch.ones_like(s))
            r, z = rows[todo], zero[todo]
            q = torch.round((r - z) / s)
            ok = ((q >= args.qmin) & (q <= args.qmax)).all(dim=1)
            ok &= (dequantize_rows(q, QParams(s, z)).to(dtype).float() == r).all(dim=1)
            hit = todo[ok]
            scale[hit], codes[hit] = s[ok], q[ok]
            done[hit] = True
    if not args.symmetric:
        for i in (~done).nonzero().reshape(-1).tolist():
            found = _search_shifted_zero(rows[i], args, dtype)
            if found is not None:
                scale[i], zero[i], codes[i] = found
                done[i] = True
    if not bool(done.all()):
        bad = int((~done).sum())
        raise InexactCodesError(
            f"{name}: {bad} of {n} rows are not exact {args.bits}-bit grid values of scheme W{args.name()}; "
            "it was not quantized by lowbit with this scheme, or it was edited afterwards"
        )
    return codes.to(torch.int16), scale, zero


def _search_shifted_zero(row: torch.Tensor, args: QuantArgs, dtype: torch.dtype = torch.float32):
    """An asymmetric row whose smallest value is not on code 0 (GPTQ: the zero point came from the
    weights before quantization). Find the grid step from the row's spacing, then try each
    possible code of the minimum, with scale and zero a few ulps around their estimates."""
    lo, hi = row.min().double(), row.max().double()
    steps = torch.arange(args.qmax, 0, -1, dtype=torch.float64)  # codes spanned by the row, largest first
    pos = (row.double() - lo)[None, :] / ((hi - lo) / steps)[:, None]
    on_grid = ((pos - pos.round()).abs() < 1e-3).all(dim=1)
    for d in steps[on_grid].long().tolist():
        s0 = ((hi - lo) / d).float().reshape(1)
        s = torch.stack([_step(s0, u) for u in ULP_STEPS]).reshape(-1, 1, 1)  # [S, 1, 1]
        for k_min in range(args.qmax - d + 1):
            z0 = (lo - k_min * s0.double()).float().reshape(1)
            z = torch.stack([_step(z0, u) for u in ULP_STEPS]).reshape(1, -1, 1)  # [1, Z, 1]
            q = torch.round((row - z) / s)  # [S, Z, cols]
            ok = ((q >= args.qmin) & (q <= args.qmax)).all(dim=-1)
            ok &= ((q * s + z).to(dtype).float() == row).all(dim=-1)
            if bool(ok.any()):
                i, j = ok.nonzero()[0].tolist()
                return s[i, 0, 0], z[0, j, 0], q[i, j]
    return None


@torch.no_grad()
def rescale_output_rows(weight: torch.Tensor, args: QuantArgs, factor: torch.Tensor) -> torch.Tensor:
    """A quantized weight [out, in] whose output row r is multiplied by factor[r], kept on its grid:
    the codes stay, the row's scales (and zero points) are multiplied instead. (Multiplying the
    values directly would round each one separately and leave the grid by an ulp here and there.)"""
    if args.granularity is Granularity.TENSOR:
        raise InexactCodesError("a per-row factor cannot keep a per-tensor grid")
    codes = encode_weight(weight, args)
    per_row = codes.scale.numel() // weight.shape[0]  # groups per output row
    f = factor.double().repeat_interleave(per_row)
    codes.scale = (codes.scale.double() * f).float()
    if codes.zero is not None:
        codes.zero = (codes.zero.double() * f).float()
    return codes.dequantize(args).to(weight.dtype)
