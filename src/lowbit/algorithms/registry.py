"""The algorithm registry: an algorithm is a config dataclass plus a function, registered once.

    @register_algorithm("myalgo", MyConfig, statistics=MyStats)   # statistics: None = no calibration
    def my_algorithm(weight, stats, args, config, context) -> AlgorithmResult: ...

`weight` is the [out, in] float weight of all linears that read one input (stacked), `stats` the
object `statistics(columns, config, device)` built and fed every calibration batch of that input
through `add_batch(x)` (None without calibration), `args` the weight's `QuantArgs`, `config` an
instance of the config type, `context` what the pipeline knows about the input (`GroupContext`).
The result is a `QuantizedWeight` and, where the algorithm has them, per-channel input scales the
pipeline folds into the input's producer.

Under torch.distributed each process feeds the statistics object its share of the calibration
samples; the pipeline then calls its `reduce()` (on every rank, in the same order), which must
combine the ranks' statistics so that every rank holds those of all samples, as one process
would. A statistics object that draws a random number per row may also have `skip(rows)`, called
before the first batch with the rows the ranks before this one see, to draw the numbers one
process would. An algorithm registered with `separable_rows=True` quantizes each output row on
its own given the statistics (GPTQ): the pipeline may then quantize a group's linears apart, on
different ranks, and combines their errors weighted by `AlgorithmResult.error_weight`. An
algorithm registered with `input_scales=False` never returns input scales (GPTQ): the pipeline may
then run each layer in one pass in front of a quantized V cache too (`lowbit.pipeline`).

The pipeline, recipes, CLI and reports learn the names
and knobs from here (knobs are the config's dataclass fields, type-checked), as torchao's handler
registry does with its config types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from ..errors import UserError
from ..fields import dataclass_from_dict
from ..quant.qweight import QuantizedWeight
from ..scheme import QuantArgs


@dataclass
class GroupContext:
    """What an algorithm may use about the input its linears read."""

    input_args: QuantArgs | None = None  # how the input itself is quantized (None: not)
    scalable: bool = False  # its producer can absorb per-channel input scales (a norm gain, a linear's rows)
    # makes a per-channel vector equal across channels that must share a scale (heads sharing a KV head)
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class AlgorithmResult:
    qweight: QuantizedWeight
    input_scales: torch.Tensor | None = None  # the input is to be divided by these (None: unchanged)
    errors: dict[str, float | bool] = field(default_factory=dict)  # reported per layer and group
    # The denominator of relative errors (e.g. ||X W^T||^2): the errors of parts of a group's rows
    # combine into the group's as sum(error x weight) / sum(weight). None: weighted by size.
    error_weight: float | None = None


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_type: type
    quantize: Callable[..., AlgorithmResult]
    statistics: Callable | None = None  # (columns, config, device) -> collector with add_batch(x)
    separable_rows: bool = False  # each output row quantized on its own given the statistics
    # may return input scales to fold into the input's producer
    input_scales: bool = True

    @property
    def calibrated(self) -> bool:
        """Runs layer by layer on calibration inputs (needs --calib)."""
        return self.statistics is not None

    def knobs(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.config_type) if f.init)

    def config(self, knobs: dict | None = None, where: str = "") -> object:
        """The config from `knobs` (name -> value), type-checked."""
        return dataclass_from_dict(self.config_type, knobs or {}, where or f"{self.name} settings")

    def check(self, config: object, args: QuantArgs | None) -> None:
        if not isinstance(config, self.config_type):
            raise UserError(f"{self.name} takes a {self.config_type.__name__}; got {type(config).__name__}")
        check = getattr(config, "check", None)
        if check is not None:
            check(args)


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, config_type: type, *, statistics: Callable | None = None, separable_rows: bool = False, input_scales: bool = True):
    """Register the decorated function as algorithm `name` with config dataclass `config_type`
    (`statistics`, `separable_rows` and `input_scales`: the module docstring)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"algorithm names are letters, digits, '-' and '_'; got {name!r}")

    def decorate(fn: Callable[..., AlgorithmResult]) -> Callable[..., AlgorithmResult]:
        for other in ALGORITHMS.values():
            if other.config_type is config_type and other.name != name:
                raise ValueError(f"{config_type.__name__} is already the config of algorithm {other.name!r}")
        ALGORITHMS[name] = Algorithm(name, config_type, fn, statistics, separable_rows, input_scales)
        return fn

    return decorate


def algorithm_names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def get_algorithm(name_or_config) -> Algorithm:
    """The algorithm registered under a name, or for a config instance's type."""
    if isinstance(name_or_config, str):
        if name_or_config not in ALGORITHMS:
            raise UserError(f"unknown algorithm {name_or_config!r}; available: {', '.join(ALGORITHMS)}")
        return ALGORITHMS[name_or_config]
    for algorithm in ALGORITHMS.values():
        if type(name_or_config) is algorithm.config_type:
            return algorithm
    raise UserError(f"no algorithm is registered for config type {type(name_or_config).__name__}")


def resolve_algorithm(algorithm) -> tuple[Algorithm, object]:
    """(algorithm, its config) from a name (default config) or a config instance."""
    found = get_algorithm(algorithm)
    return found, (found.config_type() if isinstance(algorithm, str) else algorithm)
