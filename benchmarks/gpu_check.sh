#!/usr/bin/env bash
# The device check, one command (run on the lent GPU machine: torch + triton, no vLLM): writes
# benchmarks/results/gpu_vllm_mode.json and gpu.json. Bounded to 9 minutes; a part that does not finish leaves the
# others' numbers.
# Locally: `PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh cpu` runs the quick variant on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "${1:-cuda}" = "cpu" ]; then
  out="${2:-benchmarks/results/gpu_quick.json}"
  "${PYTHON:-python}" benchmarks/gpu_check.py --device cpu --quick --json "$out"
  exec "${PYTHON:-python}" benchmarks/gpu_check.py --device cpu --quick --vllm-mode --json "${out%.json}_vllm_mode.json"
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
# part 5 first and in a process of its own: vLLM's batch-invariant mode (or its pure-torch settings) is process-wide
timeout 120 "${PYTHON:-python}" benchmarks/gpu_check.py --device cuda --vllm-mode --json benchmarks/results/gpu_vllm_mode.json || true
timeout 420 "${PYTHON:-python}" benchmarks/gpu_check.py --device cuda --json benchmarks/results/gpu.json
