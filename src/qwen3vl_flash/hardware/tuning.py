"""Tuned profiles: measure the backends and ``tiled``'s tiles on this machine, keep the winners.

:func:`tune` (``qwen3vl-flash tune``) times, for Qwen3-VL's attention shapes (:data:`SHAPES`: the
text decoder's GQA 32/8 heads, head_dim 128, causal; the vision tower's 16 heads, head_dim 64 and
72, non-causal, packed frames), each backend that can run on the device (CPU: ``sdpa`` and
``tiled``; CUDA: also ``triton`` and ``cudnn``) and, for ``tiled``, its tiles (block_m x
block_n), forward and forward+backward, in each dtype the device computes in natively (CPU: fp32,
bf16; CUDA: bf16, fp16), at a few lengths. The candidates of one call shape are timed
round-robin (the starting candidate rotates each round) and each keeps its median, so a drift in
the machine's speed (other processes, clocks) hits all of them alike.

The result, a :class:`TunedProfile` (frozen dataclasses, validated when read), goes to
``tuned-<device kind>.json`` in the user cache directory (:func:`cache_dir`:
``$QWEN3VL_FLASH_CACHE_DIR``, else ``platformdirs.user_cache_dir("qwen3vl-flash")``, else
``~/.cache/qwen3vl-flash``). It holds every timing, the winner of every (dtype, mode, shape class,
length bucket), the orders and tiles derived from them, the hardware fingerprint
(:class:`Fingerprint`), the torch / triton / package versions and the date.

``auto`` uses it (:func:`tuned_profile_for`, called by
:func:`~qwen3vl_flash.hardware.profiles.select_profile` and ``profile_for_device``) when its
fingerprint and versions equal this process's: the shipped profile with the tuned backend order
per dtype and the tuned tiles (``dataclasses.replace``), named ``<shipped>+tuned``. A corrupt,
foreign or stale file is ignored with one warning, never an error. ``QWEN3VL_FLASH_TUNED=0``
turns tuned profiles off; ``QWEN3VL_FLASH_TUNED=<path>`` reads that file instead of the cache
directory's. The file is read once per process (:func:`~qwen3vl_flash.hardware.profiles.
reset_profile_cache` forgets it; :func:`tune` calls it after writing).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..conventions import warn_once
from .detect import HardwareInfo, detect_hardware

ENV_CACHE_DIR = "QWEN3VL_FLASH_CACHE_DIR"
ENV_TUNED = "QWEN3VL_FLASH_TUNED"  # 0/off/false/no: shipped profiles only; a path: that file
SCHEMA_VERSION = 1
MODES = ("fwd", "fwd+bwd")
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dtypes measured per device type: those the hardware computes in natively (fp16 on CPU falls
# far behind bf16 there, so nobody should pick it; fp32 on GPUs is not what a model runs in)
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("bfloat16", "float16")}
DEVICE_BACKENDS = {"cpu": ("sdpa", "tiled"), "cuda": ("sdpa", "triton", "cudnn", "tiled")}
# a candidate within 2% of the fastest counts as tied, and ties go to the shipped profile's order:
# timings closer than that are noise on a shared machine, and the shipped order was measured too
TIE = 0.02
# a candidate this many times slower than the fastest, twice, stops being timed (_measure_case)
PRUNE = 3.0

_OFF = ("0", "off", "false", "no")
_ON = ("", "1", "on", "true", "yes", "auto")
_INSTALL_HINT = "pip install 'qwen3vl-flash[tune]'  (or: pip install platformdirs)"


# --------------------------------------------------------------------------------------------
# what is measured
# --------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, where: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{where}: expected {what}, got {value!r}")


@dataclass(frozen=True)
class ShapeClass:
    """One attention shape of Qwen3-VL, at a length chosen per measurement.

    Dense (``varlen=False``): q (batch, S, num_heads, head_dim), k/v (batch, S, num_kv_heads,
    head_dim). Packed (``varlen=True``): S tokens in frames of ``segment`` tokens (the last one
    shorter), q (S, num_heads, head_dim), one ``cu_seqlens`` for q and k."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    varlen: bool = False
    segment: int = 0
    batch: int = 1

    def __post_init__(self):
        _check(isinstance(self.name, str) and self.name != "", "ShapeClass.name", "a non-empty str", self.name)
        for name in ("num_heads", "num_kv_heads", "head_dim", "batch"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"ShapeClass.{name}", "an int >= 1",
                   getattr(self, name))
        _check(self.num_heads % self.num_kv_heads == 0, "ShapeClass.num_kv_heads",
               f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
        _check(isinstance(self.causal, bool), "ShapeClass.causal", "a bool", self.causal)
        _check(isinstance(self.varlen, bool), "ShapeClass.varlen", "a bool", self.varlen)
        _check(_is_int(self.segment) and (self.segment >= 1 if self.varlen else self.segment == 0),
               "ShapeClass.segment", "an int >= 1 for varlen shapes, 0 for dense ones", self.segment)

    def describe(self) -> str:
        kind = f"varlen frames of {self.segment}" if self.varlen else f"B={self.batch}"
        return (f"{self.num_heads}/{self.num_kv_heads} heads hd{self.head_dim} "
                f"{'causal' if self.causal else 'non-causal'}, {kind}")


# Qwen3-VL's shapes (DESIGN.md section 2): the 4B/8B/30B text decoder and the vision towers
# (hd64: 2B/4B, hd72: 8B and larger) with frames of 1024 patches (a 512x512 image at patch 16)
SHAPES: Tuple[ShapeClass, ...] = (
    ShapeClass("text", 32, 8, 128, causal=True),
    ShapeClass("vision-hd64", 16, 16, 64, causal=False, varlen=True, segment=1024),
    ShapeClass("vision-hd72", 16, 16, 72, causal=False, varlen=True, segment=1024),
)
# --quick: the text decoder's real head counts (a quarter of them, 8/2, picked tiled for fp32
# where SDPA was faster at 32/8 on a 2-core EPYC, 2026-12-02: the split of heads over threads
# decides too), the vision towers with a quarter of the heads (4; each head's tiles stay the same)
QUICK_SHAPES: Tuple[ShapeClass, ...] = (
    ShapeClass("text", 32, 8, 128, causal=True),
    ShapeClass("vision-hd64", 4, 4, 64, causal=False, varlen=True, segment=1024),
    ShapeClass("vision-hd72", 4, 4, 72, causal=False, varlen=True, segment=1024),
)
LENGTHS = {"cpu": (512, 1024, 2048, 4096), "cuda": (1024, 4096, 16384)}
QUICK_LENGTHS = {"cpu": (512, 2048), "cuda": (1024, 4096)}
# tiled's (block_m, block_n) on CPU (block_m counts query rows x the GQA group folded in): the
# shipped 256 x 256 and its neighbours; smaller tiles pay Python overhead per tile, larger ones
# spill the fp32 score tile out of L2. On GPUs tiled is a fallback: only the profile's own tiles.
TILED_BLOCKS: Tuple[Tuple[int, int], ...] = ((128, 256), (256, 256), (256, 512), (512, 256), (512, 512))
QUICK_TILED_BLOCKS: Tuple[Tuple[int, int], ...] = ((256, 256), (256, 512))
REPEATS, QUICK_REPEATS = 5, 3


# --------------------------------------------------------------------------------------------
# the tuned profile's schema
# --------------------------------------------------------------------------------------------


def _check_backends(where: str, names) -> None:
    from ..backends.base import available_backends

    known = available_backends()
    _check(isinstance(names, tuple) and all(n in known for n in names) and len(set(names)) == len(names), where,
           f"a tuple of distinct backend names from {known}", names)


def _check_order_map(where: str, orders) -> None:
    _check(isinstance(orders, Mapping), where, "a mapping dtype -> backend order", orders)
    for key, order in orders.items():
        _check(key in DTYPES, f"{where} key", f"one of {sorted(DTYPES)}", key)
        _check_backends(f"{where}[{key!r}]", order)


@dataclass(frozen=True)
class Fingerprint:
    """What a tuned profile was measured on; it applies only where this is equal. CPU: the model,
    the core count this process may use, the ISA flags that change which kernels torch runs, the
    kernel set ATen dispatches to (``torch.backends.cpu.get_cpu_capability()``) and the ISA caps
    set in the environment (an emulated AVX2 machine is another machine). CUDA: the GPU's name and
    compute capability."""

    device_type: str
    name: str
    compute_capability: Optional[Tuple[int, int]] = None
    cpu_cores: int = 0
    isa: Tuple[str, ...] = ()
    cpu_capability: str = ""
    isa_env: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        _check(self.device_type in ("cpu", "cuda"), "Fingerprint.device_type", "'cpu' or 'cuda'", self.device_type)
        _check(isinstance(self.name, str), "Fingerprint.name", "a str", self.name)
        _check(_is_int(self.cpu_cores) and self.cpu_cores >= 0, "Fingerprint.cpu_cores", "an int >= 0", self.cpu_cores)

    def describe(self) -> str:
        if self.device_type == "cuda":
            cc = ".".join(map(str, self.compute_capability or ())) or "?"
            return f"{self.name} (compute capability {cc})"
        env = "".join(f", {k}={v}" for k, v in self.isa_env)
        return f"{self.name} ({self.cpu_cores} cores, ATen {self.cpu_capability or '?'}{env})"


@dataclass(frozen=True)
class Versions:
    torch: str
    triton: str  # "" where not installed
    package: str

    def mismatch(self, other: Versions, device_type: str) -> Optional[str]:
        """Why a profile measured with ``self`` does not apply under ``other``, or None. triton only
        counts on CUDA (our CPU paths do not run it)."""
        names = ("torch", "package") + (("triton",) if device_type == "cuda" else ())
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"measured with {name} {a or '(none)'}, this process has {name} {b or '(none)'}"
        return None


@dataclass(frozen=True)
class Measurement:
    """One candidate's timings for one call shape: ``times_ms`` in the order taken (interleaved
    with the other candidates'), ``median_ms`` their median; a candidate that raised has
    ``status="error"``, the message in ``error`` and no times."""

    dtype: str
    mode: str
    shape: str
    seqlen: int
    backend: str
    block_m: int = 0  # tiled's tiles; 0 for the other backends
    block_n: int = 0
    times_ms: Tuple[float, ...] = ()
    median_ms: Optional[float] = None
    status: str = "ok"
    error: str = ""

    def __post_init__(self):
        _check(self.dtype in DTYPES, "Measurement.dtype", f"one of {sorted(DTYPES)}", self.dtype)
        _check(self.mode in MODES, "Measurement.mode", f"one of {MODES}", self.mode)
        _check(_is_int(self.seqlen) and self.seqlen >= 1, "Measurement.seqlen", "an int >= 1", self.seqlen)
        _check_backends("Measurement.backend", (self.backend,))
        for name in ("block_m", "block_n"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, f"Measurement.{name}", "an int >= 0",
                   getattr(self, name))
        _check(self.status in ("ok", "error"), "Measurement.status", "'ok' or 'error'", self.status)
        if self.status == "ok":
            _check(len(self.times_ms) > 0 and all(isinstance(t, float) and math.isfinite(t) and t >= 0
                                                  for t in self.times_ms),
                   "Measurement.times_ms", "a non-empty tuple of finite times >= 0", self.times_ms)
            _check(isinstance(self.median_ms, float) and math.isclose(self.median_ms, statistics.median(self.times_ms)),
                   "Measurement.median_ms", "the median of times_ms", self.median_ms)

    @property
    def candidate(self) -> str:
        return _candidate_name(self.backend, self.block_m, self.block_n)


def _candidate_name(backend: str, block_m: int = 0, block_n: int = 0) -> str:
    return f"{backend} {block_m}x{block_n}" if block_m else backend


@dataclass(frozen=True)
class Winner:
    """The fastest candidate of one (dtype, mode, shape class, length bucket), and each backend's
    best median there (tiled's at its best tiles), fastest first in ``order``. A bucket is named by
    the length measured; lengths between two buckets belong to the nearer one on a log scale."""

    dtype: str
    mode: str
    shape: str
    bucket: int
    backend: str
    block_m: int
    block_n: int
    median_ms: float
    order: Tuple[str, ...]
    backend_ms: Mapping[str, float]

    def __post_init__(self):
        _check(self.dtype in DTYPES, "Winner.dtype", f"one of {sorted(DTYPES)}", self.dtype)
        _check(self.mode in MODES, "Winner.mode", f"one of {MODES}", self.mode)
        _check_backends("Winner.order", self.order)
        _check(self.order[:1] == (self.backend,), "Winner.order", f"a tuple starting with {self.backend!r}", self.order)
        _check(isinstance(self.backend_ms, Mapping) and set(self.backend_ms) == set(self.order), "Winner.backend_ms",
               f"a time for each of {self.order}", self.backend_ms)


@dataclass(frozen=True)
class TunedProfile:
    """A tuned profile as written to and read from JSON (every field; unknown or missing ones make
    the file invalid). ``auto_order`` (per dtype, over both modes and every dense length: what
    ``auto`` reads today), ``mode_orders`` (per mode, then dtype), ``varlen_order`` (packed calls,
    where the shipped profile keeps a separate varlen order), ``block_m`` / ``block_n`` (tiled's
    tiles over everything measured) and ``tiled_blocks`` (per dtype) are derived from
    ``measurements`` by :func:`derive`; ``winners`` list the fastest candidate per call shape."""

    schema: int
    tool_version: str
    date: str
    device_kind: str
    base_profile: str
    quick: bool
    fingerprint: Fingerprint
    versions: Versions
    repeats: int
    elapsed_s: float
    shapes: Tuple[ShapeClass, ...]
    measurements: Tuple[Measurement, ...]
    winners: Tuple[Winner, ...]
    auto_order: Mapping[str, Tuple[str, ...]]
    mode_orders: Mapping[str, Mapping[str, Tuple[str, ...]]]
    varlen_order: Tuple[str, ...]
    block_m: int
    block_n: int
    tiled_blocks: Mapping[str, Tuple[int, int]]
    # where it was read from or written to (not part of the file)
    source: str = field(default="", compare=False, metadata={"json": False})

    def __post_init__(self):
        _check(self.schema == SCHEMA_VERSION, "TunedProfile.schema", f"{SCHEMA_VERSION} (this version's format)",
               self.schema)
        from .profiles import PROFILES

        _check(self.base_profile in PROFILES, "TunedProfile.base_profile", f"one of {sorted(PROFILES)}",
               self.base_profile)
        _check(_is_int(self.repeats) and self.repeats >= 1, "TunedProfile.repeats", "an int >= 1", self.repeats)
        _check_order_map("TunedProfile.auto_order", self.auto_order)
        _check(isinstance(self.mode_orders, Mapping) and set(self.mode_orders) <= set(MODES),
               "TunedProfile.mode_orders", f"a mapping with keys from {MODES}", self.mode_orders)
        for mode, orders in self.mode_orders.items():
            _check_order_map(f"TunedProfile.mode_orders[{mode!r}]", orders)
        if self.varlen_order:
            _check_backends("TunedProfile.varlen_order", self.varlen_order)
        for name in ("block_m", "block_n"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"TunedProfile.{name}", "an int >= 1",
                   getattr(self, name))
        _check(isinstance(self.tiled_blocks, Mapping), "TunedProfile.tiled_blocks", "a mapping dtype -> (m, n)",
               self.tiled_blocks)
        for key, blocks in self.tiled_blocks.items():
            _check(key in DTYPES and len(blocks) == 2 and all(_is_int(b) and b >= 1 for b in blocks),
                   f"TunedProfile.tiled_blocks[{key!r}]", "a dtype name -> (block_m, block_n)", blocks)
        names = {s.name for s in self.shapes}
        for m in self.measurements + self.winners:
            _check(m.shape in names, f"{type(m).__name__}.shape", f"one of the shapes {sorted(names)}", m.shape)

    def to_dict(self) -> dict:
        return _to_json(self)

    def to_tile_profile(self, base) -> "TileProfile":  # noqa: F821 - profiles imports this module lazily
        """``base`` (the shipped profile of this hardware) with the tuned order and tiles."""
        auto = dict(base.auto_order)
        auto.update(self.auto_order)
        if self.varlen_order:
            auto["varlen"] = tuple(self.varlen_order)
        where = f" from {self.source}" if self.source else ""
        return dataclasses.replace(
            base, name=f"{base.name}+tuned", auto_order=auto, block_m=self.block_m, block_n=self.block_n,
            mode_orders={mode: dict(orders) for mode, orders in self.mode_orders.items()},
            tiled_blocks=dict(self.tiled_blocks),
            description=f"{base.description}; tuned on this machine {self.date}{where}",
        )

    def table(self) -> str:
        """Every timing: one line per call shape, one column per candidate (median ms), the winner."""
        cands: List[str] = []
        for m in self.measurements:
            if m.candidate not in cands:
                cands.append(m.candidate)
        by_case: Dict[tuple, Dict[str, str]] = {}
        for m in self.measurements:
            cell = f"{m.median_ms:.1f}" if m.status == "ok" else "error"
            by_case.setdefault((m.shape, m.dtype, m.mode, m.seqlen), {})[m.candidate] = cell
        winners = {(w.shape, w.dtype, w.mode, w.bucket): w for w in self.winners}
        width = max([12] + [len(c) + 1 for c in cands])
        head = f"{'shape':<12} {'dtype':<9} {'mode':<8} {'S':>6} " + "".join(f"{c:>{width}}" for c in cands)
        lines = [head + "  winner (next backend's time / winner's)"]
        for key, cells in by_case.items():
            w = winners.get(key)
            note = ""
            if w is not None:
                nxt = w.backend_ms[w.order[1]] / w.median_ms if len(w.order) > 1 and w.median_ms > 0 else float("nan")
                note = f"  {_candidate_name(w.backend, w.block_m, w.block_n)}" + (
                    f" ({w.order[1]} {nxt:.2f}x)" if len(w.order) > 1 else "")
            lines.append(f"{key[0]:<12} {key[1]:<9} {key[2]:<8} {key[3]:>6} "
                         + "".join(f"{cells.get(c, '-'):>{width}}" for c in cands) + note)
        return "\n".join(lines)


def _to_json(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.metadata.get("json", True)}
    if isinstance(obj, Mapping):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(tp, value, where: str):
    """``value`` (parsed JSON) as type ``tp``: dataclasses field by field (a missing or unknown
    field raises TypeError naming it), tuples, mappings with str keys, Optional, scalars."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object, got {type(value).__name__}")
        fields = {f.name: f for f in dataclasses.fields(tp) if f.metadata.get("json", True)}
        required = {n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(value) - set(fields)), sorted(required - set(value))
        if unknown or missing:
            raise TypeError(f"{where}: unknown field(s) {unknown} / missing field(s) {missing} "
                            f"(a {tp.__name__} has {sorted(fields)})")
        hints = typing.get_type_hints(tp)
        return tp(**{n: _from_json(hints[n], v, f"{where}.{n}") for n, v in value.items()})
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise TypeError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_from_json(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _from_json(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if not _is_int(value):
            raise TypeError(f"{where}: expected an int, got {value!r}")
        return value
    if tp in (str, bool):
        if type(value) is not tp:
            raise TypeError(f"{where}: expected a {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"{where}: no JSON reader for {tp!r}")  # pragma: no cover - a schema bug


def read_tuned(path: str) -> TunedProfile:
    """The tuned profile in ``path``. Raises OSError (unreadable), ValueError (not JSON, a bad
    value) or TypeError (a missing, unknown or mistyped field), naming what is wrong."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    return dataclasses.replace(_from_json(TunedProfile, data, "tuned profile"), source=path)


def write_tuned(tuned: TunedProfile, path: str) -> str:
    """Write ``tuned`` to ``path`` atomically (a reader never sees half a file); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tuned.to_dict(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# where it lives, what it was measured on
# --------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """``$QWEN3VL_FLASH_CACHE_DIR``, else ``platformdirs.user_cache_dir("qwen3vl-flash")`` (an
    optional dependency: ``pip install 'qwen3vl-flash[tune]'``), else ``~/.cache/qwen3vl-flash``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return os.path.expanduser(env)
    try:
        import platformdirs
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "qwen3vl-flash")
    return platformdirs.user_cache_dir("qwen3vl-flash")


