"""Quantised attention: INT8 Q.K^T with 16-bit or FP8 P.V, and INT8/FP8 KV caches.

:mod:`.quantize` defines the formats and the reference quantisers that every path shares;
:mod:`.portable` computes them with PyTorch ops on any device; the Triton kernels
(``qwen3vl_flash.backends.triton_quant``) compute them on CUDA. :func:`quant_attention` picks one.
The public entry points are ``flash_attn_func(..., quant=)`` and ``flash_attn_varlen_func(...,
quant=)`` (docs/quantization.md).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..conventions import warn_once
from .portable import quant_attention_portable
from .quantize import QUANT_MODES, QuantizedQKV, check_quant, lse_shift, quantize_qkv

__all__ = ["quant_attention", "quant_attention_path", "quant_attention_portable", "quant_backend_reason", "QUANT_BACKENDS", "QUANT_MODES",
           "check_quant", "quantize_qkv", "lse_shift", "QuantizedQKV"]

QUANT_BACKENDS = ("auto", "triton", "tiled")  # "tiled" = the portable PyTorch path
_ENV_BACKEND = "QWEN3VL_FLASH_BACKEND"


def _triton_module():
    """The Triton quant kernels' module, or None where it cannot be imported (no triton, or the
    module is absent)."""
    try:
        from ..backends import triton_quant
    except ImportError:
        return None
    return triton_quant


def quant_backend_reason(q: torch.Tensor, k: torch.Tensor, quant: str) -> Optional[str]:
    """None when the Triton quant kernels serve this call, else why not."""
    mod = _triton_module()
    if mod is None:
        return "the Triton quant kernels are not available (qwen3vl_flash.backends.triton_quant or triton missing)"
    try:
        return mod.quant_triton_serves(q, k, quant)
    except AttributeError as exc:  # a module without the entry point
        return f"the Triton quant kernels are not available ({exc})"


def _backend_name(backend: str, quant: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', got {type(backend).__name__}")
    name = backend
    if name == "auto":
        env = os.environ.get(_ENV_BACKEND, "")
        if env in ("triton", "tiled"):  # an environment override that names a quant path
            name = env
    if name not in QUANT_BACKENDS:
        raise ValueError(f"backend={backend!r} has no quantised path (quant={quant!r}); "
                         f"expected one of {QUANT_BACKENDS} ('tiled' = the portable PyTorch path)")
    return name


def quant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    quant: str,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    need_lse: bool = False,
    backend: str = "auto",
):
    """Quantised attention on the best path for the device: ``(out, lse | None)``.

    Layouts as :func:`.portable.quant_attention_portable` (dense (B, S, H, D), or varlen (T, H, D)
    with ``cu_seqlens_q/k``). ``quant`` is validated by :func:`.quantize.check_quant` (mode,
    forward only, 16-bit inputs, fp8 only on sm89+). ``backend``:

    * ``"auto"``: the Triton kernels on CUDA where they serve the call (an unexpected failure
      there falls back to the portable path with one logged warning), else the portable path.
      ``$QWEN3VL_FLASH_BACKEND`` set to ``triton`` or ``tiled`` overrides it; other values are
      names of unquantised backends and are ignored here.
    * ``"triton"``: the Triton kernels, or ValueError with the reason they cannot run.
    * ``"tiled"``: the portable PyTorch path.

    Any other name raises ValueError naming ``backend`` and ``quant``."""
    out, lse, _ = quant_attention_path(q, k, v, quant, softmax_scale, causal, window, cu_seqlens_q, cu_seqlens_k,
                                       max_seqlen_q, max_seqlen_k, need_lse, backend)
    return out, lse


def quant_attention_path(q, k, v, quant, softmax_scale=None, causal=False, window=(-1, -1), cu_seqlens_q=None,
                         cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, need_lse=False, backend="auto"):
    """:func:`quant_attention` that also names the path that ran: ``(out, lse | None, "triton" |
    "tiled")`` (for ``qf.monitor()`` records)."""
    quant = check_quant(quant, q, k, v)
    if quant is None:
        raise ValueError(f"quant must be one of {QUANT_MODES} for quant_attention, got None")
    name = _backend_name(backend, quant)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    args = (q, k, v, quant, scale, causal, tuple(window), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            need_lse)
    if name == "tiled" or (name == "auto" and not q.is_cuda):
        return (*quant_attention_portable(*args), "tiled")
    reason = quant_backend_reason(q, k, quant)
    if reason is not None:
        if name == "triton":
            raise ValueError(f"backend='triton' cannot run this quant={quant!r} call: {reason}")
        return (*quant_attention_portable(*args), "tiled")
    mod = _triton_module()
    if name == "triton":
        return (*mod.quant_attention_triton(*args), "triton")
    try:
        return (*mod.quant_attention_triton(*args), "triton")
    except Exception as exc:  # auto: a kernel that fails to build falls back, once-logged
        warn_once(("triton_quant", type(exc).__name__), "qwen3vl_flash: the Triton quant kernels failed (%s: %s); "
                  "falling back to the portable path", type(exc).__name__, exc)
        return (*quant_attention_portable(*args), "tiled")
