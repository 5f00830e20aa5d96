"""What the machine is: GPU properties from torch, CPU facts from /proc and /sys.

Detection never raises: every probe that fails leaves its field at a neutral default, so an
unknown machine still gets the generic profile.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class HardwareInfo:
    device_type: str = "cpu"  # "cpu" or "cuda"
    name: str = "unknown"  # GPU name, or the CPU model
    compute_capability: Optional[Tuple[int, int]] = None
    num_sms: int = 0
    shared_memory_per_block: int = 0  # bytes, opt-in maximum where torch reports it
    l2_cache_bytes: int = 0
    total_memory_bytes: int = 0
    cpu_model: str = "unknown"
    cpu_cores: int = 1
    cpu_cache_bytes: dict = field(default_factory=dict)  # {"L1d": .., "L2": .., "L3": ..}
    cpu_flags: frozenset = frozenset()

    @property
    def has_avx2(self) -> bool:
        return "avx2" in self.cpu_flags

    @property
    def has_avx512(self) -> bool:
        return "avx512f" in self.cpu_flags

    @property
    def has_amx(self) -> bool:
        return "amx_tile" in self.cpu_flags or "amx_bf16" in self.cpu_flags

    def summary(self) -> str:
        if self.device_type == "cuda":
            cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
            return (
                f"{self.name} (sm{cc.replace('.', '')}, {self.num_sms} SMs, "
                f"{self.shared_memory_per_block // 1024} KiB smem/block, {self.l2_cache_bytes >> 20} MiB L2)"
            )
        isa = [n for n, ok in (("AVX2", self.has_avx2), ("AVX-512", self.has_avx512), ("AMX", self.has_amx)) if ok]
        caches = ", ".join(f"{k} {v >> 10} KiB" for k, v in sorted(self.cpu_cache_bytes.items()))
        return f"{self.cpu_model} ({self.cpu_cores} cores; {caches or 'caches unknown'}; {'/'.join(isa) or 'no AVX2'})"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in mult:
            return int(float(text[:-1]) * mult[text[-1]])
        return int(text) if text else 0
    except ValueError:
        return 0


def _cpu_facts():
    model, flags = platform.processor() or "unknown", frozenset()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", "", platform.processor()):
            model = val.strip()
        elif key == "flags" and not flags:
            flags = frozenset(val.split())
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        entries = []
    for entry in entries:
        if not entry.startswith("index"):
            continue
        level = _read(f"{base}/{entry}/level").strip()
        kind = _read(f"{base}/{entry}/type").strip()
        size = _parse_size(_read(f"{base}/{entry}/size"))
        if not level or not size or kind == "Instruction":
            continue
        caches[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return model, cores, caches, flags


@functools.lru_cache(maxsize=None)
def _detect(device_type: str, index: int) -> HardwareInfo:
    model, cores, caches, flags = _cpu_facts()
    common = dict(cpu_model=model, cpu_cores=cores, cpu_cache_bytes=caches, cpu_flags=flags)
    if device_type == "cuda":
        try:
            props = torch.cuda.get_device_properties(index)
            return HardwareInfo(
                device_type="cuda",
                name=props.name,
                compute_capability=(props.major, props.minor),
                num_sms=props.multi_processor_count,
                shared_memory_per_block=int(getattr(props, "shared_memory_per_block_optin", 0) or 0),
                l2_cache_bytes=int(getattr(props, "L2_cache_size", 0) or 0),
                total_memory_bytes=int(props.total_memory),
                **common,
            )
        except Exception:  # no driver, bad index: fall back to describing the CPU
            pass
    return HardwareInfo(device_type="cpu", name=model, **common)


def detect_hardware(device=None) -> HardwareInfo:
    """Describe ``device`` (default: the current CUDA device if any, else the CPU). Never raises."""
    if device is None:
        try:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        except Exception:
            device = "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        return _detect("cuda", index)
    return _detect("cpu", 0)
