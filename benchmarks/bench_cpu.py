"""CPU benchmark for the foundation issue: text-8B attention (32 query / 8 kv heads, hd128, causal,
B=1) at S = 1k..4k, float32 and bfloat16: PyTorch SDPA (called directly), our ``auto``, ``tiled``,
``sdpa`` backends and ``eager``; median wall time and peak extra memory. Writes a CSV and prints a
table last.

    python benchmarks/bench_cpu.py --out benchmarks/results/cpu_<date>.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform

import torch
import torch.nn.functional as F

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import attention_flops, peak_extra_bytes, time_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="1024,2048,4096")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--eager-max", type=int, default=2048, help="skip eager above this length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="cpu_bench.csv")
    args = ap.parse_args()
    hw = qf.detect_hardware("cpu")
    stamp = datetime.date.today().isoformat()
    H, Hkv, D = 32, 8, 128
    rows = []
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        for S in map(int, args.seqlens.split(",")):
            g = torch.Generator().manual_seed(S)
            q = torch.randn(1, S, H, D, generator=g).to(dtype)
            k = torch.randn(1, S, Hkv, D, generator=g).to(dtype)
            v = torch.randn(1, S, Hkv, D, generator=g).to(dtype)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            impls = {
                "torch_sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                "auto": lambda: qf.flash_attn_func(q, k, v, causal=True),
                "sdpa": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="sdpa"),
                "tiled": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="tiled"),
                "eager": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="eager"),
            }
            for name, fn in impls.items():
                if name == "eager" and S > args.eager_max:
                    continue
                with torch.no_grad():
                    secs = time_fn(fn, "cpu", warmup=1, repeats=args.repeats)
                    peak = peak_extra_bytes(fn, "cpu")
                rows.append(dict(
                    impl=name, dtype=dt_name, S=S, H=H, Hkv=Hkv, D=D, causal=True, ms=round(secs * 1e3, 2),
                    gflops=round(attention_flops(1, H, S, S, D, True) / secs / 1e9, 1),
                    peak_extra_mb=round(peak / 2**20, 1), cpu=hw.cpu_model, cores=hw.cpu_cores,
                    torch=torch.__version__, date=stamp,
                ))
                print(f"{dt_name:9s} S={S:5d} {name:10s} {secs * 1e3:9.1f} ms  {rows[-1]['peak_extra_mb']:8.1f} MB", flush=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{hw.summary()}, torch {torch.__version__}, {platform.python_version()}, {stamp}")
    print(f"{'dtype':9s} {'S':>5s} " + " ".join(f"{n:>11s}" for n in ("auto/sdpa", "tiled/sdpa", "eager/sdpa")))
    for dt_name in args.dtypes.split(","):
        for S in map(int, args.seqlens.split(",")):
            t = {r["impl"]: r["ms"] for r in rows if r["dtype"] == dt_name and r["S"] == S}
            ratio = lambda n: f"{t[n] / t['torch_sdpa']:11.2f}" if n in t else f"{'-':>11s}"  # noqa: E731
            print(f"{dt_name:9s} {S:5d} {ratio('auto')} {ratio('tiled')} {ratio('eager')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
