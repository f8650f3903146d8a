#!/usr/bin/env bash
# The first run on a lent GPU, in one command: the GPU tests, then the GPU benchmarks.
#
#     bash benchmarks/gpu_check.sh            # results in $OUT (the device tool's folder) or ./gpu_check_out
#
# Writes tests.log, bench.log, gpu_bench.json and gpu_bench.md (markdown tables ready to paste into
# BENCHMARKS.md). Sized for <= 8 minutes on an H100/H200: each stage has a hard time limit, the
# benchmark saves after every shape, so a stage cut short still leaves what it measured. Without
# CUDA it says so in one line and exits 0. Exit status: 1 if the tests failed or a stage timed out.
set -u -o pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here, nothing to check"
    exit 0
fi
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$out/device.txt" 2>&1
# Tests: the interpreter cases natively on the GPU, real widths, > 2^31 elements, memory.
timeout 240 python -m pytest -q -p no:cacheprovider -W ignore::RuntimeWarning \
    tests/test_triton_backend.py 2>&1 | tail -n 200 > "$out/tests.log" || status=1
tail -n 3 "$out/tests.log"
# Benchmarks: CE target shape, linear CE (1 and 6 chunks), the block sweep, the other CE shapes.
timeout 230 python -m crossent bench --gpu --linear --sweep --rounds 2 \
    --json "$out/gpu_bench.json" --markdown "$out/gpu_bench.md" > "$out/bench.log" 2>&1 || status=1
tail -n 5 "$out/bench.log"
echo "gpu_check: results in $out (status $status)"
exit $status
