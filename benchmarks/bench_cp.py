"""Context-parallel attention on several GPUs: ring vs Ulysses vs all-gather (vs hybrid), against
one GPU and against PyTorch's own ``context_parallel`` (prototype), forward + backward.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 benchmarks/bench_cp.py                  # issue 6
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=8 benchmarks/bench_cp.py \\
        --seqlens 131072,262144,524288 --modes ring,ulysses,hybrid --no-torch-cp         # issue 7

What one run measures (causal, bf16 by default, B=1), every time a median of ``--iters`` timed
fwd+bwd calls after ``--warmup``, the slowest rank counted:

* ``ours-1gpu``: ``flash_attn_func`` (Triton) on the full sequence on rank 0 alone; GQA 32/8.
* ``ours-<mode>``: ``context_parallel_attn(mode=<mode>)`` on each rank's zigzag shard; GQA 32/8.
* the MHA comparison (32/32 heads, the shape PyTorch's numbers in DESIGN.md were taken on):
  ``ours-1gpu-mha``, ``ours-<mode>-mha``, ``torch-1gpu-{cudnn,flash}`` (SDPA on one GPU) and
  ``torch-cp-{cudnn,flash}`` (``torch.distributed.tensor.experimental.context_parallel`` around
  SDPA with that kernel, its default head-tail load balancing).
* ``--max-len``: the longest sequence (in steps of ``--len-step``) whose fwd+bwd fits on one GPU
  and on all of them (ours, GQA), by trying lengths until CUDA runs out of memory (an OOM on one
  rank mid-ring can leave the other waiting in NCCL: set ``--pg-timeout``).
* ``--max-len-fit``: the same question answered from the peak memory at three short lengths
  (linear fit), then one check at 95% of the prediction; no try is meant to run out of memory.
  ``--max-len-modes`` may name ``1gpu:triton`` for a second one-GPU baseline with that kernel.

Efficiency = T(1 GPU, full S) / (W * T(W GPUs)). Rows (``qwen3vl_flash.benchmarking`` schema,
bench ``bench_cp``, ``world`` = GPUs; the CP mode, efficiency and NCCL version in ``extra``) are
appended to ``benchmarks/results/<gpu kind>.csv`` (or ``--csv``); a table is printed. Nothing here
runs on CPU: it needs W CUDA GPUs (``--device cpu`` is a gloo smoke run of the logic).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from qwen3vl_flash.benchmarking import (  # noqa: E402
    Recorder,
    attention_flops,
    env_row,
    extra,
    other_versions,
    quantiles,
    results_csv,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def schema_row(r: Dict) -> Dict:
    """One row of this script as a row of the benchmark schema (also used on the archived CSVs)."""
    prov, status = r["provider"], str(r.get("status", ""))
    out = dict(case=f"causal {r['H']}/{r['Hkv']} hd{r['D']} B={r['B']}", provider=prov, dtype=r["dtype"],
               world=r["world"], mode="fwd+bwd", x_name="S", x=r["seqlen"], unit="ms", status=status)
    ex = dict(cp_mode=r["mode"], efficiency=r.get("efficiency"))
    if prov.startswith("check-"):
        st, _, errs = status.partition(" errs ")
        out.update(mode="check", metric="check", unit="", status=st)
        ex["errs_out_dq_dk_dv"] = errs
    elif prov.startswith("max-len"):
        out.update(metric="max length", unit="tokens", p50=r["seqlen"], x_name="", x="")
        if status.startswith("checked"):  # max-len-fit: predicted, then one try
            out["status"], ex["check"] = ("ok" if status.endswith(": fits") else "does not fit"), status
    else:
        rate = r.get("tflops_per_gpu", "")
        out.update(p20=r.get("p20_ms", ""), p50=r.get("p50_ms", ""), p80=r.get("p80_ms", ""), rate=rate,
                   rate_unit="" if rate in (None, "") else "TFLOP/s per GPU")
    if r.get("peak_gb") not in (None, ""):
        out["memory_mb"] = float(r["peak_gb"]) * 1024
    out["extra"] = extra(**ex, nccl=r.get("nccl"))
    return out


DEV = torch.device("cuda")  # --device cpu: a gloo smoke run of the script's logic, not a benchmark


def _cuda() -> bool:
    return DEV.type == "cuda"


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], warmup: int, iters: int, group_wide: bool = True) -> List[float]:
    """Milliseconds per call; with ``group_wide`` every rank runs and the slowest rank counts."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        if group_wide:
            dist.barrier()
        _sync()
        if _cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        t = torch.tensor(ms, device=DEV)
        if group_wide:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return times


