#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing after
# the 2026-11-25 sessions (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# GPU 1: the end-to-end decode cases (StaticCache with generate's own compile, after the fixes of
# tests/FOUND_BUGS.md #5 and #6; DynamicCache). GPU 0: generate's compile on 8B dimensions with 4
# layers (one graph each, tokens). Then both GPUs: the longest sequence, predicted from peaks.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/bench_e2e.py --repeats 2 --decode-tokens 33 \
    --cases decode-static-4k,decode-dynamic-4k --csv "$OUT/e2e.csv" > "$OUT/e2e.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=0 TORCH_LOGS=recompiles timeout 200 python3 benchmarks/check_generate_compile.py \
    --config 8b --layers 4 --prompt 4096 > "$OUT/gen_8b4.log" 2>&1) &
wait
grep -v "^W11\|__recompiles\]     -  " "$OUT/gen_8b4.log" | grep -v -i warn | tail -8
grep -v -i "warn" "$OUT/e2e.log" | grep "tok/s\|\[ \|Error" | tail -10
timeout 230 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --seqlens "" --check-len 0 --no-mha --max-len-fit \
    --batch 64 --len-step 256 --max-len-modes 1gpu:triton,ring:triton,ulysses:triton,ring --pg-timeout 90 \
    --csv "$OUT/cp_maxlen.csv" > "$OUT/cp.log" 2>&1
grep -E "peak|predicted|fits|x the one" "$OUT/cp.log" | tail -24
