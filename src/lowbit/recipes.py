"""Recipes: a named or saved (YAML) combination of scheme, transform and algorithm."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .algorithms.registry import ALGORITHMS, get_algorithm
from .errors import UserError
from .fields import dataclass_from_dict
from .scheme import Scheme, parse_scheme
from .transforms.apply import TransformConfig


@dataclass(frozen=True)
class Recipe:
    """Scheme, transform and algorithm (a registered name, with its config: the default one if None)."""

    scheme: Scheme
    transform: TransformConfig = field(default_factory=TransformConfig)
    algorithm: str = "rtn"
    algorithm_config: object | None = None

    def __post_init__(self) -> None:
        if isinstance(self.transform, str):
            object.__setattr__(self, "transform", TransformConfig(kind=self.transform))
        found = get_algorithm(self.algorithm)
        if self.algorithm_config is None:
            object.__setattr__(self, "algorithm_config", found.config_type())
        found.check(self.algorithm_config, self.scheme.weights)

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed; a new algorithm starts from its default config."""
        if "algorithm" in changes and changes["algorithm"] != self.algorithm and "algorithm_config" not in changes:
            changes["algorithm_config"] = None
        return dataclasses.replace(self, **changes)


NAMED: dict[str, dict] = {
    # Recommended: the best lowbit knows for each target, measured side by side with llm-compressor
    # (benchmarks/compare). Symmetric grids use the full signed range (`f`: scale max/7.5, codes
    # -8..7), compressed-tensors' grid. With 4-bit activations or KV, `auto` chooses the transform
    # of every input group by its measured error (it beat one rotation for all: 35.59 vs 38.47 at
    # W4A4KV4 with GPTQ), and the first token, where SmolLM2's massive activations sit, keeps its
    # activations and KV in full precision (P1; PrefixQuant, IntactKV). w8a8 stays a SmoothQuant
    # recipe that vLLM serves (compressed-tensors export); `w8a8-auto-rtn` is closer to FP but
    # rotates online. Weight scales are MSE-searched before GPTQ: GPTQ at W4A16 26.68 against 32.05
    # with MinMax scales (llm-compressor's GPTQ: 31.01 with MinMax, 26.77 with its MSE observer; the
    # same scale format, so it exports alike), w4a4kv4 32.46 against 34.74. w4a16 and w4a4kv4 are
    # GPTAQ (GPTQ fitted to the full-precision layer's outputs, alpha 0.25) on those scales: 25.30
    # against GPTQ's 26.68 in 282 s against 155 s (`w4a16-gptq-mse` is the GPTQ recipe), 30.80
    # against 32.46 in 533 s against 470 s (`w4a4kv4-gptq`). w4a8kv4 keeps GPTQ: GPTAQ there is not
    # measured yet.
    "w4a16": {"scheme": "W4fmA16", "algorithm": "gptq", "asymmetric": True},
    "w8a8": {"scheme": "W8fA8f", "transform": "smooth", "alpha": 0.5, "algorithm": "gptq"},
    "w4a8kv4": {"scheme": "W4fmA8fKV4fP1", "transform": "auto", "algorithm": "gptq"},
    "w4a4kv4": {"scheme": "W4fmA4fKV4fP1", "transform": "auto", "algorithm": "gptq", "asymmetric": True},
    # explicit variants
    "w8a8kv8-rtn": {"scheme": "W8A8KV8"},
    "w8a8-rtn": {"scheme": "W8A8"},
    "w4a16-rtn": {"scheme": "W4A16"},
    "w4g64a16-rtn": {"scheme": "W4g64A16"},
    "w4a8kv4-rtn": {"scheme": "W4A8KV4"},
    "w4a4kv4-rtn": {"scheme": "W4A4KV4"},
    "w8a8-smooth-rtn": {"scheme": "W8A8", "transform": "smooth", "alpha": 0.5},
    "w8a8kv8-smooth-rtn": {"scheme": "W8A8KV8", "transform": "smooth", "alpha": 0.5},
    "w4a8kv4-smoothrot-rtn": {"scheme": "W4A8KV4", "transform": "smoothrot", "smooth_all": True, "alpha": "search"},
    "w4a4kv4-rotate-rtn": {"scheme": "W4A4KV4", "transform": "rotate"},
    "w4a4kv4-smoothrot-rtn": {"scheme": "W4A4KV4", "transform": "smoothrot", "smooth_all": True, "alpha": "search"},
    # per input group, the lowest measured quantized output error of none, smooth, rotate, smoothrot
    "w4a4kv4-auto-rtn": {"scheme": "W4fA4fKV4f", "transform": "auto"},
    "w8a8-auto-rtn": {"scheme": "W8fA8f", "transform": "auto"},
    "w4a8kv4-rotate-online-rtn": {"scheme": "W4A8KV4", "transform": "rotate", "fuse_r1": False, "fold_norms": False},
    # calibration-based (layer by layer)
    "w4a16-gptq": {"scheme": "W4fA16", "algorithm": "gptq"},  # full-range grid: better for GPTQ here (README)
    "w4a16-gptq-mse": {"scheme": "W4fmA16", "algorithm": "gptq"},
    "w4g64a16-gptq": {"scheme": "W4g64A16", "algorithm": "gptq"},
    "w3g64a16-gptq": {"scheme": "W3g64A16", "algorithm": "gptq"},
    "w4a16-awq": {"scheme": "W4A16", "algorithm": "awq"},
    "w4g64a16-awq": {"scheme": "W4g64A16", "algorithm": "awq"},
    "w8a8-smoothquant": {"scheme": "W8A8", "transform": "smooth", "alpha": 0.5},
    "w8a8-smoothquant-gptq": {"scheme": "W8A8", "transform": "smooth", "alpha": 0.5, "algorithm": "gptq"},
    "w4a8kv4-smoothrot-gptq": {"scheme": "W4A8KV4", "transform": "smoothrot", "smooth_all": True, "alpha": "search", "algorithm": "gptq"},
    "w4a4kv4-rotate-gptq": {"scheme": "W4A4KV4", "transform": "rotate", "algorithm": "gptq"},
    # R1 online, norm gains left in place: better than fused on models whose norm gains vary widely (README), at a run-time rotation's cost
    "w4a4kv4-rotate-online-gptq": {"scheme": "W4A4KV4", "transform": "rotate", "fuse_r1": False, "fold_norms": False, "algorithm": "gptq"},
    # transform auto, then GPTQ: 35.59 vs 38.47 with one online rotation for all (benchmarks/compare row w4a4kv4-auto-gptq)
    "w4a4kv4-auto-gptq": {"scheme": "W4fA4fKV4f", "transform": "auto", "algorithm": "gptq"},
    # the recommended w4a4kv4 with GPTQ instead of GPTAQ
    "w4a4kv4-gptq": {"scheme": "W4fmA4fKV4fP1", "transform": "auto", "algorithm": "gptq"},
    "w4a4kv4-smoothrot-gptq": {"scheme": "W4A4KV4", "transform": "smoothrot", "smooth_all": True, "alpha": "search", "algorithm": "gptq"},
    # floating-point and microscaling formats; "bh" = block-diagonal Hadamard of the format's block at
    # every linear's input (MR-GPTQ's recipe with GPTQ on the format's grid)
    "fp8-rtn": {"scheme": "Wfp8Afp8KVfp8"},
    "mxfp8-rtn": {"scheme": "Wmxfp8Amxfp8KVmxfp8"},
    "nvfp4a16-gptq": {"scheme": "Wnvfp4A16", "algorithm": "gptq"},
    "mxfp4a16-gptq": {"scheme": "Wmxfp4A16", "algorithm": "gptq"},
    "nvfp4-gptq": {"scheme": "Wnvfp4Anvfp4KVnvfp4", "algorithm": "gptq"},
    "nvfp4-bh-gptq": {
        "scheme": "Wnvfp4Anvfp4KVnvfp4",
        "transform": "rotate",
        "fuse_r1": False,
        "fold_norms": False,
        "rotation_block": 16,
        "algorithm": "gptq",
    },
    "mxfp4-bh-gptq": {
        "scheme": "Wmxfp4Amxfp4KVmxfp4",
        "transform": "rotate",
        "fuse_r1": False,
        "fold_norms": False,
        "rotation_block": 32,
        "algorithm": "gptq",
    },
    # export-ready recipes: the best lowbit does inside a serving engine's layouts (`lowbit export`)
    # llama.cpp: blocks of 32 with float16 scales (Q4_0, Q8_0), and the Q8_0 blocks llama.cpp's CPU
    # backend quantizes activations to before its integer dot products
    "gguf-q4_0": {"scheme": "W4g32fhA8g32h", "algorithm": "gptq"},
    "gguf-q8_0": {"scheme": "W8g32hA8g32h", "algorithm": "gptq"},
    # vLLM (compressed-tensors): weight-only int4 with scales in the served bfloat16, W8A8 on vLLM's
    # int8 activation grid (scale max/127), FP8 with an FP8 KV cache
    "vllm-w4a16-gptq": {"scheme": "W4g64bA16", "algorithm": "gptq"},
    "vllm-w8a8-smoothquant-gptq": {"scheme": "W8A8", "transform": "smooth", "alpha": 0.5, "algorithm": "gptq"},
    "vllm-fp8-kv-fp8": {"scheme": "Wfp8Afp8KVfp8s"},
}
RECOMMENDED = ("w4a16", "w8a8", "w4a8kv4", "w4a4kv4")  # one per target, the first four of NAMED
TRANSFORM_KNOBS = (
    "smooth_all",
    "r1",
    "r2",
    "r3",
    "r4",
    "seed",
    "fuse_r1",
    "fold_norms",
    "rotation_block",
    "learn_rotation",
    "learn_steps",
    "learn_lr",
    "learn_per_layer",
)


