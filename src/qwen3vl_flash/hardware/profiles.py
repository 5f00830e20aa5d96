"""Tile profiles: per-hardware tile sizes and dispatch preferences, as plain data.

The seed names three starting points (``sm61``: 128, ``i5-10210u``: 64, other GPUs: 256). We
keep them, add ``sm80``/``sm90`` (Triton configs measured on H100, see docs/performance.md) and a
generic CPU profile (measured on the 2-core CI machine). Anything can be overridden:
``select_profile(name=...)``, ``QWEN3VL_FLASH_PROFILE=<name>``, or ``profile.replace(...)``.

Fields a backend reads:

* ``block_m`` / ``block_n``: the ``tiled`` backend's query-row and key tiles (query rows count
  the GQA group folded in, i.e. ``block_m`` rows of (query, head-in-group) pairs).
* ``triton``: the Triton kernels' tiles, a :class:`TritonTiles` (typed: a misspelt field raises
  at construction, with its name); one lookup, :meth:`TritonTiles.lookup`.
* ``auto_order``: backends ``auto`` tries, first to last, per dtype ("default" otherwise;
  "varlen" for packed calls where given); :meth:`TileProfile.order_for` applies it.
* ``tiled_min_seqlen``: below this key length ``auto`` tries ``tiled`` after the others (but
  before ``eager``): launch overheads win there.
* ``cp_order``: the kernels context parallelism's ``auto`` tries for each block, first to last.

Overrides are typed too: ``profile.replace(triton=profile.triton.replace(fwd=KernelTile(64, 64, 4, 3)))``,
or for the decode tiles ``profile.triton.replace(decode=profile.triton.decode.replace(waves=3))``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..conventions import MAX_HEAD_DIM
from .detect import HardwareInfo, detect_hardware
from . import tuning as _tuning  # tuning reads this module only inside its functions
from .tuning import ENV_CACHE_DIR, ENV_TUNED

ENV_PROFILE = "QWEN3VL_FLASH_PROFILE"


# --------------------------------------------------------------------------------------------
# the Triton tiles' schema
# --------------------------------------------------------------------------------------------


def _is_pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _require(ok: bool, where: str, what: str, value) -> None:
    """Malformed tile data raises TypeError naming its place (as a misspelt field does)."""
    if not ok:
        raise TypeError(f"{where}: expected {what}, got {value!r}")


def _check_padded_dim(where: str, dim) -> None:
    _require(_is_pow2(dim) and 16 <= dim <= MAX_HEAD_DIM, where,
             f"a padded head dim (a power of two 16..{MAX_HEAD_DIM})", dim)


@dataclass(frozen=True)
class KernelTile:
    """One Triton launch's tiles: ``block_m`` query rows x ``block_n`` keys per program, with
    ``num_warps`` warps and ``num_stages`` software-pipeline stages (the kernels' BLOCK_M,
    BLOCK_N, num_warps, num_stages)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps"):
            _require(_is_pow2(getattr(self, name)), f"KernelTile.{name}", "a power of two", getattr(self, name))
        _require(isinstance(self.num_stages, int) and self.num_stages >= 1, "KernelTile.num_stages",
                 "an int >= 1", self.num_stages)

    def as_list(self) -> List[int]:
        """[BLOCK_M, BLOCK_N, num_warps, num_stages]: what the registered ops take."""
        return [self.block_m, self.block_n, self.num_warps, self.num_stages]

    def as_config(self) -> Dict[str, int]:
        """{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}: what the launchers take."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    def replace(self, **changes) -> KernelTile:
        return dataclasses.replace(self, **changes)


def _check_tiles_by_dim(where: str, tiles, exact: bool) -> None:
    """``tiles`` maps head dims to KernelTiles: exact head dims (``exact``) or padded ones."""
    _require(isinstance(tiles, Mapping), where, "a mapping head_dim -> KernelTile", tiles)
    for dim, tile in tiles.items():
        if exact:
            _require(isinstance(dim, int) and 1 <= dim <= MAX_HEAD_DIM, f"{where} key",
                     f"a head dim 1..{MAX_HEAD_DIM}", dim)
        else:
            _check_padded_dim(f"{where} key", dim)
        _require(isinstance(tile, KernelTile), f"{where}[{dim}]", "a KernelTile", tile)


@dataclass(frozen=True)
class DecodeTiles:
    """The split-KV decode kernels' data (:mod:`qwen3vl_flash.backends.triton_decode`)."""

    # programs aimed at per SM: two resident CTAs (96 KiB of smem each at BLOCK_N=64, 3 stages,
    # hd128) keep ~64 KiB of K/V loads in flight per SM, above the ~25 KiB that 3 TB/s x ~1 us needs
    waves: int = 2
    # a split streams at least this many keys ...
    min_chunk: int = 256
    # ... and at least this many per packed query row, so that the fp32 partials (written and
    # read once: 8 bytes x D per row) stay under ~6% of the K/V bytes (4 bytes x D per key, bf16)
    min_chunk_per_row: int = 32
    max_splits: int = 64
    # head_dim (padded to a power of two) -> keys per tile; block_n_other for a head dim not listed
    block_n: Mapping[int, int] = field(default_factory=lambda: {16: 64, 32: 64, 64: 64, 128: 64, 256: 32})
    block_n_other: int = 32
    # keys per tile (and per split) of an int8 / fp8 cache, times block_n: 2 keeps a bf16 tile's
    # bytes in flight, but measured slower on an H200 (2026-12-01, exp_quant_decode: fp8 B=8 32k
    # 284 -> 433 us, int8 295 -> 306 us), so 1
    quant_keys_factor: int = 1
    num_warps: int = 4
    num_stages: int = 3
    merge_num_warps: int = 4
    # merge inside the split kernel (the last split of a (row, kv head) does it, counted by an
    # atomic) for up to this many packed query rows: one launch instead of two, so less host time,
    # but on H100 it cost 3-7 us more device time at B=1 4k/32k than the separate merge kernel
    # (docs/perf/decode.md), so it is off by default; set 16 to use it
    fuse_merge_max_rows: int = 0

    def __post_init__(self):
        for name in ("waves", "min_chunk", "min_chunk_per_row", "max_splits", "num_stages", "quant_keys_factor"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"DecodeTiles.{name}", "an int >= 1", value)
        for name in ("block_n_other", "num_warps", "merge_num_warps"):
            _require(_is_pow2(getattr(self, name)), f"DecodeTiles.{name}", "a power of two", getattr(self, name))
        _require(isinstance(self.fuse_merge_max_rows, int) and self.fuse_merge_max_rows >= 0,
                 "DecodeTiles.fuse_merge_max_rows", "an int >= 0", self.fuse_merge_max_rows)
        _require(isinstance(self.block_n, Mapping), "DecodeTiles.block_n", "a mapping head_dim -> keys per tile",
                 self.block_n)
        for dim, keys in self.block_n.items():
            _check_padded_dim("DecodeTiles.block_n key", dim)
            _require(_is_pow2(keys), f"DecodeTiles.block_n[{dim}]", "a power of two", keys)

    def keys_per_tile(self, block_d: int) -> int:
        """BLOCK_N of the split kernel for ``block_d`` (head_dim padded to a power of two)."""
        return int(self.block_n.get(block_d, self.block_n_other))

    def replace(self, **changes) -> DecodeTiles:
        return dataclasses.replace(self, **changes)


