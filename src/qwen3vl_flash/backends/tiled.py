"""``tiled``: FlashAttention-2 in plain PyTorch, on any device and dtype (float64 included).

The executable specification the Triton kernels must match, and the portable fast path on CPUs.

Forward: tiles over queries *and* keys; each key tile of a query tile is reduced to a normalised
partial result (P V, lse) and merged into the fp32 accumulator by lse
(:func:`qwen3vl_flash.conventions.merge_lse_`, context parallelism's merge too), not FA2's
running max / sum rescale (that variant, faster on CPUs but not shipped, is
benchmarks/experiments/tiled_online_softmax.patch; docs/performance.md says why); lse saved.
Backward: recomputes P = exp(S - lse) tile by tile (FA2), so training memory is O(seq) too.

GQA: the ``g = H // Hkv`` query heads sharing a KV head are folded into the query rows
(``(B, Sq, H, D) -> (B*Hkv, Sq*g, D)``, row ``r`` is query ``r // g``), so each K/V tile is
multiplied once per group and never repeated in memory.

Numerics (as FA2): every matmul returns its result in the accumulator dtype, float32 (float64 for
float64 inputs): the scores S, the partial P V of each key tile, and in the backward dP and each
tile's partial dQ / dK / dV, which are summed in float32 and rounded to the input dtype once, at
the end. The softmax scale is applied in float32 (folded into an fp32 Q, or into S). A 16-bit
matmul with an fp32 result is used where torch has one for the device (``bmm(..., out_dtype=)``,
probed once per device type and dtype; P and dS are then rounded to the input dtype for their
matmuls, as FA2 does); elsewhere (the CPU in torch 2.13) the 16-bit operands are upcast to
float32 once per call (O(seq) copies of Q, K, V, dO) and the matmuls run in float32. Rounding S
or a partial sum to bf16 instead is off by several bf16 steps (tests/FOUND_BUGS.md, the two
``tiled`` precision entries). For float32 inputs the lse is kept in float64 between forward and
backward (returned to users as float32), so recomputing P = exp(S - lse) stays accurate when the
logits are large.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._host import host_values
from ..conventions import fold_window, merge_lse_
from ..reference import lse_dtype
from .base import AttnParams, AttnRequest, Backend, register_backend


def _lse_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float32/float64 inputs: the lse of large logits keeps full float32 accuracy
    for the backward (the public functions hand users float32); float32 for fp16/bf16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _fold(x: torch.Tensor, Hkv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, S, H, D) -> (B*Hkv, S*g, D) in ``dtype`` (default x's), one copy: the g query heads
    of a KV head become consecutive rows."""
    B, S, H, D = x.shape
    g = H // Hkv
    out = torch.empty(B, Hkv, S, g, D, dtype=dtype or x.dtype, device=x.device)
    out.copy_(x.view(B, S, Hkv, g, D).permute(0, 2, 1, 3, 4))
    return out.view(B * Hkv, S * g, D)


def _unfold(x: torch.Tensor, B: int, S: int, H: int) -> torch.Tensor:
    """(B*Hkv, S*g, D) -> (B, S, H, D), inverse of :func:`_fold`."""
    BH, R, D = x.shape
    Hkv = BH // B
    g = H // Hkv
    return x.view(B, Hkv, S, g, D).permute(0, 2, 1, 3, 4).reshape(B, S, H, D)


