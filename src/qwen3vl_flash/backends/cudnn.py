"""``cudnn``: NVIDIA cuDNN's fused attention as an FA2-style backend (forward + backward + lse).

PyTorch ships cuDNN's SDPA kernels as ``aten::_scaled_dot_product_cudnn_attention`` and its
backward. ``sdpa`` already reaches them through ``F.scaled_dot_product_attention`` for single
calls; this backend exposes the *pair* with the lse, which is what context parallelism needs
(each ring step runs a forward with lse, and the backward runs with the global out and lse).
On an H100 cuDNN's forward+backward was the fastest kernel we measured (docs/performance.md),
so :func:`qwen3vl_flash.parallel.context_parallel_attn` uses it by default on Hopper GPUs.

Limits (``check`` says which one applies): CUDA, fp16/bf16, compute capability >= 8.0,
head_dim a multiple of 8 up to 128 (sm80) / 256 (sm90), no sliding window, no varlen, and causal
only when Sq == Sk (cuDNN's causal mask is top-left aligned; ours is bottom-right, the two agree
only on square blocks, which is what the ring computes). GQA: where the build's cuDNN attention
takes K/V with fewer heads as they are (:func:`native_gqa`, probed once; true on torch 2.11 /
cuDNN 9.19), they are passed as they are. Otherwise K/V are repeated across the group for the
call and dK/dV summed back over it; when that repeat would not fit twice in the GPU's free
memory, the block runs in KV-head chunks (:func:`kv_head_chunks`; not yet measured on a GPU).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .base import AttnParams, AttnRequest, Backend, register_backend

_DTYPES = (torch.float16, torch.bfloat16)


def _op_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention") and hasattr(
        torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward"
    )


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> a (B, H, S, D) view, the layout SDPA normally receives."""
    return x.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def _sum_group(dx: torch.Tensor, group: int) -> torch.Tensor:
    """(B, S, H, D) gradient of repeated K/V -> (B, S, H // group, D)."""
    if group == 1:
        return dx
    B, S, H, D = dx.shape
    return dx.reshape(B, S, H // group, group, D).sum(3, dtype=torch.float32).to(dx.dtype)


def cudnn_forward_op(q, k, v, causal: bool, scale: float):
    """(out (B,H,Sq,D), lse (B,H,Sq,1) float32) from cuDNN; inputs (B,H,S,D) views."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    return res[0], res[1]


def cudnn_backward_op(dout, q, k, v, out, lse4, causal: bool, scale: float):
    """(dq, dk, dv) as (B,H,S,D) from cuDNN's backward; ``lse4`` (B,H,Sq,1) float32."""
    seed = torch.zeros((), dtype=torch.long, device=q.device)
    offset = torch.zeros((), dtype=torch.long, device=q.device)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse4, seed, offset, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
        scale=scale,
    )
    return res[0], res[1], res[2]


_NATIVE_GQA: Dict[Tuple[Optional[int], torch.dtype], bool] = {}


def native_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build's cuDNN attention takes K/V with fewer heads than Q (GQA) as they are,
    so the backend need not repeat them (measured on an H200, torch 2.11 / cuDNN 9.19, 32/8 heads
    S=32k: forward peak 260 MB instead of 772, outputs and dK/dV bit-identical; see
    docs/performance.md). Probed once per device and dtype (:func:`_probe_native_gqa`); never while
    a CUDA graph is being captured (the repeat path is used then, and nothing is cached)."""
    key = (device.index, dtype)
    hit = _NATIVE_GQA.get(key)
    if hit is not None:
        return hit
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return False
    ok = _probe_native_gqa(device, dtype)
    _NATIVE_GQA[key] = ok
    return ok


def _probe_native_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """A small causal GQA problem (2 query heads per KV head), forward and backward, with the
    K/V as they are and repeated: True when the first runs and agrees with the second (dK/dV
    summed over the group), in the layouts the backend passes ((B, S, H, D) seen heads-first)."""
    B, S, H, Hkv, D = 1, 128, 4, 2, 64
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, dout = (torch.randn(B, S, H, D, generator=gen).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))
    scale = D ** -0.5
    try:
        o1, l1 = cudnn_forward_op(_heads_first(q), _heads_first(k), _heads_first(v), True, scale)
        kr, vr = _repeat_kv(k, H // Hkv), _repeat_kv(v, H // Hkv)
        o2, l2 = cudnn_forward_op(_heads_first(q), _heads_first(kr), _heads_first(vr), True, scale)
        g1 = cudnn_backward_op(_heads_first(dout), _heads_first(q), _heads_first(k), _heads_first(v), o1, l1,
                               True, scale)
        g2 = cudnn_backward_op(_heads_first(dout), _heads_first(q), _heads_first(kr), _heads_first(vr), o2, l2,
                               True, scale)
    except Exception:  # noqa: BLE001 - an older build refusing mismatched heads: repeat instead
        return False
    if g1[1].shape != k.transpose(1, 2).shape or g1[2].shape != v.transpose(1, 2).shape:
        return False
    dk2 = _sum_group(g2[1].transpose(1, 2), H // Hkv)
    dv2 = _sum_group(g2[2].transpose(1, 2), H // Hkv)
    tol = 2e-2  # a few bf16 ulps: cuDNN's dQ accumulates in a nondeterministic order
    return all(
        torch.isfinite(a).all().item() and (a.float() - b.float()).abs().max().item() <= tol
        for a, b in ((o1, o2), (l1, l2), (g1[0], g2[0]), (g1[1].transpose(1, 2), dk2), (g1[2].transpose(1, 2), dv2))
    )


def _repeats(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many times each KV head is repeated for the call: 1 for MHA, and for GQA where this
    build's cuDNN reads each KV head for its query heads itself (no repeat, no group sum)."""
    group = q.shape[2] // k.shape[2]
    return 1 if group > 1 and native_gqa(q.device, q.dtype) else group


