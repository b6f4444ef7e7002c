"""Run token windows through llama.cpp (llama-cpp-python) and write what it computed; runs in its
own virtual environment (benchmarks/engines/setup_llamacpp.sh) and never imports lowbit.

    python llamacpp_run.py MODEL.gguf TOKENS.json OUT.json [--generate 32] [--prompt 64]

TOKENS.json: {"windows": [[ids...], ...]}. OUT.json: per window the log-probability llama.cpp gives
each token after the first (from its logits, evaluated in one batch of the whole window), and its
greedy continuation of the window's first `prompt` tokens.
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    windows = json.load(open(args.tokens))["windows"]
    result: dict = {"engine": "llama.cpp"}
    try:
        import llama_cpp

        result["version"] = llama_cpp.__version__
        length = max(len(w) for w in windows)
        start = time.time()
        llm = llama_cpp.Llama(
            model_path=args.model,
            n_ctx=length + args.generate + 1,
            n_batch=length,
            n_ubatch=length,
            logits_all=True,
            n_threads=args.threads,
            verbose=False,
        )
        result["load_s"] = time.time() - start
        start = time.time()
        logprobs = []
        for w in windows:
            llm.reset()
            llm.eval(w)
            scores = np.asarray(llm.scores[: len(w) - 1])
            logprobs.append(log_softmax(scores)[np.arange(len(w) - 1), w[1:]].tolist())
        result["score_s"] = time.time() - start
        result["prompt_logprobs"] = logprobs
        greedy = []
        for w in windows:
            llm.reset()
            llm.eval(w[: args.prompt])
            tokens = []
            for _ in range(args.generate):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                tokens.append(token)
                llm.eval([token])
            greedy.append(tokens)
        result["greedy"] = greedy
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k not in ("prompt_logprobs", "greedy")}), file=sys.stderr)


if __name__ == "__main__":
    main()
