"""``context_parallel_attn``: validation, mode and kernel choice, dispatch. The docstring is the spec."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..backends.base import AttnRequest, Backend, get_backend
from ..conventions import needs_grad
from ..hardware.profiles import profile_for_device
from ..interface import _check_heads, _check_options, _check_same, _check_tensor, flash_attn_func
from ..monitor import _ACTIVE as _MONITORS  # qf.monitor()
from ..monitor import begin_call as _begin_call
from .allgather import allgather_attn
from .comm import CPTopology, resolve_topology, split_groups
from .faults import FaultGuard, input_codes, resolved_scale
from .layout import check_layout, check_seqlen
from .ring import ring_attn
from .ulysses import check_ulysses_heads, ulysses_attn, ulysses_supported

__all__ = ["context_parallel_attn", "choose_mode", "choose_kernel", "MODES"]

MODES = ("auto", "ring", "ulysses", "hybrid", "allgather")


def _local_world_size(world: int) -> int:
    """Ranks per node (torchrun's LOCAL_WORLD_SIZE), the span where all-to-all is cheap."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    except ValueError:
        return world


def _hybrid_degree(num_heads: int, num_kv_heads: int, world: int, proper: bool) -> int:
    """The largest Ulysses degree that divides ``world``, splits the heads and stays inside a
    node (``proper``: strictly between 1 and world). 1 if none."""
    local = _local_world_size(world)
    best = 1
    for d in range(2, world + (0 if proper else 1)):
        if world % d == 0 and d <= local and ulysses_supported(num_heads, num_kv_heads, d):
            best = d
    return best


def choose_mode(num_heads: int, num_kv_heads: int, group=None) -> str:
    """What ``mode="auto"`` runs for these head counts on ``group``.

    * one process: "local" (plain attention);
    * a 2-D mesh / (ring, Ulysses) pair: "hybrid";
    * two ranks: "ring". Its one K/V pass hides behind the first block, and it was faster than
      Ulysses at every length measured on 2 x H100 and 2 x H200 (GQA 32/8, 32k-128k: by 3-6%;
      docs/performance.md);
    * Ulysses over the whole group when the heads split over it and the group fits in one node
      (LOCAL_WORLD_SIZE): its four all-to-alls move less than the ring's W-1 K/V passes, and each
      rank runs one long kernel (a choice by traffic: 4 and 8 GPUs are not measured yet);
    * else hybrid with the largest Ulysses degree that fits (heads and node), else "ring".
    """
    topo = resolve_topology(group)
    W = topo.world_size
    if W == 1:
        return "local"
    if topo.two_dim:
        return "hybrid"
    if W == 2:
        return "ring"
    d = _hybrid_degree(num_heads, num_kv_heads, W, proper=False)
    if d == W:
        return "ulysses"
    return "hybrid" if d > 1 else "ring"


def choose_kernel(q: torch.Tensor, num_kv_heads: int, causal: bool, backend: Union[str, Backend] = "auto",
                  square: bool = True, k=None, v=None) -> Backend:
    """The FA2-style backend (forward + backward + lse) run on each block. ``auto``: the first that
    serves the call in the device profile's ``cp_order`` (on CUDA ``cudnn``, cuDNN's fused kernels
    with lse: the fastest forward+backward we measured on H100, then ``triton`` (our kernels), then
    ``tiled``; on CPU ``tiled``). Or the one named.
    ``square=False``: the blocks are causal with Sq != Sk (the all-gather mode), which rules out
    kernels whose causal mask is top-left aligned (``cudnn``). ``k``/``v``: the call's K/V, when
    known, so that a frozen query with trainable K/V still asks for a backward."""
    if isinstance(backend, Backend):
        return backend
    req = AttnRequest(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], num_heads=q.shape[-2],
        num_kv_heads=num_kv_heads, seqlen_q=q.shape[1], seqlen_k=q.shape[1] * (1 if square else 2), causal=causal,
        need_lse=True, need_grad=needs_grad(q, k, v),
        device_capability=torch.cuda.get_device_capability(q.device) if q.is_cuda else None,
    )
    names = list(profile_for_device(q.device).cp_order) if backend == "auto" else [backend]  # the profile's
    reasons = []
    for name in names:
        be = get_backend(name)
        if be.native_autograd:
            raise ValueError(
                f"backend={name!r} cannot run context parallelism: it needs a backend with forward/backward "
                "and lse ('tiled', 'triton' or 'cudnn')"
            )
        reason = be.check(req)
        if reason is None:
            return be
        reasons.append(f"{name}: {reason}")
    raise ValueError(f"backend={backend!r} cannot run this call: {'; '.join(reasons)}")


