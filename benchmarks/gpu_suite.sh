#!/usr/bin/env bash
# The GPU check in one call: install over the machine's own torch and triton (nothing is
# downloaded: the GPU machines here reach no registry), run the GPU tests (the kernel tests
# run on the device there), then the speed benchmark, even if a test failed, so that one
# call brings back both; the exit code is the tests'.
#   bash benchmarks/gpu_suite.sh            # results in $OUT, or benchmarks/results/
#   GPU_BENCH_ARGS=--quick OUT=/tmp/q bash benchmarks/gpu_suite.sh   # the flow in a minute, any machine
# Under 8 minutes on one H100/H200; prints its progress.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu_device.txt"
echo "== install"
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
echo "== GPU tests"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernel_column_conv.py \
    tests/test_kernel_column_copy.py tests/test_kernel_mixture_sample.py tests/test_kernel_mixture_nll.py \
    tests/test_fused_step.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
tests=${PIPESTATUS[0]}
echo "== benchmark"
"$PYTHON" benchmarks/gpu_bench.py --out "$OUT" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "== tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
