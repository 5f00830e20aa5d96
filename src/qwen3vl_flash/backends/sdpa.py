"""``sdpa``: PyTorch's fused kernels (flash / cuDNN / memory-efficient on GPUs, flash on CPU).

PyTorch's ``is_causal`` is aligned top-left, so when Sq != Sk we pass a bottom-right mask
(``causal_lower_right``) or, with a window, an explicit boolean mask. It returns no lse, so calls
that ask for one go elsewhere. Varlen runs one call per segment (what transformers does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import visibility_mask
from .base import AttnParams, Backend, register_backend


def _sdpa_dense(q, k, v, p: AttnParams):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (B, Sq, H, D)."""
    Sq, Sk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    mask, is_causal = None, False
    if p.has_window:
        mask = visibility_mask(Sq, Sk, p.causal, p.window_size, device=q.device)
    elif p.causal and Sq == Sk:
        is_causal = True
    elif p.causal:
        mask = visibility_mask(Sq, Sk, True, (-1, -1), device=q.device)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=p.softmax_scale, enable_gqa=gqa
    )
    out = out.transpose(1, 2)
    if mask is not None:
        # rows that see no key: some kernels return NaN there; the contract says 0
        empty = ~mask.any(dim=-1)
        if bool(empty.any()):
            out = out.masked_fill(empty.view(1, Sq, 1, 1), 0.0)
    return out


class SdpaBackend(Backend):
    name = "sdpa"
    native_autograd = True

    def check(self, req):
        if req.need_lse:
            return "PyTorch SDPA does not return the log-sum-exp (use tiled, triton or eager)"
        if req.device_type == "cuda" and req.device_capability is not None and req.device_capability < (5, 0):
            return f"sm{req.device_capability[0]}{req.device_capability[1]} is older than SDPA supports"
        return None

    def attention(self, q, k, v, p: AttnParams):
        if not p.varlen:
            return _sdpa_dense(q, k, v, p), None
        cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
        outs = []
        for b in range(len(cq) - 1):
            qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
            if qe == qs:
                continue
            if ke == ks:
                outs.append(q.new_zeros((qe - qs,) + tuple(q.shape[1:])) + 0 * q[qs:qe])
                continue
            outs.append(_sdpa_dense(q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0), p)[0])
        return torch.cat(outs, 0), None


register_backend(SdpaBackend())
