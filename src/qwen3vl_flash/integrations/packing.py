"""Padding-free packing of multimodal Qwen3-VL samples: :class:`PackingCollator`.

    collator = qf.PackingCollator(model.config)                 # every sample of a call in one row
    collator = qf.PackingCollator(model.config, max_tokens=4096, pad_to_multiple_of=64)
    batch = collator([processor_output_1, processor_output_2, ...])
    loss = qf.enable(model)(**batch).loss

Each feature is one sample as the processor gives it (``input_ids`` of shape (L,) or (1, L), list
or tensor; optional ``labels``, ``attention_mask`` (padding is dropped), ``pixel_values`` /
``image_grid_thw``, ``pixel_values_videos`` / ``video_grid_thw``, ``mm_token_type_ids``); other
keys are ignored. The returned batch holds, for B rows of T tokens:

* ``input_ids`` (B, T), ``labels`` (B, T): the samples one after the other; the first label of
  every sample is -100, so no token predicts across a boundary (the loss of a packed row is the
  token-weighted mean of the samples' own losses);
* ``position_ids`` (4, B, T): row 0 the text positions (0, 1, ... restarting per sample), rows 1-3
  the sample's own MRoPE ids, computed by the installed transformers' own ``get_rope_index``
  sample by sample (4.57.6 and 5.x both read 4-row ids: row 0 for the mask and the attention,
  rows 1-3 for the rotary embedding);
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, over the B * T tokens flattened, flash-attn's
  convention) and ``max_length_q`` / ``max_length_k`` (ints);
* ``pixel_values`` / ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw``,
  concatenated in sample order (the vision tower's ``cu_seqlens`` follow from the grids);
* ``mm_token_type_ids`` (B, T) int32 where the installed transformers' model takes it (5.x; from
  5.4 it is required with vision inputs); computed from the image / video token ids when a
  sample lacks it.

No ``attention_mask``: a pad segment (``pad_to_multiple_of``, or rows of a multi-row batch
evened out) is a sample of its own (labels -100, position ids restarting at 0), attending only
to itself.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .._optional import require

__all__ = ["PackingCollator", "pack_greedy"]

IGNORE_INDEX = -100
_VISION = (("pixel_values", "image_grid_thw", "image"), ("pixel_values_videos", "video_grid_thw", "video"))


def pack_greedy(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """First-fit packing of samples of ``lengths`` into rows of at most ``max_tokens`` tokens.

    Returns the sample indices of each row; samples keep their order inside a row, rows are in
    order of their first sample. A sample longer than ``max_tokens`` raises ``ValueError``."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    rows: List[List[int]] = []
    room: List[int] = []
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"max_tokens={max_tokens}: sample {i} has {n} tokens, more than fit in one row")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_tokens - n)
    return rows


class _RopeShim:
    """Stands in for the model instance in ``ModelClass.get_rope_index(self, ...)``: carries the
    config, and hands out the class's own methods (e.g. ``get_vision_position_ids``) bound to itself."""

    def __init__(self, config, cls):
        self.config = config
        self._cls = cls
        self.rope_deltas = None

    def __getattr__(self, name):
        attr = getattr(self._cls, name)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        return attr


