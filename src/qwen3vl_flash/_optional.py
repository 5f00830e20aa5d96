"""Lazy imports of optional dependencies, failing with an install hint."""

from __future__ import annotations

import importlib

_HINTS = {
    "triton": "pip install 'qwen3vl-flash[triton]'  (or: pip install triton)",
    "transformers": "pip install 'qwen3vl-flash[hf]'  (transformers>=4.57)",
    "matplotlib": "pip install 'qwen3vl-flash[bench]'",
    "tqdm": "pip install 'qwen3vl-flash[bench]'",
}


def require(module: str, feature: str):
    """Import ``module`` or raise ImportError saying which feature needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _HINTS.get(module.split(".")[0], f"pip install {module}")
        raise ImportError(f"{feature} needs the optional package {module!r}: {hint}") from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
