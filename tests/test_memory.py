"""``tiled`` peak extra memory grows linearly with sequence length, in forward and in backward.

How it is measured without CUDA: a ``TorchDispatchMode`` sees every tensor an ATen op returns
(forward and backward alike, since the CPU autograd engine runs backward on the calling thread);
a storage not seen before adds its bytes to a running total and a ``weakref.finalize`` on the
storage subtracts them when it is freed. The peak of that total is the peak extra memory of the
call: inputs are registered beforehand and never counted. Buffers that a fused kernel allocates
and frees internally are invisible, which is why this measures ``tiled`` (pure PyTorch ops) and
``eager``, not ``sdpa``. ``eager`` is the instrument's control: its scores are quadratic, so
the same measurement must show a ratio near 16 for 4x the length.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import skip_if_unavailable
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import qwen3vl_flash as qf


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ATen ops inside the ``with`` block."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0
        for t in ignore:  # inputs: views of them must not count as new memory
            self.live[t.untyped_storage().data_ptr()] = 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out


def _measure(backend: str, S: int, H=4, Hkv=2, D=64, causal=True):
    """(forward peak, backward peak) extra bytes for one call at sequence length S."""
    q = torch.randn(1, S, H, D, requires_grad=True)
    k = torch.randn(1, S, Hkv, D, requires_grad=True)
    v = torch.randn(1, S, Hkv, D, requires_grad=True)
    dout = torch.randn(1, S, H, D)
    with PeakMemory(ignore=(q, k, v)) as fwd:
        out = qf.flash_attn_func(q, k, v, causal=causal, backend=backend)
    with PeakMemory(ignore=(q, k, v, out, dout)) as bwd:
        torch.autograd.grad(out, (q, k, v), dout)
    return fwd.peak, bwd.peak


def test_instrument_counts_frees():
    x = torch.randn(1024, 256)  # 1 MiB
    with PeakMemory(ignore=(x,)) as m:
        for _ in range(10):
            y = x * 2
            del y
    assert m.peak == 2**20
    with PeakMemory(ignore=(x,)) as m:
        ys = [x * 2 for _ in range(10)]
    assert m.peak == 10 * 2**20 and len(ys) == 10
    with PeakMemory(ignore=(x,)) as m:
        x.t().contiguous()[0]  # a view of x is not new memory; the contiguous copy is
    assert m.peak == 2**20


S_SHORT, S_LONG = 512, 2048  # 4x longer


def test_eager_control_is_quadratic():
    """The instrument sees quadratic memory where there is some (else the tiled test proves nothing)."""
    f1, b1 = _measure("eager", S_SHORT)
    f4, b4 = _measure("eager", S_LONG)
    assert f4 / f1 > 10, f"eager forward ratio {f4 / f1:.1f}: the instrument misses the scores"
    assert b4 / b1 > 10, f"eager backward ratio {b4 / b1:.1f}: the instrument misses the scores"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tiled_memory_is_linear(causal):
    skip_if_unavailable("tiled")
    f1, b1 = _measure("tiled", S_SHORT, causal=causal)
    f4, b4 = _measure("tiled", S_LONG, causal=causal)
    assert f1 > 0 and b1 > 0
    # linear: ~4x for 4x the length (tile buffers are constant, so often less); quadratic: ~16x
    assert f4 / f1 < 6, f"tiled forward extra memory grew {f4 / f1:.1f}x for 4x the length ({f1} -> {f4} B)"
    assert b4 / b1 < 6, f"tiled backward extra memory grew {b4 / b1:.1f}x for 4x the length ({b1} -> {b4} B)"
    # and far below the materialised scores at the long length
    e4f, e4b = _measure("eager", S_LONG, causal=causal)
    assert f4 < e4f / 4 and b4 < e4b / 4, (f4, e4f, b4, e4b)
