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
from .faults import FaultGuard, fault_point
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


class _Steps:
    """The fault agreement of one ring pass (:class:`.faults.FaultGuard`): each step's local work
    runs inside ``try``; :meth:`check` then tells every rank whether any failed (and raises on all
    of them if so) before anyone waits for transfers that a failed rank may never have posted."""

    def __init__(self, guard: Optional[FaultGuard], phase: str, steps: int, rank: int):
        self.guard = guard
        self.phase, self.steps = phase, steps
        self.rank = guard.index if guard is not None else rank  # the rank in the whole CP group

    def point(self, step: int) -> None:
        fault_point(self.rank, step, self.phase)

    def check(self, step: int, err: Optional[BaseException], posted: bool = True, drain=()) -> None:
        if self.guard is not None:
            self.guard.check_step(err, step, self.steps, self.phase, posted=posted, drain=drain)
        elif err is not None:
            raise err


def ring_forward(be: Backend, q, k, v, scale: float, causal: bool, layout: str, comm: Optional[RingComm],
                 guard: Optional[FaultGuard] = None):
    """Forward over the ring; returns out (q's dtype) and the global lse (B, H, S).

    Memory beyond the inputs: the fp32 accumulator (out, lse), one K/V receive buffer (two for
    more than 2 ranks), the block's output and one fp32 temporary of its size (the merge is in
    place).

    Faults (``guard``): one agreement per step, after the step's compute (the last step's also
    covers the final casts) and before waiting for the K/V in flight."""
    W, r, half, params, acc_t, copy = _setup(be, q, scale, comm)
    steps = _Steps(guard, "forward", W, r)
    kv, spare = (k, v), None  # K and V travel as two messages of one batch: no stacked copy
    out = lse = result = None
    for step in range(W):
        nxt, err, posted = None, None, False
        try:
            nxt = comm.send_recv(kv, spare) if step + 1 < W else None
            posted = True
            steps.point(step)
            plan = block_plan(step, (r - step) % W, r, causal, layout, half)
            if plan is not None:
                qs, ks, blk_causal = plan
                bo, bl = be.forward(_rows(q, qs, copy=copy), _rows(kv[0], ks, copy=copy),
                                    _rows(kv[1], ks, copy=copy), params[blk_causal])
                if out is None:  # step 0 covers every query row
                    out, lse = bo.to(acc_t, memory_format=torch.contiguous_format), bl.to(acc_t)
                else:
                    merge_attn_outputs_(_rows(out, qs, copy=False), _rows(lse, qs, dim=2, copy=False), bo, bl)
                del bo, bl
            if step + 1 == W:
                result = out.to(q.dtype), lse.to(lse_dtype(q.dtype))
        except Exception as e:  # every rank must learn of it (check), then it is raised
            err = e
        steps.check(step, err, posted, drain=(comm,))
        if nxt is not None:
            comm.wait()
            # the buffer just sent is free again: it receives the step after next (never the
            # caller's own k/v, which step 0 sent)
            kv, spare = nxt, (kv if step > 0 else None)
    del kv, spare, nxt
    return result


