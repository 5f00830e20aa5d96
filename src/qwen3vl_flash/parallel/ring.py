"""Ring attention: K/V travel around the ring, each rank keeps its queries.

Step s on rank r computes its queries against the K/V block of rank ``src = (r - s) mod W``
while the block for step s+1 is already in flight (``batch_isend_irecv`` posted before the
compute, two K/V buffers alternating). Partial outputs are merged by lse in fp32 (fp64 for fp64
inputs) with :func:`.merge.merge_attn_outputs_` (in place).

Which part of a block is computed (local sequence of 2 chunks of c tokens for zigzag)::

    causal, zigzag (rank r holds chunks r and 2W-1-r)
      step 0   (src == r): both halves vs both halves, causal (local order = global order)
      src < r           : all 2c queries vs the first c keys (chunk src), no mask
      src > r           : the last c queries (chunk 2W-1-r) vs all 2c keys, no mask
    causal, contiguous: step 0 causal, src < r full, src > r skipped (nothing visible)
    not causal        : every block full

so with zigzag every step after the first costs exactly half a block on every rank.

Backward (FA2 with the *global* out and lse): each block's dq/dk/dv are exact partial gradients,
because P = exp(S - lse_global) is already normalised. dq accumulates locally in fp32; dk/dv
accumulate in an fp32 buffer that travels around the ring with its K/V block and arrives back
at its owner after W hops.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends.base import AttnParams, Backend
from ..conventions import needs_grad
from ..hardware.profiles import profile_for_device
from ..reference import lse_dtype
from .comm import RingComm
from .merge import merge_attn_outputs_

__all__ = ["ring_attn", "block_plan"]

_ALL = slice(None)


def block_plan(step: int, src: int, rank: int, causal: bool, layout: str, half: int):
    """(query rows, key rows, causal) that rank ``rank`` computes against ``src``'s block at
    ``step``, or None when no query there sees any key of that block."""
    if not causal:
        return _ALL, _ALL, False
    if step == 0:
        return _ALL, _ALL, True
    if layout == "contiguous":
        return (_ALL, _ALL, False) if src < rank else None
    if src < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return lse_dtype(dtype)  # float32, float64 for float64


def _rows(x: torch.Tensor, sl: slice, dim: int = 1, copy: bool = True) -> torch.Tensor:
    """Some rows of ``x`` along ``dim``: a view for backends that take strided rows
    (``Backend.strided_rows``), else a contiguous copy."""
    if sl == _ALL:
        return x
    view = x[(slice(None),) * dim + (sl,)]
    return view.contiguous() if copy else view


def _params(q: torch.Tensor, scale: float, causal: bool) -> AttnParams:
    return AttnParams(softmax_scale=scale, causal=causal, profile=profile_for_device(q.device))


def _setup(be: Backend, q, scale: float, comm):
    """What both directions need: (world size, rank, half the local length, the block params by
    causality, the accumulator dtype, whether blocks get contiguous row copies)."""
    W = comm.size if comm is not None else 1
    r = comm.rank if comm is not None else 0
    params = {c: _params(q, scale, c) for c in (False, True)}
    return W, r, q.shape[1] // 2, params, _acc_dtype(q.dtype), not getattr(be, "strided_rows", False)


def ring_forward(be: Backend, q, k, v, scale: float, causal: bool, layout: str, comm: Optional[RingComm]):
    """Forward over the ring; returns out (q's dtype) and the global lse (B, H, S).

    Memory beyond the inputs: the fp32 accumulator (out, lse), one K/V receive buffer (two for
    more than 2 ranks), the block's output and one fp32 temporary of its size (the merge is in
    place)."""
    W, r, half, params, acc_t, copy = _setup(be, q, scale, comm)
    kv, spare = (k, v), None  # K and V travel as two messages of one batch: no stacked copy
    out = lse = None
    for step in range(W):
        nxt = comm.send_recv(kv, spare) if step + 1 < W else None
        plan = block_plan(step, (r - step) % W, r, causal, layout, half)
        if plan is not None:
            qs, ks, blk_causal = plan
            bo, bl = be.forward(_rows(q, qs, copy=copy), _rows(kv[0], ks, copy=copy), _rows(kv[1], ks, copy=copy),
                                params[blk_causal])
            if out is None:  # step 0 covers every query row
                out, lse = bo.to(acc_t, memory_format=torch.contiguous_format), bl.to(acc_t)
            else:
                merge_attn_outputs_(_rows(out, qs, copy=False), _rows(lse, qs, dim=2, copy=False), bo, bl)
            del bo, bl
        if nxt is not None:
            comm.wait()
            # the buffer just sent is free again: it receives the step after next (never the
            # caller's own k/v, which step 0 sent)
            kv, spare = nxt, (kv if step > 0 else None)
    del kv, spare, nxt
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


def ring_backward(be: Backend, dout, q, k, v, out, lse, scale: float, causal: bool, layout: str,
                  comm: Optional[RingComm], dkv_comm: Optional[RingComm]):
    """Backward over the ring with the global out/lse; returns dq, dk, dv in the input dtypes.

    Memory beyond the inputs: dq's fp32 accumulator, the travelling fp32 dK/dV accumulator and
    the one arriving, one K/V receive buffer (two for more than 2 ranks) and one block's
    gradients (freed before the next block is computed)."""
    W, r, half, params, acc_t, copy = _setup(be, q, scale, comm)
    dq = dk = dv = None  # fp32 accumulators, started from the first block's gradients
    kv, spare = (k, v), None
    dkv_spare = dkv_next = None
    for step in range(W):
        nxt = comm.send_recv(kv, spare) if step + 1 < W else None
        plan = block_plan(step, (r - step) % W, r, causal, layout, half)
        grads = None
        if plan is not None:
            qs, ks, blk_causal = plan
            grads = be.backward(
                _rows(dout, qs, copy=copy), _rows(q, qs, copy=copy), _rows(kv[0], ks, copy=copy),
                _rows(kv[1], ks, copy=copy), _rows(out, qs, copy=copy), _rows(lse, qs, dim=2, copy=copy),
                params[blk_causal],
            )
        if step > 0:  # the dK/dV accumulators of the block we hold (their hop overlapped the block)
            dkv_comm.wait()
            (dk, dv), dkv_spare = dkv_next, (dk, dv)
        if grads is not None:
            gq, gk, gv = grads
            grads = None
            dq = _accumulate(dq, q, qs, gq, acc_t)
            dk = _accumulate(dk, k, ks, gk, acc_t)
            dv = _accumulate(dv, v, ks, gv, acc_t)
            del gq, gk, gv  # one block's gradients alive at a time
        if nxt is not None:
            comm.wait()
            kv, spare = nxt, (kv if step > 0 else None)
        if W > 1:  # pass the accumulators on; after W hops they are back at their owner
            dk = _accumulate(dk, k, _ALL, None, acc_t)
            dv = _accumulate(dv, v, _ALL, None, acc_t)
            dkv_next = dkv_comm.send_recv((dk, dv), dkv_spare)
    del kv, spare, nxt
    dq = _accumulate(dq, q, _ALL, None, acc_t).to(q.dtype)  # while the last dK/dV hop is in flight
    if W > 1:
        dkv_comm.wait()
        (dk, dv), dkv_spare = dkv_next, None
        del dkv_next
    dk = _accumulate(dk, k, _ALL, None, acc_t)
    dv = _accumulate(dv, v, _ALL, None, acc_t)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _accumulate(acc, like, rows, block, acc_t):
    """``acc[:, rows] += block`` in ``acc_t``, ``acc`` shaped like ``like``. A missing ``acc``
    starts as ``block`` itself when the block covers every row (no zero fill), else as zeros;
    ``block`` None only makes sure ``acc`` exists (no block reached these rows)."""
    if acc is None:
        if block is not None and rows == _ALL:
            return torch.empty(like.shape, dtype=acc_t, device=like.device).copy_(block)  # contiguous
        acc = torch.zeros(like.shape, dtype=acc_t, device=like.device)
    if block is not None:
        _rows(acc, rows, copy=False).add_(block)
    return acc


class _RingAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, be, scale, causal, layout, group, size, rank):
        comm = RingComm(group, size, rank) if size > 1 else None
        out, lse = ring_forward(be, q, k, v, scale, causal, layout, comm)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (be, scale, causal, layout, group, size, rank)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        be, scale, causal, layout, group, size, rank = ctx.args
        comm = RingComm(group, size, rank) if size > 1 else None
        dkv_comm = RingComm(group, size, rank) if size > 1 else None
        dq, dk, dv = ring_backward(be, dout.contiguous(), q, k, v, out, lse, scale, causal, layout, comm, dkv_comm)
        return dq, dk, dv, None, None, None, None, None, None, None


def ring_attn(q, k, v, be: Backend, scale: float, causal: bool, layout: str,
              group=None, size: int = 1, rank: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``group`` (``size`` ranks, this one ``rank``) on local shards laid out
    by ``layout``; ``size == 1`` is one local FA2 call. Differentiable; returns (out, lse)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if needs_grad(q, k, v):
        return _RingAttnFunction.apply(q, k, v, be, scale, causal, layout, group, size, rank)
    comm = RingComm(group, size, rank) if size > 1 else None
    return ring_forward(be, q, k, v, scale, causal, layout, comm)
