"""One row of the comparison with GPTQModel, in its own environment (setup_gptqmodel.sh); never
imports lowbit. Loads the prepared float32 model, quantizes it with GPTQModel's `quantize` on the
prepared calibration windows (in their order), saves it in GPTQModel's own format and loads it back
with its pure-PyTorch kernel (the one that runs on a CPU). The weights that kernel computes with
(its own dequantization of the saved codes, in float16 as the kernel does it) go into the float32
model, which is evaluated on the prepared evaluation windows with lowbit's perplexity formula; so
the numbers differ from the other tools' by the weights alone. Prints one JSON line.

    GPTQMODEL_CPU_WORKERS=2 benchmarks/.venvs/gptqmodel/bin/python benchmarks/compare/run_gptqmodel.py \
        --data benchmarks/.cache/compare-w10-c128x512 --row w4a16-gptq
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# GPTQModel sizes a CPU worker pool of (cores + 1) // 2 and then asks 2 of it for model loading,
# which fails on a 2-core machine; it reads this before its first import.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor_eval import evaluate_into, row_parser  # noqa: E402
from rows import BY_KEY  # noqa: E402


def quantize_config(spec: dict):
    """GPTQModel's GPTQ with the row's grid: symmetric (scale max / 7.5 for 4 bits, the grid the other
    tools use here), per channel (group_size -1) or in groups; its other settings (damping 0.05,
    true-sequential) are its defaults. Activation-order ideas (desc_act, act_group_aware) are off:
    act_group_aware needs groups, and the other tools quantize columns in order."""
    from gptqmodel import QuantizeConfig

    group = spec["weights"].get("group") or -1
    return QuantizeConfig(bits=spec["weights"]["bits"], group_size=group, sym=True, desc_act=False, act_group_aware=False)


@torch.no_grad()
def load_dequantized(model, saved: Path) -> None:
    """Replace `model`'s decoder linear weights by what GPTQModel's torch kernel computes with."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    quantized = GPTQModel.load(str(saved), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    modules = dict(model.named_modules())
    replaced = 0
    for name, module in quantized.model.named_modules():
        if isinstance(module, TorchLinear):
            target = modules[name]
            target.weight.copy_(module.dequantize_weight().T.float())
            replaced += 1
    if replaced == 0:
        raise SystemExit("GPTQModel's saved model holds no quantized linear to evaluate")


def run(data: Path, row_key: str, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eval_ids = load_file(str(data / "eval_ids.safetensors"))["input_ids"]
    calib_ids = load_file(str(data / "calib_ids.safetensors"))["input_ids"]
    result = {
        "tool": "gptqmodel",
        "row": row_key,
        "version": metadata.version("gptqmodel"),
        "transformers": metadata.version("transformers"),
        "torch": torch.__version__,
        "threads": threads,
    }
    model = AutoModelForCausalLM.from_pretrained(data / "model", dtype=torch.float32, use_safetensors=True).eval()
    if row_key != "fp":
        from gptqmodel import GPTQModel

        spec = BY_KEY[row_key].get("gptqmodel")
        if spec is None:
            raise SystemExit(f"row {row_key} has no GPTQModel counterpart")
        result["recipe"] = spec
        calibration = [{"input_ids": ids.unsqueeze(0), "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long)} for ids in calib_ids]
        start = time.perf_counter()
        quantizing = GPTQModel.load(str(data / "model"), quantize_config(spec), dtype=torch.float32)
        quantizing.quantize(calibration, batch_size=1)
        result["quant_seconds"] = time.perf_counter() - start  # model load included: GPTQModel loads lazily for quantization
        with tempfile.TemporaryDirectory() as saved:
            quantizing.save(saved)
            del quantizing
            load_dequantized(model, Path(saved))
    return evaluate_into(result, model, eval_ids)


def main() -> None:
    parser = row_parser(__doc__, BY_KEY)
    args = parser.parse_args()
    data = args.data.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # GPTQModel writes a logs/ folder into the working directory
        print(json.dumps(run(data, args.row, args.threads)))


if __name__ == "__main__":
    main()
