"""Quantization settings: `QuantArgs` for one tensor kind and a `Scheme` for W, A, K and V.

Scheme names follow the W-A-KV convention of the literature: ``W4A8KV4``, ``W8A8``, ``W4A16``.
Each bit width may carry suffixes that refine it:

    g<N>   group size N along the input / channel dimension   (W4g64, A8g64)
    a      asymmetric MinMax instead of symmetric              (W4g64a, KV4a)
    t      per-tensor instead of per-channel / per-token       (W8t, A8t)
    s      static (calibrated) instead of dynamic; implies t   (A8s)
    m      MSE-searched clipping per row                       (W4m)
    c<P>   fixed clip ratio, P percent of the range            (A4c90)
    f      symmetric over the full signed range: all 2^N codes (W4f)
    h / b  scales (and offsets) stored in float16 / bfloat16 instead of float32   (W4g128h)

16 (or a missing part) means "not quantized". ``K4V8`` sets keys and values separately.
Defaults follow LLM-QAT: per-channel symmetric weights, per-token dynamic activations and
per-token (per-head) keys and values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import Enum

from .errors import UserError

MIN_BITS, MAX_BITS = 2, 8
ELEMENT_FORMATS = ("int",)  # the number format of the codes
SCALE_FORMATS = ("float32", "float16", "bfloat16")  # the number format scales and offsets are stored in


class Granularity(str, Enum):
    """What shares one scale. CHANNEL (weights) and TOKEN (activations, KV) both mean one scale per
    row of the last dimension; GROUP splits that row into groups of `group_size`."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    TOKEN = "token"
    GROUP = "group"


class Observer(str, Enum):
    """How the range is chosen: plain MinMax (times `clip_ratio`) or a per-row MSE search."""

    MINMAX = "minmax"
    MSE = "mse"


@dataclass(frozen=True)
class QuantArgs:
    """How one kind of tensor is quantized."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = Granularity.CHANNEL
    group_size: int | None = None
    clip_ratio: float = 1.0
    observer: Observer = Observer.MINMAX
    dynamic: bool = True
    # Symmetric only. False (LLM-QAT eq. 2): scale = max|x| / (2^(N-1) - 1), codes in +-(2^(N-1) - 1),
    # so one of the 2^N codes is unused. True (the GPTQ reference, compressed-tensors, torchao):
    # scale = max|x| / (2^(N-1) - 1/2), codes in [-2^(N-1), 2^(N-1) - 1]: a step 1/(2^N - 2) finer,
    # at the price of clipping +max|x| by half a step.
    full_range: bool = False
    element: str = "int"  # number format of the codes (ELEMENT_FORMATS)
    # Number format of the scales and offsets: the quantizer rounds them to it, so what lowbit
    # evaluates is what a checkpoint storing them in this format computes.
    scale_format: str = "float32"

    def __post_init__(self) -> None:
        if self.element not in ELEMENT_FORMATS:
            raise UserError(f"element format must be one of {', '.join(ELEMENT_FORMATS)}; got {self.element!r}")
        if self.scale_format not in SCALE_FORMATS:
            raise UserError(f"scale format must be one of {', '.join(SCALE_FORMATS)}; got {self.scale_format!r}")
        for name in ("symmetric", "dynamic", "full_range"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false; got {getattr(self, name)!r}")
        object.__setattr__(self, "granularity", _enum(Granularity, self.granularity, "granularity"))
        object.__setattr__(self, "observer", _enum(Observer, self.observer, "observer"))
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise UserError(
                f"bits must be an integer from {MIN_BITS} to {MAX_BITS} (use 16 in a scheme name, or no "
                f"QuantArgs, to leave a tensor unquantized); got {self.bits!r}"
            )
        if self.granularity is Granularity.GROUP:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise UserError(f"group_size must be a positive integer for per-group quantization; got {self.group_size!r}")
        elif self.group_size is not None:
            raise UserError(f"group_size={self.group_size} is only valid with granularity 'group', not '{self.granularity.value}'")
        if self.full_range and not self.symmetric:
            raise UserError("full_range is for symmetric quantization; asymmetric MinMax already uses all 2^N codes")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise UserError(f"clip_ratio must be in (0, 1]; got {self.clip_ratio!r}")
        if not self.dynamic and self.granularity is not Granularity.TENSOR:
            raise UserError(
                "static (calibrated) quantization needs granularity 'tensor': per-token or per-group scales "
                f"depend on the input; got static with '{self.granularity.value}'"
            )

    @property
    def qmax(self) -> int:
        """Largest integer code: 2^(N-1)-1 for symmetric, 2^N-1 for asymmetric."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def max_steps(self) -> float:
        """How many steps of the scale the largest magnitude (symmetric) or the range (asymmetric) spans."""
        return self.qmax + 0.5 if self.full_range else self.qmax

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    def name(self) -> str:
        """Suffix form used in scheme names (inverse of the parser)."""
        s = str(self.bits)
        if self.granularity is Granularity.GROUP:
            s += f"g{self.group_size}"
        if not self.symmetric:
            s += "a"
        if self.full_range:
            s += "f"
        if self.observer is Observer.MSE:
            s += "m"
        if self.clip_ratio != 1.0:
            s += f"c{round(self.clip_ratio * 100)}"
        s += _SCALE_SUFFIX.get(self.scale_format, "")
        if not self.dynamic:
            s += "s"
        elif self.granularity is Granularity.TENSOR:
            s += "t"
        return s