def device_kind(hw: HardwareInfo) -> str:
    """``cpu``, or ``cuda-<model>`` (``cuda-h200``): one tuned profile file per kind."""
    if hw.device_type != "cuda":
        return "cpu"
    from ..benchmarking import kind_of_name

    return f"cuda-{kind_of_name(hw.name)}"


def tuned_path(device=None) -> str:
    """Where :func:`tune` writes for ``device`` (default: cuda if available, else cpu) and where
    ``auto`` looks: ``<cache_dir()>/tuned-<device kind>.json``."""
    return _default_path(detect_hardware(_device(device)))


def _default_path(hw: HardwareInfo) -> str:
    return os.path.join(cache_dir(), f"tuned-{device_kind(hw)}.json")


# ISA flags that decide which matmul / attention kernels torch runs (x86 and Arm); the full flag
# list also changes with the kernel version, which would invalidate profiles for nothing
_ISA_FLAGS = frozenset({
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16",
    "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "fphp", "sve", "sve2", "bf16", "i8mm", "sme",
})
# environment variables that cap the ISA torch and oneDNN use
_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def fingerprint(hw: HardwareInfo) -> Fingerprint:
    if hw.device_type == "cuda":
        cc = tuple(hw.compute_capability) if hw.compute_capability else None
        return Fingerprint("cuda", hw.name, compute_capability=cc)
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an old or unusual torch build: leave it out
        capability = ""
    return Fingerprint(
        "cpu", hw.cpu_model, cpu_cores=int(hw.cpu_cores), isa=tuple(sorted(_ISA_FLAGS & set(hw.cpu_flags))),
        cpu_capability=capability, isa_env=tuple((k, os.environ[k]) for k in _ISA_ENV if os.environ.get(k)),
    )


