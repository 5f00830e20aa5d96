"""``triton``: our FlashAttention-2 kernels (:mod:`.triton_fwd`, :mod:`.triton_bwd`) as a backend.

Three tiers, as in flash-attn:

1. registered ops ``qwen3vl_flash::triton_fwd`` / ``qwen3vl_flash::triton_bwd``
   (``torch.library.custom_op`` + ``register_fake``), so ``torch.compile`` traces through them
   without graph breaks; triton itself is imported only when an op actually runs;
2. :class:`TritonBackend` (``forward`` / ``backward`` of the backend contract, wrapped in one
   autograd Function by :mod:`qwen3vl_flash.interface`);
3. the public functions in :mod:`qwen3vl_flash.interface`.

Where it runs: CUDA GPUs of compute capability >= 8.0 (Ampere, Ada, Hopper), and CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is first imported; slow,
for tests). dtypes: fp16 and bf16 (fp32 accumulation); fp32 with full-precision dots (no tf32);
float64 is refused (``auto`` then falls to ``tiled``). head_dim up to 256; non-powers of two are
split into two tensor-core dots (72 = 64 + 16, see :func:`.triton_common.split_head_dim`).

Tiles come from ``profile.triton``, a :class:`~qwen3vl_flash.hardware.profiles.TritonTiles`
(typed data, :mod:`qwen3vl_flash.hardware.profiles`)::

    TritonTiles(
        fwd=KernelTile(64, 64, num_warps=4, num_stages=3),           # BLOCK_M, BLOCK_N
        fwd_by_dim={256: KernelTile(64, 64, 4, 2)},                  # per padded head dim
        fwd_long_from=8192, fwd_long_by_dim={128: KernelTile(128, 128, 8, 3)},  # long sequences
        bwd=KernelTile(64, 64, 4, 2), bwd_by_dim={...},              # the dK/dV kernel (and dQ)
        bwd_dq_by_dim={...},                                         # the dQ kernel's own tile
        head_split="split")                                          # or "pad"

resolved by ``TritonTiles.lookup(kind, head_dim, seqlen)`` into the ops' ``config`` list. No tile
for a call means: autotune once over the profile's ``autotune_fwd`` / ``autotune_bwd`` on GPU
(cached per shape class), or the interpreter's tile (``interpret``) on CPU; those launch-level
fields (and ``reverse_m``, ``preprocess_block_m``) are read inside the ops from the device's
profile (:func:`~qwen3vl_flash.hardware.profiles.profile_for_device`), as the decode op's tiles.
"""

from __future__ import annotations

import importlib.util
from typing import List, Optional, Tuple

import torch

from .._optional import require
from ..conventions import MAX_HEAD_DIM
from ..hardware.profiles import TritonTiles, profile_for_device
from .base import AttnParams, AttnRequest, Backend, register_backend
from .triton_common import interpreting

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)
_NO_CONFIG = [-1, -1, -1, -1]
_NO_TILES = TritonTiles()  # a profile without Triton tiles: every kernel autotunes


# Looked up once at import (without importing triton), so check() stays traceable by dynamo.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_available() -> bool:
    return _TRITON_FOUND


def _tiles(profile) -> TritonTiles:
    return getattr(profile, "triton", None) or _NO_TILES


def _config_list(profile, kind: str, head_dim: int, seqlen: int = 0) -> List[int]:
    """The op's ``config`` for kernel ``kind`` ("fwd", "bwd", "bwd_dq"): [BLOCK_M, BLOCK_N,
    num_warps, num_stages] of ``profile.triton.lookup(kind, head_dim, seqlen)``, or -1s (= autotune)."""
    tile = _tiles(profile).lookup(kind, head_dim, seqlen)
    return list(_NO_CONFIG) if tile is None else tile.as_list()


def _bwd_config_list(profile, head_dim: int) -> List[int]:
    """The backward op's ``config``: the dK/dV kernel's 4 ints, then the dQ kernel's own 4 where
    the profile has one (8 in all)."""
    cfg = _config_list(profile, "bwd", head_dim)
    dq = _tiles(profile).lookup("bwd_dq", head_dim)
    return cfg if dq is None else cfg + dq.as_list()


def _config_dict(c: List[int]) -> Optional[dict]:
    if c[0] < 0:
        return None
    return {"BLOCK_M": c[0], "BLOCK_N": c[1], "num_warps": c[2], "num_stages": c[3]}


def _device_tiles(q: torch.Tensor) -> TritonTiles:
    """The launch-level tiles (autotune lists, interpreter tile, reverse_m, preprocess block) of
    the device's profile: the ops take no profile argument (their schema is fixed)."""
    return _tiles(profile_for_device(q.device))


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("qwen3vl_flash::triton_fwd", mutates_args=())
def triton_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    config: List[int],
    head_split: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32 (B, H, Sq) dense / (H, Tq) varlen). config: [BLOCK_M, BLOCK_N,
    num_warps, num_stages], -1s to autotune (over the device profile's ``triton.autotune_fwd``)."""
    require("triton", "backend='triton'")
    from .triton_fwd import attention_forward

    return attention_forward(
        q, k, v, softmax_scale, causal, (window_left, window_right), cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, config=_config_dict(config), head_split=head_split, tiles=_device_tiles(q),
    )


@triton_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, config, head_split):
    out = torch.empty_like(q)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("qwen3vl_flash::triton_bwd", mutates_args=())