@dataclass(frozen=True)
class Scheme:
    """Quantization of weights, input activations of linear layers, keys and values.
    `None` means the tensor stays in full precision."""

    weights: QuantArgs | None = None
    inputs: QuantArgs | None = None
    keys: QuantArgs | None = None
    values: QuantArgs | None = None
    quantize_lm_head: bool = False

    @property
    def w_bits(self) -> int:
        return self.weights.bits if self.weights else 16

    @property
    def a_bits(self) -> int:
        return self.inputs.bits if self.inputs else 16

    @property
    def k_bits(self) -> int:
        return self.keys.bits if self.keys else 16

    @property
    def v_bits(self) -> int:
        return self.values.bits if self.values else 16

    @property
    def is_noop(self) -> bool:
        return not (self.weights or self.inputs or self.keys or self.values)

    @property
    def needs_calibration(self) -> bool:
        """Static activation or KV quantizers need ranges observed on calibration data."""
        return any(a is not None and not a.dynamic for a in (self.inputs, self.keys, self.values))

    @property
    def name(self) -> str:
        w = self.weights.name() if self.weights else "16"
        a = self.inputs.name() if self.inputs else "16"
        k = self.keys.name() if self.keys else "16"
        v = self.values.name() if self.values else "16"
        kv = f"KV{k}" if k == v else f"K{k}V{v}"
        return f"W{w}A{a}{kv}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weights": args_to_dict(self.weights),
            "inputs": args_to_dict(self.inputs),
            "keys": args_to_dict(self.keys),
            "values": args_to_dict(self.values),
            "quantize_lm_head": self.quantize_lm_head,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scheme:
        """Inverse of `to_dict` (the name is derived, not read)."""
        return cls(
            weights=args_from_dict(data.get("weights")),
            inputs=args_from_dict(data.get("inputs")),
            keys=args_from_dict(data.get("keys")),
            values=args_from_dict(data.get("values")),
            quantize_lm_head=bool(data.get("quantize_lm_head", False)),
        )


def args_to_dict(q: QuantArgs | None) -> dict | None:
    if q is None:
        return None
    return {
        "bits": q.bits,
        "symmetric": q.symmetric,
        "granularity": q.granularity.value,
        "group_size": q.group_size,
        "clip_ratio": q.clip_ratio,
        "observer": q.observer.value,
        "dynamic": q.dynamic,
        "full_range": q.full_range,
        "element": q.element,
        "scale_format": q.scale_format,
    }


