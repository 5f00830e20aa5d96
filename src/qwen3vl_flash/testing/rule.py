"""The one comparison rule (DESIGN.md section 4, flash-attn style), shared by the test suite and
the fuzzer (:mod:`qwen3vl_flash.testing.fuzz`)::

    max|out - ref| <= factor * max|out_lowprec - ref| + rounding_slack + atol

with ``ref`` computed by :mod:`qwen3vl_flash.reference` in float64 and ``out_lowprec`` the same
reference computed in the input dtype (``upcast=False``): "PyTorch's own low-precision error".
``factor`` is 2 for outputs and lse, 3 for gradients. ``rounding_slack`` is flash-attn's own slack
for 16-bit results, twice the rounding error at the output's magnitude (``2 * max|(r + 0.3 - 0.3) -
r|`` with ``r`` the reference rounded to the result's dtype); float32/float64 results get one ulp
of their largest value. ``atol`` is :data:`ATOL` (outputs), :data:`LSE_ATOL` or :data:`GRAD_ATOL`.

A violation raises :class:`RuleViolation` (an ``AssertionError``, so pytest reports it as a
failed assertion; raised explicitly, so ``python -O`` does not strip the checks).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..reference import attention_ref, attention_ref_varlen

__all__ = [
    "RuleViolation",
    "LOW_PRECISION",
    "ATOL",
    "LSE_ATOL",
    "GRAD_ATOL",
    "rounding_slack",
    "assert_close_to_ref",
    "atol_for",
    "reference_triplet",
    "check_against_reference",
    "grad_magnitude",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)
# small absolute slack on top of the 2x/3x rule for float32/float64 results (16-bit results get
# flash-attn's rounding slack instead, see rounding_slack)
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.0, torch.float16: 0.0}
# lse (float32 whatever the input dtype): its error follows the scores' precision, i.e. the input
# dtype, not the float32 it is stored in; this slack is ten times the 16-bit output atol it had
LSE_ATOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}
# gradients: where the reference's own low-precision error is exactly 0 (e.g. one visible key, so
# P = 1 and dq = 0), the floor must cover one rounding of delta = rowsum(dO * O) ~ eps * sqrt(D)
GRAD_ATOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


class RuleViolation(AssertionError):
    """A result outside the comparison rule (or with NaN / misplaced -inf). ``what`` names the
    checked quantity (``"out"``, ``"lse"``, ``"dq"``, ...), so a shrinker can keep the same failure."""

    def __init__(self, what: str, msg: str):
        super().__init__(msg)
        self.what = what


def _require(cond: bool, what: str, msg: str) -> None:
    if not cond:
        raise RuleViolation(what, msg)


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def rounding_slack(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """flash-attn's atol for a result of ``dtype`` near ``ref``: for 16-bit dtypes twice the
    rounding error at the output's magnitude (``2 * max|(r + 0.3 - 0.3) - r|``, ``r`` = ref in
    ``dtype``); for float32/float64 one ulp of the largest value (the reference's own error can be
    exactly 0 in degenerate cases, one visible key: P = 1, where a correct kernel still rounds once)."""
    fin = ref[torch.isfinite(ref)]
    if fin.numel() == 0:
        return 0.0
    if dtype in LOW_PRECISION:
        r = fin.to(dtype)
        return 2.0 * (r + 0.3 - 0.3 - r).abs().max().item()
    return torch.finfo(dtype).eps * fin.abs().max().item()


def assert_close_to_ref(out, ref, lowprec, factor: float = 2.0, atol: float = 0.0, name: str = "out") -> None:
    """``max|out - ref| <= factor * max|lowprec - ref| + rounding_slack + atol``; -inf entries (lse
    of rows that see no key) must sit in the same places in all three, and ``out`` must have no NaN."""
    _require(out.shape == ref.shape, name, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    _require(not torch.isnan(out).any(), name, f"{name}: NaN in output")
    _require(not torch.isnan(ref).any(), name, f"{name}: NaN in the reference (test bug)")
    ninf_out, ninf_ref = torch.isneginf(out), torch.isneginf(ref)
    _require(torch.equal(ninf_out, ninf_ref), name,
             f"{name}: -inf at {ninf_out.sum().item()} places, reference at {ninf_ref.sum().item()}")
    _require(not torch.isposinf(out).any(), name, f"{name}: +inf in output")
    fin = ~ninf_ref
    o, r, lo = out[fin], ref[fin], lowprec[fin]
    err, base = _maxabs(o, r), _maxabs(lo, r)
    slack = rounding_slack(r, out.dtype)
    _require(err <= factor * base + slack + atol, name,
             f"{name}: max|out - ref| = {err:.3e} > {factor} * max|lowprec - ref| ({base:.3e}) + rounding "
             f"slack {slack:.1e} + atol {atol:.0e}")


def atol_for(dtype: torch.dtype, scale: float = 1.0) -> float:
    return ATOL[dtype] * scale


def _leaf(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_(True)


def reference_triplet(q, k, v, dout=None, varlen: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, **kw):
    """(ref, lowprec) results of the shipped reference for inputs q, k, v.

    ref is computed in float64; lowprec in the input dtype without upcasting. Each result is a
    dict with ``out``, ``lse`` and, when ``dout`` is given, ``dq``, ``dk``, ``dv``. ``kw``:
    ``softmax_scale``, ``causal``, ``window_size``; ``varlen``: ``(cu_seqlens_q, cu_seqlens_k)``.
    """
    res = []
    for dtype, upcast in ((torch.float64, True), (q.dtype, False)):
        ql, kl, vl = _leaf(q, dtype), _leaf(k, dtype), _leaf(v, dtype)
        if varlen is None:
            out, lse = attention_ref(ql, kl, vl, upcast=upcast, return_lse=True, **kw)
        else:
            out, lse = attention_ref_varlen(ql, kl, vl, varlen[0], varlen[1], upcast=upcast, return_lse=True, **kw)
        r = {"out": out.detach(), "lse": lse.detach()}
        if dout is not None:
            if out.requires_grad:
                dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), dout.to(dtype), allow_unused=True)
            else:  # varlen with no segment that has both queries and keys
                dq = dk = dv = None
            # a call with no query or no key leaves some inputs out of the graph: zero gradients
            r.update({n: torch.zeros_like(x) if g is None else g for n, g, x in zip(("dq", "dk", "dv"),
                                                                                   (dq, dk, dv), (ql, kl, vl))})
        res.append(r)
    return res[0], res[1]


def grad_magnitude(q, k, v, dout, softmax_scale: Optional[float] = None) -> float:
    """How large a backward's inputs are next to the unit-variance inputs :data:`GRAD_ATOL` was set
    for (>= 1). The floor covers one rounding of ``delta = rowsum(dO * O)`` against ``dP = dO V^T``
    (where ``dS = P (dP - delta)`` is exactly 0 in the reference, e.g. one visible key); that error
    is ``eps * |dO| |V|`` per score, times ``scale * |Q|`` in dK and ``scale * |K|`` in dQ: so the
    floor of dq/dk grows with ``rms(dO) rms(V) scale sqrt(D) max(rms(Q), rms(K))``, which is 1 for
    randn inputs at the default scale. Pass it as ``grad_scale`` to :func:`check_against_reference`
    when the inputs are scaled (the fuzzer does)."""

    def rms(t):
        return t.detach().double().pow(2).mean().sqrt().item() if t.numel() else 0.0

    D = q.shape[-1]
    c = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(max(D, 1))
    return max(1.0, rms(dout) * rms(v) * c * math.sqrt(D) * max(rms(q), rms(k)))


def check_against_reference(out, lse, grads, ref, low, dtype, what: str = "", grad_scale: float = 1.0) -> None:
    """Apply the 2x rule to out/lse and the 3x rule to (dq, dk, dv) (any of them may be None).
    ``grad_scale`` (>= 1, :func:`grad_magnitude`) scales the dq/dk floor for scaled inputs."""
    atol = atol_for(dtype)
    _require(out.dtype == dtype, f"{what}out", f"{what}out dtype {out.dtype} != input dtype {dtype}")
    assert_close_to_ref(out, ref["out"], low["out"], 2.0, atol, f"{what}out")
    if lse is not None:
        expect = torch.float64 if dtype == torch.float64 else torch.float32
        _require(lse.dtype == expect, f"{what}lse", f"{what}lse dtype {lse.dtype} != {expect}")
        assert_close_to_ref(lse, ref["lse"], low["lse"], 2.0, LSE_ATOL[dtype], f"{what}lse")
    if grads is not None:
        for g, n in zip(grads, ("dq", "dk", "dv")):
            _require(g is not None, f"{what}{n}", f"{what}{n} is None: no gradient flowed")
            _require(g.dtype == dtype, f"{what}{n}", f"{what}{n} dtype {g.dtype} != {dtype}")
            floor = GRAD_ATOL[dtype] * (max(1.0, grad_scale) if n != "dv" else 1.0)
            assert_close_to_ref(g, ref[n], low[n], 3.0, floor, f"{what}{n}")
