#!/usr/bin/env bash
# The next device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2), for what the 2026-11-26
# session left unmeasured (docs/performance.md). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# 1. GPU 0: what is alive at the peak of a StaticCache decode (ours' +16 MB over sdpa).
# 2. Both GPUs: the ring with cuDNN blocks taking GQA K/V as they are, on whatever card comes
#    (the 32k efficiency was measured on H200 only), and the text decoder's longest sequence with
#    auto = ring on 2 GPUs (the 1.93x was measured with auto = Ulysses).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/experiments/exp_static_peak.py --layers 2 --tokens 8 \
    --no-compile --snapshot > "$OUT/static_peak.log" 2>&1
grep -v -i warn "$OUT/static_peak.log" | tail -40
CP="timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --pg-timeout 60"
$CP --seqlens 32768,65536,131072 --modes ring,ulysses --kernels auto --no-mha --check-len 8192 --iters 5 \
    --csv "$OUT/cp.csv" > "$OUT/cp.log" 2>&1
grep -v -i "warn\|^W11" "$OUT/cp.log" | tail -14
$CP --seqlens "" --check-len 0 --no-mha --max-len-fit --fit-check 0.9 --model 8b --model-layers 4 --batch 1 \
    --len-step 16384 --csv "$OUT/cp_model_maxlen.csv" > "$OUT/cp_model_maxlen.log" 2>&1
grep -E "peak|predicted|fits|x the one" "$OUT/cp_model_maxlen.log" | tail -10
