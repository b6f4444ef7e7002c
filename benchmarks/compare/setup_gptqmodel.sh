#!/usr/bin/env bash
# Make GPTQModel's own virtual environment (benchmarks/.venvs/gptqmodel). GPTQModel 7.5.0 is the
# newest release that accepts the local torch 2.13 CPU wheel (7.6 and later require torch >= 2.14,
# which PyPI serves only as a CUDA build); torch is installed first so the resolver never reaches
# for a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/gptqmodel"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "gptqmodel==7.5.0" "torch==2.13.0"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
print(" ".join(f"{name} {md.version(name)}" for name in ("gptqmodel", "transformers", "torch", "accelerate")))
PY
