"""Hugging Face transformers integration: our attention under ``qwen3vl_flash.ATTN_IMPLEMENTATION``.

    import qwen3vl_flash as qf
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, attn_implementation=qf.ATTN_IMPLEMENTATION)
    model = qf.enable(model)                      # or switch a loaded model (text and vision)

What :func:`register` installs (idempotent; verified on transformers 4.57.6 and 5.17):

* ``AttentionInterface[name] = attention_forward``: query/key/value arrive as (B, H, S, D) with K/V
  *not* repeated for GQA; we hand (B, S, H, D) views to :func:`qwen3vl_flash.flash_attn_func` and
  friends. ``is_causal`` is not passed to text layers, so it is read from ``module.is_causal``.
* ``AttentionMaskInterface[name] = attention_mask``: without a mask function a custom name gets
  ``attention_mask=None`` even for padded batches. Ours is transformers' own ``sdpa_mask`` (a 4D
  bool mask, True = attend), except that it returns ``None`` only when every key is valid and
  nothing is padded (q_len == kv_len, or a cache holding exactly the 2D mask's tokens): then
  ``None`` means causal, bottom-right. (5.x's sdpa mask also returns ``None`` for a
  StaticCache prefill, relying on SDPA's *top-left* causal alignment over the zero-padded buffer;
  our causal is bottom-right, so that shortcut is refused.)
* The mask is read once per forward (cached by identity across layers) and turned into the
  cheapest exact call: dense causal (no padding), ``flash_attn_with_kvcache`` with per-row valid
  lengths (StaticCache buffers: empty slots are never attended), or one ``flash_attn_varlen_func``
  over the unpadded tokens (left padding), or one varlen call over the segments of a
  block-diagonal causal mask (packed rows: what transformers builds for them without a cache;
  checked exactly). A mask that is none of these (custom 4D masks) goes to PyTorch SDPA with the
  mask, with a one-time warning.
* Padding-free packing without a mask (``DataCollatorWithFlattening`` with a cache, where
  transformers builds no packed mask): text ``position_ids`` that restart are read as segments, as
  ``flash_attention_2`` reads them, once per forward (one device-to-host copy, prefill-like calls
  only; see :func:`_position_plan`); ``cu_seq_lens_q/k`` when given. Rows whose ids repeat or
  jump (MRoPE rows: 4.57.6 passes ``position_ids[0]`` of 3-row ids) are never read as packed, and
  a mask, when there is one, wins.
* The vision tower: ``Qwen3VLVisionAttention.forward`` is wrapped so that, for our name only, it
  makes ONE varlen call over ``cu_seqlens`` (one segment per image / video frame). transformers
  itself does that only for names it counts as flash ("flash_attention_2" on 4.57, any name with
  "flash" on 5.x); every other name gets one call per frame.
* 5.x rejects a name containing "flash" at load time (``lazy_import_flash_attention`` looks for a
  hub kernel); that look-up is skipped for our name so ``from_pretrained(...,
  attn_implementation=name)`` and ``_from_config`` work.
* ``output_attentions=True`` (or dropout in training) falls back to eager math for that call and
  returns the weights, with a one-time warning.
"""

from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .. import ATTN_IMPLEMENTATION
from .._optional import require
from ..backends import decode_op, decode_op_serves
from ..conventions import DECODE_MAX_QUERIES, needs_grad, warn_once
from ..interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, host_values
from ..monitor import _ACTIVE as _MONITORS  # qf.monitor()
from ..monitor import label_pending as _label_pending
from ..monitor import labelled as _labelled

__all__ = ["register", "enable", "attention_forward", "attention_mask", "attend", "is_registered"]

_REGISTERED = False
_PATCH_MARK = "_qwen3vl_flash_wrapped"
_CP_ATTR = "_qwen3vl_flash_cp_group"
_QUANT_ATTR = "_qwen3vl_flash_quant"  # per attention module: qf.enable(model, quant=...)
# modules whose vision attention gets the single varlen call
_VISION_CLASSES = (
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionAttention"),
)


# --------------------------------------------------------------------------------------------
# the mask: what each query may see, turned into the cheapest exact call
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """How one 4D mask (or a row of packed position ids) maps onto our API.

    ``kind`` is dense | kvcache | varlen | segments | fallback. ``varlen``: the valid tokens
    (``q_valid`` / ``k_valid``) gathered, ``cu_q`` / ``cu_k`` over them (one segment per row for
    padding, several for packed rows with padding). ``segments``: every token valid, q and k
    covering the same positions, ``cu_q`` / ``cu_k`` over the flattened (B * S) tokens (packed
    rows: one segment per sample, causal inside each)."""

    kind: str
    cache_seqlens: Optional[torch.Tensor] = None  # kvcache: int32 (B,) end of each row's valid keys
    cache_leftpad: Optional[torch.Tensor] = None  # kvcache: int32 (B,) start of them (None: 0)
    q_valid: Optional[torch.Tensor] = None  # varlen: bool (B, Sq)
    k_valid: Optional[torch.Tensor] = None  # varlen: bool (B, Sk)
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    max_q: int = 0
    max_k: int = 0


_plan_cache: dict = {}  # (id(mask), causal) -> (weakref(mask), mask._version, plan)


