"""Integer kernels against fp32 and the fake-quantized path, side by side, on the default model.

Variants (all RTN, per-channel symmetric weights, KV cache unquantized, lm_head and embeddings fp32):
  fp32          the model as loaded
  W8A8-fake     QuantLinear: int8 grid weights stored as fp32, activations fake-quantized per token
  W8A8-int8     Int8Linear: int8 codes, activations quantized per token, torch._int_mm (int32 acc.)
  W4A16-fake    QuantLinear: int4 grid weights stored as fp32
  W4A16-int4    Int4Linear: packed int4 (2 per byte) + bf16 scale/zero per group, torch's CPU int4
                kernel (activations in bfloat16)

Each variant runs in its own child process (so its peak memory is its own), one after the other,
in one invocation of this script. Measured per variant:
  weights_bytes   bytes of all parameters and buffers as stored in memory (packed codes + scales +
                  the fp32 embeddings, norms and lm_head); size_bytes: lowbit's accounting (16-bit
                  non-quantized tensors, fp16 scales), the figure in reports
  peak_rss        peak resident memory of the child during inference only (the kernel's peak is
                  reset, via /proc/self/clear_refs, once the model is built); build_peak_rss: while
                  building it (load + quantize + convert). Parameters are copied out of the
                  memory-mapped checkpoint first (see `build`), for every variant alike
  prefill_ms      one forward pass of 512 tokens (batch 1, with KV cache), median of --repeats
  decode_tok_s    greedy decoding, one token per forward, --decode-tokens tokens after the 512-token
                  prefill, median of --repeats
  ppl             WikiText-2 test perplexity, first --windows windows of --seq-len tokens
On disk = the saved folder: lowbit's native format for the quantized variants, transformers'
safetensors for fp32 (tokenizer files included in both).

    nice -n 5 python benchmarks/int_kernels.py            # writes benchmarks/results/int_kernels.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
VARIANTS = {
    "fp32": (None, False),
    "W8A8-fake": ("W8A8", False),
    "W8A8-int8": ("W8A8", True),
    "W4A16-fake": ("W4A16", False),
    "W4A16-int4": ("W4A16", True),
}


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def disk_bytes(model, tokenizer, quantized: bool) -> int:
    """Bytes of the saved model folder (weights, config, tokenizer): lowbit's native format
    (codes packed at their bit width) for a quantized model, transformers' safetensors for fp32."""
    import tempfile

    import lowbit

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        if quantized:
            lowbit.save_quantized(model, out, tokenizer)
        else:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def build(variant: str):
    import lowbit
    from lowbit.runtime.int_linear import convert_to_int_kernels

    scheme, integer = VARIANTS[variant]
    model, tokenizer = lowbit.load_model(lowbit.DEFAULT_MODEL)
    # The checkpoint is memory-mapped: quantized weights are copy-on-write pages of that mapping,
    # which stay resident while any tensor (the embeddings) still uses it, even after the integer
    # kernels replaced them. Give every variant its own anonymous memory so RSS compares storage.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    if scheme is not None:
        model = lowbit.quantize(model, scheme, inplace=True, progress=False)
    disk = disk_bytes(model, tokenizer, scheme is not None)  # an integer model saves as its fake-quant form
    if scheme is not None and integer:
        model = convert_to_int_kernels(model, inplace=True)
    return model.eval(), tokenizer, disk


@torch.no_grad()
def time_prefill_decode(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - t0
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, decode_tokens / (time.perf_counter() - t0)


def run_variant(args) -> dict:
    from lowbit.data import tokenize
    from lowbit.evaluation import model_size_bytes, perplexity, stored_bytes
    from lowbit.memory import peak_rss_bytes, release_freed_memory

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer, disk = build(args.variant)
    build_seconds = time.time() - t0
    build_peak = peak_rss_bytes()
    ids = tokenize(tokenizer, Path(args.data).read_text())
    release_freed_memory()  # hand freed build-time memory back before measuring
    rss_model = vm_kib("VmRSS") * 1024
    reset_peak_rss()
    prompt = ids[: args.prefill].unsqueeze(0)
    time_prefill_decode(model, prompt[:, :32], 2)  # warm-up
    prefills, decodes = [], []
    for _ in range(args.repeats):
        p, d = time_prefill_decode(model, prompt, args.decode_tokens)
        prefills.append(p)
        decodes.append(d)
    ppl = perplexity(model, ids, args.seq_len, args.windows, progress=False)
    return {
        "variant": args.variant,
        "scheme": VARIANTS[args.variant][0] or "fp32",
        "weights_bytes": stored_bytes(model),
        "size_bytes": model_size_bytes(model),
        "disk_bytes": disk,
        "rss_after_build": rss_model,
        "build_peak_rss": build_peak,
        "peak_rss": vm_kib("VmHWM") * 1024,
        "prefill_ms": 1e3 * statistics.median(prefills),
        "prefill_ms_all": [1e3 * p for p in prefills],
        "decode_tok_s": statistics.median(decodes),
        "decode_tok_s_all": decodes,
        "ppl": ppl.ppl,
        "ppl_tokens": ppl.tokens,
        "build_seconds": build_seconds,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    def mb(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.1f}"

    lines = [
        "# Integer kernels vs fp32 and fake quantization (SmolLM2-135M-Instruct, CPU)",
        "",
        f"{meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, load average "
        f"{meta['load_before']} before / {meta['load_after']} after (shared machine: timings are noisy).",
        f"Perplexity: WikiText-2 test, first {meta['windows']} windows x {meta['seq_len']} tokens. "
        f"Prefill: {meta['prefill']} tokens, batch 1. Decode: {meta['decode_tokens']} greedy tokens after it. "
        f"Median of {meta['repeats']} runs.",
        "",
        "| variant | weights in memory (MB) | lowbit size (MB) | on disk (MB) | peak RSS inference (MB) | "
        "prefill 512 (ms) | decode (tok/s) | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {mb(r['weights_bytes'])} | {mb(r['size_bytes'])} | {mb(r['disk_bytes'])} | "
            f"{mb(r['peak_rss'])} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['ppl']:.3f} |"
        )
    lines += [
        "",
        "weights in memory: every parameter and buffer as stored (fp32 embeddings/lm_head/norms included; "
        "the 30 decoder layers hold the codes). lowbit size: the report's accounting (16-bit non-quantized "
        "tensors, fp16 scales). on disk: the saved folder (lowbit.save_quantized; save_pretrained for fp32), tokenizer included.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    # one thread: on a shared machine a second thread mostly waits for a busy core
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--name", default="int_kernels")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child process: run one variant, print JSON
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "windows": args.windows,
        "seq_len": args.seq_len,
        "prefill": args.prefill,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "load_before": f"{os.getloadavg()[0]:.1f}",
    }
    rows = []
    for variant in args.variants.split(","):
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        child = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("windows", "seq_len", "prefill", "decode_tokens", "repeats", "threads", "data")
        ]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        rows.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
        print(json.dumps({k: rows[-1][k] for k in ("variant", "prefill_ms", "decode_tok_s", "ppl", "peak_rss")}), file=sys.stderr)
    meta["load_after"] = f"{os.getloadavg()[0]:.1f}"
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, meta)
    (out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
