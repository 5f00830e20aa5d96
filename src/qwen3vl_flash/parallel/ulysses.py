"""Ulysses (DeepSpeed-Ulysses) attention, and hybrid Ulysses x ring.

Ulysses trades sequence shards for head shards with one all-to-all per tensor::

    q (B, S/W, H, D) --all_to_all--> (B, S, H/W, D) -> attention on the full sequence
    out (B, S, H/W, D) --all_to_all--> (B, S/W, H, D)

so each rank runs ordinary attention on H/W heads. Query heads must divide by the degree W. KV
heads: with Hkv >= W each rank takes Hkv/W of them (Hkv % W == 0); with Hkv < W (GQA) each kv
head is replicated W/Hkv times first (W % Hkv == 0), exactly once per rank that needs it.

Gathered in rank order, a zigzag layout is out of order (chunks 0, 2W-1, 1, 2W-2, ...): for
causal attention the chunks are put back in order first (and the output put back after). With
a ring across the Ulysses groups (hybrid), Ulysses group i gathers chunks iWu..(i+1)Wu-1 and their
mirrors, which is exactly a zigzag shard of the ring over 2*Wr super-chunks, so one layout serves
all three modes (see :mod:`.layout`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends.base import Backend
from .comm import CPTopology, all_to_all_4d
from .faults import FaultGuard
from .ring import ring_attn

__all__ = ["ulysses_attn", "ulysses_supported"]


def ulysses_supported(num_heads: int, num_kv_heads: int, degree: int) -> bool:
    """Whether Ulysses of ``degree`` ranks can split these heads."""
    if degree <= 1:
        return True
    if num_heads % degree:
        return False
    return num_kv_heads % degree == 0 or degree % num_kv_heads == 0


def check_ulysses_heads(num_heads: int, num_kv_heads: int, degree: int) -> None:
    if num_heads % degree:
        raise ValueError(
            f"Ulysses needs the query head count ({num_heads}) to be a multiple of the Ulysses degree ({degree})"
        )
    if not (num_kv_heads % degree == 0 or degree % num_kv_heads == 0):
        raise ValueError(
            f"Ulysses needs the kv head count ({num_kv_heads}) to divide, or be a multiple of, the Ulysses "
            f"degree ({degree})"
        )


class _AllToAll(torch.autograd.Function):
    """``all_to_all_4d`` from ``scatter_dim`` to ``gather_dim``; its gradient is the inverse one.
    Sequence -> heads: (B, S/W, h*W, D) -> (B, S, h, D) is (2, 1); heads -> sequence is (1, 2)."""

    @staticmethod
    def forward(ctx, x, group, size, scatter_dim: int, gather_dim: int):
        ctx.args = (group, size, scatter_dim, gather_dim)
        return all_to_all_4d(x, group, size, scatter_dim=scatter_dim, gather_dim=gather_dim)

    @staticmethod
    def backward(ctx, g):
        group, size, scatter_dim, gather_dim = ctx.args  # the inverse: the two dims swap roles
        dx = all_to_all_4d(g.contiguous(), group, size, scatter_dim=gather_dim, gather_dim=scatter_dim)
        return dx, None, None, None, None


def _seq_to_heads(x, group, size):
    """(B, S/W, h*W, D) -> (B, S, h, D), differentiable."""
    return _AllToAll.apply(x, group, size, 2, 1)


def _heads_to_seq(x, group, size):
    """(B, S, h, D) -> (B, S/W, h*W, D), differentiable."""
    return _AllToAll.apply(x, group, size, 1, 2)


def zigzag_gathered_to_ring(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Reorder ``size`` gathered zigzag shards [a0 b0 | a1 b1 | ...] to [a0 a1 ... b_{n-1} ... b0]."""
    shape = x.shape
    y = x.unflatten(dim, (size, 2, shape[dim] // (2 * size)))
    first = y.select(dim + 1, 0)
    second = y.select(dim + 1, 1).flip(dim)
    return torch.cat([first, second], dim=dim).flatten(dim, dim + 1)


def ring_to_zigzag_gathered(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`zigzag_gathered_to_ring`."""
    shape = x.shape
    y = x.unflatten(dim, (2 * size, shape[dim] // (2 * size)))
    first = y.narrow(dim, 0, size)
    second = y.narrow(dim, size, size).flip(dim)
    return torch.stack([first, second], dim=dim + 1).flatten(dim, dim + 2)


def ulysses_attn(q, k, v, topo: CPTopology, be: Backend, scale: float, causal: bool,
                 layout: str, guard: Optional[FaultGuard] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ulysses over ``topo.ulysses_group``, with a ring over ``topo.ring_group`` inside when the
    topology is two-dimensional. Shards as :mod:`.layout`; returns (out, lse) like q's shard.
    ``guard``: the fault agreement over all of ``topo`` (by default a new one), run in each step of
    the inner ring (one step when there is no ring: the local attention)."""
    if guard is None:
        guard = FaultGuard.for_topology(topo)
    wu, group = topo.ulysses_size, topo.ulysses_group
    H, Hkv = q.shape[2], k.shape[2]
    check_ulysses_heads(H, Hkv, wu)
    if Hkv < wu:  # GQA: replicate each kv head to the W/Hkv ranks whose query heads read it
        k = k.repeat_interleave(wu // Hkv, dim=2)
        v = v.repeat_interleave(wu // Hkv, dim=2)
    qh = _seq_to_heads(q, group, wu)  # (B, S_l * wu, H / wu, D)
    kh = _seq_to_heads(k, group, wu)
    vh = _seq_to_heads(v, group, wu)
    reorder = causal and layout == "zigzag" and wu > 1  # non-causal attention ignores token order
    if reorder:
        qh, kh, vh = (zigzag_gathered_to_ring(t, wu, 1) for t in (qh, kh, vh))
    out, lse = ring_attn(qh, kh, vh, be, scale, causal, layout, topo.ring_group, topo.ring_size, topo.ring_rank,
                         guard=guard)
    if reorder:
        out = ring_to_zigzag_gathered(out, wu, 1)
        lse = ring_to_zigzag_gathered(lse, wu, 2)
    out = _heads_to_seq(out, group, wu)
    # lse (B, H/wu, S) -> (B, S, H/wu, 1) -> all-to-all -> (B, H, S_l); not differentiable
    lse = all_to_all_4d(lse.detach().transpose(1, 2).unsqueeze(-1).contiguous(), group, wu, 1, 2)
    return out, lse.squeeze(-1).transpose(1, 2).contiguous()
