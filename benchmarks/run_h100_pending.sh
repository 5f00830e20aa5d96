#!/usr/bin/env bash
# One device call (<= 10 min, a 2-GPU machine: nvidia-h100-x2) for the figures still missing after
# the 2026-11-25 sessions (docs/performance.md says which). From the repository root:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# Single-GPU work runs on GPU 0 and GPU 1 side by side; the context-parallel search uses both.
# Each step has its own time limit, so a slow step cannot starve the rest.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# first: the decode changes made without a GPU (cache_leftpad, the decode op in a CUDA graph, the
# compiled StaticCache step with a padded batch) must pass before anything is timed
timeout 150 python3 benchmarks/check_decode_gpu.py 2>&1 | tail -12
# GPU 1: StaticCache decode with generate's own compile (the attention timer is paused there),
# DynamicCache decode after the dispatch cache
(CUDA_VISIBLE_DEVICES=1 timeout 300 python3 benchmarks/bench_e2e.py --repeats 2 --decode-tokens 33 \
    --cases decode-static-4k,decode-dynamic-4k --csv "$OUT/e2e.csv" > "$OUT/e2e.log" 2>&1) &
# GPU 0: the backward tiles on H100 (the sweep so far ran on an H200), then decode host timing
(CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/exp_bwd_tiles.py --out "$OUT" > "$OUT/tiles.log" 2>&1;
 CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/bench_decode.py --csv "$OUT/decode.csv" > "$OUT/decode.log" 2>&1) &
wait
grep "BEST" "$OUT/tiles.log"; tail -n 15 "$OUT/decode.log"; grep -v -i warn "$OUT/e2e.log" | tail -6
# both GPUs: the longest sequence with Triton blocks (the last search stopped before its end)
timeout 240 torchrun --nproc_per_node=2 benchmarks/bench_cp.py --seqlens "" --check-len 0 --no-mha --max-len \
    --batch 8 --len-step 8192 --max-len-modes ring:triton --len-limit 1048576 --csv "$OUT/cp_maxlen.csv" 2>&1 \
    | grep -v -i "warn\|^W1\|\*\*\*\*" | tail -20
