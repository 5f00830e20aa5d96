"""Communication for context parallelism, all on ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

* :class:`CPTopology` resolves the ``group`` argument users pass (None, a ProcessGroup, a 1-D or
  2-D ``DeviceMesh``, or a pair ``(ring_group, ulysses_group)``) into the numbers every other
  module needs: the world size, this rank's shard index, and the ring / Ulysses sub-groups.
* :class:`RingComm` is the ring's one piece of transport: post a send to the next rank and a
  receive from the previous one with ``batch_isend_irecv``, compute, then ``wait``.
* :func:`all_to_all_4d` is Ulysses' transport (sequence shards <-> head shards).

Shard index convention (shared by :mod:`.layout` and the hybrid mode): with a ring of ``Wr``
ranks across and Ulysses groups of ``Wu`` ranks inside, the rank at (ring ``i``, Ulysses ``u``)
holds shard ``i * Wu + u``. For a plain group that is the rank in the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["CPTopology", "RingComm", "resolve_topology", "all_to_all_4d", "all_gather_seq", "split_groups",
           "group_timeout"]


def dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class CPTopology:
    """Where this rank sits. ``ring_group``/``ulysses_group`` are None when their size is 1."""

    world_size: int  # Wr * Wu
    shard_index: int  # ring_rank * Wu + ulysses_rank
    ring_size: int = 1
    ring_rank: int = 0
    ring_group: Optional[object] = None
    ulysses_size: int = 1
    ulysses_rank: int = 0
    ulysses_group: Optional[object] = None
    flat_group: Optional[object] = None  # one group over all ranks, if there is one (else None)

    @property
    def two_dim(self) -> bool:
        return self.ring_size > 1 and self.ulysses_size > 1


_SINGLE = CPTopology(world_size=1, shard_index=0)


def group_timeout(group) -> Optional[timedelta]:
    """The timeout ``group``'s collectives run under (``init_process_group(timeout=...)``, or
    ``new_group``'s), for the groups we create from it; None when torch does not say (then the
    default group's, and failing that torch's default)."""
    for g in (group, dist.group.WORLD if dist_active() else None):
        if g is None:
            continue
        try:
            for dev in list(getattr(g, "_device_types", ())) or [torch.device("cpu")]:
                t = getattr(getattr(g._get_backend(torch.device(dev)), "options", None), "_timeout", None)
                if isinstance(t, timedelta):
                    return t
        except (AttributeError, RuntimeError, TypeError, ValueError):
            continue
    return None


def _group_info(g) -> Tuple[int, int]:
    return dist.get_world_size(g), dist.get_rank(g)


def _is_mesh(obj) -> bool:
    return type(obj).__name__ == "DeviceMesh" and hasattr(obj, "get_group")


def resolve_topology(group=None) -> CPTopology:
    """Turn the user's ``group`` argument into a :class:`CPTopology`.

    * None: the default (world) group, or the single-process no-op when torch.distributed is not
      initialised.
    * a ProcessGroup: a flat group (ring or Ulysses over all of it; hybrid splits it on demand).
    * a 1-D DeviceMesh: its group. A 2-D DeviceMesh: dim 0 = ring (across nodes), dim 1 =
      Ulysses (inside a node), as ``init_device_mesh("cuda", (nodes, gpus_per_node))`` lays out.
    * a pair ``(ring_group, ulysses_group)`` of ProcessGroups (either may be None).
    """
    if isinstance(group, CPTopology):
        return group
    if group is None:
        if not dist_active():
            return _SINGLE
        group = dist.group.WORLD
    if _is_mesh(group):
        if group.ndim == 1:
            group = group.get_group()
        elif group.ndim == 2:
            group = (group.get_group(0), group.get_group(1))
        else:
            raise ValueError(f"group: a DeviceMesh for context parallelism must be 1-D or 2-D, got {group.ndim}-D")
    if isinstance(group, (tuple, list)):
        if len(group) != 2:
            raise ValueError("group: a pair (ring_group, ulysses_group) is expected, got "
                             f"{len(group)} entries")
        if not dist_active():
            raise ValueError("group: process groups were given but torch.distributed is not initialised")
        rg, ug = group
        wr, rr = _group_info(rg) if rg is not None else (1, 0)
        wu, ru = _group_info(ug) if ug is not None else (1, 0)
        return CPTopology(
            world_size=wr * wu, shard_index=rr * wu + ru,
            ring_size=wr, ring_rank=rr, ring_group=rg if wr > 1 else None,
            ulysses_size=wu, ulysses_rank=ru, ulysses_group=ug if wu > 1 else None,
            flat_group=(rg if wu == 1 else ug if wr == 1 else None),
        )
    if not dist_active():
        raise ValueError("group: a process group was given but torch.distributed is not initialised")
    w, r = _group_info(group)
    if w == 1:
        return _SINGLE
    return CPTopology(world_size=w, shard_index=r, ring_size=w, ring_rank=r, ring_group=group, flat_group=group)


_SPLIT_CACHE: Dict[Tuple[int, Tuple[int, ...], int], Tuple[object, object]] = {}


def split_groups(topo: CPTopology, ulysses_size: int) -> CPTopology:
    """Split a flat topology into rings of ``W / ulysses_size`` ranks across and Ulysses groups of
    ``ulysses_size`` consecutive ranks inside (shard ``i * Wu + u`` stays on the same rank).

    Sub-groups are created once per (ranks, size) and cached, with the flat group's timeout (not
    ``new_group``'s default of 30 minutes); every rank of the flat group must call this with the
    same arguments (it is collective, like ``new_group``)."""
    if topo.flat_group is None:
        raise ValueError("cannot re-split a topology that is already two-dimensional")
    W, wu = topo.world_size, ulysses_size
    if W % wu:
        raise ValueError(f"ulysses degree {wu} must divide the context-parallel world size {W}")
    wr = W // wu
    ranks = tuple(dist.get_process_group_ranks(topo.flat_group))
    key = (id(topo.flat_group), ranks, wu)  # a re-initialised process group gets new sub-groups
    if key not in _SPLIT_CACHE:
        me = ranks[topo.shard_index]
        timeout = group_timeout(topo.flat_group)
        ring_g = uly_g = None
        # only members create each sub-group (use_local_synchronization), in the same order everywhere
        for i in range(wr):
            members = [ranks[i * wu + u] for u in range(wu)]
            if me in members:
                uly_g = dist.new_group(members, timeout=timeout, use_local_synchronization=True)
        for u in range(wu):
            members = [ranks[i * wu + u] for i in range(wr)]
            if me in members:
                ring_g = dist.new_group(members, timeout=timeout, use_local_synchronization=True)
        _SPLIT_CACHE[key] = (ring_g, uly_g)
    ring_g, uly_g = _SPLIT_CACHE[key]
    i, u = divmod(topo.shard_index, wu)
    return CPTopology(
        world_size=W, shard_index=topo.shard_index,
        ring_size=wr, ring_rank=i, ring_group=ring_g if wr > 1 else None,
        ulysses_size=wu, ulysses_rank=u, ulysses_group=uly_g if wu > 1 else None,
        flat_group=topo.flat_group,
    )


class RingComm:
    """Send to rank+1, receive from rank-1 in a ring group, asynchronously.

    ``send_recv(xs)`` posts both transfers with ``batch_isend_irecv`` and returns the buffers that
    will hold the previous rank's ``xs`` once :meth:`wait` returns. Callers post the transfer for
    step s+1 before computing step s, so communication hides behind compute."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        if size > 1:
            self.send_peer = dist.get_global_rank(group, (rank + 1) % size)
            self.recv_peer = dist.get_global_rank(group, (rank - 1) % size)
        self._reqs: List = []

    def send_recv(self, xs, outs=None):
        """Post the transfer of the tensors ``xs`` (one P2P op each, in one batch: K and V travel
        without being stacked into a copy); returns the receive buffers, ``outs`` or new ones
        shaped like ``xs``."""
        if self._reqs:
            raise RuntimeError("RingComm: wait() for the previous transfer first")
        outs = tuple(torch.empty_like(t) for t in xs) if outs is None else tuple(outs)
        ops = []
        for t, o in zip(xs, outs):
            ops.append(dist.P2POp(dist.isend, t, self.send_peer, self.group))
            ops.append(dist.P2POp(dist.irecv, o, self.recv_peer, self.group))
        self._reqs = dist.batch_isend_irecv(ops)
        return outs

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


