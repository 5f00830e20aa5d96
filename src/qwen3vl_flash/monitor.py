"""Run-time monitoring of attention calls: which backend served each call, why others were skipped, how long it took.

    import qwen3vl_flash as qf
    with qf.monitor() as m:                  # or sync=True on CUDA: device time and peak memory per call
        model.generate(**inputs)
    print(m.summary())                       # calls / total / mean / share per (kind or function, backend)
    m.to_csv("attention_calls.csv")          # one row per call
    m.records[0]                             # a CallRecord

``QWEN3VL_FLASH_MONITOR=1`` (or ``sync``) in the environment at import starts a process-wide monitor
whose summary is printed to stderr at exit. See docs/monitoring.md.

What is recorded: every call of :func:`~qwen3vl_flash.flash_attn_func`,
:func:`~qwen3vl_flash.flash_attn_varlen_func`, :func:`~qwen3vl_flash.flash_attn_with_kvcache` and
:func:`~qwen3vl_flash.parallel.context_parallel_attn` (one record per call, however many internal
calls it makes), labelled with the transformers integration's call kind ("text.prefill",
"text.decode", "text.packed", "vision") and layer index when it came from a model switched by
:func:`qwen3vl_flash.enable`. Not recorded: calls that raise, backward passes (a record times the
forward call), calls traced by ``torch.compile`` or captured into a CUDA graph (nothing runs then;
a compiled graph skips the monitor entirely), and the integration's own eager/SDPA fallbacks
(``output_attentions=True``, custom 4D masks), which do not go through the public functions.

Cost when no monitor is active: each hook is one truth test of the module-level list ``_ACTIVE``
(no clock read, no allocation). While one is active, a call costs two clock reads, a walk up the
stack frames of our own entry modules (to fold internal calls into the user's call) and one record;
with ``sync=True`` on CUDA also two device synchronisations, two events and a reset of the device's
peak-memory statistics (``torch.cuda.reset_peak_memory_stats``: a caller's own peak reading taken
across a monitored call is then the peak since that call).

Monitors are process-wide: one that is active records calls from every thread (appends are taken
under a lock), and nested monitors each get every record.

``qwen3vl_flash.monitor`` (the package attribute) is the function :func:`monitor`, which shadows this
module's name there; import the other names with ``from qwen3vl_flash.monitor import Monitor, CallRecord``.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import functools
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .backends.base import get_backend
from .conventions import DECODE_MAX_QUERIES

__all__ = ["ENV_MONITOR", "CallRecord", "Monitor", "monitor"]

ENV_MONITOR = "QWEN3VL_FLASH_MONITOR"  # "1": a process-wide monitor, summary to stderr at exit; "sync": with sync=True

# The monitors now recording. The hooks in the hot paths test only its truthiness; it is mutated in
# place (never rebound), so modules that imported it by name see every change.
_ACTIVE: List["Monitor"] = []
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .label: (kind, layer) of the integration call running on this thread;
# .kv_failure: (id of the flash_attn_with_kvcache frame, weakref to its q, text) of a fused decode path
# that failed, for the record of the generic path's call that follows it (the next call on this thread)

# How far up the stack a public entry point is looked for (flash_attn_with_kvcache -> paged fallback ->
# flash_attn_with_kvcache -> contiguous path -> packed path -> flash_attn_varlen_func -> flash_attn_func
# -> _execute: 7)
_MAX_FRAMES = 10


@dataclass(frozen=True)
class CallRecord:
    """One monitored attention call.

    Attributes:
        function: the public entry point the caller used ("flash_attn_func", "flash_attn_varlen_func",
            "flash_attn_with_kvcache", "context_parallel_attn").
        kind: the transformers integration's call kind ("text.prefill", "text.decode", "text.packed",
            "vision"), None for direct calls.
        layer: the layer index within its stack (text: ``layer_idx``; vision: known when the monitor
            was given ``model=``), else None.
        backend: the backend that served the call, after any fallback.
        reason: why backends ahead of it in ``auto``'s order did not serve it ("name: reason" for each,
            their ``check()`` reasons and exceptions of failed attempts, joined by "; "), None when
            none was skipped or the backend was named explicitly.
        shapes: (q, k, v) shapes; for ``flash_attn_with_kvcache`` (q, k_cache, v_cache).
        dtype: q's dtype without the "torch." prefix; device: q's device ("cpu", "cuda:0").
        wall_ms: host time from backend choice to the result. Without sync on CUDA, kernels may still be
            queued: that is the launch cost, not the run time.
        device_ms: CUDA time between events around the call (``sync=True`` on CUDA), else None.
        peak_extra_bytes: CUDA peak allocated bytes during the call above those allocated at its start
            (``sync=True`` on CUDA), else None (CPU: no cheap allocator statistics).
        quant: the quantisation of the call ("int8", "fp8") when the call path reports one, else None.
    """

    function: str
    kind: Optional[str]
    layer: Optional[int]
    backend: str
    reason: Optional[str]
    shapes: Tuple[Tuple[int, ...], ...]
    dtype: str
    device: str
    wall_ms: float
    device_ms: Optional[float]
    peak_extra_bytes: Optional[int]
    quant: Optional[str] = None

    @property
    def group(self) -> str:
        """The summary row this record counts in: its kind, or its function for direct calls."""
        return self.kind or self.function


FIELDS = tuple(f.name for f in dataclasses.fields(CallRecord))


class Monitor:
    """Records attention calls while active (a context manager, re-entrant; also a decorator).

    Use :func:`monitor` to make one. Attributes: ``sync``; ``records`` (list of :class:`CallRecord`,
    in call order)."""

    def __init__(self, sync: bool = False, model=None, keep_records: bool = True):
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.sync = sync
        self.records: List[CallRecord] = []
        self._keep = keep_records
        self._count = 0
        self._groups: Dict[Tuple[str, str], List[float]] = {}  # (group, backend) -> [calls, wall, device, n_device]
        self._reasons: Dict[str, int] = {}
        self._depth = 0
        self._layers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        if model is not None:
            self._layers.update(_layer_indices(model))

    # -- activation
    def __enter__(self) -> "Monitor":
        with _LOCK:
            if self._depth == 0:
                _ACTIVE.append(self)
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            self._depth -= 1
            if self._depth == 0:
                _ACTIVE.remove(self)

    def __call__(self, fn: Callable) -> Callable:
        """As a decorator: ``fn`` runs under this monitor (``wrapper.monitor`` is this monitor)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        wrapper.monitor = self
        return wrapper

    @property
    def active(self) -> bool:
        return self._depth > 0

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"Monitor(sync={self.sync}, calls={self._count}, active={self.active})"

    def _add(self, rec: CallRecord) -> None:  # called with _LOCK held
        self._count += 1
        if self._keep:
            self.records.append(rec)
        g = self._groups.setdefault((rec.group, rec.backend), [0, 0.0, 0.0, 0])
        g[0] += 1
        g[1] += rec.wall_ms
        if rec.device_ms is not None:
            g[2] += rec.device_ms
            g[3] += 1
        if rec.reason:
            self._reasons[rec.reason] = self._reasons.get(rec.reason, 0) + 1

    # -- reports
    def summary(self) -> str:
        """A table: one row per (kind or function, backend) with calls, total and mean wall ms, share of
        the total wall time (and device ms where ``sync=True`` measured it), a totals row, then the
        distinct skip reasons with their counts."""
        with _LOCK:
            groups = {key: list(val) for key, val in self._groups.items()}
            reasons = dict(self._reasons)
            count = self._count
        if not count:
            return "qwen3vl_flash monitor: no attention calls recorded"
        total = sum(g[1] for g in groups.values())
        with_device = any(g[3] for g in groups.values())
        rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
        head = ["call", "backend", "calls", "total ms", "mean ms", "share"] + (["device ms"] if with_device else [])
        body = []
        for (group, backend), (calls, wall, dev, ndev) in rows:
            row = [group, backend, str(calls), f"{wall:.3f}", f"{wall / calls:.3f}",
                   f"{100 * wall / total:.1f}%" if total > 0 else "-"]
            if with_device:
                row.append(f"{dev:.3f}" if ndev else "-")
            body.append(row)
        tot = ["total", "", str(count), f"{total:.3f}", f"{total / count:.3f}", "100.0%" if total > 0 else "-"]
        if with_device:
            tot.append(f"{sum(g[2] for g in groups.values()):.3f}")
        widths = [max(len(r[i]) for r in [head, tot] + body) for i in range(len(head))]

        def fmt(r):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        timing = "wall ms on the host" + ("; device ms from CUDA events" if with_device else "")
        lines = [f"qwen3vl_flash monitor: {count} attention call{'s' if count != 1 else ''} ({timing})", fmt(head),
                 fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in body]
        lines += [fmt(["-" * w for w in widths]), fmt(tot)]
        if reasons:
            lines.append("skipped backends:")
            lines += [f"  {n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)

    def to_csv(self, path) -> None:
        """One row per record, columns as :class:`CallRecord`'s fields; ``shapes`` as
        ``"1x16x4x8;1x16x2x8;1x16x2x8"`` (q;k;v), None as an empty cell."""
        with _LOCK:
            records = list(self.records)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(FIELDS)
            for r in records:
                row = []
                for name in FIELDS:
                    val = getattr(r, name)
                    if name == "shapes":
                        val = ";".join("x".join(str(d) for d in s) for s in val)
                    elif val is None:
                        val = ""
                    elif isinstance(val, float):
                        val = f"{val:.6f}"
                    row.append(val)
                w.writerow(row)


def monitor(sync: bool = False, model: Optional[torch.nn.Module] = None) -> Monitor:
    """A monitor of attention calls: ``with qf.monitor() as m: ...`` (or ``@qf.monitor()`` on a function).

    Args:
        sync: on CUDA, synchronise around each call and measure its device time (CUDA events) and
            peak extra memory (resets the device's peak-memory statistics before each call). Slows
            the monitored code; leave False to see host-side (launch) costs only. No effect on CPU,
            where calls are synchronous.
        model: a model (switched by :func:`qwen3vl_flash.enable` or not): its modules' names give
            the vision layers their index (transformers' vision attention has no ``layer_idx``).

    Returns:
        a :class:`Monitor` (``records``, ``summary()``, ``to_csv(path)``, ``len()``). Entering it
        starts recording, leaving it stops; the records stay.

    Raises:
        TypeError for a non-bool ``sync`` or a ``model`` that is not a ``torch.nn.Module``.
    """
    return Monitor(sync=sync, model=model)


def _layer_indices(model: torch.nn.Module) -> Dict[torch.nn.Module, int]:
    """Attention modules of ``model`` -> their block's index (the last integer in the module's name)."""
    out = {}
    for name, mod in model.named_modules():
        if not type(mod).__name__.endswith("Attention"):
            continue
        ints = [p for p in name.split(".") if p.isdigit()]
        if ints:
            out[mod] = int(ints[-1])
    return out


# --------------------------------------------------------------------------------------------
# the hooks' side: one call being timed (only ever built while a monitor is active)
# --------------------------------------------------------------------------------------------


_CODES: Dict[object, str] = {}  # code object of an entry point that calls the others internally -> its name
_SCOPES: List[dict] = []  # the globals of the modules those internal calls run in (interface, parallel.api)


def _entry_points() -> Dict[object, str]:
    """:data:`_CODES`, filled once per module as the modules are imported."""
    if len(_SCOPES) < 2:
        iface = sys.modules.get("qwen3vl_flash.interface")
        api = sys.modules.get("qwen3vl_flash.parallel.api")
        if len(_SCOPES) == (iface is not None) + (api is not None):
            return _CODES
        with _LOCK:
            if iface is not None and iface.__dict__ not in _SCOPES:
                _CODES[iface.flash_attn_with_kvcache.__code__] = "flash_attn_with_kvcache"
                _CODES[iface.flash_attn_varlen_func.__code__] = "flash_attn_varlen_func"  # equal segments: dense
                _SCOPES.append(iface.__dict__)
            if api is not None and api.__dict__ not in _SCOPES:
                _CODES[api.context_parallel_attn.__code__] = "context_parallel_attn"
                _SCOPES.append(api.__dict__)
    return _CODES


def _outer_entry(frame):
    """The outermost of flash_attn_with_kvcache / flash_attn_varlen_func / context_parallel_attn
    running in the frames above ``frame`` that belong to our entry modules (so the internal calls
    they make count as one call of theirs): (name, frame) or (None, None)."""
    codes = _entry_points()
    found = (None, None)
    for _ in range(_MAX_FRAMES):
        if frame is None or not any(frame.f_globals is g for g in _SCOPES):
            break  # the caller's own code: above it, nothing is ours to merge
        name = codes.get(frame.f_code)
        if name is not None:
            found = (name, frame)
        frame = frame.f_back
    return found


class _Call:
    """Timing of one call; :meth:`done` turns it into a record for every active monitor."""

    __slots__ = ("function", "label", "shapes", "dtype", "device", "t0", "events", "mem0", "failures",
                 "outer_frame_id", "quant", "kv_reason")

    def __init__(self, function: str, q, k, v, frame):
        outer, outer_frame = _outer_entry(frame)
        self.function = outer or function
        self.outer_frame_id = id(outer_frame) if outer_frame is not None else None
        self.label = getattr(_LOCAL, "label", None)
        self.quant = None
        if outer is not None:
            # an internal call (the generic KV-cache path on the valid rows, equal varlen segments as
            # one dense batch): the record describes the user's call, its q and k/v or caches
            loc = outer_frame.f_locals
            names = ("q", "k_cache", "v_cache") if outer == "flash_attn_with_kvcache" else ("q", "k", "v")
            user = tuple(loc.get(n) for n in names)
            if all(isinstance(t, torch.Tensor) for t in user):
                q, k, v = user
                self.quant = cache_quant(k.dtype)
        self.kv_reason = None
        kv = getattr(_LOCAL, "kv_failure", None)
        if kv is not None:  # only the very next call may be the generic path of that failed call
            _LOCAL.kv_failure = None
            if kv[0] == self.outer_frame_id and kv[1]() is q:
                self.kv_reason = kv[2]
        self.shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        self.dtype = str(q.dtype).replace("torch.", "")
        self.device = str(q.device)
        self.failures: List[str] = []
        self.events = None
        self.mem0 = 0
        if q.is_cuda and any(m.sync for m in _ACTIVE):
            dev = q.device
            torch.cuda.synchronize(dev)
            self.mem0 = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.t0 = time.perf_counter()

    def failed(self, backend: str, exc: BaseException) -> None:
        """An auto-chosen backend raised and the call falls through to the next one."""
        self.failures.append(f"{backend} failed ({type(exc).__name__}: {exc})")

    def done_cp(self, backend: str, requested, q, k, v, num_kv_heads: int, causal: bool, square: bool) -> None:
        """:func:`~qwen3vl_flash.parallel.context_parallel_attn` across ranks: ``backend`` ran each
        block; the reasons are those of the kernels ahead of it in the profile's ``cp_order``."""
        reason = None
        if requested == "auto":
            from .hardware.profiles import profile_for_device
            from .parallel.api import choose_kernel

            parts = []
            for name in profile_for_device(q.device).cp_order:
                if name == backend:
                    break
                try:
                    choose_kernel(q, num_kv_heads, causal, name, square=square, k=k, v=v)
                except ValueError as exc:
                    parts.append(str(exc).split(": ", 1)[-1])  # "name: reason"
            reason = "; ".join(parts) or None
        self.done(backend, reason)

    def done(self, backend: str, reason: Optional[str], quant: Optional[str] = None) -> None:
        device_ms = peak = None
        if self.events is not None:
            dev = torch.device(self.device)
            self.events[1].record()
            torch.cuda.synchronize(dev)
            device_ms = float(self.events[0].elapsed_time(self.events[1]))
            peak = int(torch.cuda.max_memory_allocated(dev) - self.mem0)
        wall_ms = (time.perf_counter() - self.t0) * 1e3
        if self.kv_reason is not None:
            reason = "; ".join(r for r in (self.kv_reason, reason) if r)
        kind, layer = self.label if self.label is not None else (None, None)
        rec = CallRecord(function=self.function, kind=kind, layer=layer, backend=backend, reason=reason or None,
                         shapes=self.shapes, dtype=self.dtype, device=self.device, wall_ms=wall_ms,
                         device_ms=device_ms, peak_extra_bytes=peak, quant=quant or self.quant)
        with _LOCK:
            for m in _ACTIVE:
                m._add(rec)


def _recording(q) -> bool:
    """False while nothing really runs: torch.compile tracing, CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def begin_call(function: str, q, k, v) -> Optional[_Call]:
    """Start timing a call of the public ``function`` (hooks call this only when ``_ACTIVE`` is
    non-empty); None when not recording. The record names the outermost entry point running (a
    flash_attn_with_kvcache that calls flash_attn_func internally is recorded as itself)."""
    if not _recording(q):
        return None
    return _Call(function, q, k, v, sys._getframe(1))


def auto_reasons(req, order, served: str, call: _Call) -> Optional[str]:
    """Why the backends ahead of ``served`` in ``order`` did not serve ``req``: their ``check()``
    reason, or the exception of a failed attempt (from ``call.failures``)."""
    failed = {f.split(" ", 1)[0]: f for f in call.failures}
    parts = []
    for name in order:
        if name == served:
            break
        if name in failed:
            parts.append(failed[name])
            continue
        why = get_backend(name).check(req)
        if why is not None:
            parts.append(f"{name}: {why}")
    return "; ".join(parts) or None


# -- flash_attn_with_kvcache's fused decode path


class _TimedKVCache:
    """Stands in for the backend whose fused decode path serves a flash_attn_with_kvcache call."""

    def __init__(self, be, call: _Call, reason: Optional[str], quant: Optional[str], q):
        self.name = be.name
        self._be, self._call, self._reason, self._quant, self._q = be, call, reason, quant, q

    def kvcache_attention(self, *args, **kwargs):
        try:
            res = self._be.kvcache_attention(*args, **kwargs)
        except Exception as exc:  # the interface falls back to the generic path (auto): tell its record why
            if self._call.outer_frame_id is not None:
                _LOCAL.kv_failure = (self._call.outer_frame_id, weakref.ref(self._q),
                                     f"{self.name} decode path failed ({type(exc).__name__}: {exc})")
            raise
        self._call.done(self.name, self._reason, quant=self._quant)
        return res


def kvcache_backend(fused_be, q, k_cache, v_cache, p, backend: str, return_lse: bool, smax: int):
    """The interface's fused decode backend for this call, wrapped so that the call is timed and
    recorded (monitoring on only). Unwrapped when not recording."""
    if not _recording(q):
        return fused_be
    call = _Call("flash_attn_with_kvcache", q, k_cache, v_cache, sys._getframe(1))
    from .interface import ENV_BACKEND, _request, choose_backend  # here: the interface imports this module

    reason = None
    if backend == "auto" and (os.environ.get(ENV_BACKEND, "auto") or "auto") == "auto":
        req = _request(q, k_cache, p, return_lse, q.shape[1], smax, v_cache)
        order = p.profile.order_for(req.dtype, req.varlen, seqlen_k=req.seqlen_k, need_grad=req.need_grad)
        parts = []
        candidates = {be.name for be in choose_backend(req, "auto", p.profile)}
        for name in order:
            if name == fused_be.name:
                break
            be = get_backend(name)
            if name not in candidates:
                parts.append(f"{name}: {be.check(req)}")
            elif getattr(be, "kvcache_attention", None) is None:
                parts.append(f"{name}: no fused KV-cache decode path")
            else:
                parts.append(f"{name}: {be.kvcache_check(q, k_cache, p)}")
        reason = "; ".join(parts) or None
    return _TimedKVCache(fused_be, call, reason, cache_quant(k_cache.dtype), q)


def cache_quant(dtype: torch.dtype) -> Optional[str]:
    """The quantisation a KV cache of this dtype stands for: "int8", "fp8" or None (a float cache)."""
    if dtype == torch.int8:
        return "int8"
    if "float8" in str(dtype):
        return "fp8"
    return None


# -- the transformers integration: the kind and layer of the call in progress


def label_pending() -> bool:
    """Whether the integration call on this thread still has to be labelled (and can be)."""
    return not torch.compiler.is_compiling() and getattr(_LOCAL, "label", None) is None


def _layer_of(module) -> Optional[int]:
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int):
        return idx
    for m in tuple(_ACTIVE):  # a snapshot: another thread may enter or leave a monitor meanwhile
        idx = m._layers.get(module)
        if idx is not None:
            return idx
    return None


def _kind(module, query, key, attention_mask, kwargs) -> str:
    if "Vision" in type(module).__name__:
        return "vision"
    Sq, Sk = query.shape[2], key.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None:
        return "text.packed"
    if Sq < Sk and Sq <= DECODE_MAX_QUERIES:
        return "text.decode"
    # packed rows read off a block-diagonal mask or restarting position ids: the integration's own
    # plans, cached per tensor object, so attend() reuses what is computed here
    qt = sys.modules.get("qwen3vl_flash.integrations.transformers")
    if qt is None:
        return "text.prefill"
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if attention_mask is not None:
        plan = qt._plan_for(attention_mask, causal, Sk)
        return "text.packed" if plan.kind == "segments" else "text.prefill"
    if Sq == Sk > 1 and qt._position_plan(kwargs.get("position_ids"), query.shape[0], Sq) is not None:
        return "text.packed"
    return "text.prefill"


def labelled(fn, module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """Run the integration's attention ``fn`` with its calls labelled (kind, layer) on this thread."""
    _LOCAL.label = (_kind(module, query, key, attention_mask, kwargs), _layer_of(module))
    try:
        return fn(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    finally:
        _LOCAL.label = None


# --------------------------------------------------------------------------------------------
# QWEN3VL_FLASH_MONITOR: a process-wide monitor, summary to stderr at exit
# --------------------------------------------------------------------------------------------

_PROCESS_MONITOR: Optional[Monitor] = None


def _print_process_summary() -> None:
    if _PROCESS_MONITOR is not None:
        print(_PROCESS_MONITOR.summary(), file=sys.stderr)


def _start_from_env() -> None:
    global _PROCESS_MONITOR
    val = os.environ.get(ENV_MONITOR, "").strip().lower()
    if val in ("", "0", "false", "no", "off"):
        return
    if val not in ("1", "true", "yes", "on", "sync"):
        raise ValueError(f"{ENV_MONITOR} must be 0, 1 or sync, got {os.environ[ENV_MONITOR]!r}")
    # aggregates only: a long-running process must not grow a record per call
    _PROCESS_MONITOR = Monitor(sync=val == "sync", keep_records=False).__enter__()
    atexit.register(_print_process_summary)


_start_from_env()
