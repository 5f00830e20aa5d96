"""Shared measuring helpers for the CLI, the benchmarks and the memory tests.

* :func:`time_fn` -- median wall time after warm-up (CUDA events via triton's do_bench on GPUs).
* :func:`peak_extra_bytes` -- peak bytes allocated by a call beyond what existed before it, on
  CUDA (the caching allocator's counters) and on CPU (the profiler's allocation events).
* :func:`attention_flops` -- FLOPs as DESIGN.md counts them: 4*B*H*Sq*Sk*D, halved for causal,
  x2.5 for forward+backward.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: str = "fwd") -> float:
    flops = 4.0 * B * H * Sq * Sk * D
    if causal:
        flops /= 2
    return flops * (2.5 if mode == "fwd_bwd" else 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device="cpu", warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` (after ``warmup`` calls)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device="cpu") -> int:
    """Peak bytes allocated while ``fn`` runs, beyond the allocations alive before it started."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak
