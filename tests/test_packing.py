"""Padding-free packing (issue 16, item 1, text): a row packed by transformers'
``DataCollatorWithFlattening`` equals its samples run alone, with and without the flash kwargs
(``cu_seq_lens_*``), with ``use_cache`` True and False, and never reaches the dense-mask
fallback (PyTorch SDPA with a 4D mask): every packed call is one varlen call.

What transformers hands our attention (4.57.6 and 5.x, checked by these tests):

* ``use_cache=True`` (the default): no mask, the restarting text ``position_ids`` in kwargs;
  transformers builds its packed-sequence mask only without a cache, so ``sdpa`` mixes the
  samples there (the negative control below).
* ``use_cache=False``: a block-diagonal causal 4D mask (``packed_sequence_mask_function``).
* ``return_flash_attn_kwargs=True``: ``cu_seq_lens_q/k`` as well (and the mask without a cache).

Runs on the installed transformers (5.x) and, through tests/run_transformers_457.sh, on 4.57.6.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import qwen3vl_flash as qf  # noqa: E402
from qwen3vl_flash.integrations import transformers as qt  # noqa: E402
from qwen3vl_flash.testing import tiny  # noqa: E402

NAME = qf.ATTN_IMPLEMENTATION
LOGIT_TOL = 1e-4
LOSS_TOL = 1e-5
GRAD_TOL = 1e-5
MIX_EFFECT = 1e-2  # smallest effect of samples attending to each other on these logits (seen: ~3)


@pytest.fixture(scope="module")
def cfg():
    return tiny.tiny_config()


@pytest.fixture(scope="module")
def weights_seed():
    return int(torch.randint(0, 2**30, (1,)))


@pytest.fixture(scope="module")
def models(cfg, weights_seed):
    return {impl: tiny.build_model(cfg, impl, seed=weights_seed) for impl in ("eager", "sdpa", NAME)}


def _samples(cfg):
    """Fresh samples of mixed lengths, one of a single token (its own segment of length 1)."""
    n = int(torch.randint(3, 6, (1,)))
    lens = [1] + torch.randint(2, 24, (n,)).tolist()
    lens = [lens[i] for i in torch.randperm(len(lens)).tolist()]
    return [torch.randint(tiny.FIRST_TEXT_TOKEN, cfg.text_config.vocab_size, (m,)) for m in lens]


def _collate(samples, flash_kwargs: bool):
    feats = [{"input_ids": s.tolist(), "labels": s.tolist()} for s in samples]
    return transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(feats)


def _packed(model, batch, use_cache: bool):
    """Logits, loss and parameter gradients of the packed row."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=use_cache)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits[0].detach(), out.loss.detach(), grads


def _alone(model, samples, use_cache: bool):
    """The same quantities with every sample run on its own: logits concatenated, the loss of the
    packed row (mean over every sample's next-token predictions), its gradients."""
    model.zero_grad(set_to_none=True)
    logits, total, count = [], 0.0, 0
    for s in samples:
        lg = model(input_ids=s[None], use_cache=use_cache).logits[0]
        logits.append(lg.detach())
        if s.numel() > 1:
            total = total + torch.nn.functional.cross_entropy(lg[:-1].float(), s[1:], reduction="sum")
            count += s.numel() - 1
    loss = total / count
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), loss.detach(), grads


def _diffs(a, b):
    la, lo_a, ga = a
    lb, lo_b, gb = b
    assert ga.keys() == gb.keys()
    grad = max((ga[n] - gb[n]).abs().max().item() for n in ga)
    return (la - lb).abs().max().item(), abs(lo_a.item() - lo_b.item()), grad


_SPIED = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "_sdpa_with_mask", "_eager")


def _counted(calls, name, fn, *a, **k):
    calls[name] += 1
    return fn(*a, **k)


