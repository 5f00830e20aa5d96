"""Tile profiles: per-hardware tile sizes and dispatch preferences, as plain data.

The seed names three starting points (``sm61``: 128, ``i5-10210u``: 64, other GPUs: 256). We
keep them, add ``sm80``/``sm90`` (Triton configs measured on H100, see docs/performance.md) and a
generic CPU profile (measured on the 2-core CI machine). Anything can be overridden:
``select_profile(name=...)``, ``QWEN3VL_FLASH_PROFILE=<name>``, or ``profile.replace(...)``.

Fields a backend reads:

* ``block_m`` / ``block_n``: the ``tiled`` backend's query-row and key tiles (query rows count
  the GQA group folded in, i.e. ``block_m`` rows of (query, head-in-group) pairs).
* ``triton``: data for the Triton kernels (block sizes, warps, stages per head_dim / arch).
* ``auto_order``: backends ``auto`` tries, first to last, per dtype ("default" otherwise;
  "varlen" for packed calls where given).
* ``tiled_min_seqlen``: below this key length ``auto`` skips ``tiled`` (launch overheads win).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .detect import HardwareInfo, detect_hardware

ENV_PROFILE = "QWEN3VL_FLASH_PROFILE"


@dataclass(frozen=True)
class TileProfile:
    name: str
    device_type: str  # "cpu" or "cuda"
    tile_size: int  # the seed's headline tile size for this hardware
    block_m: int
    block_n: int
    auto_order: Dict[str, Tuple[str, ...]]
    tiled_min_seqlen: int = 0
    triton: Dict[str, object] = field(default_factory=dict)
    description: str = ""

    def replace(self, **changes) -> "TileProfile":
        return dataclasses.replace(self, **changes)

    def order_for(self, dtype: torch.dtype, varlen: bool = False) -> Tuple[str, ...]:
        if varlen and "varlen" in self.auto_order:
            return self.auto_order["varlen"]
        key = str(dtype).replace("torch.", "")
        return self.auto_order.get(key, self.auto_order["default"])


# Hopper/Ampere, measured on H100 (docs/performance.md): for dense calls PyTorch's cuDNN kernel
# is still ahead of our Triton kernel (0.75-0.8x of it), so auto takes SDPA there; our kernels
# serve what SDPA cannot (lse, i.e. context parallelism) and varlen (one launch over all
# segments instead of SDPA's per-segment loop with a host sync); KV-cache decoding prefers the
# fused Triton split-KV path whatever the order (interface.flash_attn_with_kvcache).
_GPU_ORDER = {
    "default": ("sdpa", "triton", "tiled", "eager"),
    "varlen": ("triton", "sdpa", "tiled", "eager"),
}
# CPU: PyTorch's fused CPU flash kernel (which the sdpa backend calls with its lse) is faster
# than a Python-level FA2 loop in every dtype we measured (docs/performance.md); tiled is the
# fallback if it fails.
_CPU_ORDER = {"default": ("sdpa", "tiled", "eager")}

PROFILES: Dict[str, TileProfile] = {
    p.name: p
    for p in [
        TileProfile(
            name="sm61",
            device_type="cuda",
            tile_size=128,
            block_m=128,
            block_n=128,
            # Triton needs sm80+ for the kernels we ship; SDPA's memory-efficient kernel runs on Pascal.
            auto_order={"default": ("sdpa", "tiled", "eager")},
            description="NVIDIA Pascal (GTX 10-series, compute capability 6.x): SDPA efficient kernel, then tiled",
        ),
        TileProfile(
            name="sm80",
            device_type="cuda",
            tile_size=256,
            block_m=256,
            block_n=256,
            auto_order=_GPU_ORDER,
            triton={
                "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                "fwd_d256": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                "bwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                "bwd_d256": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
                "head_split": "split",
            },
            description="NVIDIA Ampere/Ada (sm80-sm89): Triton FA2 kernels",
        ),
        TileProfile(
            name="sm90",
            device_type="cuda",
            tile_size=256,
            block_m=256,
            block_n=256,
            auto_order=_GPU_ORDER,
            triton={
                # measured on H100 (docs/perf/gpu_kernels.md): causal hd128 S=4k sweep of 6 fwd / 6 bwd tiles
                "fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                # 2026-11-25 run 2 (benchmarks/exp_fwd_variants.py, TMA + FMA kernel): hd128 causal
                # 64x64 w4 s3 437 TF/s at 4k, 128x128 w8 s3 501 / 515 at 16k / 32k
                "long_from": 8192,
                "fwd_long_hd128": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                "fwd_d256": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                "bwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                "bwd_d256": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
                "head_split": "split",
            },
            description="NVIDIA Hopper (H100/H200, sm90): Triton FA2 kernels",
        ),
        TileProfile(
            name="generic-gpu",
            device_type="cuda",
            tile_size=256,
            block_m=256,
            block_n=256,
            auto_order=_GPU_ORDER,
            triton={"fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}},
            description="any other CUDA GPU: Triton where it compiles, else SDPA",
        ),
        TileProfile(
            name="i5-10210u",
            device_type="cpu",
            tile_size=64,
            # 4 cores, 256 KiB L2 per core, 6 MiB L3: a 64-query tile (x GQA group) against 256 keys
            # keeps the fp32 score tile (256 x 256 x 4 B = 256 KiB) near L2. Not measured on that CPU.
            block_m=256,
            block_n=256,
            auto_order=_CPU_ORDER,
            tiled_min_seqlen=256,
            description="Intel Core i5-10210U (4 cores, AVX2, 6 MiB L3): tiles sized for its caches",
        ),
        TileProfile(
            name="generic-cpu",
            device_type="cpu",
            tile_size=64,
            # swept on the 2-core CI machine (fp32/bf16, text-8B heads, S=2048): 256 x 256 or
            # 256 x 128 best; 1024 x 1024 is 2x slower (docs/performance.md)
            block_m=256,
            block_n=256,
            auto_order=_CPU_ORDER,
            tiled_min_seqlen=256,
            description="any CPU: tiles measured on the 2-core CI machine",
        ),
    ]
}


def _profile_for(hw: HardwareInfo) -> TileProfile:
    if hw.device_type == "cuda":
        cc = hw.compute_capability or (0, 0)
        if cc[0] == 6:
            return PROFILES["sm61"]
        if cc[0] == 8:
            return PROFILES["sm80"]
        if cc[0] == 9:
            return PROFILES["sm90"]
        return PROFILES["generic-gpu"]
    if "10210u" in hw.cpu_model.lower():
        return PROFILES["i5-10210u"]
    return PROFILES["generic-cpu"]


def select_profile(hw: Optional[HardwareInfo] = None, name: Optional[str] = None) -> TileProfile:
    """The tile profile for ``hw`` (default: detected). ``name`` or ``$QWEN3VL_FLASH_PROFILE``
    picks a named profile instead; an unknown name raises ValueError listing the known ones."""
    name = name or os.environ.get(ENV_PROFILE) or None
    if name is not None:
        try:
            return PROFILES[name]
        except KeyError:
            raise ValueError(f"profile {name!r} is unknown; expected one of {sorted(PROFILES)}") from None
    return _profile_for(hw if hw is not None else detect_hardware())


# (device type, index) -> profile. A plain dict, not lru_cache: torch.compile (dynamo) traces a
# dict lookup with guards, but cannot trace hardware detection (file reads) behind an lru_cache.
_DEVICE_PROFILES: Dict[Tuple[str, Optional[int]], TileProfile] = {}


_PINNED: contextvars.ContextVar = contextvars.ContextVar("qwen3vl_flash_profile", default=None)


@contextlib.contextmanager
def use_profile(profile):
    """Run the attention calls inside this block with ``profile`` (a TileProfile or a name) on
    devices of its type. Thread- and task-local (a context variable), unlike the env override."""
    if isinstance(profile, str):
        profile = select_profile(name=profile)
    if not isinstance(profile, TileProfile):
        raise TypeError(f"profile must be a TileProfile or a profile name, got {type(profile).__name__}")
    token = _PINNED.set(profile)
    try:
        yield profile
    finally:
        _PINNED.reset(token)


def profile_for_device(device: torch.device) -> TileProfile:
    """The profile for the device a call runs on: a pinned one (:func:`use_profile`), else the
    ``$QWEN3VL_FLASH_PROFILE`` override, else the detected hardware's (each only for matching devices)."""
    # torch.compile cannot trace ContextVar.get: compiled graphs use the env/detected profile
    pinned = None if torch.compiler.is_compiling() else _PINNED.get()
    if pinned is not None and pinned.device_type == device.type:
        return pinned
    env = os.environ.get(ENV_PROFILE)
    if env:
        prof = select_profile(name=env)
        if prof.device_type == device.type:
            return prof
    key = (device.type, device.index)
    prof = _DEVICE_PROFILES.get(key)
    if prof is None:
        prof = _DEVICE_PROFILES[key] = PROFILES[_detected_profile_name(device.type, device.index)]
    return prof


def _detected_profile_name(device_type: str, index: Optional[int]) -> str:
    """Run once per device, outside any compiled graph (a constant to torch.compile)."""
    device = torch.device(device_type) if index is None else torch.device(device_type, index)
    return _profile_for(detect_hardware(device)).name


# What torch.compiler.assume_constant_result does, without its `import torch._dynamo`: that import
# pulls in triton, which must not be imported before TRITON_INTERPRET is set (the interpreter
# then breaks: triton.language's own jit functions are built at import).
_detected_profile_name._dynamo_marked_constant = True
