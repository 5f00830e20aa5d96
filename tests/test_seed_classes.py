"""The seed's classes against transformers' own Qwen3-VL modules, weight for weight."""

from __future__ import annotations

import os

import pytest
import torch

from qwen3vl_flash.hardware.profiles import profile_for_device

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import qwen3vl_flash as qf
from qwen3vl_flash.hardware.profiles import ENV_PROFILE, select_profile
from qwen3vl_flash.testing import tiny
from qwen3vl_flash.integrations.qwen3_vl import MRoPE, _rope_settings

M = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
ATOL = 2e-5  # float32 noise for these sizes (seen: ~2e-7)


def _seed():
    return int(torch.randint(0, 2**30, (1,)))


def _config(kind: str):
    cfg = tiny.tiny_config(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16)
    cfg.text_config._attn_implementation = "eager"
    return cfg if kind == "full" else cfg.text_config


def _causal_mask(B, Sq, Sk, pad=None):
    """Additive mask for transformers' eager modules (bottom-right causal, optional key padding)."""
    j = torch.arange(Sk)
    i = torch.arange(Sq).unsqueeze(1) + Sk - Sq
    ok = (j <= i).unsqueeze(0).expand(B, Sq, Sk)
    if pad is not None:
        ok = ok & pad.unsqueeze(1)
    return torch.zeros(B, 1, Sq, Sk).masked_fill(~ok.unsqueeze(1), torch.finfo(torch.float32).min)


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 4) + (p.dim() == 1))


def _hf_out(x):
    return x[0] if isinstance(x, tuple) else x


@pytest.mark.parametrize("kind", ["full", "text"])
@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_attention_matches_transformers_weight_for_weight(kind, direction):
    cfg = _config(kind)
    tc = getattr(cfg, "text_config", cfg)
    hf = M.Qwen3VLTextAttention(tc, layer_idx=0).eval()
    ours = qf.FlashAttention2(cfg, 0).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    src, dst = (hf, ours) if direction == "hf_to_ours" else (ours, hf)
    _randomise(src, _seed())
    dst.load_state_dict(src.state_dict())
    B, S = 2, 13
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(B, S, tc.hidden_size, generator=gen)
    pos = torch.randint(0, 30, (3, B, S), generator=gen)  # MRoPE ids need not be monotonic
    cos, sin = M.Qwen3VLTextRotaryEmbedding(tc)(x, pos)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :4] = False
    with torch.no_grad():
        ref = _hf_out(hf(x, position_embeddings=(cos, sin), attention_mask=_causal_mask(B, S, S, pad)))
        out, w, pkv = ours(x, attention_mask=pad.long(), position_ids=pos)  # our own MRoPE from ids
        out2, _, _ = ours(x, attention_mask=pad.long(), position_embeddings=(cos, sin))
    assert w is None and pkv is None
    valid = pad
    assert (out - ref)[valid].abs().max().item() <= ATOL
    assert (out2 - ref)[valid].abs().max().item() <= ATOL
    # the comparison can fail: dropping the causal/padding mask moves the output far beyond ATOL
    assert (out - _hf_out(hf(x, position_embeddings=(cos, sin), attention_mask=None)))[valid].abs().max() > 1e-3


@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_decoder_layer_matches_transformers(direction):
    cfg = _config("full")
    tc = cfg.text_config
    hf = M.Qwen3VLTextDecoderLayer(tc, 1).eval()
    ours = qf.FlashAttention2TransformerLayer(cfg, 1).eval()
    src, dst = (hf, ours) if direction == "hf_to_ours" else (ours, hf)
    _randomise(src, _seed())
    dst.load_state_dict(src.state_dict())
    B, S = 3, 9
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(B, S, tc.hidden_size, generator=gen)
    pos = torch.arange(S).view(1, 1, S).expand(3, B, S)
    cos, sin = M.Qwen3VLTextRotaryEmbedding(tc)(x, pos)
    with torch.no_grad():
        ref = _hf_out(hf(x, position_embeddings=(cos, sin), attention_mask=_causal_mask(B, S, S)))
        out, _, _ = ours(x)  # default positions 0..S-1
    assert (out - ref).abs().max().item() <= ATOL


def test_mrope_equals_transformers_rotary():
    cfg = tiny.tiny_config(head_dim=32, hidden_size=64, num_heads=2, num_kv_heads=1)
    tc = cfg.text_config
    pos = torch.randint(0, 1000, (3, 2, 17))
    x = torch.randn(2, 17, 64)
    cos, sin = M.Qwen3VLTextRotaryEmbedding(tc)(x, pos)
    ours = qf.FlashAttention2(tc, 0).rotary_emb
    c2, s2 = ours(x, pos)
    assert torch.allclose(cos, c2, atol=1e-6) and torch.allclose(sin, s2, atol=1e-6)


