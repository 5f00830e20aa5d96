"""The conventions every layer shares, written once: the mask, the limits, the grad rule, warnings.

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
