"""``eager``: the materialised reference as a backend. Serves every call; O(Sq * Sk) memory."""

from __future__ import annotations

from ..reference import attention_ref, attention_ref_varlen
from .base import AttnParams, Backend, register_backend


class EagerBackend(Backend):
    name = "eager"
    native_autograd = True

    def check(self, req):
        return None

    def attention(self, q, k, v, p: AttnParams):
        if p.varlen:
            return attention_ref_varlen(
                q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.softmax_scale, p.causal, p.window_size,
                upcast=True, return_lse=True,
            )
        return attention_ref(q, k, v, p.softmax_scale, p.causal, p.window_size, upcast=True, return_lse=True)


register_backend(EagerBackend())
