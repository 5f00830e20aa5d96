"""The working-memory bound of the ``tiled`` backend: ``qf.set_workspace_limit`` / ``$QWEN3VL_FLASH_MAX_WORKSPACE``.

"Working memory" is what a ``tiled`` call allocates beyond its inputs and outputs: the layout
copies of K and V, the query / score / probability tiles, the backward's float32 dK / dV
accumulators. Under a limit the backend processes the (batch, KV head) pairs in chunks and, when
one pair does not fit, shrinks its tiles (:func:`qwen3vl_flash.backends.tiled.plan_workspace`).

Without a limit (the default) a call takes all pairs at once with the profile's tiles (sized for
the CPU's caches, the speed choice), unless that would need more than half of the memory the
machine has free (``MemAvailable`` on Linux, ``torch.cuda.mem_get_info`` on CUDA): then half the
free memory is the limit. Free memory is only looked up for calls that would need more than
:data:`CHECK_FREE_ABOVE`, so small calls pay nothing for it.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

ENV_MAX_WORKSPACE = "QWEN3VL_FLASH_MAX_WORKSPACE"
CHECK_FREE_ABOVE = 256 << 20  # bytes: below this a call never asks how much memory is free
FREE_FRACTION = 0.5  # of the free memory, the default ceiling

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

_limit: Optional[int] = None  # set_workspace_limit's value; None: the environment, else the default
_env_cache: tuple = ("", None)  # (env text, parsed bytes)


def parse_bytes(value: Union[int, str], where: str = "limit") -> int:
    """Bytes from an int or a size string: ``"50331648"``, ``"48MiB"``, ``"48M"``, ``"1GB"``,
    ``"1.5GiB"``. ``K``/``M``/``G``/``T`` and ``KiB``... are powers of 1024, ``KB``/``MB``/``GB``/``TB``
    powers of 1000 (case-insensitive). Raises TypeError / ValueError naming ``where`` for anything
    else, for a size below one byte, and for bools."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{where} must be an int number of bytes or a size string like '48MiB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"{where} must be a number of bytes with an optional unit (B, KiB, MiB, GiB, TiB, K, M, G, T, "
                f"KB, MB, GB, TB), e.g. '48MiB' or '1GB'; got {value!r}"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"{where} must be at least 1 byte, got {value!r}")
    return n


def set_workspace_limit(limit: Union[int, str, None]) -> Optional[int]:
    """Bound the working memory of the ``tiled`` backend to ``limit`` bytes (an int, or a size
    string such as ``"48MiB"`` / ``"1GB"``, see :func:`parse_bytes`) for every later call in this
    process; ``None`` removes the bound (then ``$QWEN3VL_FLASH_MAX_WORKSPACE``, else the default:
    module docstring). Results are the same whatever the limit, to rounding: while only the
    chunking changes, all but a few elements bitwise (:mod:`qwen3vl_flash.backends.tiled` says
    which), and within rounding (another summation order) where the tiles shrink. A limit below
    one (batch, KV head) pair's minimum working set (its K/V copies, plus dK/dV accumulators in
    the backward, and the smallest tiles) cannot be met: the call then runs at that minimum and
    warns once.

    Returns the previous value set by this function (None if none), so a caller can restore it.
    Raises TypeError / ValueError for a malformed limit."""
    global _limit
    previous = _limit
    _limit = None if limit is None else parse_bytes(limit, "set_workspace_limit(limit)")
    return previous


def workspace_limit() -> Optional[int]:
    """The explicit bound in bytes: :func:`set_workspace_limit`'s, else ``$QWEN3VL_FLASH_MAX_WORKSPACE``'s,
    else None (the default: :func:`default_ceiling` applies). Raises ValueError for a malformed
    environment value."""
    global _env_cache
    if _limit is not None:
        return _limit
    text = os.environ.get(ENV_MAX_WORKSPACE, "").strip()
    if not text:
        return None
    if _env_cache[0] != text:
        _env_cache = (text, parse_bytes(text, f"${ENV_MAX_WORKSPACE}"))
    return _env_cache[1]


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory free for allocation on ``device`` now (CPU: ``MemAvailable``; CUDA: the driver's
    free bytes), or None where it cannot be told. Never raises."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:  # detection never crashes a call
        return None
    return None


def default_ceiling(device: torch.device, need: int) -> Optional[int]:
    """The limit a call without an explicit one gets, for a plan that needs ``need`` bytes: None
    (no bound) while ``need`` is small or fits in :data:`FREE_FRACTION` of the free memory, else
    that fraction."""
    if need <= CHECK_FREE_ABOVE:
        return None
    free = free_memory_bytes(device)
    if free is None:
        return None
    ceiling = int(free * FREE_FRACTION)
    return None if need <= ceiling else max(ceiling, 1)