def _spy(monkeypatch) -> collections.Counter:
    """Counts our public attention calls and every call of the dense-mask fallback / eager path."""
    calls = collections.Counter()
    for name in _SPIED:
        monkeypatch.setattr(qt, name, functools.partial(_counted, calls, name, getattr(qt, name)))
    return calls


# --------------------------------------------------------------------------------------------
# the model: packed row == samples alone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "flash_kwargs"])
def test_packed_row_equals_samples_alone(cfg, models, flash_kwargs, use_cache, monkeypatch):
    samples = _samples(cfg)
    batch = _collate(samples, flash_kwargs)
    ref = _alone(models["eager"], samples, use_cache)
    calls = _spy(monkeypatch)
    got = _packed(models[NAME], batch, use_cache)
    logit, loss, grad = _diffs(got, ref)
    print(f"lengths {[s.numel() for s in samples]} flash_kwargs={flash_kwargs} use_cache={use_cache}: "
          f"max|logits| {logit:.2e}  |loss| {loss:.2e}  max|grad| {grad:.2e}")
    assert logit <= LOGIT_TOL, logit
    assert loss <= LOSS_TOL, loss
    assert grad <= GRAD_TOL, grad
    # one varlen call per layer: never the dense-mask fallback, eager, or a dense call
    layers = cfg.text_config.num_hidden_layers
    assert calls["flash_attn_varlen_func"] == layers, dict(calls)
    assert calls["_sdpa_with_mask"] == 0 and calls["_eager"] == 0, dict(calls)
    assert calls["flash_attn_func"] == 0, dict(calls)


@pytest.mark.parametrize("use_cache", [True, False], ids=["use_cache", "no_cache"])
def test_packed_row_with_four_row_position_ids(cfg, models, use_cache, monkeypatch):
    """The ids a multimodal packer hands a text-only row: (4, 1, T), row 0 the text positions
    (restarting per sample), rows 1-3 MRoPE (equal to it for text). Boundaries from row 0."""
    samples = _samples(cfg)
    batch = _collate(samples, False)
    batch["position_ids"] = batch["position_ids"][None].expand(4, 1, -1).contiguous()
    ref = _alone(models["eager"], samples, use_cache)
    calls = _spy(monkeypatch)
    logit, loss, grad = _diffs(_packed(models[NAME], batch, use_cache), ref)
    print(f"4-row ids use_cache={use_cache}: max|logits| {logit:.2e} |loss| {loss:.2e} max|grad| {grad:.2e}")
    assert logit <= LOGIT_TOL and loss <= LOSS_TOL and grad <= GRAD_TOL, (logit, loss, grad)
    assert calls["_sdpa_with_mask"] == 0 and calls["flash_attn_func"] == 0, dict(calls)


def test_negative_control_sdpa_mixes_samples_with_a_cache(cfg, models):
    """transformers' sdpa (4.57.6 and 5.x): with ``use_cache=True`` and no flash kwargs it builds
    no packed-sequence mask, so the samples attend to each other (the comparison can fail: logits,
    loss and gradients all move past the tolerances); with ``use_cache=False`` it is right (its
    block-diagonal mask)."""
    samples = _samples(cfg)
    batch = _collate(samples, False)
    ref = _alone(models["eager"], samples, True)
    mixed = _diffs(_packed(models["sdpa"], batch, True), ref)
    right = _diffs(_packed(models["sdpa"], batch, False), ref)
    print(f"transformers {transformers.__version__} sdpa, (logits, loss, grad) vs alone: "
          f"use_cache=True {tuple(f'{x:.2e}' for x in mixed)}, use_cache=False {tuple(f'{x:.2e}' for x in right)}")
    assert mixed[0] > MIX_EFFECT and mixed[1] > LOSS_TOL and mixed[2] > GRAD_TOL, mixed
    assert right[0] <= LOGIT_TOL and right[1] <= LOSS_TOL and right[2] <= GRAD_TOL, right


