"""Capture the input of every linear in every decoder block with forward pre-hooks on the stock model.

Linears that read the same tensor (an `arch.InputGroup`: q/k/v, o, gate/up, down) are one
*input site*: its tensor is handed, one batch at a time, to a consumer and then dropped, so the
inputs of all layers never sit in memory together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ArchSpec, InputGroup, decoder_layers, get_module
from ..progress import progress_bar


@dataclass(frozen=True)
class InputSite:
    """One captured input: decoder layer `layer`, read by the linears of `group`."""

    layer: int
    group: InputGroup

    @property
    def role(self) -> str:
        return self.group.role

    @property
    def name(self) -> str:
        return f"{self.role}.{self.layer}"

    def linears(self, model: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
        layer = decoder_layers(model, spec)[self.layer]
        return {name: get_module(layer, name) for name in self.group.linears}


def input_sites(model: nn.Module, spec: ArchSpec) -> list[InputSite]:
    return [InputSite(i, g) for i in range(len(decoder_layers(model, spec))) for g in spec.input_groups]


@torch.no_grad()
def stream_inputs(
    model: nn.Module,
    spec: ArchSpec,
    batches: Iterable[torch.Tensor],
    consume: Callable[[InputSite, torch.Tensor, int], None],
    *,
    progress: bool = True,
    desc: str = "capturing inputs",
) -> None:
    """Run `batches` ([b, seq] token ids) through the model; every site's input, flattened to
    [b * seq, channels] in fp32, goes to `consume(site, x, first_token_index)`. The progress bar
    counts inputs consumed (sites x batches)."""
    batches = list(batches)
    sites = input_sites(model, spec)
    offset = [0]
    handles = []
    bar = progress_bar(total=len(sites) * len(batches), desc=desc, unit="input", disable=not progress, leave=False)
    for site in sites:
        first = next(iter(site.linears(model, spec).values()))

        def hook(module, args, site=site):
            x = args[0]
            consume(site, x.reshape(-1, x.shape[-1]).float(), offset[0])
            bar.update(1)

        handles.append(first.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            offset[0] += ids.numel()
    finally:
        bar.close()
        for h in handles:
            h.remove()
