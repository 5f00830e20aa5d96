"""Merging partial attention results by their log-sum-exp (pure functions, no communication).

Attention over keys K = K1 u K2 is a convex combination of the two partial results, merged in the
stable form ``out = out1 - sigmoid(lse2 - lse1) * (out1 - out2)``, ``lse = logaddexp(lse1, lse2)``:
:func:`qwen3vl_flash.conventions.merge_lse_`, the one merge the ``tiled`` backend uses across key
tiles too. This module lays it over context parallelism's (B, S, H, D) outputs and (B, H, S) lse.
Rows where a block saw no key stay bit-for-bit unchanged; rows where neither side saw a key keep
``out`` (zeros) and ``lse = -inf``, never NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..conventions import merge_lse_

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
    modified. One temporary of ``block_out``'s size in ``out``'s dtype, nothing of ``out``'s.
    The merge itself is :func:`qwen3vl_flash.conventions.merge_lse_` (the ``tiled`` backend's
    too), applied to (B, H, S, D) views so that the rows line up with the lse's."""
    merge_lse_(out.transpose(1, 2), lse, block_out.transpose(1, 2), block_lse)
    return out, lse