def load_recipe(name_or_file: str) -> Recipe:
    if name_or_file in NAMED:
        return recipe_from_dict(NAMED[name_or_file], name_or_file)
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping with keys scheme, transform, algorithm")
        return recipe_from_dict(data, str(path))
    raise UserError(f"unknown recipe {name_or_file!r}; named recipes: {', '.join(NAMED)}, or a .yaml file")


def recipe_from_dict(data: dict, where: str) -> Recipe:
    """scheme, transform, algorithm, alpha, the transform's knobs and the algorithm's config fields."""
    if "scheme" not in data:
        raise UserError(f"recipe {where}: missing 'scheme'")
    for key in ("scheme", "transform", "algorithm"):
        if key in data and not isinstance(data[key], str):
            raise UserError(f"recipe {where}: {key} must be a string; got {data[key]!r}")
    algorithm = get_algorithm(data.get("algorithm", "rtn"))
    transform_knobs = {k: data[k] for k in TRANSFORM_KNOBS if k in data}
    algorithm_knobs = {k: v for k, v in data.items() if k in algorithm.knobs()}
    unknown = set(data) - {"scheme", "transform", "algorithm", "alpha", *transform_knobs, *algorithm_knobs}
    if unknown:
        others = sorted(name for name, other in ALGORITHMS.items() if set(unknown) & set(other.knobs()))
        hint = f" ({', '.join(sorted(unknown))} belong to {', '.join(others)})" if others else ""
        raise UserError(
            f"recipe {where}: unknown keys {', '.join(sorted(unknown))} for algorithm {algorithm.name}{hint}; known: "
            f"{', '.join(sorted({'scheme', 'transform', 'algorithm', 'alpha', *TRANSFORM_KNOBS, *algorithm.knobs()}))}"
        )
    transform = dataclass_from_dict(TransformConfig, {"kind": data.get("transform", "none"), **transform_knobs}, f"recipe {where}")
    return Recipe(
        scheme=parse_scheme(data["scheme"]),
        # auto's smoothing candidates search alpha unless the recipe fixes one
        transform=dataclasses.replace(transform, alpha=parse_alpha(data.get("alpha", "search" if transform.kind == "auto" else 0.5))),
        algorithm=algorithm.name,
        algorithm_config=algorithm.config(algorithm_knobs, f"recipe {where}"),
    )


def parse_alpha(value) -> float | None:
    """A number in [0, 1], or 'search' (None) for the per-layer grid search."""
    if value is None or str(value).lower() == "search":
        return None
    if isinstance(value, bool):
        raise UserError(f"alpha must be a number in [0, 1] or 'search'; got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"alpha must be a number in [0, 1] or 'search'; got {value!r}") from None
