"""Re-run on a GPU the fuzz cases that failed elsewhere (issue 15): each case by its Case(...) from
the fuzzer's snippet, through Triton compiled for the GPU (no interpreter), printing OK / FAIL.

    PYTHONPATH=src python3 benchmarks/experiments/gpu_recheck.py
"""
import torch

from qwen3vl_flash.testing.fuzz import Case, CaseFailure, check_case

CASES = {
    # interpreter long run 2026-12-07, seed 120705 case 2183 (shrunk): fp32, D=203, 2 keys, out 1.23x the rule
    "interp 120705/2183 fp32 D=203": Case(kind='dense', dtype='float32', H=4, Hkv=4, D=203, Sk=2,
                                          softmax_scale=1.6024910117700588, q_mag=0.0819, k_mag=1.3812, v_mag=9.054,
                                          return_lse=False, seed=25081902745550),
}
print(torch.cuda.get_device_name(0), flush=True)
for name, case in CASES.items():
    try:
        check_case(case, backend="triton", device="cuda")
        torch.cuda.synchronize()
        print(f"{name}: OK", flush=True)
    except CaseFailure as e:
        print(f"{name}: FAIL {e}", flush=True)
