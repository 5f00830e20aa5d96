"""fp32 Triton forward+backward on a GPU by the comparison rule, head dims up to 256 (FOUND_BUGS 16:
the interpreter now sums its fp32 head-dimension dots in chains of 64; compiled kernels keep
Triton's own fp32 dot -- does the GPU pass?).

    PYTHONPATH=src python3 benchmarks/experiments/gpu_fp32_check.py [D ...]
"""
import sys

import torch

from qwen3vl_flash.testing.fuzz import Case, CaseFailure, check_case

print(torch.cuda.get_device_name(0), flush=True)
bad = 0
dims = [int(a) for a in sys.argv[1:]] or [128, 203, 256]
for i, D in enumerate(dims):
    for kind, kw in (("dense causal Sq<Sk", dict(Sq=77, Sk=130, causal=True)),
                     ("dense Sq>Sk gqa", dict(Sq=150, Sk=33, H=4, Hkv=2))):
        args = dict(kind="dense", dtype="float32", H=2, Hkv=2, D=D, backward=True, return_lse=True, seed=7000 + 10 * i)
        args.update(kw)
        try:
            check_case(Case(**args), backend="triton", device="cuda")
            print(f"D={D:3d} {kind:20s} OK", flush=True)
        except CaseFailure as e:
            bad += 1
            print(f"D={D:3d} {kind:20s} FAIL {str(e)[:300]}", flush=True)
print(f"fp32 check: {bad} failures")
