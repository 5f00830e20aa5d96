#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing
# (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# 1. A profile of the ring's fwd+bwd at 32k (cuDNN blocks, GQA 32/8, B=1) beside one GPU.
# 2. The longest sequence of a training-style fwd+bwd of the Qwen3-VL-8B text decoder (4 layers,
#    B=1): one GPU vs context-parallel on both, fitted at 32k/64k/128k, checked at 90%.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CP="timeout 240 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --pg-timeout 60"
$CP --seqlens "" --check-len 0 --no-mha --profile-len 32768 --csv "$OUT/cp_profile.csv" > "$OUT/cp_profile.log" 2>&1
grep -v -i "warn\|^W11" "$OUT/cp_profile.log" | cut -c1-75,100-200 | tail -40
$CP --seqlens "" --check-len 0 --no-mha --max-len-fit --fit-check 0.9 --model 8b --model-layers 4 --batch 1 \
    --len-step 16384 --csv "$OUT/cp_model_maxlen.csv" > "$OUT/cp_model_maxlen.log" 2>&1
grep -E "peak|predicted|fits|x the one" "$OUT/cp_model_maxlen.log" | tail -10
