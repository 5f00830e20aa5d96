"""Which Triton GPU calls fault (illegal memory access)? Each case in a fresh process (a fault
poisons the CUDA context). Found by the fuzzer on an H100, 2026-12-07 (seed 130102 case 0)."""
import os
import subprocess
import sys

BASE0 = dict(kind='dense', dtype='float16', H=1, Hkv=1, D=157, B=2, Sq=31, Sk=31, softmax_scale=0.8396109272003244,
             q_mag=0.1138, k_mag=0.9617, v_mag=7.731, backward=True, layout='padded', seed=152829848239179)
BASE1 = dict(kind='dense', dtype='bfloat16', H=8, Hkv=4, D=32, B=2, Sq=32, Sk=30, window=(0, 0), q_mag=0.5944,
             k_mag=0.8362, v_mag=0.2153, backward=True, layout='expanded', seed=2365527259264)
VAR = [("case0", BASE0, {}), ("case0 transposed", BASE0, dict(layout="transposed"))] + [
    (f"D={d} {dt} causal", BASE0, dict(D=d, dtype=dt, causal=True, layout="contiguous"))
    for d, dt in ((160, "float16"), (129, "bfloat16"), (192, "bfloat16"), (200, "float16"), (255, "bfloat16"),
                  (256, "bfloat16"), (72, "bfloat16"), (96, "float16"), (157, "float32"))
] + [("case1", BASE1, {})]
CODE = """
import torch, sys
from qwen3vl_flash.testing.fuzz import Case, check_case
try:
    check_case(Case(**{kw}), backend='triton', device='cuda')
    torch.cuda.synchronize()
    print('OK')
except Exception as e:
    print('FAIL', type(e).__name__, str(e).splitlines()[0][:160])
"""
ONLY = [x for x in os.environ.get("ONLY", "").split(",") if x]
for name, base, over in VAR:
    if ONLY and not any(name.startswith(o) for o in ONLY):
        continue
    kw = dict(base, **over)
    r = subprocess.run([sys.executable, "-c", CODE.format(kw=repr(kw))], capture_output=True, text=True, timeout=90,
                       env=dict(os.environ, PYTHONPATH="src"))
    last = (r.stdout.strip().splitlines() or ["(no output) " + r.stderr.strip().splitlines()[-1][:160]])[-1]
    print(f"{name:28s} {last}", flush=True)