# Pruned autotune lists: a call whose profile has no tile for it times these once per shape
# class on GPU (backends.triton_common.autotune) and keeps the fastest; ties go to the first.
AUTOTUNE_FWD: Tuple[KernelTile, ...] = (
    KernelTile(128, 64, num_warps=4, num_stages=3),
    KernelTile(128, 128, num_warps=8, num_stages=3),
    KernelTile(64, 64, num_warps=4, num_stages=2),
    KernelTile(128, 64, num_warps=8, num_stages=2),
)
AUTOTUNE_BWD: Tuple[KernelTile, ...] = (
    KernelTile(64, 64, num_warps=4, num_stages=2),
    KernelTile(64, 128, num_warps=8, num_stages=2),
    KernelTile(128, 64, num_warps=8, num_stages=2),
    KernelTile(32, 64, num_warps=4, num_stages=3),
)
# Under the CPU interpreter nothing is timed: small tiles keep the (slow) interpreted tests short.
INTERPRET_TILE = KernelTile(32, 32, num_warps=4, num_stages=1)

_KINDS = ("fwd", "bwd", "bwd_dq")


@dataclass(frozen=True)
class TritonTiles:
    """The Triton kernels' tiles for one profile. A kernel without a tile for a call autotunes
    over ``autotune_fwd`` / ``autotune_bwd`` on GPU (cached per shape class), or takes
    ``interpret`` under the CPU interpreter. Resolved by :meth:`lookup` only."""

    # the forward's tile, and per padded head dim (power of two 16..256: 72 -> 128, 200 -> 256)
    fwd: Optional[KernelTile] = None
    fwd_by_dim: Mapping[int, KernelTile] = field(default_factory=dict)
    # from this sequence length on (max of Sq, Sk), fwd_long_by_dim's tile for that exact head dim
    fwd_long_from: Optional[int] = None
    fwd_long_by_dim: Mapping[int, KernelTile] = field(default_factory=dict)
    # the backward's dK/dV tile (and the dQ kernel's, unless bwd_dq_by_dim has one), per padded head dim
    bwd: Optional[KernelTile] = None
    bwd_by_dim: Mapping[int, KernelTile] = field(default_factory=dict)
    bwd_dq_by_dim: Mapping[int, KernelTile] = field(default_factory=dict)
    # head dims that are no power of two: "split" (72 = 64 + 16, two dots) or "pad" (to 128)
    head_split: str = "split"
    decode: DecodeTiles = field(default_factory=DecodeTiles)
    autotune_fwd: Tuple[KernelTile, ...] = AUTOTUNE_FWD
    autotune_bwd: Tuple[KernelTile, ...] = AUTOTUNE_BWD
    interpret: KernelTile = INTERPRET_TILE
    # the backward's preprocess kernel (delta = rowsum(dO * O)): query rows per program
    preprocess_block_m: int = 64
    # forward query blocks last-first: measured on H100 (S=16k causal), natural order 469 vs
    # reversed 447 TF/s, so off (the dQ kernel reverses under a right-bounded mask, a rule)
    reverse_m: bool = False

    def __post_init__(self):
        for name in ("fwd", "bwd"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, KernelTile), f"TritonTiles.{name}", "a KernelTile or None",
                     value)
        for name in ("fwd_by_dim", "bwd_by_dim", "bwd_dq_by_dim"):
            _check_tiles_by_dim(f"TritonTiles.{name}", getattr(self, name), exact=False)
        _check_tiles_by_dim("TritonTiles.fwd_long_by_dim", self.fwd_long_by_dim, exact=True)
        _require(self.fwd_long_from is None or (isinstance(self.fwd_long_from, int) and self.fwd_long_from > 0),
                 "TritonTiles.fwd_long_from", "None or an int > 0", self.fwd_long_from)
        _require(not self.fwd_long_by_dim or self.fwd_long_from is not None, "TritonTiles.fwd_long_from",
                 "a length when fwd_long_by_dim is given", self.fwd_long_from)
        _require(self.head_split in ("split", "pad"), "TritonTiles.head_split", "'split' or 'pad'", self.head_split)
        _require(isinstance(self.decode, DecodeTiles), "TritonTiles.decode", "a DecodeTiles", self.decode)
        for name in ("autotune_fwd", "autotune_bwd"):
            value = getattr(self, name)
            _require(isinstance(value, (tuple, list)) and len(value) > 0
                     and all(isinstance(t, KernelTile) for t in value),
                     f"TritonTiles.{name}", "a non-empty sequence of KernelTile", value)
            object.__setattr__(self, name, tuple(value))
        _require(isinstance(self.interpret, KernelTile), "TritonTiles.interpret", "a KernelTile", self.interpret)
        _require(_is_pow2(self.preprocess_block_m), "TritonTiles.preprocess_block_m", "a power of two",
                 self.preprocess_block_m)
        _require(isinstance(self.reverse_m, bool), "TritonTiles.reverse_m", "a bool", self.reverse_m)

    def lookup(self, kind: str, head_dim: int, seqlen: int = 0) -> Optional[KernelTile]:
        """The tile of kernel ``kind`` for a call, or None (= autotune / the interpreter's tile).

        ``fwd``: ``fwd_long_by_dim[head_dim]`` when ``seqlen >= fwd_long_from``, else
        ``fwd_by_dim[padded head_dim]``, else ``fwd``. ``bwd`` (the dK/dV kernel; ``seqlen`` unused):
        ``bwd_by_dim[padded]``, else ``bwd``. ``bwd_dq`` (the dQ kernel's own tile): ``bwd_dq_by_dim
        [padded]``, only where ``bwd`` gives a tile (else both kernels autotune)."""
        padded = 1 << max(4, (head_dim - 1).bit_length())
        if kind == "fwd":
            tile = None
            if self.fwd_long_from is not None and seqlen >= self.fwd_long_from:
                tile = self.fwd_long_by_dim.get(head_dim)
            return tile or self.fwd_by_dim.get(padded) or self.fwd
        if kind == "bwd":
            return self.bwd_by_dim.get(padded) or self.bwd
        if kind == "bwd_dq":
            return self.bwd_dq_by_dim.get(padded) if self.lookup("bwd", head_dim) is not None else None
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")

    def replace(self, **changes) -> TritonTiles:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------

