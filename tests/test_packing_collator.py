"""``qf.PackingCollator`` (issue 16, item 1, multimodal): a row packed from image / video / text
samples equals its samples run alone (logits, loss, parameter gradients; float32, CPU, a tiny
random Qwen3-VL), runs as varlen calls only (never the dense-mask SDPA fallback), and its options
(``max_tokens``, ``pad_to_multiple_of``) and errors behave as documented.

The samples alone run through ``eager`` with the model's own MRoPE (no position ids given), so
the collator's per-sample ids are checked against what the model computes itself. Runs on the
installed transformers (5.x) and, through tests/run_transformers_457.sh, on 4.57.6.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import qwen3vl_flash as qf  # noqa: E402
from qwen3vl_flash.integrations import transformers as qt  # noqa: E402
from qwen3vl_flash.integrations.packing import pack_greedy  # noqa: E402
from qwen3vl_flash.testing import tiny  # noqa: E402
from qwen3vl_flash.testing.tiny import Image, Video  # noqa: E402

NAME = qf.ATTN_IMPLEMENTATION
LOGIT_TOL = 1e-4
LOSS_TOL = 1e-5
GRAD_TOL = 1e-5

# sample layouts: text only, image + text, video, two images with text, text + video + image
MIX = [
    [9],
    [3, Image(4, 6), 5],
    [Video(2, 4, 4)],
    [2, Image(4, 4), 3, Image(6, 4), 2],
    [1],
    [4, Video(1, 4, 6), 2, Image(4, 4), 3],
]


@pytest.fixture(scope="module")
def models(cfg):
    """eager (the reference, samples alone) and ours (the packed rows), with the same weights."""
    seed = int(torch.randint(0, 2**30, (1,)))
    built = {impl: tiny.build_model(cfg, impl, seed=seed) for impl in ("eager", NAME)}
    assert not any(m.training for m in built.values())  # eval mode: no dropout anywhere
    return built


@pytest.fixture(scope="module")
def cfg():
    return tiny.tiny_config()


def _features(cfg, layouts, drop_types=False):
    """One processor-like feature per layout: 1D input_ids, the sample's pixels and grids,
    mm_token_type_ids where the installed transformers has them (dropped with ``drop_types``)."""
    feats = []
    for lay in layouts:
        inp = tiny.make_prompt_inputs(cfg, [lay], seed=int(torch.randint(0, 2**30, (1,))))
        inp.pop("attention_mask")
        f = {k: (v[0] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in inp.items()}
        if drop_types:
            f.pop("mm_token_type_ids", None)
        feats.append(f)
    return feats


def _with_labels(feats):
    """Labels with a random prompt prefix masked (-100), as SFT data has them."""
    out = []
    for f in feats:
        lab = f["input_ids"].clone()
        cut = int(torch.randint(0, lab.numel() + 1, (1,)))
        lab[:cut] = -100
        out.append(dict(f, labels=lab))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _alone(model, cfg, feats, use_cache):
    """Each sample on its own (the model's own MRoPE): logits per sample, the token-weighted mean
    of the samples' losses (= sum of their next-token CE / number of predicted tokens), grads."""
    model.zero_grad(set_to_none=True)
    logits, total, count = [], 0.0, 0
    for f in feats:
        ids = f["input_ids"]
        kw = {k: f[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in f}
        if tiny.is_v5():
            types = torch.zeros_like(ids, dtype=torch.int32)
            types[ids == cfg.image_token_id] = 1
            types[ids == cfg.video_token_id] = 2
            kw["mm_token_type_ids"] = types[None]
        model.model.rope_deltas = None
        # an all-ones attention_mask, as the processor gives: without one, 4.57.6 with use_cache=False
        # reads the temporal MRoPE row (repeated ids over vision tokens) as packed sequences and
        # builds a wrong mask for a single multimodal sample (seen: logits off by ~4)
        kw["attention_mask"] = torch.ones_like(ids)[None]
        lg = model(input_ids=ids[None], use_cache=use_cache, **kw).logits[0]
        logits.append(lg.detach())
        lab = f.get("labels", ids)[1:]
        n = int((lab != -100).sum())
        if n:
            total = total + torch.nn.functional.cross_entropy(lg[:-1].float(), lab, ignore_index=-100, reduction="sum")
            count += n
    loss = total / count
    loss.backward()
    return logits, loss.detach(), _grads(model)


def _packed(model, batch, use_cache):
    model.zero_grad(set_to_none=True)
    model.model.rope_deltas = None
    out = model(**batch, use_cache=use_cache)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), _grads(model)


def _compare(packed, alone, rows, lengths):
    """max |logits|, |loss|, max |grad| of packed vs alone; ``rows`` = sample indices per row."""
    plog, ploss, pgrad = packed
    alog, aloss, agrad = alone
    logit = 0.0
    for b, row in enumerate(rows):
        at = 0
        for j in row:
            logit = max(logit, (plog[b, at:at + lengths[j]] - alog[j]).abs().max().item())
            at += lengths[j]
    assert pgrad.keys() == agrad.keys()
    grad = max((pgrad[n] - agrad[n]).abs().max().item() for n in pgrad)
    return logit, abs(ploss.item() - aloss.item()), grad


_SPIED = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "_sdpa_with_mask", "_eager")


