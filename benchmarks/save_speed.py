"""Saving speed: a GPTQ W4A16 model in lowbit's format beside `save_pretrained` of the fp32 model.

One run, on the default model (SmolLM2-135M-Instruct): load it, quantize a copy with the
`w4a16-gptq` recipe (calibration: 16 x 256 tokens of the calibration half of the gensim Wikipedia
sample; the perplexity is not the point here), then alternately time
- `model.save_pretrained(dir)` of the fp32 model (transformers, safetensors),
- `lowbit.save_quantized(qmodel, dir)` (codes, scales, config, checksums),
- `lowbit.load_quantized(dir)`,
each --repeats times into a fresh temporary folder on the same disk, and report min / median of
two times: the call alone (the data may still sit in the page cache) and the call followed by
`os.sync()` (the data on disk: what saving costs once the cache cannot absorb it). The disk is
synced before every timed step, so no step pays for the previous one's writes. The reloaded
model's logits on a probe are compared with the in-memory model's (0 = identical).

    python benchmarks/save_speed.py            # -> results/save_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def timed(fn) -> tuple[float, float]:
    """(seconds of the call, seconds until its data is on disk)."""
    os.sync()
    start = time.perf_counter()
    fn()
    call = time.perf_counter() - start
    os.sync()
    return call, time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "save_speed"))
    args = parser.parse_args()

    import lowbit
    from lowbit.data import calibration_batches

    torch.set_num_threads(2)
    model, tokenizer = lowbit.load_model()
    recipe = lowbit.load_recipe("w4a16-gptq")
    calib = calibration_batches(tokenizer, None, 16, 256, 0)
    t0 = time.perf_counter()
    qmodel = lowbit.quantize(model, recipe, calibration=calib, progress=False)
    quantize_seconds = time.perf_counter() - t0
    probe = calib[0]

    work = Path(tempfile.mkdtemp(prefix="lowbit-save-speed-", dir=ROOT))
    times: dict[str, list[tuple[float, float]]] = {"save_pretrained (fp32)": [], "save_quantized (W4fA16 GPTQ)": [], "load_quantized": []}
    sizes = {}
    try:
        for i in range(args.repeats):
            fp_dir, q_dir = work / f"fp-{i}", work / f"q-{i}"
            loaded = {}
            times["save_pretrained (fp32)"].append(timed(lambda d=fp_dir: model.save_pretrained(d)))
            times["save_quantized (W4fA16 GPTQ)"].append(timed(lambda d=q_dir: lowbit.save_quantized(qmodel, d)))
            times["load_quantized"].append(timed(lambda d=q_dir, into=loaded: into.update(model=lowbit.load_quantized(d)[0])))
            sizes = {"save_pretrained (fp32)": folder_bytes(fp_dir), "save_quantized (W4fA16 GPTQ)": folder_bytes(q_dir)}
            with torch.no_grad():
                diff = (loaded["model"](probe).logits - qmodel(probe).logits).abs().max().item()
            shutil.rmtree(fp_dir)
            shutil.rmtree(q_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        {
            "step": name,
            "call_min_s": min(c for c, _ in t),
            "call_median_s": statistics.median(c for c, _ in t),
            "synced_min_s": min(d for _, d in t),
            "synced_median_s": statistics.median(d for _, d in t),
            "bytes_on_disk": sizes.get(name),
        }
        for name, t in times.items()
    ]
    ratio = rows[1]["call_median_s"] / rows[0]["call_median_s"]
    synced_ratio = rows[1]["synced_median_s"] / rows[0]["synced_median_s"]
    result = {
        "model": "smollm2-135m",
        "recipe": "w4a16-gptq",
        "calibration": "16 x 256 tokens, enwiki-sample calibration half",
        "quantize_seconds": quantize_seconds,
        "repeats": args.repeats,
        "rows": rows,
        "save_quantized_over_save_pretrained": ratio,
        "save_quantized_over_save_pretrained_synced": synced_ratio,
        "reload_max_abs_logit_difference": diff,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit_version": lowbit.__version__,
        "machine": platform.machine(),
    }
    lines = [
        "# Saving speed: lowbit's format beside save_pretrained",
        "",
        f"Default model (SmolLM2-135M-Instruct); `{result['recipe']}` quantized in {quantize_seconds:.1f} s "
        f"(calibration {result['calibration']}); {args.repeats} alternating repeats, fresh folders; "
        f"{result['threads']} CPU threads, torch {result['torch']}.",
        "",
        "| step | call, min | call, median | with sync, min | with sync, median | on disk |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "-" if r["bytes_on_disk"] is None else f"{r['bytes_on_disk'] / 1e6:.1f} MB"
        lines.append(
            f"| {r['step']} | {r['call_min_s']:.2f} s | {r['call_median_s']:.2f} s | {r['synced_min_s']:.2f} s | "
            f"{r['synced_median_s']:.2f} s | {size} |"
        )
    lines += [
        "",
        f"save_quantized / save_pretrained (medians): **{ratio:.2f}x** for the call, **{synced_ratio:.2f}x** until the "
        f"data is on disk. Reloaded logits vs in memory: max |difference| {diff:g} (0 = bit-identical).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
