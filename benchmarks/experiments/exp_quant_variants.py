"""GPU experiment (issue 14, 2026-12-07): the quantised attention kernel's ``QuantTiles`` knobs,
each beside SDPA cuDNN (bf16) and our bf16 Triton kernel in the same run.

Knobs (``backends/triton_quant.py``): ``score_convert`` "magic" (int32 scores -> fp32 by an
integer add into 1.5 * 2**23 instead of I2FP), ``fp8_exp`` "f16x2", ``fp8_accumulate``
"tensor_core" (P.V accumulated in the FP8 MMA instead of an fp32 register add: shorter chain,
fewer registers, but Hopper's FP8 accumulation keeps fewer bits: its accuracy is checked at 32k),
``align8`` (vector loads for hd72 rows; the default is on). Offline sm90 SASS of the kernel
(triton 3.9, no GPU) predicted: "magic" and "f16x2" no gain (ptxas already uses I2FP, and splits
ex2.f16x2 into two MUFU ops); the fp32 register add costs one FFMA per accumulator element plus
64 live registers (255 per thread today).

Accuracy: cosine / relative L1 of each variant against fp32 attention of the unquantised inputs
(text: query heads 0-3; random N(0,1) and K with +20 outliers on 4 channels), issue 14's bars.
Speed: do_bench medians, TFLOP/s counted as bf16 FLOPs, quantisers included.

    PYTHONPATH=src python3 benchmarks/experiments/exp_quant_variants.py [--sizes 4096,16384,32768]
"""
import argparse
import csv
import dataclasses
import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exp_quant_fwd import THRESHOLDS, cos_l1, fp32_attention, sdpa_cudnn  # noqa: E402

import qwen3vl_flash as qf  # noqa: E402
from qwen3vl_flash.backends import triton_quant as tq  # noqa: E402
from qwen3vl_flash.benchmarking import attention_flops  # noqa: E402

BASE = tq.QUANT_TILES
VARIANTS = {
    "int8": {"default": {}, "magic": dict(score_convert="magic")},
    "fp8": {"default": {}, "magic": dict(score_convert="magic"), "f16x2": dict(fp8_exp="f16x2"),
            "tc-acc": dict(fp8_accumulate="tensor_core"),
            "tc-acc+magic": dict(fp8_accumulate="tensor_core", score_convert="magic")},
}
VISION = {
    "int8": {"default": {}, "no-align8": dict(align8=False)},
    "fp8": {"default": {}, "no-align8": dict(align8=False), "pad": dict(fp8_head_split="pad"),
            "tc-acc": dict(fp8_accumulate="tensor_core")},
}
# run last, in its own process (--int8-split): int8 with head_split "split" faulted on an H200 (2026-12-01)
INT8_SPLIT = {"int8": {"split": dict(head_split="split")}}
ROWS = []


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def row(**kw):
    ROWS.append(kw)
    print("  ".join(f"{k}={v}" for k, v in kw.items()), flush=True)


