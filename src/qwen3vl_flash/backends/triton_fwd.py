"""Triton FlashAttention-2 forward: kernel, then a plain launcher.

One kernel serves both layouts:

* dense:  q (B, Sq, H, D), k/v (B, Sk, Hkv, D), out like q, lse (B, H, Sq)
* varlen: q (Tq, H, D), k/v (Tk, Hkv, D), ``cu_seqlens`` int32 (N+1,), lse (H, Tq)

(varlen is the dense kernel with a zero batch stride and per-segment row offsets/lengths read
from ``cu_seqlens``). Grid: (query blocks, batch * heads), query blocks fastest so that all
programs in flight at once read the same K/V (L2 reuse); under causal masking the query blocks
run last-first (heaviest first) so the short ones fill the tail of the wave.

Masking follows :mod:`qwen3vl_flash.reference`: with ``off = Sk - Sq``, key j is visible to query
i iff ``j <= i + off + right`` (causal folds into ``right = min(right, 0)``) and
``j >= i + off - left``. Each query block visits only the key blocks it can see (causal / window
block skipping) and applies the mask only on the boundary blocks: the loop is split into
masked-left, unmasked-middle and masked-right ranges.

Head dims: tensor-core dots need power-of-two tiles >= 16. A head dim that is not a power of two
is split into a power-of-two part plus a power-of-two tail (72 = 64 + 16 with 8 masked columns,
80 = 64 + 16, 96 = 64 + 32) and every dot over D becomes two dots, instead of padding to 128
(which would waste 44% / 37% / 25% of the tensor-core work). ``head_split="pad"`` pads instead,
kept for measuring the two against each other.

Precision: fp16/bf16 dots accumulate in fp32; the softmax runs in fp32 in base 2 (``exp2``,
scores pre-multiplied by ``softmax_scale * log2(e)``). fp32 inputs use full-precision ("ieee")
dots, not tf32, so fp32 results keep fp32 accuracy (at a large speed cost on GPU). float64 is
not supported (the backend's ``check`` says so and ``auto`` falls to ``tiled``).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..conventions import fold_window
from ..hardware.profiles import TritonTiles
from . import triton_common as tc
from .triton_common import LN2, block_ranges, dot, dot_d, effective_split, load2d, split_head_dim

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc0, acc1, l_i, m_i,
    q0, q1,
    k_base, v_base, stride_ks, stride_vs,
    lo, hi,
    offs_m, seqlen_k, off, window_left, window_right, qk_scale,
    kd, vd, b, h_kv,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    TMA: tl.constexpr, POS_SCALE: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1 if BLOCK_D1 > 0 else 16)
    d0_ok = offs_d0 < HEAD_DIM
    d1_ok = offs_d1 < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seqlen_k
        # -- s = q k^T, over the main part of D and the tail
        if TMA:  # whole (N, D) tile by the copy engine, zero past this sequence's end
            k0 = tl.trans(kd.load([b, start_n, h_kv * HEAD_DIM]).reshape(BLOCK_N, BLOCK_D0))
        else:
            k0 = load2d(k_base + cols[None, :] * stride_ks + offs_d0[:, None],  # (D0, N)
                        n_ok[None, :], d0_ok[:, None], MASK, BLOCK_D0 > HEAD_DIM)
        s = dot_d(q0, k0, None, DOT_PREC)
        if BLOCK_D1 > 0:
            k1 = load2d(k_base + cols[None, :] * stride_ks + offs_d1[:, None],
                        n_ok[None, :], d1_ok[:, None], MASK, BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
            s = dot_d(q1, k1, s, DOT_PREC)
        if MASK:
            s = s * qk_scale  # log2 units
            vis = n_ok[None, :]
            if HAS_RIGHT:
                vis = vis & (cols[None, :] <= offs_m[:, None] + off + window_right)
            if HAS_LEFT:
                vis = vis & (cols[None, :] >= offs_m[:, None] + off - window_left)
            s = tl.where(vis, s, float("-inf"))
            # -- update m_i and l_i (a row that has seen no key keeps m = -inf: use 0 as its pivot)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_pivot[:, None])
        elif POS_SCALE:
            # unmasked tile: max on the raw scores (scale > 0), then scale and shift in one FMA
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_pivot = m_new
            p = tl.math.exp2(s * qk_scale - m_pivot[:, None])
        else:
            s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_pivot = m_new
            p = tl.math.exp2(s - m_pivot[:, None])
        alpha = tl.math.exp2(m_i - m_pivot)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- acc = acc * alpha + p v
        if TMA:
            v0 = vd.load([b, start_n, h_kv * HEAD_DIM]).reshape(BLOCK_N, BLOCK_D0)
        else:
            v0 = load2d(v_base + cols[:, None] * stride_vs + offs_d0[None, :],  # (N, D0)
                        n_ok[:, None], d0_ok[None, :], MASK, BLOCK_D0 > HEAD_DIM)
        p_lo = p.to(v0.dtype)
        acc0 = dot(p_lo, v0, acc0 * alpha[:, None], DOT_PREC)
        if BLOCK_D1 > 0:
            v1 = load2d(v_base + cols[:, None] * stride_vs + offs_d1[None, :],
                        n_ok[:, None], d1_ok[None, :], MASK, BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
            acc1 = dot(p_lo, v1, acc1 * alpha[:, None], DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, CuSeqQ, CuSeqK, kd, vd,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    REVERSE_M: tl.constexpr, ALIGN8: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    POS_SCALE: tl.constexpr,
):
    tl.static_assert(BLOCK_D0 >= 16)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group  # GQA: query head h reads kv head h // group; K/V are never repeated
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
    if REVERSE_M:  # heaviest (last) causal query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    q_off = b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
    k_off = b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + h_kv * stride_kh
    v_off = b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + h_kv * stride_vh
    o_off = b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_os + h * stride_oh
    if ALIGN8:  # strides of a 72-wide head are multiples of 8, not 16: say so for vector loads
        q_off = tl.multiple_of(q_off, 8)
        k_off = tl.multiple_of(k_off, 8)
        v_off = tl.multiple_of(v_off, 8)
        o_off = tl.multiple_of(o_off, 8)
    q_base = Q + q_off
    k_base = K + k_off
    v_base = V + v_off
    o_base = Out + o_off

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1 if BLOCK_D1 > 0 else 16)
    m_ok = offs_m < seqlen_q
    q0 = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d0[None, :],
                 mask=m_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :], other=0.0)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        q1 = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d1[None, :],
                     mask=m_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        q1 = q0  # unused placeholders
        acc1 = tl.zeros([1, 1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo, full_lo, full_hi, hi = block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    off = seqlen_k - seqlen_q
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_ks, stride_vs,
                                      lo, full_lo, offs_m, seqlen_k, off, window_left, window_right, qk_scale, kd, vd, b, h_kv,
                                      HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, TMA, POS_SCALE)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_ks, stride_vs,
                                      full_lo, full_hi, offs_m, seqlen_k, off, window_left, window_right, qk_scale, kd, vd, b, h_kv,
                                      HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, DOT_PREC, TMA, POS_SCALE)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_ks, stride_vs,
                                      full_hi, hi, offs_m, seqlen_k, off, window_left, window_right, qk_scale, kd, vd, b, h_kv,
                                      HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, TMA, POS_SCALE)

    # -- epilogue: out = acc / l; a row that saw no key gives 0 and lse = -inf
    seen = l_i != 0.0  # a NaN row (NaN in q or k) keeps its NaN: out and lse NaN, not "saw no key"
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    lse_ptrs = Lse + b.to(tl.int64) * stride_lb + h * stride_lh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=m_ok)
    out0 = (acc0 * inv_l[:, None]).to(Out.dtype.element_ty)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d0[None, :], out0,
             mask=m_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :])
    if BLOCK_D1 > 0:
        out1 = (acc1 * inv_l[:, None]).to(Out.dtype.element_ty)
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d1[None, :], out1,
                 mask=m_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

# Tiles for calls that bring none (autotune list, the interpreter's tile, reverse_m): the
# profile's TritonTiles (hardware.profiles), or the schema's defaults when the caller gives none.
_DEFAULT_TILES = TritonTiles()
_TMA_FAILED: Dict[tuple, str] = {}  # tile configs whose TMA build failed -> the reason
_log = logging.getLogger("qwen3vl_flash")


def _aligned8(*tensors) -> bool:
    return all(all(s % 8 == 0 for s in t.stride()[:-1]) for t in tensors)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    config: Optional[dict] = None,
    head_split: str = "split",
    reverse_m: Optional[bool] = None,
    use_tma: Optional[bool] = None,
    tiles: Optional[TritonTiles] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (out like q, lse float32: (B, H, Sq) or (H, Tq)).

    use_tma: load K/V tiles through tensor descriptors (the TMA copy engine). None = where it
    can (dense, power-of-two head_dim, Hopper or newer; measured +3-7% on H100 at 4k-32k);
    True forces it where it is possible at all (also in the interpreter, for tests).

    config: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}; None autotunes over
    ``tiles.autotune_fwd`` once per (head_dim, dtype, mask kind, length bucket) on GPU, or uses
    ``tiles.interpret`` in the interpreter. reverse_m None: ``tiles.reverse_m``.

    tiles: the profile's :class:`~qwen3vl_flash.hardware.profiles.TritonTiles` for the fields
    above (None: the schema's defaults).
    """
    tiles = _DEFAULT_TILES if tiles is None else tiles
    varlen = cu_seqlens_q is not None
    q, k, v = tc.contig_last(q), tc.contig_last(k), tc.contig_last(v)
    D = q.shape[-1]
    H, Hkv = q.shape[-2], k.shape[-2]
    if varlen:
        Tq = q.shape[0]
        B = cu_seqlens_q.numel() - 1
        Sq, Sk = int(max_seqlen_q), int(max_seqlen_k)
        lse = torch.empty((H, Tq), dtype=torch.float32, device=q.device)
    else:
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    tc.poison(out, lse)
    left, right = fold_window(causal, window_size)
    d0, d1 = effective_split(D, head_split, q, k, v, out)
    sq, sk, sv, so, sl = tc.layout_strides(q, k, v, out, lse, varlen)
    if reverse_m is None:  # the profile's (measured on H100: off, see hardware.profiles)
        reverse_m = tiles.reverse_m
    dummy = cu_seqlens_q if varlen else q  # never read when VARLEN is False
    qk_scale = tc.log2_scale(softmax_scale)
    tma = tma_possible(q, k, v, varlen, d0, d1) and (use_tma if use_tma is not None else tma_default(q))
    statics = dict(
        HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        REVERSE_M=bool(reverse_m), ALIGN8=_aligned8(q, k, v, out), DOT_PREC=tc.dot_precision(q.dtype),
        TMA=tma, POS_SCALE=softmax_scale > 0,
    )

    def launch_with(cfg, use):
        grid = (triton.cdiv(max(Sq, 1), cfg["BLOCK_M"]), B * H)
        kd, vd = kv_descriptors(k, v, cfg["BLOCK_N"], D) if use else (dummy, dummy)
        _fwd_kernel[grid](
            q, k, v, out, lse, dummy, cu_seqlens_k if varlen else dummy, kd, vd,
            *sq, *sk, *sv, *so, *sl,
            Sq, Sk, H, H // Hkv,
            qk_scale, left, right,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
            **dict(statics, TMA=use),
        )

    def launch(cfg):
        """The TMA variant where possible; a config whose TMA build fails (ptxas crashed on some
        tiles with triton 3.6 on H100) falls back to pointer loads, remembered per config."""
        if tma:
            fkey = (tuple(sorted(cfg.items())), D, q.dtype, varlen, left >= 0, right >= 0)
            if fkey not in _TMA_FAILED:
                try:
                    return launch_with(cfg, True)
                except Exception as exc:  # compilation / resource errors of this tile
                    _TMA_FAILED[fkey] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                    _log.warning("qwen3vl_flash: Triton forward with TMA loads failed for %s (%s); "
                                 "using pointer loads for it", cfg, _TMA_FAILED[fkey])
        return launch_with(cfg, False)

    if config is None:
        key = ("fwd", D, head_split, q.dtype, varlen, left >= 0, right >= 0, tma, tc.next_pow2(max(Sq, Sk)),
               q.device.index)
        config = tc.autotune(launch, key, tiles.autotune_fwd, tiles.interpret)
    launch(config)
    return out, lse


