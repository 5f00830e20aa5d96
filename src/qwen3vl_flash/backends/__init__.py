"""The backends (:mod:`.base`: the contract and the registry) and the seams the integrations use.

Data flows one way: public function or integration -> backend layer -> kernel. An integration
that needs a kernel directly (a torch.compile'd decode step cannot take the host-side path of
:func:`qwen3vl_flash.flash_attn_with_kvcache`) goes through the functions here, never through a
kernel module:

* :func:`decode_op_serves` -- whether :func:`decode_op` can take a decode call of these shapes;
* :func:`decode_op` -- the split-KV decode over a cache that already holds every key, as one
  opaque custom op (``qwen3vl_flash::triton_decode``): traceable by torch.compile, no host syncs,
  CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from ..conventions import DECODE_MAX_QUERIES, MAX_HEAD_DIM
from .base import AttnRequest, get_backend

__all__ = ["decode_op", "decode_op_serves"]


@torch.compiler.assume_constant_result  # evaluated once while tracing: a constant in the graph
def decode_op_serves(device_type: str, index: int | None, dtype: torch.dtype, head_dim: int, num_heads: int,
                     num_kv_heads: int, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether :func:`decode_op` can take causal decode calls of these shapes on this device (the
    Triton split-KV kernels: device, dtype and shapes only, no tensor is read)."""
    cap = torch.cuda.get_device_capability(index) if device_type == "cuda" else None
    req = AttnRequest(device_type=device_type, dtype=dtype, head_dim=head_dim, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=True, need_lse=False,
                      device_capability=cap)
    return (get_backend("triton").check(req) is None and seqlen_q <= DECODE_MAX_QUERIES
            and head_dim <= MAX_HEAD_DIM and num_heads % num_kv_heads == 0)


def decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
              cache_leftpad: torch.Tensor | None, softmax_scale: float,
              causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode, no append: q (B, Sq <= DECODE_MAX_QUERIES, H, D) against keys
    [cache_leftpad[b], cache_seqlens[b]) of k_cache/v_cache (B, Smax, Hkv, D) (strided views are
    fine), causal aligned to cache_seqlens. Returns (out like q, lse float32 (B, H, Sq)). Inputs
    are not validated (ask :func:`decode_op_serves` first); lengths past the cache are clamped."""
    from .triton_backend import triton_decode_op

    return triton_decode_op(q, k_cache, v_cache, cache_seqlens, cache_leftpad, float(softmax_scale), bool(causal))
