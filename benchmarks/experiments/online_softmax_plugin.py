"""pytest plugin for the online-softmax experiment (issue 17 item 5): turns the online forward on
and checks every call against the shipped loop on the same inputs, logging the MXCSR / x87 control
word of every OpenMP thread (via a tiny C helper linked against torch's libgomp, built on first
use into /tmp) when the two differ, and on the first call.

    PYTHONPATH=benchmarks/experiments QWEN3VL_FLASH_TILED_ONLINE=1 \
        python -m pytest -p online_softmax_plugin tests/test_backends.py -k tiled
Log: $ONLINE_LOG (default /tmp/online_softmax.log), one JSON line per event.

Needs the online forward, which is not shipped: `git apply benchmarks/experiments/tiled_online_softmax.patch`
(made against 64fd264; it adds `_forward_core_online` and the QWEN3VL_FLASH_TILED_ONLINE flag to tiled.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess

import torch

from qwen3vl_flash.backends import tiled

LOG = os.environ.get("ONLINE_LOG", "/tmp/online_softmax.log")
_C = r"""
#include <xmmintrin.h>
#include <omp.h>
int omp_mxcsr(unsigned *out, unsigned *out2, int n) {
  int nt = 0;
  #pragma omp parallel
  {
    int t = omp_get_thread_num();
    if (t == 0) nt = omp_get_num_threads();
    if (t < n) { out[t] = _mm_getcsr(); unsigned short cw; __asm__ volatile("fnstcw %0" : "=m"(cw)); out2[t] = cw; }
  }
  return nt;
}
"""


def _lib():
    so = "/tmp/online_softmax_mxcsr.so"
    if not os.path.exists(so):
        tl = os.path.join(os.path.dirname(torch.__file__), "lib")
        src = so[:-3] + ".c"
        open(src, "w").write(_C)
        subprocess.run(["gcc", "-O2", "-fopenmp", "-shared", "-fPIC", src, "-o", so, "-L" + tl,
                        "-l:libgomp.so.1", "-Wl,-rpath," + tl], check=True)
    return ctypes.CDLL(so)


_lib_h = None


def thread_fp_state():
    global _lib_h
    try:
        _lib_h = _lib_h or _lib()
        a, b = (ctypes.c_uint * 64)(), (ctypes.c_uint * 64)()
        n = _lib_h.omp_mxcsr(a, b, 64)
        return [(hex(a[i]), hex(b[i])) for i in range(n)]
    except Exception as e:  # the helper is optional
        return repr(e)


def _log(**kw):
    with open(LOG, "a") as f:
        f.write(json.dumps(kw) + "\n")


_orig = tiled._forward_core_online
_calls = [0]


def _checked(q, k, v, scale, causal, window, block_m, block_n, out=None, lse=None):
    _calls[0] += 1
    before = thread_fp_state() if _calls[0] == 1 else None
    o, l = _orig(q, k, v, scale, causal, window, block_m, block_n, out, lse)
    tiled.ONLINE_SOFTMAX = False
    try:
        so, sl = tiled._forward_core(q, k, v, scale, causal, window, block_m, block_n)
    finally:
        tiled.ONLINE_SOFTMAX = True
    d = (o.double() - so.double()).abs()
    fin = torch.isfinite(so)
    bad = d[fin].max().item() if fin.any() else 0.0
    tol = 1e-5 if q.dtype == torch.float32 else 1e-12
    if bad > tol * max(1.0, so[fin].abs().max().item() if fin.any() else 1.0) or _calls[0] == 1:
        per_b = [d[b][fin[b]].max().item() if fin[b].any() else 0.0 for b in range(q.shape[0])]
        _log(call=_calls[0], pid=os.getpid(), test=os.environ.get("PYTEST_CURRENT_TEST"), shape=list(q.shape),
             kshape=list(k.shape), dtype=str(q.dtype), causal=causal, window=list(window), bad=bad,
             per_batch=per_b, fp_state_before_first=before, fp_state_now=thread_fp_state(),
             threads=torch.get_num_threads())
        if bad > tol and os.environ.get("ONLINE_SAVE"):
            torch.save({"q": q, "k": k, "v": v, "o": o, "l": l, "so": so, "sl": sl, "scale": scale,
                        "causal": causal, "window": window, "bm": block_m, "bn": block_n},
                       f"{os.environ['ONLINE_SAVE']}.{os.getpid()}.{_calls[0]}.pt")
    return o, l


tiled._forward_core_online = _checked
tiled.ONLINE_SOFTMAX = True
