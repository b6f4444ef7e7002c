"""LLM-QAT on the default model at small scale: data-free generation, then QAT runs, each with
WikiText-2 perplexity before (its PTQ starting point) and after, training time and settings.

1. For each generation strategy needed (hybrid, greedy, sample), `generate_dataset` writes
   --samples sequences of at most --max-length tokens (stop at end of sequence) to --work
   (resumable; the shards are not committed, their statistics are).
2. Each run (scheme/transform/algorithm/data strategy/loss) builds the trainable student with
   `lowbit.quantize(..., trainable=True)` (GPTQ/AWQ starts calibrated on the generated data), evaluates it (= the PTQ model it starts from), trains
   with `lowbit.qat.train` and evaluates again. The FP model and each starting point are evaluated
   once. Perplexity: token-level, first --windows windows of 2048 tokens of wiki.test.raw (the
   same windows as benchmarks/results/ptq_wikitext2.md, so its PTQ rows sit beside these).
Rows are appended to results/NAME.jsonl as they finish (a rerun skips finished rows);
results/NAME.md is rendered from all rows.

    python benchmarks/qat_smollm2.py --samples 96 --max-length 64 --steps 20 --batch-size 4 --lr 1e-4 --windows 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from statistics import mean

import torch

import lowbit
from lowbit.data import tokenize
from lowbit.data.generate import Sampling
from lowbit.qat import DatagenConfig, TrainConfig, generate_dataset, load_dataset, train
from lowbit.qat.datagen import generated_calibration
from lowbit.runtime import QuantLinear

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WIKI = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# scheme, transform, algorithm, data strategy, loss[, "scales": the weight scales learn too (LSQ)]
RUNS = [
    ("W4A8KV4", "none", "rtn", "hybrid", "logits"),
    ("W4A8KV4", "none", "rtn", "hybrid", "label"),
    ("W4A4KV4", "rotate", "rtn", "hybrid", "logits"),
    ("W4A8KV4", "none", "rtn", "greedy", "logits"),
    ("W4A8KV4", "none", "rtn", "sample", "logits"),
    ("W4A4KV4", "rotate", "gptq", "hybrid", "logits"),  # from the best PTQ recipe: rotation + GPTQ
    ("W4A4KV4", "rotate", "gptq", "hybrid", "logits", "scales"),
    ("W4A8KV4", "rotate", "gptq", "hybrid", "logits", "scales"),
]
CALIB_SAMPLES = 32  # GPTQ/AWQ starts: calibrated on the generated data (data-free throughout)
# Best PTQ rows of results/ptq_wikitext2.json (same windows): read, not re-run.
PTQ_TABLE = RESULTS / "ptq_wikitext2.json"


def run_key(run: tuple) -> str:
    return "/".join(run)


def best_ptq(scheme: str) -> dict | None:
    if not PTQ_TABLE.is_file():
        return None
    rows = json.loads(PTQ_TABLE.read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    rows = [r for r in rows if r.get("scheme") == scheme and r.get("ppl") is not None]
    return min(rows, key=lambda r: r["ppl"]) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scale-lr", type=float, default=1e-4, help="learning rate of the weight scales in 'scales' runs")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--runs", default=None, help="comma-separated run keys (default: all)")
    parser.add_argument("--work", default=str(ROOT.parent / "runs" / "qat_bench"))
    parser.add_argument("--name", default="qat_smollm2")
    parser.add_argument("--render", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 by default: on a shared machine 2 threads ran ~10x slower from oversubscription)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    jsonl = RESULTS / f"{args.name}.jsonl"
    if not args.render:
        run_all(args, jsonl)
    render(args, jsonl)


def run_all(args, jsonl: Path) -> None:
    wanted = [r for r in RUNS if args.runs is None or run_key(r) in args.runs.split(",")]
    done = {json.loads(line)["key"] for line in jsonl.read_text().splitlines()} if jsonl.is_file() else set()
    todo = [r for r in wanted if run_key(r) not in done]
    if not todo:
        return
    teacher, tok = lowbit.load_model()
    eval_ids = tokenize(tok, WIKI.read_text())
    cache_path = RESULTS / f"{args.name}.eval-cache.json"  # FP and starting-point perplexities, evaluated once
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def ppl(key: str, model) -> float:
        if key not in cache:
            cache[key] = lowbit.perplexity(model, eval_ids, 2048, args.windows, desc=f"perplexity {key}").ppl
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
        return cache[key]

    fp = ppl("fp", teacher)
    stats = {}
    for scheme, transform, algorithm, strategy, loss, *options in todo:
        scales = "scales" in options
        data_dir = Path(args.work) / f"data-{strategy}-{args.samples}x{args.max_length}"
        config = DatagenConfig(
            samples=args.samples, max_length=args.max_length, shard_size=64, batch_size=32, sampling=Sampling(strategy=strategy, stop_at_eos=True)
        )
        stats[strategy] = generate_dataset(teacher, tok, data_dir, config)
        dataset = load_dataset(data_dir)
        calibration = generated_calibration(dataset, CALIB_SAMPLES, args.max_length) if algorithm != "rtn" else None
        student = lowbit.quantize(teacher, scheme, transform=transform, algorithm=algorithm, calibration=calibration, trainable=True)
        before = ppl(f"{scheme}/{transform}/{algorithm}", student)
        tconfig = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            max_seq_len=args.max_length,
            losses={loss: 1.0},
            learn_scales=scales,
            scale_lr=args.scale_lr if scales else None,
        )
        torch.manual_seed(0)
        summary = train(student, teacher, dataset, tconfig)
        for m in student.modules():
            if isinstance(m, QuantLinear):
                m.freeze()
        start = time.time()
        after = lowbit.perplexity(student, eval_ids, 2048, args.windows, desc="perplexity after QAT").ppl
        row = {
            "key": run_key((scheme, transform, algorithm, strategy, loss, *options)),
            "scheme": scheme,
            "transform": transform,
            "algorithm": algorithm,
            "data": strategy,
            "loss": loss,
            "learn_scales": scales,
            "fp_ppl": fp,
            "before_ppl": before,
            "after_ppl": after,
            "train_seconds": summary["seconds"],
            "eval_seconds": time.time() - start,
            "tokens": summary["tokens_this_run"],
            "first_loss": summary["history"][0]["loss"],
            "last_loss": summary["history"][-1]["loss"],
            "loss_history": [round(h["loss"], 4) for h in summary["history"]],
            "train_config": asdict(tconfig),
            "data_stats": stats[strategy],
            "windows": args.windows,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        print(json.dumps({k: v for k, v in row.items() if k not in ("loss_history", "data_stats", "train_config")}), flush=True)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        del student


def trained(row: dict) -> str:
    c = row["train_config"]
    return f"weights + scales (lr {c['scale_lr']:g})" if row.get("learn_scales") else "weights"


def render(args, jsonl: Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    c = rows[0]["train_config"]
    lines = [
        f"LLM-QAT on {lowbit.DEFAULT_MODEL} (fp32, {rows[0]['threads']} CPU threads, torch {rows[0]['torch']}). "
        f"Perplexity: wiki.test.raw, first {rows[0]['windows']} window(s) x 2048 tokens (token level). The best-PTQ column "
        "is read from ptq_wikitext2.json, measured on the first 5 windows: it is comparable with the other columns only "
        f"when --windows is 5. Training: {c['steps']} steps x {c['batch_size']} sequences (<= {c['max_seq_len']} tokens), "
        f"AdamW lr {c['lr']} cosine, weight decay {c['weight_decay']}, on {rows[0]['data_stats']['sequences']} generated "
        "sequences (batch-size 32 generation, stop at end of sequence); trained: the latent weights of every quantized linear, and in "
        "'scales' rows their per-row weight scales too (LSQ). Start rtn: the latent weights start "
        "from the full-precision (transformed) weights; start gptq/awq: from the algorithm's quantized weights, on its fixed grid, "
        f"calibrated on {CALIB_SAMPLES} windows of the generated text (data-free throughout).",
        "",
        f"Reproduce: `python benchmarks/qat_smollm2.py --samples {args.samples} --max-length {args.max_length} "
        f"--steps {c['steps']} --batch-size {c['batch_size']} --lr {c['lr']} --scale-lr {args.scale_lr} --windows {rows[0]['windows']}`",
        "",
        "| scheme | transform | start | trained | data | loss | FP32 PPL | PPL before QAT | PPL after QAT | change | best PTQ "
        "(ptq_wikitext2) | train time (s) | loss, mean of the first -> last 8 steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = best_ptq(r["scheme"])
        best_text = f"{best['ppl']:.2f} ({best['transform']}/{best['algorithm']})" if best else "-"
        change = (r["after_ppl"] - r["before_ppl"]) / r["before_ppl"] * 100
        lines.append(
            f"| {r['scheme']} | {r['transform']} | {r['algorithm']} | {trained(r)} | {r['data']} | {r['loss']} | {r['fp_ppl']:.2f} | "
            f"{r['before_ppl']:.2f} | {r['after_ppl']:.2f} | {change:+.1f}% | {best_text} | {r['train_seconds']:.0f} | "
            f"{mean(r['loss_history'][:8]):.3f} -> {mean(r['loss_history'][-8:]):.3f} |"
        )
    lines += [
        "",
        "Generated data (per strategy):",
        "",
        "| data | sequences | tokens | mean length | distinct 1/2/3/4-grams |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        if r["data"] in seen:
            continue
        seen.add(r["data"])
        s = r["data_stats"]
        d = s["distinct_ngram_ratio"]
        lines.append(
            f"| {r['data']} | {s['sequences']} | {s['tokens']} | {s['length']['mean']:.1f} | "
            f"{d['1']:.3f} / {d['2']:.3f} / {d['3']:.3f} / {d['4']:.3f} |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
