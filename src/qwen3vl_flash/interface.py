"""Public attention functions: validation, backend choice, autograd. The docstrings are the spec.

Data flows one way: public function -> validation -> backend choice -> backend kernel.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from typing import List, Optional, Sequence, Tuple

import torch

from .backends.base import AttnParams, AttnRequest, Backend, get_backend
from .conventions import MAX_HEAD_DIM, needs_grad, warn_once
from .hardware.profiles import TileProfile, profile_for_device
from ._host import _HOST_VALUES, host_values  # noqa: F401  (re-exported)
from .monitor import _ACTIVE as _MONITORS  # qf.monitor(): the hooks below test this list, nothing else
from .monitor import auto_reasons as _auto_reasons
from .monitor import begin_call as _begin_call
from .monitor import kvcache_backend as _monitored_kvcache
from .reference import lse_dtype

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "choose_backend"]

ENV_BACKEND = "QWEN3VL_FLASH_BACKEND"
# Checks that read tensor values (cu_seqlens order, cache overflow) synchronise with the device;
# they are skipped while a CUDA graph is being captured, or when this variable is "0".
ENV_CHECK_VALUES = "QWEN3VL_FLASH_CHECK_VALUES"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KV_DISPATCH: dict = {}  # flash_attn_with_kvcache call shape -> (fused decode backend or None, AttnParams)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_same(q: torch.Tensor, others: Sequence[Tuple[str, torch.Tensor]]) -> None:
    for name, x in others:
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    H, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"k's head_dim must equal q's ({D}), got {k.shape[-1]}")
    if v.shape[-1] != D:
        raise ValueError(f"v's head_dim must equal q's ({D}), got {v.shape[-1]}")
    if v.shape[-2] != Hkv:
        raise ValueError(f"v must have as many heads as k ({Hkv}), got {v.shape[-2]}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q's head count ({H}) must be a multiple of k's head count (num_kv_heads={Hkv})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {D}")


def _check_options(softmax_scale, causal, window_size, return_lse, backend) -> Tuple[int, int]:
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', got {type(backend).__name__}")
    if backend != "auto":
        get_backend(backend)  # an unknown name raises (ValueError naming it) even where no backend runs
    try:
        left, right = window_size
        if isinstance(left, bool) or isinstance(right, bool):
            raise TypeError
        left, right = operator.index(left), operator.index(right)  # ints only: int(1.5) or int("3") would pass
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, right


def _checks_values(t: torch.Tensor) -> bool:
    if os.environ.get(ENV_CHECK_VALUES, "1") == "0":
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not torch.compiler.is_compiling()


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str, device):
    """Validate cu_seqlens; returns the segment lengths when the values were read, else None."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape (N+1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (N+1,) with N >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device ({device}), got {cu.device}")
    if cu.stride(0) != 1:  # the Triton kernels read it as a plain array: a strided view reads wrong entries
        raise ValueError(f"{name} must be contiguous (stride 1), got stride {cu.stride(0)}: pass {name}.contiguous()")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be >= 0, got {max_seqlen}")
    if not _checks_values(cu):
        return None
    vals = host_values(cu)
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals, vals[1:])]
    if min(lens) < 0:
        raise ValueError(f"{name} must be non-decreasing (sorted), got {vals[:8]}{'...' if len(vals) > 8 else ''}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {vals[-1]}")
    if max(lens) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest segment in {name} ({max(lens)})")
    return lens


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------


def _request(q, k, p: AttnParams, need_lse: bool, seqlen_q: int, seqlen_k: int, v=None) -> AttnRequest:
    cap = None
    if q.is_cuda:
        try:
            cap = torch.cuda.get_device_capability(q.device)
        except Exception:
            cap = None
    return AttnRequest(
        device_type=q.device.type,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        num_heads=q.shape[-2],
        num_kv_heads=k.shape[-2],
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        causal=p.causal,
        window=p.has_window,
        varlen=p.varlen,
        need_lse=need_lse,
        need_grad=needs_grad(q, k, v),
        device_capability=cap,
    )


def choose_backend(req: AttnRequest, backend: str, profile: TileProfile) -> List[Backend]:
    """Backends to try, in order. An explicit name gives exactly one (or raises ValueError)."""
    name = backend
    if name == "auto":
        name = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if name != "auto":
        be = get_backend(name)
        reason = be.check(req)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this call: {reason}")
        return [be]
    order = profile.order_for(req.dtype, req.varlen, seqlen_k=req.seqlen_k, need_grad=req.need_grad)  # the profile's
    chosen = [be for be in map(get_backend, order) if be.check(req) is None]
    if not chosen:  # eager serves everything, so this only happens for a broken install
        raise RuntimeError(f"no backend can run this call ({req})")
    return chosen


