"""Run token windows through llama.cpp (llama-cpp-python) and write what it computed; runs in its
own virtual environment (benchmarks/engines/setup_llamacpp.sh) and never imports lowbit.

    python llamacpp_run.py MODEL.gguf TOKENS.json OUT.json [--generate 32] [--prompt 64]

TOKENS.json: {"windows": [[ids...], ...]}. OUT.json: per window the log-probability llama.cpp gives
each token after the first (from its logits, evaluated in one batch of the whole window), and its
greedy continuation of the window's first `prompt` tokens.
"""

import os
import time

import numpy as np
from engine_io import error_text, parse_args, read_windows, write_result


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def main() -> None:
    def options(parser):
        parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)

    args = parse_args(__doc__, options)
    windows = read_windows(args.tokens)
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
        result["error"] = error_text(exc)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
