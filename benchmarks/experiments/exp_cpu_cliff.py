"""Experiment (issue 17): the CPU's 16-bit cliff, the tiled workspace bound, tiled fp32 against SDPA.

Three parts, each printed as a table (``--csv PATH`` also appends rows in the
``qwen3vl_flash.benchmarking`` schema, bench ``experiments/exp_cpu_cliff``):

* ``cliff``: for each instruction set -- this CPU as it is, AVX-512 without BF16
  (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``) and the i5-10210U's AVX2 (``ATEN_CPU_CAPABILITY=avx2
  ONEDNN_MAX_CPU_ISA=AVX2``) -- set in a fresh subprocess before torch is imported. These are
  *emulations* on this machine's CPU (the same cores, caches and memory), not those CPUs. Each row:
  the probe's 16-bit / fp32 matmul ratio and its decision, the order ``auto`` takes for bf16,
  and the medians of interleaved forward / forward+backward times of ``tiled``, ``sdpa`` and
  ``auto`` in fp32 and bf16 (text 32/8 heads, hd128, causal, B=1, ``--S``), with the issue's two
  ratios: tiled bf16 fwd / tiled fp32 fwd (target <= 1.5) and auto bf16 fwd+bwd / PyTorch's own
  SDPA bf16 fwd+bwd (``torch-sdpa``: F.scaled_dot_product_attention as a user calls it; target
  <= 0.5). Our ``sdpa`` backend runs PyTorch's 16-bit CPU backward in fp32 since 2026-12-07, so
  it no longer shows the cliff of PyTorch's own kernel.
* ``memory``: the peak memory beyond its output of the tiled forward at B=2, S=4096, 32/8 heads,
  hd128, fp32, causal (torch.profiler's CPU allocation events), without a limit and with
  ``set_workspace_limit("48MiB")`` (target <= 96 MB), and whether the outputs are bitwise equal.
* ``fp32``: tiled fp32 forward time over SDPA's at S = 1k, 2k, 4k, interleaved in one process.

Timings taken on a shared machine are noisy; ``--threads 1`` is steadier where other work runs.

    PYTHONPATH=src python3 benchmarks/experiments/exp_cpu_cliff.py [--part all|cliff|memory|fp32]
        [--S 1024] [--repeats 5] [--threads N] [--csv PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ISAS = [  # name, environment (set before torch is imported)
    ("native", {}),
    ("avx512-no-bf16 (emulated)", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    ("avx2 i5-10210U ISA (emulated)", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
]
CASE = "text causal 32/8 hd128 B=1"


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, one warm-up each, then ``repeats`` rounds in turn."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def worker_cliff(S: int, repeats: int) -> dict:
    import torch

    import qwen3vl_flash as qf
    from qwen3vl_flash.hardware import cpu_probe

    torch.manual_seed(0)
    B, H, Hkv, D = 1, 32, 8, 128
    res = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    for dt in (torch.bfloat16, torch.float16):
        res[f"ratio_{dt}"] = cpu_probe.measure_ratio(dt)
    res["slow_bf16"] = cpu_probe.lowp_matmul_is_slow(torch.bfloat16)
    res["auto_bf16"] = list(qf.select_profile().order_for(torch.bfloat16, seqlen_k=S))
    fns = {}
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, S, h, D).to(dt) for h in (H, Hkv, Hkv))
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        do = torch.randn(B, S, H, D).to(dt)
        name = str(dt).replace("torch.", "")
        for be in ("tiled", "sdpa", "auto"):
            fns[f"fwd {be} {name}"] = (lambda q=q, k=k, v=v, be=be: qf.flash_attn_func(q, k, v, causal=True, backend=be))

            def fb(be=be, qg=qg, kg=kg, vg=vg, do=do):
                out = qf.flash_attn_func(qg, kg, vg, causal=True, backend=be)
                torch.autograd.grad(out, (qg, kg, vg), do)

            fns[f"fwd+bwd {be} {name}"] = fb
        if dt == torch.bfloat16:  # PyTorch's own SDPA, as a user calls it: (B, H, S, D), GQA in the kernel
            qt, kt, vt = (x.detach().transpose(1, 2).clone().requires_grad_() for x in (q, k, v))
            dot = do.transpose(1, 2).contiguous()

            def fb_torch(qt=qt, kt=kt, vt=vt, dot=dot):
                out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                torch.autograd.grad(out, (qt, kt, vt), dot)

            fns[f"fwd+bwd torch-sdpa {name}"] = fb_torch
    res["times"] = _interleaved(fns, repeats)
    return res


def worker_fp32(lengths, repeats: int) -> dict:
    import torch

    import qwen3vl_flash as qf

    torch.manual_seed(0)
    B, H, Hkv, D = 1, 32, 8, 128
    out = {}
    for S in lengths:
        q, k, v = (torch.randn(B, S, h, D) for h in (H, Hkv, Hkv))
        out[S] = _interleaved({be: (lambda be=be: qf.flash_attn_func(q, k, v, causal=True, backend=be))
                               for be in ("sdpa", "tiled")}, repeats)
    return out


def worker_memory() -> dict:
    import torch

    import qwen3vl_flash as qf
    from qwen3vl_flash.benchmarking import peak_extra_bytes

    torch.manual_seed(0)
    B, S, H, Hkv, D = 2, 4096, 32, 8, 128
    q, k, v = (torch.randn(B, S, h, D) for h in (H, Hkv, Hkv))
    res, outs = {}, {}
    for limit in (None, "48MiB"):
        previous = qf.set_workspace_limit(limit)
        box = {}
        try:
            t0 = time.perf_counter()
            peak = peak_extra_bytes(lambda: box.update(o=qf.flash_attn_func(q, k, v, causal=True, backend="tiled")))
            secs = time.perf_counter() - t0
        finally:
            qf.set_workspace_limit(previous)
        o = outs[limit] = box["o"]
        res[str(limit)] = {"peak": peak, "output": o.numel() * o.element_size(), "seconds": secs}
    res["bitwise_equal"] = bool(torch.equal(outs[None], outs["48MiB"]))
    return res


def _run_worker(part: str, env_extra: dict, args) -> dict:
    env = {**os.environ, **env_extra}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", part, "--S", str(args.S), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {part} {env_extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["all", "cliff", "memory", "fp32"])
    ap.add_argument("--S", type=int, default=1024, help="sequence length of the cliff part")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: unchanged)")
    ap.add_argument("--csv", default=None, help="append rows (benchmarking schema) to this CSV")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "cliff":
        print(json.dumps(worker_cliff(args.S, args.repeats)))
        return
    if args.worker == "fp32":
        print(json.dumps(worker_fp32((1024, 2048, 4096), args.repeats)))
        return
    if args.worker == "memory":
        print(json.dumps(worker_memory()))
        return

    rec = None
    if args.csv:
        from qwen3vl_flash.benchmarking import Recorder

        rec = Recorder("experiments/exp_cpu_cliff", args.csv, device="cpu", echo=False)
    print(f"exp_cpu_cliff: python {sys.version.split()[0]}, threads {args.threads or 'default'}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; timings on a shared machine are noisy")
    if args.part in ("all", "cliff"):
        print(f"\n## 16-bit cliff: {CASE}, S={args.S}, medians of {args.repeats} interleaved runs (ms)")
        cols = ["fwd tiled float32", "fwd tiled bfloat16", "fwd sdpa bfloat16", "fwd auto bfloat16",
                "fwd+bwd sdpa float32", "fwd+bwd tiled bfloat16", "fwd+bwd sdpa bfloat16", "fwd+bwd auto bfloat16",
                "fwd+bwd torch-sdpa bfloat16"]
        print("| ISA | bf16/fp32 matmul | fp16/fp32 | auto bf16 order | " + " | ".join(cols)
              + " | tiled bf16/fp32 fwd (<=1.5) | auto / PyTorch SDPA bf16 fwd+bwd (<=0.5) |")
        print("|" + "---|" * (len(cols) + 6))
        for isa, env in ISAS:
            r = _run_worker("cliff", env, args)
            t = {n: v * 1e3 for n, v in r["times"].items()}
            r1 = t["fwd tiled bfloat16"] / t["fwd tiled float32"]
            r2 = t["fwd+bwd auto bfloat16"] / t["fwd+bwd torch-sdpa bfloat16"]
            print(f"| {isa} ({r['capability']}, {r['threads']} thr) | {r['ratio_torch.bfloat16']:.1f}x"
                  f"{' slow' if r['slow_bf16'] else ''} | {r['ratio_torch.float16']:.1f}x | {'>'.join(r['auto_bf16'])} | "
                  + " | ".join(f"{t[c]:.0f}" for c in cols) + f" | {r1:.2f} | {r2:.2f} |", flush=True)
            if rec:
                for name, ms in t.items():
                    mode, provider, dtype = name.split()
                    rec.add(case=CASE, provider=provider, mode=mode, dtype=dtype, x_name="S", x=args.S, p50=ms,
                            extra=f"isa={isa}; bf16_matmul_ratio={r['ratio_torch.bfloat16']:.2f}")
    if args.part in ("all", "memory"):
        r = _run_worker("memory", {}, args)
        print("\n## tiled forward working memory: B=2 S=4096 32/8 hd128 fp32 causal (torch.profiler allocations)")
        print("| limit | peak extra | of it the output | beyond the output | time |")
        print("|---|---|---|---|---|")
        for limit in ("None", "48MiB"):
            m = r[limit]
            print(f"| {limit} | {m['peak'] / 1e6:.1f} MB | {m['output'] / 1e6:.1f} MB | "
                  f"{(m['peak'] - m['output']) / 1e6:.1f} MB | {m['seconds']:.2f} s |")
            if rec:
                rec.add(case="text causal 32/8 hd128 B=2", provider="tiled", mode="fwd", dtype="float32", x_name="S",
                        x=4096, metric="memory beyond output", unit="MB", p50=(m["peak"] - m["output"]) / 1e6,
                        extra=f"workspace_limit={limit}")
        print(f"outputs bitwise equal: {r['bitwise_equal']}")
    if args.part in ("all", "fp32"):
        r = _run_worker("fp32", {}, args)
        print(f"\n## tiled fp32 forward / SDPA fp32 forward, {CASE}, medians of {args.repeats} interleaved runs")
        print("| S | sdpa ms | tiled ms | tiled / sdpa (<=1.15) |")
        print("|---|---|---|---|")
        for S, t in r.items():
            print(f"| {S} | {t['sdpa'] * 1e3:.0f} | {t['tiled'] * 1e3:.0f} | {t['tiled'] / t['sdpa']:.2f} |")
            if rec:
                for be in ("sdpa", "tiled"):
                    rec.add(case=CASE, provider=be, mode="fwd", dtype="float32", x_name="S", x=int(S), p50=t[be] * 1e3)


if __name__ == "__main__":
    main()
