"""Experiment: the best tile for each backward kernel separately (issue 3).

The dK/dV kernel (one program per key block, looping over query blocks) and the dQ kernel (one
program per query block, looping over key blocks) have different best tiles; the profile gave
both the same. For each candidate this runs ``attention_backward`` under the profiler and
records each kernel's device time, then prints the best per kernel and the combined backward.

    PYTHONPATH=src python3 benchmarks/exp_bwd_tiles.py --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

CASES = [  # name, B, S, H, Hkv, D, causal
    ("text hd128 causal 32/8 S=4k", 1, 4096, 32, 8, 128, True),
    ("text hd128 causal 32/8 S=16k", 1, 16384, 32, 8, 128, True),
    ("vision hd72 full 16/16 S=16k", 1, 16384, 16, 16, 72, False),
]
TILES = [  # BLOCK_M, BLOCK_N, warps, stages
    (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 2), (64, 128, 8, 2),
    (64, 128, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (128, 32, 8, 2),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    from qwen3vl_flash.backends.triton_bwd import attention_backward
    from qwen3vl_flash.backends.triton_fwd import attention_forward

    rows = []
    for name, B, S, H, Hkv, D, causal in CASES:
        torch.manual_seed(0)
        mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(H), mk(Hkv), mk(Hkv), mk(H)
        sc = D ** -0.5
        out, lse = attention_forward(q, k, v, sc, causal=causal)
        ref = attention_backward(do, q, k, v, out, lse, sc, causal=causal,
                                 config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))
        bwd_flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0) * 1.5
        best = {}
        for bm, bn, w, st in TILES:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            tag = f"{bm}x{bn}w{w}s{st}"
            try:
                got = attention_backward(do, q, k, v, out, lse, sc, causal=causal, config=cfg, config_dq=cfg)
                err = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
                for _ in range(2):
                    attention_backward(do, q, k, v, out, lse, sc, causal=causal, config=cfg, config_dq=cfg)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        attention_backward(do, q, k, v, out, lse, sc, causal=causal, config=cfg, config_dq=cfg)
                    torch.cuda.synchronize()
            except Exception as e:
                print(f"{name} {tag}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            times = {}
            for ev in prof.key_averages():
                if ev.count and ev.device_type == torch.autograd.DeviceType.CUDA:
                    for kern in ("_bwd_dkdv", "_bwd_dq", "_bwd_preprocess"):
                        if ev.key.startswith(kern) and not (kern == "_bwd_dq" and ev.key.startswith("_bwd_dkdv")):
                            times[kern] = ev.device_time_total / ev.count / 1e3
            print(f"{name} {tag:<12} dkdv {times.get('_bwd_dkdv', float('nan')):7.3f} ms  "
                  f"dq {times.get('_bwd_dq', float('nan')):7.3f} ms  max|diff| vs 64x64 {err:.1e}", flush=True)
            for kern, t in times.items():
                rows.append(dict(case=name, tile=tag, kernel=kern, ms=t, err=err))
                if err < 0.1 and (kern not in best or t < best[kern][1]):
                    best[kern] = (tag, t)
        total = sum(t for _, t in best.values())
        print(f"BEST {name}: " + ", ".join(f"{k} {v[0]} {v[1]:.3f} ms" for k, v in best.items()) +
              f"; backward {total:.3f} ms = {bwd_flops / total / 1e9:.0f} TFLOP/s", flush=True)
        del q, k, v, do, out, lse, ref
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "exp_bwd_tiles.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "tile", "kernel", "ms", "err"])
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
