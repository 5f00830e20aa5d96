"""Experiment: which changes make the Triton forward faster on Hopper (issue 3)?

A compact copy of the package's dense forward (causal, hd128, GQA by index) with three switches,
timed against the package's own kernel and SDPA cuDNN / flash in one run:

* ``FUSE``: take the row max on raw scores and compute ``exp2(s * scale - m)`` as one FMA, instead
  of scaling the whole tile first and subtracting after (one fewer pass over the tile).
* ``TMA``: load Q/K/V through host tensor descriptors (``TensorDescriptor``: the Hopper TMA unit
  copies whole tiles, zero-filling past each batch's end) instead of pointer arithmetic.
* ``WS``: ``tl.range(..., warp_specialize=True)`` on the unmasked loop (producer/consumer warps).

    PYTHONPATH=src python3 benchmarks/experiments/exp_fwd_variants.py --out $OUT     # on the GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/experiments/exp_fwd_variants.py --smoke   # CPU logic

Prints a table (TFLOP/s, causal FLOPs = 2·B·H·S²·D); rows (``qwen3vl_flash.benchmarking`` schema,
bench ``experiments/exp_fwd_variants``, one per variant x tile x S; do_bench means) are appended to
``benchmarks/results/<gpu kind>.csv`` (``--out DIR``: ``DIR/<gpu kind>.csv``; ``--csv PATH``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from qwen3vl_flash.benchmarking import Recorder, attention_flops, extra, results_csv, tiles
from qwen3vl_flash.benchmarking import tile_str as _c

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
TEXT = "text causal 32/8 hd128 B=1"


def schema_row(r):
    """One row of this script (or of exp_tma_configs.py, whose ``status`` replaces ``ok``) as a
    row of the benchmark schema; also used on the archived CSVs of both."""
    variant, metric = r["variant"], "time"
    for suffix, m in ((" graph", "graph time"), (" host-us", "host time")):
        if variant.endswith(suffix):
            variant, metric = variant[: -len(suffix)], m
    ok, err = str(r.get("ok", r.get("status", ""))), str(r["err"])
    if ok in ("True", "-", "ok") or ok.startswith("tma build failed"):
        status = "ok" if ok in ("True", "-", "ok") else ok
    elif ok == "False":
        status = err if err.split(":")[0].endswith(("Error", "Exception")) else "FAILED"
    else:
        status = ok
    timed = metric != "host time"
    return dict(case=TEXT, provider=variant, mode="fwd", dtype="bfloat16", x_name="S", x=int(r["S"]), metric=metric,
                p50=r["ms"], rate=r["tflops"] if timed else "", rate_unit="TFLOP/s" if timed else "", status=status,
                extra=extra(tile="" if r["cfg"] == "-" else r["cfg"], err="" if err == "-" else err,
                            statistic="do_bench mean" if metric == "time" else ""))

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _inner(acc, l_i, m_i, q, K, V, kd, vd, b, h_kv, k_row0, stride_ks, lo, hi, offs_m, seqlen_k, off, qk_scale,
           D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, FUSE: tl.constexpr, TMA: tl.constexpr,
           WS: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS and not MASK):
        cols = start_n + offs_n
        if TMA:
            k = kd.load([b, start_n, h_kv * D]).reshape(BLOCK_N, D)
        else:
            if MASK:
                k = tl.load(K + k_row0 + cols[:, None] * stride_ks + offs_d[None, :], mask=(cols < seqlen_k)[:, None],
                            other=0.0)
            else:
                k = tl.load(K + k_row0 + cols[:, None] * stride_ks + offs_d[None, :])
        if UPCAST:
            s = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if MASK:
            vis = (cols[None, :] < seqlen_k) & (cols[None, :] <= offs_m[:, None] + off)
            s = tl.where(vis, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_piv = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_piv[:, None])
        elif FUSE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_piv = m_new
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        else:
            s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_piv = m_new
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_piv)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = vd.load([b, start_n, h_kv * D]).reshape(BLOCK_N, D)
        else:
            if MASK:
                v = tl.load(V + k_row0 + cols[:, None] * stride_ks + offs_d[None, :], mask=(cols < seqlen_k)[:, None],
                            other=0.0)
            else:
                v = tl.load(V + k_row0 + cols[:, None] * stride_ks + offs_d[None, :])
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd(Q, K, V, Out, Lse, qd, kd, vd, stride_qb, stride_qs, stride_kb, stride_ks, H, group, seqlen_q, seqlen_k,
         qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FUSE: tl.constexpr,
         TMA: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    h_kv = h // group
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_row0 = b.to(tl.int64) * stride_qb + h * D
    k_row0 = b.to(tl.int64) * stride_kb + h_kv * D
    if TMA:
        q = qd.load([b, m0, h * D]).reshape(BLOCK_M, D)
    else:
        q = tl.load(Q + q_row0 + offs_m[:, None] * stride_qs + offs_d[None, :], mask=(offs_m < seqlen_q)[:, None],
                    other=0.0)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    off = seqlen_k - seqlen_q
    hi = tl.minimum(seqlen_k, tl.maximum(m0 + BLOCK_M - 1 + off + 1, 0))
    full_hi = (tl.minimum(seqlen_k, tl.maximum(m0 + off + 1, 0)) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, kd, vd, b, h_kv, k_row0, stride_ks, 0, full_hi, offs_m, seqlen_k,
                           off, qk_scale, D, BLOCK_N, False, FUSE, TMA, WS, UPCAST)
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, kd, vd, b, h_kv, k_row0, stride_ks, full_hi, hi, offs_m, seqlen_k,
                           off, qk_scale, D, BLOCK_N, True, FUSE, TMA, False, UPCAST)
    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)
    o = (acc * inv_l[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + q_row0 + offs_m[:, None] * stride_qs + offs_d[None, :], o, mask=(offs_m < seqlen_q)[:, None])


def run_variant(q, k, v, cfg, fuse, tma, ws):
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if tma:
        q3, k3, v3 = q.view(B, Sq, H * D), k.view(B, Sk, Hkv * D), v.view(B, Sk, Hkv * D)
        qd = TensorDescriptor(q3, list(q3.shape), list(q3.stride()), [1, BM, D])
        kd = TensorDescriptor(k3, list(k3.shape), list(k3.stride()), [1, BN, D])
        vd = TensorDescriptor(v3, list(v3.shape), list(v3.stride()), [1, BN, D])
    else:
        qd = kd = vd = q
    upcast = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(Sq, BM), B * H)
    _fwd[grid](q, k, v, out, lse, qd, kd, vd, q.stride(0), q.stride(1), k.stride(0), k.stride(1), H, H // Hkv, Sq, Sk,
               D ** -0.5 * LOG2E, D=D, BLOCK_M=BM, BLOCK_N=BN, FUSE=fuse, TMA=tma, WS=ws, UPCAST=upcast,
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


CONFIGS = tiles((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="1024,4096,16384,32768")
    ap.add_argument("--out", default=None, help="write DIR/<gpu kind>.csv (default: benchmarks/results/)")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    smoke = a.smoke
    dev = "cpu" if smoke else "cuda"
    dt = torch.bfloat16
    H, Hkv, D = (4, 2, 32) if smoke else (32, 8, 128)
    seqlens = [70, 128] if smoke else [int(s) for s in a.seqlens.split(",")]
    cfgs = [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)] if smoke else CONFIGS
    variants = [(f, t, w) for f, t, w in itertools.product([False, True], [False, True], [False, True])
                if not (w and smoke)]
    rows = []
    torch.manual_seed(0)
    for S in seqlens:
        q = torch.randn(1, S, H, D, device=dev, dtype=dt)
        k = torch.randn(1, S, Hkv, D, device=dev, dtype=dt)
        v = torch.randn(1, S, Hkv, D, device=dev, dtype=dt)
        flops = attention_flops(1, H, S, S, D, True)
        kr, vr = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, kr, vr))
        ref = torch.nn.functional.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(),
                                                               is_causal=True).transpose(1, 2)
        low = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
        # loose (an experiment): 2x SDPA's own bf16 error, or a bf16 half-ulp of the largest output
        tol = max(2 * (low.float() - ref).abs().max().item(), 2.0 ** -7 * ref.abs().max().item())

        def bench(fn):
            if smoke:
                fn()
                return float("nan")
            return triton.testing.do_bench(fn, warmup=25, rep=100)

        if not smoke:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, be in [("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)]:
                def f(be=be):
                    with sdpa_kernel([be]):
                        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                ms = bench(f)
                rows.append(dict(S=S, variant=name, cfg="-", ms=ms, tflops=flops / ms / 1e9, err="-", ok="-"))
            from qwen3vl_flash.backends.triton_fwd import attention_forward

            for cfg in cfgs:
                o, _ = attention_forward(q, k, v, D ** -0.5, causal=True, config=cfg)
                err = (o.float() - ref).abs().max().item()
                ms = bench(lambda: attention_forward(q, k, v, D ** -0.5, causal=True, config=cfg))
                rows.append(dict(S=S, variant="package", cfg=_c(cfg), ms=ms, tflops=flops / ms / 1e9,
                                 err=f"{err:.2e}", ok=err <= tol))
        for (fuse, tma, ws), cfg in itertools.product(variants, cfgs):
            name = "exp" + ("+fma" if fuse else "") + ("+tma" if tma else "") + ("+ws" if ws else "")
            try:
                o, _ = run_variant(q, k, v, cfg, fuse, tma, ws)
                err = (o.float() - ref).abs().max().item()
                ms = bench(lambda: run_variant(q, k, v, cfg, fuse, tma, ws))
                rows.append(dict(S=S, variant=name, cfg=_c(cfg), ms=ms, tflops=flops / ms / 1e9, err=f"{err:.2e}",
                                 ok=err <= tol))
            except Exception as e:  # a config out of resources, WS unsupported, ...
                rows.append(dict(S=S, variant=name, cfg=_c(cfg), ms=float("nan"), tflops=float("nan"),
                                 err=f"{type(e).__name__}: {str(e)[:80]}", ok=False))
            r = rows[-1]
            print(f"S={S:>6} {r['variant']:<16} {r['cfg']:<16} {r['tflops']:7.1f} TF/s  err {r['err']}  ok {r['ok']}",
                  flush=True)
    if not smoke:
        rows += host_overhead()
    path = a.csv or results_csv(RESULTS, dev, smoke, "exp_fwd_variants", out_dir=a.out)
    rec = Recorder("experiments/exp_fwd_variants", path, device=dev, echo=False)
    for r in rows:
        rec.add(**schema_row(r))
    print("\nbest per S and variant (TFLOP/s):")
    for S in seqlens:
        best = {}
        for r in rows:
            if r["S"] == S and r["ok"] is not False and r["tflops"] == r["tflops"]:
                if r["variant"] not in best or r["tflops"] > best[r["variant"]]["tflops"]:
                    best[r["variant"]] = r
        print(f"S={S}: " + "  ".join(f"{k} {v['tflops']:.0f} ({v['cfg']})" for k, v in
                                     sorted(best.items(), key=lambda kv: -kv[1]["tflops"])))
    bad = [r for r in rows if r["ok"] is False and not str(r["err"]).startswith(("Out", "Compil"))]
    print(f"wrote {path}; {len(bad)} rows failed the 2x check or raised")
    return 0


def host_overhead(S=1024, n=200):
    """S=1k: is the package's forward host-bound? Host µs per call (a loop without syncs), the
    kernel alone (CUDA-graph replay) and SDPA cuDNN the same two ways."""
    import time

    from qwen3vl_flash.backends.triton_fwd import attention_forward

    H, Hkv, D = 32, 8, 128
    q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2), v.repeat_interleave(4, 2).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    fns = {"package": lambda: attention_forward(q, k, v, D ** -0.5, causal=True, config=cfg),
           "exp+fma": lambda: run_variant(q, k, v, cfg, True, False, False), "sdpa-cudnn": cudnn}
    out = []
    for name, fn in fns.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t0) / n * 1e6
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        ms = triton.testing.do_bench(g.replay, warmup=25, rep=100)
        print(f"S=1024 {name:<12} host {host:6.1f} us/call, loop {loop:6.1f} us/call, graph replay {ms * 1e3:6.1f} us",
              flush=True)
        out.append(dict(S=S, variant=name + " host-us", cfg="-", ms=host / 1e3, tflops=float("nan"), err="-", ok="-"))
        out.append(dict(S=S, variant=name + " graph", cfg="-", ms=ms,
                        tflops=attention_flops(1, H, S, S, D, True) / ms / 1e9,
                        err="-", ok="-"))
    return out


if __name__ == "__main__":
    sys.exit(main())
