"""The toolbox the Triton kernel files share: host helpers, jit helpers and constants.

:mod:`.triton_fwd`, :mod:`.triton_bwd` and :mod:`.triton_decode` each hold their kernels and their
launcher; what more than one of them uses lives here, once.

Importing this module does not import triton (triton is optional, and ``TRITON_INTERPRET`` must be
set before triton is first imported, see :mod:`.triton_decode`). Two parts:

* host code, plain Python: :func:`interpreting`, :func:`next_pow2`, :func:`poison_outputs` /
  :func:`poison`, :func:`log2_scale`, :func:`dot_precision`, :func:`split_head_dim` /
  :func:`effective_split`, :func:`layout_strides`, :func:`contig_last`, :func:`autotune`;
* device code: the jit helpers :func:`dot`, :func:`load2d`, :func:`block_ranges` and the
  ``tl.constexpr`` constants :data:`LOG2E`, :data:`LN2`. They are wrapped by ``triton.jit`` on
  first access -- ``from .triton_common import dot`` does it (triton_fwd / triton_bwd, which import
  triton anyway), or :func:`jit_helpers` (triton_decode, which builds its kernels on first use, once
  per interpreter mode).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

# exp(x) = exp2(x * log2(e)); ln(x) = log2(x) * ln(2). Host floats; the kernels read the
# constexpr twins LOG2E / LN2 (built with the jit helpers, below).
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

ENV_INTERPRET = "TRITON_INTERPRET"
ENV_POISON = "QWEN3VL_FLASH_TRITON_POISON"
# What Triton itself takes as true for a boolean knob (triton.knobs.env_bool -> getenv_bool:
# case-insensitive "1", "true", "yes", "on", "y"); anything else, or unset, is false.
_TRUE = ("1", "true", "yes", "on", "y")


# --------------------------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter, read the way Triton reads it."""
    return os.environ.get(ENV_INTERPRET, "").lower() in _TRUE


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x) - 1).bit_length()


def poison_outputs() -> bool:
    """Whether ``$QWEN3VL_FLASH_TRITON_POISON`` is ``1``: NaN-fill every buffer a kernel must write
    before it runs, so a test sees any element a kernel forgot. Read at call time (a test fixture
    can set it per test)."""
    return os.environ.get(ENV_POISON, "0") == "1"


def poison(*tensors: torch.Tensor) -> None:
    """NaN-fill ``tensors`` when :func:`poison_outputs` is on (tests), else nothing."""
    if poison_outputs():
        for t in tensors:
            t.fill_(float("nan"))


def log2_scale(softmax_scale: float) -> float:
    """``softmax_scale`` in log2 units (the kernels' ``qk_scale``): the softmax runs in base 2."""
    return float(softmax_scale) * _LOG2E


def dot_precision(dtype: torch.dtype, upcast: bool | None = None) -> str:
    """The ``DOT_PREC`` of the kernels' dots (:func:`dot`). fp32: ``"ieee"`` (full precision, no
    tf32); fp16/bf16: ``"tf32"`` (the tensor-core default; the tf32 flag is ignored for them), or
    ``"upcast"``: tiles widened to fp32 first, for the CPU interpreter, which cannot multiply bf16
    (numpy has no bf16). ``upcast`` None: bf16 under the interpreter."""
    if dtype == torch.float32:  # the interpreter: "ieee_chunked", see dot_d
        return "ieee_chunked" if interpreting() else "ieee"
    if upcast is None:
        upcast = dtype == torch.bfloat16 and interpreting()
    return "upcast" if upcast else "tf32"


