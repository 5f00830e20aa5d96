"""Reproducer for the online-softmax forward of ``tiled`` (issue 17 item 5): in a FRESH process,
run ``_forward_core_online`` once on seeded inputs and compare each batch element against a
float64 reference and against the shipped loop; then replay the same call.

One run prints one line of JSON. ``--loop N`` starts N fresh processes of itself and summarises
the failure rate. A run fails when some batch element's max error exceeds ``--ratio`` times the
shipped loop's max error on the same inputs (and an absolute floor).

    nice -n 19 python benchmarks/experiments/repro_online_softmax.py --loop 20 --shape text
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/repro_online_softmax.py --loop 20

Needs the online forward, which is not shipped: `git apply benchmarks/experiments/tiled_online_softmax.patch`
(made against 64fd264; it adds `_forward_core_online` and the QWEN3VL_FLASH_TILED_ONLINE flag to tiled.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

SHAPES = {
    # (B, Sq, Sk, H, Hkv, D, causal)
    "text": (2, 1024, 1024, 32, 8, 128, True),
    "text2k": (2, 2048, 2048, 32, 8, 128, True),
    "test": (2, 113, 203, 4, 2, 72, False),  # test_dense_vs_reference[113x203-gqa2-hd72-full-tiled-float32]
}


def _ref64(q, k, v, scale, causal):
    """float64 reference, per batch element and KV head (bounded memory)."""
    import torch

    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    out = torch.empty(B, Sq, H, D, dtype=torch.float64)
    lse = torch.empty(B, H, Sq, dtype=torch.float64)
    i = torch.arange(Sq).unsqueeze(1) + (Sk - Sq)
    j = torch.arange(Sk).unsqueeze(0)
    mask = (j <= i) if causal else None
    for b in range(B):
        for h in range(Hkv):
            qh = q[b, :, h * g:(h + 1) * g].double().permute(1, 0, 2)  # (g, Sq, D)
            kh = k[b, :, h].double()
            vh = v[b, :, h].double()
            s = (qh * scale) @ kh.T
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            l_ = torch.logsumexp(s, -1)
            p = torch.exp(s - l_.unsqueeze(-1))
            out[b, :, h * g:(h + 1) * g] = (p @ vh).permute(1, 0, 2)
            lse[b, h * g:(h + 1) * g] = l_
    return out, lse


def one_run(args) -> dict:
    import torch

    from qwen3vl_flash.backends import tiled

    B, Sq, Sk, H, Hkv, D, causal = SHAPES[args.shape]
    torch.manual_seed(args.seed)
    q = torch.randn(B, Sq, H, D)
    k = torch.randn(B, Sk, Hkv, D)
    v = torch.randn(B, Sk, Hkv, D)
    scale = 1.0 / math.sqrt(D)
    bm, bn = args.block_m, args.block_n
    online = getattr(tiled, args.fn)
    t0 = time.perf_counter()
    o1, l1 = online(q, k, v, scale, causal, (-1, -1), bm, bn)  # THE first call of the process
    t1 = time.perf_counter()
    o2, l2 = online(q, k, v, scale, causal, (-1, -1), bm, bn)  # replay
    os_, ls_ = tiled._forward_core(q, k, v, scale, causal, (-1, -1), bm, bn) if not tiled.ONLINE_SOFTMAX else (None, None)
    ro, rl = _ref64(q, k, v, scale, causal)
    res = {"shape": args.shape, "seed": args.seed, "threads": torch.get_num_threads(), "fn": args.fn,
           "first_ms": round((t1 - t0) * 1e3, 1)}
    err = [(o1[b].double() - ro[b]).abs().max().item() for b in range(B)]
    lerr = [(l1[b].double() - rl[b]).abs().max().item() for b in range(B)]
    rep = [(o2[b].double() - ro[b]).abs().max().item() for b in range(B)]
    res["err_first"] = [f"{e:.2e}" for e in err]
    res["lse_err_first"] = [f"{e:.2e}" for e in lerr]
    res["err_replay"] = [f"{e:.2e}" for e in rep]
    res["replay_bitwise_equal"] = bool(torch.equal(o1, o2) and torch.equal(l1, l2))
    base = None
    if os_ is not None:
        sh = [(os_[b].double() - ro[b]).abs().max().item() for b in range(B)]
        res["err_shipped"] = [f"{e:.2e}" for e in sh]
        base = max(sh)
    base = max(base or 0.0, min(rep), 1e-7)
    res["fail"] = any(e > args.ratio * base for e in err)
    if res["fail"] and args.save:
        torch.save({"q": q, "k": k, "v": v, "o1": o1, "l1": l1, "o2": o2, "l2": l2}, args.save)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="text", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-m", type=int, default=256)
    ap.add_argument("--block-n", type=int, default=512)
    ap.add_argument("--fn", default="_forward_core_online")
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--save", default="")
    ap.add_argument("--loop", type=int, default=0, help="run this many fresh processes and summarise")
    ap.add_argument("--vary-seed", action="store_true", help="seed = run index in --loop")
    args = ap.parse_args()
    if not args.loop:
        print(json.dumps(one_run(args)), flush=True)
        return
    fails = 0
    for i in range(args.loop):
        cmd = [sys.executable, __file__, "--shape", args.shape, "--seed", str(i if args.vary_seed else args.seed),
               "--block-m", str(args.block_m), "--block-n", str(args.block_n), "--fn", args.fn,
               "--ratio", str(args.ratio)]
        if args.save:
            cmd += ["--save", f"{args.save}.{i}.pt"]
        line = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        txt = line.stdout.strip().splitlines()[-1] if line.stdout.strip() else line.stderr[-500:]
        print(i, txt, flush=True)
        try:
            fails += bool(json.loads(txt)["fail"])
        except Exception:
            fails += 1
    print(json.dumps({"runs": args.loop, "fails": fails, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                      "shape": args.shape}), flush=True)


if __name__ == "__main__":
    main()
