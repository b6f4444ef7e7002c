#!/usr/bin/env bash
# Make llama.cpp's Python binding in its own virtual environment (benchmarks/.venvs/llamacpp).
# llama-cpp-python builds llama.cpp from source (20-30 minutes on 2 cores); the built wheel is
# kept in benchmarks/.cache/wheels so a second run installs in seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/llamacpp"
cache="$here/.cache/wheels"
version=0.3.36
mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
wheel=$(ls "$cache"/llama_cpp_python-$version-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    # CPU only, no OpenMP thread pinning surprises; the native CPU flags of this machine
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" "$venv/bin/pip" wheel --no-deps -w "$cache" "llama-cpp-python==$version"
    wheel=$(ls "$cache"/llama_cpp_python-$version-*.whl | head -1)
fi
"$venv/bin/pip" install "$wheel" numpy diskcache jinja2 typing-extensions
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
