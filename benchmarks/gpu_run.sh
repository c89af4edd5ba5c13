#!/usr/bin/env bash
# Everything a GPU loan has to answer, in one call, most important first. A loan is short (15 device-minutes
# including a 1-2 minute machine start, 10 minutes per command), so the work is cut into phases, each its own
# process under `timeout -s INT -k 10 <limit>` with its own log: a phase cut by its limit still prints its
# failures and summary line (SIGINT, not SIGTERM), and the phases after it still run. summary.md (status, seconds
# and headline figures per phase) is rewritten after every phase, and the folder is packed after every phase too,
# so a command killed from outside still leaves a complete set of files.
#
#   usage: bash benchmarks/gpu_run.sh [all|tests|bench|bases]      (default all)
#
# Phases (all): env, correctness (GPT-2 124M shapes, every static scope, fused vs eager vs float64, no host sync,
# no recompile), memcheck and racecheck (compute-sanitizer on one small fused step each for none / output /
# global), speed (the GPT-2 table: fused vs torch.optim.AdamW(fused=True) and eager, per scope and precision;
# never skipped: bench_step.py --keep-first-table cuts precisions instead), tf32_probe, gpu_tests (the remaining
# GPU tests by marker, spread with pytest-xdist where installed), then if time remains bases and e2e.
# tests: env, correctness, memcheck, racecheck, tf32_probe, gpu_tests. bench: env, speed, bases, e2e.
#
# Environment:
#   OUT               where the results go (default benchmarks/results/latest); it never holds more than 8 files:
#                     summary.md, env.log, correctness.log, sanitizer.log, bench_step.json, bench_step.md,
#                     gpu_tests.log, and results.tgz with every log and JSON of the run
#   GPU_RUN_SECONDS   the whole run's deadline (default 540: a 10-minute command less the copies)
#   GPU_RUN_PHASES    a comma list replacing the mode's phases
#   GPU_RUN_DRY=1     the CPU dry run: every phase on CPU tensors, kernels under the Triton interpreter on tiny
#                     shapes, compute-sanitizer replaced by a stand-in when absent (CI runs this)
#   GPU_RUN_LIMIT_<phase>, GPU_RUN_CMD_<phase>   a phase's limit in seconds / its command (tests plant phases)
#   PYTHON            the interpreter (default python3: the GPU machine's own torch and Triton, nothing installed)
# Write .gitsha into the tree before sending it to the device (the copy that travels has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
KEPT="summary.md env.log correctness.log sanitizer.log bench_step.json bench_step.md gpu_tests.log"
inner=${GPU_RUN_INNER:-}  # set for the process of one phase (see below)
mode=${1:-all}
[ -n "$inner" ] && mode=inner
OUT=${OUT:-benchmarks/results/latest}
DRY=${GPU_RUN_DRY:-0}
PY=${PYTHON:-python3}
DEADLINE=${GPU_RUN_SECONDS:-540}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-160}  # wide: pytest cuts failure lines to it
case $mode in
  all) phases="env correctness memcheck racecheck speed tf32_probe gpu_tests bases e2e" ;;
  tests) phases="env correctness memcheck racecheck tf32_probe gpu_tests" ;;
  bench) phases="env speed bases e2e" ;;
  bases) phases="env bases" ;;
  inner) phases="" ;;
  *) echo "gpu_run.sh: unknown mode '$mode' (all, tests, bench or bases)" >&2; exit 2 ;;
esac
[ -n "${GPU_RUN_PHASES:-}" ] && phases=${GPU_RUN_PHASES//,/ }
if [ -z "$inner" ]; then
  mkdir -p "$OUT"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
  # A previous run's files would be mistaken for this one's (only ours: OUT may be a folder of other results).
  for f in $KEPT results.tgz; do rm -f "$OUT/$f"; done
  export GPU_RUN_MODE=$mode
fi
dry=()
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  dry=(--dry-run)
fi

# Default limits (seconds), estimated for an H100 (no loan has measured them yet): a 10-minute loan (8 minutes after the machine starts)
# gets correctness, both sanitizers and the speed table. 0: whatever is left of the deadline.
declare -A LIMIT=([env]=20 [correctness]=150 [memcheck]=75 [racecheck]=50 [speed]=160 [tf32_probe]=40
                  [gpu_tests]=0 [bases]=60 [e2e]=60)

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
xdist=()
timeouts=()
if [ "$DRY" != 1 ]; then
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # 4 processes share the GPU; most tests are small
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeouts=(--timeout=240)  # one hung test must not eat the phase
fi
pytest_args=(-q -rfE -p no:cacheprovider)

env_report() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  else
    echo "no GPU: nvidia-smi absent (dry run: $DRY)"
  fi
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpus', torch.cuda.device_count())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  echo "git $(cat .gitsha 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "compute-sanitizer ${sanitizer:-absent}; pytest-xdist ${xdist[*]:-no}; mode ${GPU_RUN_MODE:-?}; deadline ${DEADLINE} s"
}