def current_versions() -> Versions:
    from .. import __version__

    return Versions(torch=torch.__version__, triton=_triton_version(), package=__version__)


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    """The installed triton's version ("" if none), without importing it (and once: a metadata
    lookup scans sys.path)."""
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


# --------------------------------------------------------------------------------------------
# auto's side: the tuned profile in use
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedStatus:
    """Which tuned profile applies to a device: ``state`` is ``"in use"``, ``"absent"`` (no file
    at ``path``), ``"ignored"`` (``reason`` says why), or ``"disabled"`` ($QWEN3VL_FLASH_TUNED=0)."""

    state: str
    path: str
    reason: str = ""
    tuned: Optional[TunedProfile] = None

    def describe(self) -> str:
        if self.state == "in use":
            t = self.tuned
            return f"{self.path} (measured {t.date}{', --quick' if t.quick else ''}, over {t.base_profile})"
        if self.state == "disabled":
            return f"none: disabled by {ENV_TUNED}={os.environ.get(ENV_TUNED, '')}"
        if self.state == "absent":
            return f"none (no {self.path}; `qwen3vl-flash tune --quick` writes one)"
        return f"none: {self.path} ignored ({self.reason})"


# (path, fingerprint, versions) -> status: the file is read once per process (reset_cache forgets)
_STATUS: Dict[tuple, TunedStatus] = {}


