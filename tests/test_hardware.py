"""Hardware detection never crashes; profiles are chosen from (mocked) hardware and overridable;
``auto`` on a simulated GTX 1080 (sm61) picks SDPA, never Triton."""

from __future__ import annotations

import builtins
from types import SimpleNamespace

import pytest
import torch

import qwen3vl_flash as qf
from qwen3vl_flash.backends.base import AttnRequest, get_backend
from qwen3vl_flash.hardware import detect as detect_mod
from qwen3vl_flash.hardware import profiles as profiles_mod
from qwen3vl_flash.hardware.detect import HardwareInfo, detect_hardware
from qwen3vl_flash.hardware.profiles import PROFILES, select_profile
from qwen3vl_flash.interface import choose_backend

I5_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 142
model name\t: Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2

processor\t: 1
model name\t: Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz
flags\t\t: fpu sse sse2 avx avx2
"""

GTX1080 = SimpleNamespace(
    name="NVIDIA GeForce GTX 1080", major=6, minor=1, multi_processor_count=20,
    total_memory=8 * 2**30, shared_memory_per_block_optin=48 * 1024, L2_cache_size=2 * 2**20,
)
H100 = SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, shared_memory_per_block_optin=227 * 1024, L2_cache_size=50 * 2**20,
)


@pytest.fixture(autouse=True)
def _fresh_detection(monkeypatch):
    """Detection is cached per device; every test starts and ends with an empty cache, and no
    profile/backend override from the environment."""
    monkeypatch.delenv("QWEN3VL_FLASH_PROFILE", raising=False)
    monkeypatch.delenv("QWEN3VL_FLASH_BACKEND", raising=False)
    detect_mod._detect.cache_clear()
    yield
    detect_mod._detect.cache_clear()


def _fake_read(cpuinfo: str):
    orig = detect_mod._read

    def read(path):
        return cpuinfo if path == "/proc/cpuinfo" else orig(path)

    return read


def _fake_gpu(monkeypatch, props):
    def get_props(index=None):
        if isinstance(props, Exception):
            raise props
        return props

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_props)


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


def test_detect_this_machine():
    hw = detect_hardware()
    assert isinstance(hw, HardwareInfo)
    assert hw.cpu_cores >= 1 and isinstance(hw.cpu_model, str) and hw.summary()
    assert detect_hardware("cpu").device_type == "cpu"


def test_detect_i5_10210u_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(detect_mod, "_read", _fake_read(I5_CPUINFO))
    hw = detect_hardware("cpu")
    assert hw.cpu_model == "Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz"
    assert hw.has_avx2 and not hw.has_avx512 and not hw.has_amx
    assert "AVX2" in hw.summary()
    assert select_profile(hw).name == "i5-10210u"


def test_detect_cpu_with_unreadable_proc_and_sys(monkeypatch):
    real_open = builtins.open

    def deny(path, *a, **kw):
        if str(path).startswith(("/proc", "/sys")):
            raise PermissionError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    monkeypatch.setattr(detect_mod.os, "listdir", lambda p: (_ for _ in ()).throw(OSError(p)))
    hw = detect_hardware("cpu")
    assert hw.device_type == "cpu" and hw.cpu_cores >= 1 and hw.cpu_cache_bytes == {}
    assert not hw.has_avx2
    assert select_profile(hw).name == "generic-cpu"
    hw.summary()


def test_detect_cpu_with_garbage_cache_files(monkeypatch):
    orig = detect_mod._read

    def read(path):
        if path.startswith("/sys/devices/system/cpu/cpu0/cache"):
            return "lots of cache K" if path.endswith("size") else "??"
        return orig(path)

    monkeypatch.setattr(detect_mod, "_read", read)
    monkeypatch.setattr(detect_mod.os, "listdir", lambda p: ["index0", "index1", "power", "uevent"])
    hw = detect_hardware("cpu")
    assert hw.cpu_cache_bytes == {}


def test_parse_size():
    assert detect_mod._parse_size("32K") == 32768
    assert detect_mod._parse_size("6144K") == 6 * 2**20
    assert detect_mod._parse_size("1.5M") == 3 * 2**19
    assert detect_mod._parse_size("") == 0 and detect_mod._parse_size("xyzK") == 0


def test_detect_fake_gtx1080(monkeypatch):
    _fake_gpu(monkeypatch, GTX1080)
    hw = detect_hardware("cuda:0")
    assert hw.device_type == "cuda" and hw.name == "NVIDIA GeForce GTX 1080"
    assert hw.compute_capability == (6, 1) and hw.num_sms == 20
    assert hw.shared_memory_per_block == 48 * 1024 and hw.l2_cache_bytes == 2 * 2**20
    assert "sm61" in hw.summary()
    assert select_profile(hw).name == "sm61"
    assert select_profile(hw).tile_size == 128


def test_detect_fake_h100(monkeypatch):
    _fake_gpu(monkeypatch, H100)
    hw = detect_hardware(torch.device("cuda", 0))
    assert hw.compute_capability == (9, 0)
    assert select_profile(hw).name == "sm90"


@pytest.mark.parametrize("error", [RuntimeError("no NVIDIA driver"), AssertionError("Torch not compiled with CUDA"),
                                   ValueError("bad index")])
def test_detect_gpu_probe_raises(monkeypatch, error):
    """A failing GPU probe falls back to describing the CPU; it never raises."""
    _fake_gpu(monkeypatch, error)
    hw = detect_hardware("cuda:3")
    assert hw.device_type == "cpu"
    assert select_profile(hw).device_type == "cpu"


def test_detect_gpu_props_missing_fields(monkeypatch):
    """An old/odd torch whose props lack the optional fields still gives a CUDA description."""
    _fake_gpu(monkeypatch, SimpleNamespace(name="Odd GPU", major=7, minor=5, multi_processor_count=40,
                                           total_memory=2**30))
    hw = detect_hardware("cuda")
    assert hw.device_type == "cuda" and hw.shared_memory_per_block == 0 and hw.l2_cache_bytes == 0
    assert select_profile(hw).name == "generic-gpu"


def test_detect_default_device_when_cuda_probe_crashes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: (_ for _ in ()).throw(RuntimeError("driver")))
    assert detect_hardware().device_type == "cpu"


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw,name",
    [
        (HardwareInfo(device_type="cuda", compute_capability=(6, 1)), "sm61"),
        (HardwareInfo(device_type="cuda", compute_capability=(8, 0)), "sm80"),
        (HardwareInfo(device_type="cuda", compute_capability=(8, 9)), "sm80"),
        (HardwareInfo(device_type="cuda", compute_capability=(9, 0)), "sm90"),
        (HardwareInfo(device_type="cuda", compute_capability=(7, 5)), "generic-gpu"),
        (HardwareInfo(device_type="cuda", compute_capability=None), "generic-gpu"),
        (HardwareInfo(cpu_model="Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz"), "i5-10210u"),
        (HardwareInfo(cpu_model="AMD EPYC 7B13 64-Core Processor"), "generic-cpu"),
        (HardwareInfo(), "generic-cpu"),
    ],
)
def test_select_profile_for_hardware(hw, name):
    prof = select_profile(hw)
    assert prof.name == name and prof.device_type == hw.device_type


def test_seed_profiles_tile_sizes():
    assert PROFILES["sm61"].tile_size == 128
    assert PROFILES["i5-10210u"].tile_size == 64
    for name in ("sm80", "sm90", "generic-gpu"):
        assert PROFILES[name].tile_size == 256
    for prof in PROFILES.values():
        assert prof.block_m > 0 and prof.block_n > 0 and "default" in prof.auto_order


def test_profile_override_by_argument_and_env(monkeypatch):
    assert select_profile(HardwareInfo(), name="sm90").name == "sm90"
    monkeypatch.setenv("QWEN3VL_FLASH_PROFILE", "i5-10210u")
    assert select_profile().name == "i5-10210u"
    assert select_profile(HardwareInfo(device_type="cuda", compute_capability=(9, 0))).name == "i5-10210u"
    # a call on the CPU uses the env profile when it is a CPU profile ...
    assert profiles_mod.profile_for_device(torch.device("cpu")).name == "i5-10210u"
    # ... and ignores a GPU profile
    monkeypatch.setenv("QWEN3VL_FLASH_PROFILE", "sm61")
    assert profiles_mod.profile_for_device(torch.device("cpu")).device_type == "cpu"


def test_profile_unknown_name(monkeypatch):
    with pytest.raises(ValueError, match=r"'gtx9000'.*sm61"):
        select_profile(name="gtx9000")
    monkeypatch.setenv("QWEN3VL_FLASH_PROFILE", "gtx9000")
    with pytest.raises(ValueError, match=r"gtx9000"):
        select_profile()


def test_profile_replace_is_a_copy():
    orig = PROFILES["generic-cpu"].block_m
    p = PROFILES["generic-cpu"].replace(block_m=orig + 1)
    assert p.block_m == orig + 1 and PROFILES["generic-cpu"].block_m == orig


def test_env_profile_changes_tiled_tiles(monkeypatch):
    """The profile chosen by $QWEN3VL_FLASH_PROFILE reaches the backend (tiles are data)."""
    from conftest import skip_if_unavailable

    skip_if_unavailable("tiled")
    seen = []
    be = get_backend("tiled")
    orig = be.forward

    def spy(q, k, v, p):
        seen.append(p.profile.name)
        return orig(q, k, v, p)

    monkeypatch.setattr(be, "forward", spy)
    monkeypatch.setenv("QWEN3VL_FLASH_PROFILE", "i5-10210u")
    q = torch.randn(1, 8, 2, 16)
    qf.flash_attn_func(q, q, q, backend="tiled")
    assert seen == ["i5-10210u"]


# --------------------------------------------------------------------------------------------
# backend choice on simulated hardware
# --------------------------------------------------------------------------------------------


def _req(device_type="cuda", cap=(6, 1), dtype=torch.float16, **kw):
    base = dict(device_type=device_type, dtype=dtype, head_dim=128, num_heads=32, num_kv_heads=8,
                seqlen_q=2048, seqlen_k=2048, causal=True, device_capability=cap)
    base.update(kw)
    return AttnRequest(**base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("need_grad", [False, True])
def test_auto_on_sm61_picks_sdpa_not_triton(dtype, need_grad):
    chosen = [b.name for b in choose_backend(_req(dtype=dtype, need_grad=need_grad), "auto", PROFILES["sm61"])]
    assert chosen[0] == "sdpa", chosen
    assert "triton" not in chosen


def test_auto_on_sm61_with_a_gpu_profile_still_skips_triton():
    """Even with a profile that lists triton first, triton's own check rejects sm61."""
    chosen = [b.name for b in choose_backend(_req(), "auto", PROFILES["generic-gpu"])]
    assert "triton" not in chosen and chosen[0] == "sdpa"


