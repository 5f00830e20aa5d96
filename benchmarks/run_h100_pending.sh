#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing after
# the 2026-11-25 sessions (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# GPU 1 runs the end-to-end decode cases while GPU 0 runs the decode checks; then the
# context-parallel longest-sequence search uses both. Each step has its own time limit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# GPU 1: StaticCache decode with generate's own compile (CUDA-graph trees), DynamicCache decode
(CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/bench_e2e.py --repeats 2 --decode-tokens 33 \
    --cases decode-static-4k,decode-dynamic-4k,decode-dynamic-32k --csv "$OUT/e2e.csv" > "$OUT/e2e.log" 2>&1) &
# GPU 0: the decode path's GPU checks, incl. the compiled step under CUDA-graph trees
(CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/check_decode_gpu.py > "$OUT/check.log" 2>&1) &
wait
tail -n 12 "$OUT/check.log"; grep -v -i "warn\|^\s" "$OUT/e2e.log" | grep -v "^$" | tail -12
# both GPUs: the longest sequence (B=128 keeps each trial short; the ratio is what counts)
timeout 250 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --seqlens "" --check-len 0 --no-mha --max-len \
    --batch 128 --len-step 512 --max-len-modes ring:triton,ring,ulysses:triton --len-limit 262144 \
    --csv "$OUT/cp_maxlen.csv" > "$OUT/cp.log" 2>&1
grep -v -i "warn\|^W1\|\*\*\*\*" "$OUT/cp.log" | tail -20
