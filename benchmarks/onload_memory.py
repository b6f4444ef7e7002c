"""Peak memory of quantizing a model bigger than lowbit would like to hold: sequential onloading
against the in-memory path, on synthetic Llama checkpoints of about 1B parameters and of twice
the layers.

The script writes each checkpoint once (random weights, normal(0, 0.02) linears, unit norms;
bfloat16, sharded safetensors with an index; the default model's tokenizer and vocabulary), then
runs `lowbit quantize` on it in a child process under `/usr/bin/time -v` for every recipe and
path, and reads the peak resident set from it. Every row uses the same calibration windows
(enwiki-sample calibration half, seed 0) and the same evaluation windows (the first windows of
the WikiText-2 raw test file); the perplexities of random weights mean nothing and are printed only
to show both paths computed the same model.

    python benchmarks/onload_memory.py            # writes results/onload_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
RECIPES = [
    ("GPTQ W4A16", ["--scheme", "W4A16", "--algorithm", "gptq"]),
    ("rotation + GPTQ W4A4KV4", ["--scheme", "W4A4KV4", "--transform", "rotate", "--algorithm", "gptq"]),
]
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SHARD_BYTES = 1 << 30


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """A random Llama checkpoint of `layers` layers (bf16, shards of ~1 GiB, index); its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from lowbit.io.tensorfile import write_safetensors
    from lowbit.models import DEFAULT_MODEL, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16", **SHAPE)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)}
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0, 0.02, generator=gen)
        current[name] = t.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard, {"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() for shard in shards for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def run(model: Path, recipe: list[str], onload: bool, args, out: Path) -> dict:
    """One `lowbit quantize` under /usr/bin/time -v; its report and peak RSS."""
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "lowbit.cli",
        "--quiet",
        "quantize",
        "--model",
        str(model),
        *recipe,
        "--onload" if onload else "--no-onload",
        "--calib-samples",
        str(args.calib_samples),
        "--calib-seq-len",
        str(args.calib_seq_len),
        "--data",
        str(args.data),
        "--windows",
        str(args.windows),
        "--seq-len",
        str(args.seq_len),
        "--out",
        str(out),
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    report = json.loads((out / "report.json").read_text())
    return {
        "peak_rss_bytes": peak_kib * 1024,
        "wall_seconds": time.time() - t0,
        "ppl": report["quantized"]["ppl"],
        "fp_ppl": report.get("fp", {}).get("ppl"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="layers of the ~1B checkpoint (the second has twice as many)")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints go [default: a temporary folder]")
    parser.add_argument("--skip-in-memory-double", action="store_true", help="run the in-memory path on the first checkpoint only")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "onload_memory")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-onload-bench-"))
    models = {}
    for layers in (args.layers, 2 * args.layers):
        model = work / f"llama-synthetic-{layers}l"
        if not model.exists():
            write_checkpoint(model, layers)
        from lowbit.onload import Checkpoint

        models[layers] = (model, Checkpoint(model).float32_bytes() // 4)
    rows = []
    # onloaded rows first (both sizes), then the in-memory path beside them; the tables are
    # rewritten after every row
    plan = [(True, layers, recipe) for layers in models for recipe in RECIPES]
    plan += [(False, layers, recipe) for layers in models for recipe in RECIPES if layers == args.layers or not args.skip_in_memory_double]
    for onload, layers, (name, recipe) in plan:
        model, params = models[layers]
        out = work / f"run-{len(rows)}"
        print(f"{layers} layers, {name}, {'onloaded' if onload else 'in memory'} ...", flush=True)
        result = run(model, recipe, onload, args, out)
        path = "onloaded" if onload else "in memory"
        row = {"layers": layers, "parameters": params, "fp32_bytes": params * 4, "recipe": name, "path": path, **result}
        row["peak_over_fp32"] = row["peak_rss_bytes"] / row["fp32_bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_tables(rows, args)


def write_tables(rows: list[dict], args) -> None:
    import torch
    import transformers

    import lowbit

    meta = {
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens, enwiki-sample calibration half, seed 0",
        "evaluation": f"first {args.windows} x {args.seq_len} tokens of {args.data.name}",
        "shape": SHAPE,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory: sequential onloading vs in memory",
        "",
        f"Synthetic Llama checkpoints (hidden {SHAPE['hidden_size']}, MLP {SHAPE['intermediate_size']}, {SHAPE['num_attention_heads']} heads, "
        f"{SHAPE['num_key_value_heads']} KV heads, untied head, bf16 shards), random weights. Calibration {meta['calibration']}; "
        f"evaluation {meta['evaluation']} (FP and quantized). Peak RSS from /usr/bin/time -v. lowbit {meta['lowbit']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['cpu_threads']} CPU threads. `python benchmarks/onload_memory.py`.",
        "",
        "| layers | parameters | fp32 size | recipe | path | peak RSS | peak / fp32 | wall (s) | FP PPL | quantized PPL |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['parameters'] / 1e9:.2f} B | {r['fp32_bytes'] / 2**30:.2f} GiB | {r['recipe']} | {r['path']} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_over_fp32']:.2f}x | {r['wall_seconds']:.0f} | {r['fp_ppl']:.6g} | {r['ppl']:.6g} |"
        )
    onloaded = {(r["recipe"], r["layers"]): r["peak_rss_bytes"] for r in rows if r["path"] == "onloaded"}
    lines.append("")
    for name, _ in RECIPES:
        if (name, args.layers) in onloaded and (name, 2 * args.layers) in onloaded:
            a, b = onloaded[(name, args.layers)], onloaded[(name, 2 * args.layers)]
            lines.append(f"- {name}, onloaded: {2 * args.layers} layers peak {b / a - 1:+.1%} against {args.layers} layers.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
