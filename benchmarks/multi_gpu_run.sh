#!/usr/bin/env bash
# Device calls on a 2-GPU machine (issue 6). JSON summaries and logs go to $OUT.
# Usage (repository root): bash benchmarks/multi_gpu_run.sh MODE [extra multi_gpu.py args, e.g. --batch 8]
#   MODE tp:         build the CUDA extension, the static-cache GPU tests (not with SKIP_TESTS=1), then the
#                    tensor-parallel run (torchrun)
#   MODE device-map: the device_map="auto" run (layers split over the 2 GPUs)
# Each mode fits one 10-minute call; the extension build is cached in $TORCH_EXTENSIONS_DIR while the machine is warm.
set -u
MODE=${1:?usage: multi_gpu_run.sh tp|device-map [args]}; shift
case "$MODE" in tp|device-map) ;; *) echo "MODE must be tp or device-map, got $MODE" >&2; exit 2;; esac
export PYTHONPATH=src TORCH_EXTENSIONS_DIR=/tmp/mustafar-ext PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv
s=$(date +%s)
timeout 150 python3 -c "from mustafar.launch.cuda import load_extension; load_extension(); print('built')" 2>&1 \
    | tail -3
echo "build $(( $(date +%s) - s )) s"; s=$(date +%s)
if [ "$MODE" = tp ] && [ -z "${SKIP_TESTS:-}" ]; then
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py -k static 2>&1 \
        | tee "$OUT/gpu_static_tests.log" | tail -4
    echo "tests $(( $(date +%s) - s )) s"; s=$(date +%s)
fi
if [ "$MODE" = tp ]; then
    timeout ${TP_TIMEOUT:-360} python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/multi_gpu.py tp --out "$OUT/tp.json" "$@" > "$OUT/tp.log" 2>&1
else
    timeout ${DM_TIMEOUT:-420} python3 benchmarks/multi_gpu.py device-map --out "$OUT/device_map.json" "$@" \
        > "$OUT/device_map.log" 2>&1
fi
echo "$MODE exit $? after $(( $(date +%s) - s )) s"; tail -c 2000 "$OUT/${MODE/-/_}.log"
