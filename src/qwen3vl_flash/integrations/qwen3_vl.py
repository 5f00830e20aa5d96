"""The seed's module classes, for real: drop-in Qwen3-VL text attention / decoder layer.

    attn = FlashAttention2(config, layer_idx=0)            # Qwen3VLConfig or Qwen3VLTextConfig
    out, attn_weights, past_key_value = attn(hidden_states, position_ids=pos, use_cache=True)

Parameter names and shapes equal transformers' ``Qwen3VLTextAttention`` (q/k/v/o projections,
per-head RMSNorm ``q_norm``/``k_norm``) and ``Qwen3VLTextDecoderLayer`` (``self_attn``, ``mlp``,
``input_layernorm``, ``post_attention_layernorm``), so ``load_state_dict`` moves weights both ways.
Attention runs through :func:`qwen3vl_flash.integrations.transformers.attend` (causal GQA, K/V not
repeated, padding honoured). Interleaved MRoPE (sections t/h/w, default ``[24, 20, 20]``) is
computed here when ``position_embeddings`` is not given.

``forward(hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
output_attentions=False, use_cache=False, position_embeddings=None, **kwargs)`` returns
``(output, attn_weights, past_key_value)``:

* ``attention_mask``: None (causal), a 2D (B, kv_len) padding mask (1 = token, 0 = pad), or a 4D
  mask (B, 1, q_len, kv_len), bool (True = attend) or additive float.
* ``position_ids``: (3, B, S) MRoPE ids (t, h, w), (B, S) or (S,) text ids, or None
  (positions continue after the cache).
* ``past_key_value``: a transformers ``Cache`` (updated in place; StaticCache's empty slots are
  never attended) or a legacy ``(k, v)`` tuple of (B, Hkv, S_past, D); with ``use_cache`` a new
  tuple is returned when none was given.
* ``output_attentions=True`` computes the weights with eager math (B, H, q_len, kv_len).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..hardware.detect import HardwareInfo, detect_hardware
from ..hardware.profiles import TileProfile, select_profile, use_profile
from .transformers import _eager, attend

__all__ = [
    "DEFAULT_MROPE_SECTION",
    "FlashAttention2",
    "FlashAttention2TransformerLayer",
    "HardwareSpecificFlashAttention2",
    "MRoPE",
    "create_flash_attention_2",
]

log = logging.getLogger("qwen3vl_flash")
DEFAULT_MROPE_SECTION = (24, 20, 20)
DEFAULT_ROPE_THETA = 5e6


def _text_config(config):
    """Qwen3VLConfig -> its text_config; a Qwen3VLTextConfig (or any text config) as is."""
    return getattr(config, "text_config", None) or config


def _rope_settings(cfg) -> tuple[float, Sequence[int] | None]:
    params = getattr(cfg, "rope_parameters", None)  # 5.x
    if isinstance(params, dict) and params:
        return float(params.get("rope_theta", DEFAULT_ROPE_THETA)), params.get("mrope_section")
    scaling = getattr(cfg, "rope_scaling", None)  # 4.57
    theta = float(getattr(cfg, "rope_theta", None) or DEFAULT_ROPE_THETA)
    section = scaling.get("mrope_section") if isinstance(scaling, dict) else None
    return theta, section


class MRoPE(nn.Module):
    """Qwen3-VL's interleaved multimodal rotary embedding: cos/sin (B, S, head_dim) from
    (3, B, S) position ids. Frequency i takes its position from axis t, h or w in the interleaved
    pattern ``T H W T H W ... T T`` (h at i % 3 == 1 for i < 3*sec_h, w at i % 3 == 2 for
    i < 3*sec_w, t elsewhere), as transformers' ``Qwen3VLTextRotaryEmbedding`` does."""

    def __init__(self, head_dim: int, theta: float = DEFAULT_ROPE_THETA,
                 mrope_section: Sequence[int] | None = None):
        super().__init__()
        half = head_dim // 2
        if mrope_section is None:
            mrope_section = DEFAULT_MROPE_SECTION
            if sum(mrope_section) != half:  # a non-128 head_dim on a bare config: same proportions
                h = w = round(half * 20 / 64)
                mrope_section = (half - h - w, h, w)
        self.mrope_section = tuple(int(s) for s in mrope_section)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        axis = torch.zeros(half, dtype=torch.long)  # which of (t, h, w) drives frequency i
        for dim, offset in ((1, 1), (2, 2)):
            axis[offset: self.mrope_section[dim] * 3: 3] = dim
        self.register_buffer("axis", axis, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        # position_ids (3, B, S) -> freqs (3, B, S, half) in float32
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        idx = self.axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, idx).squeeze(0)  # (B, S, half)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class _RMSNorm(nn.Module):
    """Same math and parameter as transformers' Qwen3VLTextRMSNorm (variance in float32)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class _MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hidden_size, self.intermediate_size = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        act = getattr(cfg, "hidden_act", "silu")
        try:
            from transformers.activations import ACT2FN

            self.act_fn = ACT2FN[act]
        except ImportError:  # pragma: no cover - configs come from transformers
            self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D) against (B, H, S, D)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _cache_length(past_key_value, layer_idx: int) -> int:
    if past_key_value is None:
        return 0
    if isinstance(past_key_value, (tuple, list)):
        return past_key_value[0].shape[2] if len(past_key_value) else 0
    try:
        return int(past_key_value.get_seq_length(layer_idx))
    except Exception:
        return 0


def _mrope_positions(position_ids, B: int, S: int, start: int, device) -> torch.Tensor:
    if position_ids is None:
        pos = torch.arange(start, start + S, device=device)
        return pos.view(1, 1, S).expand(3, B, S)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() == 2:
        return position_ids.unsqueeze(0).expand(3, position_ids.shape[0], -1).expand(3, B, -1)
    if position_ids.shape[0] == 4:  # transformers 5.x: (text, t, h, w)
        position_ids = position_ids[1:]
    return position_ids.expand(3, B, -1)


def _mask_4d(attention_mask, B: int, S: int, kv_len: int, device):
    """Normalise the accepted mask forms to None or a 4D mask over ``kv_len`` keys."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2D (B, kv_len) or 4D (B, 1, q_len, kv_len), "
                         f"got shape {tuple(attention_mask.shape)}")
    pad = attention_mask.to(device=device).bool()
    if pad.shape[1] < kv_len:  # keys beyond the mask (e.g. empty StaticCache slots) are not valid
        pad = torch.cat([pad, pad.new_zeros(B, kv_len - pad.shape[1])], dim=1)
    pad = pad[:, :kv_len]
    if bool(pad.all()):
        return None
    # query i sits at key position kv_len - S + i; causal over positions, padding over keys
    j = torch.arange(kv_len, device=device)
    i = torch.arange(S, device=device).unsqueeze(1) + (kv_len - S)
    return ((j <= i).unsqueeze(0) & pad.unsqueeze(1)).unsqueeze(1)


