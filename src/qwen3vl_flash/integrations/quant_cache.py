"""A quantized KV cache for ``generate``: K/V stored as int8 (or fp8 e4m3) codes plus one float32
scale per token and kv head, decoded through :func:`qwen3vl_flash.flash_attn_with_kvcache`'s
quantized path (the Triton split-KV kernel dequantises on load; elsewhere the portable path).

    import qwen3vl_flash as qf
    model = qf.enable(model)                     # bf16 / fp16 Qwen3-VL, our attention
    cache = qf.QuantizedStaticCache(model.config, max_cache_len=4096)          # quant="int8"
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

How it hooks in (transformers 4.57.6 and 5.x): a :class:`transformers.StaticCache` whose layers
are :class:`QuantizedStaticLayer`. ``update`` quantises the new rows (PyTorch ops, the shared
quantisers of :mod:`qwen3vl_flash.quant.quantize`) into preallocated (B, Hkv, max_cache_len, D)
code buffers and scale buffers (B, Hkv, max_cache_len), and returns the code buffers, which carry
their scales (a :class:`QuantizedKV` attribute) to our attention function. There
(:func:`attend_quantized`, called by :func:`qwen3vl_flash.integrations.transformers.attend` for
int8 / fp8 keys) the mask is read as for a StaticCache: each row's valid keys as one range
[start, end), one ``flash_attn_with_kvcache`` call with the scales, no copy of the cache. Calls
whose mask is not of that form (left-padded prefill queries, custom masks) attend over the
dequantised buffers with the float paths.

Not supported: ``torch.compile`` of the decode step (the cache says it is not compileable, so
``generate`` does not compile it), offloading, sliding-window layers (Qwen3-VL has none), and
attention implementations other than ours (the code buffers are not float tensors).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import ATTN_IMPLEMENTATION
from .._optional import require
from ..conventions import needs_grad
from ..interface import _bytes, _dequantize_kv, flash_attn_with_kvcache, quantize_kv

__all__ = ["QUANT_DTYPES", "QuantizedKV", "QuantizedStaticCache", "QuantizedStaticLayer", "attend_quantized"]

_cache_utils = require("transformers.cache_utils", "qf.QuantizedStaticCache")

QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_ATTR = "_qwen3vl_flash_quantized_kv"  # the QuantizedKV a layer's code buffers carry


class QuantizedKV(NamedTuple):
    """What a layer's code buffers carry to the attention call: their scales (B, Hkv, Smax)
    float32 and the backend its ``flash_attn_with_kvcache`` calls use."""

    k_scale: torch.Tensor
    v_scale: torch.Tensor
    backend: str


class QuantizedStaticLayer(_cache_utils.StaticLayer):
    """One decoder layer's cache: int8 / float8_e4m3fn codes (B, Hkv, max_cache_len, D) and float32
    scales (B, Hkv, max_cache_len), written in place (``x ~= codes * scale``, per token and head).

    Works with 4.57.6 (rows at ``cache_kwargs["cache_position"]``) and 5.x (rows after the
    layer's ``cumulative_length``), as the installed ``StaticLayer`` does."""

    is_compileable = False  # generate must not compile the step: the decode op takes float caches only

    def __init__(self, max_cache_len: int, dtype: torch.dtype = torch.int8, backend: str = "auto", **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        if dtype not in QUANT_DTYPES.values():
            raise ValueError(f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
        self.code_dtype = dtype
        self.backend = backend
        self.key_scale: Optional[torch.Tensor] = None
        self.value_scale: Optional[torch.Tensor] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: Optional[torch.Tensor] = None) -> None:
        """Allocate the buffers from the first states' shape, dtype and device (4.57.6 passes the
        keys only, 5.x keys and values)."""
        if key_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"QuantizedStaticCache stores the K/V of a float16/bfloat16 model; got {key_states.dtype} "
                            "states (load the model with dtype=torch.bfloat16)")
        B, Hkv, _, D = key_states.shape
        if value_states is not None and value_states.shape[-1] != D:
            raise ValueError(f"QuantizedStaticCache needs equal key and value head dims, got {D} and "
                             f"{value_states.shape[-1]}")
        dev = key_states.device
        self.device, self.dtype = dev, key_states.dtype
        # both versions' names: 5.x reads batch_size / k_head_dim / v_head_dim, 4.57.6 max_batch_size / head_dim
        self.batch_size = self.max_batch_size = B
        self.num_heads = Hkv
        self.head_dim = self.k_head_dim = self.v_head_dim = D
        self.keys = torch.zeros((B, Hkv, self.max_cache_len, D), dtype=self.code_dtype, device=dev)
        self.values = torch.zeros((B, Hkv, self.max_cache_len, D), dtype=self.code_dtype, device=dev)
        # zero = never written (a written row's scale is > 0): 4.57.6's get_seq_length counts those
        self.key_scale = torch.zeros((B, Hkv, self.max_cache_len), dtype=torch.float32, device=dev)
        self.value_scale = torch.zeros((B, Hkv, self.max_cache_len), dtype=torch.float32, device=dev)
        info = QuantizedKV(self.key_scale, self.value_scale, self.backend)
        setattr(self.keys, _ATTR, info)
        setattr(self.values, _ATTR, info)
        if hasattr(self, "cumulative_length"):  # 5.x
            self.cumulative_length = self.cumulative_length.to(dev)
        self.is_initialized = True

    def _positions(self, n: int, args, kwargs) -> torch.Tensor:
        if hasattr(self, "cumulative_length"):  # 5.x: the layer counts its own tokens
            pos = torch.arange(n, device=self.device) + self.cumulative_length
            self.cumulative_length.add_(n)
            return pos
        cache_kwargs = args[0] if args and isinstance(args[0], dict) else kwargs.get("cache_kwargs")
        pos = cache_kwargs.get("cache_position") if isinstance(cache_kwargs, dict) else None
        return torch.arange(n, device=self.device) if pos is None else pos.to(self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantise the new (B, Hkv, S, D) states into their rows (codes and scales, in place);
        returns the code buffers (they carry their scales to :func:`attend_quantized`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = self._positions(key_states.shape[-2], args, kwargs)
        with torch.no_grad():
            for codes, scales, x in ((self.keys, self.key_scale, key_states),
                                     (self.values, self.value_scale, value_states)):
                c, s = quantize_kv(x, self.code_dtype)  # (B, Hkv, S, D), (B, Hkv, S)
                _bytes(codes)[:, :, pos] = _bytes(c)  # (fp8 through its bytes: index_put of fp8 is not everywhere)
                scales[:, :, pos] = s
        return self.keys, self.values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        if hasattr(self, "cumulative_length"):  # 5.x
            return self.cumulative_length
        return (self.key_scale[0, 0] > 0).sum()  # 4.57.6: slots written (its StaticLayer reads the keys)

    def reset(self) -> None:
        if self.is_initialized:
            for t in (self.keys, self.values):
                t.view(torch.uint8).zero_()  # (fp8 tensors have no zero_ on every device)
            self.key_scale.zero_()
            self.value_scale.zero_()
        if hasattr(self, "cumulative_length"):
            self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows reordered in place (the buffers keep their identity and scales)."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for t in (self.keys, self.values, self.key_scale, self.value_scale):
            _bytes(t).copy_(_bytes(t).index_select(0, idx))


class QuantizedStaticCache(_cache_utils.StaticCache):
    """A ``StaticCache`` holding K/V as int8 (``quant="int8"``, default) or fp8 e4m3 (``"fp8"``)
    codes with float32 per-token, per-kv-head scales: half the bytes of a bf16 cache (plus 4 bytes
    per token and head), decoded by our quantized ``flash_attn_with_kvcache``.

    Args:
        config: the model's config (``model.config``); its text config gives the layer count.
        max_cache_len: tokens the cache holds (prompt + new tokens).
        quant: "int8" or "fp8".
        backend: the ``backend`` of the attention calls ("auto": the Triton split-KV kernel for
            decode steps where it runs, the portable path elsewhere).
        **kwargs: passed to ``StaticCache`` (e.g. the legacy ``max_batch_size``, ignored there).

    The model must run our attention (``qf.enable(model)`` or ``attn_implementation=
    qf.ATTN_IMPLEMENTATION``) in float16 or bfloat16. Raises ValueError for an unknown ``quant``,
    ``offloading=True``, sliding-window layers, or a config switched to another attention.
    """

    def __init__(self, config, max_cache_len: int, quant: str = "int8", backend: str = "auto", **kwargs):
        if quant not in QUANT_DTYPES:
            raise ValueError(f"quant must be one of {tuple(QUANT_DTYPES)}, got {quant!r}")
        if kwargs.get("offloading"):
            raise ValueError("QuantizedStaticCache does not support offloading=True")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        impl = getattr(text, "_attn_implementation", None)
        if isinstance(impl, str) and impl.split("|")[-1] != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"QuantizedStaticCache decodes through qwen3vl_flash's attention, but the config uses {impl!r}: "
                f"call qf.enable(model) (or load with attn_implementation=qf.ATTN_IMPLEMENTATION) first")
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        for i, layer in enumerate(self.layers):
            if getattr(layer, "is_sliding", False) or type(layer) is not _cache_utils.StaticLayer:
                raise ValueError(f"QuantizedStaticCache supports full-attention layers only; layer {i} is "
                                 f"{type(layer).__name__}")
        self.quant = quant
        self.layers = [QuantizedStaticLayer(layer.max_cache_len, QUANT_DTYPES[quant], backend)
                       for layer in self.layers]


def _quantized_kv(k: torch.Tensor, v: torch.Tensor) -> QuantizedKV:
    info = getattr(k, _ATTR, None)
    if info is None or getattr(v, _ATTR, None) is not info:
        raise ValueError(
            f"{k.dtype} keys reached qwen3vl_flash's attention without their scales: only the buffers of a "
            "qf.QuantizedStaticCache (passed to the model as past_key_values) can be attended as a quantized cache")
    return info


def attend_quantized(q, k, v, mask=None, causal: bool = True, scale: Optional[float] = None,
                     position_ids: Optional[torch.Tensor] = None, cp_group=None) -> torch.Tensor:
    """Attention over a :class:`QuantizedStaticLayer`'s buffers, for transformers-layout tensors.

    q (B, H, Sq, D) float16/bfloat16; k, v (B, Hkv, Smax, D) int8 / float8_e4m3fn code buffers
    carrying their :class:`QuantizedKV`; ``mask`` as :func:`~.transformers.attend`'s. Returns
    (B, Sq, H, D) contiguous. Dense or StaticCache-style masks (each row's valid keys one range,
    causal bottom-right, every query valid) are one quantized ``flash_attn_with_kvcache`` call
    reading the buffers in place; any other mask attends over the dequantised buffers with
    :func:`~.transformers.attend`'s exact paths (``qf.enable(model, quant=...)``'s quantised
    prefill does not apply to them: the cache's history is attended as stored). Raises for
    context parallelism and under torch.compile (not supported)."""
    from .transformers import _Plan, _plan_for, attend

    if cp_group is not None:
        raise ValueError("context parallelism (qf.enable(model, context_parallel=group)) does not take a KV "
                         "cache; qf.QuantizedStaticCache cannot be used with it")
    if torch.compiler.is_compiling():
        raise NotImplementedError("qf.QuantizedStaticCache does not support torch.compile of the decode step")
    info = _quantized_kv(k, v)
    Sq, D = q.shape[2], q.shape[3]
    Sk = k.shape[2]
    scale = float(scale) if scale is not None else D ** -0.5
    if mask is not None:
        plan = _plan_for(mask, causal, Sk)
    else:  # every key valid; Sq == Sk > 1 may be packed rows (position ids): attend() reads those
        plan = _Plan("dense") if Sq < Sk or Sq == 1 else _Plan("fallback")
    if plan.kind in ("dense", "kvcache") and not needs_grad(q):
        out = flash_attn_with_kvcache(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=plan.cache_seqlens,
            softmax_scale=scale, causal=causal, backend=info.backend, check_values=False,
            cache_leftpad=plan.cache_leftpad, k_scale=info.k_scale.transpose(1, 2),
            v_scale=info.v_scale.transpose(1, 2))
        return out.contiguous()
    kd = _dequantize_kv(k, info.k_scale, q.dtype)  # (B, Hkv, Smax, D)
    vd = _dequantize_kv(v, info.v_scale, q.dtype)
    return attend(q, kd, vd, mask, causal, scale, position_ids=position_ids)
