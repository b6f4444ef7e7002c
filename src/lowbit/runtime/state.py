"""What a quantized model carries about its quantization: one state object on the model.

Quantizing sets it, saving writes it, loading restores it; exporting and evaluating read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UserError
from ..scheme import Scheme

STATE_ATTR = "lowbit_state"


@dataclass
class QuantizationState:
    scheme: Scheme
    transform: dict = field(default_factory=lambda: {"kind": "none"})  # kind, knobs and what was done (alphas)
    algorithm: str = "rtn"
    algorithm_config: dict = field(default_factory=dict)
    layer_errors: list[dict] = field(default_factory=list)  # per layer and input group, from the pipeline
    source: str | None = None  # the folder it was loaded from, if any

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme.to_dict(),
            "transform": self.transform,
            "algorithm": self.algorithm,
            "algorithm_config": self.algorithm_config,
        }


def quantization_state(model: nn.Module) -> QuantizationState | None:
    """The model's quantization state, None for a model lowbit has not quantized."""
    return getattr(model, STATE_ATTR, None)


def require_state(model: nn.Module, action: str) -> QuantizationState:
    state = quantization_state(model)
    if state is None:
        raise UserError(f"cannot {action}: this model was not quantized by lowbit; quantize it with lowbit.quantize first")
    return state


def set_quantization_state(model: nn.Module, state: QuantizationState) -> None:
    # a plain attribute (not a submodule): nn.Module keeps it, deepcopy copies it
    object.__setattr__(model, STATE_ATTR, state)
