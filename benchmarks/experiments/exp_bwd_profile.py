"""Experiment: where does the Triton backward spend its time, and why is hd72 slow? (issue 3)

For text (hd128 causal GQA) and vision-like shapes (non-causal MHA, hd128 / hd72 / hd64), time
``attention_backward`` per tile config, split the default config's time by kernel (profiler:
preprocess / dK-dV / dQ), and time cuDNN's backward (SDPA fwd+bwd minus fwd) beside it.

    PYTHONPATH=src python3 benchmarks/exp_bwd_profile.py --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import triton

CASES = [  # name, B, S, H, Hkv, D, causal
    ("text hd128 causal 32/8", 1, 16384, 32, 8, 128, True),
    ("vision hd128 full 16/16", 1, 16384, 16, 16, 128, False),
    ("vision hd72 full 16/16", 1, 16384, 16, 16, 72, False),
    ("vision hd64 full 16/16", 1, 16384, 16, 16, 64, False),
]
CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
]


def _c(cfg):
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qwen3vl_flash.backends.triton_bwd import attention_backward
    from qwen3vl_flash.backends.triton_fwd import attention_forward

    rows = []
    for name, B, S, H, Hkv, D, causal in CASES:
        torch.manual_seed(0)
        mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(H), mk(Hkv), mk(Hkv), mk(H)
        sc = D ** -0.5
        flops_fb = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0) * 2.5  # fwd+bwd: 2.5x fwd
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
        rows.append(dict(case=name, what="cudnn fwd+bwd", cfg="-", ms=t_fb, tflops=flops_fb / t_fb / 1e9, err="-"))
        bwd_flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0) * 1.5  # fwd+bwd = 2.5x fwd
        rows.append(dict(case=name, what="cudnn bwd (fwd+bwd - fwd)", cfg="-", ms=t_fb - t_f,
                         tflops=bwd_flops / (t_fb - t_f) / 1e9, err="-"))
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
            rows.append(dict(case=name, what="triton bwd", cfg=_c(cfg), ms=ms, tflops=bwd_flops / ms / 1e9,
                             err=f"{err:.2e}"))
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
                rows.append(dict(case=name, what=f"kernel {ev.key[:40]}", cfg=_c(cfg), ms=t, tflops=float("nan"),
                                 err="-"))
        del q, k, v, do, out, lse, qt, kt, vt
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "exp_bwd_profile.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
