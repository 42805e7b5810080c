#!/usr/bin/env bash
# The GPU check in one call: install over the machine's own torch and triton, run the GPU
# tests (the kernel tests run on the device there), then the speed benchmark.
#   bash benchmarks/gpu_suite.sh            # results in $OUT, or benchmarks/results/
# Under 8 minutes on one H100/H200; prints its progress.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu_device.txt"
echo "== install"
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
pip install -q pytest safetensors tqdm 2>&1 | tail -2 || true
echo "== GPU tests"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernel_column_conv.py \
    tests/test_kernel_column_copy.py tests/test_kernel_mixture_sample.py tests/test_fused_step.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "== benchmark"
python benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
