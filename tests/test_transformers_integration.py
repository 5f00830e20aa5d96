"""transformers integration: a tiny random Qwen3-VL (images, a video, a left-padded batch of 3
prompts) with our attention against transformers' own ``eager`` and ``sdpa`` on the same weights.

Runs on the installed transformers (5.x) and, through tests/run_transformers_457.sh, on 4.57.6.
"""

from __future__ import annotations

import collections
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import qwen3vl_flash as qf  # noqa: E402
from qwen3vl_flash import conventions  # noqa: E402
from qwen3vl_flash.testing import tiny  # noqa: E402
from qwen3vl_flash.integrations import transformers as qt  # noqa: E402

NAME = qf.ATTN_IMPLEMENTATION
# float32 noise of a 2-layer model with unit-scale activations (seen: ~1.5e-6)
LOGIT_ATOL = 5e-5
# smallest effect a masking mistake has on these logits (checked below, seen: ~3.5)
MASK_EFFECT = 1e-2


@pytest.fixture(scope="module")
def cfg():
    return tiny.tiny_config()


@pytest.fixture(scope="module")
def models(cfg):
    seed = int(torch.randint(0, 2**30, (1,)))
    return {impl: tiny.build_model(cfg, impl, seed=seed) for impl in ("eager", "sdpa", NAME)}


@pytest.fixture
def batch(cfg):
    return tiny.make_batch(cfg, seed=int(torch.randint(0, 2**30, (1,))))


def _valid(inputs):
    return inputs["attention_mask"].bool()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


class _Counter:
    """Counts calls of our public attention functions made from the integration module."""

    NAMES = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache")

    def __init__(self, monkeypatch):
        self.calls = collections.Counter()
        for name in self.NAMES:
            original = getattr(qt, name)

            def wrapped(*a, _o=original, _n=name, **k):
                self.calls[_n] += 1
                return _o(*a, **k)

            monkeypatch.setattr(qt, name, wrapped)


# --------------------------------------------------------------------------------------------
# registration and switching
# --------------------------------------------------------------------------------------------


def test_register_installs_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert qf.register() == NAME
    assert AttentionInterface._global_mapping[NAME] is qt.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[NAME] is qt.attention_mask
    assert qf.register() == NAME  # idempotent


def _assert_ours(model):
    assert model.config._attn_implementation == NAME
    assert model.config.text_config._attn_implementation == NAME
    assert model.config.vision_config._attn_implementation == NAME
    assert model.model.visual.config._attn_implementation == NAME
    assert model.model.language_model.config._attn_implementation == NAME


def test_from_config_and_logits_match_eager(cfg, models, batch):
    _assert_ours(models[NAME])
    ref = _logits(models["eager"], batch)
    out = _logits(models[NAME], batch)
    m = _valid(batch)
    diff = (out - ref)[m].abs().max().item()
    assert diff <= LOGIT_ATOL, diff
    # the comparison can fail: ignoring the padding moves the logits far beyond the tolerance
    unpadded = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    assert (_logits(models[NAME], unpadded) - ref)[m].abs().max().item() > MASK_EFFECT


def test_from_pretrained(tmp_path, cfg, models, batch):
    models["sdpa"].save_pretrained(tmp_path)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=NAME).eval()
    _assert_ours(model)
    diff = (_logits(model, batch) - _logits(models["eager"], batch))[_valid(batch)].abs().max().item()
    assert diff <= LOGIT_ATOL, diff


def test_enable_switches_text_and_vision(cfg, models, batch, monkeypatch):
    model = tiny.build_model(cfg, "sdpa", seed=7)
    ref = tiny.build_model(cfg, "eager", seed=7)
    assert qf.enable(model) is model
    _assert_ours(model)
    counter = _Counter(monkeypatch)
    diff = (_logits(model, batch) - _logits(ref, batch))[_valid(batch)].abs().max().item()
    assert diff <= LOGIT_ATOL, diff
    assert counter.calls["flash_attn_varlen_func"] > 0  # it really ran through our functions


# --------------------------------------------------------------------------------------------
# generation: DynamicCache and StaticCache, padded batch and single prompt
# --------------------------------------------------------------------------------------------


