"""Plain PyTorch attention: the executable definition of what every backend computes.

Scores are materialised (O(Sq * Sk) memory), so this is for tests, benchmarks and the
``eager`` backend, never for long sequences. It supports everything the public API does:
GQA/MQA (K/V heads shared by ``H // Hkv`` consecutive query heads), causal attention aligned
bottom-right when ``Sq != Sk``, sliding windows, varlen (packed) batches and the log-sum-exp.

Masking convention (shared by all backends; written once in :mod:`qwen3vl_flash.conventions`,
causal folded into the window by :func:`~qwen3vl_flash.conventions.fold_window`), for query ``i``
of a sequence with ``Sq`` queries and ``Sk`` keys::

    off = Sk - Sq                      # bottom-right alignment
    key j visible  <=>  (not causal or j <= i + off)
                        and (left  < 0 or j >= i + off - left)
                        and (right < 0 or j <= i + off + right)

    causal, Sq=3, Sk=5 (x = visible)    causal, Sq=5, Sk=3
        k0 k1 k2 k3 k4                       k0 k1 k2
    q0  x  x  x  .  .                    q0  .  .  .   <- sees no key: output 0, lse -inf
    q1  x  x  x  x  .                    q1  .  .  .
    q2  x  x  x  x  x                    q2  x  .  .
                                         ...

A query row that sees no key returns zeros and ``lse = -inf``, never NaN.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .conventions import fold_window

__all__ = ["attention_ref", "attention_ref_varlen", "visibility_mask", "lse_dtype"]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32, except float64 inputs keep float64 (exact merges in tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visibility_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    device=None,
) -> Optional[torch.Tensor]:
    """Boolean (Sq, Sk) mask, True where query i may attend to key j; None if all visible."""
    left, right = fold_window(causal, window_size)
    if left < 0 and right < 0:
        return None
    off = seqlen_k - seqlen_q
    i = torch.arange(seqlen_q, device=device).unsqueeze(1) + off
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= i + right
    if left >= 0:
        mask &= j >= i - left
    return mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    upcast: bool = True,
    return_lse: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
):
    """Reference attention for q (B, Sq, H, D), k/v (B, Sk, Hkv, D).

    upcast: compute in float32 (or keep float64 inputs in float64) and cast the output back
    to q's dtype; upcast=False computes in the input dtype, which is how "PyTorch's own
    low-precision error" is measured in the tests.
    key_padding_mask: optional bool (B, Sk), True = key present.
    Returns out (B, Sq, H, D) [, lse (B, H, Sq), float32 (float64 for float64 inputs)].
    """
    in_dtype = q.dtype
    if upcast and q.dtype not in (torch.float32, torch.float64):
        q, k, v = q.float(), k.float(), v.float()
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    group = H // Hkv
    # (B, Hkv, group, Sq, D) x (B, Hkv, 1, D, Sk): GQA without changing the head order
    qh = q.permute(0, 2, 1, 3).reshape(B, Hkv, group, Sq, D)
    kh = k.permute(0, 2, 3, 1).unsqueeze(2)
    vh = v.permute(0, 2, 1, 3).unsqueeze(2)
    scores = torch.matmul(qh * scale, kh)  # (B, Hkv, group, Sq, Sk)
    mask = visibility_mask(Sq, Sk, causal, window_size, device=q.device)
    if key_padding_mask is not None:
        kp = key_padding_mask.view(B, 1, 1, 1, Sk)
        mask = kp if mask is None else (mask & kp)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    # exp(s - lse) is 0 where masked and NaN-free where the whole row is masked (lse=-inf)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1).to(scores.dtype))
    out = torch.matmul(probs.to(vh.dtype), vh)  # (B, Hkv, group, Sq, D)
    out = out.reshape(B, H, Sq, D).permute(0, 2, 1, 3).to(in_dtype)
    if return_lse:
        return out, lse.reshape(B, H, Sq).to(lse_dtype(in_dtype))
    return out


def attention_ref_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    upcast: bool = True,
    return_lse: bool = False,
):
    """Reference for packed sequences: q (Tq, H, D), k/v (Tk, Hkv, D); one call per segment.

    Returns out (Tq, H, D) [, lse (H, Tq) float32]. Empty segments are allowed.
    """
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        o, l = attention_ref(
            q[qs:qe].unsqueeze(0),
            k[ks:ke].unsqueeze(0),
            v[ks:ke].unsqueeze(0),
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            upcast=upcast,
            return_lse=True,
        )
        out[qs:qe] = o[0]
        lse[:, qs:qe] = l[0]
    return (out, lse) if return_lse else out
