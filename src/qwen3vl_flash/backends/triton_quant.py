"""Triton kernels for quantised attention (forward only): the fused quantisers, the attention
kernel, then the launchers.

The formats are :mod:`qwen3vl_flash.quant.quantize`'s (read it first); this file computes them:

* ``_kv_stats_kernel``, grid (chunks, B * Hkv): one pass over K (and V for ``"fp8"``) writing
  per-chunk column sums of K and column absmaxes of V (fp32 partials, reduced in a fixed order,
  so the result is deterministic).
* ``_kv_quant_kernel``, grid (chunks, B * Hkv): reduces the partials to K's smoothing mean (and
  V's per-channel scale), then one more pass writing K's INT8 codes + per-token scales in a packed
  per-head layout ``(B, Hkv, S_pad, DK)`` (zero columns past the head dim, so the attention kernel
  loads whole rows) and, for ``"fp8"``, V's e4m3 codes *transposed*, ``(B, Hkv, DV, S_pad)``:
  Hopper's FP8 wgmma takes its B operand K-major only (the keys contiguous), as Triton's own
  fused-attention tutorial arranges V for FP8.
* ``_qattn_fwd_kernel``, grid (query blocks, B * H): quantises its Q tile in registers (per token
  and head: the whole row is in the tile, so Q costs no pass of its own), then INT8 Q.K^T with
  int32 accumulation, scores scaled by the outer product ``q_scale * softmax_scale * log2(e)`` x
  ``k_scale``, online softmax in fp32 with ``exp2``, P.V in V's dtype (``"int8"``) or FP8
  (``"fp8"``: P stored as ``fp8(P * 448)``, per-block products added to the fp32 accumulator
  outside the tensor core, whose FP8 accumulation is not full fp32 on Hopper), lse with the
  smoothing shift ``softmax_scale * q.mean`` added in the kernel (:func:`~qwen3vl_flash.quant.
  quantize.lse_shift`'s quantity).

Rounding matches :func:`~qwen3vl_flash.quant.quantize.quantize_qkv` code for code: divisions are
``tl.math.div_rn`` (Triton's plain fp32 ``/`` is approximate on GPU), rounding to integers is
the fp32 ``(x + 1.5 * 2**23) - 1.5 * 2**23`` identity (round half to even for ``|x| < 2**22``;
no libdevice, which the interpreter lacks), FP8 casts are round-to-nearest-even. Two deliberate
differences, both within fp32 rounding: K's mean is summed in chunk order (torch's reduction
order is its own, so the mean can differ in the last bits, and a code that sits exactly at a
rounding tie can then differ by one), and the lse shift sums ``q * mean`` in tile order.

Masking and layouts are :mod:`qwen3vl_flash.conventions`' (bottom-right causal, ``(left, right)``
windows, GQA head ``h`` reads kv head ``h // (H // Hkv)``), the block ranges are
:func:`~.triton_common.block_ranges` (mask only the boundary key blocks). Head dims that are not
a power of two are padded to the next power of two in registers by default (masked loads; K/V
codes are stored zero-padded); ``head_split="split"`` instead splits the INT8 Q.K^T into a
power-of-two part plus a tail of at least 32 (the int8 MMA's depth; 72 = 64 + 32) and P.V as the
bf16 kernel does (72 = 64 + 16) -- right in the interpreter, but not yet right on an H200
(:class:`QuantTiles`' ``head_split`` says what was seen).

GPU figures (H200, triton 3.6, 2026-12-01, ``benchmarks/experiments/exp_quant_fwd.py``): causal
32/8 hd128 at 4k / 16k / 32k, TFLOP/s in bf16 FLOPs with the quantisers included: int8 336 / 490 /
515, fp8 408 / 632 / 650, against cuDNN bf16 528 / 653 / 584 in the same run. The K/V quantisers
took 50-100 us (int8) and 120-215 us (fp8): at 4k that is 12% / 40% of the call.

Interpreter (``TRITON_INTERPRET=1``, CI): int8 dots with int32 accumulation and FP8 dots run;
its fp32 -> e4m3 cast loses the carry when rounding crosses a power of two (31.35 -> 16, not 32;
triton 3.9), so under the interpreter the kernels round to the e4m3 grid in fp32 first
(``_to_e4m3``, exact), and cast exact values only. bf16 dots run upcast (``triton_common.dot``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..conventions import MAX_HEAD_DIM, fold_window
from ..hardware.profiles import KernelTile
from ..quant.quantize import FP8_DTYPE, FP8_MAX, FP8_MIN_CAPABILITY, INT8_MAX, QUANT_MODES, QuantizedQKV
from . import triton_common as tc

__all__ = ["quant_triton_serves", "quant_attention_triton", "quantize_qkv_triton", "quantize_kv_triton",
           "QuantTiles", "QUANT_TILES", "qk_split"]

_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)  # int8 mma (Ampere); FP8 needs FP8_MIN_CAPABILITY (sm89)
_INT8_MIN_DOT = 32  # the int8 MMA's reduction depth: Q.K^T tiles over D are at least this wide
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (x + M) - M rounds fp32 x half-to-even for |x| < 2**22
_ROUND_MAGIC_BITS = 0x4B400000  # the bits of 1.5 * 2**23 as an int32
_LOG2_P = math.log2(FP8_MAX)  # P is stored as fp8(P * 448) = fp8(exp2(s - m + log2(448)))


# --------------------------------------------------------------------------------------------
# tiles (data; see the report of issue 14: to move into hardware/profiles.py)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantTiles:
    """The quantised kernels' tiles: the attention kernel's per ``(quant, head_dim)`` (``fwd``),
    the autotune list for calls without one (timed once per shape class on GPU), the
    interpreter's tile, the quantisers' rows per step and programs per SM, and the query-block
    order under right-bounded (causal) masks: heaviest (last) first."""

    fwd: Mapping[Tuple[str, int], KernelTile] = dataclasses.field(default_factory=dict)
    autotune: Tuple[KernelTile, ...] = (
        KernelTile(128, 128, num_warps=8, num_stages=3),
        KernelTile(64, 128, num_warps=4, num_stages=3),
        KernelTile(128, 64, num_warps=4, num_stages=3),
        KernelTile(128, 128, num_warps=8, num_stages=2),
    )
    interpret: KernelTile = KernelTile(16, 32, num_warps=4, num_stages=1)
    quant_block_s: int = 64
    quant_programs_per_sm: int = 4
    reverse_m: bool = True
    # head dims that are no power of two: "pad" (one tile of the next power of two) or "split".
    # "split" gave non-finite outputs and an illegal address on an H200 (triton 3.6, hd72 varlen,
    # 2026-12-01; root cause not isolated: the split tails or the varlen path), passes the
    # interpreter; "pad" is the default until it is measured on a GPU.
    head_split: str = "pad"
    # the same for "fp8": "split" measured right and faster on an H100 (2026-12-07, vision hd72
    # varlen 8 x 2304: 1.32 ms against 1.76 ms padded; exp_quant_variants.py)
    fp8_head_split: str = "split"
    # int32 scores -> fp32: "cvt" (I2F) or "magic" (integer add into the bits of 1.5 * 2**23; exact)
    score_convert: str = "cvt"
    # the FP8 kernel's exponentials: "f32" (ex2.approx.f32) or "f16x2" (x rounded to fp16, two per
    # instruction)
    fp8_exp: str = "f32"
    # the FP8 P.V products: added to an fp32 register accumulator ("registers") or accumulated in
    # the tensor core ("tensor_core": Hopper's FP8 MMA accumulates with fewer than fp32's bits)
    fp8_accumulate: str = "registers"
    # promise the compiler 16-byte aligned Q / V / out rows where every stride is a multiple of 8
    # elements (head dim 72: Triton sees no divisibility by 16 and loads element by element)
    align8: bool = True

    def __post_init__(self):
        for key, tile in self.fwd.items():
            if not (isinstance(key, tuple) and len(key) == 2 and key[0] in QUANT_MODES and isinstance(key[1], int)):
                raise ValueError(f"QuantTiles.fwd keys must be (quant in {QUANT_MODES}, head_dim), got {key!r}")
            if not isinstance(tile, KernelTile):
                raise ValueError(f"QuantTiles.fwd[{key!r}] must be a KernelTile, got {tile!r}")
        if not self.autotune or not all(isinstance(t, KernelTile) for t in self.autotune):
            raise ValueError(f"QuantTiles.autotune must be a non-empty tuple of KernelTile, got {self.autotune!r}")
        object.__setattr__(self, "autotune", tuple(self.autotune))
        if not isinstance(self.interpret, KernelTile):
            raise ValueError(f"QuantTiles.interpret must be a KernelTile, got {self.interpret!r}")
        if self.quant_block_s < 16 or self.quant_block_s & (self.quant_block_s - 1):
            raise ValueError(f"QuantTiles.quant_block_s must be a power of two >= 16, got {self.quant_block_s}")
        if not (isinstance(self.quant_programs_per_sm, int) and self.quant_programs_per_sm >= 1):
            raise ValueError(f"QuantTiles.quant_programs_per_sm must be an int >= 1, "
                             f"got {self.quant_programs_per_sm!r}")
        for name in ("reverse_m", "align8"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantTiles.{name} must be a bool, got {getattr(self, name)!r}")
        for name, allowed in (("score_convert", ("cvt", "magic")), ("fp8_exp", ("f32", "f16x2")),
                              ("fp8_accumulate", ("registers", "tensor_core")),
                              ("head_split", ("split", "pad")), ("fp8_head_split", ("split", "pad"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"QuantTiles.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def lookup(self, quant: str, head_dim: int) -> Optional[KernelTile]:
        return self.fwd.get((quant, int(head_dim)))


# H200, triton 3.6, causal 32/8 hd128 S=16k (2026-12-01, exp_quant_fwd --sweep): int8 128x128w8s3
# 493 TFLOP/s (bf16 count; 128x64w4s3 435, 64x128w4s3 431), fp8 64x128w4s3 642 (128x128w8s3
# 542, 128x64w4s3 285), both with the query blocks reversed (natural order 466 / 624).
QUANT_TILES = QuantTiles(fwd={
    ("int8", 128): KernelTile(128, 128, num_warps=8, num_stages=3),
    ("fp8", 128): KernelTile(64, 128, num_warps=4, num_stages=3),
})


# --------------------------------------------------------------------------------------------
# what the kernels serve
# --------------------------------------------------------------------------------------------


def quant_triton_serves(q: torch.Tensor, k: torch.Tensor, quant) -> Optional[str]:
    """None when these kernels can run a ``quant`` call on ``q``/``k``, else the reason: CUDA
    (sm80+; ``"fp8"`` sm89+) or the CPU under ``TRITON_INTERPRET=1``, triton importable,
    float16/bfloat16, head_dim <= 256. Does not import triton."""
    if quant not in QUANT_MODES:
        return f"quant must be one of {QUANT_MODES}, got {quant!r}"
    if not _TRITON_FOUND:
        return "triton is not installed (pip install triton)"
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        return f"the quantised Triton kernels take float16/bfloat16 q and k, got {q.dtype} / {k.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Triton kernels"
    if q.device.type == "cuda":
        cap = tuple(torch.cuda.get_device_capability(q.device))
        if cap < _MIN_CAPABILITY:
            return f"CUDA compute capability {cap[0]}.{cap[1]} < 8.0: no INT8 tensor cores in Triton"
        if quant == "fp8" and cap < FP8_MIN_CAPABILITY:
            return f"quant='fp8' needs FP8 tensor cores (compute capability >= 8.9), got {cap[0]}.{cap[1]}"
        return None
    if q.device.type == "cpu":
        if not tc.interpreting():
            return "CPU tensors run through Triton only under its interpreter (set TRITON_INTERPRET=1)"
        return None
    return f"device type {q.device.type!r} is not supported by the Triton kernels"


def qk_split(head_dim: int, mode: str = "split") -> Tuple[int, int]:
    """(DQ0, DQ1): the INT8 Q.K^T tiles over D, a power of two plus a power-of-two tail, each at
    least 32 wide (the int8 MMA's depth): 64 -> (64, 0), 72/80/96 -> (64, 32), 128 -> (128, 0);
    ``mode="pad"``: one power-of-two tile (72 -> (128, 0))."""
    if head_dim <= _INT8_MIN_DOT:
        return _INT8_MIN_DOT, 0
    main = 1 << (head_dim.bit_length() - 1)
    if main == head_dim:
        return main, 0
    if mode == "pad":
        return tc.next_pow2(head_dim), 0
    if mode != "split":
        raise ValueError(f"head_split must be 'split' or 'pad', got {mode!r}")
    tail = max(_INT8_MIN_DOT, tc.next_pow2(head_dim - main))
    return (2 * main, 0) if tail == main else (main, tail)


# --------------------------------------------------------------------------------------------
# kernels (plain functions, wrapped by triton.jit on first use: triton is optional, and it reads
# TRITON_INTERPRET when it wraps them; they call each other through this module's globals)
# --------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _build_kernels
dot = LN2 = ROUND_MAGIC = LOG2_P = None  # jit helper and constexprs, bound by _kernels


def _rint(x):
    # round half to even: fp32 additions round to nearest even, and |x| <= 2**22 here (codes are
    # clamped to 127 / 448 right after; larger |x| only occur for values clamped anyway)
    return (x + ROUND_MAGIC) - ROUND_MAGIC


def _row_scale_i8(amax):
    # quantize_int8's scale: amax / 127, correctly rounded; 1 for an all-zero row
    return tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1.0)


def _codes_i8(x, scale):
    # round(x / scale) half to even, clamped to +-127 -> int8 (exact: the value is an integer)
    c = _rint(tl.math.div_rn(x, scale[:, None]))
    return tl.minimum(tl.maximum(c, -127.0), 127.0).to(tl.int8)


def _to_e4m3(x, EMULATE: tl.constexpr):
    # fp32 -> e4m3 round to nearest even, |x| <= 448 (callers clamp or know it)
    if EMULATE:
        # interpreter: round onto the e4m3 grid in fp32 (its quantum is 2**(max(e, -6) - 3) for
        # binade e; the scaling by a power of two is exact), then cast the exact value
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        quantum = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        r = _rint(x / quantum) * quantum
        return tl.minimum(tl.maximum(r, -448.0), 448.0).to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv)


def _kv_stats_kernel(
    K, V, KSum, VMax,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    seqlen, num_kv_heads, chunk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, FP8: tl.constexpr,
):
    # partial column sums of K (and absmaxes of V) over rows [c * chunk, (c + 1) * chunk)
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    vmax = tl.zeros([BLOCK_D], dtype=tl.float32)
    s0 = pid_c * chunk
    for start in range(s0, tl.minimum(s0 + chunk, seqlen), BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        ok = (rows < seqlen)[:, None] & d_ok[None, :]
        kt = tl.load(k_base + rows.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0)
        ksum += tl.sum(kt.to(tl.float32), 0)
        if FP8:
            vt = tl.load(v_base + rows.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=ok, other=0.0)
            vmax = tl.maximum(vmax, tl.max(tl.abs(vt.to(tl.float32)), 0))
    part = (pid_bh * tl.num_programs(0) + pid_c).to(tl.int64) * BLOCK_D + offs_d
    tl.store(KSum + part, ksum)
    if FP8:
        tl.store(VMax + part, vmax)


def _kv_quant_kernel(
    K, V, KSum, VMax, KCodes, KScale, KMean, VCodesT, VScale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    seqlen, seqlen_pad, num_kv_heads, chunk, num_chunks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, NUM_CHUNKS_P2: tl.constexpr, FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # -- reduce the partials (every program the same way, in chunk order): mean, v scale
    offs_c = tl.arange(0, NUM_CHUNKS_P2)
    part = (pid_bh * num_chunks + offs_c).to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :]
    c_ok = (offs_c < num_chunks)[:, None]
    mean = tl.math.div_rn(tl.sum(tl.load(KSum + part, mask=c_ok, other=0.0), 0),
                          tl.full([BLOCK_D], 0.0, tl.float32) + seqlen)
    mean = tl.where(d_ok, mean, 0.0)
    stat = pid_bh.to(tl.int64) * HEAD_DIM + offs_d  # (B, 1, Hkv, D) / (1, Hkv, D), contiguous
    if pid_c == 0:
        tl.store(KMean + stat, mean, mask=d_ok)
    if FP8:
        amax = tl.max(tl.load(VMax + part, mask=c_ok, other=0.0), 0)
        vscale = tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full([BLOCK_D], 448.0, tl.float32)), 1.0)
        if pid_c == 0:
            tl.store(VScale + stat, vscale, mask=d_ok)
    # -- codes for rows [c * chunk, (c + 1) * chunk); BLOCK_D >= DK, DV (the stored widths)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    kc_base = KCodes + pid_bh.to(tl.int64) * seqlen_pad * DK
    ks_base = KScale + pid_bh.to(tl.int64) * seqlen_pad
    vc_base = VCodesT + pid_bh.to(tl.int64) * DV * seqlen_pad
    s0 = pid_c * chunk
    for start in range(s0, tl.minimum(s0 + chunk, seqlen), BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        r_ok = rows < seqlen
        rows64 = rows.to(tl.int64)
        ok = r_ok[:, None] & d_ok[None, :]
        # K: smoothed, then per token (one row = one token of this head); zero codes past D
        kt = tl.load(k_base + rows64[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0)
        kt = tl.where(ok, kt.to(tl.float32) - mean[None, :], 0.0)
        scale = _row_scale_i8(tl.max(tl.abs(kt), 1))
        tl.store(kc_base + rows64[:, None] * DK + offs_d[None, :], _codes_i8(kt, scale),
                 mask=r_ok[:, None] & (offs_d < DK)[None, :])
        tl.store(ks_base + rows, scale, mask=r_ok)
        if FP8:
            vt = tl.load(v_base + rows64[:, None] * stride_vs + offs_d[None, :], mask=ok, other=0.0)
            x = tl.math.div_rn(vt.to(tl.float32), vscale[None, :])
            codes = _to_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0), EMULATE_FP8)
            # transposed store: (DV, S_pad), the keys contiguous; zero rows past D
            tl.store(vc_base + offs_d.to(tl.int64)[None, :] * seqlen_pad + rows64[:, None], codes,
                     mask=r_ok[:, None] & (offs_d < DV)[None, :])


def _scores_f32(s, I2F_MAGIC: tl.constexpr):
    # int32 scores -> fp32, exact (|s| <= 127**2 * 256 < 2**22). I2F_MAGIC: add the integer to the
    # bits of 1.5 * 2**23 and subtract that float (two full-rate adds), instead of the I2F
    # conversion, which issues at a quarter of the FMA rate on sm80/sm90
    if I2F_MAGIC:
        return (s + ROUND_MAGIC_BITS).to(tl.float32, bitcast=True) - ROUND_MAGIC
    else:
        return s.to(tl.float32)


def _exp2_p(x, EXP_F16: tl.constexpr, EMULATE: tl.constexpr):
    # P = exp2(x) for the FP8 P.V: EXP_F16 rounds x to fp16 and takes two exponentials per
    # instruction (ex2.approx.f16x2); P is stored as e4m3 (3 mantissa bits) right after. The
    # interpreter has no inline PTX: it rounds alike and takes a correctly rounded fp16 exp2.
    if EXP_F16:
        x16 = x.to(tl.float16)
        if EMULATE:
            return tl.math.exp2(x16.to(tl.float32)).to(tl.float16)
        else:
            return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x16], dtype=tl.float16,
                                             is_pure=True, pack=2)
    else:
        return tl.math.exp2(x)


def _qattn_inner(
    acc0, acc1, l_i, m_i, q0, q1, qsc,
    kc_base, ks_base, v_base, stride_vs, stride_vd,
    lo, hi, offs_m, seqlen_k, off, window_left, window_right,
    HEAD_DIM: tl.constexpr, DK: tl.constexpr, DQ0: tl.constexpr, DQ1: tl.constexpr,
    DV0: tl.constexpr, DV1: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, POS_SCALE: tl.constexpr,
    FP8: tl.constexpr, EMULATE_FP8: tl.constexpr, DOT_PREC: tl.constexpr,
    I2F_MAGIC: tl.constexpr, EXP_F16: tl.constexpr, FP8_TC_ACC: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_q0 = tl.arange(0, DQ0)
    offs_q1 = DQ0 + tl.arange(0, DQ1 if DQ1 > 0 else 32)
    offs_v0 = tl.arange(0, DV0)
    offs_v1 = DV0 + tl.arange(0, DV1 if DV1 > 0 else 16)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seqlen_k
        cols64 = cols.to(tl.int64)
        # -- s = q_codes . k_codes (int32), over the main part of D and the tail; codes past the
        # head dim are stored zeros, so only the key rows can run out
        kc0 = load2d(kc_base + cols64[None, :] * DK + offs_q0[:, None], n_ok[None, :], n_ok[None, :],
                     MASK, False)  # (DQ0, N)
        s = tl.dot(q0, kc0, out_dtype=tl.int32)
        if DQ1 > 0:
            kc1 = load2d(kc_base + cols64[None, :] * DK + offs_q1[:, None], n_ok[None, :], n_ok[None, :],
                         MASK, False)
            s = tl.dot(q1, kc1, s, out_dtype=tl.int32)
        ks = load2d(ks_base + cols, n_ok, n_ok, MASK, False)
        # -- dequantise: |s| <= 127^2 * 256 < 2^24, so the fp32 conversion is exact
        t = _scores_f32(s, I2F_MAGIC) * ks[None, :]
        if MASK:
            sf = t * qsc[:, None]  # log2 units
            vis = n_ok[None, :]
            if HAS_RIGHT:
                vis = vis & (cols[None, :] <= offs_m[:, None] + off + window_right)
            if HAS_LEFT:
                vis = vis & (cols[None, :] >= offs_m[:, None] + off - window_left)
            sf = tl.where(vis, sf, float("-inf"))
            # -- update m_i (a row that has seen no key keeps m = -inf: use 0 as its pivot)
            m_new = tl.maximum(m_i, tl.max(sf, 1))
            m_pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
            if FP8:
                p = _exp2_p(sf - (m_pivot - LOG2_P)[:, None], EXP_F16, EMULATE_FP8)
            else:
                p = tl.math.exp2(sf - m_pivot[:, None])
        else:
            if POS_SCALE:  # qsc > 0: the row max of t * qsc is qsc * max(t), rounded alike
                m_new = tl.maximum(m_i, tl.max(t, 1) * qsc)
            else:
                m_new = tl.maximum(m_i, tl.max(t * qsc[:, None], 1))
            m_pivot = m_new
            if FP8:
                p = _exp2_p(t * qsc[:, None] - (m_pivot - LOG2_P)[:, None], EXP_F16, EMULATE_FP8)
            else:
                p = tl.math.exp2(t * qsc[:, None] - m_pivot[:, None])
        alpha = tl.math.exp2(m_i - m_pivot)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)  # the unrounded P (times 448 for fp8)
        # -- acc = acc * alpha + p v
        if FP8:
            if EMULATE_FP8:
                p8 = _to_e4m3(p.to(tl.float32), True)
            else:
                p8 = p.to(tl.float8e4nv)  # from fp32 or, with EXP_F16, fp16 (cvt ...e4m3x2.f16x2)
            vt0 = load2d(v_base + offs_v0.to(tl.int64)[:, None] * stride_vd + cols64[None, :],
                         n_ok[None, :], n_ok[None, :], MASK, False)  # (DV0, N), keys contiguous
            if FP8_TC_ACC:  # accumulate in the tensor core (its FP8 accumulation: see QuantTiles)
                acc0 = tl.dot(p8, tl.trans(vt0), acc0 * alpha[:, None])
            else:
                acc0 = acc0 * alpha[:, None] + tl.dot(p8, tl.trans(vt0))
            if DV1 > 0:
                vt1 = load2d(v_base + offs_v1.to(tl.int64)[:, None] * stride_vd + cols64[None, :],
                             n_ok[None, :], n_ok[None, :], MASK, False)
                if FP8_TC_ACC:
                    acc1 = tl.dot(p8, tl.trans(vt1), acc1 * alpha[:, None])
                else:
                    acc1 = acc1 * alpha[:, None] + tl.dot(p8, tl.trans(vt1))
        else:
            v0 = load2d(v_base + cols64[:, None] * stride_vs + offs_v0[None, :],
                        n_ok[:, None], (offs_v0 < HEAD_DIM)[None, :], MASK, DV0 > HEAD_DIM)  # (N, DV0)
            p_lo = p.to(v0.dtype)
            acc0 = dot(p_lo, v0, acc0 * alpha[:, None], DOT_PREC)
            if DV1 > 0:
                v1 = load2d(v_base + cols64[:, None] * stride_vs + offs_v1[None, :],
                            n_ok[:, None], (offs_v1 < HEAD_DIM)[None, :], MASK, DV0 + DV1 > HEAD_DIM)
                acc1 = dot(p_lo, v1, acc1 * alpha[:, None], DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


def _qattn_fwd_kernel(
    Q, KCodes, KScale, KMean, V, VScale, Out, Lse, CuSeqQ, CuSeqK,
    stride_qb, stride_qs, stride_qh,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, seqlen_k_pad, num_heads, num_kv_heads, group,
    qk_scale, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, DK: tl.constexpr, DQ0: tl.constexpr, DQ1: tl.constexpr,
    DV0: tl.constexpr, DV1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, REVERSE_M: tl.constexpr,
    POS_SCALE: tl.constexpr, FP8: tl.constexpr, EMULATE_FP8: tl.constexpr, NEED_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr, I2F_MAGIC: tl.constexpr, EXP_F16: tl.constexpr, FP8_TC_ACC: tl.constexpr,
    ALIGN8: tl.constexpr, KSTART16: tl.constexpr,
):
    tl.static_assert(DQ0 >= 32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group  # GQA: K/V are never repeated
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        if KSTART16:  # every segment starts at a multiple of 16 keys (checked on the host)
            k_start = tl.multiple_of(k_start, 16)
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
        kv = h_kv  # one packed (1, Hkv, T_pad, ...) buffer for every segment
    else:
        q_start = 0
        k_start = 0
        kv = b * num_kv_heads + h_kv
    if REVERSE_M:  # heaviest (last) causal query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return

    q_off = b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
    o_off = b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_os + h * stride_oh
    if ALIGN8:
        q_off = tl.multiple_of(q_off, 8)
        o_off = tl.multiple_of(o_off, 8)
    q_base = Q + q_off
    o_base = Out + o_off
    kv64 = kv.to(tl.int64)
    kc_base = KCodes + (kv64 * seqlen_k_pad + k_start) * DK
    ks_base = KScale + kv64 * seqlen_k_pad + k_start
    if FP8:  # V codes transposed, (B * Hkv, DV, S_pad)
        v_base = V + kv64 * stride_vh + k_start
    else:
        v_off = b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + h_kv * stride_vh
        if ALIGN8:
            v_off = tl.multiple_of(v_off, 8)
        v_base = V + v_off

    # -- Q tile, quantised per row (token) in registers: quantize_int8's codes and scale
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    offs_q0 = tl.arange(0, DQ0)
    offs_q1 = DQ0 + tl.arange(0, DQ1 if DQ1 > 0 else 32)
    xq0 = tl.load(q_base + offs_m[:, None] * stride_qs + offs_q0[None, :],
                  mask=m_ok[:, None] & (offs_q0 < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(xq0), 1)
    if DQ1 > 0:
        xq1 = tl.load(q_base + offs_m[:, None] * stride_qs + offs_q1[None, :],
                      mask=m_ok[:, None] & (offs_q1 < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(xq1), 1))
    q_scale = _row_scale_i8(amax)
    q0 = _codes_i8(xq0, q_scale)
    if DQ1 > 0:
        q1 = _codes_i8(xq1, q_scale)
    else:
        q1 = q0  # unused placeholder
    qsc = q_scale * qk_scale  # score scale of row i, in log2 units
    if NEED_LSE:  # the smoothing shift softmax_scale * q.mean (quantize.lse_shift), from q itself
        mean_base = KMean + kv64 * HEAD_DIM  # (B, 1, Hkv, D) / (1, Hkv, D)
        mean0 = tl.load(mean_base + offs_q0, mask=offs_q0 < HEAD_DIM, other=0.0)
        shift = tl.sum(xq0 * mean0[None, :], 1)
        if DQ1 > 0:
            mean1 = tl.load(mean_base + offs_q1, mask=offs_q1 < HEAD_DIM, other=0.0)
            shift += tl.sum(xq1 * mean1[None, :], 1)
        shift = shift * softmax_scale

    acc0 = tl.zeros([BLOCK_M, DV0], dtype=tl.float32)
    if DV1 > 0:
        acc1 = tl.zeros([BLOCK_M, DV1], dtype=tl.float32)
    else:
        acc1 = tl.zeros([1, 1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo, full_lo, full_hi, hi = block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    off = seqlen_k - seqlen_q
    acc0, acc1, l_i, m_i = _qattn_inner(
        acc0, acc1, l_i, m_i, q0, q1, qsc, kc_base, ks_base, v_base, stride_vs, stride_vd,
        lo, full_lo, offs_m, seqlen_k, off, window_left, window_right,
        HEAD_DIM, DK, DQ0, DQ1, DV0, DV1, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, POS_SCALE, FP8, EMULATE_FP8, DOT_PREC,
        I2F_MAGIC, EXP_F16, FP8_TC_ACC)
    acc0, acc1, l_i, m_i = _qattn_inner(
        acc0, acc1, l_i, m_i, q0, q1, qsc, kc_base, ks_base, v_base, stride_vs, stride_vd,
        full_lo, full_hi, offs_m, seqlen_k, off, window_left, window_right,
        HEAD_DIM, DK, DQ0, DQ1, DV0, DV1, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, POS_SCALE, FP8, EMULATE_FP8, DOT_PREC,
        I2F_MAGIC, EXP_F16, FP8_TC_ACC)
    acc0, acc1, l_i, m_i = _qattn_inner(
        acc0, acc1, l_i, m_i, q0, q1, qsc, kc_base, ks_base, v_base, stride_vs, stride_vd,
        full_hi, hi, offs_m, seqlen_k, off, window_left, window_right,
        HEAD_DIM, DK, DQ0, DQ1, DV0, DV1, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, POS_SCALE, FP8, EMULATE_FP8, DOT_PREC,
        I2F_MAGIC, EXP_F16, FP8_TC_ACC)

    # -- epilogue: out = acc (* v_scale) / l; a row that saw no key gives 0 and lse = -inf
    seen = l_i != 0.0  # a NaN row (NaN in q or k) keeps its NaN: out and lse NaN, not "saw no key"
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    offs_v0 = tl.arange(0, DV0)
    offs_v1 = DV0 + tl.arange(0, DV1 if DV1 > 0 else 16)
    if FP8:  # l holds 448 * sum(P): out = acc * v_scale / 448 / sum(P)
        vs_base = VScale + kv64 * HEAD_DIM
        vs0 = tl.load(vs_base + offs_v0, mask=offs_v0 < HEAD_DIM, other=0.0)
        out0 = acc0 * inv_l[:, None] * vs0[None, :]
    else:
        out0 = acc0 * inv_l[:, None]
    tl.store(o_base + offs_m[:, None] * stride_os + offs_v0[None, :], out0.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_v0 < HEAD_DIM)[None, :])
    if DV1 > 0:
        if FP8:
            vs1 = tl.load(vs_base + offs_v1, mask=offs_v1 < HEAD_DIM, other=0.0)
            out1 = acc1 * inv_l[:, None] * vs1[None, :]
        else:
            out1 = acc1 * inv_l[:, None]
        tl.store(o_base + offs_m[:, None] * stride_os + offs_v1[None, :], out1.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_v1 < HEAD_DIM)[None, :])
    if NEED_LSE:
        log2_l = tl.math.log2(tl.where(seen, l_i, 1.0))
        if FP8:
            log2_l = log2_l - LOG2_P
        lse = tl.where(seen, (m_i + log2_l) * LN2 + shift, float("-inf"))
        tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=m_ok)


def _quant_q_kernel(
    Q, QCodes, QScale, stride_qb, stride_qs, stride_qh, seqlen, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # standalone Q quantiser (tests, other callers): the attention kernel does the same in its
    # prologue with the same helpers. Codes/scales contiguous like q ((B, S, H, D) / (T, H, D)).
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < seqlen
    ok = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qs
                + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = _row_scale_i8(tl.max(tl.abs(x), 1))
    tok = (b.to(tl.int64) * seqlen + rows) * num_heads + h  # row index of (B, S, H)
    tl.store(QCodes + tok[:, None] * HEAD_DIM + offs_d[None, :], _codes_i8(x, scale), mask=ok)
    tl.store(QScale + tok, scale, mask=r_ok)


_JIT_NAMES = ("_rint", "_row_scale_i8", "_codes_i8", "_to_e4m3", "_scores_f32", "_exp2_p", "_kv_stats_kernel", "_kv_quant_kernel",
              "_qattn_inner", "_qattn_fwd_kernel", "_quant_q_kernel")
_RAW = {name: globals()[name] for name in _JIT_NAMES}
_KERNELS: Dict[bool, Dict[str, object]] = {}
load2d = block_ranges = None  # triton_common's jit helpers, bound by _kernels


def _build_kernels() -> Dict[str, object]:
    global tl
    from .._optional import require

    triton = require("triton", "the quantised Triton kernels")
    tl = require("triton.language", "the quantised Triton kernels")
    shared = tc.jit_helpers()  # for this interpreter mode, as the kernels below
    built = {name: shared[name] for name in ("dot", "load2d", "block_ranges", "LN2")}
    built["ROUND_MAGIC"] = tl.constexpr(_ROUND_MAGIC)
    built["ROUND_MAGIC_BITS"] = tl.constexpr(_ROUND_MAGIC_BITS)
    built["LOG2_P"] = tl.constexpr(_LOG2_P)
    built.update({name: triton.jit(fn) for name, fn in _RAW.items()})
    return built


def _kernels() -> Dict[str, object]:
    mode = tc.interpreting()
    ks = _KERNELS.get(mode)
    if ks is None:
        ks = _KERNELS[mode] = _build_kernels()
    if globals()["_qattn_fwd_kernel"] is not ks["_qattn_fwd_kernel"]:  # (re)point the kernels' globals
        globals().update(ks)
    return ks


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

_NUM_SMS: Dict[object, int] = {}


def _num_sms(device: torch.device) -> int:
    n = _NUM_SMS.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _NUM_SMS[device] = n
    return n


def _poison_codes(*tensors: torch.Tensor) -> None:
    """Like :func:`~.triton_common.poison` for the quantised buffers: NaN for float (fp8 too),
    -128 for int8 (never a code: codes are clamped to +-127)."""
    if tc.poison_outputs():
        for t in tensors:
            if t is None:
                continue
            if t.dtype == torch.int8:
                t.fill_(-128)
            elif t.dtype == FP8_DTYPE:
                t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
            else:
                t.fill_(float("nan"))


class PackedKV:
    """K/V as the attention kernel reads them (one call's worth; see the module docstring)."""

    __slots__ = ("k_codes", "k_scale", "k_mean", "v", "v_scale", "seqlen_pad", "dk", "dq", "dv")

    def __init__(self, k_codes, k_scale, k_mean, v, v_scale, seqlen_pad, dk, dq, dv):
        self.k_codes, self.k_scale, self.k_mean = k_codes, k_scale, k_mean  # (B*Hkv, S_pad, DK), (B*Hkv, S_pad), mean
        self.v, self.v_scale = v, v_scale  # "int8": v itself, None; "fp8": codes (B*Hkv, DV, S_pad), scale
        self.seqlen_pad, self.dk, self.dq, self.dv = seqlen_pad, dk, dq, dv


def quantize_kv_triton(k: torch.Tensor, v: torch.Tensor, quant: str, varlen: bool,
                       head_split: Optional[str] = None, tiles: Optional[QuantTiles] = None) -> PackedKV:
    """Quantise K (smoothed INT8) and, for ``"fp8"``, V (e4m3 per channel) in two launches;
    dense k/v (B, Sk, Hkv, D) or packed varlen (Tk, Hkv, D) (one mean and one V scale over all
    tokens, as :func:`~qwen3vl_flash.quant.quantize.quantize_qkv`)."""
    tiles = QUANT_TILES if tiles is None else tiles
    if head_split is None:
        head_split = tiles.fp8_head_split if quant == "fp8" else tiles.head_split
    ks = _kernels()
    k, v = tc.contig_last(k), tc.contig_last(v)
    if varlen:
        B, S = 1, k.shape[0]
        sk = (0, k.stride(0), k.stride(1))
        sv = (0, v.stride(0), v.stride(1))
    else:
        B, S = k.shape[0], k.shape[1]
        sk = (k.stride(0), k.stride(1), k.stride(2))
        sv = (v.stride(0), v.stride(1), v.stride(2))
    Hkv, D = k.shape[-2], k.shape[-1]
    fp8 = quant == "fp8"
    dq = qk_split(D, head_split)
    dk = dq[0] + dq[1]
    dv = tc.split_head_dim(D, head_split) if fp8 else tc.effective_split(D, head_split, v)
    dvs = dv[0] + dv[1]
    block_d = tc.next_pow2(max(D, dk, dvs, 16))
    dev = k.device
    s_pad = max(16, (S + 15) // 16 * 16)  # fp8 rows of the transposed V: 16-byte aligned
    block_s = tiles.quant_block_s
    # chunks: about quant_programs_per_sm programs per SM over (chunks, B * Hkv), whole blocks each
    want = max(1, (tiles.quant_programs_per_sm * _num_sms(dev)) // max(1, B * Hkv))
    chunk = max(block_s, triton_cdiv(triton_cdiv(max(S, 1), want), block_s) * block_s)
    num_chunks = max(1, triton_cdiv(max(S, 1), chunk))
    nc_p2 = tc.next_pow2(num_chunks)
    k_sum = torch.empty((B * Hkv, num_chunks, block_d), dtype=torch.float32, device=dev)
    v_max = torch.empty_like(k_sum) if fp8 else k_sum
    k_codes = torch.empty((B * Hkv, s_pad, dk), dtype=torch.int8, device=dev)
    k_scale = torch.empty((B * Hkv, s_pad), dtype=torch.float32, device=dev)
    mean_shape = (1, Hkv, D) if varlen else (B, 1, Hkv, D)
    k_mean = torch.empty(mean_shape, dtype=torch.float32, device=dev)
    if fp8:
        v_codes = torch.empty((B * Hkv, dvs, s_pad), dtype=FP8_DTYPE, device=dev)
        v_scale = torch.empty(mean_shape, dtype=torch.float32, device=dev)
    else:
        v_codes, v_scale = k_codes, k_mean  # never written (FP8 off)
    _poison_codes(k_codes, k_scale, k_mean, *((v_codes, v_scale) if fp8 else ()))
    if S > 0:
        grid = (num_chunks, B * Hkv)
        ks["_kv_stats_kernel"][grid](
            k, v, k_sum, v_max, *sk, *sv, S, Hkv, chunk,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=block_s, FP8=fp8, num_warps=4)
        ks["_kv_quant_kernel"][grid](
            k, v, k_sum, v_max, k_codes, k_scale, k_mean, v_codes, v_scale, *sk, *sv,
            S, s_pad, Hkv, chunk, num_chunks,
            HEAD_DIM=D, BLOCK_D=block_d, DK=dk, DV=dvs, BLOCK_S=block_s, NUM_CHUNKS_P2=nc_p2, FP8=fp8,
            EMULATE_FP8=tc.interpreting(), num_warps=4)
    else:  # no keys: torch's mean of nothing is NaN; nothing reads it (every row sees no key)
        k_mean.zero_()
        if fp8:
            v_scale.fill_(1.0)
    if fp8:
        return PackedKV(k_codes, k_scale, k_mean, v_codes, v_scale, s_pad, dk, dq, dv)
    return PackedKV(k_codes, k_scale, k_mean, v, None, s_pad, dk, dq, dv)


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


_TUNED: Dict[tuple, dict] = {}


def _starts_aligned(cu: torch.Tensor, n: int) -> bool:
    """Whether every segment starts at a multiple of ``n`` keys, so the kernel may say so to the
    compiler (the transposed FP8 V codes then load 16 bytes at a time). Reading device offsets
    syncs the host once per call (about the cost of one small copy); while a CUDA graph is
    being captured the answer is False (no sync allowed there), which is only slower."""
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool((cu.remainder(n) == 0).all().item())


def quant_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    quant: str,
    softmax_scale: float,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    need_lse: bool = False,
    *,
    config: Optional[dict] = None,
    head_split: Optional[str] = None,
    reverse_m: Optional[bool] = None,
    tiles: Optional[QuantTiles] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Quantised attention forward on the Triton kernels: ``(out, lse | None)``.

    q (B, Sq, H, D), k/v (B, Sk, Hkv, D) float16/bfloat16, or packed varlen q (Tq, H, D), k/v
    (Tk, Hkv, D) with ``cu_seqlens_q/k`` int32 (N+1,) and ``max_seqlen_q/k``. ``quant`` "int8" /
    "fp8" (formats: :mod:`qwen3vl_flash.quant.quantize`). Causal is bottom-right aligned;
    ``window`` is (left, right) with -1 unbounded; H % Hkv == 0 (GQA). Returns out like q (input
    dtype) and, when ``need_lse``, lse float32 (B, H, Sq) / (H, Tq) of the unquantised-K softmax
    (the smoothing shift added back); a row that sees no key gets 0 and lse -inf.

    Keyword-only knobs (tests, benchmarks): ``config`` {"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages"} (None: ``tiles``' table, else autotuned once per shape class on GPU, the
    interpreter tile on CPU); ``head_split`` "split" / "pad" for head dims that are no power of
    two (None: ``tiles.head_split``); ``reverse_m`` (None: ``tiles.reverse_m``, only under a right-bounded mask).

    Raises ValueError for an unknown ``quant`` or a call :func:`quant_triton_serves` refuses.
    Inputs are not validated further (the public functions do that)."""
    why = quant_triton_serves(q, k, quant)
    if why is not None:
        raise ValueError(f"quant={quant!r}: the Triton kernels cannot run this call: {why}")
    tiles = QUANT_TILES if tiles is None else tiles
    if head_split is None:
        head_split = tiles.fp8_head_split if quant == "fp8" else tiles.head_split
    ks = _kernels()
    varlen = cu_seqlens_q is not None
    q = tc.contig_last(q)
    D = q.shape[-1]
    H, Hkv = q.shape[-2], k.shape[-2]
    fp8 = quant == "fp8"
    packed = quantize_kv_triton(k, v, quant, varlen, head_split, tiles)
    if varlen:
        Tq = q.shape[0]
        B = cu_seqlens_q.numel() - 1
        Sq, Sk = int(max_seqlen_q), int(max_seqlen_k)
        lse = torch.empty((H, Tq), dtype=torch.float32, device=q.device) if need_lse else None
        sq = (0, q.stride(0), q.stride(1))
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device) if need_lse else None
        sq = (q.stride(0), q.stride(1), q.stride(2))
        cu_q = cu_k = q  # never read when VARLEN is False
    out = torch.empty_like(q)
    tc.poison(out, *((lse,) if lse is not None else ()))
    if need_lse:
        sl = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    else:
        sl = (0, 0)
    so = (0, out.stride(0), out.stride(1)) if varlen else (out.stride(0), out.stride(1), out.stride(2))
    if fp8:  # transposed codes (B*Hkv, DV, S_pad): per (b, kv head) stride, per channel stride
        vt = packed.v
        sv = (0, 0, vt.stride(0), vt.stride(1))
    else:
        vv = tc.contig_last(packed.v)
        packed.v = vv
        sv = ((0, vv.stride(0), vv.stride(1), 1) if varlen else (vv.stride(0), vv.stride(1), vv.stride(2), 1))
    left, right = fold_window(causal, window)
    if reverse_m is None:
        reverse_m = tiles.reverse_m
    statics = dict(
        HEAD_DIM=D, DK=packed.dk, DQ0=packed.dq[0], DQ1=packed.dq[1], DV0=packed.dv[0], DV1=packed.dv[1],
        VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, REVERSE_M=bool(reverse_m) and right >= 0,
        POS_SCALE=softmax_scale > 0, FP8=fp8, EMULATE_FP8=tc.interpreting(), NEED_LSE=bool(need_lse),
        DOT_PREC=tc.dot_precision(q.dtype),
        I2F_MAGIC=tiles.score_convert == "magic", EXP_F16=fp8 and tiles.fp8_exp == "f16x2",
        FP8_TC_ACC=fp8 and tiles.fp8_accumulate == "tensor_core",
        ALIGN8=tiles.align8 and all(x % 8 == 0 for x in (*sq, *so, *sv[:3]))
        and all(t.data_ptr() % 16 == 0 for t in (q, out, packed.v)),
        KSTART16=varlen and fp8 and tiles.align8 and _starts_aligned(cu_seqlens_k, 16),  # the V^T codes
    )
    qk_scale = tc.log2_scale(softmax_scale)

    def launch(cfg):
        grid = (triton_cdiv(max(Sq, 1), cfg["BLOCK_M"]), B * H)
        ks["_qattn_fwd_kernel"][grid](
            q, packed.k_codes, packed.k_scale, packed.k_mean, packed.v,
            packed.v_scale if fp8 else packed.k_mean, out, lse if need_lse else out, cu_q, cu_k,
            *sq, *sv, *so, *sl,
            Sq, Sk, packed.seqlen_pad, H, Hkv, H // Hkv,
            qk_scale, float(softmax_scale), left, right,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **statics)

    if config is None:
        tile = tiles.lookup(quant, D) if not tc.interpreting() else tiles.interpret
        if tile is not None:
            config = tile.as_config()
        else:
            key = ("qfwd", quant, D, head_split, q.dtype, varlen, left >= 0, right >= 0, bool(need_lse),
                   tc.next_pow2(max(Sq, Sk)), q.device.index)
            config = tc.autotune(launch, key, tiles.autotune, tiles.interpret)
    launch(config)
    return out, lse


def quantize_qkv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant: str, varlen: bool,
                        head_split: Optional[str] = None) -> QuantizedQKV:
    """The Triton quantisers' output in :func:`~qwen3vl_flash.quant.quantize.quantize_qkv`'s
    layout and meaning (codes like q / k / v, scales ``x.shape[:-1]``, mean and V scale
    ``(B, 1, Hkv, D)`` / ``(1, Hkv, D)``), for tests and other callers. The attention kernel
    quantises Q itself (same helpers, in its prologue) and reads K/V in the packed layout."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    ks = _kernels()
    q = tc.contig_last(q)
    D = q.shape[-1]
    H = q.shape[-2]
    if varlen:
        Bq, Sq = 1, q.shape[0]
        sq = (0, q.stride(0), q.stride(1))
    else:
        Bq, Sq = q.shape[0], q.shape[1]
        sq = (q.stride(0), q.stride(1), q.stride(2))
    q_codes = torch.empty(q.shape, dtype=torch.int8, device=q.device)
    q_scale = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    _poison_codes(q_codes, q_scale)
    block_s = 32
    if Sq > 0:
        ks["_quant_q_kernel"][(triton_cdiv(Sq, block_s), Bq * H)](
            q, q_codes, q_scale, *sq, Sq, H, HEAD_DIM=D, BLOCK_D=tc.next_pow2(max(D, 16)), BLOCK_S=block_s,
            num_warps=4)
    p = quantize_kv_triton(k, v, quant, varlen, head_split)
    S = k.shape[0] if varlen else k.shape[1]
    Hkv = k.shape[-2]
    B = 1 if varlen else k.shape[0]
    kc = p.k_codes.view(B, Hkv, p.seqlen_pad, p.dk)[:, :, :S, :D].permute(0, 2, 1, 3)
    ksc = p.k_scale.view(B, Hkv, p.seqlen_pad)[:, :, :S].permute(0, 2, 1)
    if varlen:
        kc, ksc = kc[0], ksc[0]
    if quant == "fp8":
        vc = p.v.view(B, Hkv, -1, p.seqlen_pad)[:, :, :D, :S].permute(0, 3, 1, 2)
        if varlen:
            vc = vc[0]
        return QuantizedQKV(q_codes, q_scale, kc, ksc, p.k_mean, vc, p.v_scale)
    return QuantizedQKV(q_codes, q_scale, kc, ksc, p.k_mean, v, None)


# the scalar constants the kernels fold in, for tests: 127 and 448 as in quantize.py
assert INT8_MAX == 127.0 and FP8_MAX == 448.0, "the kernels hard-code quantize.py's INT8_MAX / FP8_MAX"