def _single(cfg, seed):
    return tiny.make_prompt_inputs(cfg, [[4, tiny.Video(2, 4, 4), 3, tiny.Image(4, 6), 5]], seed=seed)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("prompts", ["padded_batch", "single"])
def test_generate_32_tokens_identical_to_sdpa(cfg, models, cache, prompts, monkeypatch):
    seed = int(torch.randint(0, 2**30, (1,)))
    inputs = tiny.make_batch(cfg, seed=seed) if prompts == "padded_batch" else _single(cfg, seed)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, return_dict_in_generate=True,
              output_logits=True, cache_implementation=None if cache == "dynamic" else "static")
    ref = models["sdpa"].generate(**inputs, **kw)
    counter = _Counter(monkeypatch)
    out = models[NAME].generate(**inputs, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    # logits at every step agree to float32 noise (a kernel that attends to empty StaticCache
    # slots or to padding gives ~1e-2 and more, yet may still pick the same tokens)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert diff <= LOGIT_ATOL, diff
    assert sum(counter.calls.values()) > 0
    if cache == "static" and prompts == "single":  # decode over the valid prefix of the buffer
        assert counter.calls["flash_attn_with_kvcache"] > 0


def test_chunked_prefill_bottom_right(cfg, models):
    """q_len < kv_len: a prompt fed in two chunks gives the logits of one full forward."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, (1,))))
    ids = torch.randint(tiny.FIRST_TEXT_TOKEN, cfg.text_config.vocab_size, (2, 23), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    pos = torch.arange(23).expand(2, 23)  # explicit text positions: no state left from earlier calls
    full = _logits(models["eager"], dict(input_ids=ids, attention_mask=mask, position_ids=pos))
    model = models[NAME]
    with torch.no_grad():
        cache = transformers.DynamicCache(**({"config": model.config} if tiny.is_v5() else {}))
        a = model(input_ids=ids[:, :14], attention_mask=mask[:, :14], position_ids=pos[:, :14],
                  past_key_values=cache, use_cache=True)
        b = model(input_ids=ids[:, 14:], attention_mask=mask, position_ids=pos[:, 14:],
                  past_key_values=a.past_key_values, use_cache=True)
    got = torch.cat([a.logits, b.logits], dim=1)
    diff = (got - full)[mask.bool()].abs().max().item()
    assert diff <= LOGIT_ATOL, diff


# --------------------------------------------------------------------------------------------
# vision tower
# --------------------------------------------------------------------------------------------


def test_vision_tower_one_varlen_call_per_layer(cfg, models, monkeypatch):
    from transformers import AttentionInterface

    calls = []
    original = AttentionInterface._global_mapping[NAME]

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append((type(module).__name__, tuple(query.shape), kwargs.get("cu_seq_lens_q")))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, counting)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, (1,))))
    grid = torch.tensor([[3, 4, 4], [1, 4, 6], [1, 6, 4]])  # a 3-frame video and two images: 5 segments
    vc = cfg.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * vc.temporal_patch_size * vc.patch_size**2, generator=gen)
    with torch.no_grad():
        out = models[NAME].model.visual(pixels, grid_thw=grid)
        ref = models["eager"].model.visual(pixels, grid_thw=grid)
    vision_calls = [c for c in calls if "Vision" in c[0]]
    assert len(vision_calls) == vc.depth  # one call per layer, not one per frame
    for _, shape, cu in vision_calls:
        assert shape == (1, vc.num_heads, int(grid.prod(-1).sum()), vc.hidden_size // vc.num_heads)
        assert cu.tolist() == [0, 16, 32, 48, 72, 96]
    out0 = out[0] if isinstance(out, tuple) else getattr(out, "pooler_output", None)
    ref0 = ref[0] if isinstance(ref, tuple) else getattr(ref, "pooler_output", None)
    if out0 is None:
        out0, ref0 = out.last_hidden_state, ref.last_hidden_state
    assert (out0 - ref0).abs().max().item() <= LOGIT_ATOL


# --------------------------------------------------------------------------------------------
# output_attentions, context parallel hook, mask analysis
# --------------------------------------------------------------------------------------------


def test_output_attentions_falls_back_to_eager_with_one_warning(cfg, models, batch, caplog):
    conventions._WARNED.discard(("eager", "output_attentions=True"))
    with caplog.at_level(logging.WARNING, logger="qwen3vl_flash"):
        with torch.no_grad():
            out = models[NAME](**batch, output_attentions=True)
            models[NAME](**batch, output_attentions=True)
            ref = models["eager"](**batch, output_attentions=True)
    warnings = [r for r in caplog.records if "output_attentions" in r.getMessage()]
    assert len(warnings) == 1
    assert out.attentions is not None and len(out.attentions) == cfg.text_config.num_hidden_layers
    m = _valid(batch)
    for a, r in zip(out.attentions, ref.attentions):
        assert a.shape == r.shape
        rows = m[:, None, :, None].expand_as(a)
        assert (a - r)[rows].abs().max().item() <= 1e-5
    assert (out.logits - ref.logits)[m].abs().max().item() <= LOGIT_ATOL


def test_enable_context_parallel_routes_text_attention(cfg, monkeypatch):
    import qwen3vl_flash.parallel as par

    seen = []

    def fake_cp(q, k, v, causal=False, group=None, **kw):
        seen.append((tuple(q.shape), causal, group))
        return qf.flash_attn_func(q, k, v, causal=causal, softmax_scale=kw.get("softmax_scale"))

    monkeypatch.setattr(par, "context_parallel_attn", fake_cp)
    model = tiny.build_model(cfg, "sdpa", seed=3)
    ref = tiny.build_model(cfg, "eager", seed=3)
    group = object()
    qf.enable(model, context_parallel=group)
    ids = torch.randint(tiny.FIRST_TEXT_TOKEN, cfg.text_config.vocab_size, (1, 17))
    diff = (_logits(model, dict(input_ids=ids)) - _logits(ref, dict(input_ids=ids))).abs().max().item()
    assert diff <= LOGIT_ATOL
    assert len(seen) == cfg.text_config.num_hidden_layers
    assert all(c and g is group for _, c, g in seen)
    qf.enable(model)  # context_parallel=None removes it
    seen.clear()
    _logits(model, dict(input_ids=ids))
    assert not seen


def _ref_attention(q, k, v, mask4d, scale):
    """Independent masked attention in float64; rows that see nothing give 0."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(H // Hkv, 1)
    v = v.double().nan_to_num(0.0).repeat_interleave(H // Hkv, 1)  # poisoned slots are masked out
    s = (q.double() @ k.transpose(2, 3)) * scale
    s = s.masked_fill(~mask4d, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _mask_from(pad, Sq, Sk, causal):
    """(B, Sk) key padding + written slots -> sdpa-style 4D mask, queries at the last Sq slots
    written (``pad`` True = real token)."""
    B = pad.shape[0]
    written = pad.shape[1]
    j = torch.arange(Sk)
    i = torch.arange(Sq).unsqueeze(1) + written - Sq
    keys = torch.zeros(B, Sk, dtype=torch.bool)
    keys[:, :written] = pad
    m = keys[:, None, :].expand(B, Sq, Sk).clone()
    if causal:
        m &= (j <= i).unsqueeze(0)
    m &= pad[:, written - Sq:].unsqueeze(2)  # padded queries see nothing
    return m.unsqueeze(1)


@pytest.mark.parametrize("case", ["left_pad_prefill", "right_pad", "static_decode", "static_left_pad_decode",
                                  "chunk", "custom"])
def test_attend_mask_patterns_match_reference(case):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, (1,))))
    B, H, Hkv, D = 3, 4, 2, 16
    Sq, written, Sk = {"left_pad_prefill": (9, 9, 9), "right_pad": (9, 9, 9), "static_decode": (1, 7, 12),
                       "static_left_pad_decode": (1, 7, 12), "chunk": (4, 10, 10), "custom": (6, 6, 6)}[case]
    pad = torch.ones(B, written, dtype=torch.bool)
    if case in ("left_pad_prefill", "static_left_pad_decode", "chunk"):
        pad[1, :3] = False
        pad[2, :1] = False
    if case == "right_pad":
        pad[0, -2:] = False
    mask = _mask_from(pad, Sq, Sk, causal=True)
    if case == "custom":  # a bidirectional block over keys 1..3: not a padding/causal pattern
        mask = mask.clone()
        mask[:, :, 1:4, 1:4] = True
    q = torch.randn(B, H, Sq, D, generator=gen)
    k = torch.randn(B, Hkv, Sk, D, generator=gen)
    v = torch.randn(B, Hkv, Sk, D, generator=gen)
    if Sk > written:  # StaticCache: empty slots hold zeros, poison them to catch any read
        k[:, :, written:] = 1e4
        v[:, :, written:] = float("nan")
    expected_kind = {"left_pad_prefill": "varlen", "right_pad": "varlen", "static_decode": "kvcache",
                     "static_left_pad_decode": "kvcache", "chunk": "kvcache", "custom": "fallback"}[case]
    plan = qt._analyse(mask, True, Sk)
    assert plan.kind == expected_kind
    if case in ("static_left_pad_decode", "chunk"):  # one key range per row: read in place from its start
        assert plan.cache_leftpad.tolist() == [0, 3, 1] and plan.cache_seqlens.tolist() == [written] * 3
    out = qt.attend(q, k, v, mask, causal=True, scale=D**-0.5)
    ref = _ref_attention(q, k, v, mask, D**-0.5)
    valid_rows = mask[:, 0].any(-1)  # (B, Sq)
    assert torch.isfinite(out[valid_rows]).all()
    assert (out.double() - ref)[valid_rows].abs().max().item() <= 1e-5
    # float masks (eager-style) are read the same way
    fmask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    out_f = qt.attend(q, k, v, fmask, causal=True, scale=D**-0.5)
    assert (out_f.double() - ref)[valid_rows].abs().max().item() <= 1e-5


