"""GPU experiment: the quantised attention forward (``backends/triton_quant.py``, issue 14) beside
SDPA cuDNN (bf16) and our bf16 Triton kernel, same run, same card.

1. Checks: the Triton quantisers' codes/scales against ``quant.quantize.quantize_qkv`` (counts of
   differing codes; K's mean is summed in another order, so a code at an exact tie may differ by
   one), and the attention's cosine / relative L1 against fp32 attention of the unquantised
   inputs, random N(0, 1) and with K channel outliers (+20 on 4 channels), against the issue's
   thresholds (int8 cos >= 0.9995, L1 <= 0.02, outliers 0.9993 / 0.035; fp8 0.999 / 0.045).
2. Speed: text causal 32/8 heads hd128 B=1 at S = 4k / 16k / 32k, and the vision tower's
   hd72 varlen (8 frames of 2304 tokens, 16 heads, non-causal) against the cuDNN per-frame loop.
   TFLOP/s counted as bf16 FLOPs (4*B*H*Sq*Sk*D, halved for causal); do_bench medians (it
   clears the L2 between runs). cuDNN gets K/V repeated to every query head outside the timed
   region (favouring it). The quantised time includes the K/V quantisation kernels; their share
   is printed too (``quant-kv`` rows).
3. ``--sweep``: every tile of ``--tiles`` for the quantised kernels at each shape (what the
   ``QuantTiles`` table should hold), natural and reversed query-block order for causal.

Rows (``qwen3vl_flash.benchmarking`` schema, bench ``experiments/exp_quant_fwd``) go to
``$OUT/<gpu kind>.csv`` when ``$OUT`` is set, else ``benchmarks/results/<gpu kind>.csv`` (or ``--csv``).

    PYTHONPATH=src python3 benchmarks/experiments/exp_quant_fwd.py [--quick] [--sweep] [--csv PATH]
"""

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

import qwen3vl_flash as qf
from qwen3vl_flash.backends import triton_quant as tq
from qwen3vl_flash.benchmarking import Recorder, attention_flops, extra, results_csv, tile_str
from qwen3vl_flash.quant.quantize import quantize_qkv

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
BENCH = "experiments/exp_quant_fwd"
THRESHOLDS = {("int8", False): (0.9995, 0.02), ("int8", True): (0.9993, 0.035),
              ("fp8", False): (0.999, 0.045), ("fp8", True): (0.999, 0.045)}
SWEEP_TILES = ((128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3),
               (128, 128, 4, 3))


def cfg_of(t):
    return dict(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2], num_stages=t[3])


def bench_ms(fn, quick):
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def cos_l1(out, ref):
    a, b = out.double().flatten(), ref.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item(), ((a - b).abs().sum() / b.abs().sum()).item()