def test_auto_on_sm61_end_to_end(monkeypatch):
    """select_profile on a mocked GTX 1080, then choose_backend with that profile."""
    _fake_gpu(monkeypatch, GTX1080)
    prof = select_profile(detect_hardware("cuda:0"))
    chosen = [b.name for b in choose_backend(_req(), "auto", prof)]
    assert prof.name == "sm61" and chosen[0] == "sdpa" and "triton" not in chosen


def test_auto_on_sm61_needing_lse_falls_to_tiled():
    req = _req(need_lse=True)
    chosen = [b.name for b in choose_backend(req, "auto", PROFILES["sm61"])]
    assert "triton" not in chosen
    sdpa_ok = get_backend("sdpa").check(req) is None
    assert chosen[0] == ("sdpa" if sdpa_ok else "tiled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_on_cpu_follows_the_profile(dtype):
    """auto tries the profile's order for the dtype (data, not code), eager last, no triton; keys
    shorter than tiled_min_seqlen move tiled behind the others (but before eager)."""
    cpu = PROFILES["generic-cpu"]
    order = [n for n in cpu.order_for(dtype) if n != "triton"]
    long_req = _req("cpu", None, dtype, seqlen_q=4 * cpu.tiled_min_seqlen, seqlen_k=4 * cpu.tiled_min_seqlen)
    chosen = [b.name for b in choose_backend(long_req, "auto", cpu)]
    assert chosen == order and chosen[-1] == "eager"
    if cpu.tiled_min_seqlen > 1:
        short = _req("cpu", None, dtype, seqlen_q=1, seqlen_k=cpu.tiled_min_seqlen - 1)
        chosen = [b.name for b in choose_backend(short, "auto", cpu)]
        assert chosen[-2:] == ["tiled", "eager"] and sorted(chosen) == sorted(order)


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("QWEN3VL_FLASH_BACKEND", "eager")
    assert [b.name for b in choose_backend(_req(), "auto", PROFILES["sm61"])] == ["eager"]
    # an explicit argument wins over the environment
    assert [b.name for b in choose_backend(_req(), "sdpa", PROFILES["sm61"])] == ["sdpa"]
    monkeypatch.setenv("QWEN3VL_FLASH_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        choose_backend(_req(), "auto", PROFILES["sm61"])


def test_env_backend_override_is_used_by_the_api(monkeypatch):
    be = get_backend("eager")
    calls = []
    orig = be.attention

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(be, "attention", spy)
    q = torch.randn(1, 8, 2, 16)
    qf.flash_attn_func(q, q, q)
    assert not calls, "auto should not pick eager on CPU for this call"
    monkeypatch.setenv("QWEN3VL_FLASH_BACKEND", "eager")
    qf.flash_attn_func(q, q, q)
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# the Triton tiles: a typed schema with one lookup
# --------------------------------------------------------------------------------------------

TILE_DIMS = (16, 32, 40, 64, 72, 80, 96, 128, 160, 200, 256)
SHORT = (0, 1, 1024, 8191)
LONG = (8192, 16384, 32768)
ALL = SHORT + LONG
NO_TILE = [-1, -1, -1, -1]  # autotune (GPU) / the interpreter's tile
# What the profiles resolved to before the schema (the dict grammar fwd / fwd_d256 / long_from /
# fwd_long_hd128 / bwd / bwd_d256 read by triton_backend._config_list), computed from that code
# for every profile, head dim and sequence length: the ops' config lists
# [BLOCK_M, BLOCK_N, num_warps, num_stages] ("bwd": with the dQ kernel's 4 more where given).
OLD_TILES = [
    ("sm61", "fwd", TILE_DIMS, ALL, NO_TILE),
    ("sm61", "bwd", TILE_DIMS, ALL, NO_TILE),
    ("sm80", "fwd", (16, 32, 40, 64, 72, 80, 96, 128), ALL, [128, 64, 4, 3]),
    ("sm80", "bwd", (16, 32, 40, 64, 72, 80, 96, 128), ALL, [64, 64, 4, 2]),
    ("sm80", "fwd", (160, 200, 256), ALL, [64, 32, 4, 2]),
    ("sm80", "bwd", (160, 200, 256), ALL, [32, 32, 4, 1]),
    ("sm90", "fwd", (16, 32, 40, 64, 72, 80, 96, 128), SHORT, [64, 64, 4, 3]),
    ("sm90", "fwd", (16, 32, 40, 64, 72, 80, 96), LONG, [64, 64, 4, 3]),
    ("sm90", "fwd", (128,), LONG, [128, 128, 8, 3]),
    ("sm90", "bwd", (16, 32, 40, 64, 72, 80, 96, 128), ALL, [64, 64, 4, 2]),
    ("sm90", "fwd", (160, 200, 256), ALL, [64, 64, 4, 2]),
    ("sm90", "bwd", (160, 200, 256), ALL, [32, 64, 4, 1]),
    ("generic-gpu", "fwd", TILE_DIMS, ALL, [64, 64, 4, 2]),
    ("generic-gpu", "bwd", TILE_DIMS, ALL, NO_TILE),
    ("i5-10210u", "fwd", TILE_DIMS, ALL, NO_TILE),
    ("i5-10210u", "bwd", TILE_DIMS, ALL, NO_TILE),
    ("generic-cpu", "fwd", TILE_DIMS, ALL, NO_TILE),
    ("generic-cpu", "bwd", TILE_DIMS, ALL, NO_TILE),
]
OLD_DECODE = {"waves": 2, "min_chunk": 256, "min_chunk_per_row": 32, "max_splits": 64,
              "block_n": {16: 64, 32: 64, 64: 64, 128: 64, 256: 32}, "num_warps": 4, "num_stages": 3,
              "merge_num_warps": 4, "fuse_merge_max_rows": 0}
# the launchers' former module constants (triton_fwd.AUTOTUNE_FWD / INTERPRET_CONFIG, triton_bwd.AUTOTUNE_BWD)
OLD_AUTOTUNE_FWD = [[128, 64, 4, 3], [128, 128, 8, 3], [64, 64, 4, 2], [128, 64, 8, 2]]
OLD_AUTOTUNE_BWD = [[64, 64, 4, 2], [64, 128, 8, 2], [128, 64, 8, 2], [32, 64, 4, 3]]


def test_every_profile_resolves_the_tiles_it_did_before():
    from qwen3vl_flash.backends.triton_backend import _bwd_config_list, _config_list

    expected = {}
    for name, kind, dims, seqlens, cfg in OLD_TILES:
        for d in dims:
            for s in seqlens:
                assert (name, kind, d, s) not in expected
                expected[name, kind, d, s] = cfg
    assert set(expected) == {(n, k, d, s) for n in PROFILES for k in ("fwd", "bwd") for d in TILE_DIMS for s in ALL}
    for (name, kind, d, s), cfg in expected.items():
        prof = PROFILES[name]
        got = _config_list(prof, "fwd", d, s) if kind == "fwd" else _bwd_config_list(prof, d)
        assert got == cfg, (name, kind, d, s)
        tile = prof.triton.lookup(kind, d, s)
        assert (tile.as_list() if tile is not None else NO_TILE) == cfg[:4]


def test_every_profile_keeps_its_launch_and_decode_data():
    import dataclasses

    for prof in PROFILES.values():
        tri = prof.triton
        assert tri.head_split == "split"
        assert [t.as_list() for t in tri.autotune_fwd] == OLD_AUTOTUNE_FWD
        assert [t.as_list() for t in tri.autotune_bwd] == OLD_AUTOTUNE_BWD
        assert tri.interpret.as_config() == {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        assert tri.preprocess_block_m == 64 and tri.reverse_m is False
        dec = dataclasses.asdict(tri.decode)
        assert dec.pop("block_n_other") == 32
        assert dec.pop("quant_keys_factor") == 1  # quantised caches (issue 14): bf16 tiles unchanged
        assert dec == OLD_DECODE
        for d in (16, 32, 64, 128, 256):
            assert tri.decode.keys_per_tile(d) == OLD_DECODE["block_n"][d]
        assert prof.cp_order == (("cudnn", "triton", "tiled") if prof.device_type == "cuda" else ("tiled",))


def test_dq_tile_needs_a_backward_tile():
    from qwen3vl_flash.backends.triton_backend import _bwd_config_list
    from qwen3vl_flash.hardware.profiles import KernelTile, TritonTiles

    tiles = TritonTiles(bwd=KernelTile(32, 16, 4, 1), bwd_dq_by_dim={32: KernelTile(16, 32, 4, 1)})
    prof = PROFILES["generic-cpu"].replace(triton=tiles)
    assert _bwd_config_list(prof, 32) == [32, 16, 4, 1, 16, 32, 4, 1]
    assert _bwd_config_list(prof, 20) == [32, 16, 4, 1, 16, 32, 4, 1]  # padded to 32
    assert _bwd_config_list(prof, 64) == [32, 16, 4, 1]
    no_bwd = prof.replace(triton=TritonTiles(bwd_dq_by_dim={32: KernelTile(16, 32, 4, 1)}))
    assert _bwd_config_list(no_bwd, 32) == NO_TILE  # both kernels autotune
    with pytest.raises(ValueError, match="kind"):
        tiles.lookup("bwd_dkdv", 32)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda m: m.TritonTiles(fwd_d256=m.KernelTile(64, 32)), "fwd_d256"),  # the old dict key
        (lambda m: m.TritonTiles(long_from=8192), "long_from"),
        (lambda m: m.KernelTile(64, 64, num_warp=4), "num_warp"),
        (lambda m: m.DecodeTiles(wave=3), "wave"),
        (lambda m: m.PROFILES["sm90"].triton.replace(bwd_dq_d128=None), "bwd_dq_d128"),
        (lambda m: m.PROFILES["sm90"].triton.decode.replace(min_chunks=16), "min_chunks"),
        (lambda m: m.PROFILES["sm90"].replace(trition=None), "trition"),
    ],
)
def test_unknown_tile_field_raises_with_its_name(make, name):
    with pytest.raises(TypeError, match=name):
        make(profiles_mod)


