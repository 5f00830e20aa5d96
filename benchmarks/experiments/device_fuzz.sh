#!/usr/bin/env bash
# Issue 15 long runs on the lent GPU machine. Usage: bash benchmarks/experiments/device_fuzz.sh gpu|interp
#   gpu:    the fuzzer on Triton compiled for the GPU (--device cuda), one process
#   interp: Triton under the CPU interpreter (with tests' RTNE shim), NPROC processes of CASES/NPROC each
# Summaries (one JSON line per process) go to $OUT/fuzz_<mode>.jsonl; the last lines of each log to stdout.
set -u
export PYTHONPATH=src
OUT=${OUT:-/tmp}
mode=$1; seed=${SEED:-130101}; limit=${LIMIT:-480}
python3 -c "import numpy, torch, triton; print('numpy', numpy.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
if [ "$mode" = gpu ]; then
  python3 -m qwen3vl_flash.testing.fuzz --backend triton --device cuda --cases ${CASES:-10000} --seed "$seed" \
    --time-limit "$limit" --quiet --max-failures 20 --json "$OUT/fuzz_gpu.jsonl" 2>&1 | tail -40
else
  n=${NPROC:-16}; per=$(( ${CASES:-10000} / n ))
  for i in $(seq 0 $((n - 1))); do
    CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python3 -m qwen3vl_flash.testing.fuzz \
      --backend triton --cases "$per" --start $((i * per)) --seed "$seed" --time-limit "$limit" --quiet \
      --max-failures 5 --json "$OUT/fuzz_interp.jsonl" > "$OUT/fuzz_interp_$i.log" 2>&1 &
  done
  wait
  for i in $(seq 0 $((n - 1))); do tail -3 "$OUT/fuzz_interp_$i.log"; done
  grep -h "FAIL" "$OUT"/fuzz_interp_*.log | head -20
fi