def reset_cache() -> None:
    _STATUS.clear()
    _PROFILES.clear()


def tuned_status(hw: Optional[HardwareInfo] = None) -> TunedStatus:
    """The tuned profile that applies to ``hw`` (default: the detected device), read once per
    process. A bad file gives state ``"ignored"`` and logs one warning; this never raises."""
    hw = hw if hw is not None else detect_hardware()
    setting = os.environ.get(ENV_TUNED, "").strip()
    if setting.lower() in _OFF:
        return TunedStatus("disabled", "")
    path = _default_path(hw) if setting.lower() in _ON else os.path.expanduser(setting)
    fp, versions = fingerprint(hw), current_versions()
    key = (path, fp, versions)
    status = _STATUS.get(key)
    if status is None:
        status = _STATUS[key] = _load_status(path, fp, versions)
        if status.state == "ignored":
            warn_once(("tuned", path, status.reason),
                      "qwen3vl_flash: ignoring the tuned profile %s (%s); using the shipped profile. "
                      "Run `qwen3vl-flash tune` again, or set %s=0.", path, status.reason, ENV_TUNED)
    return status


def _load_status(path: str, fp: Fingerprint, versions: Versions) -> TunedStatus:
    if not os.path.exists(path):
        return TunedStatus("absent", path)
    try:
        tuned = read_tuned(path)
    except (OSError, ValueError, TypeError) as exc:
        return TunedStatus("ignored", path, f"unreadable: {exc}")
    if tuned.fingerprint != fp:
        return TunedStatus("ignored", path, f"measured on {tuned.fingerprint.describe()}, this is {fp.describe()}")
    why = tuned.versions.mismatch(versions, fp.device_type)
    if why:
        return TunedStatus("ignored", path, why)
    return TunedStatus("in use", path, tuned=tuned)


