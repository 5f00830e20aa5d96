"""The conventions every layer shares, written once: the mask, the limits, the grad rule, warnings
and the lse merge of partial results.

Masking (flash-attn's, bottom-right aligned): with ``off = Sk - Sq``, query ``i`` sees key ``j`` iff
``i + off - left <= j <= i + off + right``, where ``-1`` means unbounded and ``causal`` is the
window's right edge folded to 0 (:func:`fold_window`). With ``Sq > Sk`` the first ``Sq - Sk`` rows
of a causal call see no key: they return 0 and lse ``-inf``::

    causal, Sq=5, Sk=3 (x = visible)      causal, Sq=3, Sk=5
        k0 k1 k2                              k0 k1 k2 k3 k4
    q0  .  .  .   <- no key: 0, -inf      q0  x  x  x  .  .
    q1  .  .  .                           q1  x  x  x  x  .
    q2  x  .  .                           q2  x  x  x  x  x
    q3  x  x  .
    q4  x  x  x
"""

from __future__ import annotations

import logging
from typing import Hashable, Set, Tuple

import torch

# Largest head_dim any backend of ours takes (the Triton kernels' tiles; flash-attn's limit too).
MAX_HEAD_DIM = 256
# Most query tokens the split-KV decode kernels take in one call (decode, speculative chunks).
DECODE_MAX_QUERIES = 16

log = logging.getLogger("qwen3vl_flash")


def fold_window(causal: bool, window_size: Tuple[int, int]) -> Tuple[int, int]:
    """``(left, right)`` with ``causal`` folded into ``right`` (``right = min(right, 0)``, and 0
    when unbounded); ``-1`` = unbounded. Every backend and the reference mask use this."""
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return int(left), int(right)


def merge_lse_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge a partial attention result over more keys into ``(out, lse)``, in place.

    Attention over keys K1 u K2 (disjoint) is the convex combination of the two normalised
    partial results, in the stable form (ring-flash-attention's ``update_out_and_lse``)::

        lse = logaddexp(lse1, lse2)
        out = out1 + sigmoid(lse2 - lse1) * (out2 - out1)    # = out1 e^(lse1-lse) + out2 e^(lse2-lse)

    ``out`` (..., D) is the accumulator (fp32 or fp64; may be a view) and ``lse`` has the shape
    ``out.shape[:-1]`` (lay views over other layouts, e.g. ``out.transpose(1, 2)``);
    ``block_out``/``block_lse`` are shaped alike, may be lower precision and are not modified.
    ``lse1 = -inf`` (nothing yet) takes the block exactly; rows where the block saw no key
    (``lse2 = -inf``) stay bit-for-bit unchanged; rows where neither did keep ``lse = -inf``,
    never NaN. Used by the ``tiled`` backend across key tiles and by context parallelism
    across ranks. Returns ``(out, lse)``."""
    block_lse = block_lse.to(lse.dtype)
    w = torch.sigmoid(block_lse - lse).masked_fill_(torch.isneginf(block_lse), 0.0)
    lse.copy_(torch.logaddexp(lse, block_lse))  # logaddexp(-inf, -inf) = -inf, (-inf, x) = x
    # out + w * (block - out) in one pass (lerp switches to block - (block - out) * (1 - w) for
    # w >= 0.5: exact at w = 1, and w = 0 leaves out unchanged)
    out.lerp_(block_out.to(out.dtype), w.unsqueeze(-1).to(out.dtype))
    return out, lse


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will want gradients of any of ``tensors`` (grad mode on and one of them
    requires grad). Pass all of q, k and v: a frozen query with trainable K/V still needs a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_WARNED: Set[Hashable] = set()


def warn_once(key: Hashable, msg: str, *args) -> None:
    """Log ``msg`` (``%``-style ``args``) on the ``qwen3vl_flash`` logger the first time ``key`` is seen."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)
