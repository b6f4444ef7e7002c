"""PTQ table on the default model: RTN, GPTQ and AWQ per scheme and transform, with WikiText-2
perplexity, quantization wall time and peak resident memory.

Every row runs in a fresh process (so its peak RSS is its own): load the model, draw the
calibration set (random non-overlapping 512-token windows of the calibration half of the gensim
Wikipedia sample, never the evaluation text), quantize in place, record time and peak RSS, then
evaluate on the first N windows of 2048 tokens of the WikiText-2 raw test file (token-level
perplexity, no BOS; the protocol of GPTQ, SmoothQuant and QuaRot). Rows are appended to results/NAME.jsonl as they
finish, so an interrupted run resumes; results/NAME.{json,md} are written from all rows.

    python benchmarks/ptq_table.py --name ptq_wikitext2 --windows 10
    python benchmarks/ptq_table.py --name ptq_headline --windows 40 \
        --rows W4A16/none/gptq,W8A8/smooth/gptq,W4A4KV4/rotate/gptq
    python benchmarks/ptq_table.py --name ptq_wikitext2 --render   # tables from the .jsonl only

A row may end with pipeline options: `/bf16` (calibration forwards under bfloat16 autocast; Hessians
and weights stay fp32), `/noactorder` (GPTQ in natural column order), e.g. W4A16/none/gptq/bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WEIGHT_ONLY = ["W4A16", "W4g64A16", "W3g64A16"]
ROWS = (
    ["FP32/none/none"]
    + [f"{s}/none/{a}" for s in WEIGHT_ONLY for a in ("rtn", "gptq", "awq")]
    + ["W8A8/none/rtn", "W8A8/none/gptq", "W8A8/none/awq", "W8A8/smooth/rtn", "W8A8/smooth/gptq"]
    + ["W4A8KV4/none/rtn", "W4A8KV4/none/gptq", "W4A8KV4/none/awq"]
    + ["W4A4KV4/rotate/rtn", "W4A4KV4/rotate/gptq"]
)
# RTN rows first (their timings are ~1 s, so they can share the machine), then GPTQ, then AWQ
ROWS = [r for a in ("none", "rtn", "gptq", "awq") for r in ROWS if r.endswith("/" + a)]
SCHEME_ORDER = ["FP32", *WEIGHT_ONLY, "W8A8", "W4A8KV4", "W4A4KV4"]
TRANSFORM_ORDER = ["none", "smooth", "smooth-search", "rotate", "rotate-online", "smoothrot", "smoothrot-all-search"]
ALGORITHM_ORDER = ["none", "rtn", "gptq", "awq"]


def sort_key(r: dict) -> tuple:
    def index(order, value):
        return order.index(value) if value in order else len(order)

    return (
        index(SCHEME_ORDER, r["scheme"]),
        index(TRANSFORM_ORDER, r["transform"]),
        index(ALGORITHM_ORDER, r["algorithm"]),
        r.get("options", ""),
    )


def transform_variants():
    from lowbit.transforms.apply import TransformConfig

    return {
        "none": TransformConfig("none"),
        "smooth": TransformConfig("smooth", alpha=0.5),  # SmoothQuant
        "smooth-search": TransformConfig("smooth", alpha=None),
        "rotate": TransformConfig("rotate"),  # QuaRot: norms folded, fused R1, R2, online R3/R4
        "rotate-online": TransformConfig("rotate", fuse_r1=False, fold_norms=False),
        "smoothrot": TransformConfig("smoothrot"),  # smoothing at down_proj only ("Turning LLM Activations Quantization-Friendly")
        "smoothrot-all-search": TransformConfig("smoothrot", smooth_all=True, alpha=None),
        # block-diagonal Hadamard of a format's block size, at every linear's input (MR-GPTQ, BRQ)
        "bh16": TransformConfig("rotate", fuse_r1=False, fold_norms=False, rotation_block=16),
        "bh32": TransformConfig("rotate", fuse_r1=False, fold_norms=False, rotation_block=32),
    }


def row_settings(algorithm: str, options: list[str]):
    """(the algorithm with its config, the pipeline settings) of a row's options."""
    from lowbit import GPTQConfig, PipelineConfig

    unknown = set(options) - {"bf16", "noactorder"}
    if unknown:
        raise SystemExit(f"unknown row options {sorted(unknown)}; known: bf16, noactorder")
    chosen = GPTQConfig(act_order="noactorder" not in options) if algorithm == "gptq" else algorithm
    return chosen, PipelineConfig(dtype="bfloat16" if "bf16" in options else "float32")