def tuned_profile_for(hw: HardwareInfo, base):
    """``base`` (the shipped profile for ``hw``) with the tuned data applied, or None where no
    tuned profile applies (absent, disabled, ignored, or tuned over another shipped profile)."""
    status = tuned_status(hw)
    if status.state != "in use" or status.tuned.base_profile != base.name:
        return None
    return _as_profile(status, base)


# the TileProfile built from a tuned profile, per (status, base): one object per process, so the
# kvcache path's per-profile caches (keyed by id) stay warm
_PROFILES: Dict[int, tuple] = {}


def _as_profile(status: TunedStatus, base):
    hit = _PROFILES.get(id(status))
    if hit is None or hit[0] is not status or hit[1] is not base:
        hit = _PROFILES[id(status)] = (status, base, status.tuned.to_tile_profile(base))
    return hit[2]


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<i>', got {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<i>', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available in this process")
    return dev


@dataclass(frozen=True)
class _Candidate:
    backend: str
    block_m: int = 0
    block_n: int = 0

    @property
    def name(self) -> str:
        return _candidate_name(self.backend, self.block_m, self.block_n)


@dataclass(frozen=True)
class _Case:
    dtype: str
    mode: str
    shape: ShapeClass
    seqlen: int

    def label(self) -> str:
        return f"{self.shape.name} {self.dtype} {self.mode} S={self.seqlen}"