def triton_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    config: List[int],
    head_split: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v). config: 4 ints for both kernels, or 8 (dK/dV, then dQ);
    -1s to autotune (over the device profile's ``triton.autotune_bwd``)."""
    require("triton", "backend='triton'")
    from .triton_bwd import attention_backward

    return attention_backward(
        dout, q, k, v, out, lse, softmax_scale, causal, (window_left, window_right),
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config=_config_dict(config[:4]),
        config_dq=_config_dict(config[4:8]) if len(config) == 8 else None, head_split=head_split,
        tiles=_device_tiles(q),
    )


@triton_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, window_left, window_right, config, head_split):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("qwen3vl_flash::triton_decode", mutates_args=())
def triton_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_leftpad: Optional[torch.Tensor],
    softmax_scale: float,
    causal: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode over a cache that already holds every key (no append): q (B, Sq<=16, H, D)
    against keys [cache_leftpad[b], cache_seqlens[b]) of k_cache/v_cache (B, Smax, Hkv, D), causal
    aligned to cache_seqlens. Returns (out like q, lse float32 (B, H, Sq)). An opaque op, so
    torch.compile traces a decode step through it (no host syncs inside: CUDA-graph capturable)."""
    require("triton", "the Triton decode path")
    from . import triton_decode

    p = AttnParams(softmax_scale, causal, profile=profile_for_device(q.device))
    # no fused merge: under torch.compile's CUDA-graph trees every allocation made in a call must
    # die with it or be an output, and the fused merge keeps its split counters between calls
    return triton_decode.decode_attention(q, k_cache, v_cache, None, None, cache_seqlens, p,
                                          cache_leftpad=cache_leftpad, fuse=False)


@triton_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, causal):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------


class TritonBackend(Backend):
    name = "triton"
    native_autograd = False
    strided_rows = True

    def check(self, req: AttnRequest) -> Optional[str]:
        if req.dtype == torch.float64:
            return "float64 is not supported by the Triton kernels (use backend='tiled' or 'eager')"
        if req.dtype not in _SUPPORTED_DTYPES:
            return f"dtype {req.dtype} is not supported (expected float16, bfloat16 or float32)"
        if req.head_dim > MAX_HEAD_DIM:
            return f"head_dim {req.head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernels"
        if not _triton_available():
            return "triton is not installed (pip install triton)"
        if req.device_type == "cuda":
            cap = req.device_capability
            if cap is not None and tuple(cap) < MIN_CAPABILITY:
                return (
                    f"CUDA compute capability {cap[0]}.{cap[1]} < 8.0: the Triton kernels need "
                    "sm80+ (Ampere or newer); GTX 10-series (sm61) uses 'sdpa' or 'tiled'"
                )
            return None
        if req.device_type == "cpu":
            if not interpreting():
                return "CPU tensors run through Triton only under its interpreter (set TRITON_INTERPRET=1)"
            return None
        return f"device type {req.device_type!r} is not supported by the Triton kernels"

    @staticmethod
    def _common(q: torch.Tensor, p: AttnParams):
        left, right = p.window_size
        return (
            p.cu_seqlens_q, p.cu_seqlens_k, int(p.max_seqlen_q), int(p.max_seqlen_k),
            float(p.softmax_scale), bool(p.causal), int(left), int(right),
        )

    def forward(self, q, k, v, p: AttnParams):
        seqlen = max(p.max_seqlen_q, p.max_seqlen_k) if p.varlen else max(q.shape[1], k.shape[1])
        cfg = _config_list(p.profile, "fwd", q.shape[-1], seqlen)
        return triton_fwd_op(q, k, v, *self._common(q, p), cfg, _tiles(p.profile).head_split)

    def backward(self, dout, q, k, v, out, lse, p: AttnParams):
        cfg = _bwd_config_list(p.profile, q.shape[-1])
        return triton_bwd_op(dout, q, k, v, out, lse, *self._common(q, p), cfg, _tiles(p.profile).head_split)

    # -- decode (flash_attn_with_kvcache): delegated to the split-KV kernels in triton_decode.py
    def kvcache_check(self, q, k_cache, p: AttnParams) -> Optional[str]:
        try:
            from . import triton_decode
        except ImportError as exc:
            return f"the Triton decode kernels are unavailable ({exc})"
        return triton_decode.decode_check(q, k_cache, p)

    def kvcache_attention(self, q, k_cache, v_cache, k, v, cache_seqlens, p: AttnParams, block_table=None,
                          cache_leftpad=None, k_scale=None, v_scale=None):
        """The split-KV decode; an int8 / float8_e4m3fn cache comes with its float32 per-token
        ``k_scale``/``v_scale`` (dequantised on load, new rows quantised in the kernel)."""
        from . import triton_decode

        return triton_decode.decode_attention(q, k_cache, v_cache, k, v, cache_seqlens, p, block_table=block_table,
                                              cache_leftpad=cache_leftpad, k_scale=k_scale, v_scale=v_scale)


register_backend(TritonBackend())
