#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing
# (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# fwd+bwd at 32k / 64k after the ring's merge became one lerp pass and its backward accumulators
# start from the first block: GQA 32/8 (ring, Ulysses, all-gather; cuDNN blocks), then MHA 32/32
# beside PyTorch's context_parallel (cuDNN and flash), all on the same two cards.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 420 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --pg-timeout 60 --seqlens 32768,65536 \
    --modes ring,ulysses,allgather --kernels auto --check-len 8192 --csv "$OUT/cp.csv" > "$OUT/cp.log" 2>&1
grep -v -i "warn\|^W11" "$OUT/cp.log" | tail -34