def run_row(row: str, args) -> dict:
    """One setting, measured in this process."""
    import resource

    import torch

    import lowbit
    from lowbit.data import calibration_batches, load_text, tokenize

    def rss_gb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux

    scheme_name, transform, algorithm, *options = row.split("/")
    torch.manual_seed(0)
    t0 = time.time()
    model, tokenizer = lowbit.load_model()
    load_seconds = time.time() - t0
    ids = tokenize(tokenizer, load_text(args.data))
    result = {
        "row": row,
        "scheme": scheme_name,
        "transform": transform,
        "algorithm": algorithm,
        "load_seconds": load_seconds,
        "commit": source_commit(),
    }  # at the start: the code this process imported
    if options:
        result["options"] = "/".join(options)
    scheme = None
    if scheme_name != "FP32":
        scheme = lowbit.parse_scheme(scheme_name)
        config = transform_variants()[transform]
        t0 = time.time()
        calib = None
        if config.needs_calibration or algorithm != "rtn" or scheme.needs_calibration:
            calib = calibration_batches(tokenizer, None, args.calib_samples, args.calib_seq_len, seed=0)
        calib_seconds = time.time() - t0
        t0 = time.time()
        chosen, pipeline = row_settings(algorithm, options)
        model = lowbit.quantize(model, scheme, transform=config, algorithm=chosen, calibration=calib, pipeline=pipeline, inplace=True)
        result["quantize_seconds"] = time.time() - t0
        result["calib_seconds"] = calib_seconds
        del calib
        errors = lowbit.quantization_state(model).layer_errors
        if errors:
            for group in ("qkv", "o", "gate_up", "down"):
                result[f"err_{group}"] = sum(e[group][algorithm] for e in errors) / len(errors)
                result[f"err_{group}_rtn"] = sum(e[group]["rtn"] for e in errors) / len(errors)
    result["peak_rss_quantize_gb"] = rss_gb()
    t0 = time.time()
    ppl = lowbit.perplexity(model, ids, args.seq_len, args.windows, desc=row)
    result.update(
        ppl=ppl.ppl,
        windows=ppl.windows,
        tokens=ppl.tokens,
        eval_seconds=time.time() - t0,
        peak_rss_gb=rss_gb(),
        size_bytes=lowbit.evaluation.model_size_bytes(model),
        bits_per_weight=lowbit.evaluation.weight_bits(model),
        # > 2 means other work shared the 2 cores during the row: its times are then inflated
        load_avg_5min=os.getloadavg()[1],
    )
    return result