def split_head_dim(head_dim: int, mode: str = "split") -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): a power-of-two main part and a power-of-two tail (0 = none).

    ``split``: 72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0), 200 -> (128, 128).
    ``pad``:   72 -> (128, 0). Tiles are at least 16 wide (the smallest tensor-core dot).
    """
    if head_dim <= 16:
        return 16, 0
    main = 1 << (head_dim.bit_length() - 1)
    if main == head_dim:
        return main, 0
    if mode == "pad":
        return next_pow2(head_dim), 0
    if mode != "split":
        raise ValueError(f"head_split must be 'split' or 'pad', got {mode!r}")
    return main, max(16, next_pow2(head_dim - main))


def effective_split(head_dim: int, mode: str, *tensors) -> tuple[int, int]:
    """:func:`split_head_dim`, except that a *masked* tail (72 = 64 + 16 with 8 masked columns)
    on rows whose stride is not a multiple of 16 elements falls back to padding: on H100 with
    triton 3.6 that combination gave wrong results (K/V of shape (.., 1 kv head, 72): err 0.43)
    or an illegal address, while the padded kernel and unmasked tails (80, 96) were exact."""
    d0, d1 = split_head_dim(head_dim, mode)
    if d1 and d0 + d1 > head_dim and not all(t.stride(-3) % 16 == 0 for t in tensors):  # token stride
        return split_head_dim(head_dim, "pad")
    return d0, d1


def layout_strides(q, k, v, out, lse, varlen: bool):
    """The kernels' (batch, token, head) strides of q, k, v, out and the (batch, head) strides of
    lse, for dense (B, S, H, D) or varlen (T, H, D) tensors (varlen: batch stride 0)."""
    if varlen:
        sq = (0, q.stride(0), q.stride(1))
        sk = (0, k.stride(0), k.stride(1))
        sv = (0, v.stride(0), v.stride(1))
        so = (0, out.stride(0), out.stride(1))
        sl = (0, lse.stride(0))
    else:
        sq = (q.stride(0), q.stride(1), q.stride(2))
        sk = (k.stride(0), k.stride(1), k.stride(2))
        sv = (v.stride(0), v.stride(1), v.stride(2))
        so = (out.stride(0), out.stride(1), out.stride(2))
        sl = (lse.stride(0), lse.stride(1))
    return sq, sk, sv, so, sl


def contig_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along head_dim (a copy only where it has not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


_TUNED: dict[tuple, dict] = {}


def autotune(launch: Callable[[dict], object], key: tuple, candidates: Sequence, interpret) -> dict:
    """The launch config for ``key`` ({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}): under
    the interpreter ``interpret``'s; on GPU each of ``candidates`` (KernelTiles) timed once (median
    of a short do_bench) and the winner cached per (key, candidates)."""
    if interpreting():
        return interpret.as_config()
    cache_key = (key, tuple(candidates))
    best = _TUNED.get(cache_key)
    if best is None:
        import triton.testing

        best_t = math.inf
        for tile in candidates:
            cfg = tile.as_config()
            try:
                t = triton.testing.do_bench(lambda c=cfg: launch(c), warmup=5, rep=20)
            except Exception:  # noqa: BLE001, S112  (out of resources -- shared memory, registers -- for this tile)
                continue
            if t < best_t:
                best, best_t = cfg, t
        if best is None:
            raise RuntimeError(f"no Triton config could run {key}")
        _TUNED[cache_key] = best
    return best


# --------------------------------------------------------------------------------------------
# jit helpers (plain functions here; wrapped by triton.jit on first access, see jit_helpers)
# --------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by jit_helpers (the helpers below read it as a global)


def dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b (acc None: a @ b). DOT_PREC "upcast": the CPU interpreter cannot multiply bf16
    (numpy has no bf16), so tiles go to fp32 first -- bf16 products are exact in fp32, as on tensor
    cores; otherwise Triton's input_precision ("ieee" for fp32, "tf32" for fp16/bf16)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_PREC == "ieee_chunked":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


def dot_d(a, b, acc, DOT_PREC: tl.constexpr):
    """:func:`dot` for a reduction over the head dimension (``a`` (M, K), ``b`` (K, N): q k^T,
    dO v^T). ``"ieee_chunked"`` (fp32 under the interpreter) with K > 64 sums K/64 separate chains
    of 64 products: the interpreter's dot is numpy's sgemm, one chain of K fp32 FMAs, which at
    K=256 loses up to ~8x more than PyTorch's blocked matmul, enough to fail the comparison rule
    (FOUND_BUGS 16). Not on GPUs: this reshaped 3-D dot asked for 256 KiB of shared memory at the
    fp32 hd256 tile on an H100 (2026-12-07), so compiled kernels keep Triton's own fp32 dot."""
    if DOT_PREC == "ieee_chunked" and a.shape[1] > 64:
        M: tl.constexpr = a.shape[0]
        K: tl.constexpr = a.shape[1]
        N: tl.constexpr = b.shape[1]
        a3 = tl.permute(tl.reshape(a, (M, K // 64, 64)), (1, 0, 2))  # (K/64, M, 64)
        b3 = tl.reshape(b, (K // 64, 64, N))
        s = tl.sum(tl.dot(a3, b3, input_precision="ieee"), 0)
        if acc is None:
            return s
        else:
            return acc + s
    else:
        return dot(a, b, acc, DOT_PREC)


def load2d(ptrs, a_ok, b_ok, MASK_A: tl.constexpr, MASK_B: tl.constexpr):
    """Load a tile, masking only along the dimensions that can run out (constexpr-chosen, so
    interior tiles compile to unmasked, vectorised loads)."""
    if MASK_A and MASK_B:
        return tl.load(ptrs, mask=a_ok & b_ok, other=0.0)
    elif MASK_A:
        return tl.load(ptrs, mask=a_ok, other=0.0)
    elif MASK_B:
        return tl.load(ptrs, mask=b_ok, other=0.0)
    else:
        return tl.load(ptrs)


def block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key ranges for query rows [m0, m0 + BLOCK_M): [lo, full_lo) masked, [full_lo, full_hi)
    unmasked (every row sees every key), [full_hi, hi) masked. All multiples of BLOCK_N except hi."""
    off = seqlen_k - seqlen_q
    m_last = m0 + BLOCK_M - 1
    if HAS_RIGHT:
        hi = tl.minimum(seqlen_k, tl.maximum(m_last + off + window_right + 1, 0))
        full_hi = tl.minimum(seqlen_k, tl.maximum(m0 + off + window_right + 1, 0))
    else:
        hi = seqlen_k
        full_hi = seqlen_k
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - window_left, 0)
        lo = tl.minimum((lo // BLOCK_N) * BLOCK_N, hi)
        full_lo = tl.maximum(m_last + off - window_left, 0)
        full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
        full_lo = 0
    hi = tl.maximum(hi, lo)
    hi_ceil = ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_ceil)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# The plain functions leave the module namespace, so that the first access by name (an import)
# goes through __getattr__ and gets the triton.jit-wrapped version.
_JIT_NAMES = ("dot", "dot_d", "load2d", "block_ranges")
_CONSTANTS = {"LOG2E": _LOG2E, "LN2": _LN2}
_RAW = {name: globals().pop(name) for name in _JIT_NAMES}
_BUILT: dict[bool, dict[str, object]] = {}


def jit_helpers() -> dict[str, object]:
    """The jit helpers and constexpr constants by name, wrapped for the current interpreter mode
    (``triton.jit`` decides at wrapping time whether to compile or interpret; cached per mode)."""
    global tl
    mode = interpreting()
    built = _BUILT.get(mode)
    if built is None:
        from .._optional import require

        triton = require("triton", "the Triton kernels")
        tl = require("triton.language", "the Triton kernels")
        built = {name: triton.jit(fn) for name, fn in _RAW.items()}
        built.update({name: tl.constexpr(value) for name, value in _CONSTANTS.items()})
        _BUILT[mode] = built
    return built


def __getattr__(name: str):
    if name in _RAW or name in _CONSTANTS:
        built = jit_helpers()
        globals().update(built)  # later lookups (and the helpers' own globals) find them directly
        return built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
