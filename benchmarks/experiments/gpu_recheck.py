"""Re-run on a GPU the fuzz cases that failed elsewhere (issue 15): each case by its Case(...) from
the fuzzer's snippet, through Triton compiled for the GPU (no interpreter), printing OK / FAIL.
With head dims as arguments, also an fp32 forward+backward grid at those dims (FOUND_BUGS 16: the
interpreter sums its fp32 head-dimension dots in chains of 64, compiled kernels do not -- does the
GPU pass?).

    PYTHONPATH=src python3 benchmarks/experiments/gpu_recheck.py [D ...]
"""
import sys

import torch

from qwen3vl_flash.testing.fuzz import Case, CaseFailure, check_case

CASES = {
    # interpreter long run 2026-12-07, seed 120705 case 2183 (shrunk): fp32, D=203, 2 keys, out 1.23x the rule
    "interp 120705/2183 fp32 D=203": Case(kind='dense', dtype='float32', H=4, Hkv=4, D=203, Sk=2,
                                          softmax_scale=1.6024910117700588, q_mag=0.0819, k_mag=1.3812, v_mag=9.054,
                                          return_lse=False, seed=25081902745550),
}
for i, D in enumerate(int(a) for a in sys.argv[1:]):
    for kind, kw in (("dense causal Sq<Sk", dict(Sq=77, Sk=130, causal=True)),
                     ("dense Sq>Sk gqa", dict(Sq=150, Sk=33, H=4, Hkv=2))):
        args = dict(kind="dense", dtype="float32", H=2, Hkv=2, D=D, backward=True, return_lse=True, seed=7000 + 10 * i)
        CASES[f"fp32 D={D} {kind}"] = Case(**{**args, **kw})

print(torch.cuda.get_device_name(0), flush=True)
bad = 0
for name, case in CASES.items():
    try:
        check_case(case, backend="triton", device="cuda")
        torch.cuda.synchronize()
        print(f"{name}: OK", flush=True)
    except CaseFailure as e:
        bad += 1
        print(f"{name}: FAIL {str(e)[:300]}", flush=True)
print(f"{bad} of {len(CASES)} failed")