def test_multimodal_prompt_is_not_read_as_packed(cfg, models, monkeypatch):
    """One image + video prompt, no attention mask: 4.57.6 hands attention the temporal MRoPE row
    (repeated ids over vision tokens), 5.x no position ids. Neither is read as packed: the logits
    are those of eager on the same inputs (with a cache: one causal sequence)."""
    inputs = tiny.make_prompt_inputs(cfg, [[4, tiny.Image(4, 6), 3, tiny.Video(2, 4, 4), 5]],
                                     seed=int(torch.randint(0, 2**30, (1,))))
    inputs.pop("attention_mask")
    seen = []
    real = qt._segments_from_positions

    def spy(pos):
        plan = real(pos)
        seen.append(plan)
        return plan

    monkeypatch.setattr(qt, "_segments_from_positions", spy)
    with torch.no_grad():
        ref = models["eager"](**inputs, use_cache=True).logits
        models[NAME].model.rope_deltas = None
        out = models[NAME](**inputs, use_cache=True).logits
    assert (out - ref).abs().max().item() <= LOGIT_TOL
    assert all(p is None for p in seen)


# --------------------------------------------------------------------------------------------
# the readers: position ids and block-diagonal masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids,cu", [
    ([[0, 1, 2, 0, 1, 0, 1, 2, 3]], [0, 3, 5, 9]),
    ([[0, 0, 1, 2]], [0, 1, 4]),  # a sample of one token
    ([[5, 6, 7, 0, 1, 2]], [0, 3, 6]),  # restart below the previous id
    ([[1, 2, 1, 2, 3]], [0, 2, 5]),  # position_ids_start=1
    ([[0, 1, 2, 3], [0, 1, 0, 1]], [0, 4, 6, 8]),  # B > 1: segments never cross rows
    ([[0, 1, 2, 3, 4]], None),  # one sequence
    ([[0, 1, 2, 2, 2, 3, 0, 1]], None),  # a repeat: an MRoPE row, never read
    ([[0, 1, 4, 5, 0, 1]], None),  # a jump up: not a restart pattern
])
def test_segments_from_positions(ids, cu):
    plan = qt._segments_from_positions(torch.tensor(ids))
    if cu is None:
        assert plan is None
    else:
        assert plan.kind == "segments" and plan.cu_q.tolist() == cu
        assert plan.max_q == max(b - a for a, b in zip(cu, cu[1:]))