sanitize() {  # sanitize TOOL: the small fused steps under compute-sanitizer TOOL, or the stand-in without it
  if [ -n "$sanitizer" ] && [ "$DRY" != 1 ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$1" --error-exitcode 1 --print-limit 20 \
      "$PY" benchmarks/sanitize_step.py
  else
    echo "stand-in: compute-sanitizer ${sanitizer:+not used in a dry run}${sanitizer:-is absent}; the same steps run" \
      "without it (no $1 verdict)"
    "$PY" benchmarks/sanitize_step.py "${dry[@]}" && return 3  # 3: ran, but no sanitizer verdict
  fi
}

run_phase() {  # run_phase NAME LIMIT
  local name=$1 limit=$2
  local log=$WORK/$name.log
  case $name in
    env) env_report ;;
    correctness) "$PY" -m pytest "${pytest_args[@]}" -s tests/optim/test_gpt2_shapes.py ;;
    memcheck | racecheck) sanitize "$name" ;;
    speed) "$PY" benchmarks/bench_step.py "${dry[@]}" --out "$WORK" --sets gpt2 --phases ceilings,table \
             --keep-first-table --precisions tf32x3,tf32,ieee --budget-seconds $(( limit > 40 ? limit - 15 : 25 )) ;;
    tf32_probe) "$PY" benchmarks/probe_tf32.py "${dry[@]}" --out "$WORK" ;;
    gpu_tests)
      # GPU-marked tests and the kernel tests that run on CUDA, never the compile tests or the CPU suite; the
      # correctness phase's file has run already. The dry run collects the GPU-marked ones (they skip on a CPU).
      local marks="(gpu or interpret) and not compile"
      [ "$DRY" = 1 ] && marks="gpu and not compile"
      "$PY" -m pytest "${pytest_args[@]}" --durations=15 "${xdist[@]}" "${timeouts[@]}" -m "$marks" \
        tests/kernels tests/optim tests/test_metrics.py --ignore=tests/optim/test_gpt2_shapes.py ;;
    bases) "$PY" benchmarks/bench_bases.py "${dry[@]}" --out "$WORK" --budget-seconds $(( limit - 10 )) ;;
    e2e) "$PY" benchmarks/bench_step.py "${dry[@]}" --out "$WORK/e2e" --sets gpt2 --phases ceilings,e2e \
           --precisions tf32x3 --budget-seconds $(( limit - 10 )) ;;
  esac > "$log" 2>&1
}

pack() {  # the headline files into OUT, everything into OUT/results.tgz: at most 8 files there at any time
  "$PY" benchmarks/gpu_summary.py "$WORK" > /dev/null || echo "gpu_summary.py failed" >> "$WORK/summary.md"
  cat "$WORK/memcheck.log" "$WORK/racecheck.log" > "$WORK/sanitizer.log" 2>/dev/null
  for f in $KEPT; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"
  done
  tar czf "$OUT/results.tgz.part" -C "$WORK" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}

# Each phase runs in its own process, `GPU_RUN_INNER=1 bash gpu_run.sh --phase NAME LIMIT` under timeout, whose
# SIGINT reaches the whole process group (pytest, its xdist workers, compute-sanitizer and its target).
if [ -n "$inner" ]; then
  WORK=$WORK_DIR
  override="GPU_RUN_CMD_$2"
  if [ -n "${!override:-}" ]; then bash -c "${!override}" > "$WORK/$2.log" 2>&1; exit; fi
  run_phase "$2" "$3"
  exit
fi
: > "$WORK/phases.tsv"
rc=0
for name in $phases; do
  [ -z "${LIMIT[$name]+x}" ] && { echo "gpu_run.sh: unknown phase '$name'" >&2; rc=2; continue; }
  limit_var="GPU_RUN_LIMIT_$name"
  limit=${!limit_var:-${LIMIT[$name]}}
  left=$(( DEADLINE - SECONDS - 5 ))
  { [ "$limit" -eq 0 ] || [ "$limit" -gt "$left" ]; } && limit=$left
  if [ "$left" -lt 15 ]; then  # no phase does anything useful in less
    printf '%s\tskipped\t0\t-\t%s\n' "$name" "$limit" >> "$WORK/phases.tsv"
    echo "== $name: skipped (${left} s left of ${DEADLINE})"
    pack
    continue
  fi
  echo "== $name (limit ${limit} s, ${SECONDS} s elapsed)"
  t0=$SECONDS
  GPU_RUN_INNER=1 WORK_DIR=$WORK timeout -s INT -k 10 "$limit" bash "$0" --phase "$name" "$limit"
  code=$?
  case $code in
    0) status=pass ;;
    3) status=stand-in ;;
    124 | 137) status=cut ;;
    *) status=fail ;;
  esac
  [ "$status" = pass ] || [ "$status" = stand-in ] || rc=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - t0 )) "$code" "$limit" >> "$WORK/phases.tsv"
  # What the phase printed last: pytest's failures and counts, a benchmark's table, a sanitizer's verdict.
  grep -v -e '^W[0-9]' -e '^rotkern: param group' "$WORK/$name.log" | tail -n 15 | sed 's/^/   /'
  echo "== $name: $status in $(( SECONDS - t0 )) s"
  pack
done
cat "$OUT/summary.md"
rm -rf "$WORK"
exit $rc
