"""``tiled``: placeholder registration until the kernels land (replaced by the tiled work)."""

from __future__ import annotations

from .base import Backend, register_backend


class TiledBackend(Backend):
    name = "tiled"

    def check(self, req):
        return "the tiled kernels are not part of this build yet"


register_backend(TiledBackend())