def _ref_attention(q, k, v, mask4d, scale):
    """Independent masked attention in float64; rows that see nothing give 0."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(H // Hkv, 1)
    v = v.double().repeat_interleave(H // Hkv, 1)
    s = (q.double() @ k.transpose(2, 3)) * scale
    s = s.masked_fill(~mask4d, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _block_mask(seg, causal=True):
    """(B, S) segment ids (-1 = padding) -> (B, 1, S, S) bool mask as transformers builds it."""
    S = seg.shape[1]
    m = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (seg >= 0).unsqueeze(2) & (seg >= 0).unsqueeze(1)
    if causal:
        m &= torch.ones(S, S, dtype=torch.bool).tril()
    return m.unsqueeze(1)


_SEGS = {
    "packed": [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]],
    "packed_b2": [[0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]],
    "packed_pad_end": [[0, 0, 0, 1, 1, 1, 1, -1, -1, -1]],  # padded to a multiple
    "packed_left_pad": [[-1, -1, 0, 0, 0, 1, 1, 2, 2, 2]],
}


@pytest.mark.parametrize("case", list(_SEGS) + ["window", "bidirectional_block", "interleaved"])
def test_block_diagonal_mask_is_one_varlen_call(case, monkeypatch):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, (1,))))
    if case in _SEGS:
        seg = torch.tensor(_SEGS[case])
        mask = _block_mask(seg)
    elif case == "window":  # causal sliding window of 3: not a partition
        i = torch.arange(10)
        mask = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - 3))[None, None]
    elif case == "bidirectional_block":  # packed, but one block sees its future
        mask = _block_mask(torch.tensor(_SEGS["packed"])).clone()
        mask[..., 5:9, 5:9] = True
    else:  # segments that interleave: 0 1 0 1 ...
        mask = _block_mask(torch.tensor([[0, 1, 0, 1, 0, 1, 2, 2, 2, 2]]))
    B, S = mask.shape[0], mask.shape[-1]
    H, Hkv, D = 4, 2, 16
    q = torch.randn(B, H, S, D, generator=gen)
    k, v = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    plan = qt._analyse(mask, True, S)
    expected = {"packed": "segments", "packed_b2": "segments", "packed_pad_end": "varlen",
                "packed_left_pad": "varlen"}.get(case, "fallback")
    assert plan.kind == expected
    calls = _spy(monkeypatch)
    out = qt.attend(q, k, v, mask, causal=True, scale=D**-0.5)
    ref = _ref_attention(q, k, v, mask, D**-0.5)
    rows = mask[:, 0].any(-1)
    assert (out.double() - ref)[rows].abs().max().item() <= 1e-5
    assert (out[~rows] == 0).all()
    if expected != "fallback":
        assert calls["flash_attn_varlen_func"] == 1 and calls["_sdpa_with_mask"] == 0
        fmask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager-style
        assert qt._analyse(fmask, True, S).kind == expected


@pytest.mark.parametrize("chunk", [1, 7, 10**9], ids=["one-row", "chunks-of-rows", "whole"])
def test_mask_analysis_in_row_chunks_gives_the_same_plans(chunk, monkeypatch):
    """The mask is analysed in chunks of query rows (``_CHUNK_ELEMS``); any chunk size gives the same
    plan, also for masks whose defect lies in one late chunk only."""
    monkeypatch.setattr(qt, "_CHUNK_ELEMS", chunk)
    expected = {"packed": "segments", "packed_b2": "segments", "packed_pad_end": "varlen", "packed_left_pad": "varlen"}
    for case, seg in _SEGS.items():
        mask = _block_mask(torch.tensor(seg))
        for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min),
                  mask.expand(-1, 3, -1, -1)):
            plan = qt._analyse(m, True, m.shape[-1])
            assert plan.kind == expected.get(case, plan.kind), (case, chunk)
            ref = {"segments": "segments", "varlen": "varlen"}[expected[case]]
            assert plan.kind == ref
    late = _block_mask(torch.tensor(_SEGS["packed"])).clone()
    late[..., -1, 0] = True  # the last query also sees the first sample's first key
    assert qt._analyse(late, True, late.shape[-1]).kind == "fallback"
    bias = torch.zeros(late.shape).masked_fill(~_block_mask(torch.tensor(_SEGS["packed"])), float("-inf"))
    bias[..., -1, -1] = 0.5  # an additive bias, not 0 / -inf, in the last row only
    assert qt._analyse(bias, True, bias.shape[-1]).kind == "fallback"
    heads = _block_mask(torch.tensor(_SEGS["packed"])).expand(-1, 2, -1, -1).clone()
    heads[:, 1, -1, 0] = True  # per-head masks that differ in the last row
    assert qt._analyse(heads, True, heads.shape[-1]).kind == "fallback"
    # plain causal, padding and cache masks keep their plans
    i = torch.arange(8)
    causal = (i[None] <= i[:, None])[None, None]
    assert qt._analyse(causal, True, 8).kind == "dense"
    cache = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    cache[..., 5:] = False
    plan = qt._analyse(cache, True, 8)
    assert plan.kind == "kvcache" and plan.cache_seqlens.tolist() == [5]


def test_mask_analysis_memory_is_bounded():
    """A packed 4096-token row as a float mask (64 MiB): the analysis allocates a few chunks' worth,
    not ~9 bytes per mask element (about 150 MB before row chunks)."""
    from qwen3vl_flash.benchmarking import peak_extra_bytes

    S = 4096
    seg = torch.repeat_interleave(torch.arange(4), S // 4)[None]
    mask = torch.zeros(1, 1, S, S).masked_fill(~_block_mask(seg), torch.finfo(torch.float32).min)
    box = {}
    peak = peak_extra_bytes(lambda: box.update(plan=qt._analyse(mask, True, S)))
    assert box["plan"].kind == "segments"
    assert peak <= 12 * qt._CHUNK_ELEMS, f"{peak / 1e6:.1f} MB for a {mask.numel() * 4 / 1e6:.1f} MB mask"


def test_a_mask_that_says_otherwise_wins():
    """Restarting position ids with an explicit plain-causal mask: the mask is followed (one causal
    sequence); without the mask the same ids give the packed segments."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, (1,))))
    S, H, Hkv, D = 9, 4, 2, 16
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    q = torch.randn(1, H, S, D, generator=gen)
    k, v = torch.randn(1, Hkv, S, D, generator=gen), torch.randn(1, Hkv, S, D, generator=gen)
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    out_mask = qt.attend(q, k, v, causal, causal=True, scale=D**-0.5, position_ids=pos)
    assert (out_mask.double() - _ref_attention(q, k, v, causal, D**-0.5)).abs().max().item() <= 1e-5
    packed = _block_mask(torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2]]))
    out_pos = qt.attend(q, k, v, None, causal=True, scale=D**-0.5, position_ids=pos)
    assert (out_pos.double() - _ref_attention(q, k, v, packed, D**-0.5)).abs().max().item() <= 1e-5
    # a block-diagonal mask that disagrees with the ids: the mask's segments
    other = _block_mask(torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]]))
    out_other = qt.attend(q, k, v, other, causal=True, scale=D**-0.5, position_ids=pos)
    assert (out_other.double() - _ref_attention(q, k, v, other, D**-0.5)).abs().max().item() <= 1e-5