def test_mask_function_never_skips_when_lengths_differ():
    """5.x's sdpa mask returns None for a StaticCache prefill (top-left causal over the padded
    buffer); ours must return a real mask there, and None only for plain causal self-attention."""
    from transformers.masking_utils import causal_mask_function

    pad = torch.ones(2, 5, dtype=torch.bool)
    if tiny.is_v5():
        kw = dict(batch_size=2, q_length=5, kv_length=12, q_offset=0, kv_offset=0)
        same = dict(batch_size=2, q_length=5, kv_length=5, q_offset=0, kv_offset=0)
    else:
        kw = dict(batch_size=2, cache_position=torch.arange(5), kv_length=12, kv_offset=0)
        same = dict(batch_size=2, cache_position=torch.arange(5), kv_length=5, kv_offset=0)
    m = qt.attention_mask(mask_function=causal_mask_function, attention_mask=pad, allow_is_causal_skip=True, **kw)
    assert m is not None and m.shape == (2, 1, 5, 12)
    assert not m[..., 5:].any()
    assert qt.attention_mask(mask_function=causal_mask_function, attention_mask=pad[:, :5],
                             allow_is_causal_skip=True, **same) is None


def test_mask_function_keeps_the_mask_when_transformers_forbids_the_skip():
    """A decode step whose 2D mask covers every cache slot may skip the mask (None), except when
    transformers passes allow_is_causal_skip=False (a compileable cache: generate would drop the
    None from the compiled step's inputs and recompile it)."""
    from transformers.masking_utils import causal_mask_function

    pad = torch.ones(2, 12, dtype=torch.bool)
    if tiny.is_v5():
        kw = dict(batch_size=2, q_length=1, kv_length=12, q_offset=11, kv_offset=0)
    else:
        kw = dict(batch_size=2, cache_position=torch.tensor([11]), kv_length=12, kv_offset=0)
    assert qt.attention_mask(mask_function=causal_mask_function, attention_mask=pad, allow_is_causal_skip=True,
                             **kw) is None
    m = qt.attention_mask(mask_function=causal_mask_function, attention_mask=pad, allow_is_causal_skip=False, **kw)
    assert m is not None and m.shape == (2, 1, 1, 12) and bool(m.all())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the compiled decode op needs TRITON_INTERPRET=1 on CPU")
