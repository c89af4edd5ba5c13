#!/usr/bin/env bash
# Everything the GPU machine has to do, in one call: environment, GPU tests, benchmarks.
# Uses the machine's own torch/Triton (nothing is installed). Results go to $OUT (default
# benchmarks/results/latest); copy the ones worth keeping into benchmarks/results/.
#   usage: bash benchmarks/gpu_run.sh [tests|bench|all]
set -uo pipefail
what=${1:-all}
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
  echo "git $(cat .gitsha 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee "$OUT/env.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # Every test, GPU-only ones included; the interpreter is off, so kernel tests run on CUDA.
  python3 -m pytest -q -p no:cacheprovider -m "not slow" tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  if [ -f benchmarks/bench_optimizer_step.py ]; then
    python3 benchmarks/bench_optimizer_step.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
  fi
fi
exit $rc
