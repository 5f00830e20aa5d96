"""The portable quantised attention: the formats of :mod:`.quantize`, computed with PyTorch ops.

The CPU path, CI's reference for the Triton kernels, and the fallback on any device. It runs the
arithmetic the kernels run, not an approximation of it:

* Scores: the INT8 codes of Q and of the smoothed K are multiplied as float32 tensors holding
  integers. Every product is at most 127^2 and a row sums at most ``D <= 1024`` of them, so every
  partial sum is an integer below 2^24 that float32 holds exactly, whatever order the BLAS adds
  in: the result *is* the int32 accumulation of an INT8 tensor core. (On CUDA, where TF32 may be
  switched on for float32 matmuls, the products are taken in float64 instead.) The integer score
  is then dequantised in fp32, ``s = dot * (q_scale * softmax_scale) * k_scale`` (the softmax
  scale folded into the per-row scale, as a kernel does; one fp32 rounding apart from the
  formula's order).
* Online softmax (FA2) in fp32 over key tiles of ``block_n``: running row max ``m``, row sum
  ``l`` of the *unrounded* P, accumulator rescaled by ``exp(m_old - m_new)``. Memory is
  O(block_m * block_n) per KV head beyond the O(seq) quantised copies.
* P.V, ``"int8"``: P rounded to V's dtype (bf16/fp16), multiplied by V with fp32 results
  (operands upcast exactly; the sum is fp32).
* P.V, ``"fp8"``: P stored as ``fp8_e4m3(P * 448)`` and V as its per-channel e4m3 codes, both
  cast with torch's ``float8_e4m3fn`` (round to nearest even), then an fp32 matmul: a product
  of two e4m3 numbers has 8 significant bits, exact in fp32; the sums are fp32. At the end
  ``out = acc * v_scale / 448 / l``. This emulation runs on any device; the public functions
  refuse ``"fp8"`` off GPUs with FP8 tensor cores (:func:`.quantize.check_quant`).

Masking, GQA folding and the tile walk are the ``tiled`` backend's (``_Tiling``, the fold of the
``g = H // Hkv`` query heads of a KV head into the rows), so causal (bottom-right), windows and
rows that see no key (output 0, lse -inf) follow :mod:`qwen3vl_flash.conventions` exactly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._host import host_values
from ..backends.tiled import _fold, _kv_heads_first, _kv_transposed, _Tiling, _unfold
from .quantize import P_SCALE, QUANT_MODES, lse_shift, quantize_p_fp8, quantize_qkv

__all__ = ["quant_attention_portable"]

# 127^2 * D < 2^24 keeps every partial sum of the integer dot exact in float32
_MAX_EXACT_HEAD_DIM = 1024
BLOCK_M = 256  # folded query rows per tile
BLOCK_N = 512  # keys per tile


def _dot_dtype(device: torch.device) -> torch.dtype:
    """float32 where a float32 matmul is a true float32 matmul (the CPU; CUDA with TF32 off),
    else float64 (TF32 keeps 10 mantissa bits and would round the integer products)."""
    if device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                  or torch.get_float32_matmul_precision() != "highest"):
        return torch.float64
    return torch.float32


def _attend_quantised(qc, qs, kc, ks, v_op, v_scale, p_dtype, softmax_scale: float, causal: bool,
                      window: Tuple[int, int], block_m: int, block_n: int, out_dtype: torch.dtype):
    """One dense batch of quantised operands -> out (B, Sq, H, D) in ``out_dtype``, lse (B, H, Sq)
    float32 of the *smoothed* scores (no shift).

    qc int8 (B, Sq, H, D), qs float32 (B, Sq, H); kc int8 (B, Sk, Hkv, D), ks float32 (B, Sk, Hkv);
    v_op (B, Sk, Hkv, D): V in its 16-bit dtype (``p_dtype`` = that dtype: P is rounded to it) or
    its e4m3 codes (``p_dtype`` = float8_e4m3fn, ``v_scale`` float32 (B, 1, Hkv, D))."""
    B, Sq, H, D = qc.shape
    Sk, Hkv = kc.shape[1], kc.shape[2]
    g = H // Hkv
    dev = qc.device
    f32 = torch.float32
    dot_t = _dot_dtype(dev)
    fp8 = p_dtype == torch.float8_e4m3fn
    q_int = _fold(qc, Hkv, dot_t)  # (BH, R, D), integer-valued
    row_scale = _fold(qs.unsqueeze(-1), Hkv, f32).mul_(softmax_scale)  # (BH, R, 1)
    k_int = _kv_transposed(kc, dot_t)  # (BH, D, Sk), integer-valued
    col_scale = ks.transpose(1, 2).reshape(B * Hkv, 1, Sk).to(f32)  # (BH, 1, Sk)
    vh = _kv_heads_first(v_op, f32)  # (BH, Sk, D): e4m3 or 16-bit values, exact in fp32
    v_chan = v_scale.transpose(1, 2).reshape(B * Hkv, 1, D).to(f32) if fp8 else None  # (BH, 1, D)
    BH, R = q_int.shape[0], q_int.shape[1]
    out = torch.empty(BH, R, D, dtype=out_dtype, device=dev)
    lse_rows = torch.empty(BH, R, dtype=f32, device=dev)
    tiling = _Tiling(Sq, Sk, g, causal, window, block_n, dev, f32)
    ninf = float("-inf")
    for r0 in range(0, R, block_m):
        r1 = min(r0 + block_m, R)
        qb, rs = q_int[:, r0:r1], row_scale[:, r0:r1]
        m = torch.full((BH, r1 - r0), ninf, dtype=f32, device=dev)  # running row max
        l = torch.zeros(BH, r1 - r0, dtype=f32, device=dev)  # running row sum of unrounded P
        acc = torch.zeros(BH, r1 - r0, D, dtype=f32, device=dev)
        for c0, c1, bias, _ in tiling.tiles(r0, r1):
            s = torch.bmm(qb, k_int[:, :, c0:c1])  # (BH, rows, cols): the exact int32 dot
            if s.dtype != f32:
                s = s.to(f32)  # integers below 2^24: exact
            # -- dequantise: s = dot * q_scale * softmax_scale * k_scale, fp32
            s.mul_(rs).mul_(col_scale[:, :, c0:c1])
            if bias is not None:
                s.add_(bias)
            # -- update m and l (rows that have seen no key yet keep m = -inf; their P is 0)
            m_new = torch.maximum(m, s.amax(-1))
            m_ref = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            alpha = torch.exp(m - m_ref)  # 0 where m = -inf: nothing to rescale
            p = s.sub_(m_ref.unsqueeze(-1)).exp_()  # P in [0, 1], fp32
            l.mul_(alpha).add_(p.sum(-1))
            # -- P.V in the mode's operand precision, fp32 results
            p_op = quantize_p_fp8(p) if fp8 else p.to(p_dtype)
            pv = torch.bmm(p_op.to(f32), vh[:, c0:c1])
            acc.mul_(alpha.unsqueeze(-1)).add_(pv)
            m = m_new
        seen = l > 0  # false for rows that see no key: output 0, lse -inf
        l_div = torch.where(seen, l, torch.ones_like(l)).unsqueeze(-1)
        if fp8:
            acc.mul_(v_chan).div_(P_SCALE)
        out[:, r0:r1] = acc.div_(l_div)
        lse_rows[:, r0:r1] = torch.where(seen, m + torch.log(l_div.squeeze(-1)), ninf)
    lse = lse_rows.view(B, Hkv, Sq, g).transpose(2, 3).reshape(B, H, Sq)
    return _unfold(out, B, Sq, H), lse


def quant_attention_portable(
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
    block_n: Optional[int] = None,
    block_m: Optional[int] = None,
):
    """Quantised attention (formats of :mod:`.quantize`) in PyTorch ops, on any device.

    Args:
        q: dense (B, Sq, H, D) or varlen (Tq, H, D); k, v: (B, Sk, Hkv, D) / (Tk, Hkv, D);
            float16 or bfloat16 (the caller validated them: :func:`.quantize.check_quant`).
        quant: "int8" or "fp8" ("fp8" is emulated here on every device).
        softmax_scale: the scale of q.k (a float; the public functions default it to 1/sqrt(D)).
        causal, window: flash-attn's mask, bottom-right aligned (per segment for varlen).
        cu_seqlens_q, cu_seqlens_k: int32 (N+1,) for varlen (both or neither); empty segments
            are allowed. max_seqlen_q / max_seqlen_k are accepted for the kernels' signature.
        need_lse: also return the lse of the true scores (smoothing's shift added back).
        block_n, block_m: keys / folded query rows per tile (None: the module's ``BLOCK_N`` /
            ``BLOCK_M``, read at call time so tests can shrink them).

    Returns:
        (out like q in q's dtype, lse float32 (B, H, Sq) / (H, Tq) or None). Rows that see no
        key give 0 and lse -inf.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if q.shape[-1] > _MAX_EXACT_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {_MAX_EXACT_HEAD_DIM} for exact INT8 scores, got {q.shape[-1]}")
    block_n = BLOCK_N if block_n is None else block_n
    block_m = BLOCK_M if block_m is None else block_m
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block_m and block_n must be >= 1, got {block_m} and {block_n}")
    varlen = cu_seqlens_q is not None
    if varlen != (cu_seqlens_k is not None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    window = (int(window[0]), int(window[1]))
    H = q.shape[-2]
    if varlen:
        out = torch.zeros_like(q)
        lse = torch.full((H, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        if q.shape[0] == 0 or k.shape[0] == 0:
            return out, (lse if need_lse else None)
    else:
        B, Sq = q.shape[0], q.shape[1]
        if q.numel() == 0 or k.shape[1] == 0:
            out = torch.zeros_like(q)
            return out, (torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
                         if need_lse else None)
    qq = quantize_qkv(q, k, v, quant, varlen)
    p_dtype = torch.float8_e4m3fn if quant == "fp8" else v.dtype
    args = (p_dtype, float(softmax_scale), bool(causal), window, int(block_m), int(block_n), q.dtype)
    if not varlen:
        out, lse = _attend_quantised(qq.q_codes, qq.q_scale, qq.k_codes, qq.k_scale, qq.v, qq.v_scale, *args)
    else:
        cq, ck = host_values(cu_seqlens_q), host_values(cu_seqlens_k)
        v_scale = qq.v_scale.unsqueeze(0) if qq.v_scale is not None else None  # (1, 1, Hkv, D)
        for b in range(len(cq) - 1):
            qs_, qe_, ks_, ke_ = cq[b], cq[b + 1], ck[b], ck[b + 1]
            if qe_ == qs_ or ke_ == ks_:
                continue  # rows that see no key: already 0 / -inf
            o, l_ = _attend_quantised(
                qq.q_codes[qs_:qe_].unsqueeze(0), qq.q_scale[qs_:qe_].unsqueeze(0),
                qq.k_codes[ks_:ke_].unsqueeze(0), qq.k_scale[ks_:ke_].unsqueeze(0),
                qq.v[ks_:ke_].unsqueeze(0), v_scale, *args)
            out[qs_:qe_] = o[0]
            lse[:, qs_:qe_] = l_[0]
    if not need_lse:
        return out, None
    # the scores were those of the smoothed K: add softmax_scale * q.mean back (-inf stays -inf)
    return out, lse.add_(lse_shift(q, qq.k_mean, float(softmax_scale), varlen))