@pytest.mark.parametrize(
    "make, where",
    [
        (lambda m: m.PROFILES["sm90"].replace(triton={"fwd": {"BLOCK_M": 64, "BLOCK_N": 64}}), "TileProfile.triton"),
        (lambda m: m.TritonTiles(fwd={"BLOCK_M": 64, "BLOCK_N": 64}), "TritonTiles.fwd"),
        (lambda m: m.TritonTiles(fwd_by_dim={72: m.KernelTile(64, 64)}), "TritonTiles.fwd_by_dim key"),
        (lambda m: m.TritonTiles(bwd_by_dim={128: {"BLOCK_M": 64}}), r"TritonTiles.bwd_by_dim\[128\]"),
        (lambda m: m.TritonTiles(fwd_long_by_dim={128: m.KernelTile(128, 128, 8, 3)}), "fwd_long_from"),
        (lambda m: m.TritonTiles(head_split="padded"), "head_split"),
        (lambda m: m.TritonTiles(autotune_fwd=()), "autotune_fwd"),
        (lambda m: m.TritonTiles(decode={"waves": 3}), "TritonTiles.decode"),
        (lambda m: m.DecodeTiles(block_n={100: 16}), "DecodeTiles.block_n key"),
        (lambda m: m.DecodeTiles(block_n={128: 24}), r"DecodeTiles.block_n\[128\]"),
        (lambda m: m.DecodeTiles(waves=0), "DecodeTiles.waves"),
        (lambda m: m.KernelTile(48, 64), "KernelTile.block_m"),
        (lambda m: m.KernelTile(64, 64, num_stages=0), "KernelTile.num_stages"),
    ],
)
def test_malformed_tile_data_raises_with_its_place(make, where):
    with pytest.raises(TypeError, match=where):
        make(profiles_mod)


