#!/usr/bin/env bash
# One device call (1 GPU of any H200 kind): build, CUDA/static GPU tests, issue 8's GPU-vs-CPU greedy tokens,
# issue 5's 20k-step long run, and the capacity search at a 32k prompt (Llama-3-8B shape, 80 GiB budget).
# Usage (repository root): bash benchmarks/gpu_e2e_checks.sh   (outputs and logs go to $OUT)
set -u
export PYTHONPATH=src TORCH_EXTENSIONS_DIR=/tmp/mustafar-ext PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/run.log"
step() { echo "== $1 $(( $(date +%s) - s )) s" | tee -a "$LOG"; s=$(date +%s); }
s=$(date +%s)
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
timeout 100 python3 -c "from mustafar.launch.cuda import load_extension; load_extension(); print('built')" 2>&1 \
    | tail -3 | tee -a "$LOG"
step build
timeout 80 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py -k "cuda or static" 2>&1 \
    | tail -4 | tee -a "$LOG"
step tests
timeout 90 python3 benchmarks/gpu_cpu_tokens.py --tokens 32 --out "$OUT/gpu_cpu_tokens.json" 2>&1 | tail -12 \
    | tee -a "$LOG"
step tokens
timeout ${LONG_TIMEOUT:-200} python3 benchmarks/long_run.py --steps ${LONG_STEPS:-20000} --out "$OUT" 2>&1 \
    | tail -8 | tee -a "$LOG"
step long_run
timeout ${CAP_TIMEOUT:-240} python3 -m mustafar bench --capacity --prompts 32768 --modes generate \
    --settings dense,K0.5V0.5,K0.7V0.7 --budget-gib 80 --out "$OUT/capacity" 2>&1 | tail -12 | tee -a "$LOG"
cp "$OUT/capacity/capacity.json" "$OUT/capacity.json" 2>/dev/null
rm -rf "$OUT/capacity"
step capacity
