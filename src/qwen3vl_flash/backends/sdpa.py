"""``sdpa``: PyTorch's fused kernels (flash / cuDNN / memory-efficient on GPUs, flash on CPU).

* CPU, when the lse is asked for: we call PyTorch's CPU flash kernel directly
  (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward), which returns the
  log-sum-exp; so on CPUs this backend serves calls that need lse (context parallelism) at
  SDPA's speed. Otherwise ``F.scaled_dot_product_attention`` as on GPUs. GQA expands K/V to the query heads for the kernel (O(seq) memory) and sums the
  group's dK/dV afterwards.
* CUDA (and CPU without lse): ``F.scaled_dot_product_attention`` (PyTorch picks flash, cuDNN or memory-efficient,
  incl. the efficient kernel on Pascal/sm61); no lse, so calls needing one go elsewhere.

PyTorch's ``is_causal`` is aligned top-left, so when Sq != Sk (or with a window) we pass an
explicit bottom-right mask. Rows that see no key are set to 0 output and lse -inf.
Varlen runs one call per segment (what transformers does).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._host import host_values
from ..conventions import fold_window, needs_grad
from ..reference import lse_dtype, visibility_mask
from .base import AttnParams, Backend, register_backend


def _mask_for(Sq: int, Sk: int, p: AttnParams, device):
    """(mask or None, is_causal) for PyTorch: None/False when every key is visible (e.g. causal
    decoding, Sq == 1), PyTorch's own top-left causal when Sq == Sk, else a boolean mask."""
    if not p.has_window and (not p.causal or Sq == 1):
        return None, False
    if p.has_window or Sq != Sk:
        return visibility_mask(Sq, Sk, p.causal, p.window_size, device=device), False
    return None, True


def _empty_rows(Sq: int, Sk: int, p: AttnParams) -> Optional[slice]:
    """Rows that see no key, found on the host (no device sync): they form a prefix (causal or a
    right window with Sq > Sk) and/or a suffix (a left window). Returns a boolean row selector."""
    left, right = fold_window(p.causal, p.window_size)
    off = Sk - Sq
    first = max(0, -off - right) if right >= 0 else 0  # rows < first see nothing
    last = Sk - 1 - off + left if left >= 0 else Sq - 1  # rows > last see nothing
    if first == 0 and last >= Sq - 1:
        return None
    rows = torch.zeros(Sq, dtype=torch.bool)
    rows[: min(first, Sq)] = True
    if last < Sq - 1:
        rows[max(last + 1, 0):] = True
    return rows


class _CpuFlash(torch.autograd.Function):
    """PyTorch's CPU flash kernel with its lse, q/k/v in our (B, S, H, D) layout."""

    @staticmethod
    def forward(ctx, q, k, v, p: AttnParams):
        B, Sq, H, D = q.shape
        Sk, Hkv = k.shape[1], k.shape[2]
        g = H // Hkv
        qt = q.transpose(1, 2)
        kt = k.transpose(1, 2)
        vt = v.transpose(1, 2)
        if g > 1:  # (B, Hkv, Sk, D) -> (B, H, Sk, D): the kernel has no GQA
            kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
        mask, is_causal = _mask_for(Sq, Sk, p, q.device)
        add_mask = None
        if mask is not None:
            add_mask = torch.zeros(Sq, Sk, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal, attn_mask=add_mask, scale=p.softmax_scale
        )
        # the CPU kernel returns out 0 and lse 0 for a query row holding a NaN when it has no mask
        # (the NaN vanishes); one pass over q puts it back (docs/reliability.md, "NaN and Inf")
        nan_q = torch.isnan(qt).any(-1, keepdim=True)
        out.masked_fill_(nan_q, float("nan"))
        lse.masked_fill_(nan_q.squeeze(-1), float("nan"))
        ctx.save_for_backward(qt, kt, vt, out, lse, add_mask if add_mask is not None else torch.empty(0))
        ctx.meta = (is_causal, add_mask is not None, p.softmax_scale, g, Hkv)
        lse_out = lse.to(lse_dtype(q.dtype))
        empty = _empty_rows(Sq, Sk, p)
        if empty is not None:
            empty = empty.to(q.device)
            out = out.masked_fill(empty.view(1, 1, Sq, 1), 0.0)
            lse_out = lse_out.masked_fill(empty.view(1, 1, Sq), float("-inf"))
        ctx.mark_non_differentiable(lse_out)
        return out.transpose(1, 2), lse_out

    @staticmethod
    def backward(ctx, dout, _dlse):
        qt, kt, vt, out, lse, add_mask = ctx.saved_tensors
        is_causal, has_mask, scale, g, Hkv = ctx.meta
        dt = qt.dtype
        dout = dout.transpose(1, 2)
        if dt in (torch.float16, torch.bfloat16):
            # PyTorch's 16-bit CPU backward rounds its partial dV/dK sums to the input dtype: with
            # many queries over few keys dV is 4-6x PyTorch's own bf16 error (docs/reliability.md,
            # item 6). In float32 it is exact by the rule, 10x faster for fp16 on CPUs without fp16
            # dot products and 1.5x slower for bf16 on an AVX-512 BF16 EPYC (measured 2026-12-07)
            qt, kt, vt, out, dout = (t.float() for t in (qt, kt, vt, out, dout))
            if has_mask:
                add_mask = add_mask.float()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, qt, kt, vt, out, lse, 0.0, is_causal,
            attn_mask=add_mask if has_mask else None, scale=scale,
        )
        if g > 1:  # the group sum before the one rounding to the input dtype (16-bit: in fp32)
            B, H, Sk, D = dk.shape
            dk = dk.view(B, Hkv, g, Sk, D).sum(2)
            dv = dv.view(B, Hkv, g, Sk, D).sum(2)
        dq, dk, dv = (x.to(dt).transpose(1, 2) for x in (dq, dk, dv))
        return dq, dk, dv, None