def source_commit() -> str | None:
    """The commit of the code that measured the row (None outside a git checkout)."""
    proc = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="ptq_wikitext2")
    parser.add_argument("--rows", default=",".join(ROWS), help="SCHEME/TRANSFORM/ALGORITHM, comma-separated")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--render", action="store_true", help="only write the tables from the .jsonl")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_row(args.child, args)), flush=True)
        return
    out = ROOT / "results" / args.name
    done = run_rows(args.rows.split(","), args, out.with_suffix(".jsonl"), format_row)
    previous = out.with_suffix(".json")
    # --render keeps the settings the rows were measured with; a run records its own
    meta = json.loads(previous.read_text())["meta"] if args.render and previous.exists() else metadata(args)
    rows = sorted(done.values(), key=sort_key)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def run_rows(rows: list[str], args, jsonl: Path, describe) -> dict[str, dict]:
    """Every row of `rows` not yet in `jsonl`, each in a fresh process (`--child`), appended to
    `jsonl` as it finishes (an interrupted run resumes); returns all rows measured so far. With
    `args.render`, only reads them."""
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["row"]: json.loads(line) for line in jsonl.read_text().splitlines()} if jsonl.exists() else {}
    if args.render:
        return done
    for row in rows:
        if row in done:
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--windows", str(args.windows), "--seq-len", str(args.seq_len)]
        cmd += ["--data", args.data, "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{row}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        result["wall_seconds"] = time.time() - t0
        done[row] = result
        with jsonl.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(describe(result), flush=True)
    return done


def metadata(args) -> dict:
    import torch

    import lowbit

    return {
        "lowbit_version": lowbit.__version__,
        "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32)",
        "data": Path(args.data).name,
        "seq_len": args.seq_len,
        "calibration": f"enwiki-sample calibration half, {args.calib_samples} x {args.calib_seq_len} tokens, seed 0",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }


def format_row(r: dict) -> str:
    q = r.get("quantize_seconds")
    return (
        f"{r['row']:32s} ppl {r['ppl']:9.3f}  quantize {'-' if q is None else f'{q:6.1f} s'}  "
        f"peak RSS {r['peak_rss_quantize_gb']:.2f} GB (with eval {r['peak_rss_gb']:.2f} GB)"
    )


def markdown(meta: dict, rows: list[dict]) -> str:
    if not rows:
        return "no rows yet\n"
    fp = next((r for r in rows if r["scheme"] == "FP32"), None)
    windows = rows[0]["windows"]
    lines = [
        f"{meta['model']}, {meta['data']}, first {windows} windows x {meta['seq_len']} tokens, fp32, "
        f"{meta['threads']} CPU threads, torch {meta['torch']}, lowbit {meta['lowbit_version']}. "
        f"Calibration: {meta['calibration']}.",
        "",
        "Quantize = wall time of `lowbit.quantize` (transform statistics, layer-by-layer pipeline, swaps). "
        "Peak RSS = the process's peak resident memory up to the end of quantization (model load included), "
        "and including the perplexity evaluation. Load avg = 5-minute load average at the end of the row "
        "(2 cores: above ~2 other work shared the machine and the row's times are inflated; '-' = not recorded).",
        "",
        "Commit = the code that measured the row ('-': before commit a5ac68b). Rows before a5ac68b, which packs each "
        "finished layer at its bit width, count all quantized layers as fp32 weights in their peak RSS (W4A16 GPTQ with "
        "128 x 512 calibration now peaks at 0.88 GB with its evaluation, benchmarks/results/headline); perplexities are "
        "unchanged by packing (it is exact). The smoothrot-all-search rows before ab59fb0 held the alpha search's row "
        "samples in a way that grew ~0.1 GB per calibration sample; rotated rows before bbc5320 include a 0.56 GB transient "
        "(the final norm's gain folded into a float64 copy of the whole lm_head).",
        "",
        "| scheme | transform | algorithm | options | WikiText-2 PPL | vs FP32 | quantize (s) | peak RSS quantize (GB) | peak RSS with "
        "eval (GB) | load avg | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r.get("quantize_seconds")
        load = f"{r['load_avg_5min']:.1f}" if "load_avg_5min" in r else "-"
        rel = "-" if fp is None or r is fp else f"{100 * (r['ppl'] / fp['ppl'] - 1):+.1f}%"
        lines.append(
            f"| {r['scheme']} | {r['transform']} | {r['algorithm']} | {r.get('options', '')} | {r['ppl']:.3f} | {rel} | "
            f"{'-' if q is None else f'{q:.1f}'} | {r['peak_rss_quantize_gb']:.2f} | {r['peak_rss_gb']:.2f} | {load} | {r.get('commit') or '-'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
