"""CPU benchmark for the foundation issue: text-8B attention (32 query / 8 kv heads, hd128, causal,
B=1) at S = 1k..4k, float32 and bfloat16: PyTorch SDPA (called directly), our ``auto``, ``tiled``,
``sdpa`` backends and ``eager``; wall time (p20/p50/p80 of ``--repeats``) and peak extra memory.
Rows (``qwen3vl_flash.benchmarking`` schema) are appended to ``benchmarks/results/cpu_<n>core.csv``
(or ``--csv``); a table of ratios to SDPA is printed last.

    python benchmarks/bench_cpu.py                       # ~5 min on 2 cores
    python benchmarks/bench_cpu.py --smoke --csv /tmp/cpu.csv   # tiny lengths: the code path
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import Recorder, attention_flops, peak_extra_bytes, results_csv, tflops, time_quantiles

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
H, HKV, D = 32, 8, 128
CASE = f"text causal {H}/{HKV} hd{D} B=1"


def providers(q, k, v):
    """name -> call, for one (dtype, S) case."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return {
        "torch_sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
        "auto": lambda: qf.flash_attn_func(q, k, v, causal=True),
        "sdpa": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="sdpa"),
        "tiled": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="tiled"),
        "eager": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="eager"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="1024,2048,4096")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--eager-max", type=int, default=2048, help="skip eager above this length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="S = 64, 128 and one repeat: checks the code path")
    ap.add_argument("--csv", default=None, help="default: benchmarks/results/cpu_<cores>core.csv")
    args = ap.parse_args()
    if args.smoke:
        args.seqlens, args.repeats = "64,128", 1
    rec = Recorder("bench_cpu", args.csv or results_csv(RESULTS, "cpu", args.smoke, "bench_cpu"), device="cpu")
    seqlens = [int(s) for s in args.seqlens.split(",")]
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        for S in seqlens:
            g = torch.Generator().manual_seed(S)
            q = torch.randn(1, S, H, D, generator=g).to(dtype)
            k = torch.randn(1, S, HKV, D, generator=g).to(dtype)
            v = torch.randn(1, S, HKV, D, generator=g).to(dtype)
            for name, fn in providers(q, k, v).items():
                if name == "eager" and S > args.eager_max:
                    continue
                with torch.no_grad():
                    ts = time_quantiles(fn, "cpu", warmup=1, repeats=args.repeats)
                    peak = peak_extra_bytes(fn, "cpu")
                ms = [t * 1e3 for t in ts]
                rec.add(case=CASE, provider=name, mode="fwd", dtype=dt_name, x_name="S", x=S, p20=ms[0], p50=ms[1],
                        p80=ms[2], rate=tflops(attention_flops(1, H, S, S, D, True), ms[1]), rate_unit="TFLOP/s",
                        memory_mb=peak / 2**20)
    env = rec.env
    print(f"\n{env['device']}, torch {env['torch']}, {platform.python_version()}, {env['date']}")
    print(f"{'dtype':9s} {'S':>5s} " + " ".join(f"{n:>11s}" for n in ("auto/sdpa", "tiled/sdpa", "eager/sdpa")))
    for dt_name in args.dtypes.split(","):
        for S in seqlens:
            t = {r["provider"]: r["p50"] for r in rec.rows if r["dtype"] == dt_name and r["x"] == S}
            ratio = lambda n: f"{t[n] / t['torch_sdpa']:11.2f}" if n in t else f"{'-':>11s}"  # noqa: E731
            print(f"{dt_name:9s} {S:5d} {ratio('auto')} {ratio('tiled')} {ratio('eager')}")
    print(f"rows appended to {rec.path}")


if __name__ == "__main__":
    main()
