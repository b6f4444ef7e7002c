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

The bit field may instead name a floating-point format:

    fp8      FP8 E4M3 elements, float32 scales per channel / token (or g<N>, t, s, h, b)
    fp8e5m2  FP8 E5M2 elements, likewise
    mxfp8    OCP Microscaling: blocks of 32 FP8 E4M3 elements sharing a power-of-two E8M0 scale
    mxfp4    OCP Microscaling: blocks of 32 FP4 E2M1 elements sharing an E8M0 scale
    nvfp4    NVIDIA's NVFP4: blocks of 16 FP4 E2M1 elements with an FP8 E4M3 scale each, under
             one float32 scale per tensor (weights, or `s`: calibrated) or per token (dynamic)

Floating-point formats are symmetric (a sign bit); the block formats fix their block size and
scale format, so they take only m, c and (NVFP4 activations) s. Mixtures work: ``Wnvfp4Afp8KV8``.

16 (or a missing part) means "not quantized". ``K4V8`` sets keys and values separately.
A trailing ``P<N>`` (``W4A4KV4P1``) keeps the first N tokens of every sequence (the attention
sink) in full precision: their linear inputs and their keys and values, as IntactKV ("IntactKV:
Improving Large Language Model Quantization by Keeping Pivot Tokens Intact") and PrefixQuant
("PrefixQuant: Eliminating Outliers by Prefixed Tokens for Large Language Models Quantization") do.
Defaults follow LLM-QAT: per-channel symmetric weights, per-token dynamic activations and
per-token (per-head) keys and values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from enum import Enum

from .errors import UserError

MIN_BITS, MAX_BITS = 2, 8
# The number format of the codes, and its width in bits (None: any of MIN_BITS..MAX_BITS)
ELEMENT_FORMATS = {"int": None, "fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4}
# The number format scales and offsets are stored in
SCALE_FORMATS = ("float32", "float16", "bfloat16", "float8_e4m3", "e8m0")
GLOBAL_SCALES = (None, "tensor", "token")  # what shares NVFP4's float32 scale over the block scales
MX_BLOCK, NV_BLOCK = 32, 16


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
    # NVFP4's second level: one float32 scale per tensor (weights; static activations) or per
    # token (dynamic activations, keys and values), over the FP8 block scales.
    global_scale: str | None = None

    def __post_init__(self) -> None:
        if self.element not in ELEMENT_FORMATS:
            raise UserError(f"element format must be one of {', '.join(ELEMENT_FORMATS)}; got {self.element!r}")
        if self.scale_format not in SCALE_FORMATS:
            raise UserError(f"scale format must be one of {', '.join(SCALE_FORMATS)}; got {self.scale_format!r}")
        if self.global_scale not in GLOBAL_SCALES:
            raise UserError(f"global_scale must be 'tensor', 'token' or null; got {self.global_scale!r}")
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
        self._check_format()
        if self.granularity is Granularity.GROUP:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise UserError(f"group_size must be a positive integer for per-group quantization; got {self.group_size!r}")
        elif self.group_size is not None:
            raise UserError(f"group_size={self.group_size} is only valid with granularity 'group', not '{self.granularity.value}'")
        if self.full_range and not self.symmetric:
            raise UserError("full_range is for symmetric quantization; asymmetric MinMax already uses all 2^N codes")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise UserError(f"clip_ratio must be in (0, 1]; got {self.clip_ratio!r}")
        if not self.dynamic and self.granularity is not Granularity.TENSOR and self.global_scale != "tensor":
            raise UserError(
                "static (calibrated) quantization needs granularity 'tensor': per-token or per-group scales "
                f"depend on the input; got static with '{self.granularity.value}'"
            )

    def _check_format(self) -> None:
        """The element, scale format and global scale must make one of the formats lowbit knows."""
        width = ELEMENT_FORMATS[self.element]
        block = {"e8m0": MX_BLOCK, "float8_e4m3": NV_BLOCK}.get(self.scale_format)
        if width is None:
            if block is not None or self.global_scale is not None:
                raise UserError(f"scale format {self.scale_format!r} and a global scale are for floating-point elements, not integers")
            return
        if self.bits != width:
            raise UserError(f"element format {self.element} has {width} bits; got bits={self.bits}")
        if not self.symmetric or self.full_range:
            raise UserError(f"{self.element} is symmetric (a sign bit): asymmetric and full_range are integer options")
        if self.element == "fp4_e2m1" and block is None:
            raise UserError("FP4 E2M1 elements need block scales: scale format 'e8m0' (MXFP4) or 'float8_e4m3' (NVFP4)")
        if block is not None and (self.granularity is not Granularity.GROUP or self.group_size != block):
            raise UserError(f"scale format {self.scale_format!r} is a block format: granularity 'group' with group_size {block}")
        if self.scale_format == "e8m0" and self.element == "fp8_e5m2":
            raise UserError("MX block scales are implemented for E4M3 and E2M1 elements (MXFP8, MXFP4)")
        if (self.scale_format == "float8_e4m3") != (self.global_scale is not None):
            raise UserError("NVFP4 (FP8 E4M3 block scales) needs a global_scale ('tensor' or 'token'), and only it takes one")
        if not self.dynamic and self.global_scale not in (None, "tensor"):
            raise UserError("static NVFP4 calibrates one global scale per tensor: global_scale 'tensor'")
        if not self.dynamic and self.scale_format == "e8m0":
            raise UserError("MX block scales come from each block of the input; there is nothing to calibrate (drop 's')")

    @property
    def is_float(self) -> bool:
        """Floating-point elements (FP8, FP4) rather than integer codes."""
        return self.element != "int"

    @property
    def format_name(self) -> str:
        """The element format as scheme names spell it: 'int', 'fp8', 'fp8e5m2', 'mxfp8', 'mxfp4', 'nvfp4'."""
        if not self.is_float:
            return "int"
        if self.scale_format == "e8m0":
            return "mx" + _FLOAT_TOKENS[self.element]
        if self.scale_format == "float8_e4m3":
            return "nvfp4"
        return _FLOAT_TOKENS[self.element]

    @property
    def bits_per_value(self) -> float:
        """Bits a value takes at rest, its share of the block scales included (NVFP4 4.5, MXFP4 4.25,
        MXFP8 8.25; per-channel and per-tensor scales are not counted here: they do not grow with
        the row)."""
        if self.granularity is not Granularity.GROUP:
            return float(self.bits)
        scale_bits = {"float32": 32, "float16": 16, "bfloat16": 16, "float8_e4m3": 8, "e8m0": 8}[self.scale_format]
        return self.bits + scale_bits * (1 if self.symmetric else 2) / self.group_size

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
        block_format = self.scale_format in ("e8m0", "float8_e4m3")
        s = self.format_name if self.is_float else str(self.bits)
        if self.granularity is Granularity.GROUP and not block_format:
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


_FLOAT_TOKENS = {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8e5m2", "fp4_e2m1": "fp4"}


@dataclass(frozen=True)
class Scheme:
    """Quantization of weights, input activations of linear layers, keys and values.
    `None` means the tensor stays in full precision."""

    weights: QuantArgs | None = None
    inputs: QuantArgs | None = None
    keys: QuantArgs | None = None
    values: QuantArgs | None = None
    quantize_lm_head: bool = False
    # The first `fp_prefix` tokens of every sequence keep full-precision linear inputs and keys /
    # values (weights are unaffected): the massive activations of the attention sink then no
    # longer set the per-tensor ranges, and its KV entries, which every later token attends to,
    # stay exact (IntactKV; PrefixQuant).
    fp_prefix: int = 0

    def __post_init__(self) -> None:
        n = self.fp_prefix
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"fp_prefix must be a whole number of tokens, 0 or more; got {n!r}")
        if n and self.inputs is None and self.keys is None and self.values is None:
            raise UserError(
                f"P{n} keeps the first tokens' activations and KV cache in full precision, but {self.name} quantizes neither: nothing to keep"
            )

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
        prefix = f"P{self.fp_prefix}" if self.fp_prefix else ""
        return f"W{w}A{a}{kv}{prefix}"

    def formats(self) -> dict[str, dict]:
        """Per quantized tensor kind, its number format and the bits a value takes at rest."""
        parts = (("weights", self.weights), ("activations", self.inputs), ("keys", self.keys), ("values", self.values))
        return {
            kind: {"format": a.format_name if a.is_float else f"int{a.bits}", "bits_per_value": a.bits_per_value}
            for kind, a in parts
            if a is not None
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weights": args_to_dict(self.weights),
            "inputs": args_to_dict(self.inputs),
            "keys": args_to_dict(self.keys),
            "values": args_to_dict(self.values),
            "quantize_lm_head": self.quantize_lm_head,
            "fp_prefix": self.fp_prefix,
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
            fp_prefix=data.get("fp_prefix", 0),  # absent before prefix tokens existed: none
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
        "global_scale": q.global_scale,
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


_FORMAT_TOKEN = r"nvfp4|mxfp8|mxfp4|fp8e5m2|fp8|\d+"
_PART = re.compile(rf"(W|A|KV|K|V)({_FORMAT_TOKEN})([a-z0-9]*)")
_SUFFIX = re.compile(r"g(\d+)|c(\d+)|a|t|s|m|f|h|b")
_SCALE_SUFFIX = {"float16": "h", "bfloat16": "b"}
_PREFIX = re.compile(r"[-_]?P(\d+)$")  # the trailing P<N>: full-precision prefix tokens


def parse_scheme(name: str) -> Scheme:
    """Parse a W-A-KV scheme name such as ``W4A8KV4`` or ``W4g64aA8KV8``."""
    if isinstance(name, Scheme):
        return name
    text = str(name).strip()
    if not text:
        raise UserError("empty scheme name; expected something like W4A8KV4")
    parts: dict[str, QuantArgs | None] = {}
    pos = 0
    fp_prefix, body = 0, text
    prefix = _PREFIX.search(text)
    if prefix:
        fp_prefix, body = int(prefix.group(1)), text[: prefix.start()]
        if fp_prefix < 1:
            raise UserError(f"scheme {text!r}: P<N> keeps the first N >= 1 tokens in full precision; drop P0")
    # '-' or '_' may separate the parts (W4-A8-KV4), nothing else: W4g-64 is a typo, not W4g64
    compact = re.sub(rf"[-_](?=(?:W|A|KV|K|V)(?:{_FORMAT_TOKEN}))", "", body)
    if "-" in compact or "_" in compact:
        raise UserError(f"scheme {text!r}: '-' or '_' may only separate the parts (W4-A8-KV4), not stand inside one")
    for m in _PART.finditer(compact):
        if m.start() != pos:
            break
        kind, bits, suffix = m.group(1), m.group(2), m.group(3)
        pos = m.end()
        if kind in parts or (kind == "KV" and ("K" in parts or "V" in parts)) or (kind in "KV" and "KV" in parts):
            raise UserError(f"scheme {text!r} sets {kind} twice")
        parts[kind] = _parse_part(text, kind, bits, suffix)
    if pos != len(compact) or not parts:
        raise UserError(
            f"cannot parse scheme {text!r}: expected W<bits>A<bits>KV<bits> with optional suffixes "
            "g<N> (group size), a (asymmetric), t (per-tensor), s (static), m (MSE clip search), c<percent> "
            "(clip ratio), f (full signed range), h/b (float16/bfloat16 scales), or a format name instead of the bits "
            "(fp8, fp8e5m2, mxfp8, mxfp4, nvfp4), and a trailing P<N> (the first N tokens in full precision), "
            "e.g. W4A8KV4, W4g64A16, W4mA4c90KV4, Wnvfp4Afp8KV8 or W4A4KV4P1"
        )
    kv = parts.pop("KV", None)
    return Scheme(
        weights=parts.get("W"),
        inputs=parts.get("A"),
        keys=parts.get("K", kv),
        values=parts.get("V", kv),
        fp_prefix=fp_prefix,
    )


# What each named floating-point format fixes, and the suffixes it takes.
_NAMED_FORMATS = {
    "fp8": ({"element": "fp8_e4m3", "bits": 8}, "gtsmchb"),
    "fp8e5m2": ({"element": "fp8_e5m2", "bits": 8}, "gtsmchb"),
    "mxfp8": ({"element": "fp8_e4m3", "bits": 8, "group_size": MX_BLOCK, "scale_format": "e8m0"}, "mc"),
    "mxfp4": ({"element": "fp4_e2m1", "bits": 4, "group_size": MX_BLOCK, "scale_format": "e8m0"}, "mc"),
    "nvfp4": ({"element": "fp4_e2m1", "bits": 4, "group_size": NV_BLOCK, "scale_format": "float8_e4m3"}, "mcs"),
}
_SUFFIX_MEANING = {
    "g": "group size (g<N>)",
    "a": "asymmetric 'a'",
    "f": "full signed range 'f'",
    "t": "per-tensor 't'",
    "s": "static 's'",
    "h": "float16 scales 'h'",
    "b": "bfloat16 scales 'b'",
}
_WHY_NOT = {
    "a": "floating-point formats are symmetric (a sign bit)",
    "f": "'f' widens the integer grid",
    "g": "the format fixes its block size",
    "t": "the format scales blocks, not tensors",
    "h": "the format fixes its scale format",
    "b": "the format fixes its scale format",
    "s": "MX block scales come from each block of the input, there is nothing to calibrate",
}


def _parse_part(text: str, kind: str, token: str, suffix: str) -> QuantArgs | None:
    named = _NAMED_FORMATS.get(token)
    bits = named[0]["bits"] if named else int(token)
    if named is None and bits == 16:
        if suffix:
            raise UserError(f"scheme {text!r}: {kind}16 means unquantized and takes no suffix {suffix!r}")
        return None
    field_name = {"W": "weight", "A": "activation", "KV": "KV", "K": "key", "V": "value"}[kind]
    if named is None and not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"scheme {text!r}: {field_name} bits must be {MIN_BITS}-{MAX_BITS} or 16 (unquantized); got {bits}")
    if named is not None:
        for m in _SUFFIX.finditer(suffix):
            letter = m.group(0)[0]
            if letter not in named[1] and letter in _SUFFIX_MEANING:
                raise UserError(f"scheme {text!r}: {kind}{token} takes no {_SUFFIX_MEANING[letter]}: {_WHY_NOT[letter]}")
    args = _parse_suffixes(text, kind, token, bits, suffix)
    if named is None:
        return args
    fixed = named[0]
    changes = dict(fixed)
    if "group_size" in fixed:
        changes["granularity"] = Granularity.GROUP
    if fixed.get("scale_format") == "float8_e4m3":  # NVFP4's second level
        changes["global_scale"] = "tensor" if kind == "W" or not args.dynamic else "token"
    try:
        return replace(args, **changes)
    except UserError as e:
        raise UserError(f"scheme {text!r}: {kind}{token}: {e}") from None


def _parse_suffixes(text: str, kind: str, token: str, bits: int, suffix: str) -> QuantArgs:
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
                raise UserError(f"scheme {text!r}: {kind}{token} sets its scale format twice ('h' float16, 'b' bfloat16)")
            scale_format = "float16" if m.group(0) == "h" else "bfloat16"
        elif m.group(0) == "a":
            symmetric = False
        elif m.group(0) == "t":
            per_tensor = True
        else:
            static = True
    if pos != len(suffix):
        raise UserError(f"scheme {text!r}: unknown suffix {suffix[pos:]!r} after {kind}{token}; use g<N>, a, t, s, m, f, h, b or c<percent>")
    if full and not symmetric:
        raise UserError(f"scheme {text!r}: 'f' (full signed range) is for symmetric quantization; asymmetric 'a' already uses all 2^N codes")
    if static and kind == "W":
        raise UserError(f"scheme {text!r}: weights are always quantized once; 's' (static) applies to A, K and V")
    if group is not None and (per_tensor or static):
        raise UserError(f"scheme {text!r}: {kind}{token} cannot be both per-group and per-tensor/static")
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
