"""No bf16 / fp16 cliff on CPUs without fast 16-bit matmuls (issue 17, item 2).

The probe (:mod:`qwen3vl_flash.hardware.cpu_probe`) measures once per process and dtype whether
this CPU's 16-bit matmul is slower than its fp32 one; where it is, ``tiled`` computes its tiles in
float32 (inputs and outputs stay 16-bit) and ``auto`` puts ``tiled`` first for 16-bit CPU calls
(:meth:`TileProfile.order_for`). ``$QWEN3VL_FLASH_CPU_LOWP`` and ``TileProfile.cpu_lowp_matmul``
pin the answer. The real measurement is checked under an ISA emulation in a subprocess
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, the i5-10210U's instruction set: bf16
matmuls run 20-50x slower than fp32 there), small shapes only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import check_against_reference, make_qkv, randn, reference_triplet

import qwen3vl_flash as qf
from qwen3vl_flash.backends import tiled
from qwen3vl_flash.backends.base import AttnRequest
from qwen3vl_flash.hardware import cpu_probe
from qwen3vl_flash.hardware.profiles import PROFILES
from qwen3vl_flash.interface import choose_backend

BF16, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
CPU_PROFILES = [p for p in PROFILES.values() if p.device_type == "cpu"]


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    """No pin from the environment, no cached measurement; the process's own restored after."""
    monkeypatch.delenv(cpu_probe.ENV_CPU_LOWP, raising=False)
    saved = dict(cpu_probe._MEASURED)
    cpu_probe.reset()
    yield
    cpu_probe.reset()
    cpu_probe._MEASURED.update(saved)


@pytest.fixture
def no_measuring(monkeypatch):
    def fail(dtype, *a, **k):
        raise AssertionError("the probe measured although the decision was pinned")

    monkeypatch.setattr(cpu_probe, "measure_ratio", fail)


def _req(dtype, seqlen=4096, varlen=False):
    return AttnRequest(device_type="cpu", dtype=dtype, head_dim=128, num_heads=32, num_kv_heads=8,
                       seqlen_q=seqlen, seqlen_k=seqlen, causal=True, varlen=varlen)


@pytest.mark.parametrize("choice,slow", [("slow", True), ("fast", False), (" SLOW ", True)])
def test_env_pins_the_decision(monkeypatch, no_measuring, choice, slow):
    monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, choice)
    assert cpu_probe.lowp_matmul_is_slow(BF16) is slow and cpu_probe.lowp_matmul_is_slow(FP16) is slow
    assert cpu_probe.lowp_matmul_is_slow(F32) is False and cpu_probe.lowp_matmul_is_slow(torch.float64) is False
    # the environment wins over a profile's pin
    assert cpu_probe.lowp_matmul_is_slow(BF16, pinned="fast" if slow else "slow") is slow


def test_measured_once_per_dtype(monkeypatch):
    calls = []
    ratios = {BF16: 30.0, FP16: 1.2}
    monkeypatch.setattr(cpu_probe, "measure_ratio", lambda dtype: calls.append(dtype) or ratios[dtype])
    for _ in range(3):
        assert cpu_probe.lowp_matmul_is_slow(BF16) is True
        assert cpu_probe.lowp_matmul_is_slow(FP16) is False
    assert calls == [BF16, FP16]
    cpu_probe.reset()
    ratios[BF16] = cpu_probe.SLOW_RATIO * 0.99
    assert cpu_probe.lowp_matmul_is_slow(BF16) is False and calls == [BF16, FP16, BF16]


def test_measure_ratio_is_a_real_timing():
    """On this machine, whatever its ISA: a finite positive ratio, in milliseconds, threads restored."""
    import time

    threads = torch.get_num_threads()
    cpu_probe.measure_ratio(BF16)  # oneDNN's first-use kernel generation is not the probe's cost
    t0 = time.perf_counter()
    r = cpu_probe.measure_ratio(BF16)
    assert 0 < r < float("inf") and time.perf_counter() - t0 < 0.5
    assert torch.get_num_threads() == threads


def test_bad_values_raise(monkeypatch):
    monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, "sometimes")
    with pytest.raises(ValueError, match=cpu_probe.ENV_CPU_LOWP):
        cpu_probe.lowp_matmul_is_slow(BF16)
    monkeypatch.delenv(cpu_probe.ENV_CPU_LOWP)
    with pytest.raises(ValueError, match="TileProfile.cpu_lowp_matmul"):
        PROFILES["generic-cpu"].replace(cpu_lowp_matmul="maybe").order_for(BF16)


@pytest.mark.parametrize("prof", CPU_PROFILES, ids=lambda p: p.name)
def test_auto_puts_tiled_first_where_lowp_is_slow(monkeypatch, no_measuring, prof):
    monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, "slow")
    base = prof.order_for(F32)
    rest = tuple(n for n in base if n != "tiled")
    for dtype in (BF16, FP16):
        assert prof.order_for(dtype, seqlen_k=4096) == ("tiled",) + rest
        assert prof.order_for(dtype, varlen=True) == ("tiled",) + rest
        assert [b.name for b in choose_backend(_req(dtype), "auto", prof)][0] == "tiled"
        if prof.tiled_min_seqlen > 1:  # short keys: launch overheads still put tiled behind
            assert prof.order_for(dtype, seqlen_k=prof.tiled_min_seqlen - 1) == base
    assert prof.order_for(F32, seqlen_k=4096) == base and prof.order_for(torch.float64) == base
    monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, "fast")
    assert prof.order_for(BF16, seqlen_k=4096) == base and prof.order_for(FP16) == base


