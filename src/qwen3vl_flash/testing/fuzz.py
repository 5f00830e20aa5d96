"""Differential fuzzer for the three public functions: random valid calls against the float64
reference, random malformed calls against the validation, NaN isolation and determinism.

    python -m qwen3vl_flash.testing.fuzz --backend tiled --cases 2000 --seed 7
    python -m qwen3vl_flash.testing.fuzz --backend triton --cases 50 --max-elems 4096  # CPU: interpreter
    python -m qwen3vl_flash.testing.fuzz --backend sdpa --bad 500                      # malformed calls
    python -m qwen3vl_flash.testing.fuzz --backend eager --seed 7 --start 123 --cases 1  # case 123 again

**Valid calls** (:func:`draw_case`, :func:`check_case`): ``flash_attn_func`` (dense),
``flash_attn_varlen_func`` (empty and length-1 segments, equal segments, ``max_seqlen`` above the
longest) and ``flash_attn_with_kvcache`` (appends of any length, ``cache_seqlens`` as a tensor, an
int or None, paged caches with shared or random spare pages, left-padded caches); causal or not,
Sq < Sk and Sq > Sk, sliding windows, GQA ratios 1-16, head dims 1-256 (72/80/96 and odd ones
included), softmax scales, logits with a standard deviation of 0.25-6 (inputs scaled), every dtype
the backend takes, strided / NaN-padded / broadcast inputs and caches, strided index tensors, random
``tiled`` tiles. Each call is compared with the float64 reference by the one rule
(:mod:`qwen3vl_flash.testing.rule`: 2x PyTorch's own error in the input dtype plus twice the
rounding error at the output's magnitude; 3x for dq/dk/dv, checked for dense and varlen calls), the
lse too; rows that see no key must give exactly 0 (and dq 0) with lse -inf; no input may change,
and a cache may change only in the appended rows (the whole buffer under a strided cache is
compared bit for bit). A failure is shrunk (batch, lengths, segments, heads, head_dim, options)
while it still fails the same way, and printed as a runnable snippet with the seed.

**Malformed calls** (:data:`BAD_CLASSES`, :func:`check_bad`): a valid call with one defect drawn
from one of the classes; it must raise ValueError/TypeError whose message names the argument,
never another exception, and leave every input (caches included) unchanged.

**NaN/Inf isolation** (:func:`check_nan_isolation`) and **determinism**
(:func:`check_determinism`): see docs/reliability.md for what they show.

Triton on a CPU runs under its interpreter, which must be chosen before triton is first imported:
the command line re-executes itself with ``TRITON_INTERPRET=1`` when ``--backend triton`` is asked
for on a machine without CUDA. Element counts are capped (``--max-elems``) so CPU cases take
milliseconds (the interpreter: about a second).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .rule import RuleViolation, check_against_reference, grad_magnitude

__all__ = [
    "Case",
    "CaseFailure",
    "draw_case",
    "check_case",
    "shrink",
    "snippet",
    "backend_dtypes",
    "BAD_CLASSES",
    "draw_bad",
    "check_bad",
    "check_nan_isolation",
    "check_determinism",
    "run",
    "main",
]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_NAMED_DIMS = (8, 16, 24, 32, 40, 48, 59, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256)
# lengths at and around tile boundaries (tiled's and Triton's tiles are powers of two)
_EDGE_LENS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
_TILES = (4, 8, 16, 32, 64, 128, 3, 24, 48, 100)
DEFAULT_MAX_ELEMS = 32768
TRITON_CPU_MAX_ELEMS = 4096  # the interpreter runs each program in numpy: about a second per call


# --------------------------------------------------------------------------------------------
# a case: everything that defines one call (the tensors come from ``seed``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One valid call. ``kind``: "dense" (flash_attn_func), "varlen" (flash_attn_varlen_func) or
    "kvcache" (flash_attn_with_kvcache). The tensors are drawn from ``seed`` in float32, scaled by
    the magnitudes and then cast to ``dtype`` (so the float64 reference sees the same numbers)."""

    kind: str
    dtype: str
    H: int
    Hkv: int
    D: int
    B: int = 1  # dense, kvcache
    Sq: int = 1  # dense, kvcache
    Sk: int = 1  # dense
    lens_q: Tuple[int, ...] = ()  # varlen: segment lengths
    lens_k: Tuple[int, ...] = ()
    max_extra: int = 0  # varlen: max_seqlen = longest + max_extra
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softmax_scale: Optional[float] = None
    q_mag: float = 1.0
    k_mag: float = 1.0
    v_mag: float = 1.0
    backward: bool = False  # dense, varlen
    return_lse: bool = True
    layout: str = "contiguous"  # q/k/v (and caches): contiguous | transposed | padded | expanded | stacked
    index_layout: str = "contiguous"  # cu_seqlens / cache_seqlens / block_table / leftpad: contiguous | strided
    tiles: Optional[Tuple[int, int]] = None  # tiled's (block_m, block_n); None: the device profile's
    # kvcache
    Smax: int = 0  # contiguous cache length (paged: pages_per_row * page_size)
    cache_seqlens: Tuple[int, ...] = ()
    seqlens_as: str = "tensor"  # tensor | int | none (the whole cache, no append)
    snew: int = 0
    append_empty: bool = False  # pass k/v with Snew = 0
    page_size: int = 0  # 0: contiguous cache
    num_pages: int = 0
    shared_pages: bool = False  # rows share pages (prefix caching; only without appends)
    leftpad: Optional[Tuple[int, ...]] = None
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def elements(self) -> int:
        """What the case costs: max(score elements, input elements), the reference's work."""
        if self.kind == "varlen":
            scores = sum(a * b for a, b in zip(self.lens_q, self.lens_k)) * self.H
            inputs = (sum(self.lens_q) * self.H + 2 * sum(self.lens_k) * self.Hkv) * self.D
        elif self.kind == "dense":
            scores = self.B * self.H * self.Sq * self.Sk
            inputs = self.B * (self.Sq * self.H + 2 * self.Sk * self.Hkv) * self.D
        else:
            scores = self.B * self.H * self.Sq * (self.Smax + self.snew)
            inputs = self.B * (self.Sq * self.H + 2 * (self.Smax + self.snew) * self.Hkv) * self.D
        return max(scores, inputs)


class CaseFailure(AssertionError):
    """A case that failed: ``what`` is the failed quantity ("out", "dk", "cache", ...) or
    "exception <Type>", so that shrinking keeps the same failure."""

    def __init__(self, what: str, message: str):
        super().__init__(f"[{what}] {message}")
        self.what = what
        self.message = message


# --------------------------------------------------------------------------------------------
# drawing valid cases
# --------------------------------------------------------------------------------------------


def backend_dtypes(backend: str, device: str = "cpu") -> List[str]:
    """The float dtypes ``backend`` takes on ``device`` (its ``check`` asked about a plain call)."""
    from ..backends.base import AttnRequest, get_backend

    if backend == "auto":
        return list(_DTYPES)
    be = get_backend(backend)
    out = []
    for name, dt in _DTYPES.items():
        req = AttnRequest(device_type=device, dtype=dt, head_dim=64, num_heads=2, num_kv_heads=2, seqlen_q=16,
                          seqlen_k=16)
        if be.check(req) is None:
            out.append(name)
    return out


def _loguniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _length(rng: random.Random, hi: int = 300) -> int:
    r = rng.random()
    if r < 0.35:
        n = rng.choice(_EDGE_LENS)
    elif r < 0.9:
        n = int(_loguniform(rng, 1, hi + 1))
    else:
        n = rng.randint(1, hi)
    return max(1, min(n, hi))


