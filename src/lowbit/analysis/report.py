"""report.md of an analysis: the findings first, then the tables behind them, then the plots."""

from __future__ import annotations

from .findings import fmt


def _e(x: float) -> str:
    return f"{x:.3g}"


def analysis_markdown(result: dict, plots: list[str] = ()) -> str:
    t = result["transforms"]
    s = result["sample"]
    th = result["thresholds"]
    lines = [
        f"# lowbit analyze: {result['model']} ({result['family']})",
        "",
        f"- sample: {s['sequences']} sequences x {s['seq_len']} tokens = {s['tokens']} tokens ({result.get('data', '-')})",
        f"- quantization: {result['scheme']} ({result['quantization']['method']}; weights "
        f"{_q(result['quantization']['weights'])}, activations {_q(result['quantization']['activations'])}), "
        f"transforms {', '.join(t)}, smoothing alpha {result['alpha']}, Hadamard {result['hadamard']}",
        f"- massive outlier: |x| >= {th['massive_ratio']:g} x the median over tokens of each token's max |x|; systematic "
        f"channel: |x| >= {th['systematic_ratio']:g} x the token's median |x| in >= {th['systematic_fraction']:.0%} of tokens",
        "- error = ||XW - Q(X)Q(W)||_F^2 summed over the linears reading an input; difficulty = std of the input channels' L2 norms",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in result["recommendation"]],
    ]
    corr = result["correlation_error_vs_difficulty_sq"]
    if "none" in corr:
        c = corr["none"]
        lines.append(
            f"- error vs activation difficulty^2 (no transform): Pearson r = {fmt(c['all'])} over all {c['points']} inputs, "
            f"r = {fmt(c['without_set_aside'])} over {c['points_kept']} with the massive-outlier inputs set aside "
            f"(rank correlation: {fmt(c['spearman_all'])} and {fmt(c['spearman_without_set_aside'])})"
        )
    for a in result["set_aside"]:
        lines.append(f"  - set aside {a['site']}: {a['reason']}")
    worse = result.get("rotate_worse_than_none")
    if worse is not None:
        lines.append(
            f"- rotation gives a higher error than no transform at {len(worse)} of {len(result['layers'])} inputs"
            + (": " + ", ".join(f"{w['site']} ({w['ratio']:.2f}x{', massive' if w['massive_tokens'] else ''})" for w in worse) if worse else "")
        )
    th_sum = result.get("theory")
    if th_sum:
        lines.append(
            f"- theory check over {th_sum['tokens']} massive-outlier tokens, median measured / predicted max: after rotation "
            f"{th_sum['rotate_measured_over_eq8']:.3f} (eq. 8 with |eps| = sigma; {th_sum['rotate_measured_over_eq8_outlier_part']:.3f} "
            f"against the outlier part alone), after smooth rotation {th_sum['smoothrot_measured_over_eq9']:.3f} (eq. 9 as "
            f"written), {th_sum['smoothrot_measured_over_eq9_plus_eps']:.3f} (eq. 9 + sigma of the smoothed token's other entries)"
        )
    lines += ["", "## Total error by input role", "", "| role | " + " | ".join(t) + " | lowest in (layers) |", "|---|" + "---|" * (len(t) + 1)]
    for role, r in result["by_role"].items():
        cells = [("**" + _e(r["total_error"][k]) + "**") if k == r["best"] else _e(r["total_error"][k]) for k in t]
        lines.append(f"| {role} | " + " | ".join(cells) + " | " + ", ".join(f"{k} {r['wins'][k]}" for k in t) + " |")
    lines += _massive_table(result)
    lines += _systematic_table(result)
    lines += [
        "",
        "## Per input",
        "",
        "| input | "
        + " | ".join(f"error {k}" for k in t)
        + " | act. difficulty "
        + " / ".join(t)
        + " | weight difficulty "
        + " / ".join(t)
        + " | max abs | kurtosis |",
        "|---|" + "---|" * (len(t) + 4),
    ]
    for e in result["layers"]:
        lines.append(
            f"| {e['site']} | "
            + " | ".join(_e(e["error"][k]) for k in t)
            + " | "
            + " / ".join(_e(e["activation"][k]["difficulty"]) for k in t)
            + " | "
            + " / ".join(_e(e["weight"][k]["difficulty"]) for k in t)
            + f" | {_e(e['max_abs'])} | {_e(e['activation'][t[0]]['kurtosis'])} |"
        )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", f"Wall time {result['seconds']:.1f} s (lowbit {result['lowbit_version']}).", ""]
    return "\n".join(lines)


def _q(args: dict | None) -> str:
    if args is None:
        return "not quantized"
    sym = "symmetric" if args["symmetric"] else "asymmetric"
    gran = f"groups of {args['group_size']}" if args["group_size"] else f"per-{args['granularity']}"
    clip = "" if args["clip_ratio"] == 1.0 and args["observer"] == "minmax" else f", {args['observer']} clip {args['clip_ratio']}"
    return f"INT{args['bits']} {sym} {gran}{clip}"


def _massive_table(result: dict) -> list[str]:
    rows = result["massive_outliers"]
    lines = ["", "## Massive outliers", ""]
    if not rows:
        return lines + ["None at the chosen threshold."]
    lines += [
        "Each row is one token; predicted maxima from eq. 8 of 'Turning LLM Activations Quantization-Friendly' (rotation; |eps| = std of "
        "the token's other entries) "
        "and eq. 9 (smoothing with alpha 0.5, then rotation; as written, and + the std of the smoothed token's other entries)"
        + ("." if result["alpha"] == 0.5 else f"; eq. 9 assumes alpha 0.5, this run smoothed with alpha {result['alpha']}."),
        "",
        "| input | sequence:position | token | channels | values | max \\|x\\| | rotate eq. 8 | rotate measured | smoothrot eq. 9 | eq. 9 "
        "+ eps | smoothrot measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        token = repr(r["token"]).replace("|", "\\|")
        lines.append(
            f"| {r['site']} | {r['sequence']}:{r['position']} | {token} | {', '.join(map(str, r['outlier_channels']))} | "
            f"{', '.join(f'{v:.4g}' for v in r['outlier_values'])} | {r['max_abs']:.4g} | {r['rotate_eq8']:.4g} | "
            f"{r['rotate_measured']:.4g} | {r['smoothrot_eq9']:.4g} | {r['smoothrot_eq9_plus_eps']:.4g} | {r['smoothrot_measured']:.4g} |"
        )
    return lines


def _systematic_table(result: dict) -> list[str]:
    found = [e for e in result["layers"] if e["systematic_channels"]]
    lines = ["", "## Systematic outlier channels", ""]
    if not found:
        return lines + ["None at the chosen thresholds."]
    lines += ["| input | channels (share of tokens, mean abs / typical median) |", "|---|---|"]
    for e in found:
        ch = e["systematic_channels"]
        shown = ", ".join(f"{c['channel']} ({c['token_share']:.0%}, {c['mean_abs_over_typical_median']:.0f}x)" for c in ch[:8])
        lines.append(f"| {e['site']} | {shown}{f' and {len(ch) - 8} more' if len(ch) > 8 else ''} |")
    return lines