# The analysis reads the mask in chunks of query rows of about this many elements, so its working
# memory stays ~30 bytes per element of one chunk (a few MB) instead of ~9 bytes per element of the
# whole (B, Sq, Sk) mask: 2.4 GB for one packed row of 16k tokens before 2026-12-07.
_CHUNK_ELEMS = 1 << 22


def _row_chunks(B: int, Sq: int, Sk: int):
    step = max(1, _CHUNK_ELEMS // max(1, B * Sk))
    for r0 in range(0, Sq, step):
        yield r0, min(Sq, r0 + step)


def _bool_rows(mask: torch.Tensor, r0: int, r1: int, ok: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Query rows [r0, r1) of a 4D mask as a (B, r, Sk) bool (True = attend). With ``ok`` (a 0-d
    bool on the mask's device), ``ok`` is and-ed in place with whether they are a plain visibility
    mask (no per-head differences, no additive biases other than 0 / -inf): no host sync here."""
    c = mask[:, :, r0:r1]
    if c.shape[1] != 1:
        if ok is not None:
            ok &= (c == c[:, :1]).all()
        c = c[:, :1]
    m = c[:, 0]
    if m.dtype == torch.bool:
        return m
    if not m.is_floating_point():
        return m != 0
    zero = m == 0
    if ok is not None:
        ok &= (zero | (m <= torch.finfo(m.dtype).min / 2)).all()
    return zero


def _matches(mask: torch.Tensor, expect_rows) -> bool:
    """Whether every chunk of rows of ``mask`` equals ``expect_rows(r0, r1)`` ((B, r, Sk) bool);
    one host sync at the end."""
    B, _, Sq, Sk = mask.shape
    same = torch.ones((), dtype=torch.bool, device=mask.device)
    for r0, r1 in _row_chunks(B, Sq, Sk):
        same &= (expect_rows(r0, r1) == _bool_rows(mask, r0, r1)).all()
    return bool(same)


def _key_range(k_valid: torch.Tensor):
    """Per row of a (B, Sk) bool: (first valid key, last valid key + 1), on the device (Sk, 0 when
    none). Equal to k_valid exactly when each row's valid keys form one range."""
    Sk = k_valid.shape[-1]
    idx = torch.arange(Sk, device=k_valid.device)
    return torch.where(k_valid, idx, Sk).amin(-1), torch.where(k_valid, idx + 1, 0).amax(-1)


def _analyse(mask: torch.Tensor, causal: bool, seqlen_k: int) -> _Plan:
    if mask.dim() != 4:
        return _Plan("fallback")
    mask = mask[..., :seqlen_k]
    if mask.shape[-1] != seqlen_k:
        return _Plan("fallback")
    B, _, Sq, Sk = mask.shape
    dev = mask.device
    # one pass: is it a visibility mask; which queries see something (a query row that sees nothing
    # is padding), which keys are seen (a key nobody sees is padding or an empty cache slot), and
    # the first key each query sees (argmax: the first True)
    q_valid = torch.empty(B, Sq, dtype=torch.bool, device=dev)
    k_valid = torch.zeros(B, Sk, dtype=torch.bool, device=dev)
    first = torch.empty(B, Sq, dtype=torch.long, device=dev)
    ok = torch.ones((), dtype=torch.bool, device=dev)
    for r0, r1 in _row_chunks(B, Sq, Sk):
        m = _bool_rows(mask, r0, r1, ok)
        q_valid[:, r0:r1] = m.any(dim=2)
        k_valid |= m.any(dim=1)
        first[:, r0:r1] = m.to(torch.uint8).argmax(dim=2) if Sk else 0
    if not bool(ok):  # one host sync for the whole pass
        return _Plan("fallback")
    first.masked_fill_(~q_valid, Sk)
    nq = q_valid.sum(-1)
    nk = k_valid.sum(-1)
    # the mask our call would apply: valid queries x valid keys, causal bottom-right among them
    rank_q = q_valid.cumsum(-1) - 1
    rank_k = k_valid.cumsum(-1) - 1
    shift = (rank_q + (nk - nq).unsqueeze(1)).unsqueeze(2)

    def expect(r0, r1):
        e = q_valid[:, r0:r1].unsqueeze(2) & k_valid.unsqueeze(1)
        if causal:
            e &= rank_k.unsqueeze(1) <= shift[:, r0:r1]
        return e

    if not _matches(mask, expect):
        return _analyse_segments(mask, first, q_valid, k_valid, causal)
    if bool(q_valid.all()):
        if bool(k_valid.all()):
            return _Plan("dense")
        prefix = torch.arange(Sk, device=dev).unsqueeze(0) < nk.unsqueeze(1)
        if torch.equal(prefix, k_valid):
            return _Plan("kvcache", cache_seqlens=nk.to(torch.int32))
        # one range of keys per row (left padding, then the row's tokens, then empty slots): the
        # split-KV path reads [start, end) in place, no packing copy of the cache
        idx = torch.arange(Sk, device=dev)
        start, end = _key_range(k_valid)
        if torch.equal((idx >= start.unsqueeze(1)) & (idx < end.unsqueeze(1)), k_valid):
            return _Plan("kvcache", cache_seqlens=end.to(torch.int32), cache_leftpad=start.to(torch.int32))
    cu_q = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu_k = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu_q[1:] = nq.cumsum(0)
    cu_k[1:] = nk.cumsum(0)
    return _Plan("varlen", q_valid=q_valid, k_valid=k_valid, cu_q=cu_q, cu_k=cu_k,
                 max_q=int(nq.max()), max_k=int(nk.max()))


def _analyse_segments(mask: torch.Tensor, first: torch.Tensor, q_valid: torch.Tensor, k_valid: torch.Tensor,
                      causal: bool) -> _Plan:
    """A 4D visibility mask read as packed segments (block-diagonal, ``causal`` bottom-right
    inside each block; padding rows/keys allowed), else the fallback plan. ``first``: (B, Sq) the
    first key each query sees (Sk for none).

    Each valid query's segment starts at the first key it sees; those keys cut every row into
    segments. The mask one varlen call over those segments would apply is rebuilt and compared
    with ``mask`` exactly (chunk by chunk of query rows), so any other pattern (sliding windows,
    bidirectional blocks, segments that interleave) keeps the exact fallback. What transformers
    builds for packed rows without a cache (``packed_sequence_mask_function``, 4.57 and 5.x) is
    such a mask."""
    B, _, Sq, Sk = mask.shape
    dev = mask.device
    starts = torch.zeros(B, Sk + 1, dtype=torch.bool, device=dev)
    starts.scatter_(1, first, True)
    seg_k = starts[:, :Sk].long().cumsum(-1) - 1  # (B, Sk): the segment each key falls in
    seg_q = seg_k.gather(1, first.clamp_max(Sk - 1))  # (B, Sq): the segment of each query's first key
    n_seg = starts[:, :Sk].sum(-1)
    offset = (n_seg.cumsum(0) - n_seg).unsqueeze(1)  # segments numbered across the batch, row-major
    gq, gk = (seg_q + offset)[q_valid], (seg_k + offset)[k_valid]  # valid tokens, in row-major order
    if gq.numel() == 0 or bool((gq[1:] < gq[:-1]).any()):  # varlen needs the segments in order
        return _Plan("fallback")
    n = int(n_seg.sum())
    cnt_q = torch.bincount(gq, minlength=n)
    cnt_k = torch.bincount(gk, minlength=n)
    cu_q = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    cu_k = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    cu_q[1:] = cnt_q.cumsum(0)
    cu_k[1:] = cnt_k.cumsum(0)
    if causal:  # bottom-right inside each segment, by rank among its valid tokens
        rank_q = torch.zeros(B, Sq, dtype=torch.long, device=dev)
        rank_k = torch.zeros(B, Sk, dtype=torch.long, device=dev)
        rank_q[q_valid] = torch.arange(gq.numel(), device=dev) - cu_q[gq].long()
        rank_k[k_valid] = torch.arange(gk.numel(), device=dev) - cu_k[gk].long()
        g = (seg_q + offset).clamp(0, max(n - 1, 0))
        bound = (rank_q + (cnt_k - cnt_q)[g]).unsqueeze(2)  # (B, Sq, 1)

    def expect(r0, r1):
        e = (seg_q[:, r0:r1].unsqueeze(2) == seg_k.unsqueeze(1)) & q_valid[:, r0:r1].unsqueeze(2) \
            & k_valid.unsqueeze(1)
        if causal:
            e &= rank_k.unsqueeze(1) <= bound[:, r0:r1]
        return e

    if not _matches(mask, expect):
        return _Plan("fallback")
    max_q, max_k = int(cnt_q.max()), int(cnt_k.max())
    if Sq == Sk and bool(q_valid.all()) and bool(k_valid.all()):
        return _Plan("segments", cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k)
    return _Plan("varlen", q_valid=q_valid, k_valid=k_valid, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k)


_pos_cache: dict = {}  # (id(position_ids), B, S) -> (weakref, _version, plan or None)


def _segments_from_positions(pos: torch.Tensor) -> Optional[_Plan]:
    """Packed rows read off text position ids (B, S), on the host; None when nothing is packed.

    A new segment starts wherever a position is not the previous one + 1 (transformers' own rule,
    ``find_packed_sequence_indices``), and only where the ids *restart*: back to the row's first
    id, or below the previous one. Rows with any other step (a repeat or a jump up: MRoPE rows,
    which 4.57.6 hands to attention as ``position_ids[0]`` when it gets 3-row ids) are not read as
    packed at all; neither is a batch where one such row occurs."""
    p = pos.detach().to("cpu", torch.long)  # one device-to-host copy per forward (cached by caller)
    B, S = p.shape
    if S < 2:
        return None
    prev, cur = p[:, :-1], p[:, 1:]
    cut = cur != prev + 1
    restart = (cur == p[:, :1]) | (cur < prev)
    if not bool(cut.any()) or not bool((restart | ~cut).all()):
        return None
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = cut
    begin = starts.flatten().nonzero().flatten()  # segment starts in the flattened (B * S) row
    lens = torch.diff(begin, append=torch.tensor([B * S]))
    cu = torch.zeros(begin.numel() + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.to(pos.device)
    return _Plan("segments", cu_q=cu, cu_k=cu, max_q=int(lens.max()), max_k=int(lens.max()))


@torch.compiler.disable
def _position_plan(position_ids, B: int, S: int) -> Optional[_Plan]:
    """The packed-segments plan for a prefill-like call (q and k over the same S positions) from
    the text position ids transformers passes to attention, or None (not packed / not readable).

    transformers passes the text row as ``position_ids`` (B, S) (4.57.6: ``position_ids[0]`` of
    the 3- or 4-row ids it got, a (B, S) collator row expanded; 5.x: row 0 of 4-row ids, None for
    3-row MRoPE-only ids). Read once per forward (every layer gets the same tensor object): one
    device-to-host copy of the ids, on prefill-like calls only (never on decode: q_len < kv_len)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        return None
    pos = position_ids
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.dim() != 2 or pos.shape[-1] != S or pos.shape[0] not in (1, B):
        return None
    if pos.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    key = (id(position_ids), B, S)
    hit = _pos_cache.get(key)
    if hit is not None and hit[0]() is position_ids and hit[1] == position_ids._version:
        return hit[2]
    plan = _segments_from_positions(pos.expand(B, S))
    if len(_pos_cache) > 64:
        _pos_cache.clear()
    try:
        _pos_cache[key] = (weakref.ref(position_ids), position_ids._version, plan)
    except TypeError:  # a tensor subclass without weak references: no caching
        pass
    return plan


def _segments_attention(qt, kt, vt, plan: _Plan, scale: float, causal: bool, quant: Optional[str] = None):
    """One varlen call over packed rows; qt/kt/vt (B, S, H|Hkv, D) views -> (B, S, H, D)."""
    B, S, H, D = qt.shape
    if B == 1:
        q, k, v = qt[0], kt[0], vt[0]  # views, no copy
    else:
        q, k, v = qt.reshape(B * S, H, D), kt.reshape(B * S, *kt.shape[2:]), vt.reshape(B * S, *vt.shape[2:])
    out = flash_attn_varlen_func(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
                                 softmax_scale=scale, causal=causal, quant=quant)
    return out.view(B, S, H, D)


def _plan_mask(plan: _Plan, B: int, S: int, causal: bool) -> torch.Tensor:
    """(B, 1, S, S) bool mask of a segments plan (for the eager path)."""
    cu = plan.cu_q.long()
    seg = torch.arange(cu.numel() - 1, device=cu.device).repeat_interleave(cu[1:] - cu[:-1]).view(B, S)
    mask = seg.unsqueeze(2) == seg.unsqueeze(1)
    if causal:
        mask &= torch.ones(S, S, dtype=torch.bool, device=cu.device).tril()
    return mask.unsqueeze(1)


@torch.compiler.disable  # host-side analysis: a graph break under torch.compile, never a recompile
def _plan_for(mask: torch.Tensor, causal: bool, seqlen_k: int) -> _Plan:
    """Every layer of a forward gets the same mask object: analyse it once (one host sync)."""
    key = (id(mask), causal, seqlen_k)
    hit = _plan_cache.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    plan = _analyse(mask, causal, seqlen_k)
    if len(_plan_cache) > 64:
        _plan_cache.clear()
    _plan_cache[key] = (weakref.ref(mask), mask._version, plan)
    return plan


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def _eager(q, k, v, mask, causal: bool, scale: float, dropout: float = 0.0, training: bool = False):
    """Materialised attention that also returns the weights. q (B, H, Sq, D), k/v (B, Hkv, Sk, D).

    Returns out (B, Sq, H, D) and weights (B, H, Sq, Sk) in q's dtype."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        mask = mask[..., :Sk]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    elif causal:
        j = torch.arange(Sk, device=q.device)
        i = torch.arange(Sq, device=q.device).unsqueeze(1) + (Sk - Sq)
        scores = scores.masked_fill(j > i, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    if dropout > 0.0 and training:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights


def _sdpa_with_mask(q, k, v, mask, scale: float):
    """transformers-equivalent SDPA with an arbitrary 4D mask; q (B, H, Sq, D) -> (B, Sq, H, D)."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    mask = mask[..., : k.shape[2]]
    if mask.dtype == torch.bool:  # rows that see nothing give 0, not NaN
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | empty
    else:
        empty = None
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2).contiguous()


def _decode_op_serves(q, k) -> bool:
    """Whether the backends' traceable decode op takes this call; q (B, H, Sq, D), k (B, Hkv, Sk, D)."""
    return decode_op_serves(q.device.type, q.device.index, q.dtype, q.shape[-1], q.shape[1], k.shape[1],
                            q.shape[2], k.shape[2])


def _compiled_decode(q, k, v, mask, scale: float):
    """A decode step under torch.compile: each row's visible keys are read from the mask *on the
    device* as one range [start, end) (a StaticCache row: left padding, then its tokens, then
    empty slots), and the split-KV kernel reads only that range. A mask that is not of that form
    (causal within the range) trips a device-side assert instead of giving wrong attention.
    q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> (B, Sq, H, D)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    mm = mask[..., :Sk]
    mm = mm if mm.dtype == torch.bool else (mm == 0)
    m = mm[:, 0]  # (B, Sq, Sk); a per-head mask must repeat it (checked below with the rest)
    idx = torch.arange(Sk, device=q.device)
    start, end = _key_range(m[:, -1, :])  # the last query sees every key any query sees (causal)
    qpos = end.unsqueeze(1) - Sq + torch.arange(Sq, device=q.device).unsqueeze(0)  # (B, Sq)
    expect = (idx >= start[:, None, None]) & (idx <= qpos.unsqueeze(-1))
    torch._assert_async(torch.all(expect == m) & torch.all(mm == m.unsqueeze(1)),
                        "qwen3vl_flash: a compiled decode step got a mask that is not "
                        "one causal key range per row (padding + causal); run it without torch.compile")
    out, _ = decode_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), end.to(torch.int32),
                       start.to(torch.int32), scale, True)
    return out


def attend(q, k, v, mask=None, causal: bool = True, scale: Optional[float] = None, cp_group=None,
           position_ids: Optional[torch.Tensor] = None, quant: Optional[str] = None):
    """Exact attention for transformers-layout tensors, honouring a transformers mask.

    Args:
        q: (B, H, Sq, D); k, v: (B, Hkv, Sk, D) (GQA: not repeated).
        mask: None (every key valid; ``causal`` aligned bottom-right) or a 4D mask (B, 1|H, Sq, Sk')
            with Sk' >= Sk, bool (True = attend) or additive float (0 / very negative). A
            block-diagonal (packed rows) mask runs as one varlen call over its segments.
        cp_group: a process group for context parallelism (self-attention without mask only).
        position_ids: the text position ids (B, S) or (1, S). Read only when ``mask`` is None
            and q and k cover the same positions (Sq == Sk > 1; not under torch.compile): ids
            that restart (packed rows, e.g. ``DataCollatorWithFlattening``) are segments that
            never see each other. A mask, when given, wins over them.
        quant: None, "int8" or "fp8": prefill-like calls (more than ``DECODE_MAX_QUERIES``
            queries, or as many queries as keys) use ``flash_attn_*(..., quant=quant)``, the
            caller having checked that no gradient is needed; decode steps (few queries against a
            longer history), context-parallel calls, calls under torch.compile and custom masks
            stay exact.

    Returns:
        (B, Sq, H, D), contiguous. Query rows that see no key (padding) are 0.
    """
    if k.dtype in (torch.int8, torch.float8_e4m3fn):  # a qf.QuantizedStaticCache's codes (quant_cache.py)
        from .quant_cache import attend_quantized

        return attend_quantized(q, k, v, mask, causal, scale, position_ids=position_ids, cp_group=cp_group)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if quant is not None and Sq <= DECODE_MAX_QUERIES and Sq < Sk:
        quant = None  # a decode step: exact (a quantised KV cache is the cache's business)
    scale = float(scale) if scale is not None else D ** -0.5
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, S, H, D) views
    if mask is not None and cp_group is None and torch.compiler.is_compiling():
        # Inside a compiled graph (generate's StaticCache + torch.compile) the host-side reading
        # of the mask cannot be traced. Decode steps take the split-KV kernel with each row's key
        # range [start, end) read from the mask on the device; other masked calls run SDPA with
        # the mask. Both are traceable and CUDA-graph capturable, so the graph stays whole.
        if Sq <= DECODE_MAX_QUERIES and causal and not needs_grad(q, k, v) and _decode_op_serves(q, k):
            return _compiled_decode(q, k, v, mask, scale)
        return _sdpa_with_mask(q, k, v, mask, scale)
    plan = None
    if mask is not None:
        plan = _plan_for(mask, causal, Sk)
    elif position_ids is not None and Sq == Sk > 1 and not torch.compiler.is_compiling():
        plan = _position_plan(position_ids, B, Sq)  # prefill-like only: never a sync on decode
    if plan is None:
        plan = _Plan("dense")
    if cp_group is not None and (plan.kind != "dense" or Sq != Sk):
        # each rank holds a shard: a padded batch, packed rows or a KV cache would silently
        # attend to the local shard only, so refuse instead of returning wrong attention
        what = {"dense": "a KV cache", "segments": "packed sequences"}.get(plan.kind, "a padding/custom mask")
        raise ValueError(
            "context parallelism (qf.enable(model, context_parallel=group)) serves unpadded self-attention "
            f"over sharded sequences only; this call has {what} "
            f"(q_len={Sq}, kv_len={Sk}). Run it without padding or packing and with use_cache=False, or call "
            "qf.enable(model, context_parallel=None) first"
        )
    if plan.kind == "dense":
        if cp_group is not None:
            from ..parallel import context_parallel_attn

            out = context_parallel_attn(qt, kt, vt, causal=causal, group=cp_group, softmax_scale=scale)
        elif q.is_cuda and Sq <= DECODE_MAX_QUERIES and Sq < Sk and not needs_grad(q, k, v):
            # decoding against a DynamicCache history: the split-KV decode path reads the cache
            # in place (strided views), with no host syncs and a host cost independent of Sk
            # (cuDNN rebuilds its plan whenever Sk changes); auto falls back to the dense path
            out = flash_attn_with_kvcache(qt, kt, vt, softmax_scale=scale, causal=causal)
        else:
            out = flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=causal, quant=quant)
        return out.contiguous()
    if plan.kind == "segments":
        return _segments_attention(qt, kt, vt, plan, scale, causal, quant)
    grad = needs_grad(q, k, v)
    if plan.kind == "kvcache" and not grad and quant is None:  # a quantised prefill: the varlen path below
        # the lengths come from our own reading of the mask: no second device sync to check them
        return flash_attn_with_kvcache(qt, kt, vt, cache_seqlens=plan.cache_seqlens, softmax_scale=scale,
                                       causal=causal, check_values=False,
                                       cache_leftpad=plan.cache_leftpad).contiguous()
    if plan.kind in ("kvcache", "varlen"):  # kvcache with gradients: the varlen path is differentiable
        if plan.q_valid is None:
            plan = _analyse_varlen(plan, B, Sq, Sk, q.device)
        qp = qt[plan.q_valid]  # (Tq, H, D)
        kp, vp = kt[plan.k_valid], vt[plan.k_valid]
        outp = flash_attn_varlen_func(qp, kp, vp, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
                                      softmax_scale=scale, causal=causal, quant=quant)
        out = qt.new_zeros(B, Sq, H, D)
        out[plan.q_valid] = outp
        return out
    warn_once(("mask", "fallback"), "qwen3vl_flash: this attention mask is not a padding/causal pattern "
              "(custom 4D mask); those calls use PyTorch SDPA with the mask")
    return _sdpa_with_mask(q, k, v, mask, scale)


def _analyse_varlen(plan: _Plan, B: int, Sq: int, Sk: int, device) -> _Plan:
    end = plan.cache_seqlens.long()
    start = plan.cache_leftpad.long() if plan.cache_leftpad is not None else torch.zeros_like(end)
    idx = torch.arange(Sk, device=device).unsqueeze(0)
    k_valid = (idx >= start.unsqueeze(1)) & (idx < end.unsqueeze(1))
    lens = end - start
    q_valid = torch.ones(B, Sq, dtype=torch.bool, device=device)
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=device)
    cu_k = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu_k[1:] = lens.cumsum(0)
    return _Plan("varlen", q_valid=q_valid, k_valid=k_valid, cu_q=cu_q, cu_k=cu_k, max_q=Sq,
                 max_k=int(lens.max()))


_COLLECTOR: list = []  # [the 5.x output collector, or None], looked up once (not under torch.compile)


def _output_collector():
    if not _COLLECTOR:
        try:  # 5.x records attentions with hooks; the flag may not reach the attention call
            from transformers.utils.output_capturing import _active_collector
        except Exception:
            _active_collector = None
        _COLLECTOR.append(_active_collector)
    return _COLLECTOR[0]


def _output_attentions_requested(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    collector = _output_collector()
    if collector is None:
        return False
    try:
        collected = collector.get()
    except Exception:
        return False
    return bool(collected) and "attentions" in collected


def _segment_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool) -> torch.Tensor:
    """(1, 1, Tq, Tk) bool mask of packed segments (causal bottom-right inside each)."""
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
    n = torch.arange(lens_q.numel(), device=cu_q.device)
    seg_q, seg_k = n.repeat_interleave(lens_q), n.repeat_interleave(lens_k)
    mask = seg_q.unsqueeze(1) == seg_k.unsqueeze(0)
    if causal:
        pos_q = torch.arange(seg_q.numel(), device=cu_q.device) - cu_q[:-1].long()[seg_q]
        pos_k = torch.arange(seg_k.numel(), device=cu_q.device) - cu_k[:-1].long()[seg_k]
        off = (lens_k - lens_q)[seg_q]
        mask &= pos_k.unsqueeze(0) <= (pos_q + off).unsqueeze(1)
    return mask.view(1, 1, *mask.shape)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with transformers' ``AttentionInterface``.

    query (B, H, Sq, D), key/value (B, Hkv, Sk, D) -> (out (B, Sq, H, D), weights or None).
    Varlen calls (``cu_seq_lens_q``/``cu_seq_lens_k`` in kwargs, B == 1, no mask: the vision
    tower and packed sequences) become one :func:`flash_attn_varlen_func` call; so do packed rows
    described by restarting text ``position_ids`` (no mask) or by a block-diagonal mask (see
    :func:`attend`)."""
    if _MONITORS and _label_pending():  # qf.monitor(): label this layer's calls (kind, layer); off: one test
        return _labelled(attention_forward, module, query, key, value, attention_mask, scaling, dropout, kwargs)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    training = bool(getattr(module, "training", False))
    # qf.enable(model, quant=...): quantised where no gradient is needed; training stays exact
    quant = getattr(module, _QUANT_ATTR, None)
    if quant is not None and needs_grad(query, key, value):
        quant = None
    cu_q = kwargs.get("cu_seq_lens_q")
    if _output_attentions_requested(kwargs) or (dropout and training):
        why = "output_attentions=True" if _output_attentions_requested(kwargs) else "attention dropout"
        warn_once(("eager", why), "qwen3vl_flash: %s needs the attention weights; those calls fall back to "
                  "eager (materialised) attention", why)
        mask = attention_mask
        if cu_q is not None and mask is None:  # packed segments never see each other
            mask = _segment_mask(cu_q, kwargs.get("cu_seq_lens_k", cu_q), causal)
            causal = False
        elif mask is None and query.shape[2] == key.shape[2] > 1 and not torch.compiler.is_compiling():
            plan = _position_plan(kwargs.get("position_ids"), query.shape[0], query.shape[2])
            if plan is not None:
                mask = _plan_mask(plan, query.shape[0], query.shape[2], causal)
                causal = False
        return _eager(query, key, value, mask, causal, scale, dropout, training)
    if cu_q is not None and attention_mask is None and query.shape[0] == 1:
        cu_k = kwargs.get("cu_seq_lens_k", cu_q)
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        q = query[0].transpose(0, 1)  # (T, H, D)
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                     quant=quant)
        return out.unsqueeze(0), None
    out = attend(query, key, value, attention_mask, causal, scale, cp_group=getattr(module, _CP_ATTR, None),
                 position_ids=kwargs.get("position_ids"), quant=quant)
    return out, None


_MASKING_UTILS = None


def _mask_module():
    """transformers.masking_utils, imported once (at registration): an import inside a
    torch.compile'd decode step would break the graph."""
    global _MASKING_UTILS
    if _MASKING_UTILS is None:
        _MASKING_UTILS = require("transformers.masking_utils", "the transformers integration")
    return _MASKING_UTILS


def attention_mask(*args, **kwargs):
    """The function registered with ``AttentionMaskInterface``: transformers' ``sdpa_mask`` (4D
    bool, True = attend) that returns ``None`` only for plain causal self-attention (q_len ==
    kv_len, no padding). Arguments are those of the installed version's ``sdpa_mask``."""
    mu = _mask_module()
    if "q_length" in kwargs:  # 5.x
        q_len = kwargs["q_length"]
    elif "cache_position" in kwargs:  # 4.57: q positions are cache_position
        q_len = kwargs["cache_position"].shape[0]
    else:
        q_len = None
    kv_len = kwargs.get("kv_length")
    if q_len is None or kv_len is None or q_len != kv_len:
        pad = kwargs.get("attention_mask")
        if (  # decode / chunked prefill over a cache holding exactly the 2D mask's tokens, no padding:
            # every key is valid, so None (bottom-right causal) is exact and saves building the mask.
            # Not when transformers forbids the skip (a compileable cache such as StaticCache):
            # generate drops a None mask from the compiled step's inputs, which recompiles it and
            # sends that step down the uncompiled path (found on an H200: generate stalled)
            kwargs.get("allow_is_causal_skip", True)
            and q_len is not None
            and isinstance(pad, torch.Tensor)
            and pad.dim() == 2
            and pad.shape[-1] == kv_len
            and not kwargs.get("kv_offset", 0)
            and kwargs.get("mask_function") is _causal_mask_function()
            and not _is_tracing(pad)
            and bool(pad.all())
        ):
            return None
        kwargs["allow_is_causal_skip"] = False
    return mu.sdpa_mask(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _causal_mask_function():
    return _mask_module().causal_mask_function


def _is_tracing(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------------------------
# vision tower: one varlen call per forward
# --------------------------------------------------------------------------------------------


def _wrap_vision_forward(cls) -> None:
    original = cls.forward
    if getattr(original, _PATCH_MARK, False):
        return
    rotary = getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision", None)
    interfaces = require("transformers.modeling_utils", "the transformers integration").ALL_ATTENTION_FUNCTIONS

    @functools.wraps(original)
    def forward(self, hidden_states, cu_seqlens=None, *args, **kwargs):
        position_embeddings = kwargs.get("position_embeddings")
        if (
            getattr(self.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION
            or args
            or cu_seqlens is None
            or position_embeddings is None
            or rotary is None
        ):
            return original(self, hidden_states, cu_seqlens, *args, **kwargs)
        kwargs = dict(kwargs)
        # the text row's packing kwargs (5.x forwards the model's kwargs into the vision tower) are
        # not the vision segments: those come from cu_seqlens
        for name in ("position_embeddings", "rotary_pos_emb", "max_seqlen", "cu_seq_lens_q", "cu_seq_lens_k",
                     "max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        S = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(S, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)  # the installed version's own 2D rotary, (S, H, D)
        cu = cu_seqlens.to(torch.int32)  # already int32 in Qwen3-VL: the same object in every layer
        vals = host_values(cu)  # one device read per forward, not one per layer (see host_values)
        max_len = max(b - a for a, b in zip(vals, vals[1:]))
        fn = interfaces[ATTN_IMPLEMENTATION]  # looked up per call, so wrappers/counters see it
        out, _ = fn(
            self,
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attention_mask=None,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max_len,
            max_length_k=max_len,
            is_causal=False,
            **kwargs,
        )
        return self.proj(out.reshape(S, -1).contiguous())

    setattr(forward, _PATCH_MARK, True)
    forward.__wrapped_original__ = original
    cls.forward = forward


def _allow_name_at_load() -> None:
    """5.x: a name containing "flash" is sent to ``lazy_import_flash_attention`` at load time,
    which looks for the flash-attn package or a hub kernel and raises for ours. Skip it for ours."""
    mu = require("transformers.modeling_utils", "the transformers integration")
    original = getattr(mu, "lazy_import_flash_attention", None)
    if original is None or getattr(original, _PATCH_MARK, False):
        return

    @functools.wraps(original)
    def lazy_import_flash_attention(implementation, *args, **kwargs):
        base = implementation.split("|")[-1] if isinstance(implementation, str) else implementation
        if base == ATTN_IMPLEMENTATION:
            return (None, None, None, None, None), None  # nothing to preload: we are registered
        return original(implementation, *args, **kwargs)

    setattr(lazy_import_flash_attention, _PATCH_MARK, True)
    mu.lazy_import_flash_attention = lazy_import_flash_attention


def register() -> str:
    """Register our attention and mask functions with transformers (idempotent). Returns the name."""
    global _REGISTERED
    if _REGISTERED:
        return ATTN_IMPLEMENTATION
    tf = require("transformers", "the transformers integration")
    mu = _mask_module()
    _output_collector()  # imported here, not inside a compiled graph
    tf.AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    mu.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attention_mask)
    _allow_name_at_load()
    import importlib

    for modname, clsname in _VISION_CLASSES:
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except (ImportError, AttributeError):
            continue
        _wrap_vision_forward(cls)
    _REGISTERED = True
    return ATTN_IMPLEMENTATION


def is_registered() -> bool:
    return _REGISTERED


def enable(model, context_parallel=None, quant: Optional[str] = None):
    """Switch a loaded Qwen3-VL model (text decoder and vision tower) to our attention.

    Sets ``_attn_implementation`` on the model's config, its sub-configs and every submodule's
    config (bypassing 5.x's load-time check of names containing "flash"). ``context_parallel``:
    a process group (or anything :func:`qwen3vl_flash.parallel.context_parallel_attn` takes as
    ``group``); causal self-attention calls without padding then run context-parallel, each rank
    holding its shard of the sequence. None (default) removes it.

    ``quant``: None (default: exact attention; removes an earlier setting), ``"int8"`` or
    ``"fp8"`` (docs/quantization.md): the vision tower and the text prefill run quantised
    attention (``flash_attn_*(..., quant=quant)``). Kept per model, on its attention modules (two
    models in one process can differ). Calls that need gradients (training) stay exact, as do
    decode steps (at most ``DECODE_MAX_QUERIES`` queries against a longer history: a quantised
    KV cache is a cache class's business), context-parallel calls, calls traced by torch.compile
    and calls returning attention weights. Raises ValueError naming ``quant`` for an unknown mode
    (listing the valid ones), a model whose parameters are not float16/bfloat16 (naming the
    dtype), or ``"fp8"`` on a device without FP8 tensor cores (naming the device), before
    changing anything. Returns ``model``.

        model = qf.enable(model, quant="int8")
        with torch.no_grad():
            out = model.generate(**inputs)       # vision + prefill quantised, decode exact
    """
    quant = _check_model_quant(model, quant)
    register()
    configs = []
    cfg = getattr(model, "config", None)
    if cfg is not None:
        configs.append(cfg)
        for name in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, name, None)
            if sub is not None:
                configs.append(sub)
    for mod in model.modules():
        c = getattr(mod, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            configs.append(c)
    seen = set()
    for c in configs:
        if id(c) in seen:
            continue
        seen.add(id(c))
        c._attn_implementation = ATTN_IMPLEMENTATION
    for mod in model.modules():
        if getattr(mod, "is_causal", False) and hasattr(mod, "layer_idx") and hasattr(mod, "q_proj"):
            if context_parallel is None:
                if hasattr(mod, _CP_ATTR):
                    delattr(mod, _CP_ATTR)
            else:
                setattr(mod, _CP_ATTR, context_parallel)
        if _is_attention_module(mod):
            if quant is None:
                if hasattr(mod, _QUANT_ATTR):
                    delattr(mod, _QUANT_ATTR)
            else:
                setattr(mod, _QUANT_ATTR, quant)
    return model


def _is_attention_module(mod) -> bool:
    """A text attention layer (causal, q_proj, layer_idx) or a vision attention layer."""
    if getattr(mod, "is_causal", False) and hasattr(mod, "layer_idx") and hasattr(mod, "q_proj"):
        return True
    return type(mod).__name__ in {clsname for _, clsname in _VISION_CLASSES}


def _check_model_quant(model, quant) -> Optional[str]:
    """Validate ``enable``'s ``quant`` against the model (mode, parameter dtype, fp8 devices)."""
    if quant is None:
        return None
    from ..quant.quantize import FP8_MIN_CAPABILITY, QUANT_MODES

    if not isinstance(quant, str) or quant not in QUANT_MODES:
        raise ValueError(f"quant must be None or one of {QUANT_MODES}, got {quant!r}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    bad = next((p.dtype for p in params if p.dtype not in (torch.float16, torch.bfloat16)), None)
    if bad is not None:
        raise ValueError(f"quant={quant!r} needs a float16 or bfloat16 model (quantised attention takes 16-bit "
                         f"inputs); its parameters include {bad}: call model.to(torch.bfloat16) first, or pass "
                         "quant=None")
    if quant == "fp8":
        for dev in {p.device for p in params}:
            cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
            if cap is None or tuple(cap) < FP8_MIN_CAPABILITY:
                where = f"{dev} (compute capability {cap[0]}.{cap[1]})" if cap else str(dev)
                raise ValueError(f"quant='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
                                 f"the model is on {where}. Use quant='int8' there.")
    return quant