def _counted(calls, name, fn, *a, **k):
    calls[name] += 1
    return fn(*a, **k)


def _spy(monkeypatch):
    calls = collections.Counter()
    for name in _SPIED:
        monkeypatch.setattr(qt, name, functools.partial(_counted, calls, name, getattr(qt, name)))
    return calls


def _check(cfg, models, feats, collator, use_cache, monkeypatch, what):
    batch = collator(feats)
    lengths = [f["input_ids"].numel() for f in feats]
    rows = [list(range(len(feats)))] if collator.max_tokens is None else pack_greedy(lengths, collator.max_tokens)
    ref = _alone(models["eager"], cfg, feats, use_cache)
    calls = _spy(monkeypatch)
    got = _packed(models[NAME], batch, use_cache)
    logit, loss, grad = _compare(got, ref, rows, lengths)
    print(f"{what} transformers {transformers.__version__} use_cache={use_cache} lengths {lengths} rows {rows} "
          f"width {batch['input_ids'].shape[1]}: max|logits| {logit:.2e}  |loss| {loss:.2e}  max|grad| {grad:.2e}")
    assert logit <= LOGIT_TOL, logit
    assert loss <= LOSS_TOL, loss
    assert grad <= GRAD_TOL, grad
    # every attention call (text layers and vision blocks) is one varlen call: never the
    # dense-mask fallback, eager, or a dense call
    assert calls["_sdpa_with_mask"] == 0 and calls["_eager"] == 0, dict(calls)
    assert calls["flash_attn_func"] == 0 and calls["flash_attn_with_kvcache"] == 0, dict(calls)
    has_vision = "pixel_values" in batch or "pixel_values_videos" in batch
    vision_calls = cfg.vision_config.depth * (("pixel_values" in batch) + ("pixel_values_videos" in batch))
    assert calls["flash_attn_varlen_func"] == cfg.text_config.num_hidden_layers + vision_calls, (dict(calls), has_vision)
    return batch


# --------------------------------------------------------------------------------------------
# the model: packed == samples alone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
def test_packed_multimodal_row_equals_samples_alone(cfg, models, use_cache, monkeypatch):
    order = torch.randperm(len(MIX)).tolist()
    feats = _features(cfg, [MIX[i] for i in order])
    batch = _check(cfg, models, feats, qf.PackingCollator(cfg), use_cache, monkeypatch, "mix")
    assert batch["input_ids"].shape[0] == 1
    assert batch["position_ids"].shape == (4, 1, sum(f["input_ids"].numel() for f in feats))


