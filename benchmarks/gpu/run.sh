#!/usr/bin/env bash
# GPU check of the CuPy backend: the GPU test suite, then the kernel benchmark.
# Usage: benchmarks/gpu/run.sh [RESULTS_FILE]   (default: $SNNKIT_BENCH_RESULTS or
# benchmarks/gpu/results.md). Budget: under 8 minutes (tests <= 4 min, bench <= 3.5 min).
# Optional peers: wheels in .whl/ (e.g. spikingjelly) are installed to /tmp/site first.
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

start=$(date +%s)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/neuron/test_codegen.py 2>&1 | tee "$LOG"
tests_rc=${PIPESTATUS[0]}
echo "tests: rc=$tests_rc in $(( $(date +%s) - start )) s"

bstart=$(date +%s)
timeout 210 "$PY" benchmarks/gpu/bench_neuron.py --out "$RESULTS"
bench_rc=$?
echo "bench: rc=$bench_rc in $(( $(date +%s) - bstart )) s"

{
    echo
    echo "GPU tests (tests/gpu): exit code $tests_rc; summary: $(tail -n 1 "$LOG")"
    echo "Benchmark exit code $bench_rc; total $(( $(date +%s) - start )) s"
} >> "$RESULTS"
rm -f "$LOG"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