def context_parallel_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    group=None,
    mode: str = "auto",
    layout: str = "zigzag",
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Union[str, Backend] = "auto",
):
    """Exact attention over a sequence sharded across ranks; each rank passes its shard.

    Every rank of ``group`` calls this with its shard of the same global q/k/v (made by
    :func:`qwen3vl_flash.parallel.shard` with the same ``layout``); each gets its shard of the
    global result, equal to ``flash_attn_func`` on the full sequence. Autograd flows end to end.

    Args:
        q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D), H % Hkv == 0 (GQA as flash_attn_func).
            Self-attention: q and k/v are shards of the same positions (S_local equal).
        causal: causal over *global* positions (the global Sq == Sk, so no alignment question).
        group: None (the default process group; without an initialised one this is plain
            :func:`flash_attn_func`), a ProcessGroup, a 1-D DeviceMesh, a 2-D DeviceMesh
            (dim 0 = ring across nodes, dim 1 = Ulysses inside a node) or a pair
            ``(ring_group, ulysses_group)``. Shard ``i * Wu + u`` lives at (ring i, Ulysses u).
        mode: "ring" (K/V around a ring, zigzag causal balancing, any head count), "ulysses"
            (all-to-all sequence <-> heads; H % W == 0 and Hkv % W == 0 or W % Hkv == 0),
            "hybrid" (Ulysses inside x ring across; a flat group is split into rings of Ulysses
            groups of the largest degree that fits the heads and the node), "allgather" (gather
            K/V everywhere; a baseline) or "auto" (:func:`choose_mode`).
        layout: "zigzag" (rank r holds chunks r and 2W-1-r of 2W) or "contiguous".
        softmax_scale: default 1/sqrt(D).
        return_lse: also return this shard's lse (B, H, S_local), float32 (float64 for float64).
        backend: the per-block kernel: "auto" (:func:`choose_kernel`: the first of ``cudnn``,
            ``triton``, ``tiled`` on CUDA that serves the block, ``tiled`` on CPU; the all-gather
            mode skips ``cudnn``), "cudnn", "tiled", "triton", or a Backend object with
            forward/backward.

    Returns:
        out (B, S_local, H, D) in q's dtype [, lse].

    Raises:
        ValueError/TypeError for bad tensors (as flash_attn_func), an unknown mode or layout, a
        local length that does not fit the layout (zigzag needs an even S_local, i.e. a global
        length that is a multiple of 2W), or heads that the chosen mode cannot split.

        With several ranks, on every rank when any rank fails (issue 15; docs/parallel.md, "What
        happens when a rank fails"): the failing rank raises its own error again (same type, rank
        and step named, chained from the original); the others raise
        :class:`~qwen3vl_flash.parallel.ContextParallelError` (a RuntimeError) naming the failing
        rank, or :class:`~qwen3vl_flash.parallel.ContextParallelInputError` (also a ValueError)
        when a rank's inputs are malformed or differ from the other ranks' (dtype, shapes, heads,
        causal, layout, mode, scale, whether a backward runs). Checked before any collective, and
        after each ring step's local work (``QWEN3VL_FLASH_CP_STEP_CHECK=0`` skips the per-step
        check).
    """
    topo: CPTopology = resolve_topology(group)
    W = topo.world_size
    guard = FaultGuard.for_topology(topo)  # None: one process (or no torch.distributed)
    err = codes = None
    wu = 1
    try:  # every local check; with a guard, the ranks then agree on the result before any collective
        _check_tensor("q", q, 4, "(B, S_local, H, D)")
        _check_tensor("k", k, 4, "(B, S_local, Hkv, D)")
        _check_tensor("v", v, 4, "(B, S_local, Hkv, D)")
        _check_same(q, [("k", k), ("v", v)])
        _check_heads(q, k, v)
        _check_options(softmax_scale, causal, (-1, -1), return_lse, "auto")
        B, S, H, D = q.shape
        for name, x in (("k", k), ("v", v)):
            if x.shape[0] != B or x.shape[1] != S:
                raise ValueError(
                    f"{name} must be a shard of the same positions as q: (B, S_local) = ({B}, {S}), "
                    f"got {tuple(x.shape[:2])}"
                )
        check_layout(layout)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(backend, (str, Backend)):
            raise TypeError(f"backend must be a string such as 'auto' or a Backend, got {type(backend).__name__}")
        scale = resolved_scale(softmax_scale, D)
        if W > 1:
            check_seqlen(S * W, W, layout, name="the global sequence length (S_local x world size)")
            Hkv = k.shape[2]
            if mode == "auto":
                mode = choose_mode(H, Hkv, topo)
            be = choose_kernel(q, Hkv, causal, backend, square=mode != "allgather", k=k, v=v)
            if mode in ("ring", "ulysses", "allgather") and (topo.two_dim or topo.flat_group is None):
                raise ValueError(f"mode={mode!r} needs one flat process group; a 2-D group runs mode='hybrid'")
            if mode == "ulysses":
                check_ulysses_heads(H, Hkv, W)
            elif mode == "hybrid":
                if not topo.two_dim and topo.flat_group is not None:  # a flat group is split below
                    wu = _hybrid_degree(H, Hkv, W, proper=True)
                    if wu == 1:
                        raise ValueError(
                            f"mode='hybrid' found no Ulysses degree strictly between 1 and {W} that divides the "
                            f"world size, splits {H} query / {Hkv} kv heads and fits in LOCAL_WORLD_SIZE"
                        )
                else:
                    wu = topo.ulysses_size
                check_ulysses_heads(H, Hkv, wu)
            if guard is not None:
                codes = input_codes(q, k, causal, layout, mode, wu, scale, needs_grad(q, k, v))
    except Exception as e:  # with peers, they must hear of it first (agree_inputs raises it)
        if guard is None:
            raise
        err = e
    if guard is not None:  # one all-reduce of W x 13 int64; raises on every rank if any rank failed
        guard.agree_inputs(err, codes)
    if W == 1:
        if isinstance(backend, Backend):
            out, lse = ring_attn(q, k, v, backend, scale, causal, layout)
            return (out, lse) if return_lse else out
        return flash_attn_func(q, k, v, scale, causal, return_lse=return_lse, backend=backend)
    call = _begin_call("context_parallel_attn", q, k, v) if _MONITORS else None  # qf.monitor(): off, one test
    if mode == "ring":
        out, lse = ring_attn(q, k, v, be, scale, causal, layout, topo.flat_group, W, topo.shard_index)
    elif mode == "allgather":
        out, lse = allgather_attn(q, k, v, topo, be, scale, causal, layout, guard=guard)
    elif mode == "ulysses":
        flat = CPTopology(
            world_size=W, shard_index=topo.shard_index, ulysses_size=W, ulysses_rank=topo.shard_index,
            ulysses_group=topo.flat_group, flat_group=topo.flat_group,
        )
        out, lse = ulysses_attn(q, k, v, flat, be, scale, causal, layout, guard=guard)
    else:  # hybrid
        if not topo.two_dim and topo.flat_group is not None:  # split a flat group: rings of Ulysses groups
            topo = split_groups(topo, wu)
        out, lse = ulysses_attn(q, k, v, topo, be, scale, causal, layout, guard=guard)
    if call is not None:
        call.done_cp(be.name, backend, q, k, v, Hkv, causal, mode != "allgather")
    return (out, lse) if return_lse else out
