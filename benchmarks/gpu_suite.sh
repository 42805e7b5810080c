#!/usr/bin/env bash
# The GPU check in one call: install over the machine's own torch and triton (nothing is
# downloaded: the GPU machines here reach no registry), run the GPU tests (the kernel tests
# run on the device there), then the sampling and the training benchmarks, even if a test
# failed, so that one call brings back all three; the exit code is the tests'.
#   bash benchmarks/gpu_suite.sh            # results in $OUT, or benchmarks/results/
#   DATA_DIR=shared/data bash benchmarks/gpu_suite.sh   # + the training benchmark's real MNIST runs
#   GPU_BENCH_ARGS=--quick TRAIN_BENCH_ARGS=--quick OUT=/tmp/q bash benchmarks/gpu_suite.sh   # the flow, any machine
# Prints its progress. The sampling part took under 8 minutes by estimate; the training part
# has not run on a GPU yet (split the call with SKIP_SAMPLING=1 / SKIP_TRAINING=1 if it must).
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
    tests/test_fused_step.py tests/test_kernel_shifted_conv.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
tests=${PIPESTATUS[0]}
bench=0
if [ -z "${SKIP_SAMPLING:-}" ]; then
    echo "== sampling benchmark"
    "$PYTHON" benchmarks/gpu_bench.py --out "$OUT" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log"
    bench=${PIPESTATUS[0]}
fi
training=0
if [ -z "${SKIP_TRAINING:-}" ]; then
    echo "== training benchmark"
    data=()
    [ -n "${DATA_DIR:-}" ] && data=(--data_dir "$DATA_DIR")
    "$PYTHON" benchmarks/train_bench.py --out "$OUT" "${data[@]}" ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$OUT/train_bench.log"
    training=${PIPESTATUS[0]}
fi
codec=0
if [ -n "${DATA_DIR:-}" ] && [ -z "${SKIP_CODEC:-}" ]; then
    echo "== codec benchmark (the Triton engine; 1,000 images of each test set)"
    "$PYTHON" benchmarks/codec_table.py --data_dir "$DATA_DIR" --device cuda --images 1000 --out "$OUT/codec_cuda" 2>&1 \
        | tee "$OUT/codec_bench.log" | grep -v "coding:"
    codec=${PIPESTATUS[0]}
fi
echo "== tests exit $tests, sampling benchmark exit $bench, training benchmark exit $training, codec exit $codec"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$training" -eq 0 ] && [ "$codec" -eq 0 ]