class Bench:
    def __init__(self, args):
        self.args = args
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.dtype = getattr(torch, args.dtype)
        self.rows: List[Dict] = []
        self.env = env_row(DEV)
        self.meta = {"nccl": other_versions("nccl").partition("=")[2]}  # in every row (extra)
        self.baselines: Dict[tuple, float] = {}

    # ---- one measurement -------------------------------------------------------------------
    def record(self, provider, mode, S, H, Hkv, fn_factory, world: int, baseline_key=None, group_wide=True):
        a = self.args
        row = dict(provider=provider, mode=mode, world=world, B=a.batch, seqlen=S, H=H, Hkv=Hkv, D=a.head_dim,
                   dtype=a.dtype, causal=True, **self.meta)
        if _cuda():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        status, ts = "ok", None
        try:
            fn = fn_factory()
            ts = _time(fn, a.warmup, a.iters, group_wide)
            del fn
        except torch.cuda.OutOfMemoryError:
            status = "oom"
        except Exception as e:  # a prototype API that changed, a kernel that cannot run, ...
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if group_wide:  # every rank agrees on the status (an OOM on one rank is an OOM)
            bad = torch.tensor(0 if status == "ok" else 1, device=DEV)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() and status == "ok":
                status = "failed on another rank"
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if _cuda() else 0.0
        row["status"] = status
        if status == "ok":
            p20, p50, p80 = quantiles(ts)
            row.update(p20_ms=round(p20, 3), p50_ms=round(p50, 3), p80_ms=round(p80, 3))
            flops = attention_flops(a.batch, H, S, S, a.head_dim, True, "fwd+bwd")
            row["tflops_per_gpu"] = round(flops / world / (p50 * 1e-3) / 1e12, 1)
            if world == 1 and baseline_key is not None:
                self.baselines[baseline_key] = p50
            elif baseline_key is not None and baseline_key in self.baselines:
                row["efficiency"] = round(self.baselines[baseline_key] / (world * p50), 3)
        self.rows.append(row)
        log(f"  {provider:<22} S={S:>7} {H}/{Hkv}  {row.get('p50_ms', '-'):>9} ms  "
            f"eff {row.get('efficiency', '-')}  peak {row['peak_gb']} GB  {status}")
        return row

    # ---- the pieces --------------------------------------------------------------------------
    def _qkv_local(self, S_local, H, Hkv):
        a, dev = self.args, DEV
        mk = lambda h: torch.randn(a.batch, S_local, h, a.head_dim, device=dev, dtype=self.dtype)
        q, k, v = mk(H).requires_grad_(), mk(Hkv).requires_grad_(), mk(Hkv).requires_grad_()
        return q, k, v, mk(H)

    def ours_1gpu(self, S, H, Hkv, tag):
        import qwen3vl_flash as qf

        def factory():
            q, k, v, do = self._qkv_local(S, H, Hkv)

            def fn():
                q.grad = k.grad = v.grad = None
                qf.flash_attn_func(q, k, v, causal=True, backend=self.args.backend).backward(do)
            return fn
        self._rank0_only(f"ours-1gpu{tag}", "1gpu", S, H, Hkv, factory, ("ours", S, H, Hkv))

    def ours_cp(self, S, H, Hkv, mode, tag, kernel="auto"):
        from qwen3vl_flash.parallel import context_parallel_attn

        def factory():
            q, k, v, do = self._qkv_local(S // self.world, H, Hkv)

            def fn():
                q.grad = k.grad = v.grad = None
                context_parallel_attn(q, k, v, causal=True, mode=mode, backend=kernel).backward(do)
            return fn
        name = f"ours-{mode}" + ("" if kernel == "auto" else f"-{kernel}") + tag
        self.record(name, mode, S, H, Hkv, factory, self.world, ("ours", S, H, Hkv))

    def check(self, S, H, Hkv, modes, kernels):
        """Correctness before timing: every (mode, kernel) against fp32 attention on the full
        sequence (same seed on every rank), beside the one-GPU bf16 call's own error."""
        import qwen3vl_flash as qf
        from qwen3vl_flash.parallel import context_parallel_attn, shard
        from qwen3vl_flash.reference import attention_ref

        a = self.args
        g = torch.Generator(device="cpu").manual_seed(1234)
        full = [torch.randn(a.batch, S, h, a.head_dim, generator=g).to(DEV, self.dtype) for h in (H, Hkv, Hkv, H)]
        q, k, v, do = full

        def grads(fn, *xs):
            xs = [x.detach().clone().requires_grad_() for x in xs]
            out = fn(*xs)
            out.backward(do_of(out))
            return [out.detach().float()] + [x.grad.float() for x in xs]

        do_of = lambda out: do.to(out.dtype)  # noqa: E731
        ref = grads(lambda q_, k_, v_: attention_ref(q_.float(), k_.float(), v_.float(), causal=True), q, k, v)
        one = grads(lambda q_, k_, v_: qf.flash_attn_func(q_, k_, v_, causal=True), q, k, v)
        names = ["out", "dq", "dk", "dv"]
        base = [(x - r).abs().max().item() for x, r in zip(one, ref)]
        log(f"check S={S} {H}/{Hkv}: one-GPU {a.dtype} error vs fp32: " +
            " ".join(f"{n} {e:.2e}" for n, e in zip(names, base)))
        sh = lambda x: shard(x, 1, layout="zigzag")  # noqa: E731
        ref_sh = [sh(x) for x in ref]
        for mode in modes:
            for kernel in kernels:
                do_of = lambda out: sh(do).to(out.dtype)  # noqa: E731
                try:
                    got = grads(lambda q_, k_, v_: context_parallel_attn(q_, k_, v_, causal=True, mode=mode,
                                                                         backend=kernel), sh(q), sh(k), sh(v))
                    errs = [(x - r).abs().max() for x, r in zip(got, ref_sh)]
                    errs = torch.stack(errs)
                    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
                    errs = errs.tolist()
                    ok = all(e <= 3 * b + 1e-3 for e, b in zip(errs, base))
                    status = "ok" if ok else "FAILED (> 3x the one-GPU error)"
                except Exception as e:  # a kernel that cannot serve this mode
                    errs, status = [float("nan")] * 4, f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                log(f"  {mode:<9} {kernel:<7} " + " ".join(f"{n} {e:.2e}" for n, e in zip(names, errs)) + f"  {status}")
                self.rows.append(dict(provider=f"check-{mode}-{kernel}", mode=mode, world=self.world, B=a.batch,
                                      seqlen=S, H=H, Hkv=Hkv, D=a.head_dim, dtype=a.dtype, causal=True,
                                      status=status + " errs " + ",".join(f"{e:.2e}" for e in errs), **self.meta))

    def torch_1gpu(self, S, H, kernel):
        def factory():
            a, dev = self.args, DEV
            q, k, v, do = (torch.randn(a.batch, H, S, a.head_dim, device=dev, dtype=self.dtype) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()
            return _sdpa_step(q, k, v, do, kernel)
        self._rank0_only(f"torch-1gpu-{kernel}", "1gpu", S, H, H, factory, ("torch", kernel, S, H))

    def torch_cp(self, S, H, kernel):
        """PyTorch's prototype: ``context_parallel`` shards the buffers in place and swaps SDPA for
        its ring implementation inside the context."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh(DEV.type, (self.world,))
        a, dev = self.args, DEV
        q, k, v, do = (torch.randn(a.batch, H, S, a.head_dim, device=dev, dtype=self.dtype) for _ in range(4))
        holder = {}

        def factory():
            ctx = context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2],
                                   no_restore_buffers={q, k, v, do})
            ctx.__enter__()
            holder["ctx"] = ctx
            for t in (q, k, v):
                t.requires_grad_()
            return _sdpa_step(q, k, v, do, kernel)
        try:
            self.record(f"torch-cp-{kernel}", "torch-cp", S, H, H, factory, self.world, ("torch", kernel, S, H))
        finally:
            if "ctx" in holder:
                holder["ctx"].__exit__(None, None, None)

    def _rank0_only(self, provider, mode, S, H, Hkv, factory, key):
        """One-GPU baselines run on rank 0 while the others wait; the result is shared."""
        if self.rank == 0:
            row = self.record(provider, mode, S, H, Hkv, factory, 1, key, group_wide=False)
            p50 = row.get("p50_ms", float("nan"))
        else:
            p50 = float("nan")
        t = torch.tensor(p50, device=DEV, dtype=torch.float64)
        dist.broadcast(t, 0)
        if t.item() == t.item():
            self.baselines[key] = t.item()

    # ---- longest sequence ----------------------------------------------------------------------
    def max_len(self, H, Hkv, modes):
        """Longest global sequence (multiple of ``--len-step``) whose fwd+bwd fits: doubling from
        ``--len-step`` until a length fails, then bisection between the last fit and the first
        failure. Memory and compute both grow with the batch, the sequence with neither, so a
        larger ``--batch`` finds a shorter length sooner; the ratio multi-GPU / one-GPU is what
        the issue asks for."""
        a = self.args
        results = {}
        for label, world, runner, kern in self._max_len_labels(modes):

            def fits(S):
                ok = self._fits_everywhere(S, H, Hkv, world, runner, kern)
                log(f"    {label}: S={S} {'fits' if ok else 'out of memory'}")
                return ok

            step = _len_step(a.len_step, world)
            good, bad = 0, None
            S = step
            while S <= a.len_limit:
                if fits(S):
                    good, S = S, S * 2
                else:
                    bad = S
                    break
            if bad is not None:
                while bad - good > step:
                    mid = (good + bad) // 2 // step * step
                    if mid <= good:
                        break
                    if fits(mid):
                        good = mid
                    else:
                        bad = mid
            results[label] = good
            log(f"  longest fwd+bwd that fits, {label}: {good} tokens (B={a.batch})")
        for label, best in results.items():
            self.rows.append(dict(provider=f"max-len-{label}", mode=label, world=1 if label.startswith("1gpu") else self.world,
                                  B=a.batch, seqlen=best, H=H, Hkv=Hkv, D=a.head_dim, dtype=a.dtype, causal=True,
                                  status="ok", **self.meta))
        if results.get("1gpu"):
            for label, best in results.items():
                if not label.startswith("1gpu"):
                    log(f"  {label}: {best / results['1gpu']:.2f}x the one-GPU length")
        return results

    def max_len_fit(self, H, Hkv, modes):
        """Longest sequence predicted from measured peaks, then checked once: the peak memory of
        fwd+bwd at three short lengths (which fit), fitted by ``peak = a + b * S`` (memory is
        linear in S here), gives S_max = (usable - a) / b, where usable = free memory + what
        PyTorch holds (after emptying its cache); the slowest rank counts. One try at 95% of the
        prediction then checks it. Unlike ``max_len``, no try is meant to run out of memory: an
        out-of-memory error on one rank in the middle of a ring step leaves the other waiting in
        NCCL (what stopped the bisection searches on 2 x H200)."""
        a = self.args
        results = {}
        labels = self._max_len_labels(modes)
        world_of = {lab: w for lab, w, _, _ in labels}.get
        for label, world, runner, kern in labels:
            step = _len_step(a.len_step, world)
            xs, peaks, usable = [], [], None
            for f in (2, 4, 8):
                S = step * f
                fn = self._once(S, H, Hkv, world, runner, kern)
                pk, us = self._peak_bytes(fn, S)
                t = torch.tensor([pk, -us], device=DEV, dtype=torch.float64)
                if world == 1:
                    dist.broadcast(t, 0)
                else:
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the largest peak, the smallest usable
                xs.append(S)
                peaks.append(t[0].item())
                usable = -t[1].item() if usable is None else min(usable, -t[1].item())
                log(f"    {label}: S={S} peak {peaks[-1] / 2**30:.2f} GiB (usable {usable / 2**30:.1f} GiB)")
            s_pred = predict_max_len(xs, peaks, usable)
            s_try = int(a.fit_check * s_pred) // step * step
            ok = self._fits_everywhere(s_try, H, Hkv, world, runner, kern) if s_try > 0 else False
            log(f"  {label}: predicted longest {s_pred:,.0f} tokens (B={a.batch}); "
                f"{s_try:,} {'fits' if ok else 'DOES NOT FIT'}")
            results[label] = (s_pred, s_try, ok)
            self.rows.append(dict(provider=f"max-len-fit-{label}", mode=label, world=world, B=a.batch,
                                  seqlen=int(s_pred), H=H, Hkv=Hkv, D=a.head_dim, dtype=a.dtype, causal=True,
                                  peak_gb=round(peaks[-1] / 2**30, 3),
                                  status=f"checked {s_try}: {'fits' if ok else 'out of memory'}", **self.meta))
        base = next(iter(results))  # the one-GPU baseline comes first
        for label, (s_pred, s_try, ok) in results.items():
            if world_of(label) > 1 and results[base][0]:
                log(f"  {label}: {s_pred / results[base][0]:.2f}x the one-GPU length ({base}, predicted)")
        return results

    def _max_len_labels(self, modes):
        """(label, world, mode, kernel) per searched setup: the one-GPU baseline first; a mode
        "1gpu:<kernel>" is one more one-GPU baseline with that kernel, "ring:triton" a ring with
        Triton blocks. With ``--model``, "model-1gpu" and "model-cp" instead: the Qwen3-VL text
        decoder on one GPU, and context-parallel over all (``qf.enable(model, context_parallel=)``)."""
        if self.args.model:
            return [("model-1gpu", 1, "model", None), ("model-cp", self.world, "model", None)]
        out = [("1gpu", 1, None, None)]
        for m in modes:
            out.append((m, 1 if m.startswith("1gpu") else self.world, m, m.partition(":")[2] or None))
        return out

    def _peak_bytes(self, fn, S: int):
        """(peak bytes allocated during fn, bytes PyTorch could use); (0, inf) where fn is None.
        On CPU (a smoke run of the code path) fn runs but the memory is synthetic: 1 KB per token
        of a 1 MB budget."""
        if fn is None:
            return 0.0, float("inf")
        if not _cuda():
            fn()
            return 1024.0 * S, float(2**20)
        _sync()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
        usable = free + torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        return float(peak), float(usable)

    def _once(self, S, H, Hkv, world, runner, kernel=None):
        """One fwd+bwd at global length S for a setup of :meth:`_max_len_labels`; None on the
        ranks that sit out a one-GPU setup."""
        if world == 1 and self.rank != 0:
            return None
        if runner == "model":
            return lambda: self.model_once(S, world)
        if world == 1:
            return lambda: self.ours_1gpu_once(S, H, Hkv, kernel)
        return lambda: self.ours_cp_once(S, H, Hkv, runner)

    def _fits_everywhere(self, S, H, Hkv, world, runner, kernel=None) -> bool:
        fn = self._once(S, H, Hkv, world, runner, kernel)
        ok = torch.tensor(int(self._fits(fn)) if fn is not None else 0, device=DEV)
        if world == 1:
            dist.broadcast(ok, 0)
        else:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _fits(self, fn) -> bool:
        if _cuda():
            torch.cuda.empty_cache()
        try:
            fn()
            _sync()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if _cuda():
                torch.cuda.empty_cache()

    def ours_1gpu_once(self, S, H, Hkv, backend=None):
        import qwen3vl_flash as qf

        q, k, v, do = self._qkv_local(S, H, Hkv)
        qf.flash_attn_func(q, k, v, causal=True, backend=backend or self.args.backend).backward(do)

    def profile(self, S, H, Hkv, mode, kernel):
        """Where the time of one context-parallel fwd+bwd goes (rank 0's view): GPU kernels by
        total time over 3 iterations, beside the one-GPU call at the same length, and how much of
        the wall time the GPU was busy."""
        from torch.profiler import ProfilerActivity, profile

        import qwen3vl_flash as qf
        from qwen3vl_flash.parallel import context_parallel_attn

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda() else [])

        def run(fn, n=3):
            for _ in range(2):
                fn()
            _sync()
            dist.barrier()
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                _sync()
                wall = (time.perf_counter() - t0) / n * 1e3
            return prof, wall

        q, k, v, do = self._qkv_local(S // self.world, H, Hkv)

        def cp():
            q.grad = k.grad = v.grad = None
            context_parallel_attn(q, k, v, causal=True, mode=mode, backend=kernel).backward(do)
        prof, wall = run(cp)
        del q, k, v, do
        if self.rank == 0:
            from torch.autograd import DeviceType

            gpu = sum(e.self_device_time_total for e in prof.key_averages()
                      if e.device_type == DeviceType.CUDA) / 3 / 1e3  # kernels only, not the ops above them
            log(f"profile {mode}/{kernel} S={S} {H}/{Hkv}: wall {wall:.2f} ms per fwd+bwd; GPU kernels {gpu:.2f} ms "
                f"(summed over all streams, NCCL included)")
            log(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
            q1, k1, v1, do1 = self._qkv_local(S, H, Hkv)

            def one():
                q1.grad = k1.grad = v1.grad = None
                qf.flash_attn_func(q1, k1, v1, causal=True, backend=self.args.backend).backward(do1)
            for _ in range(2):
                one()
            _sync()
            with profile(activities=acts) as p1:
                for _ in range(3):
                    one()
                _sync()
            log(f"profile 1gpu S={S}:")
            log(p1.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=70))
        dist.barrier()

    def _text_model(self):
        """The Qwen3-VL text decoder of ``--model`` dimensions (``--model-layers`` layers, random
        bf16 weights, train mode), built once per rank."""
        if getattr(self, "_model", None) is None:
            import qwen3vl_flash as qf
            from qwen3vl_flash.testing import tiny

            if self.args.model == "tiny":  # the CPU smoke run
                cfg = tiny.tiny_config(layers=self.args.model_layers, num_heads=4, num_kv_heads=2, head_dim=8)
            else:
                cfg = tiny.real_config(self.args.model, layers=self.args.model_layers)
            full = tiny.build_model(cfg, qf.ATTN_IMPLEMENTATION, dtype=self.dtype, seed=3, device=DEV)
            self._model = full.model.language_model.train()
            self._hidden = cfg.text_config.hidden_size
        return self._model

    def model_once(self, S, world):
        """Training-style fwd+bwd of the text decoder on a sequence of S tokens (batch
        ``--batch``; embeddings in, the sum of the last hidden states as the loss: no LM head):
        on one GPU, or sharded zigzag over all ranks with the attention context-parallel."""
        import qwen3vl_flash as qf
        from qwen3vl_flash.parallel import shard

        model = self._text_model()
        a = self.args
        qf.enable(model, context_parallel=dist.group.WORLD if world > 1 else None)
        pos = torch.arange(S, device=DEV).view(1, 1, S).expand(3, a.batch, S)
        S_loc = S
        if world > 1:
            pos = shard(pos, seq_dim=2)
            S_loc = S // world
        emb = torch.randn(a.batch, S_loc, self._hidden, device=DEV, dtype=self.dtype)
        try:
            model(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state.sum().backward()
        finally:
            model.zero_grad(set_to_none=True)

    def ours_cp_once(self, S, H, Hkv, mode):
        from qwen3vl_flash.parallel import context_parallel_attn

        mode, _, kernel = mode.partition(":")  # "ring" or "ring:triton"
        q, k, v, do = self._qkv_local(S // self.world, H, Hkv)
        context_parallel_attn(q, k, v, causal=True, mode=mode, backend=kernel or "auto").backward(do)


def _len_step(step: int, world: int) -> int:
    """The length step of a search or fit: ``--len-step`` rounded up to a multiple of 2 * world
    (zigzag cuts the sequence into 2 * world chunks), so one and several GPUs share lengths."""
    m = 2 * world if world > 1 else 1
    return -(-step // m) * m


def predict_max_len(xs: List[float], peaks: List[float], usable: float) -> float:
    """Least-squares line ``peak = a + b * S`` through the measured points, solved for
    ``peak = usable``; 0 if the peak does not grow with S."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(peaks) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, peaks)) / sxx if sxx else 0.0
    if b <= 0:
        return 0.0
    return max(0.0, (usable - (my - b * mx)) / b)


def _sdpa_step(q, k, v, do, kernel: str):
    """One causal fwd+bwd of PyTorch SDPA with ``kernel`` forced, on (B, H, S, D) tensors."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def fn():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel([_sdpa_backend(kernel)]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    return fn


def _sdpa_backend(kernel: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]


def parse(argv=None):
    p = argparse.ArgumentParser(description="context-parallel attention benchmark (torchrun, CUDA)")
    p.add_argument("--seqlens", default="32768,65536,131072")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a gloo smoke run of this script (tiny --seqlens), not a measurement")
    p.add_argument("--modes", default="ring,ulysses,allgather", help="comma list; hybrid needs >= 4 GPUs")
    p.add_argument("--backend", default="auto", help="one-GPU kernel for ours-1gpu (auto: cuDNN via sdpa on H100)")
    p.add_argument("--kernels", default="auto,triton",
                   help="per-block kernels for the context-parallel rows (auto = cudnn on CUDA, then triton)")
    p.add_argument("--check-len", type=int, default=8192, help="sequence length of the correctness check (0: skip)")
    p.add_argument("--no-mha", action="store_true", help="skip the 32/32-head comparison with PyTorch")
    p.add_argument("--no-torch-cp", action="store_true", help="skip PyTorch's context_parallel rows")
    p.add_argument("--torch-kernels", default="cudnn,flash")
    p.add_argument("--max-len", action="store_true", help="also search the longest sequence that fits")
    p.add_argument("--max-len-fit", action="store_true",
                   help="predict the longest sequence from peaks at 3 short lengths, then check it once (no OOM tries)")
    p.add_argument("--pg-timeout", type=int, default=0, help="NCCL collective timeout in s (0: torch's default)")
    p.add_argument("--max-len-modes", default="ring", help="modes searched by --max-len (besides one GPU); mode:kernel picks the block kernel")
    p.add_argument("--profile-len", type=int, default=0, help="profile one context-parallel fwd+bwd at this length")
    p.add_argument("--profile-mode", default="ring", help="mode[:kernel] profiled by --profile-len")
    p.add_argument("--fit-check", type=float, default=0.95, help="--max-len-fit checks this fraction of the prediction")
    p.add_argument("--model", default=None, help="2b|4b|8b (tiny: CPU smoke): --max-len-fit on the Qwen3-VL text decoder instead")
    p.add_argument("--model-layers", type=int, default=4)
    p.add_argument("--len-step", type=int, default=8192)
    p.add_argument("--len-limit", type=int, default=1 << 21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--csv", default=None, help="rows appended here (default: benchmarks/results/<gpu kind>.csv; "
                   "--device cpu: $OUT or the temp folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    global DEV
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the device notes)
    if args.device == "cpu":
        DEV = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        if not torch.cuda.is_available():
            print("bench_cp.py needs CUDA GPUs (torchrun --nproc_per_node=<gpus>), or --device cpu for a smoke run",
                  file=sys.stderr)
            return 2
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        DEV = torch.device("cuda", local)
        kw = {"timeout": datetime.timedelta(seconds=args.pg_timeout)} if args.pg_timeout else {}
        dist.init_process_group("nccl", device_id=DEV, **kw)
    b = Bench(args)
    modes = [m for m in args.modes.split(",") if m]
    H, Hkv = args.heads, args.kv_heads
    log(f"{b.world} x {b.env['device']}, torch {b.env['torch']}, triton {b.env['triton']}, nccl {b.meta['nccl']}")
    kernels = [x for x in args.kernels.split(",") if x]
    if args.check_len:
        b.check(args.check_len, H, Hkv, modes, kernels)
    for S in [int(x) for x in args.seqlens.split(",") if x]:
        log(f"S = {S}: GQA {H}/{Hkv}, head_dim {args.head_dim}, {args.dtype}, causal, fwd+bwd")
        b.ours_1gpu(S, H, Hkv, "")
        for m in modes:
            for kern in kernels:
                b.ours_cp(S, H, Hkv, m, "", kern)
        if not args.no_mha and Hkv != H:
            log(f"S = {S}: MHA {H}/{H} beside PyTorch")
            b.ours_1gpu(S, H, H, "-mha")
            for m in ("ring", "ulysses"):
                for kern in kernels:
                    b.ours_cp(S, H, H, m, "-mha", kern)
            for kern in args.torch_kernels.split(","):
                b.torch_1gpu(S, H, kern)
                if not args.no_torch_cp:
                    b.torch_cp(S, H, kern)
    if args.profile_len:
        b.profile(args.profile_len, H, Hkv, args.profile_mode.partition(":")[0],
                  args.profile_mode.partition(":")[2] or "auto")
    if args.max_len:
        log("longest sequence (ours, GQA, fwd+bwd)")
        b.max_len(H, Hkv, [m for m in args.max_len_modes.split(",") if m])
    if args.max_len_fit:
        log("longest sequence, predicted from peak memory (ours, GQA, fwd+bwd)"
            + ("" if _cuda() else " -- CPU smoke run: synthetic memory figures"))
        b.max_len_fit(H, Hkv, [m for m in args.max_len_modes.split(",") if m])
    if b.rank == 0:
        path = args.csv or results_csv(RESULTS, DEV, not _cuda(), "bench_cp")
        rec = Recorder("bench_cp", path, env=b.env, echo=False)
        for r in b.rows:
            rec.add(**schema_row(r))
        print(f"wrote {len(rec.rows)} rows to {path}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
