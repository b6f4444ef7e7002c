"""Run token windows through vLLM (CPU build) and write what it computed; runs in vLLM's own
virtual environment (benchmarks/engines/setup_vllm.sh) and never imports lowbit.

    python vllm_run.py MODEL_DIR TOKENS.json OUT.json [--dtype bfloat16] [--kv-cache-dtype auto]
                       [--generate 32]

TOKENS.json: {"windows": [[ids...], ...]}. OUT.json: per window the log-probability vLLM gives each
prompt token after the first (prompt_logprobs), and its greedy continuation of the window's first
`prompt` tokens; or {"error": "..."} when vLLM refuses the model (no kernel on this build).
"""

import os
import time

from engine_io import error_text, parse_args, read_windows, write_result


def main() -> None:
    def options(parser):
        parser.add_argument("--dtype", default="bfloat16")
        parser.add_argument("--kv-cache-dtype", default="auto")

    args = parse_args(__doc__, options)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    windows = read_windows(args.tokens)
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
        result["error"] = error_text(exc)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