def args_from_dict(data: dict | None) -> QuantArgs | None:
    """Inverse of `args_to_dict` (missing format keys take their defaults, as in format version 1);
    unknown keys are refused (a newer format, or a typo)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise UserError(f"quantization settings must be a mapping; got {data!r}")
    known = {f.name for f in fields(QuantArgs)}
    unknown = set(data) - known
    if unknown:
        raise UserError(f"unknown quantization settings {', '.join(sorted(unknown))}; expected {', '.join(sorted(known))}")
    return QuantArgs(**data)


_PART = re.compile(r"(W|A|KV|K|V)(\d+)([a-z0-9]*)")
_SUFFIX = re.compile(r"g(\d+)|c(\d+)|a|t|s|m|f|h|b")
_SCALE_SUFFIX = {"float16": "h", "bfloat16": "b"}


def parse_scheme(name: str) -> Scheme:
    """Parse a W-A-KV scheme name such as ``W4A8KV4`` or ``W4g64aA8KV8``."""
    if isinstance(name, Scheme):
        return name
    text = str(name).strip()
    if not text:
        raise UserError("empty scheme name; expected something like W4A8KV4")
    parts: dict[str, QuantArgs | None] = {}
    pos = 0
    # '-' or '_' may separate the parts (W4-A8-KV4), nothing else: W4g-64 is a typo, not W4g64
    compact = re.sub(r"[-_](?=(?:W|A|KV|K|V)\d)", "", text)
    if "-" in compact or "_" in compact:
        raise UserError(f"scheme {text!r}: '-' or '_' may only separate the parts (W4-A8-KV4), not stand inside one")
    for m in _PART.finditer(compact):
        if m.start() != pos:
            break
        kind, bits, suffix = m.group(1), int(m.group(2)), m.group(3)
        pos = m.end()
        if kind in parts or (kind == "KV" and ("K" in parts or "V" in parts)) or (kind in "KV" and "KV" in parts):
            raise UserError(f"scheme {text!r} sets {kind} twice")
        parts[kind] = _parse_part(text, kind, bits, suffix)
    if pos != len(compact) or not parts:
        raise UserError(
            f"cannot parse scheme {text!r}: expected W<bits>A<bits>KV<bits> with optional suffixes "
            "g<N> (group size), a (asymmetric), t (per-tensor), s (static), m (MSE clip search), c<percent> "
            "(clip ratio), f (full signed range), e.g. W4A8KV4, W4g64A16 or W4mA4c90KV4"
        )
    kv = parts.pop("KV", None)
    return Scheme(
        weights=parts.get("W"),
        inputs=parts.get("A"),
        keys=parts.get("K", kv),
        values=parts.get("V", kv),
    )


def _parse_part(text: str, kind: str, bits: int, suffix: str) -> QuantArgs | None:
    field_name = {"W": "weight", "A": "activation", "KV": "KV", "K": "key", "V": "value"}[kind]
    if bits == 16:
        if suffix:
            raise UserError(f"scheme {text!r}: {kind}16 means unquantized and takes no suffix {suffix!r}")
        return None
    if not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"scheme {text!r}: {field_name} bits must be {MIN_BITS}-{MAX_BITS} or 16 (unquantized); got {bits}")
    group, clip, scale_format = None, 1.0, "float32"
    symmetric, per_tensor, static, mse, full = True, False, False, False, False
    pos = 0
    for m in _SUFFIX.finditer(suffix):
        if m.start() != pos:
            break
        pos = m.end()
        if m.group(1) is not None:
            group = int(m.group(1))
        elif m.group(2) is not None:
            clip = int(m.group(2)) / 100
            if not 0 < clip <= 1:
                raise UserError(f"scheme {text!r}: clip c{m.group(2)} is a percentage of the range, 1-100 (e.g. c90)")
        elif m.group(0) == "m":
            mse = True
        elif m.group(0) == "f":
            full = True
        elif m.group(0) in ("h", "b"):
            if scale_format != "float32":
                raise UserError(f"scheme {text!r}: {kind}{bits} sets its scale format twice ('h' float16, 'b' bfloat16)")
            scale_format = "float16" if m.group(0) == "h" else "bfloat16"
        elif m.group(0) == "a":
            symmetric = False
        elif m.group(0) == "t":
            per_tensor = True
        else:
            static = True
    if pos != len(suffix):
        raise UserError(f"scheme {text!r}: unknown suffix {suffix[pos:]!r} after {kind}{bits}; use g<N>, a, t, s, m, f, h, b or c<percent>")
    if full and not symmetric:
        raise UserError(f"scheme {text!r}: 'f' (full signed range) is for symmetric quantization; asymmetric 'a' already uses all 2^N codes")
    if static and kind == "W":
        raise UserError(f"scheme {text!r}: weights are always quantized once; 's' (static) applies to A, K and V")
    if group is not None and (per_tensor or static):
        raise UserError(f"scheme {text!r}: {kind}{bits} cannot be both per-group and per-tensor/static")
    if group is not None and group < 1:
        raise UserError(f"scheme {text!r}: group size must be positive; got {group}")
    if group is not None:
        granularity = Granularity.GROUP
    elif per_tensor or static:
        granularity = Granularity.TENSOR
    else:
        granularity = Granularity.CHANNEL if kind == "W" else Granularity.TOKEN
    if mse and static:
        raise UserError(f"scheme {text!r}: 'm' (MSE clip search per row) needs the tensor itself; static ranges use c<percent>")
    observer = Observer.MSE if mse else Observer.MINMAX
    return QuantArgs(
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=group,
        dynamic=not static,
        clip_ratio=clip,
        observer=observer,
        full_range=full,
        scale_format=scale_format,
    )


def _enum(cls, value, what: str):
    try:
        return cls(value)
    except ValueError:
        options = ", ".join(m.value for m in cls)
        raise UserError(f"{what} must be one of {options}; got {value!r}") from None