def test_bare_default_config_uses_default_mrope_section():
    """``Qwen3VLConfig()`` (the seed's own example): 32 heads MHA, head_dim 128, no mrope_section
    on 4.57 (where transformers' own rotary class fails); ours falls back to [24, 20, 20]."""
    cfg = transformers.Qwen3VLConfig()
    attn = qf.FlashAttention2(cfg, 0)
    assert attn.rotary_emb.mrope_section == (24, 20, 20)
    assert attn.num_heads == 32 and attn.head_dim == 128
    x = torch.randn(1, 6, cfg.text_config.hidden_size) * 0.1
    with torch.no_grad():
        out, w, pkv = attn(x, output_attentions=True, use_cache=True)
    assert out.shape == x.shape and w.shape == (1, 32, 6, 6) and pkv[0].shape == (1, 32, 6, 128)
    assert torch.allclose(w.sum(-1), torch.ones(1, 32, 6), atol=1e-5)
    assert torch.all(w.triu(1) == 0)  # causal
    # the fallback equals transformers' rotary given the same section explicitly
    theta, section = _rope_settings(cfg.text_config)  # 5e6 on 4.57, 5e5 on 5.17's bare config
    assert section is None
    ref_cfg = tiny.tiny_config(head_dim=128, hidden_size=128, num_heads=1, num_kv_heads=1).text_config
    if tiny.is_v5():
        ref_cfg.rope_parameters = dict(ref_cfg.rope_parameters, mrope_section=[24, 20, 20], rope_theta=theta)
    else:
        ref_cfg.rope_scaling = dict(ref_cfg.rope_scaling, mrope_section=[24, 20, 20])
        ref_cfg.rope_theta = theta
    pos = torch.randint(0, 5000, (3, 1, 6))
    cos, sin = M.Qwen3VLTextRotaryEmbedding(ref_cfg)(x[..., :128], pos)
    c2, s2 = attn.rotary_emb(x, pos)
    assert torch.allclose(cos, c2, atol=1e-5) and torch.allclose(sin, s2, atol=1e-5)


@pytest.mark.parametrize("cache", ["tuple", "dynamic", "static"])
def test_incremental_decode_equals_full_forward(cache):
    cfg = _config("full")
    tc = cfg.text_config
    attn = qf.FlashAttention2(cfg, 0).eval()
    _randomise(attn, _seed())
    B, S, P = 2, 11, 6  # prefill P tokens, then decode one at a time
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(B, S, tc.hidden_size, generator=gen)
    with torch.no_grad():
        full, _, _ = attn(x)
        if cache == "tuple":
            pkv = None
        elif cache == "dynamic":
            pkv = transformers.DynamicCache(**({"config": tc} if tiny.is_v5() else {}))
        else:
            pkv = transformers.StaticCache(config=tc, max_cache_len=32, **({} if tiny.is_v5() else {"max_batch_size": B}))
        out, _, new = attn(x[:, :P], past_key_value=pkv, use_cache=True)
        outs = [out]
        pkv = new if cache == "tuple" else pkv
        for t in range(P, S):
            o, _, new = attn(x[:, t:t + 1], past_key_value=pkv, use_cache=True)
            pkv = new if cache == "tuple" else pkv
            outs.append(o)
    got = torch.cat(outs, dim=1)
    assert (got - full).abs().max().item() <= ATOL


def test_hardware_specific_pins_profile():
    cfg = _config("full")
    detected = qf.HardwareSpecificFlashAttention2(cfg, 0)
    assert detected.profile_name == select_profile().name
    assert detected.hardware is not None and detected.tile_size == detected.profile.tile_size
    pinned = qf.HardwareSpecificFlashAttention2(cfg, 0, profile="i5-10210u")
    assert pinned.profile_name == "i5-10210u" and pinned.tile_size == 64
    assert "i5-10210u" in repr(pinned)
    plain = qf.FlashAttention2(cfg, 0)
    plain.load_state_dict(pinned.state_dict())
    seen = []
    import qwen3vl_flash.integrations.qwen3_vl as q

    original = q.attend

    def spy(*a, **k):
        seen.append(profile_for_device(torch.device("cpu")).name)
        return original(*a, **k)

    before = os.environ.get(ENV_PROFILE)
    x = torch.randn(1, 300, cfg.text_config.hidden_size)
    try:
        q.attend = spy
        with torch.no_grad():
            a = pinned(x)[0]
            b = plain(x)[0]
    finally:
        q.attend = original
    assert seen == ["i5-10210u", qf.select_profile().name]
    assert os.environ.get(ENV_PROFILE) == before  # restored
    assert (a - b).abs().max().item() <= ATOL
    with pytest.raises(ValueError, match="unknown"):
        qf.HardwareSpecificFlashAttention2(cfg, 0, profile="no-such-profile")


def test_factory():
    cfg = _config("full")
    assert type(qf.create_flash_attention_2(cfg, 0)) is qf.FlashAttention2
    assert type(qf.create_flash_attention_2(cfg, 0, hardware_specific=True)) is qf.HardwareSpecificFlashAttention2
    hs = qf.create_flash_attention_2(cfg, 2, profile="sm61")
    assert isinstance(hs, qf.HardwareSpecificFlashAttention2) and hs.profile_name == "sm61" and hs.layer_idx == 2
    layer = qf.create_flash_attention_2(cfg, 1, layer=True, profile="sm61")
    assert isinstance(layer, qf.FlashAttention2TransformerLayer)
    assert layer.self_attn.profile_name == "sm61"


def test_mrope_section_validation_of_odd_head_dim():
    m = MRoPE(head_dim=72)  # a bare config with a non-128 head_dim keeps the 24:20:20 proportions
    assert sum(m.mrope_section) == 36
