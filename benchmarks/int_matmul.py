"""Which integer matmul to use on this CPU: candidate torch ops on the default model's linear shapes.

For each shape (out x in) of SmolLM2-135M's linears and 1 token (decode) or 512 tokens (prefill),
the median time of: fp32 F.linear (reference); int8 x int8 -> int32 `torch._int_mm` (weight as a
transposed view, or stored [in, out] contiguous); torch's weight-only `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` in fp32 and in bfloat16; and unpacking 4-bit codes + fp32 matmul.
lowbit's Int8Linear uses `_int_mm` with [in, out] contiguous weights; Int4Linear the int4pack op in
bfloat16. Writes benchmarks/results/int_matmul.{json,md}.

    nice -n 5 python benchmarks/int_matmul.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def candidates(tokens: int, n: int, k: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(n, k, generator=g)
    x8 = torch.randint(-127, 128, (tokens, k), dtype=torch.int8, generator=g)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w8_in_out = w8.t().contiguous()
    scale = torch.rand(n, generator=g)
    w4 = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    w4_packed = torch._convert_weight_to_int4pack_for_cpu(w4, 1)
    sz = torch.rand(k // 32, n, 2, generator=g)
    nibbles = (w4[:, ::2] | (w4[:, 1::2] << 4)).to(torch.uint8)

    def unpack_fp32():
        codes = torch.stack((nibbles & 15, nibbles >> 4), -1).view(n, k).to(torch.int8) - 8
        return F.linear(x, codes.float() * scale[:, None])

    xb, szb = x.bfloat16(), sz.bfloat16()
    return {
        "fp32 F.linear": lambda: F.linear(x, w),
        "int8 _int_mm (w.t() view)": lambda: torch._int_mm(x8, w8.t()),
        "int8 _int_mm ([in,out] contiguous)": lambda: torch._int_mm(x8, w8_in_out),
        "W8 _weight_int8pack_mm fp32": lambda: torch._weight_int8pack_mm(x, w8, scale),
        "W8 _weight_int8pack_mm bf16": lambda: torch._weight_int8pack_mm(xb, w8, scale.bfloat16()),
        "W4 int4pack fp32": lambda: torch._weight_int4pack_mm_for_cpu(x, w4_packed, 32, sz),
        "W4 int4pack bf16": lambda: torch._weight_int4pack_mm_for_cpu(xb, w4_packed, 32, szb),
        "W4 unpack + fp32 matmul": unpack_fp32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for tokens in (1, 512):
        for n, k in SHAPES:
            times = {name: median_ms(fn, args.repeats) for name, fn in candidates(tokens, n, k).items()}
            rows.append({"tokens": tokens, "out": n, "in": k, "ms": times})
    names = list(rows[0]["ms"])
    lines = [
        f"# Integer matmul candidates (torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}, "
        f"load average {os.getloadavg()[0]:.1f}: shared machine, noisy)",
        "",
        "milliseconds per call; tokens x in -> out",
        "",
        "| tokens | out x in | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['out']} x {r['in']} | " + " | ".join(f"{r['ms'][n]:.3f}" for n in names) + " |")
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "int_matmul.json").write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    (out / "int_matmul.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
