"""Perplexity table on the default model: WikiText-2 test perplexity, size and OPs per setting.

Protocol (as GPTQ, SmoothQuant and QuaRot evaluate): the whole WikiText-2 raw test file tokenized once (no BOS: the
SmolLM2 tokenizer adds none), the first N non-overlapping windows of 2048 tokens, token-level
exp(mean NLL); fp32 on the CPU. Calibration (smoothing) uses random 512-token windows of the
calibration half of the gensim Wikipedia sample, never the evaluation text.
Writes benchmarks/results/NAME.{json,md}.

    # the RTN table of the README
    python benchmarks/ppl_table.py --name rtn_wikitext2
    # transforms at W4A8KV4 / W4A4KV4
    python benchmarks/ppl_table.py --name transforms_wikitext2 --schemes W4A8KV4,W4A4KV4 \
        --transforms none,smooth,rotate,smoothrot
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_batches, load_text, tokenize
from lowbit.evaluation import kv_cache_bytes, model_ops, model_size_bytes
from lowbit.transforms.apply import TransformConfig

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SCHEMES = ["W8A8KV8", "W4A16", "W4g64A16", "W4A8KV4", "W4A4KV4"]
# named transform variants (--transforms); alpha 0.5 unless searched
VARIANTS = {
    "none": TransformConfig("none"),
    "smooth": TransformConfig("smooth"),
    "rotate": TransformConfig("rotate"),  # QuaRot: norms folded, fused R1, R2, online R3/R4
    "rotate-online": TransformConfig("rotate", fuse_r1=False, fold_norms=False),  # R1 online, norms kept
    "smoothrot": TransformConfig("smoothrot"),  # smoothing at down_proj only ("Turning LLM Activations Quantization-Friendly")
    "smoothrot-online": TransformConfig("smoothrot", fuse_r1=False, fold_norms=False),
    "smoothrot-all-search": TransformConfig("smoothrot", smooth_all=True, alpha=None),  # every input, alpha per layer
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--transforms", default="none")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--name", default="rtn_wikitext2")
    args = parser.parse_args()
    args.out = str(ROOT / "results" / args.name)

    torch.manual_seed(0)
    model, tokenizer = lowbit.load_model()
    ids = tokenize(tokenizer, load_text(args.data))
    transforms = args.transforms.split(",")
    calib = None
    unknown = [t for t in transforms if t not in VARIANTS]
    if unknown:
        parser.error(f"unknown transform variant(s) {unknown}; choose from {list(VARIANTS)}")
    if any(VARIANTS[t].needs_calibration for t in transforms):
        calib = calibration_batches(tokenizer, None, args.calib_samples, args.calib_seq_len, seed=0)
    rows = []

    def record(name: str, m, scheme, quant_seconds: float | None, transform: str = "none") -> None:
        t0 = time.time()
        ppl = lowbit.perplexity(m, ids, args.seq_len, args.windows, desc=name)
        ops = model_ops(m, scheme, args.seq_len)
        rows.append(
            {
                "scheme": name,
                "transform": transform,
                "ppl": ppl.ppl,
                "windows": ppl.windows,
                "tokens": ppl.tokens,
                "size_bytes": model_size_bytes(m),
                "ops": ops.ops,
                "macs": ops.macs,
                "kv_cache_bytes_2048": kv_cache_bytes(m.config, scheme, 2048),
                "quantize_seconds": quant_seconds,
                "eval_seconds": time.time() - t0,
                "peak_rss_gb": peak_rss_gb(),
            }
        )
        r = rows[-1]
        print(f"{name:10s} {transform:9s} ppl {r['ppl']:8.3f}  size {r['size_bytes'] / 1e6:7.1f} MB  ops {r['ops'] / 1e12:6.2f} T", flush=True)

    record("FP32", model, None, None)
    for name in args.schemes.split(","):
        scheme = lowbit.parse_scheme(name)
        for kind in transforms:
            t0 = time.time()
            config = VARIANTS[kind]
            qmodel = lowbit.quantize(model, scheme, transform=config, calibration=calib)
            record(scheme.name, qmodel, scheme, time.time() - t0, kind)
            del qmodel

    meta = {
        "lowbit_version": lowbit.__version__,
        "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32)",
        "algorithm": "rtn",
        "variants": {name: str(VARIANTS[name]) for name in transforms},
        "calibration": f"enwiki-sample calib half, {args.calib_samples} x {args.calib_seq_len} tokens" if calib else None,
        "data": Path(args.data).name,
        "seq_len": args.seq_len,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    fp = rows[0]
    lines = [
        f"RTN weights on {meta['model']}, {meta['data']}, {fp['windows']} windows x {meta['seq_len']} tokens "
        f"({fp['tokens']} predicted tokens), fp32, {meta['threads']} CPU threads, torch {meta['torch']}, lowbit {meta['lowbit_version']}.",
        "",
        "| scheme | transform | WikiText-2 PPL | vs FP32 | size (MB) | OPs per 2048-token sequence (T) | KV cache @2048 (MB) | quantize (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.1f}"
        lines.append(
            f"| {r['scheme']} | {r['transform']} | {r['ppl']:.2f} | {r['ppl'] / fp['ppl'] - 1:+.1%} | {r['size_bytes'] / 1e6:.1f} | "
            f"{r['ops'] / 1e12:.2f} | {r['kv_cache_bytes_2048'] / 1e6:.1f} | {q} |"
        )
    lines += [
        "",
        "Size: quantized linears packed at their bit width plus fp16 scales; embeddings (tied with lm_head), norms "
        "and unquantized tensors at 16 bits. OPs = MACs x W_bits x A_bits (LLM-QAT), lm_head at 16x16, attention "
        "matmuls at 16 x KV bits." + (f" Smoothing calibration: {meta['calibration']}." if meta.get("calibration") else ""),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