def ring_backward(be: Backend, dout, q, k, v, out, lse, scale: float, causal: bool, layout: str,
                  comm: Optional[RingComm], dkv_comm: Optional[RingComm], guard: Optional[FaultGuard] = None):
    """Backward over the ring with the global out/lse; returns dq, dk, dv in the input dtypes.

    Memory beyond the inputs: dq's fp32 accumulator, the travelling fp32 dK/dV accumulator and
    the one arriving, one K/V receive buffer (two for more than 2 ranks) and one block's
    gradients (freed before the next block is computed).

    Step s: add step s-1's block gradients to dq and to the dK/dV accumulator that arrived for
    that block, pass the accumulator on and post the next K/V (all local work and posts), compute
    step s's block gradients; then (after the fault agreement) wait for the K/V and the next
    accumulator. Two more agreements close it: after the last hop is posted, and after the casts.
    Nothing waits for a transfer before every rank has said that it posted it."""
    W, r, half, params, acc_t, copy = _setup(be, q, scale, comm)
    steps = _Steps(guard, "backward", W, r)
    dq = dk = dv = None  # fp32 accumulators, started from the first block's gradients
    kv, spare = (k, v), None
    dkv_spare = dkv_next = None
    grads = rows = None  # the last block's gradients and their (query rows, key rows)

    def add_block():  # the previous step's block gradients into dq and the accumulator of its block
        nonlocal dq, dk, dv, grads
        if grads is not None:
            (gq, gk, gv), (qs, ks) = grads, rows
            grads = None
            dq = _accumulate(dq, q, qs, gq, acc_t)
            dk = _accumulate(dk, k, ks, gk, acc_t)
            dv = _accumulate(dv, v, ks, gv, acc_t)
            del gq, gk, gv  # one block's gradients alive at a time

    def pass_on():  # send the accumulators of the block just finished to the next rank
        nonlocal dk, dv, dkv_next
        dk = _accumulate(dk, k, _ALL, None, acc_t)
        dv = _accumulate(dv, v, _ALL, None, acc_t)
        dkv_next = dkv_comm.send_recv((dk, dv), dkv_spare)

    for step in range(W):
        nxt, err, posted = None, None, False
        try:
            if step > 0:
                add_block()
                pass_on()  # after W hops the accumulators are back at their owner
            nxt = comm.send_recv(kv, spare) if step + 1 < W else None
            posted = True
            steps.point(step)
            plan = block_plan(step, (r - step) % W, r, causal, layout, half)
            if plan is not None:
                qs, ks, blk_causal = plan
                grads = be.backward(
                    _rows(dout, qs, copy=copy), _rows(q, qs, copy=copy), _rows(kv[0], ks, copy=copy),
                    _rows(kv[1], ks, copy=copy), _rows(out, qs, copy=copy), _rows(lse, qs, dim=2, copy=copy),
                    params[blk_causal],
                )
                rows = (qs, ks)
            if W == 1:  # nothing in flight: one agreement for the whole local call
                add_block()
                dq = _accumulate(dq, q, _ALL, None, acc_t).to(q.dtype)
                dk = _accumulate(dk, k, _ALL, None, acc_t).to(k.dtype)
                dv = _accumulate(dv, v, _ALL, None, acc_t).to(v.dtype)
        except Exception as e:  # every rank must learn of it (check), then it is raised
            err = e
        steps.check(step, err, posted, drain=(comm, dkv_comm))
        if step > 0:  # the accumulator for the block we hold now (its hop overlapped the block)
            dkv_comm.wait()
            (dk, dv), dkv_spare = dkv_next, (dk, dv)
        if nxt is not None:
            comm.wait()
            kv, spare = nxt, (kv if step > 0 else None)
    del kv, spare, nxt
    if W == 1:
        return dq, dk, dv
    err, posted = None, False
    try:  # the last block, the last hop (home), dq's cast while it is in flight
        add_block()
        pass_on()
        posted = True
        dq = _accumulate(dq, q, _ALL, None, acc_t).to(q.dtype)
    except Exception as e:  # reported by the check below
        err = e
    steps.check(W, err, posted, drain=(dkv_comm,))
    dkv_comm.wait()
    (dk, dv), dkv_spare = dkv_next, None
    del dkv_next
    err = None
    try:
        dk = _accumulate(dk, k, _ALL, None, acc_t).to(k.dtype)
        dv = _accumulate(dv, v, _ALL, None, acc_t).to(v.dtype)
    except Exception as e:  # reported by the check below
        err = e
    steps.check(W + 1, err)
    return dq, dk, dv


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
    def forward(ctx, q, k, v, be, scale, causal, layout, group, size, rank, guard):
        comm = RingComm(group, size, rank) if size > 1 else None
        out, lse = ring_forward(be, q, k, v, scale, causal, layout, comm, guard)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (be, scale, causal, layout, group, size, rank, guard)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        be, scale, causal, layout, group, size, rank, guard = ctx.args
        comm = RingComm(group, size, rank) if size > 1 else None
        dkv_comm = RingComm(group, size, rank) if size > 1 else None
        dq, dk, dv = ring_backward(be, dout.contiguous(), q, k, v, out, lse, scale, causal, layout, comm, dkv_comm,
                                   guard)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def ring_attn(q, k, v, be: Backend, scale: float, causal: bool, layout: str,
              group=None, size: int = 1, rank: int = 0,
              guard: Optional[FaultGuard] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``group`` (``size`` ranks, this one ``rank``) on local shards laid out
    by ``layout``; ``size == 1`` is one local FA2 call. Differentiable; returns (out, lse).

    ``guard``: the fault agreement over the whole context-parallel group (:mod:`.faults`); by
    default one over ``group`` when ``size > 1``, none for a local call. The modes that run the
    ring inside a larger group (hybrid, Ulysses, all-gather) pass theirs."""
    if guard is None:
        guard = FaultGuard.for_ring(group, size, rank)
    if guard is not None and not guard.steps_on:
        guard = None  # QWEN3VL_FLASH_CP_STEP_CHECK=0
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if needs_grad(q, k, v):
        return _RingAttnFunction.apply(q, k, v, be, scale, causal, layout, group, size, rank, guard)
    comm = RingComm(group, size, rank) if size > 1 else None
    return ring_forward(be, q, k, v, scale, causal, layout, comm, guard)
