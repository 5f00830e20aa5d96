"""Faults that never hang (issue 15): an error on one context-parallel rank makes every rank raise.

Context parallelism is a chain of collectives: a rank that raises on its own (a malformed input, an
out-of-memory error inside a ring step) leaves its peers blocked in a send, a receive or an
all-to-all that never completes. :class:`FaultGuard` puts cheap agreement points where a local
error can happen:

* once per call, before any collective work (:meth:`FaultGuard.agree_inputs`): every rank's
  validation result and a hash of a small metadata vector (dtype, shapes, heads, causal, layout,
  mode, scale, whether a backward will run) meet in one all-reduce (max) of 2 int64, so that a
  rank whose input is malformed, or that passes something the others do not, is named on every
  rank (the names and fields come from a gather that only runs then);
* once per ring step, forward and backward (:meth:`FaultGuard.check_step`): a status flag (one
  all-reduce (max) of one int64) after the step's local work and before anyone waits for the
  step's transfers. ``QWEN3VL_FLASH_CP_STEP_CHECK=0`` turns these off (the input agreement stays).

When a rank failed, the failing rank raises its own exception again (same type, chained with
``raise ... from``) with its rank and step added; every other rank raises
:class:`ContextParallelError` (a RuntimeError; :class:`ContextParallelInputError`, also a
ValueError, for input problems) naming the failing rank, its step and its message. Transfers that
every rank had posted are waited for first, so the process group stays usable.

What cannot be detected here: a rank that dies, or raises before it calls, or never calls. Then
the process group's own timeout is what ends the wait; the groups this package creates inherit that
timeout (see :func:`.comm.group_timeout`).

The agreement runs on CPU tensors: on the group itself when it has a gloo backend, else (NCCL) on a
gloo group over the same ranks, created once per group with the group's timeout, so that the flags
never synchronise a GPU stream.

Tests inject faults with :data:`_FAULT_HOOK` (``hook(cp_rank, step, phase)``, called inside every
ring step before its local compute; it may raise).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .comm import CPTopology, backend_name, dist_active, group_timeout

__all__ = ["ContextParallelError", "ContextParallelInputError", "FaultGuard", "ENV_STEP_CHECK"]

ENV_STEP_CHECK = "QWEN3VL_FLASH_CP_STEP_CHECK"

# test hook: called as _FAULT_HOOK(cp_rank, step, phase) inside each ring step ("forward" /
# "backward"), before the step's local compute; None (the default) costs one global lookup
_FAULT_HOOK: Optional[Callable[[int, int, str], None]] = None


def fault_point(rank: int, step: int, phase: str) -> None:
    hook = _FAULT_HOOK
    if hook is not None:
        hook(rank, step, phase)


class ContextParallelError(RuntimeError):
    """Raised on every rank whose own work succeeded while another context-parallel rank failed.

    ``failed``: {rank in the context-parallel group: "ExceptionType: message"};
    ``step``/``phase``: where ("inputs" and None for the per-call input agreement)."""

    def __init__(self, message: str, failed: Optional[Dict[int, str]] = None, step: Optional[int] = None,
                 phase: Optional[str] = None):
        super().__init__(message)
        self.failed = dict(failed or {})
        self.step, self.phase = step, phase

    def __reduce__(self):
        return type(self), (str(self), self.failed, self.step, self.phase)


class ContextParallelInputError(ContextParallelError, ValueError):
    """A context-parallel call whose inputs are malformed on some rank, or differ across ranks."""


# ----------------------------------------------------------------------------------------------
# CPU groups for the flags
# ----------------------------------------------------------------------------------------------

_CPU_GROUPS: Dict[Tuple[int, Tuple[int, ...]], object] = {}


def _cpu_group(group):
    """``group`` when it runs CPU tensors (gloo), else a gloo group over the same ranks with the
    same timeout, created once (collective over the group's ranks: they all get here together)."""
    if "gloo" in str(backend_name(group)):
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    key = (id(group), ranks)
    g = _CPU_GROUPS.get(key)
    if g is None:
        g = dist.new_group(list(ranks), backend="gloo", timeout=group_timeout(group),
                           use_local_synchronization=True)
        _CPU_GROUPS[key] = g
    return g


# ----------------------------------------------------------------------------------------------
# the metadata every rank must agree on
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("ring", "ulysses", "hybrid", "allgather")
_LAYOUTS = ("zigzag", "contiguous")


def _name(values: Sequence) -> Callable[[int], str]:
    return lambda i: str(values[i]) if 0 <= i < len(values) else f"<{i}>"


def _float_of(bits: int) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", bits))[0])


# (label, formatter of the int code); the order is the order of InputMeta.codes()
_FIELDS: Tuple[Tuple[str, Callable[[int], str]], ...] = (
    ("the dtype of q/k/v", _name(_DTYPES)),
    ("the batch size (q.shape[0])", str),
    ("the local sequence length (q.shape[1])", str),
    ("the number of query heads (q.shape[2])", str),
    ("the number of kv heads (k.shape[2])", str),
    ("head_dim (q.shape[3])", str),
    ("causal", lambda i: str(bool(i))),
    ("layout", _name(_LAYOUTS)),
    ("mode (as resolved from mode='auto' and LOCAL_WORLD_SIZE)", _name(_MODES)),
    ("the Ulysses degree of mode='hybrid'", str),
    ("softmax_scale (as resolved)", _float_of),
    ("the device type", lambda i: {0: "cpu", 1: "cuda"}.get(i, f"<{i}>")),
    ("whether a backward will run (requires_grad and grad mode)", lambda i: str(bool(i))),
)


def input_codes(q: torch.Tensor, k: torch.Tensor, causal: bool, layout: str, mode: str, ulysses_degree: int,
                scale: float, backward: bool) -> List[int]:
    """The int64 codes of :data:`_FIELDS` for one rank's validated call."""
    dev = {"cpu": 0, "cuda": 1}.get(q.device.type, 2 + zlib.crc32(q.device.type.encode()) % 1000)
    return [
        _DTYPES.index(q.dtype), q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], int(causal),
        _LAYOUTS.index(layout), _MODES.index(mode), int(ulysses_degree),
        struct.unpack("<q", struct.pack("<d", float(scale)))[0], dev, int(backward),
    ]