@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
def test_prompt_masked_labels_and_computed_token_types(cfg, models, use_cache, monkeypatch):
    """SFT labels (prompt masked) weight the loss by predicted tokens; mm_token_type_ids absent
    from the features are computed from the image / video token ids."""
    feats = _with_labels(_features(cfg, MIX[1:4] + [[6]], drop_types=True))
    _check(cfg, models, feats, qf.PackingCollator(cfg), use_cache, monkeypatch, "labels")


@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
def test_max_tokens_and_padding_rows_equal_samples_alone(cfg, models, use_cache, monkeypatch):
    """max_tokens: several rows (B > 1) evened out with pad segments, padded to a multiple."""
    feats = _features(cfg, MIX)
    lengths = [f["input_ids"].numel() for f in feats]
    budget = max(lengths) + 4
    collator = qf.PackingCollator(cfg, max_tokens=budget, pad_to_multiple_of=8)
    batch = _check(cfg, models, feats, collator, use_cache, monkeypatch, "max_tokens")
    assert batch["input_ids"].shape[0] == len(pack_greedy(lengths, budget)) > 1
    assert batch["input_ids"].shape[1] % 8 == 0


@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
def test_text_only_row_with_pad_segment(cfg, models, use_cache, monkeypatch):
    feats = [{"input_ids": torch.randint(tiny.FIRST_TEXT_TOKEN, cfg.text_config.vocab_size, (n,)).tolist()}
             for n in (5, 1, 11)]
    tens = [{"input_ids": torch.tensor(f["input_ids"])} for f in feats]
    collator = qf.PackingCollator(cfg, pad_to_multiple_of=16)
    batch = collator(feats)
    assert batch["input_ids"].shape == (1, 32)
    _check(cfg, models, tens, collator, use_cache, monkeypatch, "text+pad")


# --------------------------------------------------------------------------------------------
# the batch itself
# --------------------------------------------------------------------------------------------


def test_batch_layout(cfg):
    feats = _features(cfg, [[2, Image(4, 4), 1], [3], [Video(2, 4, 4)]])
    batch = qf.PackingCollator(cfg, pad_to_multiple_of=16)(feats)
    lengths = [f["input_ids"].numel() for f in feats]
    T = batch["input_ids"].shape[1]
    assert T % 16 == 0 and T >= sum(lengths)
    pad = T - sum(lengths)
    seg = lengths + ([pad] if pad else [])
    cu = torch.tensor([0] + seg).cumsum(0)
    for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[k].dtype == torch.int32 and batch[k].tolist() == cu.tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == max(seg)
    assert isinstance(batch["max_length_q"], int)
    # text row restarts per sample; first label of each sample masked; pad: labels -100, pad token
    pos0 = batch["position_ids"][0, 0]
    for a, n in zip(cu[:-1].tolist(), seg):
        assert pos0[a:a + n].tolist() == list(range(n))
        assert batch["labels"][0, a] == -100
    if pad:
        assert (batch["labels"][0, -pad:] == -100).all()
        assert (batch["input_ids"][0, -pad:] == cfg.text_config.pad_token_id).all()
        assert (batch["position_ids"][:, 0, -pad:] == torch.arange(pad)).all()
    # vision inputs concatenated in sample order
    assert torch.equal(batch["pixel_values"], feats[0]["pixel_values"])
    assert torch.equal(batch["video_grid_thw"], feats[2]["video_grid_thw"])
    assert ("mm_token_type_ids" in batch) == tiny.is_v5()
    assert "attention_mask" not in batch


