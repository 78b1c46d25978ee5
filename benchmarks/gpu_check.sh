#!/usr/bin/env bash
# The device check, one command (run on the lent GPU machine: torch + triton, no vLLM): writes
# benchmarks/results/gpu.json. Bounded to 8 minutes; a part that does not finish leaves the others' numbers.
# Locally: `PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh cpu` runs the quick variant on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "${1:-cuda}" = "cpu" ]; then
  exec "${PYTHON:-python}" benchmarks/gpu_check.py --device cpu --quick --json "${2:-benchmarks/results/gpu_quick.json}"
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
timeout 480 "${PYTHON:-python}" benchmarks/gpu_check.py --device cuda --json benchmarks/results/gpu.json
