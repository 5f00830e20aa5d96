"""GPU experiment: decode over an INT8 / FP8 KV cache (issue 14) beside our bf16 cache and SDPA
cuDNN, same run, same card.

One new token per step (B, 1, 32, 128) against a cache of L keys (32/8 heads, hd128), appended in
place by ``flash_attn_with_kvcache`` (our kernels quantise on append); SDPA only reads its bf16
cache (K/V given to it with ``enable_gqa``). Device time per call from ``do_bench`` (L2 cleared).
KV bandwidth = bytes the rows really read (codes + scales for the quantised caches) / time.
Checks: the quantised output against the bf16-cache output of the same history (cosine; the
issue's bar is >= 0.9995 for INT8 against the dequantised history, which the CPU tests assert).

    PYTHONPATH=src python3 benchmarks/experiments/exp_quant_decode.py [--csv PATH] [--lengths 32768,131072]
"""

import argparse
import os

import torch
import torch.nn.functional as F
import triton.testing

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import Recorder, extra, results_csv
from qwen3vl_flash.interface import quantize_kv

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
BENCH = "experiments/exp_quant_decode"
H, HKV, D = 32, 8, 128


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    path = args.csv or results_csv(RESULTS, dev, out_dir=os.environ.get("OUT") or None)
    rec = Recorder(BENCH, path, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    table = []
    for B in map(int, args.batches.split(",")):
        for L in map(int, args.lengths.split(",")):
            if B * L > 8 * 32768 * 4:  # keep memory modest
                continue
            Smax = L + 16
            kf = torch.randn(B, Smax, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
            vf = torch.randn(B, Smax, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
            q = torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16, generator=g)
            kn = torch.randn(B, 1, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
            vn = torch.randn(B, 1, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
            seqlens = torch.full((B,), L - 1, dtype=torch.int32, device=dev)
            case = f"decode 32/8 hd128 B={B}"
            outs, times = {}, {}
            caches = {"bf16": (kf.clone(), vf.clone(), None, None)}
            for name, dt in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
                kc, ks = quantize_kv(kf, dt)
                vc, vs = quantize_kv(vf, dt)
                caches[name] = (kc, vc, ks.contiguous(), vs.contiguous())
            for name, (kc, vc, ks, vs) in caches.items():
                kw = {} if ks is None else dict(k_scale=ks, v_scale=vs)

                def fn(kc=kc, vc=vc, kw=kw):
                    return qf.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=seqlens,
                                                      check_values=False, backend="triton", **kw)
                try:
                    outs[name] = fn()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    elt = 2 if ks is None else 1
                    nbytes = 2 * B * L * HKV * D * elt + (0 if ks is None else 2 * B * L * HKV * 4)
                    times[name] = ms
                    cos = cosine(outs[name], outs["bf16"]) if name != "bf16" else 1.0
                    rec.add(case=case, provider=f"triton-{name}-cache", mode="decode", dtype="bfloat16",
                            x_name="L", x=L, metric="time", unit="ms", p50=ms, rate=nbytes / ms / 1e9,
                            rate_unit="TB/s", extra=extra(kv_bytes=nbytes, cos_vs_bf16_cache=f"{cos:.6f}"))
                except Exception as exc:  # keep the other rows
                    rec.add(case=case, provider=f"triton-{name}-cache", mode="decode", dtype="bfloat16",
                            x_name="L", x=L, metric="time", status="error",
                            extra=extra(note=f"{type(exc).__name__}: {str(exc)[:160]}"))
            # SDPA cuDNN / flash over the bf16 history (read only)
            kt = kf[:, :L].transpose(1, 2)
            vt = vf[:, :L].transpose(1, 2)
            qt = q.transpose(1, 2)
            from torch.nn.attention import SDPBackend, sdpa_kernel
            for bname, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    def sfn(be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                    sfn()
                    ms = triton.testing.do_bench(sfn, warmup=25, rep=100, return_mode="median")
                    times[bname] = ms
                    nbytes = 2 * B * L * HKV * D * 2
                    rec.add(case=case, provider=bname, mode="decode", dtype="bfloat16", x_name="L", x=L,
                            metric="time", unit="ms", p50=ms, rate=nbytes / ms / 1e9, rate_unit="TB/s")
                except Exception as exc:
                    rec.add(case=case, provider=bname, mode="decode", dtype="bfloat16", x_name="L", x=L,
                            metric="time", status="error", extra=extra(note=f"{type(exc).__name__}: {str(exc)[:160]}"))
            table.append((B, L, times))
            del kf, vf, caches
            torch.cuda.empty_cache()
    print(f"\n{'B':>2} {'L':>7} " + " ".join(f"{n:>11}" for n in ("bf16", "int8", "fp8", "cudnn")) + "  int8 speed-up  fp8 speed-up")
    for B, L, t in table:
        cells = [t.get(n) for n in ("bf16", "int8", "fp8", "sdpa-cudnn")]
        su = [f"{t['bf16'] / t[n]:.2f}x" if n in t and "bf16" in t else "-" for n in ("int8", "fp8")]
        print(f"{B:>2} {L:>7} " + " ".join(f"{c * 1000:9.1f}us" if c else f"{'-':>11}" for c in cells) + f"  {su[0]:>13} {su[1]:>13}")


if __name__ == "__main__":
    main()