def test_profile_pin_and_its_limits(monkeypatch, no_measuring):
    slow = PROFILES["generic-cpu"].replace(cpu_lowp_matmul="slow")
    fast = PROFILES["generic-cpu"].replace(cpu_lowp_matmul="fast")
    assert slow.order_for(BF16)[0] == "tiled" and fast.order_for(BF16)[0] == "sdpa"
    # an order of the dtype's own (a tuned profile's measurement) wins over the rule
    tuned = slow.replace(auto_order={"default": ("sdpa", "tiled", "eager"), "bfloat16": ("sdpa", "tiled", "eager")})
    assert tuned.order_for(BF16) == ("sdpa", "tiled", "eager") and tuned.order_for(FP16)[0] == "tiled"
    # GPU profiles never consult the CPU probe
    monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, "slow")
    for prof in PROFILES.values():
        if prof.device_type == "cuda":
            assert prof.order_for(BF16) == prof.order_for(F32)
    monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, "fast")
    assert slow.order_for(BF16)[0] == "sdpa"  # the environment wins over the pin


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_tiled_upcasts_its_tiles_where_lowp_is_slow(monkeypatch, dtype):
    """Where torch has a 16-bit matmul with an fp32 result (emulated here: the CPU of torch 2.13
    has none), tiled keeps 16-bit operands only if the CPU's 16-bit matmul is not slow; else it
    upcasts per tile and chunk, and its results stay 16-bit and exact."""
    monkeypatch.setattr(tiled, "_has_fp32_out_bmm", lambda device, dt, acc: True)
    x = torch.zeros(1, 1, 2, 8, dtype=dtype)
    for choice, op in (("fast", dtype), ("slow", F32)):
        monkeypatch.setattr(tiled, "_FP32_OUT_BMM", {})
        monkeypatch.setenv(cpu_probe.ENV_CPU_LOWP, choice)
        assert tiled._operand_dtype(x, F32) == op, choice
    seen = []
    real = tiled._mm
    monkeypatch.setattr(tiled, "_mm", lambda a, b, acc: seen.append((a.dtype, b.dtype)) or real(a, b, acc))
    B, S, H, Hkv, D = 2, 77, 4, 2, 32
    q, k, v = (t.requires_grad_() for t in make_qkv(B, S, S, H, Hkv, D, dtype))
    dout = randn(B, S, H, D, dtype=dtype)
    out, lse = qf.flash_attn_func(q, k, v, causal=True, return_lse=True, backend="tiled")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert seen and all(a == F32 and b == F32 for a, b in seen), "a matmul ran in 16 bits"
    ref, low = reference_triplet(q, k, v, dout, causal=True)
    check_against_reference(out.detach(), lse, grads, ref, low, dtype)


AVX2_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import qwen3vl_flash as qf
    from qwen3vl_flash.backends import tiled
    from qwen3vl_flash.backends.base import get_backend
    from qwen3vl_flash.hardware import cpu_probe

    served = []
    be = get_backend("tiled")
    real = be.forward
    be.forward = lambda *a, **k: served.append("tiled") or real(*a, **k)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, h, 64).to(torch.bfloat16) for h in (4, 2, 2))
    out = qf.flash_attn_func(q, k, v, causal=True)  # auto
    torch.save({"q": q, "k": k, "v": v, "out": out}, sys.argv[1])
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "ratio": cpu_probe.measure_ratio(torch.bfloat16),
        "slow": cpu_probe.lowp_matmul_is_slow(torch.bfloat16),
        "order": list(qf.select_profile().order_for(torch.bfloat16, seqlen_k=300)),
        "operand": str(tiled._operand_dtype(q, torch.float32)),
        "served": served,
    }))
""")


def test_avx2_emulation_measures_the_cliff_and_avoids_it(tmp_path):
    """Under the i5-10210U's ISA (emulated): the probe finds bf16 matmuls slow, auto serves a bf16
    call with tiled, which computes in fp32, and the result holds the 2x rule."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags:
        pytest.skip("the emulation limits an x86 CPU with AVX2 to AVX2; this CPU has no AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    env.pop(cpu_probe.ENV_CPU_LOWP, None)
    path = tmp_path / "avx2.pt"
    done = subprocess.run([sys.executable, "-c", AVX2_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["capability"] == "AVX2", r
    assert r["ratio"] > cpu_probe.SLOW_RATIO and r["slow"], r
    assert r["order"][0] == "tiled" and r["served"] == ["tiled"] and r["operand"] == "torch.float32", r
    t = torch.load(path)
    ref, low = reference_triplet(t["q"], t["k"], t["v"], causal=True)
    check_against_reference(t["out"], None, None, ref, low, BF16, "auto bf16 under AVX2: ")