def _kv_heads_first(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B*Hkv, S, D) contiguous, in ``dtype`` (default x's), one copy."""
    B, S, Hkv, D = x.shape
    out = torch.empty(B, Hkv, S, D, dtype=dtype or x.dtype, device=x.device)
    out.copy_(x.transpose(1, 2))
    return out.view(B * Hkv, S, D)


def _kv_transposed(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B*Hkv, D, S) contiguous in ``dtype``: column slices feed the BLAS without a copy."""
    B, S, Hkv, D = x.shape
    out = torch.empty(B, Hkv, D, S, dtype=dtype or x.dtype, device=x.device)
    out.copy_(x.permute(0, 2, 3, 1))
    return out.view(B * Hkv, D, S)


# (device type, dtype) -> whether torch.bmm(a, b, out_dtype=float32) works there for 16-bit a, b
_FP32_OUT_BMM: dict[tuple[str, torch.dtype], bool] = {}


def _operand_dtype(x: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """The dtype the matmul operands are kept in: the input dtype where a matmul of it can return
    ``acc`` (float32/float64 inputs; 16-bit ones where torch has ``bmm(..., out_dtype=)`` for the
    device, e.g. CUDA), else ``acc`` (upcast: the CPU in torch 2.13 has no such matmul)."""
    if x.dtype == acc:
        return acc
    key = (x.device.type, x.dtype)
    ok = _FP32_OUT_BMM.get(key)
    if ok is None:
        try:
            a = torch.full((1, 2, 2), 1.5, dtype=x.dtype, device=x.device)
            r = torch.bmm(a, a, out_dtype=acc)
            ok = r.dtype == acc and bool((r == 4.5).all())
        except (RuntimeError, NotImplementedError, TypeError):
            ok = False
        _FP32_OUT_BMM[key] = ok
    return x.dtype if ok else acc


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b (batched) with an ``acc`` result: never rounded to a 16-bit dtype."""
    return torch.bmm(a, b) if a.dtype == acc else torch.bmm(a, b, out_dtype=acc)


class _Tiling:
    """Which key tiles a query-row tile visits, and the masks of the partially visible ones.

    Rows are folded (query i = r // g); keys are aligned bottom-right (offset Sk - Sq). A partial
    tile's mask is an additive bias (0 / -inf, in the score dtype: one fused add instead of a
    masked_fill) plus the indices of rows that see none of its keys, cached because the diagonal
    tiles repeat the same pattern.
    """

    def __init__(self, Sq: int, Sk: int, g: int, causal: bool, window: Tuple[int, int], block_n: int, device, dtype):
        left, right = fold_window(causal, window)
        self.Sk, self.g, self.off = Sk, g, Sk - Sq
        self.left, self.right, self.block_n, self.device, self.dtype = left, right, block_n, device, dtype
        self._masks = {}

    def key_range(self, r0: int, r1: int) -> Tuple[int, int]:
        i_lo, i_hi = r0 // self.g + self.off, (r1 - 1) // self.g + self.off
        lo = max(0, i_lo - self.left) if self.left >= 0 else 0
        hi = min(self.Sk, i_hi + self.right + 1) if self.right >= 0 else self.Sk
        return lo, hi

    def tiles(self, r0: int, r1: int):
        """Yield (c0, c1, bias | None, empty_rows | None) for the key tiles rows r0:r1 can see."""
        lo, hi = self.key_range(r0, r1)
        if lo >= hi:
            return
        i_lo, i_hi = r0 // self.g + self.off, (r1 - 1) // self.g + self.off
        bn = self.block_n
        for c0 in range(lo - lo % bn, hi, bn):
            c1 = min(c0 + bn, hi)  # keys past hi are masked for every row: never computed
            full = (self.right < 0 or c1 - 1 <= i_lo + self.right) and (self.left < 0 or c0 >= i_hi - self.left)
            if full:
                yield c0, c1, None, None
            else:
                yield (c0, c1) + self._mask(r0, r1, c0, c1)

    def _mask(self, r0, r1, c0, c1):
        # the mask depends only on the rows' position relative to the keys
        key = (r0 % self.g, r1 - r0, c1 - c0, c0 - (r0 // self.g + self.off))
        hit = self._masks.get(key)
        if hit is None:
            i = (torch.arange(r0, r1, device=self.device) // self.g + self.off).unsqueeze(1)
            j = torch.arange(c0, c1, device=self.device).unsqueeze(0)
            visible = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=self.device)
            if self.right >= 0:
                visible &= j <= i + self.right
            if self.left >= 0:
                visible &= j >= i - self.left
            bias = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
            empty = (~visible.any(-1)).nonzero().flatten()
            hit = self._masks[key] = (bias, empty if empty.numel() else None)
        return hit


def _prepare_q(q: torch.Tensor, Hkv: int, scale: float, acc: torch.dtype):
    """Folded Q in the operand dtype, and the factor the scores still need: the softmax scale is
    applied in ``acc`` precision, folded into Q when Q is kept in ``acc`` (never into a 16-bit Q,
    whose rounding of q * scale would shift every score)."""
    op = _operand_dtype(q, acc)
    qf = _fold(q, Hkv, op)
    if op == acc:
        return qf.mul_(scale), None
    return qf, scale


def _forward_core(q, k, v, scale: float, causal: bool, window, block_m: int, block_n: int):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq).

    Each key tile is reduced to a normalised partial result (P_t V_t, lse_t) with PyTorch's fused
    softmax (one pass over the tile instead of max / subtract / exp / sum), and partial results
    are merged by lse into a float32 accumulator (float64 for float64) with
    :func:`qwen3vl_flash.conventions.merge_lse_`, the merge context parallelism uses across
    devices. The tile's row sum comes for free: the largest softmax entry of a row is
    exp(0) / l = 1 / l. S, P and P_t V_t are all in the accumulator dtype (module docstring).
    """
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    acc_t = lse_dtype(q.dtype)
    lse_t_dtype = _lse_compute_dtype(q.dtype)
    qf, s_scale = _prepare_q(q, Hkv, scale, acc_t)  # (BH, R, D)
    op_t = qf.dtype
    kT, vh = _kv_transposed(k, op_t), _kv_heads_first(v, op_t)
    BH, R = qf.shape[0], qf.shape[1]
    out = torch.empty(BH, R, D, dtype=q.dtype, device=q.device)
    lse_rows = torch.empty(BH, R, dtype=lse_t_dtype, device=q.device)
    tiling = _Tiling(Sq, Sk, g, causal, window, block_n, q.device, acc_t)
    ninf = float("-inf")
    for r0 in range(0, R, block_m):
        r1 = min(r0 + block_m, R)
        qb = qf[:, r0:r1]
        acc = lse = None
        for c0, c1, bias, empty in tiling.tiles(r0, r1):
            s = _mm(qb, kT[:, :, c0:c1], acc_t)  # (BH, rows, cols), fp32 (fp64)
            if s_scale is not None:
                s.mul_(s_scale)
            if bias is not None:
                s.add_(bias)
            m_t = s.amax(-1).to(lse_t_dtype)
            p = torch.softmax(s, -1)
            # lse_t = m_t + log(l_t), with 1 / l_t = max_j p_j
            lse_t = m_t - torch.log(p.amax(-1).to(lse_t_dtype))
            if empty is not None:  # rows that see none of this tile's keys: P = 0, lse_t = -inf
                p[:, empty] = 0
                lse_t[:, empty] = ninf
            pv = _mm(p.to(op_t), vh[:, c0:c1], acc_t)  # P rounded to a 16-bit op_t only (FA2)
            if acc is None:
                acc, lse = pv, lse_t
            else:
                merge_lse_(acc, lse, pv, lse_t)
        if acc is None:  # this row tile sees no key at all
            out[:, r0:r1] = 0
            lse_rows[:, r0:r1] = ninf
        else:
            out[:, r0:r1] = acc
            lse_rows[:, r0:r1] = lse
    lse = lse_rows.view(B, Hkv, Sq, g).transpose(2, 3).reshape(B, H, Sq)
    return _unfold(out, B, Sq, H), lse


def _backward_core(dout, q, k, v, out, lse, scale: float, causal: bool, window, block_m: int, block_n: int):
    """FA2 backward: recompute P = exp(S - lse) per tile; returns dq, dk, dv in the input dtype.

    S, dP = dO V^T and dS = P (dP - D) are float32 (float64 for float64); every tile's partial
    dQ / dK / dV is a float32 matmul result summed into float32 accumulators, rounded to the
    input dtype once at the end (rounding each partial to bf16 first is off by several bf16 steps
    when many row tiles add into one dV row: tests/FOUND_BUGS.md)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    acc_t = lse_dtype(q.dtype)
    # the forward's scores are recomputed from the same operands and the same scaling
    qf, s_scale = _prepare_q(q, Hkv, scale, acc_t)
    op_t = qf.dtype
    dof = _fold(dout, Hkv, op_t)
    # D_i = rowsum(dO * O): the softmax-Jacobian term, one number per query row
    delta = (_fold(dout, Hkv, acc_t) if op_t != acc_t else dof).mul(_fold(out, Hkv, acc_t)).sum(-1)
    # lse per folded row; rows that saw nothing get +inf so P = 0 there. A float64 lse for float32
    # inputs is split into hi + lo float32 parts: S - hi is exact near the row max (Sterbenz), so
    # P = exp(S - hi - lo) keeps float32 accuracy even when |lse| is large.
    lse_rows = lse.view(B, Hkv, g, Sq).transpose(2, 3).reshape(B * Hkv, Sq * g)
    lse_rows = lse_rows.masked_fill(torch.isneginf(lse_rows), float("inf"))
    lse_hi = lse_rows.to(acc_t)
    lse_lo = None
    if lse_rows.dtype != acc_t:
        lse_lo = torch.where(torch.isinf(lse_rows), 0.0, lse_rows - lse_hi.to(lse_rows.dtype)).to(acc_t)
    kh, kT = _kv_heads_first(k, op_t), _kv_transposed(k, op_t)
    # dP = dO V^T in the accumulator dtype (as FA2 keeps it in fp32 registers): rounded to bf16 it
    # would lose everything in dS = P (dP - D) where dP ~ D (one visible key: dS = 0 exactly)
    vT = _kv_transposed(v, op_t)
    BH, R = qf.shape[0], qf.shape[1]
    dq = torch.empty(BH, R, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(BH, Sk, D, dtype=acc_t, device=q.device)
    dv = torch.zeros(BH, Sk, D, dtype=acc_t, device=q.device)
    tiling = _Tiling(Sq, Sk, g, causal, window, block_n, q.device, acc_t)
    native = op_t == acc_t  # operands in the accumulator dtype: accumulate in place (baddbmm_)
    for r0 in range(0, R, block_m):
        r1 = min(r0 + block_m, R)
        qb, dob = qf[:, r0:r1], dof[:, r0:r1]
        dq_b = torch.zeros(BH, r1 - r0, D, dtype=acc_t, device=q.device)
        hi_b, delta_b = lse_hi[:, r0:r1].unsqueeze(-1), delta[:, r0:r1].unsqueeze(-1)
        lo_b = lse_lo[:, r0:r1].unsqueeze(-1) if lse_lo is not None else None
        for c0, c1, bias, _ in tiling.tiles(r0, r1):
            kb = kh[:, c0:c1]
            p = _mm(qb, kT[:, :, c0:c1], acc_t)  # (BH, rows, cols)
            if s_scale is not None:
                p.mul_(s_scale)
            if bias is not None:
                p.add_(bias)
            p.sub_(hi_b)
            if lo_b is not None:
                p.sub_(lo_b)
            p.exp_()
            dp = _mm(dob, vT[:, :, c0:c1], acc_t)
            ds = dp.sub_(delta_b).mul_(p)  # dS = P * (dP - D)
            if native:
                dv[:, c0:c1].baddbmm_(p.transpose(1, 2), dob)
                dq_b.baddbmm_(ds, kb)
                dk[:, c0:c1].baddbmm_(ds.transpose(1, 2), qb)
            else:  # 16-bit operands with fp32 results: P and dS rounded for the matmuls (FA2)
                p, ds = p.to(op_t), ds.to(op_t)
                dv[:, c0:c1] += _mm(p.transpose(1, 2), dob, acc_t)
                dq_b += _mm(ds, kb, acc_t)
                dk[:, c0:c1] += _mm(ds.transpose(1, 2), qb, acc_t)
        dq[:, r0:r1] = dq_b.mul_(scale)
    if s_scale is not None:  # Q was not scaled: dK = scale * dS^T Q
        dk.mul_(s_scale)
    dk = dk.view(B, Hkv, Sk, D).transpose(1, 2).to(k.dtype)
    dv = dv.view(B, Hkv, Sk, D).transpose(1, 2).to(v.dtype)
    return _unfold(dq, B, Sq, H), dk, dv


def _segments(p: AttnParams):
    cq, ck = host_values(p.cu_seqlens_q), host_values(p.cu_seqlens_k)
    for b in range(len(cq) - 1):
        yield cq[b], cq[b + 1], ck[b], ck[b + 1]


class TiledBackend(Backend):
    name = "tiled"
    native_autograd = False
    strided_rows = True

    def check(self, req: AttnRequest) -> Optional[str]:
        return None  # any device, any float dtype, every feature

    @staticmethod
    def _blocks(p: AttnParams, D: int) -> Tuple[int, int]:
        prof = p.profile
        bm = getattr(prof, "block_m", 256) or 256
        bn = getattr(prof, "block_n", 512) or 512
        return bm, bn

    def forward(self, q, k, v, p: AttnParams):
        bm, bn = self._blocks(p, q.shape[-1])
        if not p.varlen:
            return _forward_core(q, k, v, p.softmax_scale, p.causal, p.window_size, bm, bn)
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for qs, qe, ks, ke in _segments(p):
            if qe == qs or ke == ks:
                continue
            o, l = _forward_core(
                q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                p.softmax_scale, p.causal, p.window_size, bm, bn,
            )
            out[qs:qe] = o[0]
            lse[:, qs:qe] = l[0]
        return out, lse

    def backward(self, dout, q, k, v, out, lse, p: AttnParams):
        bm, bn = self._blocks(p, q.shape[-1])
        if not p.varlen:
            return _backward_core(dout, q, k, v, out, lse, p.softmax_scale, p.causal, p.window_size, bm, bn)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qs, qe, ks, ke in _segments(p):
            if qe == qs or ke == ks:
                continue
            a, b, c = _backward_core(
                dout[qs:qe].unsqueeze(0), q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                out[qs:qe].unsqueeze(0), lse[:, qs:qe].unsqueeze(0), p.softmax_scale, p.causal, p.window_size, bm, bn,
            )
            dq[qs:qe], dk[ks:ke], dv[ks:ke] = a[0], b[0], c[0]
        return dq, dk, dv


register_backend(TiledBackend())