def test_typed_overrides_are_copies():
    import dataclasses

    from qwen3vl_flash.hardware.profiles import KernelTile

    base = PROFILES["sm90"]
    prof = base.replace(name="tuned", triton=base.triton.replace(decode=base.triton.decode.replace(waves=3)))
    assert prof.triton.decode.waves == 3 and base.triton.decode.waves == 2
    assert prof.triton.fwd == base.triton.fwd  # everything else kept
    same = dataclasses.replace(base.triton, decode=dataclasses.replace(base.triton.decode, waves=3))
    assert same == prof.triton
    tile = base.triton.replace(fwd=KernelTile(16, 16, 4, 1))
    assert tile.lookup("fwd", 64) == KernelTile(16, 16, 4, 1) and tile.lookup("fwd", 128, 16384).block_m == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.triton.fwd = KernelTile(16, 16)


def test_order_rules_are_profile_data(monkeypatch):
    """auto's order (per dtype, varlen) and the short-key rule for tiled come from the profile
    (on a CPU whose 16-bit matmul is fast: the slow case is tests/test_cpu_lowp.py's)."""
    monkeypatch.setenv("QWEN3VL_FLASH_CPU_LOWP", "fast")
    gpu = {"default": ("sdpa", "triton", "tiled", "eager"), "varlen": ("triton", "sdpa", "tiled", "eager")}
    for prof in PROFILES.values():
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for varlen in (False, True):
                for sk in (None, 1, 255, 256, 4096):  # as before: tiled is already next to last
                    got = prof.order_for(dtype, varlen, seqlen_k=sk)
                    if prof.name in ("sm80", "sm90", "generic-gpu"):
                        assert got == gpu["varlen" if varlen else "default"]
                    else:
                        assert got == ("sdpa", "tiled", "eager")
    custom = PROFILES["generic-cpu"].replace(auto_order={"default": ("tiled", "sdpa", "eager")}, tiled_min_seqlen=256)
    assert custom.order_for(torch.float32, seqlen_k=100) == ("sdpa", "tiled", "eager")
    assert custom.order_for(torch.float32, seqlen_k=256) == ("tiled", "sdpa", "eager")
    assert custom.order_for(torch.float32) == ("tiled", "sdpa", "eager")
    no_eager = custom.replace(auto_order={"default": ("tiled", "sdpa")})
    assert no_eager.order_for(torch.float32, seqlen_k=1) == ("sdpa", "tiled")
    short = _req("cpu", None, torch.float32, seqlen_q=1, seqlen_k=100)
    assert [b.name for b in choose_backend(short, "auto", custom)][-2:] == ["tiled", "eager"]


def test_context_parallel_kernel_order_comes_from_the_profile(monkeypatch):
    from qwen3vl_flash.parallel import api as cp_api

    q = torch.randn(1, 8, 2, 16)
    assert cp_api.choose_kernel(q, 2, True).name == "tiled"
    custom = PROFILES["generic-cpu"].replace(cp_order=("eager", "tiled"))
    monkeypatch.setattr(cp_api, "profile_for_device", lambda device: custom)
    with pytest.raises(ValueError, match="'eager' cannot run context parallelism"):
        cp_api.choose_kernel(q, 2, True)
