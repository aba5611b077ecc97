#!/usr/bin/env bash
# One device call: build, CUDA/static GPU tests, then eager generate() decode at batch 1 and 16 x 32k,
# dense vs K0.7V0.7 (the host-overhead check of the eager path). Outputs in $OUT.
set -u
export PYTHONPATH=src TORCH_EXTENSIONS_DIR=/tmp/mustafar-ext PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
s=$(date +%s)
timeout 100 python3 -c "from mustafar.launch.cuda import load_extension; load_extension(); print('built')" 2>&1 | tail -2
echo "build $(( $(date +%s) - s )) s"; s=$(date +%s)
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py -k "cuda or static" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -3
echo "tests $(( $(date +%s) - s )) s"; s=$(date +%s)
timeout ${BENCH_TIMEOUT:-300} python3 -m mustafar bench --batches 1,16 --prompts 32768 --modes generate \
    --settings dense,K0.7V0.7 --out "$OUT/eager" 2>&1 | tail -12
cp "$OUT/eager/bench.json" "$OUT/eager-bench.json" 2>/dev/null; rm -rf "$OUT/eager"
echo "bench $(( $(date +%s) - s )) s"