class FlashAttention2(nn.Module):
    """Qwen3-VL text self-attention (causal, GQA, q/k RMSNorm, interleaved MRoPE) on our kernels.

    Args:
        config: ``Qwen3VLConfig`` (its ``text_config`` is used) or ``Qwen3VLTextConfig``.
        layer_idx: the layer's index in a cache.
        backend: kept for the seed's signature; backend choice follows ``qwen3vl_flash``'s
            ``auto`` (``$QWEN3VL_FLASH_BACKEND`` overrides it).
    """

    def __init__(self, config, layer_idx: int = 0, **kwargs):
        super().__init__()
        cfg = _text_config(config)
        self.config = cfg
        self.layer_idx = layer_idx
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_key_value_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = float(getattr(cfg, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        bias = bool(getattr(cfg, "attention_bias", False))
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.q_norm = _RMSNorm(self.head_dim, eps)
        self.k_norm = _RMSNorm(self.head_dim, eps)
        theta, section = _rope_settings(cfg)
        self.rotary_emb = MRoPE(self.head_dim, theta, section)

    def _attention_context(self):
        return contextlib.nullcontext()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value=None,
        output_attentions: bool = False,
        use_cache: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ):
        if past_key_value is None:
            past_key_value = kwargs.pop("past_key_values", None)
        B, S, _ = hidden_states.shape
        hidden_shape = (B, S, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, H, S, D)
        k = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        past_len = _cache_length(past_key_value, self.layer_idx)
        if position_embeddings is None:
            pos = _mrope_positions(position_ids, B, S, past_len, hidden_states.device)
            position_embeddings = self.rotary_emb(hidden_states, pos)
        cos, sin = position_embeddings
        q, k = _apply_rope(q, k, cos, sin)

        if past_key_value is not None and hasattr(past_key_value, "update"):
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            if cache_kwargs["cache_position"] is None:
                cache_kwargs["cache_position"] = torch.arange(past_len, past_len + S, device=q.device)
            k, v = past_key_value.update(k, v, self.layer_idx, cache_kwargs)
        elif past_key_value is not None:  # legacy (k, v) tuple
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
            past_key_value = (k, v) if use_cache else None
        elif use_cache:
            past_key_value = (k, v)
        kv_len = past_len + S  # a StaticCache returns its whole buffer: the rest is empty
        mask = _mask_4d(attention_mask, B, S, kv_len, q.device)
        if mask is None:
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]

        attn_weights = None
        if output_attentions or (self.training and self.attention_dropout > 0):
            out, attn_weights = _eager(q, k, v, mask, True, self.scaling, self.attention_dropout, self.training)
            if not output_attentions:
                attn_weights = None
        else:
            with self._attention_context():
                out = attend(q, k, v, mask, causal=True, scale=self.scaling)
        out = self.o_proj(out.reshape(B, S, -1))
        return out, attn_weights, past_key_value


