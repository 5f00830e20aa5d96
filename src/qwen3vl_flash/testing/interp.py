"""Make Triton's CPU interpreter round fp32 -> bf16 the way the GPU does.

On a GPU, ``x.to(tl.bfloat16)`` compiles to ``cvt.rn.bf16.f32``: round to nearest, ties to even.
Triton's interpreter (checked on 3.6 and 3.9) converts fp32 <-> bf16 through
``triton.runtime.interpreter._convert_float`` with ``rounding_mode=None``, which drops the low 16
bits (round toward zero), and its ``RTNE`` branch rounds half up. A kernel tested under the
interpreter then sees bf16 values one step off now and then: a recomputed softmax probability of
0.99999994 becomes 0.99609375 instead of 1.0, and a bf16 dV drifts by one bf16 step where PyTorch is
exact (issue 15's third finding). That is the interpreter's arithmetic, not the kernel's, so the
test suite and the fuzzer install :func:`install` before running Triton kernels on the CPU: fp32 ->
bf16 downcasts then go through PyTorch's own conversion (round to nearest even, NaN and Inf kept),
which is what the GPU computes. Explicit round-toward-zero requests keep the interpreter's own code.

``install()`` is idempotent and does nothing when Triton is absent; :func:`installed` tells whether
the patch is active; :func:`raw_interpreter_truncates` shows the unpatched behaviour (for the test
that keeps this shim honest: when a Triton release fixes the interpreter, that test says so).
"""

from __future__ import annotations

import numpy as np
import torch

_MARK = "_qwen3vl_flash_rtne"


def _interp():
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton is an optional extra
        return None, None
    return interpreter, tl


def _rtz_mode(interpreter):
    try:
        return interpreter._ir.ROUNDING_MODE.RTZ
    except Exception:  # pragma: no cover - layout differs between Triton releases
        return object()


def install() -> bool:
    """Patch the interpreter's fp32 -> bf16 conversion to round to nearest even; True when active."""
    interpreter, tl = _interp()
    if interpreter is None or not hasattr(interpreter, "_convert_float"):
        return False
    original = interpreter._convert_float
    if getattr(original, _MARK, False):
        return True
    rtz = _rtz_mode(interpreter)

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode != rtz:
            src = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32))
            bits = src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return bits.reshape(np.shape(input))
        return original(input, input_dtype, output_dtype, rounding_mode)

    setattr(_convert_float, _MARK, True)
    _convert_float._original = original
    interpreter._convert_float = _convert_float
    return True


def installed() -> bool:
    interpreter, _ = _interp()
    return interpreter is not None and getattr(getattr(interpreter, "_convert_float", None), _MARK, False)


def raw_interpreter_truncates() -> bool | None:
    """Whether the unpatched interpreter turns fp32 0.99999994 into bf16 0.99609375 (None: no Triton)."""
    interpreter, tl = _interp()
    if interpreter is None or not hasattr(interpreter, "_convert_float"):
        return None
    fn = interpreter._convert_float
    fn = getattr(fn, "_original", fn)
    x = np.array([np.nextafter(np.float32(1.0), np.float32(0.0))], dtype=np.float32)
    bits = np.asarray(fn(x, tl.float32, tl.bfloat16, None)).astype(np.uint16)
    value = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().item()
    return value != 1.0
