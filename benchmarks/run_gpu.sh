#!/usr/bin/env bash
# One run on a borrowed GPU machine (H200, Python 3.12, torch 2.11, triton 3.6,
# no network), from the repository root:
#
#     bash benchmarks/run_gpu.sh OUTDIR
#
# Builds the extension without the network, runs the GPU tests, the Triton tests
# on CUDA (TRITON_INTERPRET=0) and the GPU benchmarks, all within about 8
# minutes (each step has a time limit; a benchmark run that hits its limit is
# interrupted with SIGINT and still writes its JSON). Writes at most 6 files:
#   OUTDIR/env.txt          versions, nvidia-smi
#   OUTDIR/run.log          output of every step
#   OUTDIR/bench.json       pytest-benchmark JSON: eager and fused providers
#   OUTDIR/bench_compile.json  eager and torch.compile providers (time left over)
#   OUTDIR/summary.md       step exit codes + benchmarks/report.py tables
#   OUTDIR/speedup.png      speedup vs K (NCE) / N (others)
# pytest-benchmark missing on the machine: carry the venv's pure-Python
# pytest_benchmark, cpuinfo and their *.dist-info folders (the script finds them
# under .venv/lib/python3*/site-packages and puts copies on PYTHONPATH).
set -u
OUT=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$(date +%s)
TOTAL=${RUN_GPU_BUDGET_S:-470}          # whole script, seconds
LOG="$OUT/run.log"
: > "$LOG"
STATUS=()

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

step() {  # step NAME MAX_SECONDS CMD... : run with min(MAX, time left) seconds, SIGINT at the limit
  local name=$1 max=$2; shift 2
  local lim; lim=$(left)
  (( lim > max )) && lim=$max
  if (( lim < 20 )); then
    STATUS+=("$name: not run (time budget spent)"); echo "=== $name: not run (budget)" >> "$LOG"; return
  fi
  echo "=== $name (limit ${lim}s): $*" >> "$LOG"
  local t0; t0=$(date +%s)
  timeout -s INT -k 15 "$lim" "$@" >> "$LOG" 2>&1
  local rc=$?
  STATUS+=("$name: rc=$rc in $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (time limit)')")
  echo "=== $name: rc=$rc" >> "$LOG"
}

{
  date -u; nvidia-smi 2>&1 | head -20
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  $PY -c 'import triton; print("triton", triton.__version__)' 2>&1
  $PY -c 'import pytest; print("pytest", pytest.__version__)' 2>&1
  command -v nvcc && nvcc --version | tail -2
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -30
} > "$OUT/env.txt" 2>&1

if ! $PY -c 'import pytest_benchmark' 2>/dev/null; then
  DEPS=$(mktemp -d)
  for sp in .venv/lib/python3*/site-packages; do
    cp -r "$sp"/pytest_benchmark* "$sp"/cpuinfo "$sp"/py_cpuinfo* "$DEPS"/ 2>/dev/null
  done
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
  $PY -c 'import pytest_benchmark' 2>/dev/null || echo "pytest-benchmark is missing: no benchmarks" >> "$OUT/env.txt"
fi

# 1. build (C++ + CUDA kernels) against the machine's torch, nothing from the network
# (setup.py decides whether to build the CUDA sources; one architecture keeps nvcc short)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
step build 240 $PY -m pip install -e . --no-build-isolation --no-deps

# 2. GPU tests (the @pytest.mark.gpu tests put their tensors on CUDA; the
#    Triton tests on CPU tensors need the interpreter and run in `make test`)
export TRITON_INTERPRET=0
step gpu-tests 150 $PY -m pytest python_tests -m gpu -q -p no:cacheprovider

# 3. benchmarks: eager + fused providers first, torch.compile with the time left
BENCH=(-m pytest benchmarks/ --benchmark-only --bench-device=cuda -q -p no:cacheprovider
       --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-columns=median,min,rounds)
step bench 230 $PY "${BENCH[@]}" -k "not compile" --benchmark-json="$OUT/bench.json"
step bench-compile 200 $PY "${BENCH[@]}" -k "eager or compile" --benchmark-json="$OUT/bench_compile.json"

# 4. tables and plot
JSONS=$(ls "$OUT"/bench.json "$OUT"/bench_compile.json 2>/dev/null)
$PY benchmarks/report.py $JSONS --out "$OUT/summary.md" --plot "$OUT/speedup.png" >> "$LOG" 2>&1
{
  echo; echo "## run_gpu.sh steps ($(( $(date +%s) - START ))s in all)"; echo
  for s in "${STATUS[@]}"; do echo "* $s"; done
} >> "$OUT/summary.md"
printf '%s\n' "${STATUS[@]}"