def all_to_all_4d(x: torch.Tensor, group, size: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """All-to-all over a (B, S, H, D)-shaped tensor: split ``scatter_dim`` into ``size`` parts
    (part j goes to rank j) and concatenate the received parts along ``gather_dim`` (in rank
    order). Sequence -> heads is ``scatter_dim=2, gather_dim=1``; heads -> sequence the reverse."""
    if size == 1:
        return x
    parts = x.shape[scatter_dim] // size
    # (size, ...) with part j first so one all_to_all_single moves contiguous slabs
    shape = list(x.shape)
    shape[scatter_dim:scatter_dim + 1] = [size, parts]
    send = x.reshape(shape).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is rank j's slab, whose dims are x's; rank order goes just before gather_dim
    recv = recv.movedim(0, gather_dim)
    out_shape = list(x.shape)
    out_shape[scatter_dim] = parts
    out_shape[gather_dim] = x.shape[gather_dim] * size
    return recv.reshape(out_shape)


def all_gather_seq(x: torch.Tensor, topo: CPTopology) -> List[torch.Tensor]:
    """Every rank's ``x`` (same shape everywhere), indexed by shard index."""
    if topo.world_size == 1:
        return [x]
    x = x.contiguous()
    if topo.flat_group is not None and not topo.two_dim:
        parts = [torch.empty_like(x) for _ in range(topo.world_size)]
        dist.all_gather(parts, x, group=topo.flat_group)
        return parts
    # two stages: inside the Ulysses group (shards i*Wu .. i*Wu+Wu-1), then across the ring
    inner = [torch.empty_like(x) for _ in range(topo.ulysses_size)]
    dist.all_gather(inner, x, group=topo.ulysses_group)
    stacked = torch.stack(inner)
    outer = [torch.empty_like(stacked) for _ in range(topo.ring_size)]
    dist.all_gather(outer, stacked, group=topo.ring_group)
    return [outer[i][u] for i in range(topo.ring_size) for u in range(topo.ulysses_size)]


def backend_name(group) -> str:
    try:
        return dist.get_backend(group)
    except (RuntimeError, ValueError):
        return "gloo"


def reduce_scatter_seq(x: torch.Tensor, group, size: int, rank: int, dim: int) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's 1/size slice along ``dim`` (contiguous split).
    NCCL has reduce_scatter; gloo does not, so there it is an all_reduce then a slice."""
    if size == 1:
        return x
    n = x.shape[dim] // size
    if backend_name(group) == "nccl":
        send = x.movedim(dim, 0).contiguous()
        out = torch.empty((n,) + tuple(send.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, send, group=group)
        return out.movedim(0, dim)
    y = x.contiguous()
    dist.all_reduce(y, group=group)
    return y.narrow(dim, rank * n, n)
