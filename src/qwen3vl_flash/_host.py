"""Host copies of small index tensors (``cu_seqlens``), read from the device once per tensor."""

from __future__ import annotations

import weakref
from typing import List

import torch

_HOST_VALUES: dict = {}  # id(tensor) -> (weakref, version, values): see host_values()


def host_values(cu: torch.Tensor) -> List[int]:
    """``cu.tolist()``, remembered for the tensor object while it lives and is not modified.

    A model calls every layer with the same ``cu_seqlens`` tensor (the vision tower: 27 layers
    per forward); reading it to the host each time costs one device sync per layer, and every
    sync leaves the GPU idle while the host queues the next kernels. The cache holds a weak
    reference (a freed tensor whose id is reused is not mistaken for it) and the tensor's version
    counter (an in-place change reads the values again)."""
    key = id(cu)
    hit = _HOST_VALUES.get(key)
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    vals = cu.tolist()
    if len(_HOST_VALUES) > 64:  # a handful live at a time; drop the dead ones
        for k_ in [k_ for k_, (ref, _, _) in _HOST_VALUES.items() if ref() is None]:
            del _HOST_VALUES[k_]
    try:
        _HOST_VALUES[key] = (weakref.ref(cu), cu._version, vals)
    except TypeError:  # a tensor subclass without weak references: no caching
        pass
    return vals
