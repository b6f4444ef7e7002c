"""Save / load / export round trips on the default model (SmolLM2-135M-Instruct).

For each recipe: quantize in memory, then
- native: save with `lowbit.save_quantized`, reload with `lowbit.load_quantized`, and compare
  logits on the evaluation windows (max |difference|; 0 means bit-identical) and perplexity;
- compressed-tensors: export with `lowbit.export_compressed_tensors` where the format can
  express the recipe, reload with transformers' `AutoModelForCausalLM.from_pretrained`, compare.
Sizes are bytes on disk of the whole folder (weights, config, tokenizer). Evaluation: the first
N windows of 512 tokens of the WikiText-2 raw test file (token-level perplexity). Calibration
(GPTQ, smoothing): the calibration half of the gensim Wikipedia sample, never the evaluation text.

    python benchmarks/io_roundtrip.py                 # all rows -> results/io_roundtrip.{jsonl,json,md}
    python benchmarks/io_roundtrip.py --rows W4A8KV4/rotate/rtn   # one row, appended to the .jsonl
    python benchmarks/io_roundtrip.py --render        # the tables from the .jsonl only

Rows are appended to results/NAME.jsonl as they finish (a row already there is skipped), so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# (scheme, transform, algorithm)
ROWS = [
    ("W4A16", "none", "rtn"),
    ("W4g64A16", "none", "gptq"),
    ("W8A8f", "smooth", "rtn"),
    ("W4A8KV4", "rotate", "rtn"),  # online rotations and KV quantization: native only
]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits of every window (kept to compare) and the token-level perplexity."""
    logits, nll, count = [], 0.0, 0
    for w in windows:
        out = model(input_ids=w[None], use_cache=False).logits[0]
        logits.append(out)
        nll += torch.nn.functional.cross_entropy(out[:-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
    return torch.stack(logits), math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--name", default="io_roundtrip")
    parser.add_argument("--rows", default=None, help="comma-separated SCHEME/TRANSFORM/ALGORITHM (default: all)")
    parser.add_argument("--render", action="store_true", help="only write the .json/.md from the .jsonl")
    args = parser.parse_args()
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    jsonl = out / f"{args.name}.jsonl"
    if not args.render:
        run_rows(args, jsonl)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = [r for key in ROWS for r in rows if (r["scheme"], r["transform"], r["algorithm"]) == key]
    result = {**rows[0].pop("setup"), "rows": rows} if rows else {}
    for r in rows[1:]:
        r.pop("setup", None)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (out / f"{args.name}.md").write_text(md)
    print(md)


def run_rows(args, jsonl: Path) -> None:
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.data import calibration_batches, load_text, tokenize
    from lowbit.io import check_exportable
    from lowbit.models import resolve_model

    torch.manual_seed(0)
    fp_dir = Path(resolve_model(lowbit.DEFAULT_MODEL))
    setup = {
        "model": lowbit.DEFAULT_MODEL,
        "fp32_folder_bytes": sum(f.stat().st_size for f in fp_dir.iterdir() if f.is_file()),
        "eval": {"data": str(DEFAULT_DATA.name), "windows": args.windows, "seq_len": args.seq_len},
        "calibration": {"data": "enwiki-sample (calibration half)", "samples": args.calib_samples, "seq_len": 512},
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "lowbit": lowbit.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "python": platform.python_version(),
        },
    }
    wanted = [tuple(r.split("/")) for r in args.rows.split(",")] if args.rows else ROWS
    done = set()
    if jsonl.is_file():
        done = {(r["scheme"], r["transform"], r["algorithm"]) for r in map(json.loads, jsonl.read_text().splitlines()) if r}
    work = Path(tempfile.mkdtemp(prefix="lowbit-io-bench-"))
    try:
        for scheme, transform, algorithm in wanted:
            if (scheme, transform, algorithm) in done:
                continue
            model, tokenizer = lowbit.load_model()
            ids = tokenize(tokenizer, load_text(str(DEFAULT_DATA)))
            windows = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)
            calib = None
            if algorithm != "rtn" or transform == "smooth":
                calib = calibration_batches(tokenizer, None, args.calib_samples, 512, seed=0)
            t0 = time.time()
            q = lowbit.quantize(model, scheme, transform=transform, algorithm=algorithm, calibration=calib, inplace=True, progress=False)
            quant_s = time.time() - t0
            ref, ppl = evaluate(q, windows)
            row = {"scheme": scheme, "transform": transform, "algorithm": algorithm, "quantize_s": quant_s, "ppl": ppl}
            native = work / f"{scheme}-{transform}-{algorithm}"
            t0 = time.time()
            lowbit.save_quantized(q, native, tokenizer)
            row["native_save_s"] = time.time() - t0
            row["native_bytes"] = folder_bytes(native)
            t0 = time.time()
            loaded, _ = lowbit.load_quantized(native)
            row["native_load_s"] = time.time() - t0
            logits, row["native_ppl"] = evaluate(loaded, windows)
            row["native_max_abs_diff"] = (logits - ref).abs().max().item()
            row["native_identical"] = bool(torch.equal(logits, ref))
            del loaded, logits
            try:
                check_exportable(q, "float32")
            except lowbit.UserError as exc:
                row["ct_refused"] = str(exc)
            else:
                ct = work / f"ct-{scheme}-{transform}-{algorithm}"
                t0 = time.time()
                lowbit.export_compressed_tensors(q, ct, tokenizer, dtype="float32")  # compared with the fp32 model
                row["ct_export_s"] = time.time() - t0
                row["ct_bytes"] = folder_bytes(ct)
                reloaded = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
                logits, row["ct_ppl"] = evaluate(reloaded, windows)
                row["ct_max_abs_diff"] = (logits - ref).abs().max().item()
                row["ct_identical"] = bool(torch.equal(logits, ref))
                row["ct_format"] = json.loads((ct / "config.json").read_text())["quantization_config"]["format"]
                del reloaded, logits
                shutil.rmtree(ct)
            shutil.rmtree(native)
            del q, model, ref
            row["load_average_1min"] = os.getloadavg()[0]  # the machine is shared: times are wall clock
            row["setup"] = setup
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    mb = 1e6
    lines = [
        f"# Save / load / export round trips: {result['model']}",
        "",
        (
            f"FP32 model folder: {result['fp32_folder_bytes'] / mb:.1f} MB. Evaluation: {result['eval']['data']}, first "
            f"{result['eval']['windows']} windows x {result['eval']['seq_len']} tokens. max abs dlogits compares the reloaded "
            "model's logits with the in-memory quantized model's (0 = bit-identical). Times are wall clock on a shared 2-core "
            f"machine (1-minute load average during the rows: {', '.join(str(round(r['load_average_1min'], 1)) for r in result['rows'])}), "
            "so read them as upper bounds."
        ),
        "",
        (
            "| scheme | transform | algorithm | PPL in memory | lowbit saved MB | PPL reloaded | max abs dlogits | save s | load s "
            "| compressed-tensors MB | PPL transformers reload | max abs dlogits |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ct = f"{r['ct_bytes'] / mb:.1f} ({r['ct_format']}) | {r['ct_ppl']:.3f} | {r['ct_max_abs_diff']:.3g}" if "ct_bytes" in r else "refused | - | -"
        lines.append(
            f"| {r['scheme']} | {r['transform']} | {r['algorithm']} | {r['ppl']:.3f} | {r['native_bytes'] / mb:.1f} | "
            f"{r['native_ppl']:.3f} | {r['native_max_abs_diff']:.3g} | {r['native_save_s']:.1f} | {r['native_load_s']:.1f} | {ct} |"
        )
    refused = [r for r in result["rows"] if "ct_refused" in r]
    if refused:
        lines += ["", "Export refusals (lowbit's own messages):", ""]
        lines += [f"- {r['scheme']} {r['transform']}: {r['ct_refused']}" for r in refused]
    v = result["versions"]
    lines += ["", f"lowbit {v['lowbit']}, torch {v['torch']}, transformers {v['transformers']}, compressed-tensors {v['compressed_tensors']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
