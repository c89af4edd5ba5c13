#!/usr/bin/env bash
# Everything the GPU machine has to do, in one call: environment, GPU tests, benchmarks.
# Sized for the device as it is lent now (an NVIDIA H200, at most 15 minutes of device time per session
# including the machine's start, 10 minutes per command): `all` stays under GPU_RUN_SECONDS (default 450,
# 7.5 minutes) by capping the tests at TEST_SECONDS (default 210; kernels and optimizers first, so a cut
# costs the least important tests) and giving the benchmark what is left.
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
  # Every test, GPU-only and GPU-size ones included; the interpreter is off, so kernel tests run on CUDA.
  # A test run cut by the timeout exits 124 (recorded: a partial run is not a pass).
  timeout "${TEST_SECONDS:-210}" python3 -m pytest -q -p no:cacheprovider -rfE --durations=15 \
    tests/kernels tests/optim tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  # bench_step.py skips what would overrun its budget: whatever this script has left of GPU_RUN_SECONDS
  # (default 450), less a margin for the report. Results are saved after every phase.
  total=${GPU_RUN_SECONDS:-450}
  [ "$what" = bench ] && total=${GPU_RUN_SECONDS:-570}  # alone, the benchmark may fill a 10-minute command
  budget=$(( total - SECONDS - 20 - ${BASES_SECONDS:-60} ))  # leaves bench_bases.py (below) its minute
  [ "$budget" -lt 60 ] && budget=60
  python3 benchmarks/bench_step.py --out "$OUT" --budget-seconds "$budget" 2>&1 | tee "$OUT/bench.log" \
    | grep -v '^W[0-9]' | tail -40
  [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
  if [ -f "$OUT/bench_step.json" ]; then
    # The README performance section (image links relative to $OUT); printed so the command's output has it.
    python3 benchmarks/report.py "$OUT/bench_step.json" --image-prefix "" -o "$OUT/performance.md"
    cat "$OUT/performance.md"
  fi
fi
if [ "$what" = bases ] || [ "$what" = bench ] || [ "$what" = all ]; then
  # Dynamic bases (bench_bases.py): fused svd / eigen step vs eager, steps that refresh the basis and steps that
  # do not, on GPT-2 124M's block matrices. BASES_SECONDS (default 60; bench_step's budget leaves it out), cut to
  # what is left of a 10-minute command (GPU_COMMAND_SECONDS, default 590). `bash benchmarks/gpu_run.sh bases`:
  # this alone.
  bases=${BASES_SECONDS:-60}
  left=$(( ${GPU_COMMAND_SECONDS:-590} - SECONDS ))
  [ "$left" -lt "$bases" ] && bases=$left
  if [ "$bases" -ge 30 ]; then
    python3 benchmarks/bench_bases.py --out "$OUT" --budget-seconds "$bases" 2>&1 | tee "$OUT/bases.log" \
      | grep -v '^W[0-9]' | tail -30
    [ "${PIPESTATUS[0]}" -ne 0 ] && rc=1
    [ -f "$OUT/bench_bases.md" ] && cat "$OUT/bench_bases.md"
  else
    echo "bench_bases.py skipped: ${left} s left of the command (GPU_COMMAND_SECONDS)" | tee "$OUT/bases.log"
  fi
fi
# The device tool returns at most 8 files from $OUT: pack everything into one archive, keep the headline files.
if [ -n "${OUT_PACK:-1}" ] && [ "$(ls -A "$OUT" | wc -l)" -gt 6 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -maxdepth 1 \
    ! -name env.txt ! -name performance.md ! -name pytest_gpu.log ! -name bench_step.json -exec rm -rf {} + \
    && mv /tmp/results.tgz "$OUT/results.tgz"
fi
exit $rc