def test_mrope_rows_are_the_models_own(cfg, models):
    """Rows 1-3 equal the model's get_rope_index on the sample alone (the installed version's)."""
    feats = _features(cfg, [[2, Image(4, 6), 3, Video(2, 4, 4), 1], [4]])
    batch = qf.PackingCollator(cfg)(feats)
    m = models["eager"].model
    ids = feats[0]["input_ids"][None]
    kw = dict(image_grid_thw=feats[0]["image_grid_thw"], video_grid_thw=feats[0]["video_grid_thw"])
    if tiny.is_v5():
        kw["mm_token_type_ids"] = batch["mm_token_type_ids"][:, :ids.shape[1]]
    ref, _ = m.get_rope_index(ids, **kw)
    assert torch.equal(batch["position_ids"][1:, :, :ids.shape[1]], ref)
    assert batch["position_ids"][1:, 0, ids.shape[1]:].tolist() == [list(range(4))] * 3


def test_padded_feature_is_unpadded(cfg):
    f = {"input_ids": [2, 2, 7, 8, 9], "attention_mask": [0, 0, 1, 1, 1]}
    batch = qf.PackingCollator(cfg)([f, {"input_ids": [10, 11]}])
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[-100, 8, 9, -100, 11]]


def test_pack_greedy():
    assert pack_greedy([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack_greedy([8, 1, 1], 8) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="max_tokens=4: sample 1 has 5 tokens"):
        pack_greedy([2, 5], 4)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _img_feature(cfg):
    return _features(cfg, [[2, Image(4, 4), 1]])[0]


@pytest.mark.parametrize("case,match", [
    ("no_input_ids", "feature 0 has no input_ids"),
    ("empty", "features must be a non-empty list"),
    ("not_a_dict", "features must be dicts"),
    ("labels_len", "feature 0: labels has 3 entries, input_ids"),
    ("pixels_mismatch", "feature 0: pixel_values has 15 patches but image_grid_thw"),
    ("tokens_mismatch", "feature 0: input_ids has 4 image tokens but image_grid_thw"),
    ("grid_without_pixels", "feature 0: image_grid_thw given without pixel_values"),
    ("tokens_without_grid", "feature 0: 4 image tokens in input_ids but no pixel_values"),
    ("too_long", "max_tokens=4: sample 0 has"),
    ("input_ids_2d", r"feature 0: input_ids must be one sample of shape \(L,\) or \(1, L\)"),
])
def test_errors(cfg, case, match):
    f = _img_feature(cfg)
    collator = qf.PackingCollator(cfg)
    if case == "no_input_ids":
        f.pop("input_ids")
        feats = [f]
    elif case == "empty":
        feats = []
    elif case == "not_a_dict":
        feats = [[1, 2, 3]]
    elif case == "labels_len":
        feats = [dict(f, labels=[1, 2, 3])]
    elif case == "pixels_mismatch":
        feats = [dict(f, pixel_values=f["pixel_values"][:-1])]
    elif case == "tokens_mismatch":
        feats = [dict(f, image_grid_thw=torch.tensor([[1, 4, 6]]), pixel_values=torch.randn(24, f["pixel_values"].shape[1]))]
    elif case == "grid_without_pixels":
        feats = [{k: v for k, v in f.items() if k != "pixel_values"}]
    elif case == "tokens_without_grid":
        feats = [{k: v for k, v in f.items() if k not in ("pixel_values", "image_grid_thw")}]
    elif case == "too_long":
        collator = qf.PackingCollator(cfg, max_tokens=4)
        feats = [f]
    else:
        feats = [dict(f, input_ids=torch.ones(2, 5, dtype=torch.long))]
    with pytest.raises(ValueError, match=match):
        collator(feats)


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens=0), "max_tokens must be a positive int"),
    (dict(max_tokens=2.5), "max_tokens must be a positive int"),
    (dict(pad_to_multiple_of=-1), "pad_to_multiple_of must be a positive int"),
])
def test_bad_options(cfg, kw, match):
    with pytest.raises(ValueError, match=match):
        qf.PackingCollator(cfg, **kw)


def test_bad_config():
    with pytest.raises(ValueError, match="config must be a Qwen3-VL model config"):
        qf.PackingCollator(object())
