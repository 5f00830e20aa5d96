"""Decode (flash_attn_with_kvcache) benchmark: our split-KV Triton kernels vs PyTorch SDPA.

Qwen3-VL text shapes: 32 query / 8 kv heads, head_dim 128, bf16, one new token per step
(Snew = 1 appended in place by our kernels; SDPA only reads). Cases: B=1 at L = 4k / 32k / 128k,
B=1 with 4k keys in a 128k cache (a StaticCache), B=8 at 128k, and a ragged batch of 8 rows
mixing 1k..128k (SDPA must pad to the longest row).

Per case and provider (ours; SDPA cuDNN and flash with ``enable_gqa=True``):

* device time per call: ``triton.testing.do_bench`` (L2 flushed before each call; p20/p50/p80);
* device time per call inside a CUDA graph (``graph_reps`` calls on rotating K/V buffers, so that
  short caches are not served from L2);
* host time per call: a loop of calls without synchronising (``time.perf_counter``); for SDPA also
  with the KV length changing every call, as in real decoding;
* KV read bandwidth = bytes of K and V the rows really have / time (padding not counted);
* correctness of ours against ``qwen3vl_flash.reference`` at the same shapes (2x rule), the direct
  launch against Triton's launcher (bitwise), and graph replay against eager (bitwise).

Rows (``qwen3vl_flash.benchmarking`` schema, bench ``bench_decode``: one row per measured
quantity, metric ``time`` (do_bench), ``graph time``, ``host time``, ``host time, L varying``; the
correctness figures in ``extra``) are appended to ``benchmarks/results/<gpu kind>.csv`` (or
``--csv``) as each case finishes; a short table is printed last.

    PYTHONPATH=src python3 benchmarks/bench_decode.py             # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/bench_decode.py --smoke   # CPU code-path check
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from qwen3vl_flash.backends import triton_decode as td
from qwen3vl_flash.backends.base import AttnParams
from qwen3vl_flash.benchmarking import Recorder, do_bench_quantiles, extra, results_csv
from qwen3vl_flash.hardware.profiles import profile_for_device
from qwen3vl_flash.reference import attention_ref

K = 1024
CASES = [  # (name, per-row lengths, cache capacity)
    ("B1-L4k", [4 * K], 4 * K + 16),
    ("B1-L32k", [32 * K], 32 * K + 16),
    ("B1-L128k", [128 * K], 128 * K + 16),
    ("B1-L4k-in-128k-cache", [4 * K], 128 * K + 16),
    ("B8-L128k", [128 * K] * 8, 128 * K + 16),
    ("B8-ragged-1k..128k", [128 * K, 1 * K, 64 * K, 4 * K, 16 * K, 2 * K, 32 * K, 8 * K], 128 * K + 16),
]
SMOKE_CASES = [
    ("B1-L200", [200], 216),
    ("B3-ragged", [150, 3, 64], 216),
]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# the measured quantities of a row of this script -> (metric, percentile keys, rate key)
METRICS = [
    ("time", ("us_p20", "us_p50", "us_p80"), "tbps"),
    ("graph time", (None, "graph_us", None), "graph_tbps"),
    ("host time", (None, "host_us", None), None),
    ("host time, L varying", (None, "host_us_varying_L", None), None),
]


def schema_rows(r: dict, dtype: str):
    """One row of this script (a case x provider x mode with its timings) as rows of the
    benchmark schema: one per measured quantity; a row that measured nothing (an error) as one."""
    def val(key):  # nan (a float here, a string in an archived CSV) is "not measured"
        v = r.get(key, "") if key else ""
        return "" if str(v) == "nan" else v

    ok = r.get("ok", "")
    status = "ok" if str(ok) in ("", "True") else "FAILED"
    if str(r.get("note", "")).startswith(("Error", "Runtime", "Value", "Type", "NotImpl", "Assert")):
        status = "error"
    ex = extra(B=r.get("B"), L_max=r.get("L_max"), L_sum=r.get("L_sum"), kv_bytes=r.get("kv_bytes"),
               max_err=r.get("max_err"), torch_err=r.get("torch_err"), ok=ok, note=r.get("note"))
    base = dict(case=r["case"], provider=r["provider"], mode=r["mode"], dtype=dtype, x_name="L" if "L_max" in r else "",
                x=r.get("L_max", ""), status=status, extra=ex)
    out = []
    for metric, keys, rate in METRICS:
        p = [val(k) for k in keys]
        if p[1] == "":
            continue
        out.append(dict(base, metric=metric, unit="us", p20=p[0], p50=p[1], p80=p[2], rate=val(rate),
                        rate_unit="TB/s" if rate else ""))
    return out or [dict(base, metric="time", unit="us")]


class Case:
    def __init__(self, name, lens, cap, H, Hkv, D, dtype, device, n_rot):
        self.name, self.lens, self.cap = name, lens, cap
        self.B, self.H, self.Hkv, self.D = len(lens), H, Hkv, D
        B = self.B
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
        self.q = mk(B, 1, H, D)
        self.kn, self.vn = mk(B, 1, Hkv, D), mk(B, 1, Hkv, D)
        # rotating K/V buffers: a short cache would otherwise sit in L2 between graph replays
        self.kc = [mk(B, cap, Hkv, D) for _ in range(n_rot)]
        self.vc = [mk(B, cap, Hkv, D) for _ in range(n_rot)]
        self.seqlens = torch.tensor([n - 1 for n in lens], dtype=torch.int32, device=device)  # + 1 appended
        self.L_max, self.L_sum = max(lens), sum(lens)
        self.kv_bytes = self.L_sum * Hkv * D * 2 * self.q.element_size()
        self.p = AttnParams(1.0 / math.sqrt(D), True, profile=profile_for_device(self.q.device))


# --------------------------------------------------------------------------------------------
# providers: each returns fn(i) running call number i on rotating buffer i % n_rot
# --------------------------------------------------------------------------------------------


def ours(c: Case):
    def fn(i=0):
        r = i % len(c.kc)
        return td.decode_attention(c.q, c.kc[r], c.vc[r], c.kn, c.vn, c.seqlens, c.p)[0]

    return fn


def ours_public(c: Case):
    import qwen3vl_flash as qf

    def fn(i=0):
        r = i % len(c.kc)
        return qf.flash_attn_with_kvcache(c.q, c.kc[r], c.vc[r], c.kn, c.vn, cache_seqlens=c.seqlens,
                                          backend="triton")

    return fn


def sdpa(c: Case, backend_name: str, masked: bool, contiguous: bool = False):
    """SDPA over the padded (B, L_max) cache, K/V heads first: strided views of our cache, or
    (``contiguous``, when a kernel refuses the views) copies made outside the timed call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, backend_name)
    q = c.q.transpose(1, 2)  # (B, H, 1, D)
    mask = None
    if masked:  # key-padding mask for the ragged rows
        pos = torch.arange(c.L_max, device=q.device)
        mask = (pos[None, :] < torch.tensor(c.lens, device=q.device)[:, None]).view(c.B, 1, 1, c.L_max)
    kv = [(kc[:, : c.L_max].transpose(1, 2), vc[:, : c.L_max].transpose(1, 2)) for kc, vc in zip(c.kc, c.vc)]
    if contiguous:
        kv = [(k.contiguous(), v.contiguous()) for k, v in kv]

    def fn(i=0, L=None):
        k, v = kv[i % len(kv)]  # (B, Hkv, L_max, D)
        if L is not None:
            k, v = k[:, :, :L], v[:, :, :L]
        with sdpa_kernel(be):
            m = None if mask is None else mask[..., : k.shape[2]]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

    return fn


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def device_us(fn, cuda: bool):
    if cuda:
        return [x * 1e3 for x in do_bench_quantiles(lambda: fn(0), warmup=25, rep=200)]
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn(0)
        ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return [ts[0], ts[1], ts[2]]


