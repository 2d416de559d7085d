#!/usr/bin/env bash
# GPU check of the CuPy backend and of memopt on CUDA: the GPU test suite, the kernel
# benchmark, then the memory and planner benchmarks on CUDA (tracker vs allocator peaks).
# Usage: benchmarks/gpu/run.sh [RESULTS_FILE]   (default: $SNNKIT_BENCH_RESULTS or
# benchmarks/gpu/results.md). Budget: under 8 minutes (tests <= 180 s, kernels <= 100 s,
# memory <= 2 x 45 s, planner <= 75 s). Optional peers: wheels in .whl/ (e.g. spikingjelly)
# are installed to /tmp/site first. SNNKIT_FULL_SUITE=1 also runs the whole CPU suite.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS="${1:-${SNNKIT_BENCH_RESULTS:-benchmarks/gpu/results.md}}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p "$(dirname "$RESULTS")"
LOG="$(mktemp)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
"$PY" -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'cuda', torch.cuda.is_available())"
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"   # kernels compile per process: spread them

start=$(date +%s)
timeout 180 "$PY" -m pytest -q -rfEs $XDIST -p no:cacheprovider tests/gpu tests/neuron/test_codegen.py 2>&1 | tee "$LOG"
tests_rc=${PIPESTATUS[0]}
echo "tests: rc=$tests_rc in $(( $(date +%s) - start )) s"

section() {  # name, limit (s), command...: run it, copy its output into the results file
    local name="$1" limit="$2"; shift 2
    local t0; t0=$(date +%s)
    { echo; echo "## $name"; echo; echo '```'; } >> "$RESULTS"
    timeout "$limit" "$@" 2>&1 | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    { echo '```'; echo "exit code $rc in $(( $(date +%s) - t0 )) s"; } >> "$RESULTS"
    return "$rc"
}

bstart=$(date +%s)
timeout 100 "$PY" benchmarks/gpu/bench_neuron.py --out "$RESULTS"
bench_rc=$?
echo "bench: rc=$bench_rc in $(( $(date +%s) - bstart )) s"
section "memory benchmark on CUDA" 45 "$PY" benchmarks/memory.py --device cuda --repeat 9; mem_rc=$?
section "memory benchmark on CUDA, backend cupy" 45 "$PY" benchmarks/memory.py --device cuda --backend cupy --repeat 9 \
    || mem_rc=$?
section "planner benchmark on CUDA" 75 "$PY" benchmarks/planner.py --device cuda --repeat 3 --rounds 5; plan_rc=$?
full_rc=0
if [ "${SNNKIT_FULL_SUITE:-0}" = 1 ]; then
    section "whole suite on the GPU machine" 150 "$PY" -m pytest -q -x --run-slow $XDIST -p no:cacheprovider; full_rc=$?
fi

{
    echo
    echo "GPU tests (tests/gpu): exit code $tests_rc; summary: $(tail -n 1 "$LOG")"
    echo "Exit codes: kernels $bench_rc, memory $mem_rc, planner $plan_rc, full suite $full_rc; total $(( $(date +%s) - start )) s"
} >> "$RESULTS"
rm -f "$LOG"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$mem_rc" -eq 0 ] && [ "$plan_rc" -eq 0 ] && [ "$full_rc" -eq 0 ]
