"""Offline sm90 compile of the dK/dV kernel on a machine without a GPU: shared memory per config.
NOT YET A STAND-IN FOR THE GPU: 2026-12-07, triton 3.6 and 3.9 both report 132,096 B for the
one-pass 128x128 tile, where triton 3.6 on an H100 asked for 263,168 B for it. Something in the
device launch's specialisation is missing here (not found).

    PYTHONPATH=src python3 benchmarks/experiments/smem_offline.py
"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwen3vl_flash.backends.triton_bwd import _bwd_dkdv
names = _bwd_dkdv.arg_names
def smem(BM, BN, fuse, warps, stages, D=128, dt="*bf16", causal=True):
    sig, cx = {}, {}
    for n in names:
        if n in ("Q", "K", "V", "DO", "DK", "DV"): sig[n] = dt
        elif n in ("Lse", "Delta", "DQA"): sig[n] = "*fp32"
        elif n in ("CuSeqQ", "CuSeqK"): sig[n] = "*i32"
        elif n == "dq_desc": sig[n] = "constexpr"; cx[n] = None
        elif n in ("qk_scale", "softmax_scale"): sig[n] = "fp32"
        elif n.startswith("stride") or n in ("seqlen_q", "seqlen_k", "num_kv_heads", "group", "window_left", "window_right"): sig[n] = "i32"
        else: sig[n] = "constexpr"
    cx.update(HEAD_DIM=D, BLOCK_D0=D, BLOCK_D1=0, BLOCK_M=BM, BLOCK_N=BN, VARLEN=False, HAS_LEFT=False,
              HAS_RIGHT=causal, DOT_PREC="tf32", FUSE_DQ=fuse)
    # the launcher's specialisation: 16-byte aligned pointers and strides divisible by 16 (what makes
    # Triton pipeline the loads through shared memory with cp.async)
    div = [(i,) for i, n in enumerate(names) if sig[n].startswith("*") or (n.startswith("stride") and not n.endswith(("s", "l", "lh")))]
    attrs = {a: [["tt.divisibility", 16]] for a in div}
    c = triton.compile(ASTSource(_bwd_dkdv, sig, constexprs=cx, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    return c.metadata.shared
for BM, BN, fuse, w, s in [(128, 128, 1, 8, 2), (64, 128, 1, 8, 3), (64, 64, 0, 4, 2), (128, 128, 0, 8, 2)]:
    try:
        print(BM, BN, "fuse", fuse, f"w{w}s{s}", "smem", smem(BM, BN, fuse, w, s), flush=True)
    except Exception as e:
        print(BM, BN, fuse, "ERROR", type(e).__name__, str(e)[:200], flush=True)
