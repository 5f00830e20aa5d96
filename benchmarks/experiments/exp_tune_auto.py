"""Experiment (issue 17, must-show): after ``qwen3vl-flash tune --quick``, is ``auto`` within 1.1x
of the faster of ``sdpa`` and ``tiled``? Text-8B attention (32/8 heads, head_dim 128, causal,
B=1) at S=2048, fp32 and bf16, forward and forward+backward, on the CPU.

Runs ``qf.tune(quick=True)`` into a fresh cache directory (``--cache-dir``; the user's own tuned
profile is left alone) and reports its wall time, then times ``sdpa``, ``tiled`` (with the tuned
profile's tiles) and ``auto`` in this one process, interleaved (round-robin, the starting
candidate rotating, median of ``--repeats``), and prints a table: auto's time over the faster of
the other two, which backend auto ran and which of the two was faster (where auto ran the same
backend, their ratio is the measurement's noise). The column ``by mode`` names the backend the tuned
per-mode order (``mode_orders``) picks, and its time over the faster one: what ``auto`` gives once
``TileProfile.order_for`` reads the mode. Rows (bench ``experiments/exp_tune_auto``) go to
``benchmarks/results/<device kind>.csv`` (``--csv PATH`` / ``--out DIR`` elsewhere).

    PYTHONPATH=src python3 benchmarks/experiments/exp_tune_auto.py [--repeats 7] [--csv /tmp/t.csv]

Timings on a machine shared with other work are noisy: say so next to any figure from one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
CASE = "text causal 32/8 hd128 B=1"
LIMIT = 1.1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default=None, help="where tune writes (default: a fresh temp folder)")
    ap.add_argument("--no-tune", action="store_true", help="use the tuned profile already in --cache-dir")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="write DIR/<device kind>.csv (default: benchmarks/results/)")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()
    os.environ["QWEN3VL_FLASH_CACHE_DIR"] = a.cache_dir or tempfile.mkdtemp(prefix="qwen3vl-flash-tune-")
    os.environ.pop("QWEN3VL_FLASH_TUNED", None)
    os.environ.pop("QWEN3VL_FLASH_PROFILE", None)
    os.environ.pop("QWEN3VL_FLASH_BACKEND", None)

    import qwen3vl_flash as qf
    from qwen3vl_flash.backends.base import AttnRequest
    from qwen3vl_flash.benchmarking import Recorder, extra, quantiles, results_csv
    from qwen3vl_flash.hardware import tuning
    from qwen3vl_flash.hardware.profiles import profile_for_device
    from qwen3vl_flash.interface import choose_backend

    cpu = torch.device("cpu")
    rec = Recorder("experiments/exp_tune_auto", a.csv or results_csv(RESULTS, "cpu", out_dir=a.out), device="cpu",
                   echo=False)
    if not a.no_tune:
        t0 = time.perf_counter()
        tuned = qf.tune(device="cpu", quick=True, progress=True)
        wall = time.perf_counter() - t0
        print(f"tune --quick: {wall:.1f} s wall ({tuned.elapsed_s:.1f} s measuring), {tuned.source}", flush=True)
        rec.add(case="tune --quick", provider="tune", mode="tune", metric="wall time", unit="s", p50=wall,
                extra=extra(measuring_s=tuned.elapsed_s, threads=torch.get_num_threads()))
    status = tuning.tuned_status(qf.detect_hardware(cpu))
    if status.state != "in use":
        print(f"no tuned profile in use: {status.describe()}", file=sys.stderr)
        return 1
    prof = profile_for_device(cpu)
    print(f"profile: {prof.name} ({status.describe()}); tiled {prof.block_m}x{prof.block_n}, "
          f"per dtype {prof.tiled_blocks}", flush=True)

    S, H, Hkv, D = a.seqlen, 32, 8, 128
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).replace("torch.", "")
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, S, h, D, generator=gen).to(dtype).requires_grad_(grad) for h in (H, Hkv, Hkv))
            dout = torch.randn(1, S, H, D, generator=gen).to(dtype)

            def run(backend, q=q, k=k, v=v, dout=dout, grad=grad):
                if not grad:
                    with torch.no_grad():
                        qf.flash_attn_func(q, k, v, causal=True, backend=backend)
                    return
                for t in (q, k, v):
                    t.grad = None
                qf.flash_attn_func(q, k, v, causal=True, backend=backend).backward(dout)

            req = AttnRequest(device_type="cpu", dtype=dtype, head_dim=D, num_heads=H, num_kv_heads=Hkv, seqlen_q=S,
                              seqlen_k=S, causal=True, need_grad=grad)
            auto_be = choose_backend(req, "auto", prof)[0].name
            by_mode = prof.mode_orders.get(mode, {}).get(dname, ("?",))[0]
            cands = ["sdpa", "tiled", "auto"]
            times = {c: [] for c in cands}
            for c in cands:
                run(c)  # warm-up
            for r in range(a.repeats):
                for c in cands[r % 3:] + cands[:r % 3]:
                    t0 = time.perf_counter()
                    run(c)
                    times[c].append((time.perf_counter() - t0) * 1e3)
            med = {c: statistics.median(t) for c, t in times.items()}
            best = min(med["sdpa"], med["tiled"])
            ratio, mode_ratio = med["auto"] / best, med.get(by_mode, float("nan")) / best
            rows.append((dname, mode, med["sdpa"], med["tiled"], med["auto"], auto_be, ratio, by_mode, mode_ratio))
            for c in cands:
                p20, p50, p80 = quantiles(times[c])
                rec.add(case=CASE, provider=c, mode=mode, dtype=dname, x_name="S", x=S, p20=p20, p50=p50, p80=p80,
                        extra=extra(auto_backend=auto_be if c == "auto" else "", auto_over_best=ratio if c == "auto"
                                    else "", profile=prof.name, repeats=a.repeats, threads=torch.get_num_threads()))
            print(f"  measured {dname} {mode}", flush=True)

    print(f"\n{CASE}, S={S}, CPU ({qf.detect_hardware(cpu).summary()}), {torch.get_num_threads()} threads, "
          f"median of {a.repeats} interleaved rounds")
    print(f"{'dtype':<9} {'mode':<8} {'sdpa ms':>9} {'tiled ms':>9} {'auto ms':>9} {'auto ran':>9} "
          f"{'the faster':>10} {'auto/best':>9} {'ok':>3}   {'by mode':>8} {'its/best':>8}")
    fails = 0
    for dname, mode, ts, tt, ta, be, ratio, bm, mratio in rows:
        ok = ratio <= LIMIT
        fails += not ok
        faster = "sdpa" if ts <= tt else "tiled"
        print(f"{dname:<9} {mode:<8} {ts:9.1f} {tt:9.1f} {ta:9.1f} {be:>9} {faster:>10} {ratio:9.2f} "
              f"{'yes' if ok else 'NO':>3}   {bm:>8} {mratio:8.2f}")
    print(f"\nauto within {LIMIT}x of the faster of sdpa and tiled: {len(rows) - fails}/{len(rows)} "
          "(timings on a shared machine are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
