#!/usr/bin/env bash
# One device call (<= 10 min on a lent H100) for the figures the 2026-11-25 session could not
# measure (docs/performance.md lists them). Run from the repository root on the GPU machine:
#     bash benchmarks/run_h100_pending.sh            # writes CSVs and logs under $OUT (or ./out)
# Each step has its own time limit, so a slow step cannot starve the rest.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# 1. e2e with the post-run-1 changes: image tower via cuDNN, decode through the split-KV path
timeout 330 python3 benchmarks/bench_e2e.py --repeats 2 --decode-tokens 17 \
    --cases vision-image,vision-video,decode-dynamic-4k,decode-static-4k,decode-dynamic-32k,prefill \
    --csv "$OUT/e2e.csv" 2>&1 | tee "$OUT/e2e.log" | grep -v -i warn
# 2. Triton vision kernels (varlen 8 frames, fwd+bwd hd72) and the hd72 tail fix, no full check
timeout 200 python3 benchmarks/bench_gpu.py --skip check,sweep,text,mem --out "$OUT" 2>&1 | tee "$OUT/vision.log" | tail -20
