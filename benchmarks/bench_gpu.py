"""Our Triton FA2 kernels against PyTorch SDPA (flash / cuDNN / efficient) on one GPU, same run.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py                     # on the GPU: results/<gpu>.csv
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --csv $OUT/h200.csv # elsewhere (a lent machine)
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_gpu.py --smoke   # CPU, tiny shapes: typo check

Steps: (1) correctness at full shapes against qwen3vl_flash.reference (2x/3x rule); (2) a short
tile sweep for the forward and backward; (3) the table: text causal 32q/8kv hd128 S=1k..32k,
vision hd72 16 heads (dense 16k and varlen 8 frames, SDPA as a per-frame loop), split vs padded
head dim, causal block order; (4) peak extra memory at 32k. Times: triton.testing.do_bench
median (p20/p80 beside it). TFLOP/s = ``attention_flops`` (4*B*H*Sq*Sk*D, /2 causal, x2.5
fwd+bwd) at the median. Rows (``qwen3vl_flash.benchmarking`` schema, bench ``bench_gpu``; the tile
in ``extra``) are appended to ``benchmarks/results/<gpu kind>.csv`` as they are measured.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from qwen3vl_flash.backends.triton_bwd import attention_backward  # noqa: E402
from qwen3vl_flash.backends.triton_fwd import attention_forward  # noqa: E402
from qwen3vl_flash.benchmarking import (  # noqa: E402
    Recorder,
    attention_flops,
    do_bench_quantiles,
    extra,
    results_csv,
    tflops,
    tile_str,
    tiles,
)
from qwen3vl_flash.reference import attention_ref, attention_ref_varlen  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NAN3 = (float("nan"),) * 3


def bench(fn, smoke):
    """(p20, p50, p80) ms (do_bench); in a smoke run one call and nan."""
    if smoke:
        fn()
        return NAN3
    return do_bench_quantiles(fn, warmup=25, rep=100)


def timed(ps, fl):
    """The timing columns of a row: percentiles and TFLOP/s at the median."""
    return dict(p20=ps[0], p50=ps[1], p80=ps[2], rate=tflops(fl, ps[1]), rate_unit="TFLOP/s")


def failed(exc):
    return f"failed: {type(exc).__name__}: {str(exc)[:60]}"


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------


def ours_fwd(q, k, v, causal, cfg, split="split", reverse=None, varlen=None):
    scale = q.shape[-1] ** -0.5
    if varlen is None:
        return lambda: attention_forward(q, k, v, scale, causal, config=cfg, head_split=split, reverse_m=reverse)
    cu, mx = varlen
    return lambda: attention_forward(q, k, v, scale, causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                     max_seqlen_k=mx, config=cfg, head_split=split, reverse_m=reverse)


def ours_fwdbwd(q, k, v, do, causal, cfg, bcfg, dqcfg=None, split="split", varlen=None):
    scale = q.shape[-1] ** -0.5
    kw = {} if varlen is None else dict(cu_seqlens_q=varlen[0], cu_seqlens_k=varlen[0],
                                        max_seqlen_q=varlen[1], max_seqlen_k=varlen[1])

    def run():
        o, lse = attention_forward(q, k, v, scale, causal, config=cfg, head_split=split, **kw)
        return attention_backward(do, q, k, v, o, lse, scale, causal, config=bcfg, config_dq=dqcfg,
                                  head_split=split, **kw)

    return run


SDPA_KINDS = ("flash", "cudnn", "efficient")


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def sdpa_fn(kind, q, k, v, causal, mode, do=None):
    """q (B,S,H,D) -> SDPA on (B,H,S,D) views; GQA: K/V repeated beforehand (outside the timing)
    because not every SDPA kernel takes enable_gqa."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    H, Hkv = q.shape[2], k.shape[2]
    qt = q.transpose(1, 2).contiguous().detach().requires_grad_(mode != "fwd")
    kt = k.repeat_interleave(H // Hkv, 2).transpose(1, 2).contiguous().detach().requires_grad_(mode != "fwd")
    vt = v.repeat_interleave(H // Hkv, 2).transpose(1, 2).contiguous().detach().requires_grad_(mode != "fwd")
    dot = None if do is None else do.transpose(1, 2).contiguous()
    be = sdpa_backend(kind)

    def run():
        with sdpa_kernel([be]):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            if mode != "fwd":
                torch.autograd.grad(o, (qt, kt, vt), dot)
            return o

    return run


def sdpa_varlen_loop(kind, q, k, v, lens, mode, do=None):
    """The vision tower without a varlen kernel: one SDPA call per frame."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    be = sdpa_backend(kind)
    frames, start = [], 0
    for L in lens:
        sl = slice(start, start + L)
        start += L
        frames.append(tuple(t[sl].transpose(0, 1).unsqueeze(0).contiguous().detach().requires_grad_(mode != "fwd")
                            for t in (q, k, v)) + ((None if do is None else do[sl].transpose(0, 1).unsqueeze(0).contiguous()),))

    def run():
        with sdpa_kernel([be]):
            for qf, kf, vf, dof in frames:
                o = F.scaled_dot_product_attention(qf, kf, vf)
                if mode != "fwd":
                    torch.autograd.grad(o, (qf, kf, vf), dof)

    return run


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------


def rand(*shape, dtype, dev):
    return torch.randn(*shape, dtype=dtype, device=dev)


def check_correct(dev, dtype, smoke, log):
    """Full-shape correctness (2x rule out, 3x grads) for the shapes we time."""
    S = 256 if smoke else 2048
    cases = [  # (B, Sq, Sk, H, Hkv, D, causal, window)
        (1, S, S, 32, 8, 128, True, (-1, -1)),
        (1, S // 2 + 3, S + 7, 16, 1, 72, True, (-1, -1)),
        (2, S // 2, S // 2, 16, 16, 80, False, (-1, -1)),
        (1, S // 2, S // 2, 8, 2, 96, False, (200, 31)),
        (1, S // 4, S // 4, 4, 4, 256, True, (-1, -1)),
    ]
    if smoke:
        cases = [(1, 48, 70, 4, 2, 72, True, (-1, -1)), (1, 40, 40, 2, 1, 128, False, (7, 3))]
    ok = True
    for B, Sq, Sk, H, Hkv, D, causal, window in cases:
        q, k, v = rand(B, Sq, H, D, dtype=dtype, dev=dev), rand(B, Sk, Hkv, D, dtype=dtype, dev=dev), rand(B, Sk, Hkv, D, dtype=dtype, dev=dev)
        do = rand(B, Sq, H, D, dtype=dtype, dev=dev)
        scale = D ** -0.5
        o, lse = attention_forward(q, k, v, scale, causal, window)
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, scale, causal, window)
        res = []
        for up in (True, False):
            ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
            r = attention_ref(ql, kl, vl, scale, causal, window, upcast=up)
            g = torch.autograd.grad(r, (ql, kl, vl), do)
            res.append((r,) + g)
        msgs = []
        for name, ours, factor, atol in (("out", o, 2, 1e-3), ("dq", dq, 3, 1e-2), ("dk", dk, 3, 1e-2), ("dv", dv, 3, 1e-2)):
            i = ("out", "dq", "dk", "dv").index(name)
            err = (ours.float() - res[0][i].float()).abs().max().item()
            base = (res[1][i].float() - res[0][i].float()).abs().max().item()
            good = err <= factor * base + atol and torch.isfinite(ours).all().item()
            ok &= good
            msgs.append(f"{name} {err:.2e}/{base:.2e}{'' if good else ' FAIL'}")
        log(f"check B{B} {Sq}x{Sk} H{H}/{Hkv} D{D} causal={causal} win={window}: " + ", ".join(msgs))
        del q, k, v, do, o, dq, dk, dv, res
    # varlen hd72, vision-like frames incl. an empty one
    lens = [37, 0, 300, 129] if smoke else [1000, 0, 3136, 777]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    T = sum(lens)
    q, k, v = (rand(T, 16, 72, dtype=dtype, dev=dev) for _ in range(3))
    o, lse = attention_forward(q, k, v, 72 ** -0.5, False, cu_seqlens_q=cu, cu_seqlens_k=cu,
                               max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    r = attention_ref_varlen(q, k, v, cu, cu)
    lo = attention_ref_varlen(q, k, v, cu, cu, upcast=False)
    err, base = (o.float() - r.float()).abs().max().item(), (lo.float() - r.float()).abs().max().item()
    good = err <= 2 * base + 1e-3
    ok &= good
    log(f"check varlen hd72 frames {lens}: out {err:.2e}/{base:.2e}{'' if good else ' FAIL'}")
    return ok


FWD_SWEEP = tiles((128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3))
BWD_SWEEP = tiles((64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 128, 4, 2), (64, 128, 4, 3), (32, 64, 4, 3))


def sweep(rec, case, S, make, configs, fl, smoke, mode):
    best, best_ms = None, math.inf
    for cfg in configs:
        try:
            ps = bench(make(cfg), smoke)
        except Exception as exc:  # out of shared memory / registers
            rec.add(case=case, x_name="S", x=S, provider="triton-sweep", mode=mode, dtype="bfloat16",
                    status=f"failed: {type(exc).__name__}", extra=extra(tile=tile_str(cfg)))
            continue
        rec.add(case=case, x_name="S", x=S, provider="triton-sweep", mode=mode, dtype="bfloat16", **timed(ps, fl),
                extra=extra(tile=tile_str(cfg)))
        if ps[1] < best_ms or best is None:
            best, best_ms = cfg, ps[1]
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter typo check)")
    ap.add_argument("--csv", default=None, help="rows appended here (default: benchmarks/results/<gpu kind>.csv; "
                    "a smoke run: $OUT or the temp folder)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: check,sweep,text,vision,mem")
    args = ap.parse_args()
    smoke = args.smoke
    skip = set(filter(None, args.skip.split(",")))
    dev = "cpu" if smoke else "cuda"
    dtype = torch.bfloat16
    rec = Recorder("bench_gpu", args.csv or results_csv(RESULTS, dev, smoke, "bench_gpu"), device=dev)
    gpu = rec.env["device"]
    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True)  # noqa: E731
    log(f"device {gpu}, torch {torch.__version__}; rows to {rec.path}")

    def add(case, x, provider, mode, ps=None, fl=None, cfg=None, x_name="S", status="ok", note=""):
        cols = timed(ps, fl) if ps is not None else {}
        rec.add(case=case, x_name=x_name, x=x, provider=provider, mode=mode, dtype="bfloat16", status=status,
                extra=extra(tile=tile_str(cfg), note=note), **cols)

    if "check" not in skip:
        ok = check_correct(dev, dtype, smoke, log)
        rec.add(case="correctness (2x out / 3x grads)", provider="triton", mode="check", dtype="bfloat16",
                metric="check", unit="", status="PASS" if ok else "FAIL")

    text = [256] if smoke else [1024, 4096, 16384, 32768]
    H, Hkv, D = (4, 2, 128) if smoke else (32, 8, 128)
    text_case = f"text causal {H}/{Hkv} hd{D} B=1"
    fwd_cfg = bwd_cfg = None
    if smoke:
        fwd_cfg = bwd_cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    else:  # the profile's measured tiles, unless the sweep below replaces them
        from qwen3vl_flash.hardware.profiles import profile_for_device

        tri = profile_for_device(torch.device("cuda")).triton
        fwd_cfg, bwd_cfg = (t.as_config() if t is not None else None for t in (tri.fwd, tri.bwd))

    # -- tile sweep at S=4k (16k for the forward too), picks the configs used below
    if "sweep" not in skip and not smoke:
        S = 4096
        q, k, v, do = rand(1, S, H, D, dtype=dtype, dev=dev), rand(1, S, Hkv, D, dtype=dtype, dev=dev), rand(1, S, Hkv, D, dtype=dtype, dev=dev), rand(1, S, H, D, dtype=dtype, dev=dev)
        fwd_cfg = sweep(rec, text_case, S, lambda c: ours_fwd(q, k, v, True, c), FWD_SWEEP,
                        attention_flops(1, H, S, S, D, True, "fwd"), smoke, "fwd")
        bwd_cfg = sweep(rec, text_case, S, lambda c: ours_fwdbwd(q, k, v, do, True, fwd_cfg, c), BWD_SWEEP,
                        attention_flops(1, H, S, S, D, True, "fwd+bwd"), smoke, "fwd+bwd")
        log(f"chosen fwd {tile_str(fwd_cfg)}, bwd {tile_str(bwd_cfg)}")
        del q, k, v, do

    if "text" not in skip:
        for S in text:
            q, k, v = rand(1, S, H, D, dtype=dtype, dev=dev), rand(1, S, Hkv, D, dtype=dtype, dev=dev), rand(1, S, Hkv, D, dtype=dtype, dev=dev)
            do = rand(1, S, H, D, dtype=dtype, dev=dev)
            modes = ["fwd"] + (["fwd+bwd"] if S <= 16384 else [])
            s_cfg = fwd_cfg
            if not smoke and "sweep" in skip:  # the profile's tile for this length (fwd_long_hd128 from 8k)
                from qwen3vl_flash.backends.triton_backend import _config_dict, _config_list

                s_cfg = _config_dict(_config_list(profile_for_device(torch.device("cuda")), "fwd", D, S)) or fwd_cfg
            for mode in modes:
                fl = attention_flops(1, H, S, S, D, True, mode)
                fn = ours_fwd(q, k, v, True, s_cfg) if mode == "fwd" else ours_fwdbwd(q, k, v, do, True, s_cfg, bwd_cfg)
                add(text_case, S, "triton", mode, bench(fn, smoke), fl, s_cfg if mode == "fwd" else bwd_cfg)
                if mode == "fwd" and S == 16384 and not smoke:  # causal block order
                    ps = bench(ours_fwd(q, k, v, True, fwd_cfg, reverse=False), smoke)
                    add(text_case, S, "triton natural order", mode, ps, fl, fwd_cfg)
                if smoke:
                    continue
                for kind in SDPA_KINDS:
                    try:
                        add(text_case, S, f"sdpa-{kind}", mode, bench(sdpa_fn(kind, q, k, v, True, mode, do), smoke), fl,
                            note="K/V repeated")
                    except Exception as exc:
                        add(text_case, S, f"sdpa-{kind}", mode, status=failed(exc))
                torch.cuda.empty_cache()
            del q, k, v, do

    if "vision" not in skip:
        Hv, Dv = (4, 72) if smoke else (16, 72)
        # dense S=16k, split vs padded head dim
        S = 128 if smoke else 16384
        q, k, v, do = (rand(1, S, Hv, Dv, dtype=dtype, dev=dev) for _ in range(4))
        case = f"vision hd72 {Hv}h dense"
        for mode in ("fwd", "fwd+bwd"):
            fl = attention_flops(1, Hv, S, S, Dv, False, mode)
            for split in ("split", "pad"):
                fn = ours_fwd(q, k, v, False, fwd_cfg, split) if mode == "fwd" else ours_fwdbwd(q, k, v, do, False, fwd_cfg, bwd_cfg, split=split)
                add(case, S, f"triton {split}", mode, bench(fn, smoke), fl, fwd_cfg if mode == "fwd" else bwd_cfg)
            if not smoke:
                for kind in SDPA_KINDS:
                    try:
                        add(case, S, f"sdpa-{kind}", mode, bench(sdpa_fn(kind, q, k, v, False, mode, do), smoke), fl)
                    except Exception as exc:
                        add(case, S, f"sdpa-{kind}", mode, status=failed(exc))
        del q, k, v, do
        # varlen: 8 frames, ~18k tokens
        lens = [40, 70, 33, 64, 50, 20, 90, 61] if smoke else [1024, 4096, 2048, 3136, 1600, 2304, 1936, 2000]
        T = sum(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
        q, k, v, do = (rand(T, Hv, Dv, dtype=dtype, dev=dev) for _ in range(4))
        case = f"vision hd72 {Hv}h varlen 8 frames"
        for mode in ("fwd", "fwd+bwd"):
            fl = sum(attention_flops(1, Hv, L, L, Dv, False, mode) for L in lens)
            fn = ours_fwd(q, k, v, False, fwd_cfg, varlen=(cu, max(lens))) if mode == "fwd" else ours_fwdbwd(q, k, v, do, False, fwd_cfg, bwd_cfg, varlen=(cu, max(lens)))
            add(case, T, "triton varlen", mode, bench(fn, smoke), fl, fwd_cfg if mode == "fwd" else bwd_cfg, x_name="T")
            if not smoke:
                for kind in SDPA_KINDS:
                    try:
                        ps = bench(sdpa_varlen_loop(kind, q, k, v, lens, mode, do), smoke)
                        add(case, T, f"sdpa-{kind} per-frame loop", mode, ps, fl, x_name="T")
                    except Exception as exc:
                        add(case, T, f"sdpa-{kind} per-frame loop", mode, x_name="T", status=failed(exc))
        del q, k, v, do

    if "mem" not in skip and not smoke:
        S = 32768
        q, k, v = rand(1, S, H, D, dtype=dtype, dev=dev), rand(1, S, Hkv, D, dtype=dtype, dev=dev), rand(1, S, Hkv, D, dtype=dtype, dev=dev)
        io = sum(t.numel() * t.element_size() for t in (q, k, v)) * 1 + q.numel() * q.element_size()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        o, lse = attention_forward(q, k, v, D ** -0.5, True, config=fwd_cfg)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        rec.add(case=text_case, x_name="S", x=S, provider="triton", mode="fwd", dtype="bfloat16", metric="peak memory",
                unit="", memory_mb=peak / 2**20, extra=extra(
                    tile=tile_str(fwd_cfg), inputs_outputs_mib=io / 2**20,
                    ratio=(peak + io - q.numel() * q.element_size()) / io,
                    note="peak incl. out+lse; ratio = (peak + inputs) / (inputs + outputs)"))
        del o, lse

    print("\n=== summary (bf16, median ms, TFLOP/s) on", gpu, "===")
    for r in rec.rows:
        if r["provider"] != "triton-sweep":
            Recorder.print_row(r)
    log("done")


if __name__ == "__main__":
    main()
