"""Weight quantization algorithms, registered by name and config type (`registry`). RTN works on a
weight alone; GPTQ and AWQ need the layer's calibration inputs and run inside the sequential
pipeline (`lowbit.pipeline`)."""

from .awq import AWQConfig
from .gptq import GPTQConfig
from .registry import (
    ALGORITHMS,
    Algorithm,
    AlgorithmResult,
    GroupContext,
    algorithm_names,
    get_algorithm,
    register_algorithm,
    resolve_algorithm,
)
from .rtn import RTNConfig, rtn_weight

__all__ = [
    "ALGORITHMS",
    "AWQConfig",
    "Algorithm",
    "AlgorithmResult",
    "GPTQConfig",
    "GroupContext",
    "RTNConfig",
    "algorithm_names",
    "get_algorithm",
    "register_algorithm",
    "resolve_algorithm",
    "rtn_weight",
]
