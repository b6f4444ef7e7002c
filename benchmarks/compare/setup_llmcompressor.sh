#!/usr/bin/env bash
# Make llm-compressor's own virtual environment (benchmarks/.venvs/llmcompressor):
# llmcompressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19, which lowbit's
# environment cannot share. torch is the same local CPU wheel lowbit uses, installed first so the
# resolver never reaches for a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/llmcompressor"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "llmcompressor==0.14.0.1" "torch==2.13.0"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
print(" ".join(f"{name} {md.version(name)}" for name in
               ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate")))
PY
