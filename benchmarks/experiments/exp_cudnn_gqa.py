"""GPU experiment: can the ring's cuDNN blocks skip their two copies, and what would that save?

1. GQA: does aten's cuDNN attention (``_scaled_dot_product_cudnn_attention`` and its backward)
   take K/V with fewer heads than Q as they are, instead of K/V repeated to every query head
   (our ``cudnn`` backend repeats them, then sums dK/dV back over the group)?
2. Row slices: does it take half-row views of (B, S, H, D) tensors (what the ring cuts from its
   shards) as they are, instead of contiguous copies?

For each, the outputs/gradients against the current path (max |diff|), and the time and peak
memory of both. Prints a table; rows (``qwen3vl_flash.benchmarking`` schema, bench
``experiments/exp_cudnn_gqa``: per case the fwd and bwd time and peak of both paths, the diffs in
``extra``) are appended to ``benchmarks/results/<gpu kind>.csv`` (or ``--csv``).

    PYTHONPATH=src python3 benchmarks/experiments/exp_cudnn_gqa.py [--csv $OUT/h200.csv]
"""

import argparse
import os

import torch

from qwen3vl_flash.backends.cudnn import _heads_first as hf
from qwen3vl_flash.backends.cudnn import _repeat_kv, _sum_group, cudnn_backward_op, cudnn_forward_op
from qwen3vl_flash.benchmarking import Recorder, extra, results_csv

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
DIFFS = ("out_diff", "lse_diff", "dq_diff", "dk_diff", "dv_diff", "dk_shape")


def schema_rows(r):
    """One row of this script (a case at one S: both paths' times and peaks, the diffs) as rows
    of the benchmark schema; also used on the archived CSV."""
    gqa = r["case"] == "gqa"
    case = "cudnn GQA 32/8 hd128 causal B=1" if gqa else "cudnn half-row views 32/32 hd128 full B=1"
    variants = (("cudnn K/V repeated", "_copy"), ("cudnn GQA K/V as is", "")) if gqa else \
        (("cudnn contiguous copy", "_copy"), ("cudnn strided views", ""))
    diffs = extra(**{k: r.get(k, "") for k in DIFFS}, note="diffs: the second provider against the first")
    out = []
    for provider, suffix in variants:
        for mode in ("fwd", "bwd"):
            ms = r.get(f"{mode}_ms{suffix}", "")
            if ms == "":
                continue
            out.append(dict(case=case, provider=provider, mode=mode, dtype="bfloat16", x_name="S", x=int(r["S"]),
                            p50=ms, memory_mb=r.get(f"{mode}_mb{suffix}", ""), status=r["status"],
                            extra=extra("statistic=median of 20", diffs if not suffix else "")))
    return out


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def peak(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def md(a, b):
    return (a.float() - b.float()).abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None, help="default: benchmarks/results/<gpu kind>.csv")
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, H, Hkv, D = 1, 32, 8, 128
    g = H // Hkv
    scale = D ** -0.5
    rows = []
    for S in (8192, 32768):
        torch.manual_seed(S)
        q, dout = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16) for _ in range(2))

        def f_rep():
            return cudnn_forward_op(hf(q), hf(_repeat_kv(k, g)), hf(_repeat_kv(v, g)), True, scale)

        def f_gqa():
            return cudnn_forward_op(hf(q), hf(k), hf(v), True, scale)

        out_r, lse_r = f_rep()

        def b_rep():
            dq, dk, dv = cudnn_backward_op(hf(dout), hf(q), hf(_repeat_kv(k, g)), hf(_repeat_kv(v, g)), out_r, lse_r,
                                           True, scale)
            return dq, _sum_group(dk.transpose(1, 2), g), _sum_group(dv.transpose(1, 2), g)

        dq_r, dk_r, dv_r = b_rep()
        row = dict(case="gqa", S=S, fwd_ms_copy=timed(f_rep), bwd_ms_copy=timed(b_rep),
                   fwd_mb_copy=peak(f_rep), bwd_mb_copy=peak(b_rep))
        try:
            out_n, lse_n = f_gqa()

            def b_gqa():
                return cudnn_backward_op(hf(dout), hf(q), hf(k), hf(v), out_n, lse_n, True, scale)

            dq_n, dk_n, dv_n = b_gqa()
            row.update(status="ok", out_diff=md(out_n, out_r), lse_diff=md(lse_n, lse_r), dq_diff=md(dq_n, dq_r),
                       dk_diff=md(dk_n.transpose(1, 2), dk_r), dv_diff=md(dv_n.transpose(1, 2), dv_r),
                       dk_shape=tuple(dk_n.shape), fwd_ms=timed(f_gqa), bwd_ms=timed(b_gqa),
                       fwd_mb=peak(f_gqa), bwd_mb=peak(b_gqa))
        except Exception as e:  # noqa: BLE001 - the point is to see whether it runs
            row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        rows.append(row)

        # half-row views: the last S/2 queries (rank 0's second zigzag chunk) against every key
        h = S // 2
        kr, vr = _repeat_kv(k, g), _repeat_kv(v, g)
        qv, dv_ = q[:, h:], dout[:, h:]

        def f_copy():
            return cudnn_forward_op(hf(qv.contiguous()), hf(kr), hf(vr), False, scale)

        def f_view():
            return cudnn_forward_op(hf(qv), hf(kr), hf(vr), False, scale)

        o_c, l_c = f_copy()
        row = dict(case="half-row views", S=S, fwd_ms_copy=timed(f_copy), fwd_mb_copy=peak(f_copy))
        try:
            o_v, l_v = f_view()
            ob = o_c.transpose(1, 2)[:, :]  # (B, S/2, H, D) view of the copy path's output
            full_out = torch.empty_like(q)
            full_out[:, h:] = ob

            def b_copy():
                return cudnn_backward_op(hf(dv_.contiguous()), hf(qv.contiguous()), hf(kr), hf(vr),
                                         hf(full_out[:, h:].contiguous()), l_c, False, scale)

            def b_view():
                return cudnn_backward_op(hf(dv_), hf(qv), hf(kr), hf(vr), hf(full_out[:, h:]), l_c, False, scale)

            g_c, g_v = b_copy(), b_view()
            row.update(status="ok", out_diff=md(o_v, o_c), lse_diff=md(l_v, l_c), dq_diff=md(g_v[0], g_c[0]),
                       dk_diff=md(g_v[1], g_c[1]), dv_diff=md(g_v[2], g_c[2]), fwd_ms=timed(f_view),
                       bwd_ms_copy=timed(b_copy), bwd_ms=timed(b_view), fwd_mb=peak(f_view),
                       bwd_mb_copy=peak(b_copy), bwd_mb=peak(b_view))
        except Exception as e:  # noqa: BLE001
            row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        rows.append(row)
    keys = ["case", "S", "status", *DIFFS[:-1], "fwd_ms_copy", "fwd_ms", "bwd_ms_copy", "bwd_ms", "fwd_mb_copy",
            "fwd_mb", "bwd_mb_copy", "bwd_mb", "dk_shape"]
    rec = Recorder("experiments/exp_cudnn_gqa", args.csv or results_csv(RESULTS, dev), device=dev, echo=False)
    for r in rows:
        for sr in schema_rows(r):
            rec.add(**sr)
    print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version())
    for r in rows:
        print("  ".join(f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}" for k in keys
                        if k in r))


if __name__ == "__main__":
    main()