def _torch_dense(q, k, v, p: AttnParams):
    """F.scaled_dot_product_attention on (B, S, H, D) tensors -> (B, Sq, H, D)."""
    Sq, Sk = q.shape[1], k.shape[1]
    mask, is_causal = _mask_for(Sq, Sk, p, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
        scale=p.softmax_scale, enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)
    empty = _empty_rows(Sq, Sk, p)  # some kernels return NaN there; the contract says 0
    if empty is not None:
        out = out.masked_fill(empty.to(q.device).view(1, Sq, 1, 1), 0.0)
    if q.device.type == "cpu":  # the CPU flash kernel turns a query row holding a NaN into 0s
        out = out.masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))
    return out, None


def _dense(q, k, v, p: AttnParams):
    # on CPUs through the flash kernel with our backward whenever an lse or a 16-bit gradient is due
    if q.device.type == "cpu" and (p.need_lse or (q.dtype in (torch.float16, torch.bfloat16)
                                                  and needs_grad(q, k, v))):
        return _CpuFlash.apply(q, k, v, p)
    return _torch_dense(q, k, v, p)  # PyTorch's own dispatch (GQA without expanding K/V)


class SdpaBackend(Backend):
    name = "sdpa"
    native_autograd = True

    def check(self, req):
        if req.need_lse and req.device_type != "cpu":
            return "PyTorch SDPA does not return the log-sum-exp on GPUs (use triton, tiled or eager)"
        if req.device_type not in ("cpu", "cuda"):
            return f"device type {req.device_type!r} is not served by this backend"
        return None

    def attention(self, q, k, v, p: AttnParams):
        if not p.varlen:
            return _dense(q, k, v, p)
        cq, ck = host_values(p.cu_seqlens_q), host_values(p.cu_seqlens_k)
        outs, lses = [], []
        H = q.shape[1]
        kv_used = False
        for b in range(len(cq) - 1):
            qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
            if qe == qs:
                continue
            if ke == ks:  # no keys: zeros (kept in the graph) and lse -inf
                outs.append(0 * q[qs:qe])
                lses.append(torch.full((H, qe - qs), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device))
                continue
            o, l = _dense(q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0), p)
            outs.append(o[0])
            lses.append(l[0] if l is not None else None)
            kv_used = True
        out = torch.cat(outs, 0)
        if not kv_used:  # no segment has both queries and keys: k/v stay in the graph (zero gradients)
            out = out + (k[:0].sum() + v[:0].sum())
        lse = torch.cat(lses, 1) if lses and all(x is not None for x in lses) else None
        return out, lse


register_backend(SdpaBackend())