def _ranks(ids: Sequence[int]) -> str:
    ids = list(ids)
    return f"rank {ids[0]}" if len(ids) == 1 else "ranks " + ", ".join(map(str, ids))


# ----------------------------------------------------------------------------------------------
# the guard
# ----------------------------------------------------------------------------------------------

_OK, _FAILED, _FAILED_UNPOSTED = 0, 1, 2  # status codes: failed after / before posting the step's transfers
_FAILED_HASH = 1 << 62  # above every 62-bit hash of input codes: this rank's checks failed


class FaultGuard:
    """Agreement points over every rank of one context-parallel topology (see the module docs).

    Every rank of the topology must reach the same agreement points in the same order; the ring,
    Ulysses and all-gather modes do (they run the same steps everywhere)."""

    def __init__(self, topo: CPTopology):
        self.size, self.index = topo.world_size, topo.shard_index
        if topo.flat_group is not None:  # one group over all ranks (also for a split hybrid)
            groups = [topo.flat_group]
        else:  # a 2-D mesh or a (ring, Ulysses) pair: ring group, then Ulysses group, covers the grid
            groups = [g for g in (topo.ring_group, topo.ulysses_group) if g is not None]
        self.groups = [_cpu_group(g) for g in groups]
        self.global_rank = dist.get_rank()
        self.steps_on = os.environ.get(ENV_STEP_CHECK, "1") != "0"

    @classmethod
    def for_topology(cls, topo: CPTopology) -> Optional[FaultGuard]:
        """A guard for ``topo``, or None for one process (or without torch.distributed)."""
        if topo.world_size == 1 or not dist_active():
            return None
        return cls(topo)

    @classmethod
    def for_ring(cls, group, size: int, rank: int) -> Optional[FaultGuard]:
        if size == 1 or group is None or not dist_active():
            return None
        return cls(CPTopology(world_size=size, shard_index=rank, ring_size=size, ring_rank=rank,
                              ring_group=group, flat_group=group))

    # -- transport ---------------------------------------------------------------------------

    def _max(self, values: List[int], err: Optional[BaseException]) -> List[int]:
        """The element-wise max of ``values`` over every rank: one all-reduce of a few int64 per
        group, whatever the world size."""
        t = torch.tensor(values, dtype=torch.int64)
        try:
            for g in self.groups:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
        except Exception as comm_err:  # the agreement itself failed (a peer died, a timeout)
            if err is not None:
                raise err from comm_err  # this rank's own error is the one to see
            raise
        return t.tolist()

    def _gather(self, info: Optional[dict]) -> Dict[int, dict]:
        """{rank: info} of the ranks that passed one (the failure path only: pickles)."""
        merged = {} if info is None else {self.index: info}
        for g in self.groups:
            parts: List[Optional[dict]] = [None] * dist.get_world_size(g)
            dist.all_gather_object(parts, merged, group=g)
            merged = {r: v for p in parts if p for r, v in p.items()}
        return merged

    def _info(self, err: Optional[BaseException], **extra) -> Optional[dict]:
        if err is None and not extra:
            return None
        info = dict(extra, global_rank=self.global_rank)
        if err is not None:
            info.update(type=type(err).__name__, message=str(err))
        return info

    # -- the agreement points -------------------------------------------------------------

    def agree_inputs(self, err: Optional[BaseException], codes: Optional[List[int]]) -> None:
        """Per call, before any collective work: raises on every rank if a rank's validation
        failed (``err``) or the ranks' :func:`input_codes` differ; returns otherwise.

        Fast path: one all-reduce (max) of [h, -h] with h a 62-bit hash of the codes, or 2**62 on
        a rank whose checks failed (all ranks agree iff max(h) == min(h) < 2**62); only on a failure
        or a difference are the codes themselves gathered, to name the ranks and the fields."""
        if err is not None or codes is None:
            h = _FAILED_HASH
        else:
            h = int.from_bytes(hashlib.blake2b(repr(list(codes)).encode(), digest_size=8).digest(), "little") >> 2
        hi, neg_lo = self._max([h, -h], err)
        if hi == -neg_lo and hi != _FAILED_HASH:
            return
        if hi == _FAILED_HASH:
            self._raise(err, self._gather(self._info(err)), False, "checking its inputs", None, "inputs", drain=())
        table = self._gather(self._info(None, codes=list(codes)))
        table = [table[r]["codes"] for r in range(self.size)]
        problems, odd_ranks = [], set()
        for j, (label, fmt) in enumerate(_FIELDS):
            col = [row_[j] for row_ in table]
            if len(set(col)) == 1:
                continue
            counts: Dict[int, int] = {}
            for val in col:
                counts[val] = counts.get(val, 0) + 1
            common = max(counts, key=lambda val: (counts[val], -col.index(val)))  # ties: the lowest rank's value
            groups: Dict[int, List[int]] = {}
            for r, val in enumerate(col):
                groups.setdefault(val, []).append(r)
            odd_ranks.update(r for r in range(self.size) if col[r] != common)
            parts = [f"{fmt(val)} on {_ranks(rs)}" for val, rs in sorted(groups.items(), key=lambda kv: kv[1][0])
                     if val != common]
            problems.append(f"{label} is {'; '.join(parts)} but {fmt(common)} on {_ranks(groups[common])}")
        odd = sorted(odd_ranks)
        me = " (this rank)" if self.index in odd_ranks else ""
        raise ContextParallelInputError(
            f"context parallel: {_ranks(odd)} of {self.size}{me} passed inputs that do not match the other "
            f"ranks': {'; '.join(problems)}. Every rank must pass its shard of the same q/k/v with the "
            "same options",
            failed={r: "inputs differ" for r in odd}, phase="inputs")

    def check_step(self, err: Optional[BaseException], step: int, steps: int, phase: str, posted: bool = True,
                   drain: Sequence = ()) -> None:
        """After one ring step's local work, before waiting for its transfers: returns if no rank
        failed (one all-reduce of one int64), else raises on every rank. ``posted``: whether this
        rank posted all of the step's transfers; ``drain``: the RingComm objects whose transfers
        to wait for before raising when every rank posted them (so the group stays usable)."""
        if not self.steps_on:
            if err is not None:
                raise err
            return
        code = _OK if err is None else (_FAILED if posted else _FAILED_UNPOSTED)
        (worst,) = self._max([code], err)
        if worst != _OK:
            where = f"in {phase} step {step} of {steps}" + (" of the ring" if steps > 1 else " (its local attention)")
            self._raise(err, self._gather(self._info(err)), worst == _FAILED_UNPOSTED, where, step, phase, drain)

    # -- the failure path ---------------------------------------------------------------------

    def _raise(self, err, infos: Dict[int, dict], unmatched: bool, where: str, step, phase: str, drain) -> None:
        failed = sorted(infos)
        if not unmatched:  # every rank posted this step's transfers: let them finish
            for comm in drain:
                if comm is not None:
                    comm.wait()

        def who(r: int) -> str:
            g = infos.get(r, {}).get("global_rank")
            return f"rank {r} of {self.size}" + (f" (global rank {g})" if g is not None and g != r else "")

        def what(r: int) -> str:
            i = infos.get(r, {})
            return f"{i.get('type', '?')}: {i.get('message', '?')}"

        note = ""
        if unmatched:
            note = (" (some transfers of this step were never posted, so the group's point-to-point traffic is "
                    "left unmatched: destroy and re-create the process group before using it again)")
        failed_map = {r: what(r) for r in failed}
        if err is not None:
            others = [r for r in failed if r != self.index]
            also = "; also failed: " + "; ".join(f"{who(r)}: {what(r)}" for r in others) if others else ""
            msg = f"context parallel: {who(self.index)} (this rank) failed {where}: {err}{also}{note}"
            raise _same_type(err, msg, failed_map, step, phase) from err
        head = (f"{who(failed[0])} failed" if len(failed) == 1
                else f"{_ranks(failed)} of {self.size} failed")
        detail = what(failed[0]) if len(failed) == 1 else "; ".join(f"{who(r)}: {what(r)}" for r in failed)
        cls = ContextParallelInputError if phase == "inputs" else ContextParallelError
        raise cls(f"context parallel: {head} {where}: {detail}{note}", failed=failed_map, step=step, phase=phase)


def _same_type(err: BaseException, msg: str, failed, step, phase) -> BaseException:
    """``err``'s type with message ``msg`` (the failing rank's own error, rank and step added), or
    a ContextParallelError when that type cannot be built from one message."""
    try:
        new = type(err)(msg)
    except Exception:  # a constructor that takes other arguments
        new = None
    if new is not None and str(new) == msg:
        return new
    return ContextParallelError(msg, failed=failed, step=step, phase=phase)


def resolved_scale(softmax_scale, head_dim: int) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