class HardwareSpecificFlashAttention2(FlashAttention2):
    """:class:`FlashAttention2` pinned to one tile profile (detected once, or given).

    Args:
        profile: a profile name (``"sm61"``, ``"i5-10210u"``, ``"sm90"``, ...) or a
            :class:`TileProfile`; default: the profile of the detected hardware.
        hardware: a :class:`HardwareInfo` to pick the profile for (default: detected).

    ``self.profile`` / ``self.profile_name`` / ``self.tile_size`` say what was chosen; calls run
    with that profile (on a device of its type) whatever ``$QWEN3VL_FLASH_PROFILE`` says later.
    """

    def __init__(self, config, layer_idx: int = 0, profile: str | TileProfile | None = None,
                 hardware: HardwareInfo | None = None, **kwargs):
        super().__init__(config, layer_idx, **kwargs)
        if isinstance(profile, TileProfile):
            chosen = profile
            self.hardware = hardware
        elif profile is not None:
            chosen = select_profile(name=profile)
            self.hardware = hardware
        else:
            self.hardware = hardware if hardware is not None else detect_hardware()
            chosen = select_profile(self.hardware)
        self.profile = chosen
        log.info("qwen3vl_flash: %s layer %d pinned to profile %r (tile_size %d)",
                 type(self).__name__, layer_idx, chosen.name, chosen.tile_size)

    @property
    def profile_name(self) -> str:
        return self.profile.name

    @property
    def tile_size(self) -> int:
        return self.profile.tile_size

    def extra_repr(self) -> str:
        return f"profile={self.profile.name!r}, tile_size={self.profile.tile_size}"

    def _attention_context(self):
        # pinned per call through a context variable: thread-safe, and any TileProfile works
        return use_profile(self.profile)


class FlashAttention2TransformerLayer(nn.Module):
    """A Qwen3-VL text decoder layer (pre-norm attention + SwiGLU MLP) with our attention.

    Same parameters as transformers' ``Qwen3VLTextDecoderLayer``. ``hardware_specific=True`` (or a
    ``profile``) uses :class:`HardwareSpecificFlashAttention2`. ``forward`` takes the attention's
    arguments and returns ``(hidden_states, attn_weights, past_key_value)``."""

    def __init__(self, config, layer_idx: int = 0, hardware_specific: bool = False, **kwargs):
        super().__init__()
        cfg = _text_config(config)
        self.config = cfg
        self.hidden_size = cfg.hidden_size
        attn_cls = HardwareSpecificFlashAttention2 if hardware_specific or "profile" in kwargs else FlashAttention2
        self.self_attn = attn_cls(cfg, layer_idx, **kwargs)
        self.mlp = _MLP(cfg)
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.input_layernorm = _RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        h, attn_weights, past_key_value = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + h
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights, past_key_value


def create_flash_attention_2(config, layer_idx: int = 0, *, layer: bool = False,
                             hardware_specific: bool = False, **kwargs) -> nn.Module:
    """Factory: an attention module (default) or a whole decoder layer (``layer=True``);
    hardware-specific when ``hardware_specific=True`` or a ``profile``/``hardware`` is given."""
    hw = hardware_specific or "profile" in kwargs or "hardware" in kwargs
    if layer:
        return FlashAttention2TransformerLayer(config, layer_idx, hardware_specific=hw, **kwargs)
    if hw:
        return HardwareSpecificFlashAttention2(config, layer_idx, **kwargs)
    return FlashAttention2(config, layer_idx, **kwargs)
