"""``triton``: placeholder registration until the kernels land (replaced by the Triton work)."""

from __future__ import annotations

from .base import Backend, register_backend


class TritonBackend(Backend):
    name = "triton"

    def check(self, req):
        return "the Triton kernels are not part of this build yet"


register_backend(TritonBackend())
