"""All-gather attention: every rank gathers the full K/V, then attends with its own queries.

The simplest context parallelism (Llama 3's choice for its CP): no ring steps to schedule, one
all-gather of K/V forward and one reduce-scatter of dK/dV backward, but the full K/V sits in
every rank's memory and nothing overlaps. Kept as a mode (``mode="allgather"``) so benchmarks can
compare it with ring and Ulysses in one run.

With causal masks the bottom-right alignment does the work: a query chunk that starts at token
``a`` and ends at ``b`` sees keys ``[0, b)`` with the mask aligned to the bottom-right corner.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends.base import Backend
from .comm import CPTopology, all_gather_seq, reduce_scatter_seq
from .faults import FaultGuard
from .layout import chunk_ids, num_chunks
from .ring import ring_attn

__all__ = ["allgather_attn"]


def _to_natural(parts, W: int, layout: str) -> torch.Tensor:
    per = 2 if layout == "zigzag" else 1
    chunks = [None] * num_chunks(W, layout)
    for s, part in enumerate(parts):
        for cid, piece in zip(chunk_ids(W, s, layout), part.chunk(per, dim=1)):
            chunks[cid] = piece
    return torch.cat(chunks, dim=1)


def _to_shard_order(x: torch.Tensor, W: int, layout: str) -> torch.Tensor:
    pieces = x.chunk(num_chunks(W, layout), dim=1)
    return torch.cat([pieces[c] for s in range(W) for c in chunk_ids(W, s, layout)], dim=1)


class _GatherSeq(torch.autograd.Function):
    """(B, S/W, ...) shard -> (B, S, ...) full sequence in token order; backward sums the full
    gradient over ranks and returns this rank's shard of it (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, topo: CPTopology, layout: str):
        ctx.topo, ctx.layout = topo, layout
        return _to_natural(all_gather_seq(x, topo), topo.world_size, layout)

    @staticmethod
    def backward(ctx, g):
        topo = ctx.topo
        g = _to_shard_order(g, topo.world_size, ctx.layout)
        return reduce_scatter_seq(g, topo.flat_group, topo.world_size, topo.shard_index, dim=1), None, None


def allgather_attn(q, k, v, topo: CPTopology, be: Backend, scale: float, causal: bool,
                   layout: str, guard: Optional[FaultGuard] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``guard``: the fault agreement over ``topo`` (by default a new one), run after each local
    attention call, forward and backward."""
    if guard is None:
        guard = FaultGuard.for_topology(topo)
    W, r = topo.world_size, topo.shard_index
    kf = _GatherSeq.apply(k, topo, layout)  # (B, S, Hkv, D)
    vf = _GatherSeq.apply(v, topo, layout)
    if not causal:
        return ring_attn(q, kf, vf, be, scale, False, layout, guard=guard)
    n = q.shape[1] // (2 if layout == "zigzag" else 1)
    outs, lses = [], []
    for i, cid in enumerate(chunk_ids(W, r, layout)):
        end = (cid + 1) * n  # keys [0, end) are visible to this chunk (bottom-right causal)
        o, l = ring_attn(q[:, i * n:(i + 1) * n], kf[:, :end], vf[:, :end], be, scale, True, layout, guard=guard)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)
