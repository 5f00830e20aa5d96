"""Triton FlashAttention-2 backward: kernels, then a plain launcher.

Three kernels, no atomics (deterministic; atomic dQ accumulation costs about half the
throughput on H100):

1. ``_bwd_preprocess``: delta = rowsum(dO * O) in fp32, laid out like lse.
2. ``_bwd_dkdv``: one program per (key block, batch, kv head). K/V are loaded once; the program
   loops over the ``group`` query heads that share this kv head (GQA without repeated K/V: dK/dV
   of a kv head are the sums over its group) and over the query blocks that can see the key block,
   recomputing P^T = exp2(K Q^T * scale * log2e - lse * log2e).
3. ``_bwd_dq``: one program per (query block, batch, head), looping over key blocks like the
   forward.

Layouts, masking, head-dim splitting (72 = 64 + 16 ...) and precision are those of
:mod:`.triton_fwd`. Rows that saw no key (lse = -inf) and padding rows get lse = +inf here, so
their P is exactly 0 and they contribute nothing (no NaN from -inf - -inf).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..conventions import fold_window
from ..hardware.profiles import TritonTiles
from . import triton_common as tc
from .triton_common import LOG2E, block_ranges, dot, dot_d, load2d

# Tiles for calls that bring none (autotune list, the interpreter's tile, the preprocess block):
# the profile's TritonTiles (hardware.profiles), or the schema's defaults when the caller gives none.
_DEFAULT_TILES = TritonTiles()
# attention_backward's dq_mode -> the dK/dV kernel's FUSE_DQ
_DQ_MODES = {"kernel": 0, "atomic": 1, "tma": 2}


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta, CuSeqQ,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    stride_lb, stride_lh,
    seqlen_q, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
    else:
        q_start = 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b.to(tl.int64) * stride_db + h * stride_dh + rows[:, None] * stride_ds + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + b.to(tl.int64) * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_lse2(Lse, lse_base, rows, row_ok):
    """lse in log2 units; +inf for padding rows and rows that saw no key, so exp2(s - lse2) = 0."""
    lse = tl.load(Lse + lse_base + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * LOG2E


@triton.jit
def _dkdv_inner(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1,
    q_base, do_base, stride_qs, stride_dos, Lse, Delta, lse_base,
    lo, hi, offs_n, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
    dqa_base, stride_dqas, dq_desc, dq_row0, dq_col,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1 if BLOCK_D1 > 0 else 16)
    d0_ok = offs_d0 < HEAD_DIM
    d1_ok = offs_d1 < HEAD_DIM
    MASK_D0: tl.constexpr = BLOCK_D0 > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D0 + BLOCK_D1 > HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_mb
        m_ok = rows < seqlen_q
        # -- s^T = k q^T  (N, M)
        q0t = load2d(q_base + rows[None, :] * stride_qs + offs_d0[:, None],  # (D0, M)
                     m_ok[None, :], d0_ok[:, None], MASK, MASK_D0)
        st = dot_d(k0, q0t, None, DOT_PREC)
        if BLOCK_D1 > 0:
            q1t = load2d(q_base + rows[None, :] * stride_qs + offs_d1[:, None],
                         m_ok[None, :], d1_ok[:, None], MASK, MASK_D1)
            st = dot_d(k1, q1t, st, DOT_PREC)
        lse2 = _load_lse2(Lse, lse_base, rows, m_ok)
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        if MASK:
            vis = (offs_n < seqlen_k)[:, None]
            if HAS_RIGHT:
                vis = vis & (offs_n[:, None] <= rows[None, :] + off + window_right)
            if HAS_LEFT:
                vis = vis & (offs_n[:, None] >= rows[None, :] + off - window_left)
            pt = tl.where(vis, pt, 0.0)
        # -- dV += P^T dO
        do0 = load2d(do_base + rows[:, None] * stride_dos + offs_d0[None, :],  # (M, D0)
                     m_ok[:, None], d0_ok[None, :], MASK, MASK_D0)
        pt_lo = pt.to(do0.dtype)
        dv0 = dot(pt_lo, do0, dv0, DOT_PREC)
        # -- dP^T = V dO^T
        dpt = dot_d(v0, tl.trans(do0), None, DOT_PREC)
        if BLOCK_D1 > 0:
            do1 = load2d(do_base + rows[:, None] * stride_dos + offs_d1[None, :],
                         m_ok[:, None], d1_ok[None, :], MASK, MASK_D1)
            dv1 = dot(pt_lo, do1, dv1, DOT_PREC)
            dpt = dot_d(v1, tl.trans(do1), dpt, DOT_PREC)
        # -- dS^T = P^T * (dP^T - delta);  dK += dS^T q  (scale applied once at the end)
        delta = tl.load(Delta + lse_base + rows, mask=m_ok, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(q0t.dtype)
        dk0 = dot(dst, tl.trans(q0t), dk0, DOT_PREC)
        if BLOCK_D1 > 0:
            dk1 = dot(dst, tl.trans(q1t), dk1, DOT_PREC)
        # -- dQ += dS k, added in fp32 to a shared accumulator (scale applied after the kernel)
        if FUSE_DQ == 2:  # TMA reduce: one bulk add of the (M, D) tile; rows past the end are clipped
            dq_desc.atomic_add([dq_row0 + start_m, dq_col], dot(tl.trans(dst), k0, None, DOT_PREC))
        elif FUSE_DQ == 1:
            dq_ptrs = dqa_base + rows[:, None] * stride_dqas + offs_d0[None, :]
            tl.atomic_add(dq_ptrs, dot(tl.trans(dst), k0, None, DOT_PREC),
                          mask=m_ok[:, None] & d0_ok[None, :], sem="relaxed")
            if BLOCK_D1 > 0:
                dq_ptrs = dqa_base + rows[:, None] * stride_dqas + offs_d1[None, :]
                tl.atomic_add(dq_ptrs, dot(tl.trans(dst), k1, None, DOT_PREC),
                              mask=m_ok[:, None] & d1_ok[None, :], sem="relaxed")
    return dk0, dk1, dv0, dv1


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, CuSeqQ, CuSeqK, DQA, dq_desc,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqab, stride_dqas, stride_dqah,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_kv_heads, group,
    qk_scale, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr = 0,
):
    tl.static_assert(BLOCK_D0 >= 16)
    tl.static_assert(BLOCK_D0 + BLOCK_D1 >= HEAD_DIM)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1 if BLOCK_D1 > 0 else 16)
    n_ok = offs_n < seqlen_k
    k_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + h_kv * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + h_kv * stride_vh
    k0 = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d0[None, :],
                 mask=n_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :], other=0.0)  # (N, D0)
    v0 = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d0[None, :],
                 mask=n_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :], other=0.0)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        k1 = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d1[None, :],
                     mask=n_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :], other=0.0)
        v1 = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d1[None, :],
                     mask=n_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :], other=0.0)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    else:
        k1 = k0  # unused placeholders
        v1 = v0
        dk1 = tl.zeros([1, 1], dtype=tl.float32)
        dv1 = tl.zeros([1, 1], dtype=tl.float32)

    # query rows that see some key of [n0, n_last]: right bound m >= n0 - off - right,
    # left bound m <= n_last - off + left; rows that see all of them: the reverse inequalities.
    n_last = n0 + BLOCK_N - 1
    if HAS_RIGHT:
        lo = tl.maximum(n0 - off - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(n_last - off - window_right, 0)
        full_lo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    if HAS_LEFT:
        hi = tl.minimum(seqlen_q, tl.maximum(n_last - off + window_left + 1, 0))
        full_hi = tl.minimum(seqlen_q, tl.maximum(n0 - off + window_left + 1, 0))
    else:
        hi = seqlen_q
        full_hi = seqlen_q
    full_hi = (full_hi // BLOCK_M) * BLOCK_M
    lo = tl.minimum(lo, hi)
    hi = tl.maximum(hi, lo)
    hi_ceil = ((hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_ceil)
    full_hi = tl.maximum(full_hi, full_lo)
    if n0 + BLOCK_N > seqlen_k:  # a partial key block is masked everywhere
        full_hi = full_lo

    for g in range(0, group):
        h = h_kv * group + g
        q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dos + h * stride_doh
        lse_base = b.to(tl.int64) * stride_lb + h * stride_lh + q_start
        dqa_base = DQA + b.to(tl.int64) * stride_dqab + q_start.to(tl.int64) * stride_dqas + h * stride_dqah
        # the TMA accumulator is a 2-D (rows, H * D) view: dense rows b * seqlen_q + m, varlen q_start + m
        if VARLEN:
            dq_row0 = q_start
        else:
            dq_row0 = b * seqlen_q
        dq_col = h * HEAD_DIM
        dk0, dk1, dv0, dv1 = _dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, stride_qs, stride_dos, Lse, Delta, lse_base,
            lo, full_lo, offs_n, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
            dqa_base, stride_dqas, dq_desc, dq_row0, dq_col,
            HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, FUSE_DQ)
        dk0, dk1, dv0, dv1 = _dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, stride_qs, stride_dos, Lse, Delta, lse_base,
            full_lo, full_hi, offs_n, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
            dqa_base, stride_dqas, dq_desc, dq_row0, dq_col,
            HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M, False, HAS_LEFT, HAS_RIGHT, DOT_PREC, FUSE_DQ)
        dk0, dk1, dv0, dv1 = _dkdv_inner(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, stride_qs, stride_dos, Lse, Delta, lse_base,
            full_hi, hi, offs_n, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
            dqa_base, stride_dqas, dq_desc, dq_row0, dq_col,
            HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, FUSE_DQ)

    dk_base = DK + b.to(tl.int64) * stride_dkb + k_start.to(tl.int64) * stride_dks + h_kv * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + k_start.to(tl.int64) * stride_dvs + h_kv * stride_dvh
    mask0 = n_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :]
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d0[None, :], (dk0 * softmax_scale).to(DK.dtype.element_ty), mask=mask0)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d0[None, :], dv0.to(DV.dtype.element_ty), mask=mask0)
    if BLOCK_D1 > 0:
        mask1 = n_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :]
        tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d1[None, :], (dk1 * softmax_scale).to(DK.dtype.element_ty), mask=mask1)
        tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d1[None, :], dv1.to(DV.dtype.element_ty), mask=mask1)


@triton.jit
def _dq_inner(
    dq0, dq1, q0, q1, do0, do1, lse2, delta,
    k_base, v_base, stride_ks, stride_vs,
    lo, hi, offs_m, seqlen_k, off, window_left, window_right, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1 if BLOCK_D1 > 0 else 16)
    d0_ok = offs_d0 < HEAD_DIM
    d1_ok = offs_d1 < HEAD_DIM
    MASK_D0: tl.constexpr = BLOCK_D0 > HEAD_DIM
    MASK_D1: tl.constexpr = BLOCK_D0 + BLOCK_D1 > HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_nb
        n_ok = cols < seqlen_k
        k0t = load2d(k_base + cols[None, :] * stride_ks + offs_d0[:, None],  # (D0, N)
                     n_ok[None, :], d0_ok[:, None], MASK, MASK_D0)
        v0t = load2d(v_base + cols[None, :] * stride_vs + offs_d0[:, None],
                     n_ok[None, :], d0_ok[:, None], MASK, MASK_D0)
        s = dot_d(q0, k0t, None, DOT_PREC)
        dp = dot_d(do0, v0t, None, DOT_PREC)
        if BLOCK_D1 > 0:
            k1t = load2d(k_base + cols[None, :] * stride_ks + offs_d1[:, None],
                         n_ok[None, :], d1_ok[:, None], MASK, MASK_D1)
            v1t = load2d(v_base + cols[None, :] * stride_vs + offs_d1[:, None],
                         n_ok[None, :], d1_ok[:, None], MASK, MASK_D1)
            s = dot_d(q1, k1t, s, DOT_PREC)
            dp = dot_d(do1, v1t, dp, DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASK:
            vis = n_ok[None, :]
            if HAS_RIGHT:
                vis = vis & (cols[None, :] <= offs_m[:, None] + off + window_right)
            if HAS_LEFT:
                vis = vis & (cols[None, :] >= offs_m[:, None] + off - window_left)
            p = tl.where(vis, p, 0.0)
        # -- dS = P * (dP - delta);  dQ += dS k
        ds = (p * (dp - delta[:, None])).to(k0t.dtype)
        dq0 = dot(ds, tl.trans(k0t), dq0, DOT_PREC)
        if BLOCK_D1 > 0:
            dq1 = dot(ds, tl.trans(k1t), dq1, DOT_PREC)
    return dq0, dq1


@triton.jit
def _bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, CuSeqQ, CuSeqK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads, group,
    qk_scale, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    REVERSE_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    tl.static_assert(BLOCK_D0 >= 16)
    tl.static_assert(BLOCK_D0 + BLOCK_D1 >= HEAD_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1 if BLOCK_D1 > 0 else 16)
    m_ok = offs_m < seqlen_q
    q_base = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dos + h * stride_doh
    k_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + h_kv * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + h_kv * stride_vh
    mask0 = m_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :]
    q0 = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d0[None, :], mask=mask0, other=0.0)
    do0 = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d0[None, :], mask=mask0, other=0.0)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        mask1 = m_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :]
        q1 = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d1[None, :], mask=mask1, other=0.0)
        do1 = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d1[None, :], mask=mask1, other=0.0)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        q1 = q0
        do1 = do0
        dq1 = tl.zeros([1, 1], dtype=tl.float32)
    lse_base = b.to(tl.int64) * stride_lb + h * stride_lh + q_start
    lse2 = _load_lse2(Lse, lse_base, offs_m, m_ok)
    delta = tl.load(Delta + lse_base + offs_m, mask=m_ok, other=0.0)

    lo, full_lo, full_hi, hi = block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    off = seqlen_k - seqlen_q
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                         lo, full_lo, offs_m, seqlen_k, off, window_left, window_right, qk_scale,
                         HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, DOT_PREC)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                         full_lo, full_hi, offs_m, seqlen_k, off, window_left, window_right, qk_scale,
                         HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, DOT_PREC)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                         full_hi, hi, offs_m, seqlen_k, off, window_left, window_right, qk_scale,
                         HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, DOT_PREC)
    dq_base = DQ + b.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqs + h * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d0[None, :],
             (dq0 * softmax_scale).to(DQ.dtype.element_ty), mask=mask0)
    if BLOCK_D1 > 0:
        tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d1[None, :],
                 (dq1 * softmax_scale).to(DQ.dtype.element_ty), mask=mask1)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def _tma_reduce_possible(q: torch.Tensor) -> bool:
    """TMA bulk reduce-adds: Hopper or newer GPUs (the interpreter of triton 3.9 has no descriptor
    reduce, so under it "tma" runs as "atomic")."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (triton >= 3.4)
    except ImportError:
        return False
    if tc.interpreting():
        return False
    return q.is_cuda and torch.cuda.get_device_capability(q.device) >= (9, 0)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    config: Optional[dict] = None,
    config_dq: Optional[dict] = None,
    head_split: str = "split",
    tiles: Optional[TritonTiles] = None,
    dq_mode: str = "kernel",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels. Returns (dq, dk, dv) shaped like (q, k, v).

    config: tiles of the dK/dV kernel; config_dq: of the dQ kernel (default: config). None
    autotunes over ``tiles.autotune_bwd`` on GPU, or uses ``tiles.interpret`` in the interpreter.
    tiles: the profile's :class:`~qwen3vl_flash.hardware.profiles.TritonTiles` for those and for
    ``preprocess_block_m`` (None: the schema's defaults).
    dq_mode: "kernel" (a dQ kernel of its own: deterministic, recomputes S and dP), "atomic" (dQ
    added in fp32 from the dK/dV kernel with relaxed atomics) or "tma" (the same through TMA
    bulk reduce-adds; dense or varlen with a power-of-two head dim on sm90+, else "atomic").
    """
    if dq_mode not in _DQ_MODES:
        raise ValueError(f"dq_mode must be one of {sorted(_DQ_MODES)}, got {dq_mode!r}")
    tiles = _DEFAULT_TILES if tiles is None else tiles
    varlen = cu_seqlens_q is not None
    q, k, v, out, dout = (tc.contig_last(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    D = q.shape[-1]
    H, Hkv = q.shape[-2], k.shape[-2]
    group = H // Hkv
    if varlen:
        B = cu_seqlens_q.numel() - 1
        Sq, Sk = int(max_seqlen_q), int(max_seqlen_k)
    else:
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    s0, s1 = tc.split_head_dim(D, head_split)
    if s1 and s0 >= 128:
        # A tail after a 128-wide main part (129 <= D < 256: 160 = 128 + 32, 200 = 128 + 128) hit an
        # illegal address in the backward on H100 / triton 3.6, masked or not (the fuzzer, seed
        # 130102, 2026-12-07); D=256 in one tile is exact. Zero-pad to the next power of two as
        # below, everywhere (the interpreter tests the path the GPU runs; slower for such head
        # dims, which Qwen3-VL does not use: 64 / 72 / 128).
        Dp = tc.next_pow2(D)
        pad = lambda t: torch.nn.functional.pad(t, (0, Dp - D))  # noqa: E731
        gq, gk, gv = attention_backward(
            pad(dout), pad(q), pad(k), pad(v), pad(out), lse, softmax_scale, causal, window_size,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config, config_dq, head_split, tiles,
            dq_mode,
        )
        return gq[..., :D].contiguous(), gk[..., :D].contiguous(), gv[..., :D].contiguous()
    if s1 and s0 + s1 > D:
        # A masked tail (72 = 64 + 16) in the backward hit an illegal address on H100 / triton 3.6,
        # and padding the tiles to 128 with masked loads ran at 41 TF/s (dK/dV 34 ms of 45 for
        # vision hd72 16 heads S=16k, vs 11 ms at hd128). Zero-pad the tensors instead, to
        # d0 + d1 = 80 columns: the tail becomes an unmasked 16-wide dot (hd80 is exact on H100),
        # zero columns add nothing to Q K^T or to rowsum(dO * O), and the extra gradient columns
        # are dropped.
        Dp = s0 + s1
        pad = lambda t: torch.nn.functional.pad(t, (0, Dp - D))  # noqa: E731
        gq, gk, gv = attention_backward(
            pad(dout), pad(q), pad(k), pad(v), pad(out), lse, softmax_scale, causal, window_size,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config, config_dq, head_split, tiles,
            dq_mode,
        )
        return gq[..., :D].contiguous(), gk[..., :D].contiguous(), gv[..., :D].contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse, dtype=torch.float32)
    tc.poison(dq, dk, dv, delta)
    left, right = fold_window(causal, window_size)
    d0, d1 = tc.effective_split(D, head_split, q, k, v, out, dout, dq, dk, dv)
    if d1 and d0 + d1 > D:  # head_split="pad": one tile over D, masked
        d0, d1 = tc.split_head_dim(D, "pad")
    sq, sk, sv, sdo, sl = tc.layout_strides(q, k, v, dout, lse, varlen)
    _, _, _, sdq, _ = tc.layout_strides(q, k, v, dq, lse, varlen)
    _, sdk, sdv, _, _ = tc.layout_strides(q, dk, dv, dq, lse, varlen)
    _, _, _, so, _ = tc.layout_strides(q, k, v, out, lse, varlen)
    cu_q = cu_seqlens_q if varlen else q  # never read when VARLEN is False
    cu_k = cu_seqlens_k if varlen else q
    prec = tc.dot_precision(q.dtype)
    masks = dict(VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, DOT_PREC=prec)
    heads = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1)
    qk_scale = tc.log2_scale(softmax_scale)

    pre_m = tiles.preprocess_block_m
    _bwd_preprocess[(triton.cdiv(max(Sq, 1), pre_m), B * H)](
        out, dout, delta, cu_q, *so, *sdo, *sl, Sq, H,
        HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=tc.next_pow2(max(D, 16)), VARLEN=varlen,
    )

    fuse = _DQ_MODES[dq_mode]
    if fuse == 2 and not (d1 == 0 and d0 == D and _tma_reduce_possible(q)):
        fuse = 1
    if fuse:
        dqa = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        sdqa = tc.layout_strides(q, k, v, dqa, lse, varlen)[3]
    else:
        dqa, sdqa = delta, (0, 0, 0)  # never read

    def launch_dkdv(cfg):
        if fuse:
            dqa.zero_()  # autotuning launches it more than once
        desc = dqa
        if fuse == 2:
            from triton.tools.tensor_descriptor import TensorDescriptor

            flat = dqa.view(-1, H * D)
            desc = TensorDescriptor(flat, list(flat.shape), [H * D, 1], [cfg["BLOCK_M"], D])
        _bwd_dkdv[(triton.cdiv(max(Sk, 1), cfg["BLOCK_N"]), B * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, dqa, desc,
            *sq, *sk, *sv, *sdo, *sdk, *sdv, *sdqa, *sl,
            Sq, Sk, Hkv, group, qk_scale, float(softmax_scale), left, right,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FUSE_DQ=fuse,
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **heads, **masks,
        )

    def launch_dq(cfg):
        _bwd_dq[(triton.cdiv(max(Sq, 1), cfg["BLOCK_M"]), B * H)](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k,
            *sq, *sk, *sv, *sdo, *sdq, *sl,
            Sq, Sk, H, group, qk_scale, float(softmax_scale), left, right,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], REVERSE_M=right >= 0,
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **heads, **masks,
        )

    key = (D, head_split, q.dtype, varlen, left >= 0, right >= 0, tc.next_pow2(max(Sq, Sk)), q.device.index)
    if fuse:
        if config is None:
            config = tc.autotune(launch_dkdv, ("dkdv", fuse) + key, tiles.autotune_bwd, tiles.interpret)
        launch_dkdv(config)
        dq.copy_(dqa.mul_(float(softmax_scale)))
        return dq, dk, dv
    if config_dq is None:
        config_dq = config if config is not None else tc.autotune(launch_dq, ("dq",) + key, tiles.autotune_bwd,
                                                                  tiles.interpret)
    if config is None:
        config = tc.autotune(launch_dkdv, ("dkdv",) + key, tiles.autotune_bwd, tiles.interpret)
    launch_dkdv(config)
    launch_dq(config_dq)
    return dq, dk, dv


__all__ = ["attention_backward"]
