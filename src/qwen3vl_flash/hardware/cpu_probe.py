"""Is this CPU's 16-bit matmul slower than its float32 one? Measured once per process and dtype.

Why: a CPU without native bf16 (or fp16) dot products runs a 16-bit matmul through a slow
emulation. Seen on the 2-core CI machine (AMD EPYC with AVX-512 BF16), torch 2.13: under
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (the i5-10210U's instruction set, emulated)
a bf16 batched matmul took 18-56x the time of the float32 one, and PyTorch's bf16 SDPA
forward+backward 12-14x its float32 time; with AVX-512 but no BF16
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE``, emulated) bf16 matmuls were 2.4-3x slower; fp16 matmuls
were 15-20x slower on that machine as it is (bf16 0.7-0.8x). Where the 16-bit matmul is slow,
the ``tiled`` backend computes its tiles in float32 (the inputs stay 16-bit) and ``auto``
prefers it to SDPA for 16-bit CPU calls
(:meth:`qwen3vl_flash.hardware.profiles.TileProfile.order_for`).

The probe: small batched matmuls of the attention's contraction (hd128), float32 and the dtype
alternately, on one thread (two threads on a contended machine stall at OpenMP barriers and time
the scheduler, not the ISA), the minimum of each after a warm-up. It takes about 0.5 ms where
the 16-bit matmul is fast and 2-8 ms where it is slow, plus, in a process that has not yet run a
16-bit matmul, oneDNN's one-time kernel generation for it (1-10 ms seen; any first 16-bit matmul
pays it).

``$QWEN3VL_FLASH_CPU_LOWP`` = ``fast`` | ``slow`` | ``measure`` (default) pins the answer; a
profile can pin it too (``TileProfile.cpu_lowp_matmul``).
"""

from __future__ import annotations

import os
import threading
import time

import torch

ENV_CPU_LOWP = "QWEN3VL_FLASH_CPU_LOWP"
LOWP_CHOICES = ("measure", "fast", "slow")
LOWP_DTYPES = (torch.bfloat16, torch.float16)

# a 16-bit matmul this many times slower than float32 counts as slow. Not a tuned cut-off: the
# cliffs measured are 2.4x and more, native bf16 0.7-0.8x, and the upcast path is about as fast
# as float32 (tiled bf16 forward 0.93-1.12x its fp32 one, exp_cpu_cliff.py), so any value
# between ~1.2 and ~2 separates them
SLOW_RATIO = 1.5
_SHAPE = (4, 64, 128, 64)  # (batch, rows, contraction = head_dim, cols): ~30-60 us in float32
_MAX_PAIRS = 6  # alternating runs of each, at most

_MEASURED: dict[torch.dtype, bool] = {}
_LOCK = threading.Lock()


def check_choice(value, where: str) -> str:
    """``value`` if it is one of :data:`LOWP_CHOICES`, else ValueError naming ``where``."""
    if value not in LOWP_CHOICES:
        raise ValueError(f"{where} must be one of {LOWP_CHOICES}, got {value!r}")
    return value


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_ratio(dtype: torch.dtype, max_pairs: int = _MAX_PAIRS) -> float:
    """Time of a small batched matmul in ``dtype`` over that of float32 on this CPU, one thread:
    the minimum of each over alternating runs (noise only ever adds time), stopping once the
    ratio is clearly on one side of :data:`SLOW_RATIO` (at least two runs of each)."""
    b, m, k, n = _SHAPE
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(b, m, k, generator=gen), torch.randn(b, k, n, generator=gen)
    a16, b16 = a32.to(dtype), b32.to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.bmm(a32, b32), torch.bmm(a16, b16)  # warm-up: oneDNN builds its kernels on first use
        t32 = t16 = float("inf")
        for i in range(max_pairs):
            t32 = min(t32, _seconds(lambda: torch.bmm(a32, b32)))
            t16 = min(t16, _seconds(lambda: torch.bmm(a16, b16)))
            if i >= 1 and not (0.75 * SLOW_RATIO < t16 / t32 < 2 * SLOW_RATIO):
                break
    finally:
        torch.set_num_threads(threads)
    return t16 / max(t32, 1e-9)


def lowp_matmul_is_slow(dtype: torch.dtype, pinned: str = "measure") -> bool:
    """Whether a ``dtype`` (bf16/fp16) matmul on this CPU is more than :data:`SLOW_RATIO` times
    slower than a float32 one. ``$QWEN3VL_FLASH_CPU_LOWP`` wins, then ``pinned`` (a profile's
    ``cpu_lowp_matmul``); ``"measure"`` times it once per process and dtype. Other dtypes: False.
    Raises ValueError for a value that is not ``fast`` / ``slow`` / ``measure``."""
    if dtype not in LOWP_DTYPES:
        return False
    choice = os.environ.get(ENV_CPU_LOWP, "").strip().lower() or "measure"
    check_choice(choice, f"${ENV_CPU_LOWP}")
    if choice == "measure":
        choice = check_choice(pinned, "TileProfile.cpu_lowp_matmul")
    if choice != "measure":
        return choice == "slow"
    hit = _MEASURED.get(dtype)
    if hit is None:
        with _LOCK:  # two threads' first calls must not time each other
            hit = _MEASURED.get(dtype)
            if hit is None:
                hit = _MEASURED[dtype] = measure_ratio(dtype) > SLOW_RATIO
    return hit


def reset() -> None:
    """Forget the measurements (tests; a process that changed its thread or ISA settings)."""
    _MEASURED.clear()


# a constant to torch.compile (what torch.compiler.assume_constant_result marks, without importing
# torch._dynamo here; see profiles._detected_profile_name): timed once, outside any graph
lowp_matmul_is_slow._dynamo_marked_constant = True
