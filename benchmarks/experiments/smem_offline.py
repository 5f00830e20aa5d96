"""Offline sm90 compile of the dK/dV kernel on a machine without a GPU: shared memory per config.
NOT YET A STAND-IN FOR THE GPU: 2026-12-07, triton 3.6 and 3.9 both report 132,096 B for the
one-pass 128x128 tile, where triton 3.6 on an H100 asked for 263,168 B for it. Something in the
device launch's specialisation is missing here (not found).

    PYTHONPATH=src python3 benchmarks/experiments/smem_offline.py
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qwen3vl_flash.backends.triton_bwd import _bwd_dkdv

_INTS = ("seqlen_q", "seqlen_k", "num_kv_heads", "group", "window_left", "window_right")


def _arg_type(name: str, dt: str) -> str:
    if name in ("Q", "K", "V", "DO", "DK", "DV"):
        return dt
    if name in ("Lse", "Delta", "DQA"):
        return "*fp32"
    if name in ("CuSeqQ", "CuSeqK"):
        return "*i32"
    if name in ("qk_scale", "softmax_scale"):
        return "fp32"
    if name.startswith("stride") or name in _INTS:
        return "i32"
    return "constexpr"  # dq_desc (None here) and the kernel's constexprs


def smem(block_m, block_n, fuse, warps, stages, D=128, dt="*bf16", causal=True) -> int:
    sig = {n: _arg_type(n, dt) for n in _bwd_dkdv.arg_names}
    cx = dict(dq_desc=None, HEAD_DIM=D, BLOCK_D0=D, BLOCK_D1=0, BLOCK_M=block_m, BLOCK_N=block_n, VARLEN=False,
              HAS_LEFT=False, HAS_RIGHT=causal, DOT_PREC="tf32", FUSE_DQ=fuse)
    c = triton.compile(ASTSource(_bwd_dkdv, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    return c.metadata.shared


for bm, bn, fuse, w, s in [(128, 128, 1, 8, 2), (64, 128, 1, 8, 3), (64, 64, 0, 4, 2), (128, 128, 0, 8, 2)]:
    try:
        print(f"{bm}x{bn} fuse={fuse} w{w}s{s}: smem {smem(bm, bn, fuse, w, s)} B", flush=True)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, the others still run
        print(f"{bm}x{bn} fuse={fuse} w{w}s{s}: {type(e).__name__} {str(e)[:200]}", flush=True)
