"""Speed of the online-softmax forward of ``tiled`` (issue 17 item 5) against the shipped tiled fp32
forward and PyTorch SDPA: interleaved runs in one process, medians. B=1..2, S=2048, 32/8 heads,
hd128, causal, fp32.   nice -n 19 python benchmarks/experiments/bench_online_softmax.py [reps]

Needs the online forward, which is not shipped: `git apply benchmarks/experiments/tiled_online_softmax.patch`
(made against 64fd264; it adds `_forward_core_online` and the QWEN3VL_FLASH_TILED_ONLINE flag to tiled.py).
"""

import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qwen3vl_flash.backends import tiled

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
S, H, Hkv, D = 2048, 32, 8, 128
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, S={S} {H}/{Hkv} hd{D} causal fp32, {reps} reps")
for B in (1, 2):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    sc = 1 / math.sqrt(D)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    fns = {
        "tiled_shipped": lambda: tiled._forward_core(q, k, v, sc, True, (-1, -1), 256, 256),
        "tiled_online": lambda: tiled._forward_core_online(q, k, v, sc, True, (-1, -1), 256, 256),
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
    }
    for f in fns.values():
        f()  # warm-up
    t = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            t[n].append((time.perf_counter() - t0) * 1e3)
    med = {n: statistics.median(x) for n, x in t.items()}
    o1, _ = fns["tiled_shipped"]()
    o2, _ = fns["tiled_online"]()
    print(f"B={B}: " + ", ".join(f"{n} {m:.1f} ms" for n, m in med.items())
          + f" | online/shipped {med['tiled_online'] / med['tiled_shipped']:.3f}, online/sdpa {med['tiled_online'] / med['sdpa']:.3f},"
          f" shipped/sdpa {med['tiled_shipped'] / med['sdpa']:.3f} | max|online-shipped| {(o1 - o2).abs().max().item():.1e}")
