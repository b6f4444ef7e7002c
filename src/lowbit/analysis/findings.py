"""What the measurements say: correlation of error with difficulty^2, the best transform per
input role, where rotation is worse than no transform, and a recommendation. Pure functions of
the analysis dict, so the report and the tests read the same numbers."""

from __future__ import annotations

import math
from statistics import median

from .metrics import pearson, spearman


def set_aside(layers: list[dict]) -> list[dict]:
    """Inputs left out of the correlation, with the reason: those holding massive outliers, whose
    error is made by a few tokens rather than by the spread of channel magnitudes ("Turning LLM Activations Quantization-Friendly" sets
    aside down_proj 1/30/31 and gate_proj 31 of LLaMA2-7B for this reason)."""
    return [
        {
            "site": entry["site"],
            "reason": f"{entry['massive_tokens']} massive-outlier token(s), max |x| {entry['max_abs']:.1f} "
            f"= {entry['max_abs'] / entry['typical_token_max']:.0f}x the typical token maximum",
        }
        for entry in layers
        if entry["massive_tokens"]
    ]


def correlations(layers: list[dict], transforms: list[str]) -> dict:
    aside = {a["site"] for a in set_aside(layers)}
    out = {}
    for kind in transforms:
        err = [e["error"][kind] for e in layers]
        d2 = [e["activation"][kind]["difficulty"] ** 2 for e in layers]
        kept = [i for i, e in enumerate(layers) if e["site"] not in aside]
        out[kind] = {
            "all": pearson(d2, err),
            "points": len(layers),
            "without_set_aside": pearson([d2[i] for i in kept], [err[i] for i in kept]),
            "points_kept": len(kept),
            # Pearson on raw values is led by the few largest errors; the rank correlation is not
            "spearman_all": spearman(d2, err),
            "spearman_without_set_aside": spearman([d2[i] for i in kept], [err[i] for i in kept]),
        }
    return out


def best_by_role(layers: list[dict], transforms: list[str]) -> dict:
    roles: dict[str, dict] = {}
    for entry in layers:
        r = roles.setdefault(entry["role"], {"total_error": dict.fromkeys(transforms, 0.0), "wins": dict.fromkeys(transforms, 0), "layers": 0})
        r["layers"] += 1
        for kind in transforms:
            r["total_error"][kind] += entry["error"][kind]
        r["wins"][min(transforms, key=lambda k: entry["error"][k])] += 1
    for r in roles.values():
        r["best"] = min(transforms, key=lambda k: r["total_error"][k])
    return roles


def theory_summary(rows: list[dict]) -> dict:
    """Median measured / predicted ratio of eq. 8 and eq. 9 over the massive-outlier tokens."""
    if not rows:
        return {}
    return {
        "tokens": len(rows),
        "rotate_measured_over_eq8": median(r["rotate_measured"] / r["rotate_eq8"] for r in rows),
        "smoothrot_measured_over_eq9": median(r["smoothrot_measured"] / r["smoothrot_eq9"] for r in rows if r["smoothrot_eq9"] > 0),
        "smoothrot_measured_over_eq9_plus_eps": median(
            r["smoothrot_measured"] / r["smoothrot_eq9_plus_eps"] for r in rows if r["smoothrot_eq9_plus_eps"] > 0
        ),
        "rotate_measured_over_eq8_outlier_part": median(r["rotate_measured"] / r["rotate_eq8_outlier_part"] for r in rows),
    }


def recommendation(layers: list[dict], roles: dict, transforms: list[str]) -> list[str]:
    lines = []
    for role, r in roles.items():
        ranked = sorted(transforms, key=lambda k: r["total_error"][k])
        wins = ", ".join(f"{k} {r['wins'][k]}" for k in ranked)
        lines.append(f"{role}: {r['best']} gives the lowest total error (lowest in layers: {wins} of {r['layers']})")
    massive = [e for e in layers if e["massive_tokens"]]
    if massive and {"rotate", "smoothrot", "none"} <= set(transforms):
        helped = [e["site"] for e in massive if e["error"]["smoothrot"] < e["error"]["rotate"]]
        worse = [e["site"] for e in massive if e["error"]["rotate"] > e["error"]["none"]]
        lines.append(
            f"inputs with massive outliers ({', '.join(e['site'] for e in massive)}): smooth rotation beats rotation in "
            f"{len(helped)} of {len(massive)}; rotation is worse than no transform in {len(worse)} ({', '.join(worse) or 'none'})"
        )
        if len(helped) * 2 > len(massive):
            roles_m = sorted({e["role"] for e in massive})
            lines.append(f"recommendation: smooth rotation at least where massive outliers live ({', '.join(roles_m)} inputs)")
    elif not massive:
        lines.append("no massive outliers at the chosen threshold: rotation alone has no massive token to spread")
    return lines


def add_findings(result: dict) -> None:
    layers, transforms = result["layers"], result["transforms"]
    result["set_aside"] = set_aside(layers)
    result["correlation_error_vs_difficulty_sq"] = correlations(layers, transforms)
    roles = best_by_role(layers, transforms)
    result["by_role"] = roles
    if {"rotate", "none"} <= set(transforms):
        result["rotate_worse_than_none"] = [
            {"site": e["site"], "massive_tokens": e["massive_tokens"], "ratio": e["error"]["rotate"] / e["error"]["none"]}
            for e in layers
            if e["error"]["rotate"] > e["error"]["none"]
        ]
    result["theory"] = theory_summary(result["massive_outliers"])
    result["recommendation"] = recommendation(layers, roles, transforms)


def fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
