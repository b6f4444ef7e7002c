"""One row of the comparison with llm-compressor, in its own environment (setup_llmcompressor.sh);
never imports lowbit. Loads the prepared float32 model, runs `oneshot` with the row's modifiers on
the prepared calibration windows (in their order, unshuffled), then evaluates the model as
llm-compressor leaves it in memory (compressed-tensors' fake-quantized forward: quantized weights,
dynamic per-token activation quantization) on the prepared evaluation windows, with the same
token-level perplexity as lowbit's: exp(total NLL / predicted tokens), each 2048-token window
predicting its last 2047 tokens. Prints one JSON line.

    benchmarks/.venvs/llmcompressor/bin/python benchmarks/compare/run_llmcompressor.py \
        --data benchmarks/.cache/compare-w10-c128x512 --row w4a16-gptq
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor_eval import evaluate_into, row_parser  # noqa: E402
from rows import BY_KEY  # noqa: E402


def scheme_groups(spec: dict) -> dict:
    """compressed-tensors config groups for the row: symmetric integer weights per channel or
    group (with the row's weight observer if it names one, else llm-compressor's default MinMax),
    optional dynamic per-token symmetric integer activations."""
    weights = {"num_bits": spec["weights"]["bits"], "type": "int", "symmetric": True, "dynamic": False}
    if spec["weights"].get("observer"):
        weights["observer"] = spec["weights"]["observer"]
    if spec["weights"].get("group"):
        weights.update(strategy="group", group_size=spec["weights"]["group"])
    else:
        weights["strategy"] = "channel"
    group = {"targets": ["Linear"], "weights": weights}
    if spec.get("acts"):
        group["input_activations"] = {"num_bits": spec["acts"], "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    return {"group_0": group}


def modifiers(spec: dict) -> list:
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier, SpinQuantModifier

    chain = []
    if spec.get("smoothquant") is not None:
        chain.append(SmoothQuantModifier(smoothing_strength=spec["smoothquant"]))
    if spec.get("spinquant"):
        chain.append(SpinQuantModifier(rotations=spec["spinquant"], transform_type="random-hadamard"))
    groups = scheme_groups(spec)
    if spec["method"] == "awq":
        chain.append(AWQModifier(ignore=["lm_head"], config_groups=groups))
    elif spec["method"] == "gptq":
        chain.append(GPTQModifier(ignore=["lm_head"], config_groups=groups))
    else:
        chain.append(QuantizationModifier(ignore=["lm_head"], config_groups=groups))
    return chain


def cpu_only_pinning() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies,
    which raises on a machine without an accelerator; pinning changes no value, so on such a
    machine it is skipped."""
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def run(data: Path, row_key: str, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    cpu_only_pinning()

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eval_ids = load_file(str(data / "eval_ids.safetensors"))["input_ids"]
    calib_ids = load_file(str(data / "calib_ids.safetensors"))["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(data / "model", dtype=torch.float32, use_safetensors=True)
    model.eval()
    result = {
        "tool": "llm-compressor",
        "row": row_key,
        "version": metadata.version("llmcompressor"),
        "compressed_tensors": metadata.version("compressed-tensors"),
        "transformers": metadata.version("transformers"),
        "torch": torch.__version__,
        "threads": threads,
    }
    if row_key != "fp":
        from datasets import Dataset
        from llmcompressor import oneshot

        spec = BY_KEY[row_key]["llmcompressor"]
        if spec is None:
            raise SystemExit(f"row {row_key} is lowbit only")
        result["recipe"] = spec
        dataset = Dataset.from_dict({"input_ids": calib_ids.tolist(), "attention_mask": torch.ones_like(calib_ids).tolist()})
        start = time.perf_counter()
        oneshot(
            model=model,
            dataset=dataset,
            recipe=modifiers(spec),
            num_calibration_samples=calib_ids.shape[0],
            max_seq_length=calib_ids.shape[1],
            shuffle_calibration_samples=False,
        )
        result["quant_seconds"] = time.perf_counter() - start
    return evaluate_into(result, model, eval_ids)


def main() -> None:
    parser = row_parser(__doc__, BY_KEY)
    args = parser.parse_args()
    print(json.dumps(run(args.data, args.row, args.threads)))


if __name__ == "__main__":
    main()
