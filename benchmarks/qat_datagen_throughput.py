"""Throughput of LLM-QAT data generation on the default model, measured side by side:

- lowbit: `generate_batch`, many sequences at once with the KV cache (batch sizes given);
- one at a time, KV cache: the same sampler with one sequence per batch;
- one at a time, no cache: each new token from a full forward pass over the sequence so far,
  one sequence at a time (the shape of the public reference code's loop).

Same model, same strategy (hybrid), same lengths (end of sequence never sampled, so every
sequence has exactly --length tokens and tokens/s compare directly), fp32, this machine's threads.

    python benchmarks/qat_datagen_throughput.py --length 128 --sequences 16 --batch-sizes 16 --slow-sequences 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data.generate import Sampling, generate_batch, sample_next, start_tokens

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def one_at_a_time_without_cache(model, tokenizer, count: int, length: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Hybrid sampling, one sequence at a time, recomputing the whole prefix for every token."""
    allowed = start_tokens(tokenizer, model.config.vocab_size)
    banned = sorted(set(tokenizer.all_special_ids))
    out = []
    for _ in range(count):
        seq = allowed[torch.randint(0, allowed.numel(), (1,), generator=gen)].view(1, 1)
        k = int(torch.randint(3, 6, (1,), generator=gen))
        for t in range(1, length):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1].float()
            logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1) if t <= k else sample_next(logits, gen)
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        out.append(seq)
    return out


def timed(fn) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    seqs = fn()
    return time.perf_counter() - start, seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--batch-sizes", default="16")
    parser.add_argument("--slow-sequences", type=int, default=4, help="sequences for the one-at-a-time loops")
    parser.add_argument("--name", default="qat_datagen_throughput")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 by default: on a shared machine 2 threads ran ~10x slower from oversubscription)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = lowbit.load_model()
    sampling = Sampling()
    rows = []

    def add(method: str, batch: int, seconds: float, seqs: list[torch.Tensor]) -> None:
        tokens = sum(s.numel() - 1 for s in seqs)  # generated tokens (the start token is drawn, not generated)
        rows.append(
            {"method": method, "batch": batch, "sequences": len(seqs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        )
        print(f"{method:40s} batch {batch:3d}: {len(seqs)} x {args.length} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        gen = torch.Generator().manual_seed(0)
        seconds, seqs = timed(
            lambda batch=batch, gen=gen: [
                s
                for i in range(0, args.sequences, batch)
                for s in generate_batch(model, tok, min(batch, args.sequences - i), args.length, gen, sampling)
            ]
        )
        add("lowbit batched, KV cache", batch, seconds, seqs)
    gen = torch.Generator().manual_seed(0)
    seconds, seqs = timed(lambda: [s for _ in range(args.slow_sequences) for s in generate_batch(model, tok, 1, args.length, gen, sampling)])
    add("one at a time, KV cache", 1, seconds, seqs)
    gen = torch.Generator().manual_seed(0)
    seconds, seqs = timed(lambda: one_at_a_time_without_cache(model, tok, args.slow_sequences, args.length, gen))
    add("one at a time, no cache (reference loop)", 1, seconds, seqs)

    slowest = rows[-1]["tokens_per_s"]
    meta = {
        "model": lowbit.DEFAULT_MODEL,
        "length": args.length,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"Generation throughput, {lowbit.DEFAULT_MODEL} fp32, sequences of {args.length} tokens (hybrid sampling), "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}. Reproduce: "
        f"`python benchmarks/qat_datagen_throughput.py --length {args.length} --sequences {args.sequences} "
        f"--batch-sizes {args.batch_sizes} --slow-sequences {args.slow_sequences}`",
        "",
        "| method | batch | sequences | generated tokens | seconds | tokens/s | vs no-cache loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['sequences']} | {r['tokens']} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / slowest:.1f}x |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
