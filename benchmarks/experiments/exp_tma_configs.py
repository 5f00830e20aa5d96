"""Experiment: the package's forward with and without TMA loads, per tile config (issue 3).

Run 2 showed ptxas crashing on some TMA builds of the package kernel (not of the compact copy in
exp_fwd_variants.py). This times ``attention_forward(use_tma=False/True)`` for each tile config
at hd128 causal 32/8 heads, S = 4k / 16k / 32k, checks each against fp32 attention, and times
cuDNN beside it. Failed builds are reported (and fall back to pointer loads in the package).
Rows (``qwen3vl_flash.benchmarking`` schema, bench ``experiments/exp_tma_configs``; do_bench means) are
appended to ``benchmarks/results/<gpu kind>.csv`` (``--out DIR``: ``DIR/<gpu kind>.csv``).

    PYTHONPATH=src python3 benchmarks/experiments/exp_tma_configs.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

from qwen3vl_flash.benchmarking import Recorder, attention_flops, results_csv, tiles
from qwen3vl_flash.benchmarking import tile_str as _c

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from exp_fwd_variants import schema_row  # noqa: E402  (the same row shape)

CONFIGS = tiles((64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write DIR/<gpu kind>.csv (default: benchmarks/results/)")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--seqlens", default="4096,16384,32768")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import qwen3vl_flash.backends.triton_fwd as tf

    H, Hkv, D = 32, 8, 128
    rows = []
    for S in map(int, a.seqlens.split(",")):
        torch.manual_seed(0)
        q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2), v.repeat_interleave(4, 2).transpose(1, 2)
        fl = attention_flops(1, H, S, S, D, True)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            low = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
        if S <= 4096:  # fp32 reference (scores fit): tolerance 2x cuDNN's own error
            ref = torch.nn.functional.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(),
                                                                   is_causal=True).transpose(1, 2)
            tol = 2 * (low.float() - ref).abs().max().item()
        else:  # against cuDNN: its error and ours add up
            ref, tol = low.float(), 2 ** -6

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        ms = triton.testing.do_bench(cudnn, warmup=25, rep=100)
        rows.append(dict(S=S, variant="sdpa-cudnn", cfg="-", ms=ms, tflops=fl / ms / 1e9, err="-", status="ok"))
        print(f"S={S:>6} sdpa-cudnn {fl / ms / 1e9:7.1f} TF/s", flush=True)
        for cfg in CONFIGS:
            for tma in (False, True):
                tf._TMA_FAILED.clear()
                name = "package+tma" if tma else "package"
                try:
                    o, _ = tf.attention_forward(q, k, v, D ** -0.5, causal=True, config=cfg, use_tma=tma)
                    status = "ok" if not tf._TMA_FAILED else "tma build failed -> pointer loads"
                    err = (o.float() - ref).abs().max().item()
                    if err > tol:
                        status = f"WRONG (err > {tol:.2e})"
                    ms = triton.testing.do_bench(
                        lambda: tf.attention_forward(q, k, v, D ** -0.5, causal=True, config=cfg, use_tma=tma),
                        warmup=25, rep=100)
                except Exception as e:
                    err, ms, status = float("nan"), float("nan"), f"error {type(e).__name__}"
                rows.append(dict(S=S, variant=name, cfg=_c(cfg), ms=ms, tflops=fl / ms / 1e9, err=err, status=status))
                print(f"S={S:>6} {name:<12} {_c(cfg):<12} {fl / ms / 1e9:7.1f} TF/s  err {err:.2e}  {status}",
                      flush=True)
    rec = Recorder("experiments/exp_tma_configs", a.csv or results_csv(os.path.join(HERE, "..", "results"), "cuda",
                                                                          out_dir=a.out), device="cuda", echo=False)
    for r in rows:
        rec.add(**schema_row(r))
    print(f"rows appended to {rec.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