def _split_heads(q, k, v, chunks: int):
    """(q, k, v) cut into ``chunks`` consecutive KV-head groups (query heads follow their KV head)."""
    hk = k.shape[2] // chunks
    hq = q.shape[2] // chunks
    for i in range(chunks):
        yield (q[:, :, i * hq:(i + 1) * hq], k[:, :, i * hk:(i + 1) * hk].contiguous(),
               v[:, :, i * hk:(i + 1) * hk].contiguous())


def kv_head_chunks(q: torch.Tensor, k: torch.Tensor, backward: bool) -> int:
    """How many KV-head chunks to run one block in: 1 (one call, the measured fast path) unless
    the GQA repeat (K/V, and in the backward their expanded gradients) would not fit twice in the
    GPU's free memory; then the smallest divisor of Hkv that brings it under that. Near the memory
    limit this trades a few more kernel calls for the repeat's memory (context parallelism at the
    longest lengths)."""
    Hkv = k.shape[2]
    group = q.shape[2] // Hkv
    if group == 1 or Hkv == 1 or not q.is_cuda:
        return 1
    repeat = 2 * k.numel() * group * k.element_size() * (2 if backward else 1)  # K, V (and dK, dV) at H heads
    try:
        free = torch.cuda.mem_get_info(q.device)[0]
    except Exception:  # no query possible: keep the fast path
        return 1
    for c in range(1, Hkv + 1):
        if Hkv % c == 0 and 2 * repeat / c <= free:
            return c
    return Hkv


class CudnnBackend(Backend):
    name = "cudnn"
    native_autograd = False

    def check(self, req: AttnRequest) -> Optional[str]:
        if req.device_type != "cuda":
            return "needs a CUDA GPU"
        if not _op_available():
            return "this PyTorch build has no cuDNN attention op"
        if req.dtype not in _DTYPES:
            return f"supports float16/bfloat16, got {req.dtype}"
        cap = req.device_capability
        if cap is not None and cap < (8, 0):
            return f"needs compute capability >= 8.0, got {cap[0]}.{cap[1]}"
        max_d = 256 if cap is not None and cap >= (9, 0) else 128
        if req.head_dim % 8 != 0 or req.head_dim > max_d:
            return f"needs head_dim a multiple of 8 up to {max_d}, got {req.head_dim}"
        if req.window:
            return "no sliding window"
        if req.varlen:
            return "no varlen (cu_seqlens)"
        if req.causal and req.seqlen_q != req.seqlen_k:
            return "causal only for square blocks (Sq == Sk): cuDNN's mask is top-left aligned"
        if req.num_heads % req.num_kv_heads != 0:
            return "num_heads must be a multiple of num_kv_heads"
        return None

    @staticmethod
    def _plain(p: AttnParams, Sq: int, Sk: int) -> None:
        if p.varlen or p.has_window or (p.causal and Sq != Sk):
            raise ValueError("backend 'cudnn' serves dense calls without window, causal only when Sq == Sk")

    def forward(self, q, k, v, p: AttnParams):
        self._plain(p, q.shape[1], k.shape[1])
        group = _repeats(q, k)
        chunks = kv_head_chunks(q, k, backward=False) if group > 1 else 1
        if chunks > 1:  # near the memory limit: repeat K/V for a few KV heads at a time
            parts = [self.forward(qc, kc, vc, p) for qc, kc, vc in _split_heads(q, k, v, chunks)]
            return torch.cat([o for o, _ in parts], 2), torch.cat([l for _, l in parts], 1)
        out, lse4 = cudnn_forward_op(
            _heads_first(q), _heads_first(_repeat_kv(k, group)), _heads_first(_repeat_kv(v, group)),
            p.causal, p.softmax_scale,
        )
        out = out.transpose(1, 2)  # (B, Sq, H, D), a view
        if not out.is_contiguous():
            out = out.contiguous()
        return out, lse4.reshape(lse4.shape[0], lse4.shape[1], lse4.shape[2]).float()

    def backward(self, dout, q, k, v, out, lse, p: AttnParams):
        self._plain(p, q.shape[1], k.shape[1])
        group = _repeats(q, k)
        chunks = kv_head_chunks(q, k, backward=True) if group > 1 else 1
        if chunks > 1:
            h = q.shape[2] // chunks
            grads = [self.backward(dout[:, :, i * h:(i + 1) * h], qc, kc, vc, out[:, :, i * h:(i + 1) * h],
                                   lse[:, i * h:(i + 1) * h], p)
                     for i, (qc, kc, vc) in enumerate(_split_heads(q, k, v, chunks))]
            return tuple(torch.cat([g[j] for g in grads], 2) for j in range(3))
        kr, vr = _repeat_kv(k, group), _repeat_kv(v, group)
        lse4 = lse.float().contiguous().unsqueeze(-1)
        dq, dk, dv = cudnn_backward_op(
            _heads_first(dout.contiguous()), _heads_first(q), _heads_first(kr), _heads_first(vr),
            _heads_first(out.contiguous()), lse4, p.causal, p.softmax_scale,
        )
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        return dq, _sum_group(dk, group), _sum_group(dv, group)


register_backend(CudnnBackend())
