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
multiplied once per group and never repeated in memory. Row tiles hold whole groups (``block_m``
is rounded down to a multiple of ``g``), so a row tile is a block of queries.

Working memory (:mod:`qwen3vl_flash.hardware.workspace`, :func:`plan_workspace`): the query rows
are folded one row tile at a time, and the output, lse and dQ are written tile by tile into the
results, so beyond its inputs and outputs a call holds only the layout copies of K and V (K^T and
V; K, K^T, V^T and the float32 dK / dV accumulators in the backward) and the tiles. The (batch,
KV head) pairs are processed in chunks whose copies and tiles fit the workspace limit; when one
pair does not fit, the tiles shrink. Chunking alone changes no tile and no summation order, so
results agree to the last bit but for a few elements: ATen computes the last (numel mod 32)
elements of an elementwise op (the per-row exp / log / sigmoid of the lse merge) with scalar
instead of vector code, and which elements those are follows the chunk's size (1 ulp; none
where no tile is partial, e.g. S a multiple of the tiles, in the cases checked). Smaller tiles change the summation
order: results within rounding of each other, held to the same rule against the reference.

Numerics (as FA2): every matmul returns its result in the accumulator dtype, float32 (float64 for
float64 inputs): the scores S, the partial P V of each key tile, and in the backward dP and each
tile's partial dQ / dK / dV, which are summed in float32 and rounded to the input dtype once, at
the end. The softmax scale is applied in float32 (folded into an fp32 Q, or into S). A 16-bit
matmul with an fp32 result is used where torch has one for the device (``bmm(..., out_dtype=)``,
probed once per device type and dtype) and, on a CPU, only where that CPU's 16-bit matmul is not
slower than its float32 one (:mod:`qwen3vl_flash.hardware.cpu_probe`, measured once per
process); P and dS are then rounded to the input dtype for their matmuls, as FA2 does. Elsewhere
(every CPU in torch 2.13, which has no such matmul) the 16-bit operands are upcast to float32 as
they are copied into their tiles and chunks, and the matmuls run in float32; inputs and results
stay 16-bit. Rounding S or a partial sum to bf16 instead is off by several bf16 steps
(tests/FOUND_BUGS.md, the two ``tiled`` precision entries). For float32 inputs the lse is kept in
float64 between forward and backward (returned to users as float32), so recomputing
P = exp(S - lse) stays accurate when the logits are large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from .._host import host_values
from ..conventions import fold_window, merge_lse_, warn_once
from ..hardware import cpu_probe, workspace
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


def _fold_rows(x5: torch.Tensor, b0: int, b1: int, i0: int, i1: int, h0: int, h1: int,
               dtype: torch.dtype) -> torch.Tensor:
    """One row tile of a chunk, folded: ``x5`` (B, S, Hkv, g, D) -> (Bc*Hc, (i1-i0)*g, D) contiguous
    in ``dtype`` (a 16-bit input is upcast here, in the copy: storage stays 16-bit)."""
    g, D = x5.shape[3], x5.shape[4]
    out = torch.empty(b1 - b0, h1 - h0, i1 - i0, g, D, dtype=dtype, device=x5.device)
    out.copy_(x5[b0:b1, i0:i1, h0:h1].transpose(1, 2))
    return out.view((b1 - b0) * (h1 - h0), (i1 - i0) * g, D)


def _lse_rows(lse4: torch.Tensor, b0: int, b1: int, i0: int, i1: int, h0: int, h1: int) -> torch.Tensor:
    """The lse of one row tile in the folded row order: ``lse4`` (B, Hkv, g, Sq) -> (Bc*Hc, (i1-i0)*g)."""
    t = lse4[b0:b1, h0:h1, :, i0:i1].transpose(2, 3)  # (Bc, Hc, nq, g)
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2] * t.shape[3])


# (device type, dtype) -> whether tiled keeps 16-bit matmul operands there: torch has
# bmm(..., out_dtype=float32) for them and, on a CPU, the 16-bit matmul is not slower than the
# float32 one (cpu_probe; $QWEN3VL_FLASH_CPU_LOWP pins it). Decided once per process.
_FP32_OUT_BMM: dict[tuple[str, torch.dtype], bool] = {}