def graph_us(fn, n_rot: int, reps: int):
    """Device µs per call, replaying a CUDA graph of ``reps`` calls over the rotating buffers."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_rot):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(i) for i in range(reps)]
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times), graph, outs


def host_us(fn, cuda: bool, n: int = 0, vary=None):
    """Host µs per call: ``n`` calls without synchronising (the GPU queue absorbs them); by
    default 200 on a GPU, 3 on the CPU (the interpreter: a code-path check)."""
    n = n or (200 if cuda else 3)
    for i in range(3):
        fn(i) if vary is None else fn(i, vary(i))
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        fn(i) if vary is None else fn(i, vary(i))
    dt = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
    return dt / n * 1e6


def check_ours(c: Case, out: torch.Tensor):
    """max|out - ref| and torch's own bf16 error, per row over the row's real keys (2x rule)."""
    err = base = 0.0
    kc, vc = c.kc[0], c.vc[0]
    for b, L in enumerate(c.lens):
        k, v = kc[b : b + 1, :L], vc[b : b + 1, :L]
        qb = c.q[b : b + 1]
        ref = attention_ref(qb.float(), k.float(), v.float(), causal=True)
        low = attention_ref(qb, k, v, causal=True, upcast=False)
        err = max(err, (out[b : b + 1].float() - ref).abs().max().item())
        base = max(base, (low.float() - ref).abs().max().item())
        del k, v, ref, low
    return err, base, err <= 2 * base + 8e-3


# --------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter code-path check)")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        H, Hkv, D, dtype, cases = 8, 2, 64, torch.bfloat16, SMOKE_CASES
    else:
        H, Hkv, D, dtype, cases = 32, 8, 128, torch.bfloat16, CASES
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split(",")]
    rec = Recorder("bench_decode", args.csv or results_csv(RESULTS, device, args.smoke, "bench_decode"),
                   device=device, echo=False)
    env = rec.env
    rows = []

    def keep(r):
        rows.append(r)
        for sr in schema_rows(r, "bfloat16"):
            rec.add(**sr)

    def row(c, provider, mode, **kw):
        r = dict(case=c.name, provider=provider, mode=mode, B=c.B, L_max=c.L_max, L_sum=c.L_sum, kv_bytes=c.kv_bytes)
        r.update(kw)
        keep(r)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

    for name, lens, cap in cases:
        per_buf = len(lens) * cap * Hkv * D * 2 * 2
        n_rot = max(1, min(8, math.ceil(160e6 / per_buf))) if cuda else 1
        c = Case(name, lens, cap, H, Hkv, D, dtype, device, n_rot)
        tb = lambda us: c.kv_bytes / (us * 1e-6) / 1e12 if us and us > 0 else float("nan")  # noqa: E731

        # -- ours: correctness first (also warms up and compiles)
        fn = ours(c)
        out = fn(0)
        err, base, ok = check_ours(c, out)
        note = ""
        if cuda:  # the direct launch against Triton's own launcher, bitwise
            td.FAST_LAUNCH = False
            td._PLANS.clear()
            slow = fn(0)
            td.FAST_LAUNCH = True
            td._PLANS.clear()
            fn(0)
            fast = fn(0)
            same = torch.equal(fast, slow)
            ok = ok and same
            note = f"fast==slow:{same}"
        p = device_us(fn, cuda)
        g_us = host_fast = host_slow = host_pub = float("nan")
        if cuda:
            g_us, graph, gouts = graph_us(fn, n_rot, reps=max(n_rot, 8))
            eager = fn(0)
            same = torch.equal(gouts[0], eager)
            ok = ok and same
            note += f" graph==eager:{same}"
            del graph, gouts
        host_fast = host_us(fn, cuda)
        if cuda:
            td.FAST_LAUNCH = False
            td._PLANS.clear()
            host_slow = host_us(fn, cuda)
            td.FAST_LAUNCH = True
            td._PLANS.clear()
            fn(0)
        os.environ["QWEN3VL_FLASH_CHECK_VALUES"] = "0"  # the public API's value checks synchronise
        try:
            pub = ours_public(c)
            pub(0)
            host_pub = host_us(pub, cuda)
        except Exception as exc:  # noqa: BLE001
            note += f" public API: {type(exc).__name__}: {exc}"[:200]
        finally:
            os.environ.pop("QWEN3VL_FLASH_CHECK_VALUES", None)
        row(c, "triton", "split-kv", us_p20=p[0], us_p50=p[1], us_p80=p[2], tbps=tb(p[1]), graph_us=g_us,
            graph_tbps=tb(g_us), host_us=host_fast, max_err=err, torch_err=base, ok=ok, note=note.strip())
        row(c, "triton", "host:triton-launcher", host_us=host_slow)
        row(c, "triton", "host:public-api(checks off)", host_us=host_pub)
        del out

        # -- SDPA over the padded cache
        if cuda:
            ragged = len(set(lens)) > 1
            for be_name in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
                for masked in ((True, False) if ragged else (False,)):
                    mode = ("padded+mask" if masked else "padded, no mask") if ragged else "dense"
                    f = None
                    for contiguous in (False, True):
                        try:
                            f = sdpa(c, be_name, masked, contiguous)
                            o = f(0)
                            torch.cuda.synchronize()
                            mode += ", contiguous K/V copy" if contiguous else ""
                            break
                        except Exception as exc:  # noqa: BLE001
                            f, err_note = None, f"{type(exc).__name__}: {exc}"[:160]
                            torch.cuda.synchronize()
                    if f is None:
                        row(c, f"sdpa-{be_name.split('_')[0].lower()}", mode, note=err_note)
                        continue
                    sp = device_us(f, cuda)
                    try:
                        sg = graph_us(f, n_rot, reps=max(n_rot, 8))[0]
                    except Exception:  # noqa: BLE001
                        sg = float("nan")
                        torch.cuda.synchronize()
                    h = host_us(f, cuda)
                    hv = host_us(f, cuda, vary=lambda i: c.L_max - (i % 64)) if not masked else float("nan")
                    row(c, f"sdpa-{be_name.split('_')[0].lower()}", mode, us_p20=sp[0], us_p50=sp[1], us_p80=sp[2],
                        tbps=tb(sp[1]), graph_us=sg, graph_tbps=tb(sg), host_us=h, host_us_varying_L=hv)
                    del o
        del c
        if cuda:
            torch.cuda.empty_cache()

    # -- variants (same run): fused vs separate merge, split heuristic, tiles, at latency-bound shapes
    if cuda:
        variants = [
            ("fused merge (default)", {}),
            ("separate merge kernel", {"fuse_merge_max_rows": 0}),
            ("waves=4 min_chunk=128", {"waves": 4, "min_chunk": 128}),
            ("waves=1", {"waves": 1}),
            ("min_chunk=512", {"min_chunk": 512}),
            ("block_n=32 stages=4", {"block_n": {128: 32}, "num_stages": 4}),
            ("block_n=128 stages=2", {"block_n": {128: 128}, "num_stages": 2}),
            ("block_n=64 stages=4", {"num_stages": 4}),
            ("num_warps=8", {"num_warps": 8}),
            ("num_warps=2", {"num_warps": 2}),
        ]
        for name, lens, cap in CASES[:2]:
            per_buf = len(lens) * cap * Hkv * D * 2 * 2
            n_rot = max(1, min(8, math.ceil(160e6 / per_buf)))
            c = Case(name, lens, cap, H, Hkv, D, dtype, device, n_rot)
            base_prof = c.p.profile
            for label, over in variants:
                prof = base_prof.replace(name=f"tune-{label}", triton=base_prof.triton.replace(decode=base_prof.triton.decode.replace(**over)))
                c.p = AttnParams(c.p.softmax_scale, True, profile=prof)
                fn = ours(c)
                try:
                    fn(0)
                    p = device_us(fn, cuda)
                    g = graph_us(fn, n_rot, reps=max(n_rot, 8))[0]
                except Exception as exc:  # noqa: BLE001
                    row(c, "triton", f"tune {label}", note=f"{type(exc).__name__}: {exc}"[:160])
                    continue
                ns = td.num_splits(Hkv, cap, H // Hkv, td._num_sms(device), td._tiles(c.p))
                row(c, "triton", f"tune {label} (splits={ns})", us_p20=p[0], us_p50=p[1], us_p80=p[2],
                    tbps=c.kv_bytes / (p[1] * 1e-6) / 1e12, graph_us=g, graph_tbps=c.kv_bytes / (g * 1e-6) / 1e12)
            del c
        # host floor of this machine: what three allocations and one plain launch cost
        x = torch.empty(1, device=device)
        h_alloc = host_us(lambda i=0: [torch.empty((4096,), device=device) for _ in range(3)], cuda)
        h_add = host_us(lambda i=0: x.add_(1), cuda)
        keep(dict(case="host-floor", provider="torch", mode="3x torch.empty", host_us=h_alloc))
        keep(dict(case="host-floor", provider="torch", mode="x.add_(1)", host_us=h_add))
        print(f"host floor: 3x torch.empty {h_alloc:.1f} us, x.add_(1) {h_add:.1f} us")

    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, {env['date']}; "
          "32/8 heads hd128 bf16, Snew=1" if not args.smoke else f"\nsmoke ({env['device']})")
    print(f"{'case':24} {'provider':14} {'mode':30} {'us p50':>8} {'TB/s':>6} {'graph us':>9} {'TB/s':>6} "
          f"{'host us':>8} {'host varL':>9} ok")
    fmt = lambda x, s: (f"{x:{s}}" if isinstance(x, float) and not math.isnan(x) else f"{'-':>{s.split('.')[0]}}")  # noqa: E731
    for r in rows:
        if str(r["mode"]).startswith("host:") or r["case"] == "host-floor":
            continue
        print(f"{r['case']:24} {r['provider']:14} {str(r['mode'])[:30]:30} {fmt(r.get('us_p50', ''), '8.1f')} "
              f"{fmt(r.get('tbps', ''), '6.2f')} {fmt(r.get('graph_us', ''), '9.1f')} {fmt(r.get('graph_tbps', ''), '6.2f')} "
              f"{fmt(r.get('host_us', ''), '8.1f')} {fmt(r.get('host_us_varying_L', ''), '9.1f')} {r.get('ok', '')}")
    for r in rows:
        if str(r["mode"]).startswith("host:") or r["case"] == "host-floor":
            print(f"{r['case']:24} host us/call, {r['mode']}: {fmt(r.get('host_us', ''), '6.1f')}")
    print(f"rows appended to {rec.path}")
    return 0 if all(r.get("ok", True) is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
