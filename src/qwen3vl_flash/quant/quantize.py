"""The quantisers every quantised path shares (the portable PyTorch path and the Triton kernels).

One definition of the rounding, so the laptop CPU, CI (Triton's interpreter) and the GPU run the
same arithmetic. The formats (``quant="int8"`` / ``"fp8"`` in the public functions):

* Q: INT8 per token and head: ``q_scale[.., s, h] = max_d |q| / 127``, ``q_i8 = round(q / q_scale)``
  (round half to even, clamped to +-127). Finer than SageAttention's per-block scales and just as
  cheap in a kernel: the score tile is multiplied by an outer product of two scale vectors.
* K: first *smoothed* -- the mean over the sequence of each channel (per batch element and kv head;
  for packed varlen calls one mean over all tokens) is subtracted -- then INT8 per token and head
  like Q. Softmax is unchanged: for one query row q, ``q.(k_j - m) = q.k_j - q.m`` shifts every
  visible score by the same constant (every key a query sees shares one mean), while the channel
  outliers that cost per-token INT8 its resolution are gone. The lse is shifted by
  ``softmax_scale * q.m``; :func:`lse_shift` gives that correction.
* Scores: ``s = (q_i8 . k_i8, summed in int32) * q_scale[i] * k_scale[j] * softmax_scale`` in fp32.
  An fp32 matmul of int8-valued operands is exact: |products| <= 127^2 and a sum over D <= 256 of
  them stays below 2^22 < 2^24, so every partial sum is an integer fp32 holds exactly. The
  portable path therefore emulates int32 accumulation with fp32 matmuls (TF32 must stay off).
* P.V, ``"int8"`` mode: P (fp32 after the exponential) rounded to V's dtype (bf16/fp16), fp32
  accumulation: the unquantised kernels' arithmetic.
* P.V, ``"fp8"`` mode: V in FP8 e4m3 with one scale per channel (``v_scale[.., h, d] = max_s |v| / 448``
  over the sequence); P in [0, 1] is stored as ``fp8(P * 448)`` to use e4m3's whole range;
  ``out = (sum_j fp8(P*448) fp8(V/v_scale)) * v_scale / 448 / l`` with ``l`` the fp32 row sum of
  the unrounded P.

A zero row (or channel) gets scale 1 so nothing divides by zero; its codes are 0. Scales divide by a
tensor, not a Python number: CUDA turns ``x / 127.0`` into ``x * (1/127)``, which rounds differently
from the CPU's (and the kernels') correctly rounded quotient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

QUANT_MODES = ("int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite torch.float8_e4m3fn
P_SCALE = FP8_MAX  # P in [0, 1] is stored as fp8(P * P_SCALE)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89) and Hopper (sm90) onwards


def check_quant(quant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Validate a ``quant=`` argument against the call's tensors; returns the mode (or None).

    Raises ValueError naming ``quant``: an unknown mode (listing the valid ones), inputs that
    require grad (quantised attention is forward only), fp32/fp64 inputs (naming the dtype), or
    ``"fp8"`` on a device without FP8 tensor cores (naming the device)."""
    if quant is None:
        return None
    if not isinstance(quant, str) or quant not in QUANT_MODES:
        raise ValueError(f"quant must be None or one of {QUANT_MODES}, got {quant!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            f"quant={quant!r} is forward only (inference and evaluation): q, k and v must not require grad "
            "(call under torch.no_grad(), or pass quant=None to train)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quant={quant!r} takes float16 or bfloat16 inputs, got {q.dtype} "
                         "(fp32/fp64 calls are exact already: pass quant=None)")
    if quant == "fp8":
        cap = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
        if cap is None or tuple(cap) < FP8_MIN_CAPABILITY:
            where = f"{q.device} (compute capability {cap[0]}.{cap[1]})" if cap else str(q.device)
            raise ValueError(f"quant='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
                             f"q is on {where}. Use quant='int8' there.")
    return quant


def quantize_int8(x: torch.Tensor):
    """Symmetric INT8 per row of the last dimension: ``x (..., D) -> (codes int8 (..., D), scale
    float32 (...))`` with ``x ~= codes * scale[..., None]``; round half to even, clamp +-127."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, INT8_MAX), torch.ones_like(amax))
    codes = torch.round(xf / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def quantize_fp8(x: torch.Tensor, dim: int = -1):
    """FP8 e4m3 with one scale per slice along ``dim`` reduced away: ``x -> (codes e4m3 like x,
    scale float32 with ``dim`` kept as size 1)``, ``x ~= codes * scale``; round to nearest even."""
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def k_mean(k: torch.Tensor, varlen: bool) -> torch.Tensor:
    """The smoothing mean of K in fp32: dense k (B, Sk, Hkv, D) -> (B, 1, Hkv, D); packed varlen
    k (Tk, Hkv, D) -> (1, Hkv, D) (one mean for every segment: each query sees keys of one
    segment only, all shifted alike, so the softmax is unchanged)."""
    return k.float().mean(dim=0 if varlen else 1, keepdim=True)


def lse_shift(q: torch.Tensor, mean: torch.Tensor, softmax_scale: float, varlen: bool) -> torch.Tensor:
    """What smoothing took out of the lse: ``softmax_scale * q.mean`` in fp32, laid out like the
    lse (dense (B, H, Sq), varlen (H, Tq)). Query head h reads kv head h // (H // Hkv)."""
    H, Hkv = q.shape[-2], mean.shape[-2]
    m = mean.repeat_interleave(H // Hkv, dim=-2)  # (B, 1, H, D) / (1, H, D)
    shift = (q.float() * m).sum(-1) * softmax_scale  # (B, Sq, H) / (Tq, H)
    return shift.transpose(-1, -2) if not varlen else shift.t()


class QuantizedQKV(NamedTuple):
    """Quantised operands of one call, in the caller's layout (dense (B, S, H, D) / varlen (T, H, D))."""

    q_codes: torch.Tensor  # int8, like q
    q_scale: torch.Tensor  # float32, q.shape[:-1]
    k_codes: torch.Tensor  # int8, like k (smoothed)
    k_scale: torch.Tensor  # float32, k.shape[:-1]
    k_mean: torch.Tensor  # float32, (B, 1, Hkv, D) / (1, Hkv, D)
    v: torch.Tensor  # v itself ("int8" mode) or its e4m3 codes ("fp8" mode)
    v_scale: Optional[torch.Tensor]  # float32 per channel, (B, 1, Hkv, D) / (1, Hkv, D); None for "int8"


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant: str, varlen: bool) -> QuantizedQKV:
    """The reference quantisation of a call's inputs (PyTorch ops; the Triton path has a fused
    kernel that must produce the same codes and scales)."""
    q_codes, q_scale = quantize_int8(q)
    mean = k_mean(k, varlen)
    k_codes, k_scale = quantize_int8(k.float() - mean)
    if quant == "fp8":
        v_codes, v_scale = quantize_fp8(v, dim=0 if varlen else 1)
        return QuantizedQKV(q_codes, q_scale, k_codes, k_scale, mean, v_codes, v_scale)
    return QuantizedQKV(q_codes, q_scale, k_codes, k_scale, mean, v, None)


def quantize_p_fp8(p: torch.Tensor) -> torch.Tensor:
    """P (fp32, in [0, 1]) -> its e4m3 codes ``fp8(P * P_SCALE)``."""
    return (p * P_SCALE).to(FP8_DTYPE)
