#!/usr/bin/env bash
# Short device call: build, CUDA/static GPU tests, Llama-shape attention + compress timings, memcheck.
set -u
export PYTHONPATH=src TORCH_EXTENSIONS_DIR=/tmp/mustafar-ext PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
s=$(date +%s)
timeout 80 python -c "from mustafar.launch.cuda import load_extension; load_extension(); print('built')" 2>&1 | tail -3
echo "build $(( $(date +%s) - s )) s"; s=$(date +%s)
timeout 55 python -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py -k "cuda or static" 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
echo "tests $(( $(date +%s) - s )) s"; s=$(date +%s)
timeout 60 python benchmarks/attention.py --backends cuda --shapes llama3-8b --out "$OUT" 2>&1 | tee "$OUT/attention.log" | tail -14
echo "bench $(( $(date +%s) - s )) s"; s=$(date +%s)
timeout 25 compute-sanitizer --tool memcheck --print-limit 10 python benchmarks/sanitize_case.py 2>&1 | tee "$OUT/memcheck.log" | tail -3
echo "memcheck $(( $(date +%s) - s )) s"
