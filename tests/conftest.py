"""Shared test helpers: seeding, backend parametrisation, the 2x/3x comparison rule, an
independent naive attention, and input makers.

The comparison rule (DESIGN.md section 4, flash-attn style)::

    max|out - ref| <= factor * max|out_lowprec - ref| + atol

with ``ref`` computed by :mod:`qwen3vl_flash.reference` in float64 and ``out_lowprec`` the same
reference computed in the input dtype (``upcast=False``): "PyTorch's own low-precision error".
``factor`` is 2 for outputs and lse, 3 for gradients. ``atol`` is flash-attn's own slack for 16-bit
results, twice the rounding error at the output's magnitude (``2 * max|(r + 0.3 - 0.3) - r|`` with
``r`` the reference rounded to the result's dtype, :func:`rounding_slack`); float32/float64 results get
one ulp of their largest value plus :data:`ATOL`. Every test file uses this one rule; it lives in
:mod:`qwen3vl_flash.testing.rule` (shared with the fuzzer, :mod:`qwen3vl_flash.testing.fuzz`) and is
re-exported here under the same names.

Seeds: every test draws fresh inputs from a seed derived from its node id and ``$QWEN3VL_TEST_SEED``
(printed, so a failure shows how to reproduce it). Triton outputs are poisoned with NaN before the
kernels write them in the tests that ask for the :func:`poison_outputs` fixture.
"""

from __future__ import annotations

import os

# Triton's interpreter must be chosen before anything imports triton (torch does, while our
# backends load); on machines without CUDA the Triton tests run under it, as in CI.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A tuned profile the developer's own `qwen3vl-flash tune` wrote must not change what the suite
# tests: point the cache at an empty folder (tests/test_tune.py points it at its own tmp dirs)
import tempfile  # noqa: E402

os.environ["QWEN3VL_FLASH_CACHE_DIR"] = tempfile.mkdtemp(prefix="qwen3vl-flash-test-cache-")
os.environ.pop("QWEN3VL_FLASH_TUNED", None)

# Under the interpreter, fp32 -> bf16 casts round to nearest even as on the GPU (the interpreter
# itself truncates: qwen3vl_flash/testing/interp.py; tests/test_interp.py keeps that honest)
if os.environ.get("TRITON_INTERPRET") == "1":
    from qwen3vl_flash.testing import interp as _interp  # noqa: E402

    _interp.install()

import dataclasses
import math
import os
import zlib
from collections.abc import Sequence

import pytest
import torch

from qwen3vl_flash.backends.base import AttnRequest, get_backend
from qwen3vl_flash.testing.rule import (  # noqa: F401  (the one rule, re-exported for the test files)
    ATOL,
    GRAD_ATOL,
    LOW_PRECISION,
    LSE_ATOL,
    RuleViolation,
    _leaf,
    _maxabs,
    assert_close_to_ref,
    atol_for,
    check_against_reference,
    reference_triplet,
    rounding_slack,
)

BACKENDS = ["tiled", "sdpa", "eager", "auto"]


