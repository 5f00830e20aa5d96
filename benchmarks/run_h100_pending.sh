#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing
# (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# 1. GPU 1: generate with a StaticCache and transformers' compile on Qwen3-VL-8B dimensions
#    (36 layers, 4k prompt): decode rate without the prefill, CUDA-graph / host-launch counts per
#    decode step from a profile, inductor's perf hints (graph partitions, skipped graphs), and
#    where the tokens part from sdpa's.
# 2. Both GPUs: the ring with views and in-place merges: correctness, fwd+bwd time at 32k/64k
#    (efficiency), and the longest sequence predicted from peaks.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
CUDA_VISIBLE_DEVICES=1 TORCH_LOGS=perf_hints,recompiles timeout 280 python3 benchmarks/check_generate_compile.py \
    --config 8b --layers 36 --prompt 4096 --tokens 33 --profile > "$OUT/gen_8b36.log" 2>&1
grep -E "generate s:|per decode step|tokens equal|differing|partition|skipping|Name|LaunchKernel|GraphLaunch|Triton|triton" \
    "$OUT/gen_8b36.log" | cut -c1-200 | head -40
timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --seqlens 32768,65536 --modes ring,ulysses \
    --kernels triton --no-mha --check-len 8192 --pg-timeout 90 --csv "$OUT/cp.csv" > "$OUT/cp.log" 2>&1
grep -v -i warn "$OUT/cp.log" | tail -16
timeout 150 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --seqlens "" --check-len 0 --no-mha --max-len-fit \
    --batch 64 --len-step 256 --max-len-modes 1gpu:triton,ring:triton,ulysses:triton --pg-timeout 90 \
    --csv "$OUT/cp_maxlen.csv" > "$OUT/cp_maxlen.log" 2>&1
grep -E "peak|predicted|fits|x the one" "$OUT/cp_maxlen.log" | tail -16
