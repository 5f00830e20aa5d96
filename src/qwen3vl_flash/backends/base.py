"""The backend contract and the registry.

A backend is an object with a ``name``, a ``check(req) -> reason | None`` telling whether it can
serve a call, and either

* ``native_autograd = True`` and ``attention(q, k, v, p) -> (out, lse | None)``, differentiable by
  PyTorch itself (``eager``, ``sdpa``), or
* ``native_autograd = False`` and the FA2 pair ``forward(q, k, v, p) -> (out, lse)`` and
  ``backward(dout, q, k, v, out, lse, p) -> (dq, dk, dv)`` (``tiled``, ``triton``, ``cudnn``). The
  public functions wrap the pair in one ``torch.autograd.Function``; context parallelism calls the
  pair directly with a global lse.

Optionally a fused decode path for :func:`qwen3vl_flash.flash_attn_with_kvcache` (``triton``):
``kvcache_check(q, k_cache, p) -> reason | None`` and ``kvcache_attention(q, k_cache, v_cache, k,
v, cache_seqlens, p, block_table=None, cache_leftpad=None) -> (out, lse)``, which appends and
attends itself; the interface has validated every argument (values included, unless the caller
turned the value checks off) and hands a block table with unit stride along its pages.

Layouts (``p`` is an :class:`AttnParams`):

* dense:  q (B, Sq, H, D), k/v (B, Sk, Hkv, D), out like q, lse (B, H, Sq)
* varlen: ``p.cu_seqlens_q`` is set; q (Tq, H, D), k/v (Tk, Hkv, D), out like q, lse (H, Tq)

lse is float32 (float64 for float64 inputs). Inputs reach a backend already validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class AttnParams:
    """Everything about a call except the tensors themselves."""

    softmax_scale: float
    causal: bool = False
    window_size: Tuple[int, int] = (-1, -1)
    cu_seqlens_q: Optional[torch.Tensor] = None  # int32 (N+1,) for varlen
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    profile: object = None  # hardware.profiles.TileProfile
    need_lse: bool = False  # the caller asked for the lse (backends may skip computing it otherwise)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def has_window(self) -> bool:
        return self.window_size[0] >= 0 or self.window_size[1] >= 0


@dataclass(frozen=True)
class AttnRequest:
    """What a call needs from a backend; used by ``check`` and by ``auto`` selection."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    seqlen_q: int
    seqlen_k: int
    causal: bool = False
    window: bool = False
    varlen: bool = False
    need_lse: bool = False
    need_grad: bool = False
    device_capability: Optional[Tuple[int, int]] = None


class Backend:
    name: str = "?"
    native_autograd: bool = False
    # forward()/backward() take row slices of (B, S, H, D) tensors as strided views (no copy);
    # the ring passes views to such backends and contiguous copies to the others
    strided_rows: bool = False

    def check(self, req: AttnRequest) -> Optional[str]:  # pragma: no cover - interface
        """None if this backend can serve ``req``, else a short reason for error messages."""
        raise NotImplementedError

    def attention(self, q, k, v, p: AttnParams):  # native_autograd backends
        raise NotImplementedError(f"backend {self.name!r} has no differentiable attention()")

    def forward(self, q, k, v, p: AttnParams):  # FA2-style backends
        raise NotImplementedError(f"backend {self.name!r} has no forward()")

    def backward(self, dout, q, k, v, out, lse, p: AttnParams):
        raise NotImplementedError(f"backend {self.name!r} has no backward()")


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"backend={name!r} is not a known backend; expected 'auto' or one of {sorted(_REGISTRY)}"
        ) from None


def available_backends() -> List[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


_LOADED = False


def _ensure_loaded() -> None:
    """Import the backend modules once. Each imports its optional dependency (triton) lazily,
    so every backend is always registered and says in ``check`` why it cannot run."""
    global _LOADED
    if _LOADED:
        return
    import importlib

    for mod in BACKEND_MODULES:
        importlib.import_module(f"qwen3vl_flash.backends.{mod}")
    _LOADED = True


BACKEND_MODULES = ("eager", "sdpa", "tiled", "triton_backend", "cudnn")