# --------------------------------------------------------------------------------------------
# seeding and backend parametrisation
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (vary all of them with $QWEN3VL_TEST_SEED)."""
    base = int(os.environ.get("QWEN3VL_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed} (QWEN3VL_TEST_SEED={base}; reproduce: QWEN3VL_TEST_SEED={base} pytest '{request.node.nodeid}')")
    yield


@pytest.fixture
def poison_outputs(monkeypatch):
    """NaN-fill every output buffer the Triton kernels allocate before they write it, so a test
    sees any element a kernel forgot to write. Per test (no process-wide side effect)."""
    monkeypatch.setenv("QWEN3VL_FLASH_TRITON_POISON", "1")
    yield


def _plain_request(device_type: str = "cpu", dtype=torch.float32) -> AttnRequest:
    return AttnRequest(
        device_type=device_type, dtype=dtype, head_dim=64, num_heads=2, num_kv_heads=2,
        seqlen_q=16, seqlen_k=16,
    )


def backend_unavailable(name: str, device_type: str = "cpu") -> str | None:
    """Why backend ``name`` cannot serve even a plain float32 call on this device, else None.

    Only this "cannot serve the device at all" answer is a reason to skip; a backend that serves
    the plain call must serve every call its contract covers, and a failure there is a failure.
    """
    if name == "auto":
        return None
    return get_backend(name).check(_plain_request(device_type))


def serves_lse(name: str, device_type: str = "cpu") -> bool:
    """Whether ``name`` returns the log-sum-exp on this device. tiled, eager and auto must; sdpa
    may not (PyTorch's GPU SDPA has no lse), and then a request for it must raise (tested)."""
    if name in ("tiled", "eager", "auto"):
        return True
    req = dataclasses.replace(_plain_request(device_type), need_lse=True)
    return get_backend(name).check(req) is None


def skip_if_unavailable(name: str, device_type: str = "cpu") -> None:
    reason = backend_unavailable(name, device_type)
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot serve {device_type}: {reason}")


@pytest.fixture
def small_tiles(monkeypatch):
    """Make every call use tiny tiles (16 query rows x 32 keys), so small shapes cross many tile
    boundaries (partial tiles, causal diagonal tiles, skipped tiles) at little CPU cost."""
    import qwen3vl_flash.interface as itf

    orig = itf.profile_for_device

    def tiny(device):
        return orig(device).replace(block_m=16, block_n=32, tiled_min_seqlen=0)

    monkeypatch.setattr(itf, "profile_for_device", tiny)
    return tiny


def dtypes_for(backend: str) -> Sequence[torch.dtype]:
    """fp32 and fp64 everywhere; bf16 for the backends that run natively in it (auto on CPU
    picks tiled for bf16, so it is covered by tiled's cases)."""
    return (torch.float32, torch.float64, torch.bfloat16) if backend in ("tiled", "sdpa") else (
        torch.float32, torch.float64)


def backend_dtype_params():
    """pytest params (backend, dtype) for every backend and the dtypes it is tested in."""
    return [pytest.param(b, d, id=f"{b}-{str(d).replace('torch.', '')}") for b in BACKENDS for d in dtypes_for(b)]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def randn(*shape, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    """Fresh normal inputs (never all zeros), made in float32 then cast, so that a float64 copy
    of a bf16 tensor is exactly the same numbers."""
    x = torch.randn(*shape, dtype=torch.float32).to(dtype)
    return x.requires_grad_(requires_grad)


def make_qkv(B, Sq, Sk, H, Hkv, D, dtype=torch.float32, requires_grad=False):
    q = randn(B, Sq, H, D, dtype=dtype, requires_grad=requires_grad)
    k = randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=requires_grad)
    v = randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# an independent definition, to check qwen3vl_flash.reference itself
# --------------------------------------------------------------------------------------------


def naive_attention(q, k, v, scale=None, causal=False, window_size=(-1, -1)):
    """Straight from the definition, in float64, element-wise mask, K/V repeated per head.

    Returns out (B, Sq, H, D) float64 and lse (B, H, Sq) float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    _, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=2)  # query head h reads kv head h // (H // Hkv)
    v = v.repeat_interleave(H // Hkv, dim=2)
    left, right = window_size
    visible = torch.zeros(Sq, Sk, dtype=torch.bool)
    for i in range(Sq):
        c = i + Sk - Sq  # the key aligned with query i (bottom-right)
        for j in range(Sk):
            visible[i, j] = (
                (not causal or j <= c) and (left < 0 or j >= c - left) and (right < 0 or j <= c + right)
            )
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
    p = torch.where(visible, torch.exp(s - torch.nan_to_num(lse, neginf=0.0).unsqueeze(-1)), 0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out, lse
