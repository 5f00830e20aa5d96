#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing
# (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# 1. The longest sequence of a training-style fwd+bwd of the Qwen3-VL-8B text decoder (4 layers,
#    B=1): one GPU vs context-parallel on both (predicted from peaks, checked at 90%).
# 2. The same for attention alone (B=64, GQA 32/8): one GPU (Triton) vs ring / Ulysses (Triton).
# 3. fwd+bwd time at 32k / 64k: ring and Ulysses with cuDNN (auto) and Triton blocks, one GPU.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CP="timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --pg-timeout 60"
$CP --seqlens "" --check-len 0 --no-mha --max-len-fit --fit-check 0.9 --model 8b --model-layers 4 --batch 1 \
    --len-step 4096 --csv "$OUT/cp_model_maxlen.csv" > "$OUT/cp_model_maxlen.log" 2>&1
grep -E "peak|predicted|fits|x the one" "$OUT/cp_model_maxlen.log" | tail -10
$CP --seqlens "" --check-len 0 --no-mha --max-len-fit --fit-check 0.9 --batch 64 --len-step 256 \
    --max-len-modes 1gpu:triton,ring:triton,ulysses:triton --csv "$OUT/cp_maxlen.csv" > "$OUT/cp_maxlen.log" 2>&1
grep -E "predicted|fits|x the one" "$OUT/cp_maxlen.log" | tail -10
$CP --seqlens 32768,65536 --modes ring,ulysses --kernels auto,triton --no-mha --check-len 8192 \
    --csv "$OUT/cp.csv" > "$OUT/cp.log" 2>&1
grep -v -i warn "$OUT/cp.log" | tail -18
