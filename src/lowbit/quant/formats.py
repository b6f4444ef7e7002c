"""Floating-point element formats (FP8 E4M3 / E5M2, FP4 E2M1) and the block scales of the
microscaling formats, as plain tensor functions.

A format with E exponent bits, M mantissa bits and bias B holds the values
``(-1)^s 2^(e - B) (1 + m / 2^M)`` (normal, e >= 1) and ``(-1)^s 2^(1 - B) (m / 2^M)``
(subnormal, e = 0). E4M3 here is the "fn" variant of the OCP 8-bit floating point specification
(no infinities, one NaN pattern, largest finite 448); E5M2 follows IEEE 754 (largest finite
57344); E2M1 is the OCP Microscaling specification's FP4 (no infinities or NaN, largest 6).

Rounding is to nearest, ties to even, and saturates at the largest finite value (what the MX
specification prescribes for conversion, and what quantizers need: an infinity or NaN is never a
useful code). Codes are the formats' bit patterns (sign bit on top), which is what checkpoints
store: two FP4 codes a byte, one FP8 code a byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float  # largest finite value
    torch_dtype: torch.dtype | None = field(default=None, compare=False)  # torch's own dtype, where one exists

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value (subnormals share its step)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """floor(log2(max)): the exponent of the largest finite value (emax_elem in the MX specification)."""
        return math.floor(math.log2(self.max))

    @cached_property
    def magnitudes(self) -> torch.Tensor:
        """The non-negative finite values, indexed by their bit pattern (sign bit clear), ascending."""
        values = []
        for code in range(2 ** (self.bits - 1)):
            e, m = code >> self.mantissa_bits, code & (2**self.mantissa_bits - 1)
            frac = m / 2**self.mantissa_bits
            value = 2.0 ** (self.min_exponent) * frac if e == 0 else 2.0 ** (e - self.bias) * (1 + frac)
            if value > self.max:  # infinities and NaN patterns
                break
            values.append(value)
        return torch.tensor(values, dtype=torch.float64)

    @cached_property
    def _decode_table(self) -> torch.Tensor:
        """Value of every bit pattern (the unused NaN/inf patterns decode to the largest finite value)."""
        mags = self.magnitudes.float()
        half = torch.full((2 ** (self.bits - 1),), float(self.max))
        half[: mags.numel()] = mags
        return torch.cat([half, -half])

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest value of the format (ties to even), saturating at +-max.

        Normal range: round float32's 23-bit significand to the format's M bits on the bit pattern
        (add half a unit minus one, plus the kept last bit, then truncate: ties go to the even
        significand, and a carry moves into the next binade exactly). Below the smallest normal
        the format's step is the constant 2^(min_exponent - M): x / step is exact, and
        `torch.round` rounds ties to even."""
        x = x.float()
        shift = 23 - self.mantissa_bits
        bits = x.view(torch.int32)
        kept_lsb = (bits >> shift) & 1
        normal = ((bits + ((1 << (shift - 1)) - 1) + kept_lsb) & ~((1 << shift) - 1)).view(torch.float32)
        step = 2.0 ** (self.min_exponent - self.mantissa_bits)
        subnormal = torch.round(x * (1 / step)) * step
        return torch.where(x.abs() < 2.0**self.min_exponent, subnormal, normal).clamp(-self.max, self.max)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Bit patterns (int16) of values of the format (as `round` returns them)."""
        mags = self.magnitudes.float().to(values.device)
        index = torch.searchsorted(mags, values.abs().float().contiguous())
        sign = (values < 0).to(torch.int16) << (self.bits - 1)
        return index.to(torch.int16) | sign

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 values of bit patterns."""
        return self._decode_table.to(codes.device)[codes.long()]


FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2)
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, 6.0)
FLOAT_ELEMENTS = {f.name: f for f in (FP8_E4M3, FP8_E5M2, FP4_E2M1)}

E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127  # 2^-127 .. 2^127; the pattern 255 is NaN


def e8m0_scale(amax: torch.Tensor, element: FloatFormat) -> torch.Tensor:
    """The shared power-of-two scale of an MX block, as the OCP Microscaling Formats (MX) v1.0
    specification's conversion defines it: X = 2^(floor(log2(max|V|)) - emax_elem), emax_elem the
    exponent of the element format's largest normal. Elements V / X above the element's largest value
    then saturate. An all-zero block gets X = 1."""
    _, exponent = torch.frexp(amax.float())
    shared = (exponent - 1 - element.max_exponent).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float32), shared)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def round_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """A positive scale as E8M0 stores it: its power of two (floor), clamped to the format's range.
    The identity on scales `e8m0_scale` computed."""
    _, exponent = torch.frexp(scale.float())
    return torch.ldexp(torch.ones_like(scale, dtype=torch.float32), (exponent - 1).clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT))