def _head_dim(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice(_NAMED_DIMS)
    if r < 0.97:
        return rng.randint(8, 256)
    return rng.randint(1, 7)


def _heads(rng: random.Random) -> Tuple[int, int]:
    g = rng.choice((1, 1, 2, 2, 3, 4, 5, 6, 8, 16))
    hkv = rng.choice((1, 1, 2, 3, 4))
    if g * hkv > 32:
        hkv = 1
    return g * hkv, hkv


def _window(rng: random.Random, n: int) -> Tuple[int, int]:
    if rng.random() < 0.55:
        return (-1, -1)

    def side():
        r = rng.random()
        return -1 if r < 0.3 else 0 if r < 0.45 else rng.randint(1, max(1, n))

    return (side(), side())


def _magnitudes(rng: random.Random, D: int):
    """softmax_scale and input magnitudes giving logits with a standard deviation of 0.25-6."""
    scale = None if rng.random() < 0.5 else _loguniform(rng, 0.05, 2.0)
    c = scale if scale is not None else 1.0 / math.sqrt(D)
    s = _loguniform(rng, 0.25, 6.0)
    k_mag = _loguniform(rng, 0.5, 2.0)
    q_mag = s / (c * math.sqrt(D) * k_mag)
    return scale, round(q_mag, 4), round(k_mag, 4), round(_loguniform(rng, 0.1, 10.0), 4)


def _layout(rng: random.Random, Hkv: int, kind: str) -> str:
    r = rng.random()
    if r < 0.5:
        return "contiguous"
    if r < 0.65:
        return "transposed"
    if r < 0.85:
        return "padded"
    if kind == "kvcache":
        return "stacked"
    return "expanded" if Hkv > 1 else "padded"


def _fewer_heads(case: Case) -> Optional[Case]:
    g = case.H // case.Hkv
    if case.Hkv > 1:
        return dataclasses.replace(case, Hkv=case.Hkv // 2, H=g * (case.Hkv // 2))
    if g > 1:
        return dataclasses.replace(case, H=g // 2)
    return None


def _kv_resize(case: Case, cap: Optional[int] = None, B: Optional[int] = None, snew: Optional[int] = None) -> Case:
    """A kvcache case with another capacity / batch / append length, lengths clamped to stay valid."""
    B = case.B if B is None else B
    snew = case.snew if snew is None else snew
    cap = max(case.Smax if cap is None else cap, snew, 1)
    ps, spare = case.page_size, 0
    if ps:
        spare = max(0, case.num_pages - case.B * (case.Smax // ps))
        if cap < ps:  # a smaller page when one page is more than the capacity
            ps = 1 << (cap - 1).bit_length()
        cap = -(-cap // ps) * ps
    lens = tuple(cap if case.seqlens_as == "none" else min(L, cap - snew) for L in case.cache_seqlens[:B])
    lp = None if case.leftpad is None else tuple(min(p, L) for p, L in zip(case.leftpad[:B], lens))
    return dataclasses.replace(case, B=B, Smax=cap, snew=snew, cache_seqlens=lens, leftpad=lp, page_size=ps,
                               num_pages=B * (cap // ps) + spare if ps else 0,
                               append_empty=case.append_empty and snew == 0,
                               shared_pages=case.shared_pages and snew == 0)


def _reductions(case: Case):
    """Ways to make ``case`` cheaper, in the order _fit tries them (None: does not apply)."""
    R = dataclasses.replace
    if case.kind == "dense":
        yield R(case, B=case.B - 1) if case.B > 1 and case.B * 2 > max(case.Sq, case.Sk) else None
        yield R(case, Sq=case.Sq // 2) if case.Sq > 1 and case.Sq >= case.Sk else None
        yield R(case, Sk=case.Sk // 2) if case.Sk > 1 else None
        yield R(case, Sq=case.Sq // 2) if case.Sq > 1 else None
    elif case.kind == "varlen":
        lq, lk = list(case.lens_q), list(case.lens_k)
        i = max(range(len(lq)), key=lambda j: lq[j] * lk[j] + lq[j] + lk[j])
        if lq[i] + lk[i] > 2:
            lq[i], lk[i] = (lq[i] + 1) // 2, (lk[i] + 1) // 2
            yield R(case, lens_q=tuple(lq), lens_k=tuple(lk))
    else:
        yield R(case, D=case.D // 2) if case.D > 64 else None
        yield _kv_resize(case, B=case.B - 1) if case.B > 1 else None
        yield R(case, Sq=case.Sq // 2) if case.Sq > 1 else None
        yield _kv_resize(case, cap=case.Smax // 2) if case.Smax > max(1, case.snew) else None
        yield _kv_resize(case, snew=case.snew // 2) if case.snew > 0 else None
    yield _fewer_heads(case)
    yield R(case, D=max(1, case.D // 2)) if case.D > 1 else None


def _fit(case: Case, max_elems: int) -> Case:
    """Shrink lengths, then heads, then head_dim, until the case is within ``max_elems``."""
    while case.elements() > max_elems:
        n = case.elements()
        smaller = next((c for c in _reductions(case) if c is not None and c.elements() < n), None)
        if smaller is None:
            break
        case = smaller
    return case


def draw_case(rng: random.Random, dtypes: Sequence[str], kinds: Sequence[str] = ("dense", "varlen", "kvcache"),
              max_elems: int = DEFAULT_MAX_ELEMS, tiles: bool = True) -> Case:
    """A random valid call of one of ``kinds`` in one of ``dtypes``, within ``max_elems``."""
    kind = rng.choice(list(kinds))
    dtype = rng.choice(list(dtypes))
    H, Hkv = _heads(rng)
    D = _head_dim(rng)
    scale, q_mag, k_mag, v_mag = _magnitudes(rng, D)
    common = dict(kind=kind, dtype=dtype, H=H, Hkv=Hkv, D=D, softmax_scale=scale, q_mag=q_mag, k_mag=k_mag,
                  v_mag=v_mag, causal=rng.random() < 0.5, return_lse=rng.random() < 0.8,
                  layout=_layout(rng, Hkv, kind), index_layout="strided" if rng.random() < 0.2 else "contiguous",
                  seed=rng.getrandbits(48))
    if tiles and rng.random() < 0.65:
        common["tiles"] = (rng.choice(_TILES), rng.choice(_TILES))
    if kind == "dense":
        B = rng.choice((1, 1, 2, 3, 4))
        r = rng.random()
        if r < 0.25:
            Sq = Sk = _length(rng)
        elif r < 0.4:
            Sq, Sk = rng.randint(1, 4), _length(rng)
        else:
            Sq, Sk = _length(rng), _length(rng)
        if rng.random() < 0.03:
            Sq, Sk = (0, Sk) if rng.random() < 0.5 else (Sq, 0)
        case = Case(B=B, Sq=Sq, Sk=Sk, window=_window(rng, max(Sq, Sk)), backward=rng.random() < 0.7, **common)
    elif kind == "varlen":
        N = rng.choice((1, 2, 3, 4, 6, 8))

        def seg():
            r = rng.random()
            return 0 if r < 0.12 else 1 if r < 0.24 else _length(rng, 200)

        if rng.random() < 0.2:  # equal segments: the interface's dense-batch shortcut
            lq, lk = [seg()] * N, [seg()] * N
        else:
            lq, lk = [seg() for _ in range(N)], [seg() for _ in range(N)]
        case = Case(lens_q=tuple(lq), lens_k=tuple(lk), max_extra=0 if rng.random() < 0.7 else rng.randint(1, 8),
                    window=_window(rng, max(lq + lk)), backward=rng.random() < 0.7, **common)
    else:
        case = _draw_kvcache(rng, common)
    return _fit(case, max_elems)


def _draw_kvcache(rng: random.Random, common: dict) -> Case:
    B = rng.choice((1, 1, 2, 3, 4))
    r = rng.random()
    Sq = 1 if r < 0.5 else rng.randint(2, 16) if r < 0.85 else rng.randint(17, 64)
    r = rng.random()
    snew = 0 if r < 0.35 else Sq if r < 0.75 else rng.randint(1, Sq + 3)
    paged = rng.random() < 0.3
    cap = max(_length(rng, 256), snew)
    page_size = num_pages = 0
    if paged:
        page_size = rng.choice((1, 4, 8, 16, 32, 64, 256))
        per_row = -(-cap // page_size)
        cap = per_row * page_size
        num_pages = B * per_row + rng.randint(0, 3)
    seqlens_as = "tensor" if rng.random() < 0.8 else "int" if rng.random() < 0.5 else "none"
    if seqlens_as == "none":
        snew = 0
        lens = [cap] * B
    elif seqlens_as == "int" or rng.random() < 0.25:
        lens = [rng.randint(0, cap - snew)] * B
    else:
        lens = [rng.randint(0, cap - snew) for _ in range(B)]
    leftpad = None
    if not paged and rng.random() < 0.25:
        leftpad = tuple(rng.randint(0, L) for L in lens)
    return Case(B=B, Sq=Sq, Smax=cap, cache_seqlens=tuple(lens), seqlens_as=seqlens_as, snew=snew,
                append_empty=snew == 0 and seqlens_as != "none" and rng.random() < 0.2, page_size=page_size,
                num_pages=num_pages, shared_pages=paged and snew == 0 and rng.random() < 0.3, leftpad=leftpad,
                window=_window(rng, cap + snew), **common)


# --------------------------------------------------------------------------------------------
# building the tensors of a case
# --------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    fn: Callable
    args: dict
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)  # the storage under strided views
    extra: dict = field(default_factory=dict)


def _float_tensor(shape, mag: float, dtype, gen, layout: str, device, role: str = "q"):
    """A tensor of ``shape`` whose values are randn * mag in ``dtype``, laid out as ``layout``.
    Returns ``(tensor, buffer)``: the buffer is the whole storage behind a view (for byte-exact
    comparisons, its padding included), else the tensor itself."""
    x = (torch.randn(shape, generator=gen) * mag).to(dtype)
    if layout == "transposed" and len(shape) >= 3:
        # storage order with the sequence and head dims swapped: a non-contiguous view
        d0 = len(shape) - 3
        buf = x.transpose(d0, d0 + 1).contiguous().to(device)
        return buf.transpose(d0, d0 + 1), buf
    if layout == "padded":
        # a view into wider rows whose extra columns are NaN: a kernel that reads past D shows it
        pad = 8
        buf = torch.full(tuple(shape[:-1]) + (shape[-1] + pad,), float("nan"), dtype=dtype)
        buf[..., : shape[-1]] = x
        buf = buf.to(device)
        return buf[..., : shape[-1]], buf
    if layout == "expanded" and role in ("k", "v") and shape[-2] > 1:
        # every kv head the same numbers (stride 0): a broadcast input is a valid input
        one = x[..., :1, :].to(device)
        return one.expand(shape), one
    x = x.to(device)
    return x, x


def _cache_pair(shape, case: Case, gen, device):
    """k_cache and v_cache (``shape`` each) in the case's layout, and their buffers."""
    dt = case.torch_dtype
    if case.layout == "stacked":  # one (.., 2, Hkv, D) buffer, k and v interleaved (a fused-QKV style layout)
        *lead, Hkv, D = shape
        x = torch.randn(tuple(lead) + (2, Hkv, D), generator=gen)
        x[..., 0, :, :] *= case.k_mag
        x[..., 1, :, :] *= case.v_mag
        buf = x.to(dt).to(device)
        return buf[..., 0, :, :], buf[..., 1, :, :], {"kv_cache": buf}
    lay = case.layout if case.layout in ("transposed", "padded") else "contiguous"
    kc, kb = _float_tensor(shape, case.k_mag, dt, gen, lay, device, "k_cache")
    vc, vb = _float_tensor(shape, case.v_mag, dt, gen, lay, device, "v_cache")
    return kc, vc, {"k_cache": kb, "v_cache": vb}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as every other element of a twice-as-long tensor (stride 2)."""
    wide = torch.full((2 * t.numel(),), -7, dtype=t.dtype, device=t.device)
    wide[::2] = t
    return wide[::2]


def _index_tensor(vals, case: Case, device, dims: int = 1, strided_ok: bool = True) -> torch.Tensor:
    """An int32 index tensor; with ``index_layout="strided"`` a non-contiguous view where the API
    takes one (cache_seqlens, block_table; cu_seqlens and cache_leftpad must be contiguous)."""
    t = torch.tensor(vals, dtype=torch.int32)
    if case.index_layout == "strided" and strided_ok:
        if dims == 1:
            return _strided(t.to(device))
        return t.t().contiguous().to(device).t()  # (B, pages) with a unit stride along B
    return t.to(device)


def _build(case: Case, device="cpu", requires_grad: Optional[bool] = None) -> _Inputs:
    import qwen3vl_flash as qf

    gen = torch.Generator().manual_seed(case.seed)
    dt, lay = case.torch_dtype, case.layout
    grad = case.backward if requires_grad is None else requires_grad
    opts = dict(softmax_scale=case.softmax_scale, causal=case.causal, window_size=case.window,
                return_lse=case.return_lse)
    if case.kind in ("dense", "varlen"):
        if case.kind == "dense":
            qs, ks = (case.B, case.Sq, case.H, case.D), (case.B, case.Sk, case.Hkv, case.D)
        else:
            qs, ks = (sum(case.lens_q), case.H, case.D), (sum(case.lens_k), case.Hkv, case.D)
        q, qb = _float_tensor(qs, case.q_mag, dt, gen, lay, device, "q")
        k, kb = _float_tensor(ks, case.k_mag, dt, gen, lay, device, "k")
        v, vb = _float_tensor(ks, case.v_mag, dt, gen, lay, device, "v")
        if grad:
            for t in (q, k, v):
                t.requires_grad_(True)
        args = dict(q=q, k=k, v=v, **opts)
        inp = _Inputs(qf.flash_attn_func, args, {"q": qb, "k": kb, "v": vb})
        if case.kind == "varlen":
            cq = [0]
            ck = [0]
            for a, b in zip(case.lens_q, case.lens_k):
                cq.append(cq[-1] + a)
                ck.append(ck[-1] + b)
            args.update(cu_seqlens_q=_index_tensor(cq, case, device, strided_ok=False),
                        cu_seqlens_k=_index_tensor(ck, case, device, strided_ok=False),
                        max_seqlen_q=max(case.lens_q) + case.max_extra, max_seqlen_k=max(case.lens_k) + case.max_extra)
            inp.fn = qf.flash_attn_varlen_func
        return inp
    # kvcache: the logical caches (B, cap, Hkv, D) hold the "previous" keys
    B, cap, Hkv, D = case.B, case.Smax, case.Hkv, case.D
    q, qb = _float_tensor((B, case.Sq, case.H, D), case.q_mag, dt, gen, lay, device, "q")
    bufs = {"q": qb}
    extra = {}
    if case.page_size:
        per_row = cap // case.page_size
        phys = (case.num_pages, case.page_size, Hkv, D)
        kc, vc, cb = _cache_pair(phys, case, gen, device)
        perm = torch.randperm(case.num_pages, generator=gen).tolist()
        table = []
        for b in range(B):
            if case.shared_pages:  # pages drawn with replacement: rows share pages (prefix caching)
                row = [perm[int(torch.randint(case.num_pages, (1,), generator=gen))] for _ in range(per_row)]
            else:
                row = perm[b * per_row: (b + 1) * per_row]
            table.append(row)
        # entries past a row's used pages are never read: fill them with other (valid) page ids
        for b in range(B):
            used = -(-(case.cache_seqlens[b] + case.snew) // case.page_size)
            for j in range(used, per_row):
                table[b][j] = int(torch.randint(case.num_pages, (1,), generator=gen))
        extra["table"] = table
        block_table = _index_tensor(table, case, device, dims=2)
    else:
        kc, vc, cb = _cache_pair((B, cap, Hkv, D), case, gen, device)
        block_table = None
    bufs.update(cb)
    k = v = None
    if case.snew or case.append_empty:
        k, kb = _float_tensor((B, case.snew, Hkv, D), case.k_mag, dt, gen, lay if lay != "stacked" else "padded",
                              device, "k")
        v, vb = _float_tensor((B, case.snew, Hkv, D), case.v_mag, dt, gen, lay if lay != "stacked" else "padded",
                              device, "v")
        bufs.update(k=kb, v=vb)
    if case.seqlens_as == "none":
        seqlens = None
    elif case.seqlens_as == "int":
        seqlens = int(case.cache_seqlens[0])
    else:
        seqlens = _index_tensor(list(case.cache_seqlens), case, device)
    leftpad = None if case.leftpad is None else _index_tensor(list(case.leftpad), case, device, strided_ok=False)
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v, cache_seqlens=seqlens, softmax_scale=case.softmax_scale,
                causal=case.causal, window_size=case.window, return_lse=case.return_lse, block_table=block_table,
                cache_leftpad=leftpad)
    return _Inputs(qf.flash_attn_with_kvcache, args, bufs, extra)


def _logical_cache(cache: torch.Tensor, case: Case, table) -> torch.Tensor:
    """(B, cap, Hkv, D): the rows a batch element sees, gathered from pages for a paged cache."""
    if not case.page_size:
        return cache
    idx = torch.tensor(table, dtype=torch.long, device=cache.device)
    return cache[idx].reshape(case.B, case.Smax, case.Hkv, case.D)


# --------------------------------------------------------------------------------------------
# checking a valid case
# --------------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bytes of ``x`` as integers (NaN payloads compare equal to themselves)."""
    x = x.detach().contiguous()
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _snapshot(args: dict, buffers: dict) -> dict:
    snap = {}
    for name, x in list(args.items()) + [(f"buffer {n}", b) for n, b in buffers.items()]:
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            snap[name] = (x, x.detach().clone())
    return snap


def _check_unchanged(snap: dict, skip=()) -> None:
    for name, (x, x0) in snap.items():
        if name in skip:
            continue
        if not _same_bits(x, x0):
            raise CaseFailure("input modified", f"{name} was modified by the call")


def _profile_ctx(case: Case, device):
    import contextlib

    from ..hardware.profiles import profile_for_device, use_profile

    if case.tiles is None:
        return contextlib.nullcontext()
    prof = profile_for_device(torch.device(device))
    return use_profile(prof.replace(block_m=case.tiles[0], block_n=case.tiles[1]))


def _check_empty_rows(out, lse_ref, dq, rows_first: bool) -> None:
    """Rows whose reference lse is -inf see no key: out exactly 0, dq exactly 0."""
    empty = torch.isneginf(lse_ref)  # dense (B, H, Sq) / varlen (H, Tq)
    if not empty.any():
        return
    mask = empty.permute(0, 2, 1) if rows_first else empty.t()  # -> out's (B, Sq, H) / (Tq, H)
    if (out.detach()[mask] != 0).any():
        raise CaseFailure("empty rows", f"rows that see no key are not 0 ({int(mask.sum())} rows)")
    if dq is not None and (dq[mask] != 0).any():
        raise CaseFailure("empty rows", "dq of rows that see no key is not 0")


def _check_dense_or_varlen(case: Case, backend: str, device) -> None:
    from .rule import reference_triplet

    inp = _build(case, device)
    a = inp.args
    snap = _snapshot(a, inp.buffers)
    with _profile_ctx(case, device):
        res = inp.fn(**a, backend=backend)
    out, lse = res if case.return_lse else (res, None)
    dout = grads = None
    if case.backward:
        gen = torch.Generator().manual_seed(case.seed + 1)
        dout = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
        with _profile_ctx(case, device):
            grads = torch.autograd.grad(out, (a["q"], a["k"], a["v"]), dout, allow_unused=True)
        grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (a["q"], a["k"], a["v"])))
    _check_unchanged(snap)
    if out.shape != a["q"].shape:
        raise CaseFailure("out", f"out shape {tuple(out.shape)} != q's {tuple(a['q'].shape)}")
    varlen = (a["cu_seqlens_q"], a["cu_seqlens_k"]) if case.kind == "varlen" else None
    kw = dict(softmax_scale=case.softmax_scale, causal=case.causal, window_size=case.window)
    ref, low = reference_triplet(a["q"].detach(), a["k"].detach(), a["v"].detach(), dout, varlen=varlen, **kw)
    try:
        gs = 1.0 if dout is None else grad_magnitude(a["q"], a["k"], a["v"], dout, case.softmax_scale)
        check_against_reference(out.detach(), lse, grads, ref, low, case.torch_dtype, grad_scale=gs)
    except RuleViolation as e:
        raise CaseFailure(e.what, str(e)) from None
    _check_empty_rows(out, ref["lse"], None if grads is None else grads[0], case.kind == "dense")


def _check_kvcache(case: Case, backend: str, device) -> None:
    from ..reference import attention_ref, lse_dtype

    inp = _build(case, device)
    a = inp.args
    kc0, vc0 = a["k_cache"].clone(), a["v_cache"].clone()
    table = inp.extra.get("table")
    snap = _snapshot(a, inp.buffers)
    # what the caches must hold afterwards: the new rows at [L, L + Snew), nothing else changed
    expect = {n: b.clone() for n, b in inp.buffers.items() if n in ("k_cache", "v_cache", "kv_cache")}

    def view_in(name_view):
        x = a[name_view]
        owner = "kv_cache" if "kv_cache" in expect else name_view
        return expect[owner].as_strided(x.shape, x.stride(), x.storage_offset() - inp.buffers[owner].storage_offset()
                                        + expect[owner].storage_offset())

    kexp, vexp = view_in("k_cache"), view_in("v_cache")
    for b, L in enumerate(case.cache_seqlens):
        for t in range(case.snew):
            pos = L + t
            if case.page_size:
                page, off = table[b][pos // case.page_size], pos % case.page_size
                kexp[page, off], vexp[page, off] = a["k"][b, t], a["v"][b, t]
            else:
                kexp[b, pos], vexp[b, pos] = a["k"][b, t], a["v"][b, t]
    with _profile_ctx(case, device):
        res = inp.fn(**a, backend=backend)
    out, lse = res if case.return_lse else (res, None)
    _check_unchanged(snap, skip=("k_cache", "v_cache") + tuple(f"buffer {n}" for n in expect))
    for n, e in expect.items():
        if not _same_bits(inp.buffers[n], e):
            diff = (_bits(inp.buffers[n]) != _bits(e)).nonzero()[:4].tolist()
            raise CaseFailure("cache", f"{n} differs from the expected append at {diff}")
    # the reference, row by row, over the keys [leftpad, L + Snew) of the logical cache
    dt = case.torch_dtype
    lk, lv = _logical_cache(kc0, case, table), _logical_cache(vc0, case, table)
    refs = {True: ([], []), False: ([], [])}
    for b, L in enumerate(case.cache_seqlens):
        lo = 0 if case.leftpad is None else min(case.leftpad[b], L + case.snew)
        kk, vv = lk[b, lo:L], lv[b, lo:L]
        if case.snew:
            kk, vv = torch.cat([kk, a["k"][b]]), torch.cat([vv, a["v"][b]])
        for up in (True, False):
            d = torch.float64 if up else dt
            o, s = attention_ref(a["q"][b: b + 1].to(d), kk[None].to(d), vv[None].to(d), case.softmax_scale,
                                 case.causal, case.window, upcast=up, return_lse=True)
            refs[up][0].append(o)
            refs[up][1].append(s)
    ref = {"out": torch.cat(refs[True][0]), "lse": torch.cat(refs[True][1])}
    low = {"out": torch.cat(refs[False][0]), "lse": torch.cat(refs[False][1]).to(lse_dtype(dt))}
    if out.shape != a["q"].shape:
        raise CaseFailure("out", f"out shape {tuple(out.shape)} != q's {tuple(a['q'].shape)}")
    try:
        check_against_reference(out, lse, None, ref, low, dt)
    except RuleViolation as e:
        raise CaseFailure(e.what, str(e)) from None
    _check_empty_rows(out, ref["lse"], None, True)


def _gpu_rounding_under_interpreter(backend: str) -> None:
    """Under Triton's interpreter, round fp32 -> bf16 as the GPU does (:mod:`.interp`)."""
    if backend in ("triton", "auto") and os.environ.get("TRITON_INTERPRET") == "1":
        from qwen3vl_flash.testing import interp

        interp.install()


def check_case(case: Case, backend: str = "auto", device="cpu") -> None:
    """Run ``case`` on ``backend`` and check it (see the module docstring); raises
    :class:`CaseFailure`, also for any exception the call raises."""
    _gpu_rounding_under_interpreter(backend)
    try:
        if case.kind == "kvcache":
            _check_kvcache(case, backend, device)
        else:
            _check_dense_or_varlen(case, backend, device)
    except CaseFailure:
        raise
    except Exception as e:
        raise CaseFailure(f"exception {type(e).__name__}", f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------
# shrinking and reporting
# --------------------------------------------------------------------------------------------


def _valid(c: Case) -> bool:
    if c.H < 1 or c.Hkv < 1 or c.H % c.Hkv or not 1 <= c.D <= 256 or min(c.window) < -1:
        return False
    if c.kind == "dense":
        return c.B >= 0 and c.Sq >= 0 and c.Sk >= 0
    if c.kind == "varlen":
        return len(c.lens_q) == len(c.lens_k) >= 1 and min(c.lens_q + c.lens_k) >= 0
    if c.B < 1 or c.Sq < 1 or len(c.cache_seqlens) != c.B or c.Smax < max(1, c.snew):
        return False
    if c.seqlens_as == "none" and (c.snew or any(L != c.Smax for L in c.cache_seqlens)):
        return False
    if c.seqlens_as == "int" and len(set(c.cache_seqlens)) > 1:
        return False
    if any(L < 0 or L + c.snew > c.Smax for L in c.cache_seqlens):
        return False
    if c.leftpad is not None and (c.page_size or len(c.leftpad) != c.B
                                  or any(not 0 <= p <= L for p, L in zip(c.leftpad, c.cache_seqlens))):
        return False
    if c.page_size:
        if c.Smax % c.page_size or c.num_pages < (1 if c.shared_pages else c.B * (c.Smax // c.page_size)):
            return False
        if c.shared_pages and c.snew:
            return False
    return True


def _smaller(c: Case):
    """Candidate simplifications of ``c``, most aggressive first."""
    R = dataclasses.replace
    opts = [R(c, backward=False), R(c, return_lse=False), R(c, layout="contiguous"),
            R(c, index_layout="contiguous"), R(c, tiles=None), R(c, window=(-1, -1)), R(c, causal=False),
            R(c, softmax_scale=None), R(c, q_mag=1.0, k_mag=1.0), R(c, v_mag=1.0)]
    g = c.H // c.Hkv
    opts += [R(c, H=g, Hkv=1), R(c, H=c.Hkv, Hkv=c.Hkv), R(c, H=c.H // 2, Hkv=max(1, c.Hkv // 2))]
    opts += [R(c, D=d) for d in (8, c.D // 2, c.D - 8, c.D - 1) if 1 <= d < c.D]
    if c.window != (-1, -1):
        opts += [R(c, window=(w // 2 if w > 0 else w, c.window[1])) for w in (c.window[0],)]
        opts += [R(c, window=(c.window[0], w // 2 if w > 0 else w)) for w in (c.window[1],)]
    if c.kind == "dense":
        opts += [R(c, B=b) for b in (1, c.B // 2, c.B - 1) if 1 <= b < c.B]
        for n in ("Sq", "Sk"):
            cur = getattr(c, n)
            opts += [R(c, **{n: m}) for m in (1, cur // 2, cur - 1) if 1 <= m < cur]
    elif c.kind == "varlen":
        n = len(c.lens_q)
        for i in range(n):
            if n > 1:
                opts.append(R(c, lens_q=c.lens_q[:i] + c.lens_q[i + 1:], lens_k=c.lens_k[:i] + c.lens_k[i + 1:]))
        for name in ("lens_q", "lens_k"):
            lens = getattr(c, name)
            for i, L in enumerate(lens):
                for m in (0, 1, L // 2, L - 1):
                    if 0 <= m < L:
                        opts.append(R(c, **{name: lens[:i] + (m,) + lens[i + 1:]}))
        opts.append(R(c, max_extra=0))
    else:
        if c.B > 1:
            opts.append(_kv_resize(c, B=c.B - 1))
        opts += [R(c, Sq=m) for m in (1, c.Sq // 2, c.Sq - 1) if 1 <= m < c.Sq]
        opts += [R(c, leftpad=None), R(c, seqlens_as="tensor"), R(c, append_empty=False)]
        if c.snew:
            opts += [R(c, snew=m, append_empty=False) for m in (0, 1, c.snew // 2) if m < c.snew]
        lens = c.cache_seqlens
        for i, L in enumerate(lens):
            for m in (0, L // 2, L - 1):
                if 0 <= m < L:
                    lp = c.leftpad if c.leftpad is None else tuple(min(p, m) if j == i else p
                                                                  for j, p in enumerate(c.leftpad))
                    opts.append(R(c, cache_seqlens=lens[:i] + (m,) + lens[i + 1:], leftpad=lp))
        if c.page_size:
            opts.append(R(c, page_size=0, num_pages=0, shared_pages=False))
        need = max(lens) + c.snew if lens else 1
        for m in (need, c.Smax // 2):
            if c.page_size:
                m = -(-m // c.page_size) * c.page_size
                pages = c.B * (m // c.page_size) + (c.num_pages - c.B * (c.Smax // c.page_size))
                opts.append(R(c, Smax=m, num_pages=max(pages, 1)))
            else:
                opts.append(R(c, Smax=m))
    return [o for o in opts if o != c and _valid(o)]


def shrink(case: Case, backend: str, what: str, device="cpu", budget: int = 400) -> Tuple[Case, str]:
    """Greedy: take the first simplification that still fails with the same ``what``, repeat.
    Returns the smallest failing case found and its failure message."""
    msg = ""
    tries = 0
    progress = True
    while progress and tries < budget:
        progress = False
        for cand in _smaller(case):
            tries += 1
            try:
                check_case(cand, backend, device)
            except CaseFailure as f:
                if f.what == what:
                    case, msg, progress = cand, f.message, True
                    break
            if tries >= budget:
                break
    return case, msg


def snippet(case: Case, backend: str, failure: str = "", run_seed: Optional[int] = None,
            index: Optional[int] = None) -> str:
    """A runnable reproducer: ``check_case`` on the (shrunk) case raises the failure."""
    head = f"# qwen3vl_flash fuzz failure, backend={backend!r}"
    if run_seed is not None:
        head += f", run seed {run_seed}, case {index}"
        head += (f"\n# the original case: python -m qwen3vl_flash.testing.fuzz --backend {backend} "
                 f"--seed {run_seed} --start {index} --cases 1")
    env = "import os; os.environ.setdefault('TRITON_INTERPRET', '1')  # before torch/triton\n" \
        if backend == "triton" else ""
    fields = ", ".join(f"{f.name}={getattr(case, f.name)!r}" for f in dataclasses.fields(Case)
                       if getattr(case, f.name) != f.default or f.name in ("kind", "dtype", "seed"))
    return (f"{head}\n{env}from qwen3vl_flash.testing.fuzz import Case, check_case\n"
            f"case = Case({fields})\n"
            f"check_case(case, backend={backend!r})  # raises: {failure[:300]}")


# --------------------------------------------------------------------------------------------
# malformed calls
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadClass:
    """One kind of defect. ``mutate(args, rng, case)`` edits a valid call's ``args`` in place and
    returns the argument names the error message may name (a regex each), or None when the class
    does not apply to this call."""

    name: str
    kinds: Tuple[str, ...]
    mutate: Callable


_TENSORS = {"dense": ("q", "k", "v"), "varlen": ("q", "k", "v"),
            "kvcache": ("q", "k_cache", "v_cache", "k", "v")}
_ALL = ("dense", "varlen", "kvcache")


def _pick_tensor(args, rng, case, exclude=()):
    names = [n for n in _TENSORS[case.kind] if args.get(n) is not None and n not in exclude]
    return rng.choice(names) if names else None


def _m_rank(args, rng, case):
    n = _pick_tensor(args, rng, case)
    x = args[n]
    args[n] = x.unsqueeze(0) if rng.random() < 0.5 or x.dim() < 2 or x.shape[0] == 0 else x[0]
    return [n]


def _m_not_tensor(args, rng, case):
    n = _pick_tensor(args, rng, case)
    x = args[n].detach()
    args[n] = x.float().numpy() if rng.random() < 0.5 and x.dtype != torch.bfloat16 else x.tolist()
    return [n]


def _m_int_dtype(args, rng, case):
    n = _pick_tensor(args, rng, case)
    args[n] = args[n].detach().to(rng.choice((torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64)))
    return [n]


def _m_dtype_mismatch(args, rng, case):
    n = _pick_tensor(args, rng, case, exclude=("q",))
    if n is None:
        return None
    other = [d for d in _DTYPES.values() if d != args[n].dtype]
    args[n] = args[n].detach().to(rng.choice(other))
    return [n]


def _m_device(args, rng, case):
    n = _pick_tensor(args, rng, case)
    args[n] = torch.empty_like(args[n], device="meta")
    return [n, "q"] if n == "q" else [n]  # q elsewhere: the first other tensor is named


def _m_batch(args, rng, case):
    if case.kind == "dense":
        n = rng.choice(("k", "v"))
    elif case.kind == "kvcache" and not case.page_size:
        n = rng.choice(("k_cache", "k", "q")) if args["k"] is not None else rng.choice(("k_cache", "q"))
    elif case.kind == "kvcache" and args["k"] is not None:
        n = "k"
    else:
        return None
    x = args[n]
    args[n] = torch.cat([x.detach(), x.detach()[:1]]) if rng.random() < 0.5 or x.shape[0] < 2 else x.detach()[1:]
    if n == "q":
        return ["k_cache", "q", "block_table"]
    if n == "k_cache":
        args["v_cache"] = torch.cat([args["v_cache"], args["v_cache"][:1]]) if args[n].shape[0] > case.B else \
            args["v_cache"][1:]
        return ["k_cache"]
    return [n, "k", "v"]


def _m_kv_length(args, rng, case):
    if case.kind == "kvcache":
        if args["k"] is not None and rng.random() < 0.5:
            v = args["v"]
            args["v"] = torch.cat([v, torch.zeros_like(v[:, :1]) if v.shape[1] else v.new_zeros(
                (v.shape[0], 1) + tuple(v.shape[2:]))], 1)  # Snew may be 0
            return ["v"]
        args["v_cache"] = torch.cat([args["v_cache"], args["v_cache"][:, :1]], 1)
        return ["v_cache"]
    x = args["v"].detach()
    dim = 1 if case.kind == "dense" else 0
    one = torch.zeros([1 if i == dim else s for i, s in enumerate(x.shape)], dtype=x.dtype, device=x.device)
    args["v"] = torch.cat([x, one], dim)
    return ["v"]


def _m_head_dim(args, rng, case):
    n = _pick_tensor(args, rng, case, exclude=("q",))
    if n is None:
        return None
    x = args[n].detach()
    args[n] = torch.cat([x, x[..., :1]], -1) if rng.random() < 0.5 or x.shape[-1] < 2 else x[..., :-1]
    return [n, "head_dim"]


def _m_kv_heads(args, rng, case):
    n = "v" if case.kind != "kvcache" else rng.choice(("v_cache", "v") if args["v"] is not None else ("v_cache",))
    x = args[n].detach()
    args[n] = torch.cat([x, x[..., :1, :]], -2)
    return [n]


def _m_gqa(args, rng, case):
    x = args["q"].detach()
    H, Hkv = case.H, case.Hkv
    if Hkv >= 2:
        args["q"] = torch.cat([x, x[..., :1, :]], -2)  # H + 1 is not a multiple of Hkv
    else:  # Hkv = H + 1 kv heads: H is not a multiple
        names = ("k", "v") if case.kind != "kvcache" else ("k_cache", "v_cache", "k", "v")
        for n in names:
            if args.get(n) is not None:
                args[n] = torch.cat([args[n].detach()] * (H + 1), -2)
    return ["q", "k", "num_kv_heads", "k_cache"]


def _m_zero_kv_heads(args, rng, case):
    for n in _TENSORS[case.kind][1:]:
        if args.get(n) is not None:
            args[n] = args[n].detach()[..., :0, :]
    return ["num_kv_heads", "k", "k_cache"]


def _m_head_dim_range(args, rng, case):
    D = 0 if rng.random() < 0.4 else rng.randint(257, 320)
    for n in _TENSORS[case.kind]:
        x = args.get(n)
        if x is not None:
            args[n] = torch.zeros(tuple(x.shape[:-1]) + (D,), dtype=x.dtype, device=x.device)
    return ["head_dim"]


def _m_window_low(args, rng, case):
    w = [rng.randint(-1, 8), rng.randint(-1, 8)]
    w[rng.randrange(2)] = rng.choice((-2, -3, -100))
    args["window_size"] = tuple(w)
    return ["window_size"]


def _m_window_type(args, rng, case):
    args["window_size"] = rng.choice((5, None, (1, 2, 3), (1,), "ab", (1.5, 0), (0, 2.5), (True, 0),
                                      (0, False), ("3", 0), (0, None), {1: 2}))
    return ["window_size"]


def _m_flag(args, rng, case):
    n = rng.choice(("causal", "return_lse"))
    args[n] = rng.choice((1, 0, "yes", None, 1.0, torch.tensor(True)))
    return [n]


def _m_scale(args, rng, case):
    args["softmax_scale"] = rng.choice(("0.1", float("nan"), float("inf"), float("-inf"), True, 1j,
                                        torch.tensor(0.125), [0.1]))
    return ["softmax_scale"]


def _m_backend(args, rng, case):
    args["backend"] = rng.choice(("flash3", "", "TILED", None, 3, ("tiled",)))
    return ["backend"]


def _m_backend_cannot_serve(args, rng, case):
    from ..backends.base import AttnRequest, available_backends, get_backend

    req = AttnRequest(device_type=args["q"].device.type, dtype=args["q"].dtype, head_dim=case.D, num_heads=case.H,
                      num_kv_heads=case.Hkv, seqlen_q=1, seqlen_k=1)
    refusing = [n for n in available_backends() if get_backend(n).check(req) is not None]
    q, k = args["q"], args.get("k", args.get("k_cache"))
    if not refusing or (case.kind != "kvcache" and (q.numel() == 0 or k.numel() == 0)):
        return None  # a call with no query or no key returns before any backend is chosen
    args["backend"] = rng.choice(refusing)
    return ["backend"]


def _cu_name(rng):
    return rng.choice(("cu_seqlens_q", "cu_seqlens_k"))


def _m_cu_dtype(args, rng, case):
    n = _cu_name(rng)
    args[n] = args[n].to(rng.choice((torch.int64, torch.int16, torch.float32, torch.uint8)))
    return [n]


def _m_cu_not_tensor(args, rng, case):
    n = _cu_name(rng)
    args[n] = rng.choice((lambda t: t.tolist(), lambda t: tuple(t.tolist()), lambda t: t.numpy()))(args[n])
    return [n]


def _m_cu_shape(args, rng, case):
    n = _cu_name(rng)
    t = args[n]
    args[n] = rng.choice((t.reshape(1, -1), t[:1], t[:0], t[0]))
    return [n]


def _m_cu_start(args, rng, case):
    n = _cu_name(rng)
    args[n] = args[n] + rng.choice((1, 2, -1))
    return [n]


def _m_cu_unsorted(args, rng, case):
    n = _cu_name(rng)
    vals = args[n].tolist()
    total = vals[-1]
    if len(vals) > 2:
        vals[rng.randint(1, len(vals) - 2)] = total + rng.randint(1, 5)
    else:
        vals = [0, total + rng.randint(1, 5), total]
    args[n] = torch.tensor(vals, dtype=torch.int32, device=args[n].device)
    return [n]


def _m_cu_range(args, rng, case):
    n = _cu_name(rng)
    vals = args[n].tolist()
    if vals[-1] > vals[-2] and rng.random() < 0.5:
        vals[-1] -= 1
    else:
        vals[-1] += rng.randint(1, 5)
    args[n] = torch.tensor(vals, dtype=torch.int32, device=args[n].device)
    return [n]


def _m_max_small(args, rng, case):
    n = rng.choice(("max_seqlen_q", "max_seqlen_k"))
    longest = max(case.lens_q if n.endswith("q") else case.lens_k)
    if longest == 0:
        return None
    args[n] = longest - rng.randint(1, longest)
    return [n]


def _m_max_type(args, rng, case):
    n = rng.choice(("max_seqlen_q", "max_seqlen_k"))
    args[n] = rng.choice((-1, -5, float(args[n]), None, True, torch.tensor(args[n]), "8"))
    return [n]


def _m_cu_count(args, rng, case):
    n = _cu_name(rng)
    t = args[n]
    args[n] = torch.cat([t, t[-1:]])  # one more (empty) sequence in one of the two
    return ["cu_seqlens_q", "cu_seqlens_k"]


def _m_index_strided(args, rng, case):
    """cu_seqlens / cache_leftpad as a strided view: the Triton kernels read them as plain arrays."""
    if case.kind == "varlen":
        n = _cu_name(rng)
    elif args.get("cache_leftpad") is not None and case.B > 1:
        n = "cache_leftpad"
    else:
        return None
    args[n] = _strided(args[n])
    return [n]


def _m_cu_device(args, rng, case):
    n = _cu_name(rng)
    args[n] = torch.empty_like(args[n], device="meta")
    return [n]


def _m_varlen_tokens(args, rng, case):
    x = args["v"].detach()
    args["v"] = torch.cat([x, torch.zeros_like(x[:1]) if x.shape[0] else torch.zeros((1,) + tuple(x.shape[1:]),
                                                                                       dtype=x.dtype)])
    return ["v"]


def _m_overflow(args, rng, case):
    if case.seqlens_as == "none" and args["k"] is None:
        return None
    snew = args["k"].shape[1] if args["k"] is not None else 0
    bad = case.Smax - snew + rng.randint(1, 5)
    if case.seqlens_as == "int" or rng.random() < 0.2:
        args["cache_seqlens"] = bad
    else:
        vals = list(case.cache_seqlens)
        vals[rng.randrange(case.B)] = bad
        args["cache_seqlens"] = torch.tensor(vals, dtype=torch.int32, device=args["q"].device)
    if args.get("cache_leftpad") is not None:
        args["cache_leftpad"] = torch.zeros_like(args["cache_leftpad"])
    return ["cache_seqlens"]


def _m_negative_len(args, rng, case):
    vals = list(case.cache_seqlens)
    vals[rng.randrange(case.B)] = -rng.randint(1, 10)
    args["cache_seqlens"] = torch.tensor(vals, dtype=torch.int32, device=args["q"].device)
    if args.get("cache_leftpad") is not None:
        args["cache_leftpad"] = torch.zeros_like(args["cache_leftpad"])
    return ["cache_seqlens"]


def _m_seqlens_malformed(args, rng, case):
    vals = list(case.cache_seqlens)
    dev = args["q"].device
    args["cache_seqlens"] = rng.choice((
        lambda: torch.tensor(vals, dtype=torch.int64, device=dev),
        lambda: torch.tensor(vals, dtype=torch.float32, device=dev),
        lambda: torch.tensor(vals + [0], dtype=torch.int32, device=dev),
        lambda: torch.tensor([vals], dtype=torch.int32, device=dev),
        lambda: torch.empty(case.B, dtype=torch.int32, device="meta"),
        lambda: float(vals[0]),
        lambda: list(vals),
        lambda: True,
    ))()
    return ["cache_seqlens"]


def _m_k_without_v(args, rng, case):
    if args["k"] is None:
        args["k"] = torch.zeros((case.B, 1, case.Hkv, case.D), dtype=args["q"].dtype)
    else:
        args[rng.choice(("k", "v"))] = None
    return ["k", "v"]


def _m_append_no_seqlens(args, rng, case):
    if args["k"] is None:
        return None
    args["cache_seqlens"] = None
    return ["cache_seqlens"]


def _m_new_kv_shape(args, rng, case):
    if args["k"] is None:
        return None
    n = rng.choice(("k", "v"))
    x = args[n].detach()
    args[n] = rng.choice((lambda: torch.cat([x, x[:, :, :1]], 2), lambda: torch.cat([x, x[..., :1]], -1),
                          lambda: torch.cat([x, x[:1]], 0)))()
    return [n]


def _m_cache_shape(args, rng, case):
    n = rng.choice(("k_cache", "v_cache"))
    x = args[n].detach()
    args[n] = torch.cat([x, x[:, :1]], 1)
    return ["v_cache", "k_cache"]


def _m_table_malformed(args, rng, case):
    if args.get("block_table") is None:
        return None
    t = args["block_table"]
    args["block_table"] = rng.choice((lambda: t.long(), lambda: t.float(), lambda: t[0], lambda: t[None],
                                      lambda: torch.cat([t, t[:1]]), lambda: t.tolist(),
                                      lambda: torch.empty_like(t, device="meta")))()
    return ["block_table"]


def _m_table_pages(args, rng, case):
    if args.get("block_table") is None:
        return None
    t = args["block_table"].clone()
    b = rng.randrange(case.B)
    used = -(-(case.cache_seqlens[b] + case.snew) // case.page_size)
    if used == 0:
        return None
    t[b, rng.randrange(used)] = case.num_pages + rng.randint(0, 3) if rng.random() < 0.5 else -rng.randint(1, 3)
    args["block_table"] = t
    return ["block_table"]


def _m_leftpad(args, rng, case):
    dev = args["q"].device
    vals = list(case.leftpad) if case.leftpad is not None else [0] * case.B
    if case.page_size:
        args["cache_leftpad"] = torch.zeros(case.B, dtype=torch.int32, device=dev)
        return ["cache_leftpad"]
    neg = list(vals)
    neg[rng.randrange(case.B)] = -rng.randint(1, 5)
    args["cache_leftpad"] = rng.choice((
        lambda: torch.tensor(vals, dtype=torch.int64, device=dev),
        lambda: torch.tensor(vals + [0], dtype=torch.int32, device=dev),
        lambda: torch.empty(case.B, dtype=torch.int32, device="meta"),
        lambda: torch.tensor(neg, dtype=torch.int32, device=dev),
        lambda: list(vals),
    ))()
    return ["cache_leftpad"]


def _m_overlapping_cache(args, rng, case):
    """Appending into a cache whose rows overlap in memory (a broadcast view, or k_cache is
    v_cache) would write one memory location for several cache entries."""
    if args["k"] is None or args["k"].shape[1] == 0:
        return None
    n = rng.choice(("k_cache", "v_cache"))
    x = args[n]
    if rng.random() < 0.5 or x.shape[:2] == (1, 1):
        other = "v_cache" if n == "k_cache" else "k_cache"
        args[n] = args[other]
        return ["k_cache", "v_cache"]
    args[n] = x[:, :1].expand(x.shape) if x.shape[1] > 1 else x[:1].expand(x.shape)
    return [n]


BAD_CLASSES: Tuple[BadClass, ...] = (
    BadClass("wrong-rank", _ALL, _m_rank),
    BadClass("not-a-tensor", _ALL, _m_not_tensor),
    BadClass("non-float-dtype", _ALL, _m_int_dtype),
    BadClass("dtype-mismatch", _ALL, _m_dtype_mismatch),
    BadClass("device-mismatch", _ALL, _m_device),
    BadClass("batch-mismatch", ("dense", "kvcache"), _m_batch),
    BadClass("kv-length-mismatch", _ALL, _m_kv_length),
    BadClass("head-dim-mismatch", _ALL, _m_head_dim),
    BadClass("kv-heads-mismatch", _ALL, _m_kv_heads),
    BadClass("heads-not-divisible", _ALL, _m_gqa),
    BadClass("zero-kv-heads", _ALL, _m_zero_kv_heads),
    BadClass("head-dim-0-or-over-256", _ALL, _m_head_dim_range),
    BadClass("window-below-minus-one", _ALL, _m_window_low),
    BadClass("window-not-an-int-pair", _ALL, _m_window_type),
    BadClass("flag-not-bool", _ALL, _m_flag),
    BadClass("bad-softmax-scale", _ALL, _m_scale),
    BadClass("bad-backend-name", _ALL, _m_backend),
    BadClass("backend-cannot-serve", _ALL, _m_backend_cannot_serve),
    BadClass("cu_seqlens-not-int32", ("varlen",), _m_cu_dtype),
    BadClass("cu_seqlens-not-a-tensor", ("varlen",), _m_cu_not_tensor),
    BadClass("cu_seqlens-bad-shape", ("varlen",), _m_cu_shape),
    BadClass("cu_seqlens-not-from-0", ("varlen",), _m_cu_start),
    BadClass("cu_seqlens-unsorted", ("varlen",), _m_cu_unsorted),
    BadClass("cu_seqlens-out-of-range", ("varlen",), _m_cu_range),
    BadClass("max_seqlen-too-small", ("varlen",), _m_max_small),
    BadClass("max_seqlen-bad-value", ("varlen",), _m_max_type),
    BadClass("segment-count-mismatch", ("varlen",), _m_cu_count),
    BadClass("cu_seqlens-device", ("varlen",), _m_cu_device),
    BadClass("index-tensor-not-contiguous", ("varlen", "kvcache"), _m_index_strided),
    BadClass("varlen-token-mismatch", ("varlen",), _m_varlen_tokens),
    BadClass("cache-overflow", ("kvcache",), _m_overflow),
    BadClass("negative-cache-seqlens", ("kvcache",), _m_negative_len),
    BadClass("cache_seqlens-malformed", ("kvcache",), _m_seqlens_malformed),
    BadClass("k-without-v", ("kvcache",), _m_k_without_v),
    BadClass("append-without-cache_seqlens", ("kvcache",), _m_append_no_seqlens),
    BadClass("new-kv-shape", ("kvcache",), _m_new_kv_shape),
    BadClass("cache-shape-mismatch", ("kvcache",), _m_cache_shape),
    BadClass("block_table-malformed", ("kvcache",), _m_table_malformed),
    BadClass("block_table-bad-page", ("kvcache",), _m_table_pages),
    BadClass("cache_leftpad-bad", ("kvcache",), _m_leftpad),
    BadClass("overlapping-cache-append", ("kvcache",), _m_overlapping_cache),
)
_BAD_BY_NAME = {c.name: c for c in BAD_CLASSES}


def draw_bad(rng: random.Random, dtypes: Sequence[str], max_elems: int = 4096) -> Tuple[Case, str]:
    """A small valid case and a defect class that applies to its kind."""
    cls = rng.choice(BAD_CLASSES)
    case = draw_case(rng, dtypes, kinds=cls.kinds, max_elems=max_elems, tiles=False)
    return dataclasses.replace(case, backward=False), cls.name


def check_bad(case: Case, cls_name: str, backend: str = "auto", device="cpu") -> Optional[str]:
    """Apply the defect ``cls_name`` to ``case`` (drawn from the case's seed) and check that the call
    raises ValueError/TypeError naming the argument with nothing modified. Returns the error
    message, or None when the class does not apply to this case; raises :class:`CaseFailure`."""
    cls = _BAD_BY_NAME[cls_name]
    inp = _build(case, device, requires_grad=False)
    args = dict(inp.args, backend=backend)
    rng = random.Random(case.seed ^ 0x5EED)
    names = cls.mutate(args, rng, case)
    if names is None:
        return None
    snap = _snapshot(args, inp.buffers)
    try:
        inp.fn(**args)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if not any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names):
            raise CaseFailure("message",
                              f"{cls_name}: {type(e).__name__} does not name any of {names}: {msg!r}") from None
        try:
            _check_unchanged(snap)
        except CaseFailure as f:
            raise CaseFailure("input modified", f"{cls_name}: {f.message} ({msg!r})") from None
        return f"{type(e).__name__}: {msg}"
    except Exception as e:
        raise CaseFailure(f"exception {type(e).__name__}",
                          f"{cls_name}: raised {type(e).__name__} instead of ValueError/TypeError: {e}") from e
    raise CaseFailure("accepted", f"{cls_name}: the malformed call was accepted (expected an error naming {names})")


# --------------------------------------------------------------------------------------------
# NaN / Inf isolation
# --------------------------------------------------------------------------------------------


def check_nan_isolation(backend: str, rng: random.Random, kind: str = "dense", value: float = float("nan"),
                        where: str = "q", dtype: str = "float32", device="cpu") -> dict:
    """Plant ``value`` in one element of ``where`` (q, k or v) of one batch element (varlen: one
    segment) and one head; everything outside that batch element / segment and the heads that
    read it (query head h; kv head hk and its query heads) must equal the clean run bit for bit,
    outputs and gradients. kvcache: the value goes into a cache slot no row attends (past a row's
    length, or before its left padding): nothing may change at all. Returns what happened inside
    the region (for the docs): ``{"row": ..., "lse": ..., "other_rows": ...}``."""
    import qwen3vl_flash as qf

    dt = _DTYPES[dtype]
    Hkv = rng.choice((2, 3))
    g = rng.choice((1, 2, 4))
    H, D = Hkv * g, rng.choice((16, 64, 72))
    causal = rng.random() < 0.5
    gen = torch.Generator().manual_seed(rng.getrandbits(32))

    def rnd(*shape):
        return torch.randn(shape, generator=gen).to(dt).to(device)

    if kind == "kvcache":
        B, Smax = 3, rng.randint(20, 80)
        q, kc, vc = rnd(B, 1, H, D), rnd(B, Smax, Hkv, D), rnd(B, Smax, Hkv, D)
        lens = [rng.randint(1, Smax - 2) for _ in range(B)]
        pad = [rng.randint(0, L - 1) for L in lens]
        b = rng.randrange(B)
        slot = rng.choice([j for j in range(Smax) if j >= lens[b] + 1 or j < pad[b]])
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        leftpad = torch.tensor(pad, dtype=torch.int32, device=device)
        k1, v1 = rnd(B, 1, Hkv, D), rnd(B, 1, Hkv, D)
        outs = []
        for poison in (False, True):
            kcc, vcc = kc.clone(), vc.clone()
            if poison:
                (kcc if where != "v" else vcc)[b, slot, rng.randrange(Hkv), rng.randrange(D)] = value
            outs.append(qf.flash_attn_with_kvcache(q, kcc, vcc, k1, v1, seqlens, causal=causal, return_lse=True,
                                                   cache_leftpad=leftpad, backend=backend))
        for a, c in zip(outs[0], outs[1]):
            if not _same_bits(a, c):
                raise CaseFailure("nan leak", f"{value} in an unattended cache slot ({where}_cache[{b}, {slot}]) "
                                              f"changed the output ({backend}, {dtype})")
        return {}
    if kind == "dense":
        B, Sq, Sk = 3, rng.randint(1, 40), rng.randint(1, 40)
        q, k, v = rnd(B, Sq, H, D), rnd(B, Sk, Hkv, D), rnd(B, Sk, Hkv, D)
        b = rng.randrange(B)
        i = rng.randrange(Sq if where == "q" else Sk)
        q_rows = k_rows = (slice(b, b + 1),)
        def call(q_, k_, v_):
            return qf.flash_attn_func(q_, k_, v_, causal=causal, return_lse=True, backend=backend)

        pos = (b, i)
    else:
        N = 3
        lq = [rng.randint(1, 30) for _ in range(N)]
        lk = [rng.randint(1, 30) for _ in range(N)]
        cq = torch.tensor([0] + [sum(lq[: j + 1]) for j in range(N)], dtype=torch.int32, device=device)
        ck = torch.tensor([0] + [sum(lk[: j + 1]) for j in range(N)], dtype=torch.int32, device=device)
        q, k, v = rnd(sum(lq), H, D), rnd(sum(lk), Hkv, D), rnd(sum(lk), Hkv, D)
        s = rng.randrange(N)
        cqs, cks = cq.tolist(), ck.tolist()
        i = rng.randrange(cqs[s], cqs[s + 1]) if where == "q" else rng.randrange(cks[s], cks[s + 1])
        q_rows, k_rows = (slice(cqs[s], cqs[s + 1]),), (slice(cks[s], cks[s + 1]),)
        def call(q_, k_, v_):
            return qf.flash_attn_varlen_func(q_, k_, v_, cq, ck, max(lq), max(lk), causal=causal, return_lse=True,
                                             backend=backend)

        pos = (i,)
    h = rng.randrange(H if where == "q" else Hkv)
    hk = h // g if where == "q" else h
    qh = slice(h, h + 1) if where == "q" else slice(hk * g, (hk + 1) * g)  # query heads that read the value
    res = []
    for poison in (False, True):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if poison:
            with torch.no_grad():
                x["qkv".index(where)][pos + (h, rng.randrange(D))] = value
        out, lse = call(*x)
        dout = torch.ones_like(out)
        res.append((out.detach(), lse, *torch.autograd.grad(out, x, dout)))
    clean, bad = res
    # allowed regions: out/dq rows of the batch element or segment, query heads qh; dk/dv rows there, kv head hk
    lse_q = (slice(b, b + 1), qh) if kind == "dense" else (qh, q_rows[0])
    allowed = [(*q_rows, slice(None), qh) if kind == "dense" else (*q_rows, qh), lse_q,
               (*q_rows, slice(None), qh) if kind == "dense" else (*q_rows, qh),
               (*k_rows, slice(None), slice(hk, hk + 1)) if kind == "dense" else (*k_rows, slice(hk, hk + 1)),
               (*k_rows, slice(None), slice(hk, hk + 1)) if kind == "dense" else (*k_rows, slice(hk, hk + 1))]
    names = ("out", "lse", "dq", "dk", "dv")
    for name, c, p, region in zip(names, clean, bad, allowed):
        mask = torch.ones(c.shape, dtype=torch.bool, device=c.device)
        mask[region] = False
        if not _same_bits(c[mask], p[mask]):
            raise CaseFailure("nan leak", f"{value} in {where} ({kind}, {backend}, {dtype}) changed {name} outside "
                                          f"its batch element / segment and heads")
    out_region = bad[0][allowed[0]]
    return {"row_nan": bool(torch.isnan(out_region).any()), "lse_nan": bool(torch.isnan(bad[1][lse_q]).any()),
            "all_region_nan": bool(torch.isnan(out_region).all())}


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


def check_determinism(backend: str, runs: int = 20, seed: int = 0, dtype: str = "float32", device="cpu",
                      size: Tuple[int, int, int, int, int, int] = (2, 67, 93, 8, 2, 72)) -> int:
    """Forward and backward ``runs`` times on the same inputs, ``size`` = (B, Sq, Sk, H, Hkv, D):
    dense GQA causal with a window, and varlen (the same tokens packed into 4 segments, one empty);
    every run must equal the first bit for bit. Returns the number of runs compared."""
    import qwen3vl_flash as qf

    B, Sq, Sk, H, Hkv, D = size
    dt = _DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn((B, Sq, H, D), generator=gen).to(dt).to(device)
    k, v = (torch.randn((B, Sk, Hkv, D), generator=gen).to(dt).to(device) for _ in range(2))

    def cuts(total):  # 4 segments, the second one empty
        a, b = sorted(torch.randint(0, total + 1, (2,), generator=gen).tolist())
        return torch.tensor([0, a, a, b, total], dtype=torch.int32, device=device)

    cq, ck = cuts(B * Sq), cuts(B * Sk)
    mq, mk = int((cq[1:] - cq[:-1]).max()), int((ck[1:] - ck[:-1]).max())
    calls = {
        "dense": lambda a, b, c: qf.flash_attn_func(a, b, c, causal=True, window_size=(Sk // 2, 3), backend=backend),
        "varlen": lambda a, b, c: qf.flash_attn_varlen_func(a.flatten(0, 1), b.flatten(0, 1), c.flatten(0, 1), cq, ck,
                                                            mq, mk, backend=backend),
    }
    for name, call in calls.items():
        first = dout = None
        for r in range(runs):
            x = [t.clone().requires_grad_(True) for t in (q, k, v)]
            out = call(*x)
            if dout is None:
                dout = torch.randn(out.shape, generator=gen).to(dt).to(device)
            got = (out.detach(), *torch.autograd.grad(out, x, dout))
            if first is None:
                first = got
            elif not all(_same_bits(a, b) for a, b in zip(first, got)):
                raise CaseFailure("nondeterministic", f"{backend} {name} {dtype}: run {r} differs from run 0")
    return runs


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


def case_seed(run_seed: int, index: int) -> int:
    return (run_seed * 1_000_003 + index * 7_919 + 12_345) % (2**61 - 1)


def run(backend: str, cases: int, seed: int, dtypes: Optional[Sequence[str]] = None,
        kinds: Sequence[str] = ("dense", "varlen", "kvcache"), max_elems: Optional[int] = None, start: int = 0,
        bad: bool = False, device="cpu", do_shrink: bool = True, max_failures: int = 5, progress: bool = True,
        time_limit: Optional[float] = None, out=sys.stdout, shrink_first: int = 5) -> dict:
    """Run ``cases`` random cases (valid calls, or malformed ones with ``bad``) on ``backend``; case
    i draws from ``case_seed(seed, i)``. Stops after ``max_failures`` failures or ``time_limit``
    seconds; only the first ``shrink_first`` failures are shrunk. Returns a summary dict (counts per
    kind-dtype / class, failures with their snippets)."""
    _gpu_rounding_under_interpreter(backend)
    dtypes = list(dtypes) if dtypes else backend_dtypes(backend, device)
    if not dtypes:
        raise ValueError(f"backend={backend!r} takes none of the float dtypes on {device}")
    if max_elems is None:
        max_elems = TRITON_CPU_MAX_ELEMS if backend == "triton" and device == "cpu" else DEFAULT_MAX_ELEMS
    bar = _progress(cases, f"fuzz {backend}{' bad' if bad else ''}", progress)
    counts: Dict[str, int] = {}
    failures = []
    t0 = time.time()
    done = 0
    for idx in range(start, start + cases):
        if time_limit is not None and time.time() - t0 > time_limit:
            break
        rng = random.Random(case_seed(seed, idx))
        if bad:
            case, cls = draw_bad(rng, dtypes, min(max_elems, 4096))
            label = cls
        else:
            case, cls = draw_case(rng, dtypes, kinds, max_elems, tiles=backend in ("tiled", "auto")), None
            label = f"{case.kind}-{case.dtype}"
        try:
            if bad:
                if check_bad(case, cls, backend, device) is None:
                    label = f"{cls} (n/a)"
            else:
                check_case(case, backend, device)
        except CaseFailure as f:
            small, msg = (case, f.message)
            fatal = device != "cpu" and _lost_device(f.message)
            if do_shrink and not bad and len(failures) < shrink_first and not fatal:
                small, smsg = shrink(case, backend, f.what, device)
                msg = smsg or msg
            snip = (snippet(small, backend, msg, seed, idx) if not bad else
                    f"# python -m qwen3vl_flash.testing.fuzz --backend {backend} --bad 1 --seed {seed} --start {idx}\n"
                    f"from qwen3vl_flash.testing.fuzz import Case, check_bad\ncase = {case!r}\n"
                    f"check_bad(case, {cls!r}, backend={backend!r})  # {msg[:300]}")
            failures.append({"index": idx, "what": f.what, "message": f.message, "snippet": snip})
            print(f"\nFAIL case {idx} [{f.what}] {f.message}\n{snip}\n", file=out, flush=True)
            if fatal:  # the CUDA context is lost: every later call here would fail too, and mislead
                print(f"fuzz: stopping after case {idx}: {f.message.splitlines()[0][:160]} leaves this process's "
                      f"CUDA context unusable (not shrunk: every call fails now). Run this case alone with the "
                      f"snippet above; go on with --start {idx + 1} in a new process.", file=out, flush=True)
                counts[label] = counts.get(label, 0) + 1
                done += 1
                break
            if len(failures) >= max_failures:
                counts[label] = counts.get(label, 0) + 1
                done += 1
                break
        counts[label] = counts.get(label, 0) + 1
        done += 1
        bar.update(1)
    bar.close()
    summary = {"backend": backend, "seed": seed, "start": start, "cases": done, "failures": len(failures),
               "seconds": round(time.time() - t0, 1), "dtypes": dtypes, "bad": bad, "counts": counts,
               "failed": failures}
    print(f"fuzz backend={backend} seed={seed} start={start} cases={done} failures={len(failures)} "
          f"({summary['seconds']} s)", file=out, flush=True)
    return summary


_STICKY_DEVICE_ERRORS = ("illegal memory access", "illegal instruction", "unspecified launch failure",
                         "misaligned address", "device-side assert")


def _lost_device(message: str) -> bool:
    """Whether an error message is one of CUDA's sticky errors, after which every call in the
    process fails (so neither shrinking nor the next cases can run here)."""
    text = message.lower()
    return any(s in text for s in _STICKY_DEVICE_ERRORS)


def _run_nan(backend: str, cases: int, seed: int, dtypes, device, start: int = 0) -> int:
    """``cases`` NaN/Inf isolation draws (kind, value, tensor and dtype at random)."""
    dtypes = [d for d in (dtypes or backend_dtypes(backend, device)) if d != "float16"] or ["float32"]
    seen: Dict[tuple, int] = {}
    fails = 0
    for idx in range(start, start + cases):
        rng = random.Random(case_seed(seed, idx))
        kind, where = rng.choice(("dense", "varlen", "kvcache")), rng.choice("qkv")
        value, dt = rng.choice((float("nan"), float("inf"), float("-inf"))), rng.choice(dtypes)
        try:
            got = check_nan_isolation(backend, rng, kind, value, where, dt, device)
        except CaseFailure as f:
            fails += 1
            print(f"FAIL nan case {idx}: {f.message} (--nan --seed {seed} --start {idx})", flush=True)
            continue
        key = (kind, where, str(value), tuple(sorted(got.items())))
        seen[key] = seen.get(key, 0) + 1
    for key, n in sorted(seen.items()):
        print(f"  {n:5d}  {key}")
    print(f"nan isolation backend={backend} seed={seed} cases={cases} failures={fails}", flush=True)
    return 1 if fails else 0


class _Bar:
    def __init__(self, total, desc, every=50):
        self.n, self.total, self.desc, self.every, self.t0 = 0, total, desc, every, time.time()

    def update(self, k):
        self.n += k
        if self.n % self.every == 0:
            print(f"{self.desc}: {self.n}/{self.total} ({time.time() - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total, desc, enabled):
    if not enabled:
        return _Bar(total, desc, every=10**12)
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, mininterval=1.0, file=sys.stderr)
    except ImportError:  # optional: a plain line every 50 cases
        return _Bar(total, desc)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m qwen3vl_flash.testing.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", help="tiled, sdpa, eager, triton, cudnn or auto (default)")
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--seed", type=int, default=None, help="run seed (default: fresh from os.urandom, printed)")
    p.add_argument("--start", type=int, default=0, help="index of the first case (repeat case i: --start i --cases 1)")
    p.add_argument("--dtype", default=None, help="comma-separated dtypes (default: every dtype the backend takes)")
    p.add_argument("--kinds", default="dense,varlen,kvcache")
    p.add_argument("--max-elems", type=int, default=None,
                   help=f"cap on a case's elements (default {DEFAULT_MAX_ELEMS}; "
                        f"{TRITON_CPU_MAX_ELEMS} for triton on CPU)")
    p.add_argument("--bad", action="store_true", help="malformed calls instead of valid ones")
    p.add_argument("--nan", action="store_true", help="NaN/Inf isolation draws instead of valid calls")
    p.add_argument("--determinism", type=int, default=0, metavar="RUNS",
                   help="only check that RUNS forward+backward runs are bitwise equal (each dtype)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-shrink", action="store_true")
    p.add_argument("--max-failures", type=int, default=5, help="stop after this many failures")
    p.add_argument("--shrink-first", type=int, default=5, help="shrink only the first N failures")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--json", default=None, help="append the summary as one JSON line to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if (args.backend == "triton" and args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
            and argv is None):
        # the interpreter must be chosen before triton is imported (torch imports it): start again
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "qwen3vl_flash.testing.fuzz", *sys.argv[1:]], env)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"fuzz seed {seed} (reproduce: --seed {seed})", flush=True)
    dtypes = args.dtype.split(",") if args.dtype else None
    if args.determinism:
        for dt in dtypes or backend_dtypes(args.backend, args.device):
            check_determinism(args.backend, args.determinism, seed, dt, args.device)
            print(f"determinism backend={args.backend} {dt}: {args.determinism} runs bitwise equal", flush=True)
        return 0
    if args.nan:
        return _run_nan(args.backend, args.cases, seed, dtypes, args.device, args.start)
    summary = run(args.backend, args.cases, seed, dtypes, tuple(args.kinds.split(",")), args.max_elems, args.start,
                  args.bad, args.device, not args.no_shrink, args.max_failures, not args.quiet, args.time_limit,
                  shrink_first=args.shrink_first)
    if args.json:
        import json

        with open(args.json, "a") as f:
            f.write(json.dumps({k: v for k, v in summary.items() if k != "failed"} |
                               {"failed": [{k: v for k, v in x.items()} for x in summary["failed"]],
                                "date": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
