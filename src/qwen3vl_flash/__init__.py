"""qwen3vl-flash: exact, memory-efficient FlashAttention-2 for the Qwen3-VL model family.

    import qwen3vl_flash as qf
    out = qf.flash_attn_func(q, k, v, causal=True)          # (B, S, H, D) in, (B, S, H, D) out
    model = qf.enable(model)                                # a loaded Qwen3-VL, text and vision

transformers-dependent names (``enable``, ``ATTN_IMPLEMENTATION``, the seed's module classes) are
imported on first use, so the kernels work without transformers installed.
"""

from .backends.base import _ensure_loaded, available_backends
from .hardware.detect import HardwareInfo, detect_hardware
from .hardware.profiles import PROFILES, TileProfile, select_profile
from .hardware.workspace import set_workspace_limit
from .interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .monitor import monitor  # the function shadows the submodule's attribute (use `from .monitor import ...`)

__version__ = "0.1.0"

_ensure_loaded()  # register every backend now: torch.compile cannot trace the lazy importlib path

ATTN_IMPLEMENTATION = "qwen3vl_flash"

_LAZY = {
    "enable": "integrations.transformers",
    "register": "integrations.transformers",
    "FlashAttention2": "integrations.qwen3_vl",
    "HardwareSpecificFlashAttention2": "integrations.qwen3_vl",
    "FlashAttention2TransformerLayer": "integrations.qwen3_vl",
    "create_flash_attention_2": "integrations.qwen3_vl",
    "PackingCollator": "integrations.packing",
    "QuantizedStaticCache": "integrations.quant_cache",
    "tune": "hardware.tuning",
}

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "monitor",
    "detect_hardware",
    "select_profile",
    "set_workspace_limit",
    "HardwareInfo",
    "TileProfile",
    "PROFILES",
    "available_backends",
    "ATTN_IMPLEMENTATION",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'qwen3vl_flash' has no attribute {name!r}")
