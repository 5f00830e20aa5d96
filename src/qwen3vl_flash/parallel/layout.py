"""Sequence layouts: which tokens each context-parallel rank holds.

``contiguous``: the sequence is cut into W equal chunks, rank r holds chunk r. Simple, but under
a causal mask rank W-1 does W times the work of rank 0.

``zigzag`` (the default): the sequence is cut into 2W chunks and rank r holds chunks r and
2W-1-r, concatenated. Every rank then owns one early and one late chunk, so causal work is
balanced (each ring step costs half a full block, see :mod:`.ring`)::

    W = 2, S = 8, chunks of 2:   tokens  0 1 | 2 3 | 4 5 | 6 7
                                 chunk     0     1     2     3
                                 rank 0 holds chunks 0, 3 -> tokens 0 1 6 7
                                 rank 1 holds chunks 1, 2 -> tokens 2 3 4 5

The same functions shard tokens, labels, embeddings and MRoPE position ids (3, B, S): anything
with a sequence dimension. Shard indices follow :mod:`.comm` (ring-major for 2-D groups), so one
layout serves ring, Ulysses and hybrid attention alike.
"""

from __future__ import annotations

from typing import List

import torch

from .comm import all_gather_seq, resolve_topology

__all__ = ["shard", "unshard", "chunk_ids", "LAYOUTS"]

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(world_size: int, layout: str) -> int:
    return 2 * world_size if layout == "zigzag" else world_size


def chunk_ids(world_size: int, shard_index: int, layout: str) -> List[int]:
    """The chunks (of ``num_chunks(world_size, layout)``) that shard ``shard_index`` holds, in order."""
    check_layout(layout)
    if layout == "zigzag":
        return [shard_index, 2 * world_size - 1 - shard_index]
    return [shard_index]


def check_seqlen(seqlen: int, world_size: int, layout: str, name: str = "sequence length") -> None:
    n = num_chunks(world_size, layout)
    if seqlen % n:
        raise ValueError(
            f"{name} {seqlen} must be a multiple of {n} for layout={layout!r} on {world_size} ranks "
            f"({'2 x world size' if layout == 'zigzag' else 'the world size'}); pad the sequence to "
            f"{-(-seqlen // n) * n}"
        )


def shard(x: torch.Tensor, seq_dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of a full-sequence tensor.

    Args:
        x: any tensor with the full sequence along ``seq_dim`` (tokens (B, S), labels (B, S),
            hidden states (B, S, E), q/k/v (B, S, H, D), MRoPE position ids (3, B, S) with
            ``seq_dim=-1``). Every rank passes the same ``x``.
        seq_dim: the sequence dimension (negative counts from the end).
        group: as :func:`qwen3vl_flash.parallel.context_parallel_attn`.
        layout: "zigzag" (rank r holds chunks r and 2W-1-r of 2W) or "contiguous" (chunk r of W).

    Returns:
        (..., S / W, ...) contiguous, a copy. With one process (or no process group) ``x`` itself.

    Raises:
        ValueError if S is not a multiple of 2W (zigzag) or W (contiguous), naming the multiple.
    """
    check_layout(layout)
    topo = resolve_topology(group)
    if topo.world_size == 1:
        return x
    seq_dim = seq_dim % x.dim()
    S = x.shape[seq_dim]
    check_seqlen(S, topo.world_size, layout)
    pieces = x.chunk(num_chunks(topo.world_size, layout), dim=seq_dim)
    ids = chunk_ids(topo.world_size, topo.shard_index, layout)
    return torch.cat([pieces[i] for i in ids], dim=seq_dim)


def unshard(x_local: torch.Tensor, seq_dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence on every rank, from each rank's :func:`shard` (a collective: all ranks
    call it). Not differentiable (the result is detached); for logging, evaluation and tests.

    Returns (..., S_local * W, ...) in the original token order.
    """
    check_layout(layout)
    topo = resolve_topology(group)
    if topo.world_size == 1:
        return x_local
    seq_dim = seq_dim % x_local.dim()
    W = topo.world_size
    per = 2 if layout == "zigzag" else 1
    if x_local.shape[seq_dim] % per:
        raise ValueError(f"x_local's sequence length {x_local.shape[seq_dim]} must be even for layout='zigzag'")
    parts = all_gather_seq(x_local.detach(), topo)
    chunks = [None] * num_chunks(W, layout)
    for s, part in enumerate(parts):
        for cid, piece in zip(chunk_ids(W, s, layout), part.chunk(per, dim=seq_dim)):
            chunks[cid] = piece
    return torch.cat(chunks, dim=seq_dim)
