#!/usr/bin/env bash
# One device call: build the CUDA extension, run the GPU tests, the attention benchmark and a memcheck run.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_run.sh [benchmark args...]
set -u
export PYTHONPATH=src TORCH_EXTENSIONS_DIR=/tmp/mustafar-ext PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
timeout 300 python -c "from mustafar.launch.cuda import load_extension; load_extension(); print('extension built')" 2>&1 | tail -30
echo "build: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-200} python -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "gpu tests: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-300} python benchmarks/attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/attention.log" | tail -40
echo "benchmark: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${SAN_TIMEOUT:-100} compute-sanitizer --tool memcheck --print-limit 20 python benchmarks/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log" | tail -12
echo "memcheck: $(( $(date +%s) - start )) s"