def test_decode_never_reads_position_ids(monkeypatch):
    """q_len < kv_len (decode, chunked prefill) is never read as packed: the ids are not touched."""
    def boom(*a, **k):
        raise AssertionError("position ids read on a decode call")

    monkeypatch.setattr(qt, "_position_plan", boom)
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    out = qt.attend(q, k, v, None, causal=True, position_ids=torch.tensor([[0]]))
    ref = _ref_attention(q, k, v, torch.ones(1, 1, 1, 7, dtype=torch.bool), 16**-0.5)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_position_ids_read_once_per_forward(cfg, models, monkeypatch):
    """Every layer gets the same ids object: one host read per forward, not one per layer."""
    reads = []
    real = qt._segments_from_positions

    def counting(pos):
        reads.append(1)
        return real(pos)

    monkeypatch.setattr(qt, "_segments_from_positions", counting)
    batch = _collate(_samples(cfg), False)
    with torch.no_grad():
        models[NAME](**batch, use_cache=True)
    assert len(reads) == 1


def test_packed_rows_under_context_parallelism_are_refused():
    """Each rank holds a shard: packed ids there would be read shard by shard, so refuse."""
    q = torch.randn(1, 4, 6, 8)
    k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="packed sequences"):
        qt.attend(q, k, v, None, causal=True, cp_group=object(), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))


def test_output_attentions_on_a_packed_row(cfg, models):
    """The eager fallback (attention weights requested) reads the restarting ids too: no weight
    crosses a sample boundary, and the logits are the samples' alone."""
    samples = _samples(cfg)
    batch = _collate(samples, False)
    batch.pop("labels")
    with torch.no_grad():
        ref = torch.cat([models["eager"](input_ids=s[None]).logits[0] for s in samples])
        out = models[NAME](**batch, use_cache=True, output_attentions=True)
    assert (out.logits[0] - ref).abs().max().item() <= LOGIT_TOL
    seg = torch.arange(len(samples)).repeat_interleave(torch.tensor([s.numel() for s in samples]))
    cross = seg[:, None] != seg[None, :]
    assert len(out.attentions) == cfg.text_config.num_hidden_layers
    for a in out.attentions:
        assert a[0][:, cross].abs().max().item() == 0.0
