"""PNG plots of an analysis (matplotlib, Agg backend): the figures 1-5 of "Turning LLM Activations Quantization-Friendly" for any model.

- surface_<site>.png   |X| over tokens x channels under each transform (Figs. 1-2)
- layers_<role>.png    per-layer error and activation / weight difficulty per transform (Fig. 4)
- layers_modules.png   the same per input role without a transform (Fig. 3)
- error_vs_difficulty.png   error against activation difficulty^2, set-aside inputs marked
- worst_token.png      sorted |values| of the largest massive-outlier token and the
                       quantization bins it occupies under each transform (Fig. 5)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..quant import quantize
from ..quant.formats import FLOAT_ELEMENTS
from ..scheme import QuantArgs

DPI = 100
SURFACE_BINS = 96  # channels (and tokens) are max-pooled to at most this many bins, so no spike is lost
SURFACE_TOKENS = 64
COLORS = {"none": "tab:gray", "smooth": "tab:blue", "rotate": "tab:orange", "smoothrot": "tab:green"}


def require_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'lowbit[plots]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pool_channels(a: torch.Tensor, bins: int) -> torch.Tensor:
    """Max over consecutive channel blocks: [tokens, c] -> [tokens, <= bins]."""
    c = a.shape[1]
    block = -(-c // bins)
    pad = block * (-(-c // block)) - c
    if pad:
        a = torch.cat([a, a.new_zeros(a.shape[0], pad)], dim=1)
    return a.reshape(a.shape[0], -1, block).amax(dim=2)


def surface(site: str, tensors: dict[str, torch.Tensor], path: Path) -> Path:
    plt = require_pyplot()
    kinds = list(tensors)
    fig = plt.figure(figsize=(4.2 * len(kinds), 3.8))
    for i, kind in enumerate(kinds):
        a = tensors[kind]
        block = -(-a.shape[1] // SURFACE_BINS)
        tblock = -(-a.shape[0] // SURFACE_TOKENS)
        z = _pool_channels(_pool_channels(a, SURFACE_BINS).T, SURFACE_TOKENS).T.numpy()
        tok, ch = torch.meshgrid(torch.arange(z.shape[0]) * tblock, torch.arange(z.shape[1]) * block, indexing="ij")
        ax = fig.add_subplot(1, len(kinds), i + 1, projection="3d")
        ax.plot_surface(ch.numpy(), tok.numpy(), z, cmap="coolwarm", rcount=z.shape[0], ccount=z.shape[1], linewidth=0)
        ax.set_title(f"{site} {kind}\nmax |x| = {float(a.max()):.3g}", fontsize=9)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_ylabel("token", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"|x| at {site}, first sequence (max-pooled in blocks of {block} channels x {tblock} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def layer_curves(layers: list[dict], role: str, transforms: list[str], path: Path) -> Path:
    plt = require_pyplot()
    rows = [e for e in layers if e["role"] == role]
    idx = [e["layer"] for e in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (
        ("layer-wise error ||XW - Q(X)Q(W)||^2", lambda e, k: e["error"][k]),
        ("activation difficulty", lambda e, k: e["activation"][k]["difficulty"]),
        ("weight difficulty", lambda e, k: e["weight"][k]["difficulty"]),
    )
    for ax, (title, get) in zip(axes, panels):
        for kind in transforms:
            ax.plot(idx, [get(e, kind) for e in rows], marker=".", label=kind, color=COLORS.get(kind))
        _layer_axis(ax, f"{role}: {title}")
    return _save_with_legend(fig, axes, path)


def module_curves(layers: list[dict], kind: str, path: Path) -> Path:
    plt = require_pyplot()
    roles = list(dict.fromkeys(e["role"] for e in layers))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (
        ("layer-wise error", lambda e: e["error"][kind]),
        ("activation difficulty", lambda e: e["activation"][kind]["difficulty"]),
        ("weight difficulty", lambda e: e["weight"][kind]["difficulty"]),
    )
    for ax, (title, get) in zip(axes, panels):
        for role in roles:
            rows = [e for e in layers if e["role"] == role]
            ax.plot([e["layer"] for e in rows], [get(e) for e in rows], marker=".", label=role)
        _layer_axis(ax, f"{title} ({kind})")
    return _save_with_legend(fig, axes, path)


def error_scatter(layers: list[dict], aside: set[str], kind: str, path: Path) -> Path:
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for role in dict.fromkeys(e["role"] for e in layers):
        rows = [e for e in layers if e["role"] == role and e["site"] not in aside]
        ax.scatter([e["activation"][kind]["difficulty"] ** 2 for e in rows], [e["error"][kind] for e in rows], s=12, label=role)
    out = [e for e in layers if e["site"] in aside]
    ax.scatter(
        [e["activation"][kind]["difficulty"] ** 2 for e in out],
        [e["error"][kind] for e in out],
        s=40,
        marker="x",
        color="black",
        label="set aside (massive)",
    )
    for e in out:
        ax.annotate(e["site"], (e["activation"][kind]["difficulty"] ** 2, e["error"][kind]), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("activation difficulty^2", fontsize=8)
    ax.set_ylabel("layer-wise error", fontsize=8)
    ax.set_title(f"error vs difficulty^2 ({kind})", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def occupied_bins(token: torch.Tensor, args: QuantArgs) -> int:
    """Distinct codes one token uses under a per-token quantizer."""
    codes, _ = quantize(token.reshape(1, -1), args)
    return int(torch.unique(codes).numel())


def worst_token(site: str, position: str, tokens: dict[str, torch.Tensor], args: QuantArgs, path: Path) -> Path:
    plt = require_pyplot()
    kinds = list(tokens)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        t = tokens[kind].abs()
        ax.plot(torch.sort(t, descending=True).values.numpy(), color=COLORS.get(kind))
        if args.is_float:  # the element values scaled to the token's maximum
            grid = FLOAT_ELEMENTS[args.element].magnitudes.float() * float(t.max()) / FLOAT_ELEMENTS[args.element].max
            boundaries, codes, step = (grid[1:] + grid[:-1]) / 2, 2**args.bits, float(grid[1])
        else:
            step = float(t.max()) / args.qmax
            boundaries, codes = [(k + 0.5) * step for k in range(args.qmax + 1)], args.qmax - args.qmin + 1
        for b in boundaries:  # rounding boundaries
            ax.axhline(float(b), color="lightgray", linewidth=0.5)
        ax.set_yscale("symlog", linthresh=max(step / 4, 1e-6))
        ax.set_title(f"{kind}: {occupied_bins(tokens[kind], args)} of {codes} codes", fontsize=9)
        ax.set_xlabel("channel (sorted by |x|)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("|x|", fontsize=8)
    grid_name = args.format_name.upper() if args.is_float else f"INT{args.bits}"
    fig.suptitle(f"largest massive-outlier token at {site} ({position}); grey: {grid_name} rounding boundaries (one row scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _layer_axis(ax, title: str) -> None:
    """A per-layer curve panel: log scale, small type."""
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)


def _save_with_legend(fig, axes, path: Path) -> Path:
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    require_pyplot().close(fig)
    return path
