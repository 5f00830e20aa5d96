"""Experiment: where does the Triton backward spend its time, and why is hd72 slow? (issue 3)

For text (hd128 causal GQA) and vision-like shapes (non-causal MHA, hd128 / hd72 / hd64), time
``attention_backward`` per tile config, split the default config's time by kernel (profiler:
preprocess / dK-dV / dQ), and time cuDNN's backward (SDPA fwd+bwd minus fwd) beside it.
Rows (``qwen3vl_flash.benchmarking`` schema, bench ``experiments/exp_bwd_profile``; do_bench means)
are appended to ``benchmarks/results/<gpu kind>.csv`` (``--out DIR``: ``DIR/<gpu kind>.csv``).

    PYTHONPATH=src python3 benchmarks/experiments/exp_bwd_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

from qwen3vl_flash.benchmarking import Recorder, attention_flops, extra, results_csv, tiles
from qwen3vl_flash.benchmarking import tile_str as _c

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")

CASES = [  # name, B, S, H, Hkv, D, causal
    ("text causal 32/8 hd128", 1, 16384, 32, 8, 128, True),
    ("vision hd128 full 16/16", 1, 16384, 16, 16, 128, False),
    ("vision hd72 full 16/16", 1, 16384, 16, 16, 72, False),
    ("vision hd64 full 16/16", 1, 16384, 16, 16, 64, False),
]
CONFIGS = tiles((64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (64, 128, 4, 2), (32, 128, 4, 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write DIR/<gpu kind>.csv (default: benchmarks/results/)")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qwen3vl_flash.backends.triton_bwd import attention_backward
    from qwen3vl_flash.backends.triton_fwd import attention_forward

    rec = Recorder("experiments/exp_bwd_profile", a.csv or results_csv(RESULTS, "cuda", out_dir=a.out),
                   device="cuda", echo=False)

    def row(name, S, provider, mode, ms, fl=None, metric="time", **ex):
        rec.add(case=f"{name} B=1", provider=provider, mode=mode, dtype="bfloat16", x_name="S", x=S, metric=metric,
                p50=ms, rate=fl / ms / 1e9 if fl else "", rate_unit="TFLOP/s" if fl else "",
                extra=extra(**ex, statistic="do_bench mean" if metric == "time" else "profiler mean of 3 calls"))

    for name, B, S, H, Hkv, D, causal in CASES:
        torch.manual_seed(0)
        mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(H), mk(Hkv), mk(Hkv), mk(H)
        sc = D ** -0.5
        flops_fb = attention_flops(B, H, S, S, D, causal, "fwd+bwd")
        out, lse = attention_forward(q, k, v, sc, causal=causal)
        # reference gradients (cuDNN, K/V repeated)
        qt, kt, vt = (x.transpose(1, 2).detach().clone().requires_grad_() for x in
                      (q, k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o_ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            o_ref.backward(do.transpose(1, 2))

        def fwd_only():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        def fwd_bwd():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            torch.autograd.grad(o, (qt, kt, vt), do.transpose(1, 2))
        t_f = triton.testing.do_bench(fwd_only, warmup=25, rep=100)
        t_fb = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100)
        row(name, S, "cudnn", "fwd+bwd", t_fb, flops_fb)
        bwd_flops = attention_flops(B, H, S, S, D, causal, "bwd")
        row(name, S, "cudnn", "bwd", t_fb - t_f, bwd_flops, note="fwd+bwd - fwd")
        print(f"{name}: cuDNN fwd {t_f:.2f} ms, fwd+bwd {t_fb:.2f} ms", flush=True)
        dk_ref = kt.grad.view(B, Hkv, H // Hkv, S, D).sum(2).transpose(1, 2)
        for cfg in CONFIGS:
            try:
                dq, dk, dv = attention_backward(do, q, k, v, out, lse, sc, causal=causal, config=cfg, config_dq=cfg)
                err = (dk.float() - dk_ref.float()).abs().max().item()
                ms = triton.testing.do_bench(
                    lambda: attention_backward(do, q, k, v, out, lse, sc, causal=causal, config=cfg, config_dq=cfg),
                    warmup=25, rep=100)
            except Exception as e:
                print(f"  {_c(cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            row(name, S, "triton", "bwd", ms, bwd_flops, tile=_c(cfg), dk_err=f"{err:.2e}")
            print(f"  triton bwd {_c(cfg):<14} {ms:8.2f} ms {bwd_flops / ms / 1e9:7.1f} TF/s  dk err {err:.2e}",
                  flush=True)
        # per-kernel split for the first config
        cfg = CONFIGS[0]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                attention_backward(do, q, k, v, out, lse, sc, causal=causal, config=cfg, config_dq=cfg)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA and ev.count:
                t = ev.device_time_total / ev.count / 1e3
                print(f"  kernel {ev.key[:40]:<40} {t:8.3f} ms/call", flush=True)
                row(name, S, "triton", "bwd", t, metric=f"kernel {ev.key[:40]}", tile=_c(cfg))
        del q, k, v, do, out, lse, qt, kt, vt
        torch.cuda.empty_cache()
    print(f"rows appended to {rec.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