def timed(case, x, name, fn, flops):
    try:
        ms = bench(fn)
        row(case=case, x=x, provider=name, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
        return flops / ms / 1e9
    except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others run
        row(case=case, x=x, provider=name, ms="", tflops="", status=f"{type(e).__name__}: {str(e)[:150]}")
        return None


def text(S, check):
    H, Hkv, D = 32, 8, 128
    dev = "cuda"
    torch.manual_seed(S)
    q, k, v = (torch.randn(1, S, h, D, device=dev, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    flops = attention_flops(1, H, S, S, D, True)
    case = "text causal 32/8 hd128"
    qh = q.transpose(1, 2)
    kr, vr = (t.repeat_interleave(H // Hkv, 2).transpose(1, 2) for t in (k, v))
    res = {"cudnn": timed(case, S, "sdpa-cudnn", lambda: sdpa_cudnn(qh, kr, vr, True), flops)}
    del kr, vr
    res["bf16"] = timed(case, S, "triton-bf16", lambda: qf.flash_attn_func(q, k, v, causal=True, backend="triton"), flops)
    refs = {}
    if check:
        ko = k.float().clone()
        ko[..., [3, 17, 30, 99]] += 20.0
        ko = ko.to(torch.bfloat16)
        for outl, kk in ((False, k), (True, ko)):
            refs[outl] = (kk, fp32_attention(q[:, :, :4], kk[:, :, :1], v[:, :, :1], True))
    for quant, vs in VARIANTS.items():
        for vname, knobs in vs.items():
            tiles = dataclasses.replace(BASE, **knobs)
            name = f"{quant} {vname}"
            for outl, (kk, ref) in refs.items():
                out, _ = tq.quant_attention_triton(q, kk, v, quant, D ** -0.5, True, tiles=tiles)
                c, l1 = cos_l1(out[:, :, :4], ref)
                cmin, lmax = THRESHOLDS[(quant, outl)]
                row(case=case, x=S, provider=name, check="outliers" if outl else "random", cos=f"{c:.6f}",
                    rel_l1=f"{l1:.5f}", status="ok" if c >= cmin and l1 <= lmax else "FAILED")
            res[name] = timed(case, S, name, lambda tiles=tiles, quant=quant: tq.quant_attention_triton(
                q, k, v, quant, D ** -0.5, True, tiles=tiles), flops)
    return res


def vision(frames=8, tokens=2304, table=None):
    H, D = 16, 72
    T = frames * tokens
    torch.manual_seed(1)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.arange(0, T + 1, tokens, device="cuda", dtype=torch.int32)
    flops = frames * attention_flops(1, H, tokens, tokens, D, False)
    case = f"vision varlen {frames}x{tokens} 16 heads hd72"
    segs = [tuple(t[a:a + tokens].unsqueeze(0).transpose(1, 2) for t in (q, k, v)) for a in range(0, T, tokens)]
    res = {"cudnn": timed(case, T, "sdpa-cudnn per-frame loop",
                          lambda: [sdpa_cudnn(a, b, c, False) for a, b, c in segs], flops)}
    res["bf16"] = timed(case, T, "triton-bf16", lambda: qf.flash_attn_varlen_func(
        q, k, v, cu, cu, tokens, tokens, backend="triton"), flops)
    ref = torch.cat([fp32_attention(*(t.transpose(1, 2) for t in s), False)[0] for s in segs])
    for quant, vs in (table or VISION).items():
        for vname, knobs in vs.items():
            tiles = dataclasses.replace(BASE, **knobs)
            name = f"{quant} {vname}"
            try:
                out, _ = tq.quant_attention_triton(q, k, v, quant, D ** -0.5, False, (-1, -1), cu, cu, tokens, tokens,
                                                   tiles=tiles)
                c, l1 = cos_l1(out, ref)
                cmin, lmax = THRESHOLDS[(quant, False)]
                row(case=case, x=T, provider=name, check="random", cos=f"{c:.6f}", rel_l1=f"{l1:.5f}",
                    status="ok" if c >= cmin and l1 <= lmax else "FAILED")
            except Exception as e:  # noqa: BLE001
                row(case=case, x=T, provider=name, check="random", status=f"{type(e).__name__}: {str(e)[:150]}")
                continue
            res[name] = timed(case, T, name, lambda tiles=tiles, quant=quant: tq.quant_attention_triton(
                q, k, v, quant, D ** -0.5, False, (-1, -1), cu, cu, tokens, tokens, tiles=tiles), flops)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,32768")
    ap.add_argument("--check-at", default="32768", help="text sizes whose accuracy is checked")
    ap.add_argument("--skip-vision", action="store_true")
    ap.add_argument("--int8-split", action="store_true", help="only the vision case's int8 head_split='split'")
    ap.add_argument("--frames", default="8x2304", help="vision frames x tokens per frame")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    tables = {}
    frames, tokens = (int(x) for x in args.frames.split("x"))
    if args.int8_split:
        vision(frames, tokens, INT8_SPLIT)
        return
    if not args.skip_vision:
        tables[f"vision {args.frames}"] = vision(frames, tokens)
    checks = {int(s) for s in args.check_at.split(",") if s}
    for S in (int(s) for s in args.sizes.split(",")):
        tables[f"text {S}"] = text(S, S in checks)
    out = os.environ.get("OUT")
    if out:
        keys = sorted({k for r in ROWS for k in r}, key=lambda k: list(ROWS[0]).index(k) if k in ROWS[0] else 99)
        with open(os.path.join(out, "quant_variants.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(ROWS)
    print("\nTFLOP/s (bf16 count) and x cuDNN:")
    for case, res in tables.items():
        base = res.get("cudnn")
        cells = [f"{n} {r:.0f} ({r / base:.2f}x)" if r and base else f"{n} -" for n, r in res.items()]
        print(f"{case}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