def _model_class(config):
    model_type = getattr(config, "model_type", "qwen3_vl")
    if model_type == "qwen3_vl_moe":
        mod = require("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "qf.PackingCollator")
        return mod.Qwen3VLMoeModel
    mod = require("transformers.models.qwen3_vl.modeling_qwen3_vl", "qf.PackingCollator")
    return mod.Qwen3VLModel


def _as_1d(value, name: str, index: int, dtype=torch.long) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"feature {index}: {name} must be one sample of shape (L,) or (1, L), got {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"feature {index}: {name} must hold integers, got {t.dtype}")
    return t.to(dtype)


class PackingCollator:
    """Packs per-sample Qwen3-VL processor outputs into padding-free rows (see the module doc).

    Args:
        config: the model's ``Qwen3VLConfig`` (or ``Qwen3VLMoeConfig``), or the model itself.
        max_tokens: token budget per row. ``None`` (default): every sample of a call goes into one
            row (B = 1). An int: the samples are packed first-fit (:func:`pack_greedy`) into rows of
            at most ``max_tokens`` real tokens, returned as B rows evened out to the longest with a
            pad segment; a sample longer than the budget raises ``ValueError``.
        pad_to_multiple_of: pad every row at its end to a multiple of this many tokens (static
            shapes) with one pad segment (labels -100, attending only to itself). With
            ``max_tokens`` the padded width may exceed the budget by less than this multiple.
        pad_token_id: the pad segment's token; default ``config.text_config.pad_token_id`` (or 0).
        mask_first_label: set the first label of each sample to -100 (default True), so the last
            token of a sample never learns to predict the next sample's first token.
    """

    def __init__(self, config, max_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 pad_token_id: Optional[int] = None, mask_first_label: bool = True):
        require("transformers", "qf.PackingCollator")
        config = getattr(config, "config", config)  # a model: its config
        for attr in ("vision_config", "image_token_id", "video_token_id"):
            if not hasattr(config, attr):
                raise ValueError(f"config must be a Qwen3-VL model config (Qwen3VLConfig); it has no {attr!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int)
                                               or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.config = config
        self.max_tokens = max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        text = getattr(config, "text_config", config)
        if pad_token_id is None:
            pad_token_id = getattr(text, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.mask_first_label = bool(mask_first_label)
        self.merge = int(config.vision_config.spatial_merge_size)
        cls = _model_class(config)
        self._rope = cls.get_rope_index
        self._shim = _RopeShim(config, cls)
        self._rope_takes_types = "mm_token_type_ids" in inspect.signature(cls.get_rope_index).parameters
        self.emit_mm_token_type_ids = "mm_token_type_ids" in inspect.signature(cls.forward).parameters

    # ----------------------------------------------------------------------------------------
    # one sample
    # ----------------------------------------------------------------------------------------

    def _sample(self, feat: Mapping[str, Any], i: int) -> Dict[str, Any]:
        if not isinstance(feat, Mapping):
            raise ValueError(f"features must be dicts (one per sample); feature {i} is {type(feat).__name__}")
        if feat.get("input_ids") is None:
            raise ValueError(f"feature {i} has no input_ids (keys: {sorted(feat)})")
        ids = _as_1d(feat["input_ids"], "input_ids", i)
        L = ids.numel()
        if L == 0:
            raise ValueError(f"feature {i}: input_ids is empty")
        labels = _as_1d(feat["labels"], "labels", i) if feat.get("labels") is not None else ids.clone()
        types_ = (_as_1d(feat["mm_token_type_ids"], "mm_token_type_ids", i)
                  if feat.get("mm_token_type_ids") is not None else None)
        for name, t in (("labels", labels), ("mm_token_type_ids", types_)):
            if t is not None and t.numel() != L:
                raise ValueError(f"feature {i}: {name} has {t.numel()} entries, input_ids {L}")
        if feat.get("attention_mask") is not None:
            am = _as_1d(feat["attention_mask"], "attention_mask", i)
            if am.numel() != L:
                raise ValueError(f"feature {i}: attention_mask has {am.numel()} entries, input_ids {L}")
            keep = am.bool()
            if not keep.all():  # a padded sample: drop the padding
                ids, labels = ids[keep], labels[keep]
                types_ = types_[keep] if types_ is not None else None
                L = ids.numel()
                if L == 0:
                    raise ValueError(f"feature {i}: attention_mask masks every token")
        if types_ is None:
            types_ = torch.zeros(L, dtype=torch.long)
            types_[ids == self.config.image_token_id] = 1
            types_[ids == self.config.video_token_id] = 2
        out: Dict[str, Any] = {"input_ids": ids, "labels": labels, "mm_token_type_ids": types_}
        for pix_key, grid_key, kind in _VISION:
            pix, grid = feat.get(pix_key), feat.get(grid_key)
            token_id = self.config.image_token_id if kind == "image" else self.config.video_token_id
            n_tokens = int((ids == token_id).sum())
            if pix is None and grid is None:
                if n_tokens:
                    raise ValueError(f"feature {i}: {n_tokens} {kind} tokens in input_ids but no {pix_key} / {grid_key}")
                continue
            if pix is None or grid is None:
                have, miss = (pix_key, grid_key) if grid is None else (grid_key, pix_key)
                raise ValueError(f"feature {i}: {have} given without {miss}")
            pix = pix if isinstance(pix, torch.Tensor) else torch.as_tensor(pix)
            grid = (grid if isinstance(grid, torch.Tensor) else torch.as_tensor(grid)).to(torch.long)
            if grid.dim() == 1:
                grid = grid[None]
            if grid.dim() != 2 or grid.shape[-1] != 3:
                raise ValueError(f"feature {i}: {grid_key} must be (n, 3) (t, h, w) rows, got {tuple(grid.shape)}")
            if pix.dim() == 3 and pix.shape[0] == 1:
                pix = pix[0]
            if pix.dim() != 2:
                raise ValueError(f"feature {i}: {pix_key} must be (patches, patch_dim), got {tuple(pix.shape)}")
            patches = int(grid.prod(-1).sum())
            if pix.shape[0] != patches:
                raise ValueError(f"feature {i}: {pix_key} has {pix.shape[0]} patches but {grid_key} "
                                 f"{grid.tolist()} describes {patches}")
            expect = patches // self.merge ** 2
            if n_tokens != expect:
                raise ValueError(f"feature {i}: input_ids has {n_tokens} {kind} tokens but {grid_key} "
                                 f"{grid.tolist()} needs {expect} (t*h*w / {self.merge}^2)")
            out[pix_key], out[grid_key] = pix, grid
        return out

    def _mrope(self, s: Dict[str, Any]) -> torch.Tensor:
        """(3, L) MRoPE ids of one sample, by the installed transformers' own get_rope_index."""
        ids = s["input_ids"][None]
        kw = dict(image_grid_thw=s.get("image_grid_thw"), video_grid_thw=s.get("video_grid_thw"))
        kw = {k: (v.clone() if v is not None else None) for k, v in kw.items()}
        if self._rope_takes_types:
            kw["mm_token_type_ids"] = s["mm_token_type_ids"][None].to(torch.int32)
        pos, _ = self._rope(self._shim, ids, attention_mask=None, **kw)
        return pos[:, 0].to(torch.long)

    # ----------------------------------------------------------------------------------------
    # the batch
    # ----------------------------------------------------------------------------------------

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if isinstance(features, Mapping) or not isinstance(features, Sequence) or len(features) == 0:
            raise ValueError("features must be a non-empty list of samples (dicts with input_ids)")
        samples = [self._sample(f, i) for i, f in enumerate(features)]
        lengths = [s["input_ids"].numel() for s in samples]
        if self.max_tokens is None:
            rows = [list(range(len(samples)))]
        else:
            rows = pack_greedy(lengths, self.max_tokens)
        width = max(sum(lengths[j] for j in row) for row in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((4, B, width), dtype=torch.long)
        mm_types = torch.zeros((B, width), dtype=torch.int32)
        seg_lens: List[int] = []
        vision: Dict[str, List[torch.Tensor]] = {k: [] for p, g, _ in _VISION for k in (p, g)}
        for b, row in enumerate(rows):
            at = 0
            for j in row:
                s, L = samples[j], lengths[j]
                input_ids[b, at:at + L] = s["input_ids"]
                lab = s["labels"].clone()
                if self.mask_first_label:
                    lab[0] = IGNORE_INDEX
                labels[b, at:at + L] = lab
                position_ids[0, b, at:at + L] = torch.arange(L)
                position_ids[1:, b, at:at + L] = self._mrope(s)
                mm_types[b, at:at + L] = s["mm_token_type_ids"].to(torch.int32)
                for k in vision:
                    if k in s:
                        vision[k].append(s[k])
                seg_lens.append(L)
                at += L
            if at < width:  # the pad segment: its own sample, positions restarting at 0
                position_ids[:, b, at:] = torch.arange(width - at)
                seg_lens.append(width - at)
        cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seg_lens, dtype=torch.int32).cumsum(0)
        batch: Dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu.clone(),
            "max_length_q": max(seg_lens),
            "max_length_k": max(seg_lens),
        }
        if self.emit_mm_token_type_ids:
            batch["mm_token_type_ids"] = mm_types
        for pix_key, grid_key, _ in _VISION:
            if vision[pix_key]:
                dtypes = {t.dtype for t in vision[pix_key]}
                if len(dtypes) > 1:
                    raise ValueError(f"{pix_key} of the samples have different dtypes: {sorted(map(str, dtypes))}")
                batch[pix_key] = torch.cat(vision[pix_key])
                batch[grid_key] = torch.cat(vision[grid_key])
        return batch

    def __repr__(self) -> str:
        return (f"PackingCollator(max_tokens={self.max_tokens}, pad_to_multiple_of={self.pad_to_multiple_of}, "
                f"pad_token_id={self.pad_token_id})")