def test_generate_static_cache_compiles_the_decode_step_once(cfg):
    """generate with a StaticCache and its own compile (forced on CPU, eager backend): one graph
    for every decode step of an unpadded prompt, as sdpa gets. Before the fix above, the last
    steps (2D mask as long as the cache) compiled a second graph."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    model = tiny.build_model(cfg, NAME, seed=int(torch.randint(0, 1000, (1,))))
    inputs = tiny.make_prompt_inputs(cfg, [[8]])
    cc = CompileConfig(backend="eager")
    cc._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, cache_implementation="static",
                   compile_config=cc)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_demo_cli_default_run(capsys):
    import argparse

    from qwen3vl_flash.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--max-new-tokens", "8", "--seed", str(int(torch.randint(0, 1000, (1,))))])
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "tokens identical : yes" in text
    assert "sdpa" in text and NAME in text and "peak" in text


@pytest.mark.parametrize("prompts", ["single", "padded_batch"])
def test_static_cache_decode_compiles_fullgraph(cfg, models, monkeypatch, prompts):
    """A StaticCache decode step under torch.compile(fullgraph=True) traces through our attention
    (generate's own compile on GPUs does this) and picks the tokens sdpa's compiled step picks.
    Where the Triton kernels run (a GPU, or the interpreter as in tests/run.sh) the step goes
    through the split-KV decode op with the key ranges read from the mask on the device."""
    import os

    from transformers import StaticCache

    from qwen3vl_flash.backends import triton_decode

    calls = []
    real = triton_decode.decode_attention

    def counting(*a, **kw):
        calls.append(kw.get("cache_leftpad") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(triton_decode, "decode_attention", counting)

    inputs = _single(cfg, seed=5) if prompts == "single" else tiny.make_batch(cfg, seed=5)
    B, L = inputs["input_ids"].shape
    toks = {}
    for impl in ("sdpa", NAME):
        model = models[impl]
        try:
            cache = StaticCache(config=model.config, max_cache_len=L + 8)
        except TypeError:  # 4.57
            cache = StaticCache(config=model.config, max_batch_size=B, max_cache_len=L + 8)
        torch._dynamo.reset()
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True, cache_position=torch.arange(L))
            tok = out.logits[:, -1:].argmax(-1)
            step = torch.compile(model, fullgraph=True, backend="eager")
            mask = torch.cat([inputs["attention_mask"], torch.ones(B, 8, dtype=inputs["attention_mask"].dtype)], 1)
            seq = []
            for i in range(4):
                pos = L + i
                # explicit MRoPE positions: transformers' own position code branches on the cache
                pid = (pos + model.model.rope_deltas.view(B, 1)).view(1, B, 1).expand(3, B, 1)
                o = step(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos]),
                         attention_mask=mask[:, :pos + 1], position_ids=pid)
                tok = o.logits[:, -1:].argmax(-1)
                seq.append(tok.flatten().tolist())
        toks[impl] = seq
    torch._dynamo.reset()
    assert toks[NAME] == toks["sdpa"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert calls and all(calls), "the compiled decode step did not take the split-KV op"


def test_compiled_decode_refuses_a_mask_that_is_not_one_key_range():
    """The device-side check of the compiled decode path: a hole inside a row's keys (not padding
    + causal) raises instead of attending to the hole; a proper left-padded range passes and
    matches the reference."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the decode kernels run on CPU tensors only under TRITON_INTERPRET=1 (tests/run.sh)")
    B, H, Hkv, D, Sk = 2, 4, 2, 16, 12
    q = torch.randn(B, H, 1, D)
    k, v = torch.randn(B, Hkv, Sk, D), torch.randn(B, Hkv, Sk, D)
    good = torch.zeros(B, 1, 1, Sk, dtype=torch.bool)
    good[0, ..., :9] = True
    good[1, ..., 3:9] = True  # left padding of 3
    out = qt._compiled_decode(q, k, v, good, D ** -0.5)
    ref = _ref_attention(q, k, v, good, D ** -0.5)
    assert (out - ref).abs().max().item() < 1e-4
    bad = good.clone()
    bad[0, ..., 4] = False  # a hole
    with pytest.raises(RuntimeError):
        qt._compiled_decode(q, k, v, bad, D ** -0.5)
