"""GPU experiment: one-GPU causal GQA attention (Qwen3-VL-8B text shape, 32/8 heads, hd128, bf16)
through ``flash_attn_func`` with each backend that serves it: the default (``auto``: PyTorch
SDPA, which repeats K/V for GQA), ``cudnn`` (cuDNN's fused kernels with GQA K/V as they are, where
the build takes them) and ``triton`` (ours). Correctness against fp32 attention at 4k (the 2x/3x
rule against SDPA's own bf16 error), then forward and forward+backward time (do_bench median) and
the peak memory of forward+backward beyond the inputs (do_bench's mean; the p50 column holds it).
Rows (``qwen3vl_flash.benchmarking`` schema, bench ``experiments/exp_gqa_1gpu``, case
``text causal 32/8 hd128 B=<B>``) are appended to ``benchmarks/results/<gpu kind>.csv`` (or ``--csv``).

    PYTHONPATH=src python3 benchmarks/experiments/exp_gqa_1gpu.py [--csv $OUT/h200.csv]
"""

import argparse
import os

import torch
import triton

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import Recorder, attention_flops, extra, results_csv
from qwen3vl_flash.reference import attention_ref

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
BENCH = "experiments/exp_gqa_1gpu"

BACKENDS = ("auto", "cudnn", "triton")


def grads(backend, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = qf.flash_attn_func(q, k, v, causal=True, backend=backend)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


def schema_rows(r):
    """One row of this script (a check, or a backend's fwd and fwd+bwd times at one shape) as
    rows of the benchmark schema (also used on the archived CSV of the old layout)."""
    base = dict(case=f"text causal 32/8 hd128 B={r['B']}", provider=r["backend"], dtype="bfloat16", x_name="S",
                x=r["S"], status=r.get("status", ""))
    if r["op"] == "check":
        return [dict(base, mode="check", metric="check", unit="", status=r["status"],
                     extra=extra(errs_out_dq_dk_dv=r.get("note")))]
    stat = "statistic=mean (do_bench default)"
    if not r.get("fwd_ms"):
        return [dict(base, mode="fwd", extra=r.get("note", ""))]
    return [dict(base, mode="fwd", p50=r["fwd_ms"], rate=r["fwd_tflops"], rate_unit="TFLOP/s", extra=stat),
            dict(base, mode="fwd+bwd", p50=r["fwdbwd_ms"], rate=r["fwdbwd_tflops"], rate_unit="TFLOP/s",
                 memory_mb=r["peak_mb"], extra=stat)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None, help="default: benchmarks/results/<gpu kind>.csv")
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, Hkv, D = 32, 8, 128
    rows = []
    # correctness at 4k against fp32
    torch.manual_seed(0)
    q, do = (torch.randn(1, 4096, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 4096, Hkv, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q32, k32, v32, causal=True)
    ref.backward(do.float())
    refs = (ref.detach(), q32.grad, k32.grad, v32.grad)
    base = [err(a, b) for a, b in zip(grads("auto", q, k, v, do), refs)]
    for be in BACKENDS:
        got = [err(a, b) for a, b in zip(grads(be, q, k, v, do), refs)]
        ok = all(g <= f * b + 1e-3 for g, b, f in zip(got, base, (2, 3, 3, 3)))
        print(f"check {be:7s} out/dq/dk/dv err " + " ".join(f"{x:.2e}" for x in got) + f"  {'ok' if ok else 'FAILED'}")
        rows.append(dict(op="check", backend=be, S=4096, B=1, status="ok" if ok else "FAILED",
                         note=" ".join(f"{x:.2e}" for x in got)))
    for B, S in ((1, 4096), (1, 16384), (1, 32768), (8, 8192)):
        q, do = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        flops = attention_flops(B, H, S, S, D, True)
        for be in BACKENDS:
            def fwd():
                return qf.flash_attn_func(q, k, v, causal=True, backend=be)

            def fwdbwd():
                qg.grad = kg.grad = vg.grad = None
                qf.flash_attn_func(qg, kg, vg, causal=True, backend=be).backward(do)
            try:
                t_f = triton.testing.do_bench(fwd, warmup=5, rep=30)
                t_fb = triton.testing.do_bench(fwdbwd, warmup=5, rep=30)
                qg.grad = kg.grad = vg.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base_mem = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwdbwd()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
                row = dict(op="time", backend=be, S=S, B=B, fwd_ms=round(t_f, 3), fwdbwd_ms=round(t_fb, 3),
                           fwd_tflops=round(flops / t_f / 1e9, 1),
                           fwdbwd_tflops=round(attention_flops(B, H, S, S, D, True, "fwd+bwd") / t_fb / 1e9, 1),
                           peak_mb=round(peak, 1), status="ok")
            except Exception as e:  # noqa: BLE001
                row = dict(op="time", backend=be, S=S, B=B, status=f"error: {type(e).__name__}: {str(e)[:100]}")
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()))
        del q, k, v, do, qg, kg, vg
    rec = Recorder(BENCH, args.csv or results_csv(RESULTS, dev), device=dev)
    for r in rows:
        for sr in schema_rows(r):
            rec.add(**sr)


if __name__ == "__main__":
    main()
