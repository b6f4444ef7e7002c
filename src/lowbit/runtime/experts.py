"""`QuantExperts`: the module swapped in for a stock fused experts module (`MixtralExperts`,
`Qwen3MoeExperts`, `Qwen2MoeExperts` in transformers 5).

Why a swap: the stock module holds all experts in two 3-D parameters (`gate_up_proj`
[experts, 2 x inner, hidden], `down_proj` [experts, hidden, inner]) and multiplies them directly,
so there is no linear layer per expert to quantize, hook or rotate. `QuantExperts` holds one
linear per expert and projection (an `ExpertMLP`: gate_proj, up_proj, down_proj, each an
`nn.Linear` until it is quantized into a `QuantLinear`) and its forward is the stock eager
forward, line for line, given the router's `(hidden_states, top_k_index, top_k_weights)`: the same
experts in the same order, the same token order within each, the same `index_add_`. With float
weights it reproduces the stock eager experts bit for bit. Everything else of the model (router,
block, decoder layer) stays the stock transformers code.

Gate and up become separate linears (the fused rows split in two, as the stock forward chunks
them): each expert is then exactly a dense Llama-layout MLP for calibration, AWQ's down-input
scales fold into its up rows, and its names match the per-expert checkpoints (`experts.<e>.gate_proj`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchSpec, MoESpec, decoder_layers, expert_dims, get_module, is_moe_layer, set_module


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding `weight` (no random initialisation of a weight about to be replaced)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class ExpertMLP(nn.Module):
    """The three linears of one expert, named as the MoE spec names them (gate, up, down)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name, module in zip(names, (gate, up, down)):
            self.add_module(name, module)

    def forward(self, x: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
        gate, up, down = (self._modules[n] for n in self.names)
        return down(act_fn(gate(x)) * up(x))


class QuantExperts(nn.Module):
    """All experts of one MoE block, one `ExpertMLP` per expert as child `"<e>"` (so an expert's
    linear is at `<experts path>.<e>.gate_proj`)."""

    lowbit_experts = True  # recognised by `arch.expert_dims` without importing this module

    def __init__(self, experts: list[ExpertMLP], act_fn: nn.Module, hidden_size: int, inner_size: int) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.hidden_size, self.inner_size = hidden_size, inner_size
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.act_fn = act_fn  # the stock module's activation (a transformers module, no parameters)

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.num_experts, self.hidden_size, self.inner_size

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    @classmethod
    def from_stock(cls, stock: nn.Module, moe: MoESpec, copy_weights: bool = True) -> QuantExperts:
        """Split a stock fused experts module into per-expert linears (copies of its slices, so
        later in-place edits of one expert touch nothing else); `copy_weights=False` leaves them
        uninitialised (a loader fills them from a file)."""
        n, hidden, inner = expert_dims(stock, moe)
        gate_up, down = getattr(stock, moe.gate_up).detach(), getattr(stock, moe.down).detach()
        experts = []
        for e in range(n):
            if copy_weights:
                parts = (gate_up[e, :inner].clone(), gate_up[e, inner:].clone(), down[e].clone())
            else:
                parts = tuple(torch.empty(shape, dtype=gate_up.dtype) for shape in ((inner, hidden), (inner, hidden), (hidden, inner)))
            experts.append(ExpertMLP(*(_linear(p.to(gate_up.device)) for p in parts), moe.expert_linears))
        return cls(experts, stock.act_fn, hidden, inner)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # The stock eager forward (transformers' MixtralExperts.forward): for each expert hit, its
        # tokens in (top-k slot, token) order, weighted by their routing weight, added in place.
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            slots = top_k_index.T  # [top_k, tokens]: torch.where below yields (slot, token) in the stock order
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where(slots == e)
            if token_idx.numel() == 0:  # the stock loop visits only experts that were hit
                continue
            current = self.expert(e)(hidden_states[token_idx], self.act_fn)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, inner={self.inner_size}"


def swap_in_experts(model: nn.Module, spec: ArchSpec) -> int:
    """Replace every stock experts module of `model` by a `QuantExperts` (in place); returns how
    many were swapped (0 for a dense model, or one already swapped)."""
    if spec.moe is None:
        return 0
    return sum(swap_in_layer_experts(layer, spec) for layer in decoder_layers(model, spec))


def swap_in_layer_experts(layer: nn.Module, spec: ArchSpec) -> bool:
    """`swap_in_experts` for one decoder layer (a layer read from disk by itself); whether it swapped."""
    if spec.moe is None or not is_moe_layer(layer, spec):
        return False
    stock = get_module(layer, spec.moe.experts)
    if isinstance(stock, QuantExperts):
        return False
    set_module(layer, spec.moe.experts, QuantExperts.from_stock(stock, spec.moe))
    return True