def _operand_dtype(x: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """The dtype the matmul operands are kept in: the input dtype where a matmul of it can return
    ``acc`` and is fast (float32/float64 inputs; 16-bit ones where torch has ``bmm(..., out_dtype=)``
    for the device, e.g. CUDA, and the CPU's 16-bit matmul is not slow), else ``acc`` (upcast:
    every CPU in torch 2.13 has no such matmul)."""
    if x.dtype == acc:
        return acc
    key = (x.device.type, x.dtype)
    ok = _FP32_OUT_BMM.get(key)
    if ok is None:
        ok = _has_fp32_out_bmm(x.device, x.dtype, acc)
        if ok and x.device.type == "cpu" and cpu_probe.lowp_matmul_is_slow(x.dtype):
            ok = False  # a CPU that emulates 16-bit dot products: the fp32 upcast is faster
        _FP32_OUT_BMM[key] = ok
    return x.dtype if ok else acc


def _has_fp32_out_bmm(device: torch.device, dtype: torch.dtype, acc: torch.dtype) -> bool:
    """Whether ``torch.bmm(a, b, out_dtype=acc)`` works for ``dtype`` operands on ``device``."""
    try:
        a = torch.full((1, 2, 2), 1.5, dtype=dtype, device=device)
        r = torch.bmm(a, a, out_dtype=acc)
        return r.dtype == acc and bool((r == 4.5).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


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




# --------------------------------------------------------------------------------------------
# working memory: how a call is cut into chunks of (batch, KV head) pairs and tiles
# --------------------------------------------------------------------------------------------

# the smallest tiles a workspace limit shrinks to (row tiles hold at least one whole GQA group)
MIN_BLOCK_M, MIN_BLOCK_N = 32, 32
_CACHED_MASKS = 8  # partial-tile masks _Tiling keeps (causal diagonal patterns): an estimate


@dataclass(frozen=True)
class WorkspacePlan:
    """How one ``tiled`` call fits its working memory: ``pairs`` (batch, KV head) pairs per chunk,
    the row / key tiles, the estimated peak working bytes ``need`` under ``limit`` (None: no
    bound) and whether the limit is met (``fits``; False when one pair with the smallest tiles
    needs more)."""

    pairs: int
    block_m: int
    block_n: int
    need: int
    limit: Optional[int]
    fits: bool = True


def _rows_of(block_m: int, g: int) -> int:
    """Row tiles hold whole GQA groups: ``block_m`` rounded down to a multiple of ``g`` (at least g)."""
    return max(g, block_m - block_m % g)


def workspace_bytes(pairs: int, Sq: int, Sk: int, g: int, D: int, block_m: int, block_n: int,
                    op_size: int, acc_size: int, lowp: bool, backward: bool) -> int:
    """Peak working bytes of a chunk of ``pairs`` (batch, KV head) pairs (an upper estimate).

    Per pair: the layout copies of K / V in the operand dtype (``op_size`` bytes; K^T and V in the
    forward; K, K^T, V^T and the dK / dV accumulators in the backward), O(Sk D); and one row tile's
    buffers: the folded Q (and dO) rows, the accumulators, two score-sized tiles (S and P; dP and
    P), and their 16-bit copies where the matmuls take 16-bit operands (``lowp``). Plus the masks
    of the partial tiles, shared by all pairs."""
    rows, cols = min(_rows_of(block_m, g), Sq * g), min(block_n, Sk)
    small = 64  # per row: row max, lse, delta, the merge's weights (float64 at most)
    if backward:
        fixed = Sk * D * (3 * op_size + 2 * acc_size)
        tile = rows * (D * (2 * op_size + 4 * acc_size) + cols * (2 * acc_size + (2 * op_size if lowp else 0)) + small)
        tile += 2 * cols * D * acc_size if lowp else 0  # the fp32 results of the dK / dV matmuls
    else:
        fixed = 2 * Sk * D * op_size
        tile = rows * (D * (op_size + 3 * acc_size) + cols * (2 * acc_size + (op_size if lowp else 0)) + small)
    return pairs * (fixed + tile) + _CACHED_MASKS * rows * cols * (acc_size + 1)


def plan_workspace(B: int, Hkv: int, g: int, Sq: int, Sk: int, D: int, block_m: int, block_n: int,
                   op_size: int, acc_size: int, lowp: bool, backward: bool,
                   limit: Optional[int]) -> WorkspacePlan:
    """Cut a call into chunks of (batch, KV head) pairs that fit ``limit`` bytes, with the
    profile's tiles; if not even one pair fits, halve the key and the row tiles in turn, key tiles
    first (down to :data:`MIN_BLOCK_M` x :data:`MIN_BLOCK_N`; ``fits=False`` if even that needs more
    than ``limit``). Chunks are whole batch elements while a batch element fits, else runs of KV
    heads of one batch element. ``limit=None``: one chunk with the profile's tiles. Sizes in bytes
    (``op_size``: the matmul operands', ``acc_size``: the accumulators'; ``lowp``: 16-bit operands)."""
    total = B * Hkv
    bm, bn = _rows_of(block_m, g), block_n

    def need(pairs, bm, bn):
        return workspace_bytes(pairs, Sq, Sk, g, D, bm, bn, op_size, acc_size, lowp, backward)

    whole = need(total, bm, bn)
    if limit is None or whole <= limit:
        return WorkspacePlan(total, bm, bn, whole, limit)
    per_pair = need(1, bm, bn) - need(0, bm, bn)
    pairs = (limit - need(0, bm, bn)) // per_pair
    if pairs >= 1:
        pairs = pairs // Hkv * Hkv if pairs >= Hkv else pairs
        return WorkspacePlan(pairs, bm, bn, need(pairs, bm, bn), limit)
    min_m = _rows_of(max(MIN_BLOCK_M, g) + g - 1, g)
    while need(1, bm, bn) > limit and (bn > MIN_BLOCK_N or bm > min_m):
        if bn > MIN_BLOCK_N and (bn >= bm or bm <= min_m):
            bn = max(MIN_BLOCK_N, bn // 2)  # the K/V copies do not depend on the tiles: shrink these first
        else:
            bm = max(min_m, _rows_of(bm // 2, g))
    one = need(1, bm, bn)
    return WorkspacePlan(1, bm, bn, one, limit, fits=one <= limit)


def _plan(q: torch.Tensor, k: torch.Tensor, op_t: torch.dtype, acc_t: torch.dtype, block_m: int, block_n: int,
          backward: bool) -> WorkspacePlan:
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    op_size, acc_size = torch.finfo(op_t).bits // 8, torch.finfo(acc_t).bits // 8
    lowp = op_t != acc_t
    limit = workspace.workspace_limit()
    if limit is None:  # the default: one chunk, unless it would not fit the free memory
        whole = workspace_bytes(B * Hkv, Sq, Sk, g, D, block_m, block_n, op_size, acc_size, lowp, backward)
        limit = workspace.default_ceiling(q.device, whole)
    plan = plan_workspace(B, Hkv, g, Sq, Sk, D, block_m, block_n, op_size, acc_size, lowp, backward, limit)
    if not plan.fits:
        warn_once(("tiled-workspace", plan.limit, Sk, D),
                  "qwen3vl_flash: tiled needs at least %d bytes of working memory for one (batch, KV head) pair "
                  "at Sk=%d, head_dim=%d (its K/V copies and %dx%d tiles); the limit of %d bytes is not met",
                  plan.need, Sk, D, plan.block_m, plan.block_n, plan.limit)
    return plan


def _chunks(B: int, Hkv: int, pairs: int) -> Iterator[Tuple[int, int, int, int]]:
    """(b0, b1, h0, h1): whole batch elements while ``pairs >= Hkv``, else KV-head runs of one."""
    if pairs >= Hkv:
        step = pairs // Hkv
        for b0 in range(0, B, step):
            yield b0, min(b0 + step, B), 0, Hkv
    else:
        for b in range(B):
            for h0 in range(0, Hkv, pairs):
                yield b, b + 1, h0, min(h0 + pairs, Hkv)


# --------------------------------------------------------------------------------------------
# forward and backward
# --------------------------------------------------------------------------------------------


def _score_scale(op_t: torch.dtype, acc_t: torch.dtype, scale: float) -> Optional[float]:
    """The factor the scores still need: None when the scale is folded into an ``acc``-dtype Q
    (each row tile's copy is multiplied in ``acc`` precision), else ``scale`` applied to S (never
    folded into a 16-bit Q, whose rounding of q * scale would shift every score)."""
    return None if op_t == acc_t else scale


def _forward_core(q, k, v, scale: float, causal: bool, window, block_m: int, block_n: int,
                  out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq).

    Each key tile is reduced to a normalised partial result (P_t V_t, lse_t) with PyTorch's fused
    softmax (one pass over the tile instead of max / subtract / exp / sum), and partial results
    are merged by lse into a float32 accumulator (float64 for float64) with
    :func:`qwen3vl_flash.conventions.merge_lse_`, the merge context parallelism uses across
    devices. The tile's row sum comes for free: the largest softmax entry of a row is
    exp(0) / l = 1 / l. S, P and P_t V_t are all in the accumulator dtype (module docstring).
    ``out`` / ``lse`` (views of those shapes, e.g. one varlen segment's rows) receive the results
    when given; the working memory follows :func:`plan_workspace`.
    """
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    acc_t = lse_dtype(q.dtype)
    op_t = _operand_dtype(q, acc_t)
    s_scale = _score_scale(op_t, acc_t, scale)
    plan = _plan(q, k, op_t, acc_t, block_m, block_n, backward=False)
    bm = plan.block_m
    if out is None:
        out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, H, Sq, dtype=_lse_compute_dtype(q.dtype), device=q.device)
    q5, out5, lse4 = q.unflatten(2, (Hkv, g)), out.unflatten(2, (Hkv, g)), lse.unflatten(1, (Hkv, g))
    tiling = _Tiling(Sq, Sk, g, causal, window, plan.block_n, q.device, acc_t)
    lse_t_dtype = _lse_compute_dtype(q.dtype)
    ninf = float("-inf")
    R = Sq * g
    for b0, b1, h0, h1 in _chunks(B, Hkv, plan.pairs):
        Bc, Hc = b1 - b0, h1 - h0
        # K^T as a transposed view of K heads-first (the BLAS reads it as "NT"): with few keys per
        # tile, the contiguous K^T path of the fp32 bmm rounded 200+-long score dots 2.5x worse
        # (docs/reliability.md, item 8); the same speed at Qwen3-VL's shapes
        kT, vh = _kv_heads_first(k[b0:b1, :, h0:h1], op_t).transpose(1, 2), _kv_heads_first(v[b0:b1, :, h0:h1], op_t)
        for r0 in range(0, R, bm):
            r1 = min(r0 + bm, R)
            i0, i1 = r0 // g, r1 // g
            out_b = out5[b0:b1, i0:i1, h0:h1].transpose(1, 2)  # (Bc, Hc, nq, g, D) view of the result
            lse_b = lse4[b0:b1, h0:h1, :, i0:i1].transpose(2, 3)  # (Bc, Hc, nq, g)
            lo_c, hi_c = tiling.key_range(r0, r1)
            if lo_c >= hi_c:  # this row tile sees no key at all
                out_b.zero_()
                lse_b.fill_(ninf)
                continue
            qb = _fold_rows(q5, b0, b1, i0, i1, h0, h1, op_t)  # (Bc*Hc, rows, D)
            if s_scale is None:
                qb.mul_(scale)
            acc = lse_acc = None
            for c0, c1, bias, empty in tiling.tiles(r0, r1):
                s = _mm(qb, kT[:, :, c0:c1], acc_t)  # (BHc, rows, cols), fp32 (fp64)
                if s_scale is not None:
                    s.mul_(s_scale)
                if bias is not None:
                    s.add_(bias)
                m_t = s.amax(-1).to(lse_t_dtype)
                p = torch.softmax(s, -1)
                del s
                # lse_t = m_t + log(l_t), with 1 / l_t = max_j p_j
                lse_t = m_t - torch.log(p.amax(-1).to(lse_t_dtype))
                if empty is not None:  # rows that see none of this tile's keys: P = 0, lse_t = -inf
                    p[:, empty] = 0
                    lse_t[:, empty] = ninf
                pv = _mm(p.to(op_t), vh[:, c0:c1], acc_t)  # P rounded to a 16-bit op_t only (FA2)
                del p
                if acc is None:
                    acc, lse_acc = pv, lse_t
                else:
                    merge_lse_(acc, lse_acc, pv, lse_t)
                del pv
            out_b.copy_(acc.view(Bc, Hc, i1 - i0, g, D))
            lse_b.copy_(lse_acc.view(Bc, Hc, i1 - i0, g))
            del acc, lse_acc, qb
        del kT, vh
    return out, lse


def _backward_core(dout, q, k, v, out, lse, scale: float, causal: bool, window, block_m: int, block_n: int,
                   dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None,
                   dv: Optional[torch.Tensor] = None):
    """FA2 backward: recompute P = exp(S - lse) per tile; returns dq, dk, dv in the input dtype
    (written into ``dq`` / ``dk`` / ``dv`` when given, e.g. one varlen segment's rows).

    S, dP = dO V^T and dS = P (dP - D) are float32 (float64 for float64); every tile's partial
    dQ / dK / dV is a float32 matmul result summed into float32 accumulators, rounded to the
    input dtype once at the end (rounding each partial to bf16 first is off by several bf16 steps
    when many row tiles add into one dV row: tests/FOUND_BUGS.md). The working memory follows
    :func:`plan_workspace` (a chunk's dK / dV accumulators are O(Sk) per pair)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    acc_t = lse_dtype(q.dtype)
    # the forward's scores are recomputed from the same operands and the same scaling
    op_t = _operand_dtype(q, acc_t)
    s_scale = _score_scale(op_t, acc_t, scale)
    plan = _plan(q, k, op_t, acc_t, block_m, block_n, backward=True)
    bm = plan.block_m
    dq = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    q5, do5, o5 = q.unflatten(2, (Hkv, g)), dout.unflatten(2, (Hkv, g)), out.unflatten(2, (Hkv, g))
    dq5, lse4 = dq.unflatten(2, (Hkv, g)), lse.unflatten(1, (Hkv, g))
    tiling = _Tiling(Sq, Sk, g, causal, window, plan.block_n, q.device, acc_t)
    native = op_t == acc_t  # operands in the accumulator dtype: accumulate in place (baddbmm_)
    R = Sq * g
    for b0, b1, h0, h1 in _chunks(B, Hkv, plan.pairs):
        Bc, Hc = b1 - b0, h1 - h0
        kc, vc = k[b0:b1, :, h0:h1], v[b0:b1, :, h0:h1]
        kh, kT = _kv_heads_first(kc, op_t), _kv_transposed(kc, op_t)
        # dP = dO V^T in the accumulator dtype (as FA2 keeps it in fp32 registers): rounded to bf16 it
        # would lose everything in dS = P (dP - D) where dP ~ D (one visible key: dS = 0 exactly)
        vT = _kv_transposed(vc, op_t)
        dk_acc = torch.zeros(Bc * Hc, Sk, D, dtype=acc_t, device=q.device)
        dv_acc = torch.zeros(Bc * Hc, Sk, D, dtype=acc_t, device=q.device)
        for r0 in range(0, R, bm):
            r1 = min(r0 + bm, R)
            i0, i1 = r0 // g, r1 // g
            dq_view = dq5[b0:b1, i0:i1, h0:h1].transpose(1, 2)  # (Bc, Hc, nq, g, D) view of the result
            lo_c, hi_c = tiling.key_range(r0, r1)
            if lo_c >= hi_c:
                dq_view.zero_()
                continue
            qb = _fold_rows(q5, b0, b1, i0, i1, h0, h1, op_t)
            if s_scale is None:
                qb.mul_(scale)
            dob = _fold_rows(do5, b0, b1, i0, i1, h0, h1, op_t)
            # D_i = rowsum(dO * O): the softmax-Jacobian term, one number per query row
            do_acc = dob if native else _fold_rows(do5, b0, b1, i0, i1, h0, h1, acc_t)
            delta_b = do_acc.mul(_fold_rows(o5, b0, b1, i0, i1, h0, h1, acc_t)).sum(-1, keepdim=True)
            del do_acc
            # lse per folded row; rows that saw nothing get +inf so P = 0 there. A float64 lse for
            # float32 inputs is split into hi + lo float32 parts: S - hi is exact near the row max
            # (Sterbenz), so P = exp(S - hi - lo) keeps float32 accuracy even when |lse| is large.
            lse_b = _lse_rows(lse4, b0, b1, i0, i1, h0, h1)
            lse_b = lse_b.masked_fill(torch.isneginf(lse_b), float("inf"))
            hi_b = lse_b.to(acc_t)
            lo_b = None
            if lse_b.dtype != acc_t:
                lo_b = torch.where(torch.isinf(lse_b), 0.0, lse_b - hi_b.to(lse_b.dtype)).to(acc_t).unsqueeze(-1)
            hi_b = hi_b.unsqueeze(-1)
            dq_b = torch.zeros(Bc * Hc, r1 - r0, D, dtype=acc_t, device=q.device)
            for c0, c1, bias, _ in tiling.tiles(r0, r1):
                kb = kh[:, c0:c1]
                p = _mm(qb, kT[:, :, c0:c1], acc_t)  # (BHc, rows, cols)
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
                    dv_acc[:, c0:c1].baddbmm_(p.transpose(1, 2), dob)
                    dq_b.baddbmm_(ds, kb)
                    dk_acc[:, c0:c1].baddbmm_(ds.transpose(1, 2), qb)
                else:  # 16-bit operands with fp32 results: P and dS rounded for the matmuls (FA2)
                    p, ds = p.to(op_t), ds.to(op_t)
                    dv_acc[:, c0:c1] += _mm(p.transpose(1, 2), dob, acc_t)
                    dq_b += _mm(ds, kb, acc_t)
                    dk_acc[:, c0:c1] += _mm(ds.transpose(1, 2), qb, acc_t)
                del p, dp, ds
            dq_view.copy_(dq_b.mul_(scale).view(Bc, Hc, i1 - i0, g, D))
            del qb, dob, dq_b, delta_b
        if s_scale is not None:  # Q was not scaled: dK = scale * dS^T Q
            dk_acc.mul_(s_scale)
        dk[b0:b1, :, h0:h1].copy_(dk_acc.view(Bc, Hc, Sk, D).transpose(1, 2))
        dv[b0:b1, :, h0:h1].copy_(dv_acc.view(Bc, Hc, Sk, D).transpose(1, 2))
        del kh, kT, vT, dk_acc, dv_acc
    return dq, dk, dv


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
    def _blocks(p: AttnParams, D: int, dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
        prof = p.profile
        bm = getattr(prof, "block_m", 256) or 256
        bn = getattr(prof, "block_n", 512) or 512
        tuned = getattr(prof, "tiled_blocks", {}) if dtype is not None else {}
        return tuple(tuned.get(str(dtype).replace("torch.", ""), (bm, bn)))  # a tuned profile's, per dtype

    def forward(self, q, k, v, p: AttnParams):
        bm, bn = self._blocks(p, q.shape[-1], q.dtype)
        if not p.varlen:
            return _forward_core(q, k, v, p.softmax_scale, p.causal, p.window_size, bm, bn)
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for qs, qe, ks, ke in _segments(p):
            if qe == qs or ke == ks:
                continue
            _forward_core(
                q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                p.softmax_scale, p.causal, p.window_size, bm, bn,
                out=out[qs:qe].unsqueeze(0), lse=lse[:, qs:qe].unsqueeze(0),
            )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, p: AttnParams):
        bm, bn = self._blocks(p, q.shape[-1], q.dtype)
        if not p.varlen:
            return _backward_core(dout, q, k, v, out, lse, p.softmax_scale, p.causal, p.window_size, bm, bn)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qs, qe, ks, ke in _segments(p):
            if qe == qs or ke == ks:
                continue
            _backward_core(
                dout[qs:qe].unsqueeze(0), q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                out[qs:qe].unsqueeze(0), lse[:, qs:qe].unsqueeze(0), p.softmax_scale, p.causal, p.window_size, bm, bn,
                dq=dq[qs:qe].unsqueeze(0), dk=dk[ks:ke].unsqueeze(0), dv=dv[ks:ke].unsqueeze(0),
            )
        return dq, dk, dv


register_backend(TiledBackend())