def tma_default(q: torch.Tensor) -> bool:
    """Tensor descriptors by default on Hopper and newer GPUs (sm90+), not in the interpreter."""
    if tc.interpreting() or not q.is_cuda:
        return False
    return torch.cuda.get_device_capability(q.device) >= (9, 0)


def tma_possible(q, k, v, varlen: bool, d0: int, d1: int) -> bool:
    """Dense call, head_dim a power of two (one tile over D), K/V rows of Hkv*D contiguous
    elements per token and 16-byte aligned strides and base addresses (TMA's rules)."""
    if varlen or d1 or d0 != k.shape[-1] or k.dim() != 4:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (triton >= 3.4)
    except ImportError:
        return False
    es = k.element_size()
    for t in (k, v):
        if t.stride(3) != 1 or t.stride(2) != d0:
            return False
        if (t.stride(1) * es) % 16 or (t.stride(0) * es) % 16 or t.data_ptr() % 16:
            return False
    return True


def kv_descriptors(k, v, block_n: int, head_dim: int):
    """Host tensor descriptors over K and V viewed as (B, S, Hkv * D): a (1, block_n, D) box
    at [b, start, h_kv * D] is one head's tile; rows past S are zero-filled by the hardware."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for t in (k, v):
        B, S, Hkv, D = t.shape
        out.append(TensorDescriptor(t, [B, S, Hkv * D], [t.stride(0), t.stride(1), 1], [1, block_n, head_dim]))
    return out


__all__ = ["attention_forward", "effective_split", "kv_descriptors", "split_head_dim", "tma_default", "tma_possible"]