class _FA2Function(torch.autograd.Function):
    """Autograd for FA2-style backends: save (q, k, v, out, lse), recompute P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, backend: Backend, p: AttnParams):
        out, lse = backend.forward(q, k, v, p)
        ctx.save_for_backward(q, k, v, out, lse)  # the backend's own (possibly wider) lse
        ctx.backend, ctx.p = backend, p
        user_lse = lse.to(lse_dtype(q.dtype))
        ctx.mark_non_differentiable(user_lse)
        return out, user_lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, ctx.p)
        return dq, dk, dv, None, None


def _run(be: Backend, q, k, v, p: AttnParams):
    if be.native_autograd:
        return be.attention(q, k, v, p)
    if needs_grad(q, k, v):
        return _FA2Function.apply(q, k, v, be, p)
    out, lse = be.forward(q, k, v, p)
    return out, lse.to(lse_dtype(q.dtype))


def _execute(q, k, v, p: AttnParams, backend: str, need_lse: bool, seqlen_q: int, seqlen_k: int):
    # qf.monitor(): with no monitor active the cost is this one truth test (no clock read, no allocation)
    call = _begin_call("flash_attn_varlen_func" if p.varlen else "flash_attn_func", q, k, v) if _MONITORS else None
    if need_lse:
        p = dataclasses.replace(p, need_lse=True)
    req = _request(q, k, p, need_lse, seqlen_q, seqlen_k, v)
    candidates = choose_backend(req, backend, p.profile)
    explicit = len(candidates) == 1 and (backend != "auto" or os.environ.get(ENV_BACKEND, "auto") != "auto")
    for i, be in enumerate(candidates):
        try:
            res = _run(be, q, k, v, p)
        except Exception as exc:  # auto: fall through to the next backend, once-logged
            if explicit or i == len(candidates) - 1:
                raise
            if call is not None:
                call.failed(be.name, exc)
            warn_once((be.name, type(exc).__name__), "qwen3vl_flash: backend %r failed (%s: %s); falling back to %r",
                      be.name, type(exc).__name__, exc, candidates[i + 1].name)
            continue
        if call is not None:  # the skip reasons are worked out only now, and only while monitoring
            reason = None if explicit else _auto_reasons(
                req, p.profile.order_for(req.dtype, req.varlen, seqlen_k=req.seqlen_k, need_grad=req.need_grad), be.name, call)
            call.done(be.name, reason, getattr(p, "quant", None))
        return res
    raise AssertionError("unreachable")


def _execute_quant(q, k, v, p: AttnParams, backend: str, need_lse: bool, quant: str):
    """A validated ``quant=`` call: the quantised paths of :func:`qwen3vl_flash.quant.quant_attention`
    (Triton on CUDA where served, else the portable PyTorch path). Returns (out, lse | None)."""
    from .quant import quant_attention_path

    call = _begin_call("flash_attn_varlen_func" if p.varlen else "flash_attn_func", q, k, v) if _MONITORS else None
    out, lse, path = quant_attention_path(q, k, v, quant, p.softmax_scale, p.causal, p.window_size, p.cu_seqlens_q,
                                          p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k, need_lse, backend)
    if call is not None:
        call.done(path, None, quant)
    return out, lse


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str = "auto",
    quant: Optional[str] = None,
):
    """Exact attention, softmax(q k^T * scale) v, in O(seq) memory (or quantised: ``quant``).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D), same dtype (fp16/bf16/fp32/fp64) and device.
            GQA/MQA: H % Hkv == 0 and query head h reads kv head h // (H // Hkv).
        softmax_scale: default 1/sqrt(D).
        causal: mask aligned to the bottom-right corner when Sq != Sk (as flash-attn >= 2.1):
            query i sees key j iff j <= i + Sk - Sq. With Sq > Sk the first Sq - Sk rows see no
            key (output 0, lse -inf). E.g. (x = visible)::

                Sq=2, Sk=5            Sq=5, Sk=3
                x x x x .             . . .   <- no key: 0, lse -inf
                x x x x x             . . .
                                      x . .
                                      x x .
                                      x x x

            (the convention every backend shares, drawn in :mod:`qwen3vl_flash.conventions`).
        window_size: (left, right) sliding window around the aligned diagonal, -1 = unbounded:
            query i sees key j iff i + Sk - Sq - left <= j <= i + Sk - Sq + right (causal folds
            into right = min(right, 0)).
        return_lse: also return the log-sum-exp of the scaled scores, (B, H, Sq) float32
            (float64 for float64 inputs). A row that sees no key gives output 0 and lse -inf.
        backend: "auto", "triton", "cudnn", "tiled", "sdpa" or "eager". ``$QWEN3VL_FLASH_BACKEND``
            overrides "auto". An explicit backend that cannot serve the call raises ValueError.
            With ``quant``: "auto" (Triton's quant kernels on CUDA where they serve the call,
            else the portable PyTorch path), "triton" or "tiled" (the portable path); any other
            name raises ValueError.
        quant: None (exact, default), "int8" or "fp8": quantised attention for inference
            (docs/quantization.md; formats in :mod:`qwen3vl_flash.quant.quantize`). Q and K are
            INT8 per token and head (scale max|x| / 127), K first smoothed by subtracting its
            mean over the sequence per channel (softmax is unchanged by it); the scores are the
            int32 dot product times both scales and softmax_scale, in fp32; online softmax in
            fp32. "int8": P.V with P rounded to the input dtype and fp32 accumulation. "fp8": P
            (as fp8(P * 448)) and V (one scale per channel) in FP8 e4m3, GPUs of compute
            capability >= 8.9 only. Causal, windows, GQA and return_lse (the true lse, smoothing
            undone) work as without it; the output has the input dtype. Forward only: not
            differentiable.

    Returns:
        out (B, Sq, H, D) [, lse]. Differentiable with respect to q, k and v (not with ``quant``).

    Raises:
        TypeError / ValueError naming the bad argument (rank, dtype, device, batch or length
        mismatch, H % Hkv != 0, head_dim outside 1..256 (``conventions.MAX_HEAD_DIM``), bad window or
        options). With ``quant``: ValueError naming ``quant`` for an unknown mode (listing the
        valid ones), inputs that require grad (under grad mode), float32/float64 inputs (naming
        the dtype), "fp8" on a device without FP8 tensor cores (naming the device), or a
        ``backend`` without a quantised path.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4, "(B, S, H, D)")
    _check_same(q, [("k", k), ("v", v)])
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must have q's batch size ({q.shape[0]}), got {k.shape[0]} and {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have k's sequence length ({k.shape[1]}), got {v.shape[1]}")
    _check_heads(q, k, v)
    window = _check_options(softmax_scale, causal, window_size, return_lse, backend)
    if quant is not None:  # imported here: no cost on the exact path
        from .quant.quantize import check_quant

        quant = check_quant(quant, q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = AttnParams(scale, causal, window, profile=profile_for_device(q.device))
    B, Sq, H, D = q.shape
    if q.numel() == 0 or k.shape[1] == 0:  # nothing to attend to: zeros and lse = -inf
        out = q.new_zeros(q.shape) + 0 * q.sum() + 0 * k.sum() + 0 * v.sum()  # keeps the graph
        lse = torch.full((B, H, Sq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return (out, lse) if return_lse else out
    if quant is not None:
        out, lse = _execute_quant(q, k, v, p, backend, return_lse, quant)
    else:
        out, lse = _execute(q, k, v, p, backend, return_lse, Sq, k.shape[1])
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str = "auto",
    quant: Optional[str] = None,
):
    """Attention over packed sequences of different lengths (no padding).

    Args:
        q: (Tq, H, D); k, v: (Tk, Hkv, D) -- the N sequences concatenated along dim 0.
        cu_seqlens_q, cu_seqlens_k: int32 (N+1,), cumulative lengths starting at 0; sequence b
            is rows cu[b]:cu[b+1]. Empty sequences are allowed. Sequences never see each other.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence (used to size kernel grids).
        softmax_scale, causal, window_size, return_lse, backend: as in :func:`flash_attn_func`,
            applied per sequence (causal aligned bottom-right within each sequence: a sequence
            with more queries than keys has its first Sq_b - Sk_b rows see no key, output 0 and
            lse -inf, as drawn in :func:`flash_attn_func`).
        quant: None, "int8" or "fp8", as in :func:`flash_attn_func` (forward only; the vision
            tower's packed frames, hd 64/72). K's smoothing mean (and, for "fp8", V's
            per-channel scale) is taken over all packed tokens; segments of equal lengths run as
            one dense batch, which takes them per segment (each equally valid: a query sees the
            keys of its own segment only).

    Returns:
        out (Tq, H, D) [, lse (H, Tq)]. Differentiable with respect to q, k and v (not with
        ``quant``).

    Raises:
        as :func:`flash_attn_func` (``quant`` included), plus cu_seqlens that are not int32,
        not 1-D, of different lengths, not starting at 0, decreasing, not ending at the token
        count, or longer than max_seqlen (the value checks are skipped during CUDA-graph capture).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 3, "(total_tokens, H, D)")
    _check_same(q, [("k", k), ("v", v)])
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[0]}), got {v.shape[0]}")
    _check_heads(q, k, v)
    window = _check_options(softmax_scale, causal, window_size, return_lse, backend)
    lens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    lens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    if quant is not None:
        from .quant.quantize import check_quant

        quant = check_quant(quant, q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = AttnParams(
        scale,
        causal,
        window,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        profile=profile_for_device(q.device),
    )
    if lens_q and lens_k and min(lens_q) == max(lens_q) > 0 and min(lens_k) == max(lens_k) > 0:
        # equal segments (video frames, one image) are a dense batch: one batched call, which
        # lets auto use the dense kernels (cuDNN on Hopper) without a per-segment loop
        N, Lq, Lk = len(lens_q), lens_q[0], lens_k[0]
        res = flash_attn_func(
            q.view(N, Lq, *q.shape[1:]), k.view(N, Lk, *k.shape[1:]), v.view(N, Lk, *v.shape[1:]),
            scale, causal, window, return_lse, backend, quant=quant,
        )
        if not return_lse:
            return res.reshape(q.shape)
        out, lse = res  # lse (N, H, Lq) -> (H, N * Lq)
        return out.reshape(q.shape), lse.permute(1, 0, 2).reshape(q.shape[1], -1)
    if q.shape[0] == 0 or k.shape[0] == 0:
        out = q.new_zeros(q.shape) + 0 * q.sum() + 0 * k.sum() + 0 * v.sum()
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return (out, lse) if return_lse else out
    if quant is not None:
        out, lse = _execute_quant(q, k, v, p, backend, return_lse, quant)
    else:
        out, lse = _execute(q, k, v, p, backend, return_lse, max_seqlen_q, max_seqlen_k)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    cache_seqlens=None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    backend: str = "auto",
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    block_table: Optional[torch.Tensor] = None,
    check_values: bool = True,
    cache_leftpad: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
):
    """Attention of new queries against a KV cache, appending new keys/values in place.

    Args:
        q: (B, Sq, H, D) new queries (Sq = 1 for plain decoding).
        k_cache, v_cache: (B, Smax, Hkv, D) preallocated caches, q's dtype and device -- or
            quantized: both ``torch.int8`` (or both ``torch.float8_e4m3fn``) with q (and k/v)
            float16/bfloat16 and the scales below.
        k, v: optional (B, Snew, Hkv, D) new keys/values, written in place into the caches at rows
            cache_seqlens[b] .. cache_seqlens[b] + Snew - 1 of batch b. Nothing else is written.
        k_scale, v_scale: float32 (B, Smax, Hkv) (paged: (num_pages, page_size, Hkv), one per
            page slot), required with a quantized cache and refused with a float one: one scale
            per token and kv head, the cache holding ``x ~= stored.float() * scale``. New k/v rows
            are quantised on append (:func:`quantize_kv`: ``scale = max|x| / 127`` for int8,
            ``/ 448`` for float8_e4m3fn, computed in fp32; int8 codes ``round_half_even(x / scale)``
            clamped to +-127, fp8 codes ``(x / scale).to(float8_e4m3fn)``; an all-zero row gets
            scale 1) and their scales written at exactly the appended rows. Attention reads the
            dequantised history: the Triton decode kernel dequantises on load (codes -> q's
            dtype, exact; scores and P scaled per key in fp32), the portable path dequantises the
            visible rows to q's dtype and attends as for a float cache. FP8 caches take the
            Triton kernel on GPUs of compute capability >= 8.9 (and under the interpreter).
        cache_seqlens: int32 (B,) tensor (or an int for all rows): valid cache length per batch
            *before* the append. None means the whole cache is valid (then k/v must be None).
        causal: bottom-right aligned over the L = cache_seqlens + Snew visible keys (default
            True): query i sees keys j <= L - Sq + i, so with Sq > L the first Sq - L rows see no
            key and give output 0, lse -inf (drawn in :func:`flash_attn_func`).
        block_table: optional int32 (B, max_pages) for a paged cache (vLLM / flash-attn layout):
            the caches are then (num_pages, page_size, Hkv, D) and row b's token t lives in page
            block_table[b, t // page_size] at offset t % page_size; Smax = max_pages * page_size.
        cache_leftpad: optional int32 (B,): row b's cache starts at this index (left-padded
            batches, as flash-attn's argument of that name): keys [cache_leftpad[b],
            cache_seqlens[b] + Snew) are attended, causal still aligned to the end. None = 0.
        check_values: read cache_seqlens (and block_table) on the host to refuse overflows and bad
            pages before anything is written: one device sync per call. Pass False in decode
            loops whose lengths are known to be valid (the kernels still clamp on the device and
            never write outside a cache row); also skipped during CUDA-graph capture.

    Returns:
        out (B, Sq, H, D) [, lse (B, H, Sq)]. Not differentiable (inference path).

    Raises:
        as :func:`flash_attn_func`, plus a cache overflow (cache_seqlens + Snew > Smax, for a
        paged cache the block table's capacity), negative lengths, page indices outside the
        cache, k without v, or shapes that do not match the cache; with a quantized cache also
        missing scales (or scales given for a float cache), scales that are not float32, not
        of the expected shape or not on q's device (naming ``k_scale``/``v_scale`` and the
        shape), and a q that is not float16/bfloat16. The caches (and scales) are untouched then.
    """
    cache_seqlens, block_table, window, snew, Smax = _check_kvcache_args(
        q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, backend, window_size, return_lse,
        block_table, check_values, cache_leftpad, k_scale, v_scale,
    )
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    res = _kvcache_fused(q, k_cache, v_cache, k, v, cache_seqlens, scale, causal, window, backend, return_lse,
                         block_table, cache_leftpad, Smax, k_scale, v_scale)
    if res is not None:
        return res if return_lse else res[0]
    # the inner calls re-dispatch (auto keeps its fall-through)
    if block_table is not None:
        return _paged_kvcache_fallback(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, causal,
                                       window, return_lse, backend, k_scale, v_scale)
    return _contiguous_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, snew, scale, causal,
                               window, return_lse, backend, k_scale, v_scale)


# -- flash_attn_with_kvcache: argument checks (nothing is written before they all pass)


def _check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, backend, window_size,
                        return_lse, block_table, check_values, cache_leftpad, k_scale=None, v_scale=None):
    """Every check of :func:`flash_attn_with_kvcache`. Returns ``(cache_seqlens as an int32 (B,)
    tensor, block_table (unit stride along its pages) or None, window, Snew, Smax)``."""
    block_table, Smax = _check_cache(q, k_cache, v_cache, block_table)
    _check_kv_scales(q, k_cache, k_scale, v_scale, block_table)
    _check_heads(q, k_cache, v_cache)
    window = _check_options(softmax_scale, causal, window_size, return_lse, backend)
    snew = _check_new_kv(q, k_cache, k, v)
    if snew:
        _check_cache_writable(k_cache, v_cache)
    lengths_known = cache_seqlens is None  # built here: only a paged cache's pages left to check
    cache_seqlens = _seqlens_tensor(q, cache_seqlens, k is not None, Smax)
    if cache_leftpad is not None:
        _check_leftpad(q, cache_leftpad, block_table, check_values)
    if check_values and (not lengths_known or block_table is not None) and _checks_values(cache_seqlens):
        _check_cache_values(cache_seqlens, snew, Smax, block_table, k_cache.shape[0], k_cache.shape[1])
    return cache_seqlens, block_table, window, snew, Smax


def _check_cache_writable(k_cache, v_cache) -> None:
    """An append writes the caches in place: entries that share memory (a broadcast, expand()ed
    view) or k_cache and v_cache over the same memory would write one location for several entries."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(st == 0 and n > 1 for st, n in zip(c.stride(), c.shape)):
            raise ValueError(f"{name} has entries that share memory (stride 0, e.g. an expand()ed view: strides "
                             f"{c.stride()}); an append writes it in place: pass a tensor with its own storage")
    if k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr():
        raise ValueError("k_cache and v_cache must not be the same memory (an append writes both in place)")


def _check_int32(name: str, x, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor of shape {layout}, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")


def _check_cache(q, k_cache, v_cache, block_table):
    """The caches (and the paged layout's block table, shapes only): ``(block_table, Smax)``."""
    _check_tensor("q", q, 4, "(B, Sq, H, D)")
    layout = "(num_pages, page_size, Hkv, D)" if block_table is not None else "(B, Smax, Hkv, D)"
    if _is_quantized(k_cache):
        _check_quantized_cache(q, k_cache, v_cache, layout)
    else:
        _check_tensor("k_cache", k_cache, 4, layout)
        _check_tensor("v_cache", v_cache, 4, layout)
        _check_same(q, [("k_cache", k_cache), ("v_cache", v_cache)])
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    B = q.shape[0]
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache must have q's batch size ({B}), got {k_cache.shape[0]}")
        return None, k_cache.shape[1]
    _check_int32("block_table", block_table, "(B, max_pages)")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must have shape (B, max_pages) with B={B}, got {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table must be on q's device ({q.device}), got {block_table.device}")
    if block_table.stride(1) != 1:  # the decode kernels read a row's pages with unit stride
        block_table = block_table.contiguous()
    return block_table, block_table.shape[1] * k_cache.shape[1]


# int8 / fp8 KV caches: codes plus one float32 scale per token and kv head (x ~= codes * scale)
_QUANT_CACHE_DTYPES = (torch.int8, torch.float8_e4m3fn)
_QUANT_Q_DTYPES = (torch.float16, torch.bfloat16)


def _is_quantized(cache) -> bool:
    return isinstance(cache, torch.Tensor) and cache.dtype in _QUANT_CACHE_DTYPES


def _check_quantized_cache(q, k_cache, v_cache, layout: str) -> None:
    """An int8 / float8_e4m3fn k_cache: v_cache of the same dtype, both 4-D on q's device, q 16-bit."""
    if q.dtype not in _QUANT_Q_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 with a {k_cache.dtype} (quantized) cache, got {q.dtype}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have 4 dimensions {layout}, got shape {tuple(k_cache.shape)}")
    if not isinstance(v_cache, torch.Tensor):
        raise TypeError(f"v_cache must be a torch.Tensor of shape {layout}, got {type(v_cache).__name__}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache.dtype must equal k_cache.dtype ({k_cache.dtype}) for a quantized cache, "
                        f"got {v_cache.dtype}")
    if v_cache.dim() != 4:
        raise ValueError(f"v_cache must have 4 dimensions {layout}, got shape {tuple(v_cache.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")


def _check_kv_scales(q, k_cache, k_scale, v_scale, block_table) -> None:
    """k_scale / v_scale: float32 (B, Smax, Hkv) (paged: (num_pages, page_size, Hkv)) on q's device
    with a quantized cache; None with a float one. Any strides."""
    if not _is_quantized(k_cache):
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise ValueError(f"{name} is only for an int8 or float8_e4m3fn (quantized) cache; k_cache is "
                                 f"{k_cache.dtype}: pass {name}=None")
        return
    layout = "(num_pages, page_size, Hkv)" if block_table is not None else "(B, Smax, Hkv)"
    expect = tuple(k_cache.shape[:3])
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"{name} is required with a {k_cache.dtype} cache: a float32 tensor of shape "
                             f"{layout} = {expect}")
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a float32 torch.Tensor of shape {layout} = {expect}, "
                            f"got {type(s).__name__}")
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 of shape {layout} = {expect}, got {s.dtype}")
        if tuple(s.shape) != expect:
            raise ValueError(f"{name} must have shape {layout} = {expect}, got {tuple(s.shape)}")
        if s.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {s.device}")


def quantize_kv(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> Tuple[torch.Tensor, torch.Tensor]:
    """The KV-cache quantisation of :func:`flash_attn_with_kvcache`, per row of the last dim:
    ``x (..., D) -> (codes (..., D) of ``dtype`` (int8 or float8_e4m3fn), scale float32 (...))``
    with ``x ~= codes.float() * scale[..., None]`` (the shared quantisers of
    :mod:`qwen3vl_flash.quant.quantize`: fp32 scales ``max|x| / 127`` or ``/ 448``, round half to
    even, 1 for an all-zero row). Use it to fill a quantized cache from a prefill."""
    from .quant.quantize import quantize_fp8, quantize_int8

    if dtype == torch.int8:
        return quantize_int8(x)
    if dtype == torch.float8_e4m3fn:
        codes, scale = quantize_fp8(x, dim=-1)
        return codes, scale.squeeze(-1)
    raise ValueError(f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")


def _dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., D), scale (...) -> ``codes.float() * scale`` in ``dtype`` (the portable path's
    dequantised history: one rounding to q's dtype, so the existing kernels take it)."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as uint8 (same bytes): indexed reads and writes of fp8 are not implemented
    for every device and op (index_copy_ on the CPU, for one); other tensors as they are."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _take(x: torch.Tensor, index) -> torch.Tensor:
    """``x[index]`` (a gather), fp8 through its bytes."""
    return _bytes(x)[index].view(x.dtype)


def _write_rows(cache: torch.Tensor, scales: Optional[torch.Tensor], index, x: torch.Tensor) -> None:
    """``cache[index] = x``, quantised (codes and their scales at the same rows) when ``scales`` is
    given."""
    if scales is None:
        cache[index] = x
        return
    codes, s = quantize_kv(x, cache.dtype)
    _bytes(cache)[index] = _bytes(codes)
    scales[index] = s


def _check_new_kv(q, k_cache, k, v) -> int:
    """The new keys/values to append: their count Snew (0 without)."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (both None, or both (B, Snew, Hkv, D))")
    if k is None:
        return 0
    _check_tensor("k", k, 4, "(B, Snew, Hkv, D)")
    _check_tensor("v", v, 4, "(B, Snew, Hkv, D)")
    _check_same(q, [("k", k), ("v", v)])
    expect = (q.shape[0], k.shape[1]) + tuple(k_cache.shape[2:])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != expect:
            raise ValueError(f"{name} must have shape (B, Snew, Hkv, D) = {expect}, got {tuple(x.shape)}")
    return k.shape[1]


def _seqlens_tensor(q, cache_seqlens, appends: bool, Smax: int) -> torch.Tensor:
    """cache_seqlens as an int32 (B,) tensor on q's device (None: the whole cache; an int: every row)."""
    B = q.shape[0]
    if cache_seqlens is None:
        if appends:
            raise ValueError("cache_seqlens is required when new k/v are appended")
        cache_seqlens = torch.full((B,), Smax, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError("cache_seqlens must be an int32 tensor of shape (B,), an int or None, got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device ({q.device}), got {cache_seqlens.device}")
    return cache_seqlens.contiguous()  # the decode kernels read it as a plain array (as block_table)


def _check_leftpad(q, cache_leftpad, block_table, check_values: bool) -> None:
    B = q.shape[0]
    _check_int32("cache_leftpad", cache_leftpad, "(B,)")
    if tuple(cache_leftpad.shape) != (B,):
        raise ValueError(f"cache_leftpad must have shape (B,) = ({B},), got {tuple(cache_leftpad.shape)}")
    if cache_leftpad.device != q.device:
        raise ValueError(f"cache_leftpad must be on q's device ({q.device}), got {cache_leftpad.device}")
    if cache_leftpad.stride(0) != 1 and B > 1:  # the decode kernels read it as a plain array
        raise ValueError(f"cache_leftpad must be contiguous (stride 1), got stride {cache_leftpad.stride(0)}: "
                         "pass cache_leftpad.contiguous()")
    if block_table is not None:
        raise ValueError("cache_leftpad is not supported with a paged cache (block_table)")
    if check_values and _checks_values(cache_leftpad):
        lo_pad = int(cache_leftpad.min())
        if lo_pad < 0:
            raise ValueError(f"cache_leftpad must be >= 0, got a minimum of {lo_pad}")


def _check_cache_values(cache_seqlens: torch.Tensor, snew: int, Smax: int, block_table=None, num_pages: int = 0,
                        page_size: int = 0) -> None:
    """The value checks of a cache call (they read tensors on the host: one device sync, one more
    for a paged cache): lengths >= 0, ``cache_seqlens + snew`` within ``Smax`` (a paged cache's
    Smax is its block table's capacity, max_pages x page_size), and every page a row uses -- the
    first ``cdiv(cache_seqlens[b] + snew, page_size)`` entries of ``block_table[b]`` -- an
    existing page of the ``num_pages``."""
    lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()  # one device sync for both
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {lo}")
    if hi + snew > Smax:
        if block_table is None:
            cap = f"the cache length Smax={Smax}"
        else:
            cap = (f"the block table's capacity Smax={Smax} ({block_table.shape[1]} pages x "
                   f"page_size {page_size})")
        raise ValueError(f"cache overflow: cache_seqlens ({hi}) + Snew ({snew}) exceeds {cap}")
    if block_table is None:
        return
    used = (cache_seqlens.long() + snew + page_size - 1) // page_size  # pages per row
    live = torch.arange(block_table.shape[1], device=block_table.device).unsqueeze(0) < used.unsqueeze(1)
    pages = block_table[live]
    if pages.numel():
        lo, hi = torch.stack(torch.aminmax(pages)).tolist()
        if lo < 0 or hi >= num_pages:
            raise ValueError(f"block_table holds page indices outside [0, {num_pages}) (min {lo}, max {hi})")


# -- flash_attn_with_kvcache: the cached dispatch to a fused decode path


def _kvcache_fused(q, k_cache, v_cache, k, v, cache_seqlens, scale: float, causal: bool, window, backend: str,
                   return_lse: bool, block_table, cache_leftpad, Smax: int, k_scale=None, v_scale=None):
    """Run the call on a backend with a fused decode path (Triton split-KV: appends and attends
    itself, no host syncs, CUDA-graph capturable); auto prefers one to any backend without.
    Returns (out, lse), or None when no backend has one for this call or (auto) it failed.
    A quantized cache (its dtype is in the key) goes to a backend whose ``kvcache_check`` accepts
    that cache dtype, with ``k_scale``/``v_scale`` passed on (quantise-on-append is the backend's).

    The backend is resolved before the cache is touched, so a refusal leaves it untouched. Decode
    loops repeat one call shape: the decision (and the call's AttnParams, which then keep the
    profile alive, so its id stays unique in the key) is cached per shape (host time is the decode
    bottleneck, see docs/perf/decode.md)."""
    profile = profile_for_device(q.device)
    key = (q.device, q.dtype, tuple(q.shape), tuple(k_cache.shape), k_cache.stride(), backend,
           os.environ.get(ENV_BACKEND), id(profile), causal, window, scale, return_lse, block_table is None,
           k_cache.dtype)
    hit = _KV_DISPATCH.get(key)
    if hit is None:
        p = AttnParams(scale, causal, window, profile=profile)
        candidates = choose_backend(_request(q, k_cache, p, return_lse, q.shape[1], Smax, v_cache), backend, profile)
        fused_be = next((be for be in candidates if getattr(be, "kvcache_attention", None) is not None
                         and be.kvcache_check(q, k_cache, p) is None), None)
        if len(_KV_DISPATCH) > 256:
            _KV_DISPATCH.clear()
        hit = _KV_DISPATCH[key] = (fused_be, p)
    fused_be, p = hit
    if fused_be is None:
        return None
    if _MONITORS:  # qf.monitor(): time and record the fused call (off: this one truth test)
        fused_be = _monitored_kvcache(fused_be, q, k_cache, v_cache, p, backend, return_lse, Smax)
    try:
        kw = {} if cache_leftpad is None else {"cache_leftpad": cache_leftpad}
        if k_scale is not None:  # quantized cache (only then: backends without quantized caches keep their API)
            kw.update(k_scale=k_scale, v_scale=v_scale)
        return fused_be.kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, p, block_table=block_table, **kw)
    except Exception as exc:  # e.g. a kernel that fails to compile: auto falls through, once-logged
        if backend != "auto" or os.environ.get(ENV_BACKEND, "auto") != "auto":
            raise
        _KV_DISPATCH[key] = (None, p)
        warn_once((fused_be.name, "kvcache", type(exc).__name__),
                  "qwen3vl_flash: the %r decode path failed (%s: %s); falling back to the generic KV-cache path",
                  fused_be.name, type(exc).__name__, exc)
        return None


# -- flash_attn_with_kvcache: the generic path (any backend, through the public functions)


def _contiguous_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, snew: int, scale, causal, window,
                        return_lse, backend, k_scale=None, v_scale=None):
    """Without a fused kernel: append (an indexed write; quantised with its scales for a
    quantized cache), then one dense call over the valid prefix when every row has the same
    length, else one varlen call over the packed rows. A quantized cache is dequantised to q's
    dtype on the rows read only (O(what is read), per call)."""
    B, Sq, H = q.shape[:3]
    with torch.no_grad():
        if snew:
            rows = cache_seqlens.long().unsqueeze(1) + torch.arange(snew, device=q.device)  # (B, Snew)
            bidx = torch.arange(B, device=q.device).unsqueeze(1).expand(B, snew)
            _write_rows(k_cache, k_scale, (bidx, rows), k)
            _write_rows(v_cache, v_scale, (bidx, rows), v)
        lens = cache_seqlens + snew
        if cache_leftpad is not None:
            return _packed_kvcache(q, k_cache, v_cache, cache_leftpad, lens, scale, causal, window, return_lse,
                                   backend, k_scale, v_scale)
        lens_list = lens.tolist()
        if min(lens_list) == max(lens_list):  # one length: a dense call over the valid prefix
            L = lens_list[0]
            if L == 0:
                out = q.new_zeros(q.shape)
                lse = torch.full((B, H, Sq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
                return (out, lse) if return_lse else out
            kc, vc = k_cache[:, :L], v_cache[:, :L]
            if k_scale is not None:
                kc, vc = _dequantize_kv(kc, k_scale[:, :L], q.dtype), _dequantize_kv(vc, v_scale[:, :L], q.dtype)
            return flash_attn_func(q, kc, vc, scale, causal, window, return_lse, backend)
        # ragged lengths: pack the valid rows and run one varlen call
        return _packed_kvcache(q, k_cache, v_cache, None, lens, scale, causal, window, return_lse, backend,
                               k_scale, v_scale)


def _packed_kvcache(q, k_cache, v_cache, start, end, scale, causal, window, return_lse, backend, k_scale=None,
                    v_scale=None):
    """Without a fused kernel: keys [start[b], end[b]) of each row (start None: 0), packed into
    one varlen call (bottom-right causal within each row's keys is then the cache's own alignment)."""
    B, Sq, H, D = q.shape
    pos = torch.arange(k_cache.shape[1], device=q.device).unsqueeze(0)
    end = end.long()
    valid = pos < end.unsqueeze(1)  # (B, Smax)
    if start is not None:
        valid &= pos >= torch.minimum(start.long(), end).unsqueeze(1)
    n = valid.sum(1)
    cu_k = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(n, 0)
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
    kp, vp = _take(k_cache, valid), _take(v_cache, valid)  # (Tk, Hkv, D)
    if k_scale is not None:  # quantized: dequantise the packed rows only
        kp, vp = _dequantize_kv(kp, k_scale[valid], q.dtype), _dequantize_kv(vp, v_scale[valid], q.dtype)
    res = flash_attn_varlen_func(q.reshape(B * Sq, H, D), kp, vp, cu_q, cu_k, Sq,
                                 max(int(n.max()), 1), scale, causal, window, return_lse, backend)
    if not return_lse:
        return res.view(B, Sq, H, D)
    out, lse = res
    return out.view(B, Sq, H, D), lse.view(H, B, Sq).permute(1, 0, 2)


def _paged_kvcache_fallback(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, causal, window,
                            return_lse, backend, k_scale=None, v_scale=None):
    """Paged cache without a fused kernel: append into the pages (quantised, with the scales of
    the page slots, for a quantized cache), gather each row's pages (and scales) into a contiguous
    copy (O(B * Smax) memory) and run the contiguous path without appending again."""
    num_pages, page_size, Hkv, D = k_cache.shape
    B = q.shape[0]
    scales = {}
    with torch.no_grad():
        if k is not None and k.shape[1]:
            pos = cache_seqlens.long().unsqueeze(1) + torch.arange(k.shape[1], device=q.device)  # (B, Snew)
            page = torch.gather(block_table.long(), 1, pos // page_size)
            _write_rows(k_cache, k_scale, (page, pos % page_size), k)
            _write_rows(v_cache, v_scale, (page, pos % page_size), v)
            cache_seqlens = cache_seqlens + k.shape[1]
        # entries past a row's used pages are never read, and validation leaves them unchecked
        # (flash-attn's contract): gather page 0 there instead of whatever they hold
        used = (cache_seqlens.long() + page_size - 1) // page_size  # (B,)
        pages = torch.arange(block_table.shape[1], device=block_table.device)
        table = torch.where(pages[None, :] < used[:, None], block_table.long(), 0)
        kc = _take(k_cache, table).reshape(B, -1, Hkv, D)
        vc = _take(v_cache, table).reshape(B, -1, Hkv, D)
        if k_scale is not None:
            scales = {"k_scale": k_scale[table].reshape(B, -1, Hkv),
                      "v_scale": v_scale[table].reshape(B, -1, Hkv)}
    return flash_attn_with_kvcache(q, kc, vc, None, None, cache_seqlens, scale, causal, backend, window, return_lse,
                                   **scales)