def _inputs(case: _Case, device: torch.device):
    """(args, kwargs, leaves, dout) of one call: dense (B, S, H, D) or packed (S, H, D) tensors."""
    s, dtype = case.shape, DTYPES[case.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    lead = (case.seqlen,) if s.varlen else (s.batch, case.seqlen)

    def rand(heads):
        return torch.randn(*lead, heads, s.head_dim, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(s.num_heads), rand(s.num_kv_heads), rand(s.num_kv_heads)
    grad = case.mode == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(grad)
    kwargs = {"causal": s.causal}
    args: tuple = (q, k, v)
    if s.varlen:
        bounds = list(range(0, case.seqlen, s.segment)) + [case.seqlen]
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        args = (q, k, v, cu, cu, longest, longest)
    dout = rand(s.num_heads) if grad else None
    return args, kwargs, (q, k, v), dout


def _runner(case: _Case, cand: _Candidate, base, device: torch.device) -> Callable[[], None]:
    """One call of ``cand`` on ``case``'s inputs (and its backward in fwd+bwd), under ``base`` with
    the candidate's tiles pinned (:func:`~qwen3vl_flash.hardware.profiles.use_profile`)."""
    from ..interface import flash_attn_func, flash_attn_varlen_func
    from .profiles import use_profile

    args, kwargs, leaves, dout = _inputs(case, device)
    fn = flash_attn_varlen_func if case.shape.varlen else flash_attn_func
    prof = base.replace(block_m=cand.block_m, block_n=cand.block_n) if cand.block_m else base

    def run():
        with use_profile(prof):
            if dout is None:
                with torch.no_grad():
                    fn(*args, backend=cand.backend, **kwargs)
            else:
                for t in leaves:
                    t.grad = None
                fn(*args, backend=cand.backend, **kwargs).backward(dout)

    return run


def _measure_case(case: _Case, cands: Sequence[_Candidate], base, device: torch.device, repeats: int,
                  tick: Callable[[str], None]) -> Dict[_Candidate, object]:
    """Candidate -> list of ms (or the exception it raised): one warm-up call each, then
    ``repeats`` rounds over all of them, each round starting one candidate further on. A
    candidate more than :data:`PRUNE` times slower than the fastest in its warm-up and again in
    the first round sits out the other rounds (it keeps the times it has): it cannot win, and on
    a slow machine its calls are most of the run's time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs, result, warm, out_of_it = {}, {}, {}, set()

    def timed(c) -> float:
        t0 = time.perf_counter()
        runs[c]()
        sync()
        return (time.perf_counter() - t0) * 1e3

    for c in cands:
        try:
            runs[c] = _runner(case, c, base, device)
            warm[c] = timed(c)  # warm-up: allocations, Triton compiles / autotuning, oneDNN's primitive caches
            result[c] = []
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run this shape loses, with its reason
            result[c] = exc
        tick(f"{case.label()} {c.name} warm-up")
    for r in range(repeats):
        k = r % max(1, len(cands))
        for c in list(cands[k:]) + list(cands[:k]):
            if isinstance(result[c], list) and c not in out_of_it:  # the others keep their ticks, not their turn
                try:
                    result[c].append(timed(c))
                except Exception as exc:  # noqa: BLE001
                    result[c] = exc
            tick(f"{case.label()} {c.name}")
        if r == 0:
            live = [c for c in cands if isinstance(result[c], list) and result[c]]
            if live:
                fastest_warm, fastest = min(warm[c] for c in live), min(result[c][0] for c in live)
                out_of_it = {c for c in live if warm[c] > PRUNE * fastest_warm and result[c][0] > PRUNE * fastest}
    return result


class _Progress:
    """tqdm's bar where tqdm is installed, else a line every 10% on stderr; silent when off."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.n, self.shown, self.bar = total, enabled, 0, -1, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="tune", unit="call")

    def __call__(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled and (10 * self.n // self.total > self.shown or self.n == self.total):
            self.shown = 10 * self.n // self.total
            print(f"tune: {self.n}/{self.total} calls ({100 * self.n // self.total}%)  {label}", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plan(device: torch.device, quick: bool, base) -> Tuple[List[_Case], Dict[str, List[_Candidate]]]:
    from ..backends.base import AttnRequest, get_backend

    shapes = QUICK_SHAPES if quick else SHAPES
    lengths = (QUICK_LENGTHS if quick else LENGTHS)[device.type]
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    cases, cands = [], {}
    for dtype in DEVICE_DTYPES[device.type]:
        for shape in shapes:
            for mode in MODES:
                for seqlen in lengths:
                    case = _Case(dtype, mode, shape, seqlen)
                    cases.append(case)
                    req = AttnRequest(device_type=device.type, dtype=DTYPES[dtype], head_dim=shape.head_dim,
                                      num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, seqlen_q=seqlen,
                                      seqlen_k=seqlen, causal=shape.causal, varlen=shape.varlen,
                                      need_grad=mode == "fwd+bwd", device_capability=cap)
                    out = []
                    for name in DEVICE_BACKENDS[device.type]:
                        if get_backend(name).check(req) is not None:
                            continue
                        if name == "tiled":
                            blocks = (QUICK_TILED_BLOCKS if quick else TILED_BLOCKS) if device.type == "cpu" else (
                                (base.block_m, base.block_n),)
                            out += [_Candidate("tiled", m, n) for m, n in blocks]
                        else:
                            out.append(_Candidate(name))
                    cands[case.label()] = out
    return cases, cands


def tune(device=None, quick: bool = False, show: bool = False, out: Optional[str] = None,
         progress: bool = True) -> TunedProfile:
    """Measure the backends and ``tiled``'s tiles on this machine; write and return the tuned profile.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` or a torch.device (default: cuda if
            available, else cpu). Raises ValueError for another device or an unavailable GPU.
        quick: the text shape as it is, the vision shapes with a quarter of the heads (4), two lengths (CPU: 512 and 2048; CUDA:
            1024 and 4096), two tile candidates and three rounds: 42 s on two quiet CPU cores
            (:data:`QUICK_SHAPES`, :data:`QUICK_LENGTHS`); else :data:`SHAPES` at four lengths,
            five tile candidates, five rounds (many minutes on a small CPU).
        show: print the table of every timing and write a PNG plot beside the JSON (the plot
            needs matplotlib: without it a note is printed instead).
        out: the JSON's path (default :func:`tuned_path`, where ``auto`` looks; a file elsewhere
            is used only through ``QWEN3VL_FLASH_TUNED=<path>``).
        progress: a progress bar (tqdm where installed, else a line per 10% on stderr).

    Every candidate of a call shape is timed round-robin, median of the rounds (see the module
    docstring). Returns the :class:`TunedProfile` written (``.source`` is its path). The profile
    ``auto`` uses in this process is reloaded afterwards."""
    dev = _device(device)
    hw = detect_hardware(dev)
    from .profiles import reset_profile_cache, select_profile

    base = select_profile(hw, tuned=False)
    cases, cands = _plan(dev, quick, base)
    repeats = QUICK_REPEATS if quick else REPEATS
    bar = _Progress(sum(len(cands[c.label()]) * (repeats + 1) for c in cases), progress)
    measurements: List[Measurement] = []
    start = time.perf_counter()
    try:
        for case in cases:
            result = _measure_case(case, cands[case.label()], base, dev, repeats, bar)
            for cand, got in result.items():
                common = dict(dtype=case.dtype, mode=case.mode, shape=case.shape.name, seqlen=case.seqlen,
                              backend=cand.backend, block_m=cand.block_m, block_n=cand.block_n)
                if isinstance(got, list) and got:
                    measurements.append(Measurement(**common, times_ms=tuple(float(t) for t in got),
                                                    median_ms=float(statistics.median(got))))
                else:
                    err = f"{type(got).__name__}: {got}" if isinstance(got, BaseException) else "no time"
                    measurements.append(Measurement(**common, status="error", error=err[:500]))
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    shapes = tuple({c.shape.name: c.shape for c in cases}.values())
    tuned = derive(measurements, base, hw, shapes=shapes, quick=quick, repeats=repeats, elapsed_s=elapsed)
    path = out or _default_path(hw)
    if os.path.isdir(path):
        path = os.path.join(path, f"tuned-{device_kind(hw)}.json")
    write_tuned(tuned, path)
    tuned = dataclasses.replace(tuned, source=path)
    reset_profile_cache()
    if show:
        print(tuned.table())
        print(plot(tuned, os.path.splitext(path)[0] + ".png"))
    return tuned


# --------------------------------------------------------------------------------------------
# from timings to a profile
# --------------------------------------------------------------------------------------------


def _ranked(scores: Dict[str, Tuple[float, float]], preference: Sequence) -> List:
    """Keys of ``scores`` ((worst ratio, geometric mean ratio) to the fastest, lower is better),
    best first; a key within :data:`TIE` of the best remaining one goes first if ``preference``
    (the shipped order) lists it earlier."""
    rank = {k: i for i, k in enumerate(preference)}
    left, out = dict(scores), []
    while left:
        best = min(left.values())
        tied = [k for k, s in left.items() if s[0] <= best[0] * (1 + TIE)]
        pick = min(tied, key=lambda k: (rank.get(k, len(rank)), left[k]))
        out.append(pick)
        del left[pick]
    return out


def _scores(times: Dict[tuple, Dict[object, float]], keys: Sequence) -> Dict[object, Tuple[float, float]]:
    """Per key: (worst, geometric mean) of its time / the fastest key's time over the cases of
    ``times`` (case -> key -> ms); a key missing from a case (it failed) counts as infinitely slow."""
    ratios: Dict[object, List[float]] = {k: [] for k in keys}
    for per in times.values():
        best = min(per.values())
        for k in keys:
            ratios[k].append(per[k] / best if k in per and best > 0 else (1.0 if k in per else math.inf))
    out = {}
    for k, rs in ratios.items():
        if not rs:
            continue
        worst = max(rs)
        gmean = math.exp(sum(math.log(r) for r in rs) / len(rs)) if math.isfinite(worst) else math.inf
        out[k] = (worst, gmean)
    return out


def _order(times, base_order: Sequence[str]) -> Tuple[str, ...]:
    """The backends measured in ``times``, best first (:func:`_ranked`), then the rest of
    ``base_order`` (``eager`` and anything not measured) in its order."""
    measured = sorted({b for per in times.values() for b in per})
    ranked = _ranked(_scores(times, measured), base_order) if times else []
    return tuple(ranked) + tuple(b for b in base_order if b not in ranked)


def derive(measurements: Sequence[Measurement], base, hw: HardwareInfo, *, shapes: Sequence[ShapeClass],
           quick: bool, repeats: int, elapsed_s: float = 0.0) -> TunedProfile:
    """The tuned profile from ``measurements`` on ``hw`` over the shipped ``base`` profile.

    * ``winners``: per (dtype, mode, shape, length) the fastest candidate, backends by their best time.
    * ``mode_orders[mode][dtype]``: the backend order with the smallest worst-case slowdown over
      the dense (text) shapes and lengths of that mode; ``auto_order[dtype]``: the same over both
      modes (what ``auto`` uses while it cannot tell the modes apart). Ties (:data:`TIE`) keep the
      shipped order.
    * ``varlen_order``: the same over the packed (vision) shapes, all dtypes and modes, only where
      ``base`` keeps a varlen order (GPUs); elsewhere packed calls follow the dtype order.
    * ``tiled_blocks[dtype]`` / ``block_m``, ``block_n``: tiled's tiles with the smallest
      worst-case slowdown over everything measured in that dtype / in all dtypes."""
    ok = [m for m in measurements if m.status == "ok"]
    varlen = {s.name: s.varlen for s in shapes}
    # (dtype, mode, shape, seqlen) -> backend -> its best ms (tiled: at its best tiles)
    best: Dict[tuple, Dict[str, float]] = {}
    blocks: Dict[tuple, Dict[Tuple[int, int], float]] = {}
    for m in ok:
        key = (m.dtype, m.mode, m.shape, m.seqlen)
        per = best.setdefault(key, {})
        per[m.backend] = min(per.get(m.backend, math.inf), m.median_ms)
        if m.backend == "tiled":
            blocks.setdefault(key, {})[(m.block_m, m.block_n)] = m.median_ms
    winners = []
    for key, per in best.items():
        order = tuple(sorted(per, key=per.get))
        bm, bn = (min(blocks[key], key=blocks[key].get) if order[0] == "tiled" else (0, 0))
        winners.append(Winner(dtype=key[0], mode=key[1], shape=key[2], bucket=key[3], backend=order[0], block_m=bm,
                              block_n=bn, median_ms=per[order[0]], order=order, backend_ms=dict(per)))

    def base_order(dtype):
        return tuple(base.auto_order.get(dtype, base.auto_order["default"]))

    dtypes = sorted({k[0] for k in best}, key=list(DTYPES).index)
    auto, mode_orders = {}, {mode: {} for mode in MODES}
    for dtype in dtypes:
        dense = {k: v for k, v in best.items() if k[0] == dtype and not varlen[k[2]]}
        if not dense:
            continue
        auto[dtype] = _order(dense, base_order(dtype))
        for mode in MODES:
            sub = {k: v for k, v in dense.items() if k[1] == mode}
            if sub:
                mode_orders[mode][dtype] = _order(sub, base_order(dtype))
    varlen_order: Tuple[str, ...] = ()
    packed = {k: v for k, v in best.items() if varlen[k[2]]}
    if "varlen" in base.auto_order and packed:
        varlen_order = _order(packed, tuple(base.auto_order["varlen"]))

    def pick_blocks(cases) -> Tuple[int, int]:
        cases = {k: v for k, v in cases.items() if v}
        if not cases:
            return base.block_m, base.block_n
        keys = list(dict.fromkeys(b for v in cases.values() for b in v))  # in the order measured
        return _ranked(_scores(cases, keys), [(base.block_m, base.block_n)] + keys)[0]

    tiled_blocks = {d: pick_blocks({k: v for k, v in blocks.items() if k[0] == d}) for d in dtypes
                    if any(k[0] == d for k in blocks)}
    bm, bn = pick_blocks(blocks)
    return TunedProfile(
        schema=SCHEMA_VERSION, tool_version=current_versions().package,
        date=datetime.datetime.now().isoformat(timespec="seconds"), device_kind=device_kind(hw),
        base_profile=base.name, quick=quick, fingerprint=fingerprint(hw), versions=current_versions(),
        repeats=repeats, elapsed_s=round(float(elapsed_s), 3), shapes=tuple(shapes), measurements=tuple(measurements),
        winners=tuple(winners), auto_order=auto, mode_orders={m: o for m, o in mode_orders.items() if o},
        varlen_order=varlen_order, block_m=bm, block_n=bn, tiled_blocks=tiled_blocks,
    )


def plot(tuned: TunedProfile, path: str) -> str:
    """A PNG of the timings: one row of panels per shape class, one panel per dtype and mode, one
    line per candidate (median ms against length, log-log). Returns a line saying where it went,
    or why not (matplotlib absent, nothing measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'qwen3vl-flash[bench]')"
    ok = [m for m in tuned.measurements if m.status == "ok"]
    if not ok:
        return "no plot: nothing was measured"
    shapes = list(dict.fromkeys(m.shape for m in ok))
    cols = list(dict.fromkeys((m.dtype, m.mode) for m in ok))
    # one colour per candidate across all panels (a panel without cudnn must not shift the others)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {c: palette[i % len(palette)] for i, c in enumerate(dict.fromkeys(m.candidate for m in ok))}
    fig, axes = plt.subplots(len(shapes), len(cols), figsize=(4 * len(cols), 3.2 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, (dtype, mode) in enumerate(cols):
            ax = axes[i][j]
            sub = [m for m in ok if (m.shape, m.dtype, m.mode) == (shape, dtype, mode)]
            for cand in dict.fromkeys(m.candidate for m in sub):
                pts = sorted((m.seqlen, m.median_ms) for m in sub if m.candidate == cand)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", markersize=3, label=cand, color=colour[cand])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            lengths = sorted({m.seqlen for m in sub})
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_title(f"{shape} {dtype} {mode}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel("median ms")
            ax.grid(True, which="both", alpha=0.3)
            if sub:
                ax.legend(fontsize=6)
    fig.suptitle(f"qwen3vl-flash tune{' --quick' if tuned.quick else ''}: {tuned.fingerprint.describe()}, "
                 f"{tuned.date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


__all__ = [
    "ENV_CACHE_DIR", "ENV_TUNED", "Fingerprint", "Measurement", "ShapeClass", "TunedProfile", "TunedStatus",
    "Versions", "Winner", "cache_dir", "derive", "fingerprint", "read_tuned", "tune", "tuned_path",
    "tuned_profile_for", "tuned_status", "write_tuned",
]
