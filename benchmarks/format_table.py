"""Number formats side by side on the default model: FP8, MXFP8, MXFP4 and NVFP4 beside INT8 and
INT4 (per channel, groups of 32 and 16), each with RTN and GPTQ, the block formats with and
without a block-diagonal Hadamard rotation of their block size (MR-GPTQ: "Bridging the Gap Between
Promise and Performance for Microscaling FP4 Quantization").

Every row uses the same evaluation windows (the first N windows of 2048 tokens of the WikiText-2
raw test file, token-level perplexity) and the same calibration windows (random 512-token windows
of the calibration half of the gensim Wikipedia sample, seed 0), and runs in a fresh process via
`ptq_table.py --child` (so the row protocol is exactly the PTQ table's). Rows are appended to
results/NAME.jsonl as they finish, so an interrupted run resumes; results/NAME.{json,md} are
written from all rows.

    python benchmarks/format_table.py                       # all rows, 10 windows, 32 x 512 calibration
    python benchmarks/format_table.py --render              # tables from the .jsonl only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from ptq_table import DEFAULT_DATA, metadata, run_rows  # noqa: E402

FLOAT_ROWS = [
    # (scheme, the block Hadamard that matches its block)
    ("Wfp8Afp8KVfp8", "bh32"),
    ("Wmxfp8Amxfp8KVmxfp8", "bh32"),
    ("Wmxfp4A16", "bh32"),
    ("Wmxfp4Amxfp4KVmxfp4", "bh32"),
    ("Wnvfp4A16", "bh16"),
    ("Wnvfp4Anvfp4KVnvfp4", "bh16"),
]
# grouped integer weights store float16 scales, as GPTQ and AWQ checkpoints do: INT4 in groups of
# 32 then takes 4.5 bits a weight, as NVFP4 does
INT_SCHEMES = [
    "W8A8KV8",
    "W8g32hA8g32KV8g32",
    "W4A16",
    "W4g32hA16",
    "W4g16hA16",
    "W4A4KV4",
    "W4g32hA4g32KV4g32",
    "W4g16hA4g16KV4g16",
]
# a full (not block-diagonal) rotation, for MR-GPTQ's claim that the block formats' small groups
# leave it little to gain
FULL_ROTATION = ["Wmxfp4Amxfp4KVmxfp4", "Wnvfp4Anvfp4KVnvfp4"]
ROWS = ["FP32/none/none"]
for algorithm in ("rtn", "gptq"):  # RTN rows first: they are quick
    for scheme, block in FLOAT_ROWS:
        ROWS += [f"{scheme}/none/{algorithm}", f"{scheme}/{block}/{algorithm}"]
    ROWS += [f"{scheme}/none/{algorithm}" for scheme in INT_SCHEMES]
ROWS += [f"{scheme}/rotate-online/{algorithm}" for algorithm in ("rtn", "gptq") for scheme in FULL_ROTATION]

# the table's order: by bits, then format family, then transform and algorithm
GROUPS = [
    ("8-bit weights, activations and KV cache", ["Wfp8Afp8KVfp8", "Wmxfp8Amxfp8KVmxfp8", "W8A8KV8", "W8g32hA8g32KV8g32"]),
    ("4-bit weights (W4A16)", ["Wmxfp4A16", "Wnvfp4A16", "W4A16", "W4g32hA16", "W4g16hA16"]),
    ("4-bit weights, activations and KV cache", ["Wmxfp4Amxfp4KVmxfp4", "Wnvfp4Anvfp4KVnvfp4", "W4A4KV4", "W4g32hA4g32KV4g32", "W4g16hA4g16KV4g16"]),
]


def describe(result: dict) -> str:
    bits = result.get("bits_per_weight") or 16
    return f"{result['row']:40s} ppl {result['ppl']:10.3f}  bits/weight {bits:.3f}  {result['wall_seconds']:.0f} s"


def markdown(meta: dict, rows: dict[str, dict]) -> str:
    if not rows:
        return "no rows yet\n"
    fp = rows.get("FP32/none/none")
    windows = next(iter(rows.values()))["windows"]
    lines = [
        f"{meta['model']}, {meta['data']}, first {windows} windows x {meta['seq_len']} tokens (the same windows for every row), "
        f"fp32 compute on CPU, torch {meta['torch']}, lowbit {meta['lowbit_version']}. "
        f"Calibration (GPTQ rows): {meta['calibration']} (the same windows for every row). "
        "Perplexities only: rows ran one at a time with two threads or two at a time with one thread each, so their "
        "timings (in the .json) are not comparable. '-': not measured.",
        "",
        f"FP32: perplexity {fp['ppl']:.3f}." if fp else "FP32: not measured yet.",
        "",
        "Bits/weight = bits a quantized weight takes at rest, its share of the scales included (NVFP4 adds one float32 "
        "scale per tensor). bh16 / bh32 = a block-diagonal Hadamard rotation of 16 / 32 channels at every linear's input "
        "(fused into the weights, applied online to the activations) and on queries and keys; GPTQ runs on the format's "
        "own grid with its block scales fixed before the column updates (MR-GPTQ). rotate-online = full Hadamard "
        "rotations (QuaRot's R1 online at the readers with norm gains in place, R2, R3, R4). RTN = round to nearest.",
        "",
    ]
    for title, schemes in GROUPS:
        lines += [f"### {title}", "", "| scheme | bits/weight | transform | RTN PPL | GPTQ PPL | GPTQ vs FP32 |", "|---|---|---|---|---|---|"]
        for scheme in schemes:
            for transform in ("none", "bh16", "bh32", "rotate-online"):
                rtn, gptq = rows.get(f"{scheme}/{transform}/rtn"), rows.get(f"{scheme}/{transform}/gptq")
                if rtn is None and gptq is None:
                    continue
                any_row = rtn or gptq
                bits = any_row.get("bits_per_weight")
                rel = "-" if fp is None or gptq is None else f"{100 * (gptq['ppl'] / fp['ppl'] - 1):+.1f}%"
                lines.append(f"| {scheme} | {'-' if bits is None else f'{bits:.3f}'} | {transform} | {_ppl(rtn)} | {_ppl(gptq)} | {rel} |")
        lines.append("")
    return "\n".join(lines)


def _ppl(row: dict | None) -> str:
    return "-" if row is None else f"{row['ppl']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="formats_wikitext2")
    parser.add_argument("--rows", default=",".join(ROWS), help="SCHEME/TRANSFORM/ALGORITHM, comma-separated")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--render", action="store_true", help="only write the tables from the .jsonl")
    args = parser.parse_args()
    out = ROOT / "results" / args.name
    rows = run_rows(args.rows.split(","), args, out.with_suffix(".jsonl"), describe)
    previous = out.with_suffix(".json")
    meta = json.loads(previous.read_text())["meta"] if args.render and previous.exists() else metadata(args)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
