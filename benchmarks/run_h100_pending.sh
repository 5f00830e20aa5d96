#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing
# (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# The cuDNN backend with GQA K/V as they are (no repeat): correctness against fp32, fwd+bwd at
# 32k / 64k (GQA 32/8: one GPU, ring, Ulysses; a profile at 32k) and the attention-only longest
# sequence (B=64) of one GPU and the ring, predicted from peaks and checked at 90%.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CP="timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --pg-timeout 60"
$CP --seqlens 32768,65536 --modes ring,ulysses --kernels auto --no-mha --check-len 8192 --profile-len 32768 \
    --csv "$OUT/cp.csv" > "$OUT/cp.log" 2>&1
grep -v -i "warn\|^W11" "$OUT/cp.log" | cut -c1-75,100-200 | grep -v "^ *$\|---" | tail -34
$CP --seqlens "" --check-len 0 --no-mha --max-len-fit --fit-check 0.9 --batch 64 --len-step 256 \
    --max-len-modes 1gpu:triton,ring,ulysses --csv "$OUT/cp_maxlen.csv" > "$OUT/cp_maxlen.log" 2>&1
grep -E "predicted|fits|x the one" "$OUT/cp_maxlen.log" | tail -12