def sdpa_cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def fp32_attention(q, k, v, causal):
    """fp32 attention of (B, S, H, D) inputs (K/V repeated for GQA) by SDPA's math backend,
    one head at a time (the (S, S) fp32 scores of all heads at once would take 2 GB at 4k)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[2] // k.shape[2]
    outs = []
    with sdpa_kernel(SDPBackend.MATH):
        for h in range(q.shape[2]):
            outs.append(F.scaled_dot_product_attention(
                q[:, :, h:h + 1].float().transpose(1, 2), k[:, :, h // g:h // g + 1].float().transpose(1, 2),
                v[:, :, h // g:h // g + 1].float().transpose(1, 2), is_causal=causal).transpose(1, 2))
    return torch.cat(outs, 2)


def checks(rec, dev):
    """Codes against quantize_qkv; accuracy against fp32 attention (text 4k causal, vision)."""
    ok_all = True
    torch.manual_seed(0)
    H, Hkv, D, S = 32, 8, 128, 4096
    for outliers in (False, True):
        q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
        if outliers:
            k[..., :4] += 20.0
        ref = fp32_attention(q, k, v, True)
        for quant in ("int8", "fp8"):
            if not outliers:
                a = tq.quantize_qkv_triton(q, k, v, quant, False)
                # the reference on the CPU: on CUDA, torch turns a division by a Python scalar
                # (quantize.py's amax / 127, amax / 448) into a multiplication by its reciprocal,
                # which is not the correctly rounded quotient the CPU (and these kernels) compute
                r = quantize_qkv(q.cpu(), k.cpu(), v.cpu(), quant, False)
                r_gpu = quantize_qkv(q, k, v, quant, False)
                gpu_vs_cpu = int((r_gpu.q_scale.cpu() != r.q_scale).sum().item())
                diffs = {}
                for n in r._fields:
                    x, y = getattr(a, n), getattr(r, n)
                    if x is None:
                        continue
                    diffs[n] = int((x.float().cpu() != y.float()).sum().item())
                mean_err = (a.k_mean.cpu() - r.k_mean).abs().max().item()
                code_ok = all(v_ == 0 for n, v_ in diffs.items() if n not in ("k_codes", "k_scale", "k_mean")) \
                    and diffs["k_codes"] <= max(16, a.k_codes.numel() // 100000)
                ok_all &= code_ok
                print(f"check codes {quant} (against quantize_qkv on the CPU): differing elements {diffs}, "
                      f"max|mean diff| {mean_err:.2e} {'ok' if code_ok else 'FAILED'}; quantize_qkv itself on "
                      f"CUDA vs CPU: {gpu_vs_cpu} q scales differ")
                rec.add(case="text causal 32/8 hd128 B=1", provider=f"triton-{quant}", mode="check codes",
                        dtype="bfloat16", x_name="S", x=S, metric="check", unit="",
                        status="ok" if code_ok else "FAILED",
                        extra=extra(**diffs, mean_err=f"{mean_err:.2e}", torch_cuda_vs_cpu_q_scales=gpu_vs_cpu))
            out, _ = tq.quant_attention_triton(q, k, v, quant, D ** -0.5, True, (-1, -1), None, None, 0, 0, True)
            c, l1 = cos_l1(out, ref)
            cmin, lmax = THRESHOLDS[(quant, outliers)]
            good = c >= cmin and l1 <= lmax and not torch.isnan(out).any().item()
            ok_all &= good
            what = "K outliers +20" if outliers else "N(0,1)"
            print(f"check {quant} 4k causal {what}: cos {c:.6f} (>= {cmin}) rel-L1 {l1:.4f} (<= {lmax}) "
                  f"{'ok' if good else 'FAILED'}")
            rec.add(case="text causal 32/8 hd128 B=1", provider=f"triton-{quant}", mode="check", dtype="bfloat16",
                    x_name="S", x=S, metric="check", unit="", status="ok" if good else "FAILED",
                    extra=extra(inputs=what, cos=f"{c:.6f}", rel_l1=f"{l1:.5f}"))
        del q, k, v, ref
    return ok_all


def text_case(rec, dev, S, quick, sweep, tiles):
    H, Hkv, D = 32, 8, 128
    torch.manual_seed(S)
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    flops = attention_flops(1, H, S, S, D, True)
    case = "text causal 32/8 hd128 B=1"
    res = {}
    qh = q.transpose(1, 2)
    kr, vr = (t.repeat_interleave(H // Hkv, 2).transpose(1, 2) for t in (k, v))
    provs = [("sdpa-cudnn", lambda: sdpa_cudnn(qh, kr, vr, True), None),
             ("triton-bf16", lambda: qf.flash_attn_func(q, k, v, causal=True, backend="triton"), None)]
    for quant in ("int8", "fp8"):
        cands = [cfg_of(t) for t in tiles] if sweep else [None]
        for cfg in cands:
            for rev in ((False, True) if sweep else (None,)):
                name = f"triton-{quant}" + (f" {tile_str(cfg)}{' rev' if rev else ''}" if cfg else "")
                provs.append((name, lambda quant=quant, cfg=cfg, rev=rev: tq.quant_attention_triton(
                    q, k, v, quant, D ** -0.5, True, config=cfg, reverse_m=rev), cfg))
        provs.append((f"quant-kv {quant}", lambda quant=quant: tq.quantize_kv_triton(k, v, quant, False), None))
    for name, fn, cfg in provs:
        try:
            ms = bench_ms(fn, quick)
            rate = flops / ms / 1e9
            res[name] = ms
            rec.add(case=case, provider=name, mode="fwd", dtype="bfloat16", x_name="S", x=S, p50=round(ms, 4),
                    rate=round(rate, 1) if not name.startswith("quant-kv") else "",
                    rate_unit="TFLOP/s (bf16 count)" if not name.startswith("quant-kv") else "",
                    extra=extra("statistic=median (do_bench)"))
        except Exception as e:  # a tile that does not fit: reported, not fatal
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rec.add(case=case, provider=name, mode="fwd", dtype="bfloat16", x_name="S", x=S, status="error",
                    extra=msg)
    return {n: flops / ms / 1e9 for n, ms in res.items()}


def vision_case(rec, dev, quick, sweep, tiles, frames=8, tokens=2304, vsplit=None):
    H, D = 16, 72
    T = frames * tokens
    torch.manual_seed(1)
    q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    cu = torch.arange(0, T + 1, tokens, device=dev, dtype=torch.int32)
    flops = frames * attention_flops(1, H, tokens, tokens, D, False)
    case = f"vision varlen {frames}x{tokens} 16 heads hd72"
    segs = [(t.unsqueeze(0).transpose(1, 2) for t in (q[a:a + tokens], k[a:a + tokens], v[a:a + tokens]))
            for a in range(0, T, tokens)]
    segs = [tuple(s) for s in segs]

    def cudnn_loop():
        return [sdpa_cudnn(a, b, c, False) for a, b, c in segs]

    provs = [("sdpa-cudnn per-frame loop", cudnn_loop, None),
             ("triton-bf16", lambda: qf.flash_attn_varlen_func(q, k, v, cu, cu, tokens, tokens, backend="triton"),
              None)]
    # accuracy of the quantised varlen call against fp32 attention per frame
    for quant in ("int8", "fp8"):
        out, _ = tq.quant_attention_triton(q, k, v, quant, D ** -0.5, False, (-1, -1), cu, cu, tokens, tokens, False,
                                           head_split=vsplit)
        ref = torch.cat([fp32_attention(*(t.transpose(1, 2) for t in s), False)[0] for s in segs])
        c, l1 = cos_l1(out, ref)
        cmin, lmax = THRESHOLDS[(quant, False)]
        good = c >= cmin and l1 <= lmax
        print(f"check {quant} vision varlen: cos {c:.6f} rel-L1 {l1:.4f} {'ok' if good else 'FAILED'}")
        rec.add(case=case, provider=f"triton-{quant}", mode="check", dtype="bfloat16", x_name="T", x=T,
                metric="check", unit="", status="ok" if good else "FAILED",
                extra=extra(cos=f"{c:.6f}", rel_l1=f"{l1:.5f}"))
        del ref
        cands = [cfg_of(t) for t in tiles] if sweep else [None]
        for cfg in cands:
            for split in (("split", "pad") if sweep else (vsplit,)):
                name = f"triton-{quant} {tile_str(cfg) + ' ' if cfg else ''}{split or tq.QUANT_TILES.head_split}"
                provs.append((name, lambda quant=quant, cfg=cfg, split=split: tq.quant_attention_triton(
                    q, k, v, quant, D ** -0.5, False, (-1, -1), cu, cu, tokens, tokens, False, config=cfg,
                    head_split=split), cfg))
        provs.append((f"quant-kv {quant}", lambda quant=quant: tq.quantize_kv_triton(k, v, quant, True), None))
    res = {}
    for name, fn, cfg in provs:
        try:
            ms = bench_ms(fn, quick)
            res[name] = ms
            rec.add(case=case, provider=name, mode="fwd", dtype="bfloat16", x_name="T", x=T, p50=round(ms, 4),
                    rate=round(flops / ms / 1e9, 1) if not name.startswith("quant-kv") else "",
                    rate_unit="TFLOP/s (bf16 count)" if not name.startswith("quant-kv") else "",
                    extra=extra("statistic=median (do_bench)"))
        except Exception as e:  # reported, not fatal
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rec.add(case=case, provider=name, mode="fwd", dtype="bfloat16", x_name="T", x=T, status="error", extra=msg)
    return {n: flops / ms / 1e9 for n, ms in res.items()}


def probe(spec):
    """One small call per tile of one variant ``layout:head_dim:quant:head_split`` (dense or
    varlen), synchronising after each kernel: run it in its own process with
    CUDA_LAUNCH_BLOCKING=1 so that a fault names its kernel and tile (a fault ends the process)."""
    layout, D, quant, split = spec.split(":")
    D = int(D)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    H, Hkv, L, n = 16, 16, 2304, 2
    if layout == "varlen":
        q, k, v = (torch.randn(n * L, h, D, device=dev, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
        cu = torch.arange(0, n * L + 1, L, device=dev, dtype=torch.int32)
        args = (cu, cu, L, L)
    else:
        q, k, v = (torch.randn(n, L, h, D, device=dev, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
        args = (None, None, 0, 0)
    tq.quantize_kv_triton(k, v, quant, layout == "varlen", split)
    torch.cuda.synchronize()
    print(f"probe {spec}: quantisers ok", flush=True)
    for t in ((128, 128, 8, 3),):
        out, _ = tq.quant_attention_triton(q, k, v, quant, D ** -0.5, False, (-1, -1), *args, True,
                                           config=cfg_of(t), head_split=split)
        torch.cuda.synchronize()
        print(f"probe {spec}: attention {t} ok, finite {bool(torch.isfinite(out).all())}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", default=None, help="layout:head_dim:quant:head_split, e.g. varlen:72:int8:split")
    ap.add_argument("--vision-split", default=None, help="head_split of the vision case's quantised calls "
                    "(default: the kernels' QuantTiles.head_split)")
    ap.add_argument("--quick", action="store_true", help="16k text and the vision case only, fewer repeats")
    ap.add_argument("--sweep", action="store_true", help="time every tile of --tiles for the quantised kernels")
    ap.add_argument("--tiles", default=None, help="sweep tiles 'M,N,W,S;...' (default: a built-in list)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-vision", action="store_true")
    ap.add_argument("--seqlens", default=None, help="text lengths, e.g. 4096,16384")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    if args.probe:
        probe(args.probe)
        return
    dev = torch.device("cuda")
    t0 = time.time()
    tiles = SWEEP_TILES if args.tiles is None else \
        tuple(tuple(int(x) for x in s.split(",")) for s in args.tiles.split(";"))
    path = args.csv or results_csv(RESULTS, dev, out_dir=os.environ.get("OUT") or None)
    rec = Recorder(BENCH, path, device=dev)
    print(f"device {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; triton {triton.__version__}; "
          f"csv {path}", flush=True)
    ok = True if (args.no_check or args.skip_text) else checks(rec, dev)
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else \
        ([16384] if args.quick else [4096, 16384, 32768])
    table = {}
    for S in ([] if args.skip_text else seqlens):
        table[f"text S={S}"] = text_case(rec, dev, S, args.quick, args.sweep, tiles)
        torch.cuda.empty_cache()
    if not args.skip_vision and args.skip_text:
        table["vision 8x2304"] = vision_case(rec, dev, args.quick, args.sweep, tiles, vsplit=args.vision_split)
    elif not args.skip_vision:
        # in a process of its own: a kernel fault there (seen with head_split="split") kills the
        # CUDA context, and the text rows and table above are kept either way
        cmd = [sys.executable, os.path.abspath(__file__), "--skip-text", "--csv", path]
        cmd += ["--quick"] * args.quick + ["--sweep"] * args.sweep
        cmd += ["--tiles", args.tiles] if args.tiles else []
        cmd += ["--vision-split", args.vision_split] if args.vision_split else []
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            print(f"vision case: its process exited with {rc} (see above)")
            ok = False
    print("\nTFLOP/s (bf16 FLOP count), x = against cuDNN bf16 in the same run", flush=True)
    for case, res in table.items():
        base = res.get("sdpa-cudnn", res.get("sdpa-cudnn per-frame loop"))
        for name, rate in res.items():
            if name.startswith("quant-kv"):
                continue
            print(f"  {case:<16} {name:<34} {rate:8.1f}  {rate / base if base else float('nan'):5.2f}x")
    print(f"checks {'ok' if ok else 'FAILED'}; total {time.time() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