# context parallelism's kernel per block (parallel.api.choose_kernel), first to last: on CUDA
# cuDNN's fused kernels with lse (the fastest forward+backward we measured on H100), then our
# Triton kernels, then tiled; on CPU tiled (triton takes CUDA tensors there)
_GPU_CP_ORDER = ("cudnn", "triton", "tiled")
_CPU_CP_ORDER = ("tiled",)


@dataclass(frozen=True)
class TileProfile:
    name: str
    device_type: str  # "cpu" or "cuda"
    tile_size: int  # the seed's headline tile size for this hardware
    block_m: int
    block_n: int
    auto_order: Dict[str, Tuple[str, ...]]
    tiled_min_seqlen: int = 0
    triton: TritonTiles = field(default_factory=TritonTiles)
    description: str = ""
    cp_order: Optional[Tuple[str, ...]] = None  # None: by device_type (_GPU_CP_ORDER / _CPU_CP_ORDER)
    # From a tuned profile (hardware/tuning.py), empty in the shipped ones. mode_orders: per mode
    # ("fwd", "fwd+bwd"), then dtype name, the measured backend order of that mode (auto_order
    # holds the order over both modes); tiled_blocks: per dtype name, tiled's (block_m, block_n)
    # (block_m / block_n otherwise). order_for and the tiled backend do not read them yet; until
    # they do, auto_order and block_m / block_n (chosen over both modes / all dtypes) apply.
    mode_orders: Dict[str, Dict[str, Tuple[str, ...]]] = field(default_factory=dict)
    tiled_blocks: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    # CPU profiles: whether this CPU's bf16/fp16 matmul is slow ("slow": tiled, computing in fp32,
    # goes first for 16-bit calls), "fast", or "measure" (cpu_probe times it once per process);
    # $QWEN3VL_FLASH_CPU_LOWP overrides it
    cpu_lowp_matmul: str = "measure"

    def __post_init__(self):
        if not isinstance(self.triton, TritonTiles):
            raise TypeError(
                f"TileProfile.triton: expected a TritonTiles, got {type(self.triton).__name__} "
                "(e.g. profile.replace(triton=profile.triton.replace(fwd=KernelTile(64, 64, 4, 3))))"
            )
        if self.cp_order is None:
            object.__setattr__(self, "cp_order", _GPU_CP_ORDER if self.device_type == "cuda" else _CPU_CP_ORDER)
        object.__setattr__(self, "cp_order", tuple(self.cp_order))
        for mode, orders in self.mode_orders.items():
            if mode not in ("fwd", "fwd+bwd") or not isinstance(orders, Mapping):
                raise TypeError(f"TileProfile.mode_orders: expected {{'fwd' | 'fwd+bwd': {{dtype: order}}}}, "
                                f"got key {mode!r} -> {orders!r}")
        for dtype, blocks in self.tiled_blocks.items():
            if not (isinstance(blocks, tuple) and len(blocks) == 2
                    and all(isinstance(b, int) and b > 0 for b in blocks)):
                raise TypeError(f"TileProfile.tiled_blocks[{dtype!r}]: expected (block_m, block_n), got {blocks!r}")

    def replace(self, **changes) -> TileProfile:
        return dataclasses.replace(self, **changes)

    def order_for(self, dtype: torch.dtype, varlen: bool = False, seqlen_k: Optional[int] = None,
                  need_grad: Optional[bool] = None) -> Tuple[str, ...]:
        """Backends ``auto`` tries, first to last: a tuned profile's order for the call's mode
        (``mode_orders["fwd+bwd" if need_grad else "fwd"]``, when ``need_grad`` is given and the
        mode was tuned for the dtype), else ``auto_order``'s for the dtype ("varlen" for a
        packed call where given, else "default"). A 16-bit call on a CPU whose 16-bit matmul is
        slow (``cpu_lowp_matmul``, ``$QWEN3VL_FLASH_CPU_LOWP``, else measured once per process:
        :mod:`~qwen3vl_flash.hardware.cpu_probe`) puts ``tiled`` first, which then computes in
        float32 while SDPA's CPU kernels run 16-bit matmuls (unless ``auto_order`` has an order
        of the dtype's own, e.g. a tuned one). With ``seqlen_k`` below ``tiled_min_seqlen``,
        ``tiled`` moves behind the others (but before a last ``eager``). Raises ValueError for a
        ``cpu_lowp_matmul`` other than "measure", "fast", "slow"."""
        name = str(dtype).replace("torch.", "")
        tuned = None
        if need_grad is not None and not varlen:
            tuned = self.mode_orders.get("fwd+bwd" if need_grad else "fwd", {}).get(name)
        if tuned:
            order = tuned
        elif varlen and "varlen" in self.auto_order:
            order = self.auto_order["varlen"]
        else:
            order = self.auto_order.get(name, self.auto_order["default"])
        if (self.device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and name not in self.auto_order
                and not tuned and "tiled" in order and order[0] != "tiled"):
            from . import cpu_probe

            if cpu_probe.lowp_matmul_is_slow(dtype, self.cpu_lowp_matmul):
                order = ("tiled",) + tuple(n for n in order if n != "tiled")
        if seqlen_k is None or seqlen_k >= self.tiled_min_seqlen or "tiled" not in order:
            return tuple(order)
        rest = list(order)
        rest.remove("tiled")
        rest.insert(len(rest) - 1 if rest and rest[-1] == "eager" else len(rest), "tiled")
        return tuple(rest)


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
            triton=TritonTiles(
                fwd=KernelTile(128, 64, num_warps=4, num_stages=3),
                fwd_by_dim={256: KernelTile(64, 32, num_warps=4, num_stages=2)},
                bwd=KernelTile(64, 64, num_warps=4, num_stages=2),
                bwd_by_dim={256: KernelTile(32, 32, num_warps=4, num_stages=1)},
                head_split="split",
            ),
            description="NVIDIA Ampere/Ada (sm80-sm89): Triton FA2 kernels",
        ),
        TileProfile(
            name="sm90",
            device_type="cuda",
            tile_size=256,
            block_m=256,
            block_n=256,
            auto_order=_GPU_ORDER,
            triton=TritonTiles(
                # measured on H100 (docs/perf/gpu_kernels.md): causal hd128 S=4k sweep of 6 fwd / 6 bwd tiles
                fwd=KernelTile(64, 64, num_warps=4, num_stages=3),
                # 2026-11-25 run 2 (benchmarks/experiments/exp_fwd_variants.py, TMA + FMA kernel): hd128 causal
                # 64x64 w4 s3 437 TF/s at 4k, 128x128 w8 s3 501 / 515 at 16k / 32k
                fwd_long_from=8192,
                fwd_long_by_dim={128: KernelTile(128, 128, num_warps=8, num_stages=3)},
                fwd_by_dim={256: KernelTile(64, 64, num_warps=4, num_stages=2)},
                bwd=KernelTile(64, 64, num_warps=4, num_stages=2),
                bwd_by_dim={256: KernelTile(32, 64, num_warps=4, num_stages=1)},
                head_split="split",
            ),
            description="NVIDIA Hopper (H100/H200, sm90): Triton FA2 kernels",
        ),
        TileProfile(
            name="generic-gpu",
            device_type="cuda",
            tile_size=256,
            block_m=256,
            block_n=256,
            auto_order=_GPU_ORDER,
            triton=TritonTiles(fwd=KernelTile(64, 64, num_warps=4, num_stages=2)),
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


def select_profile(hw: Optional[HardwareInfo] = None, name: Optional[str] = None,
                   tuned: bool = True) -> TileProfile:
    """The tile profile for ``hw`` (default: detected). ``name`` or ``$QWEN3VL_FLASH_PROFILE``
    picks a named profile instead; an unknown name raises ValueError listing the known ones.
    Otherwise, with ``tuned``, the tuned profile measured on this hardware (``qwen3vl-flash tune``,
    :mod:`~qwen3vl_flash.hardware.tuning`) where one applies and ``$QWEN3VL_FLASH_TUNED`` is not 0,
    named ``<shipped name>+tuned``; else the shipped profile for ``hw``."""
    name = name or os.environ.get(ENV_PROFILE) or None
    if name is not None:
        try:
            return PROFILES[name]
        except KeyError:
            raise ValueError(f"profile {name!r} is unknown; expected one of {sorted(PROFILES)}") from None
    return _hardware_profile(hw if hw is not None else detect_hardware(), tuned)


def _hardware_profile(hw: HardwareInfo, tuned: bool = True) -> TileProfile:
    """The shipped profile for ``hw``, or its tuned version where one applies (read once per process)."""
    base = _profile_for(hw)
    if not tuned:
        return base
    return _tuning.tuned_profile_for(hw, base) or base


def reset_profile_cache() -> None:
    """Forget the profiles resolved per device and the tuned profiles read, so the next call
    detects and reads again (:func:`~qwen3vl_flash.hardware.tuning.tune` calls this after writing)."""
    _DEVICE_PROFILES.clear()
    _tuning.reset_cache()


# (device type, index, $QWEN3VL_FLASH_TUNED, $QWEN3VL_FLASH_CACHE_DIR) -> profile. A plain dict,
# not lru_cache: torch.compile (dynamo) traces a dict lookup with guards, but cannot trace
# hardware detection (file reads) behind an lru_cache. The env values are part of the key so
# that setting them (tests, a notebook) takes effect without a reset.
_DEVICE_PROFILES: Dict[tuple, TileProfile] = {}
# tuned profiles by the name _detected_profile_name gives them (a str: a constant to dynamo)
_TUNED_BY_KEY: Dict[str, TileProfile] = {}


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
    key = (device.type, device.index, os.environ.get(ENV_TUNED), os.environ.get(ENV_CACHE_DIR))
    prof = _DEVICE_PROFILES.get(key)
    if prof is None:
        name = _detected_profile_name(device.type, device.index)
        prof = _DEVICE_PROFILES[key] = PROFILES[name] if name in PROFILES else _TUNED_BY_KEY[name]
    return prof


def _detected_profile_name(device_type: str, index: Optional[int]) -> str:
    """Run once per device, outside any compiled graph (a constant to torch.compile): the shipped
    profile's name, or the key of the tuned profile in ``_TUNED_BY_KEY``."""
    device = torch.device(device_type) if index is None else torch.device(device_type, index)
    prof = _hardware_profile(detect_hardware(device))
    if prof.name in PROFILES and PROFILES[prof.name] is prof:
        return prof.name
    key = f"{prof.name}@{id(prof)}"  # unique while the profile lives (kept alive by the dict)
    _TUNED_BY_KEY[key] = prof
    return key


# What torch.compiler.assume_constant_result does, without its `import torch._dynamo`: that import
# pulls in triton, which must not be imported before TRITON_INTERPRET is set (the interpreter
# then breaks: triton.language's own jit functions are built at import).
_detected_profile_name._dynamo_marked_constant = True
