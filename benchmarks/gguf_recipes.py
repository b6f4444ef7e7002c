"""Which lowbit recipe is best inside llama.cpp's Q4_0 and Q8_0 layouts (blocks of 32, float16
scales, activations in Q8_0 blocks): candidates side by side on the default model, the same
evaluation windows (first N x L tokens of the WikiText-2 raw test file) and the same calibration
windows (enwiki-sample calibration half, seed 0), each row in this process in turn.

    python benchmarks/gguf_recipes.py            # writes results/gguf_recipes.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CANDIDATES = [
    ("Q4_0", "W4g32fhA8g32h", "rtn"),
    ("Q4_0", "W4g32hA8g32h", "rtn"),
    ("Q4_0", "W4g32fhmA8g32h", "rtn"),
    ("Q4_0", "W4g32fhA8g32h", "gptq"),
    ("Q4_0", "W4g32hA8g32h", "gptq"),
    ("Q4_0", "W4g32fhmA8g32h", "gptq"),
    ("Q4_1", "W4g32ahA8g32h", "rtn"),
    ("Q4_1", "W4g32ahA8g32h", "gptq"),
    ("Q8_0", "W8g32hA8g32h", "rtn"),
    ("Q8_0", "W8g32hA8g32h", "gptq"),
]


def main() -> None:
    import torch

    import lowbit
    from lowbit.data import calibration_batches, load_text, tokenize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    args = parser.parse_args()
    base, tokenizer = lowbit.load_model()
    ids = tokenize(tokenizer, load_text(str(DEFAULT_DATA)))
    calib = calibration_batches(tokenizer, None, args.calib_samples, args.calib_seq_len, seed=0)
    fp = lowbit.perplexity(base, ids, args.seq_len, args.windows, desc="FP32").ppl
    rows = []
    for layout, scheme, algorithm in CANDIDATES:
        torch.manual_seed(0)
        start = time.time()
        q = lowbit.quantize(copy.deepcopy(base), scheme, algorithm=algorithm, calibration=calib if algorithm != "rtn" else None)
        seconds = time.time() - start
        ppl = lowbit.perplexity(q, ids, args.seq_len, args.windows, desc=f"{scheme} {algorithm}").ppl
        rows.append({"layout": layout, "scheme": scheme, "algorithm": algorithm, "ppl": ppl, "quantize_seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        del q
    meta = {
        "model": "smollm2-135m",
        "data": f"wiki.test.raw, first {args.windows} windows x {args.seq_len} tokens",
        "calibration": f"enwiki-sample calibration half, {args.calib_samples} x {args.calib_seq_len} tokens, seed 0 (GPTQ rows)",
        "fp32_ppl": fp,
        "lowbit_version": lowbit.__version__,
        "torch": torch.__version__,
    }
    results = ROOT / "results"
    (results / "gguf_recipes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Recipes inside llama.cpp's layouts",
        "",
        f"{meta['model']}; {meta['data']}; {meta['calibration']}; FP32 perplexity {fp:.3f}. "
        "Every row quantizes activations to Q8_0 blocks (A8g32h), as llama.cpp's CPU backend does. "
        "Reproduce: `python benchmarks/gguf_recipes.py`.",
        "",
        "| layout | scheme | algorithm | perplexity | quantize s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['layout']} | {r['scheme']} | {r['algorithm'].upper()} | {r['ppl']:.3f} | {r['quantize_seconds']:.0f} |" for r in rows]
    (results / "gguf_recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
