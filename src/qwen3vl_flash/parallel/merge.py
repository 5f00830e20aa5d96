"""Merging partial attention results by their log-sum-exp (pure functions, no communication).

Attention over keys K = K1 u K2 is a convex combination of the two partial results::

    lse   = log(exp(lse1) + exp(lse2))
    out   = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)
          = out1 - sigmoid(lse2 - lse1) * (out1 - out2)        # the stable form

``sigmoid`` never overflows and the update is an interpolation (``lerp``), so accumulating block
after block in fp32 loses nothing to cancellation (ring-flash-attention's ``update_out_and_lse``). Rows where a
block saw no key (``lse2 = -inf``) get weight 0 and stay bit-for-bit unchanged; rows where neither
side saw a key keep ``out`` (zeros) and ``lse = -inf``, never NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["merge_attn_outputs"]


def merge_attn_outputs(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets.

    Args:
        out, block_out: (B, S, H, D); ``out`` is the running accumulator (fp32 or fp64),
            ``block_out`` may be lower precision (it is upcast to ``out``'s dtype).
        lse, block_lse: (B, H, S) log-sum-exp of the scaled scores of each part; -inf where that
            part saw no key.

    Returns:
        (out, lse) of the union, in ``out``'s and ``lse``'s dtypes. Inputs are not modified.
    """
    return merge_attn_outputs_(out.clone(), lse.clone(), block_out, block_lse)


def merge_attn_outputs_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_attn_outputs` in place: ``out`` and ``lse`` (which may be views, e.g. some
    query rows of the accumulator) are updated and returned; ``block_out``/``block_lse`` are not
    modified. One temporary of ``block_out``'s size in ``out``'s dtype, nothing of ``out``'s."""
    block_lse = block_lse.to(lse.dtype)
    # weight of the new block; lse1 = -inf (nothing yet) gives sigmoid(+inf) = 1 exactly;
    # rows where this block saw no key get weight 0 and stay bit-for-bit unchanged
    w = torch.sigmoid(block_lse - lse).masked_fill_(torch.isneginf(block_lse), 0.0)
    lse.copy_(torch.logaddexp(lse, block_lse))  # logaddexp(-inf, -inf) = -inf, (-inf, x) = x
    w = w.transpose(1, 2).unsqueeze(-1).to(out.dtype)  # (B, H, S) -> (B, S, H, 1)
    # out + w * (block - out) in one pass (lerp switches to block - (block - out) * (1 - w) for
    # w >= 0.5: exact at w = 1, and w = 0 leaves out unchanged)
    out.lerp_(block_out.to(out.dtype), w)
    return out, lse
