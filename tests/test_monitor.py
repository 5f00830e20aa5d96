"""qf.monitor(): one record per attention call (the public functions, context parallelism's entry,
the transformers integration's text and vision layers), naming the backend that served it and why
``auto`` skipped the ones ahead of it; summary / CSV; nothing recorded and no clock read when off;
the QWEN3VL_FLASH_MONITOR process monitor; ``qwen3vl-flash demo --monitor``."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import cu_seqlens, make_qkv, randn

import qwen3vl_flash as qf
from qwen3vl_flash import interface
from qwen3vl_flash.backends.base import _REGISTRY, AttnParams, Backend, get_backend
from qwen3vl_flash.hardware.profiles import profile_for_device, use_profile
from qwen3vl_flash.monitor import _ACTIVE, FIELDS, CallRecord, Monitor, _start_from_env
from qwen3vl_flash.parallel import api
from qwen3vl_flash.reference import attention_ref

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_monitor_leaks():
    assert not _ACTIVE, "a monitor was left active by an earlier test"
    yield
    assert not _ACTIVE, "this test left a monitor active"


def _calls(backend="auto", dtype=torch.float32):
    """One call of each public function; returns their outputs."""
    q, k, v = make_qkv(2, 12, 12, 4, 2, 16, dtype=dtype)
    out = qf.flash_attn_func(q, k, v, causal=True, backend=backend)
    cu = cu_seqlens([5, 7])  # unequal segments: a real varlen call
    outv = qf.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 7, 7, backend=backend)
    kc, vc = torch.zeros(2, 20, 2, 16, dtype=dtype), torch.zeros(2, 20, 2, 16, dtype=dtype)
    kc[:, :6], vc[:, :6] = randn(2, 6, 2, 16, dtype=dtype), randn(2, 6, 2, 16, dtype=dtype)
    outk = qf.flash_attn_with_kvcache(randn(2, 1, 4, 16, dtype=dtype), kc, vc, k=randn(2, 1, 2, 16, dtype=dtype),
                                      v=randn(2, 1, 2, 16, dtype=dtype),
                                      cache_seqlens=torch.tensor([6, 3], dtype=torch.int32), backend=backend)
    return out, outv, outk


def _auto_choice(q, k, varlen=False):
    """What auto serves a plain call of these tensors with on this machine (the interface's own rule)."""
    p = AttnParams(1.0, True, profile=profile_for_device(q.device),
                   cu_seqlens_q=cu_seqlens([1]) if varlen else None)
    req = interface._request(q, k, p, False, q.shape[-3], k.shape[-3])
    return interface.choose_backend(req, "auto", p.profile)[0].name


# --------------------------------------------------------------------------------------------
# records of the public functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tiled", "sdpa", "eager"])
def test_one_record_per_public_call_with_the_named_backend(backend):
    torch.manual_seed(1)
    plain = _calls(backend)
    torch.manual_seed(1)
    with qf.monitor() as m:
        seen = _calls(backend)
    for a, b in zip(plain, seen):  # monitoring changes nothing in the results
        assert torch.equal(a, b)
    assert len(m) == len(m.records) == 3
    assert [r.function for r in m.records] == ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]
    for r in m.records:
        assert isinstance(r, CallRecord)
        assert r.backend == backend and r.reason is None  # named explicitly: nothing was skipped
        assert (r.kind, r.layer, r.dtype, r.device, r.quant) == (None, None, "float32", "cpu", None)
        assert r.wall_ms > 0 and r.device_ms is None and r.peak_extra_bytes is None
    assert m.records[0].shapes == ((2, 12, 4, 16), (2, 12, 2, 16), (2, 12, 2, 16))
    assert m.records[1].shapes == ((12, 4, 16), (12, 2, 16), (12, 2, 16))
    # the KV-cache call (its generic path: a varlen call over the valid rows) is recorded as the user's call
    assert m.records[2].shapes == ((2, 1, 4, 16), (2, 20, 2, 16), (2, 20, 2, 16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.records[0].backend = "x"


def test_auto_records_the_backend_auto_chose():
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16)
    with qf.monitor() as m:
        qf.flash_attn_func(q, k, v)
        qf.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens([15, 25]), cu_seqlens([15, 25]), 25, 25)
    assert [r.backend for r in m.records] == [_auto_choice(q, k), _auto_choice(q[0], k[0], varlen=True)]


def test_equal_varlen_segments_are_one_record_of_the_varlen_call():
    """Equal segments run as one dense batch inside flash_attn_varlen_func: still one record, of it."""
    q, k, v = make_qkv(1, 12, 12, 4, 2, 16)
    cu = cu_seqlens([6, 6])
    with qf.monitor() as m:
        out = qf.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 6, 6, backend="tiled")
    assert len(m) == 1
    r = m.records[0]
    assert (r.function, r.backend) == ("flash_attn_varlen_func", "tiled")
    assert r.shapes == ((12, 4, 16), (12, 2, 16), (12, 2, 16))
    ref = torch.cat([attention_ref(q[:, s:s + 6], k[:, s:s + 6], v[:, s:s + 6], 16 ** -0.5)[0] for s in (0, 6)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_skip_reasons_are_the_check_reasons_of_the_backends_ahead():
    """float64 with triton first in auto's order: triton's check() refuses, sdpa serves; the record
    says why triton was skipped, in triton's own words."""
    prof = profile_for_device(CPU).replace(auto_order={"default": ("triton", "sdpa", "tiled", "eager")})
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, dtype=torch.float64)
    with use_profile(prof), qf.monitor() as m:
        qf.flash_attn_func(q, k, v)
        qf.flash_attn_func(q, k, v, backend="sdpa")  # explicit: no reason even though triton is ahead
    req = interface._request(q, k, AttnParams(0.25, profile=prof), False, 8, 8)
    why = get_backend("triton").check(req)
    assert why is not None and "float64" in why
    assert m.records[0].backend == "sdpa" and m.records[0].reason == f"triton: {why}"
    assert m.records[1].backend == "sdpa" and m.records[1].reason is None
    assert "1 x triton: " + why in m.summary()


def test_fallback_records_the_backend_that_served_and_the_failure(monkeypatch):
    first = _auto_choice(*make_qkv(1, 8, 8, 2, 2, 16)[:2])
    be = get_backend(first)

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(be, "attention" if be.native_autograd else "forward", boom)
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    with qf.monitor() as m:
        out = qf.flash_attn_func(q, k, v, causal=True)
        with pytest.raises(RuntimeError, match="exploded"):  # named explicitly: raises, and is not recorded
            qf.flash_attn_func(q, k, v, backend=first)
    assert len(m) == 1
    r = m.records[0]
    assert r.backend != first and r.backend == interface.choose_backend(
        interface._request(q, k, AttnParams(0.25, True, profile=profile_for_device(CPU)), False, 8, 8),
        "auto", profile_for_device(CPU))[1].name
    assert r.reason == f"{first} failed (RuntimeError: kernel exploded)"
    torch.testing.assert_close(out, attention_ref(q, k, v, 0.25, True), atol=1e-5, rtol=1e-5)


# -- flash_attn_with_kvcache's fused decode path (a test backend with one, registered for the test)


class _FusedDecode(Backend):
    """A backend with a fused KV-cache path (append + attend in one call), as triton has on GPUs."""

    name = "fused-test"
    native_autograd = True

    def __init__(self, fail: bool):
        self.fail = fail

    def check(self, req):
        return None

    def attention(self, q, k, v, p):  # the generic path must not land here in these tests
        raise RuntimeError("dense path not served")

    def kvcache_check(self, q, k_cache, p):
        return None

    def kvcache_attention(self, q, k_cache, v_cache, k, v, cache_seqlens, p, block_table=None, cache_leftpad=None):
        if self.fail:
            raise RuntimeError("decode kernel failed to compile")
        L = int(cache_seqlens[0]) + k.shape[1]
        k_cache[:, L - k.shape[1]:L], v_cache[:, L - k.shape[1]:L] = k, v
        return attention_ref(q, k_cache[:, :L], v_cache[:, :L], p.softmax_scale, p.causal, return_lse=True)


@pytest.mark.parametrize("fail", [False, True], ids=["fused", "fused-fails"])
def test_kvcache_fused_path_records(monkeypatch, fail):
    fake = _FusedDecode(fail)
    monkeypatch.setitem(_REGISTRY, fake.name, fake)
    monkeypatch.setattr(interface, "_KV_DISPATCH", {})
    prof = profile_for_device(CPU).replace(auto_order={"default": (fake.name, "sdpa", "tiled", "eager")})
    q, kn, vn = randn(2, 1, 4, 16), randn(2, 1, 2, 16), randn(2, 1, 2, 16)
    kc, vc = randn(2, 10, 2, 16), randn(2, 10, 2, 16)
    lens = torch.tensor([5, 5], dtype=torch.int32)
    with use_profile(prof), qf.monitor() as m:
        out = qf.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens)
    assert len(m) == 1
    r = m.records[0]
    assert r.function == "flash_attn_with_kvcache"
    assert r.shapes == ((2, 1, 4, 16), (2, 10, 2, 16), (2, 10, 2, 16))
    if not fail:
        assert (r.backend, r.reason) == (fake.name, None)
    else:  # the generic path ran; its record tells both failures of the test backend, in order
        assert r.backend == "sdpa"
        assert r.reason == (f"{fake.name} decode path failed (RuntimeError: decode kernel failed to compile); "
                            f"{fake.name} failed (RuntimeError: dense path not served)")
    torch.testing.assert_close(out, attention_ref(q, kc[:, :6], vc[:, :6], 0.25, True), atol=1e-5, rtol=1e-5)


def test_context_parallel_entry_without_a_group_is_one_record_of_it():
    q, k, v = make_qkv(1, 8, 8, 2, 1, 16)
    with qf.monitor() as m:
        api.context_parallel_attn(q, k, v, causal=True, backend="tiled")
    assert [(r.function, r.backend) for r in m.records] == [("context_parallel_attn", "tiled")]


def test_sync_on_cpu_measures_no_device_time():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    with qf.monitor(sync=True) as m:
        qf.flash_attn_func(q, k, v, backend="tiled")
    r = m.records[0]
    assert r.wall_ms > 0 and r.device_ms is None and r.peak_extra_bytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_on_cuda_measures_device_time_and_peak_memory():
    q, k, v = (x.cuda().half() for x in make_qkv(1, 256, 256, 4, 4, 64))
    with qf.monitor(sync=True) as m:
        out = qf.flash_attn_func(q, k, v, causal=True)
    with qf.monitor() as plain:
        qf.flash_attn_func(q, k, v, causal=True)
    r = m.records[0]
    assert r.device.startswith("cuda") and r.device_ms > 0
    assert r.peak_extra_bytes >= out.numel() * out.element_size()  # at least the output was allocated
    assert plain.records[0].device_ms is None and plain.records[0].peak_extra_bytes is None
    assert "device ms" in m.summary().splitlines()[1]


def test_context_parallel_across_ranks_is_one_record_with_the_kernel_and_reasons(monkeypatch):
    """The hook of the multi-rank path: the ring itself is replaced by the block kernel on the whole
    (local) sequence (real rings: tests/test_parallel.py); float64 with triton first in cp_order:
    triton's check() refuses, tiled runs the blocks."""
    from qwen3vl_flash.parallel.comm import CPTopology

    monkeypatch.setattr(api, "resolve_topology",
                        lambda group: CPTopology(world_size=2, shard_index=0, ring_size=2, flat_group=group))
    ran = []

    def one_rank_ring(q, k, v, be, scale, causal, layout, group, W, index):
        ran.append(be.name)
        return be.forward(q, k, v, AttnParams(scale, causal, profile=profile_for_device(q.device)))

    monkeypatch.setattr(api, "ring_attn", one_rank_ring)
    prof = profile_for_device(CPU).replace(cp_order=("triton", "tiled"))
    q, k, v = make_qkv(1, 8, 8, 2, 1, 16, dtype=torch.float64)
    with use_profile(prof), qf.monitor() as m:
        out = api.context_parallel_attn(q, k, v, causal=True, group=object(), mode="ring")
        api.context_parallel_attn(q, k, v, causal=True, group=object(), mode="ring", backend="tiled")
    assert ran == ["tiled", "tiled"]
    why = get_backend("triton").check(interface._request(q, k, AttnParams(0.25, True, profile=prof), True, 8, 8))
    assert [(r.function, r.backend, r.reason) for r in m.records] == [
        ("context_parallel_attn", "tiled", f"triton: {why}"), ("context_parallel_attn", "tiled", None)]
    torch.testing.assert_close(out, attention_ref(q, k, v, 0.25, True), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# the monitor object: nesting, threads, decorator, summary, CSV
# --------------------------------------------------------------------------------------------


def test_nested_monitors_both_record_and_reentry_is_one_activation():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    outer = qf.monitor()
    with outer:
        qf.flash_attn_func(q, k, v, backend="eager")
        with qf.monitor() as inner:
            qf.flash_attn_func(q, k, v, backend="tiled")
            with outer:  # the same monitor again: still one activation, one record per call
                qf.flash_attn_func(q, k, v, backend="sdpa")
        assert outer.active and not inner.active
    assert [r.backend for r in outer.records] == ["eager", "tiled", "sdpa"]
    assert [r.backend for r in inner.records] == ["tiled", "sdpa"]
    assert inner.records[0] is outer.records[1]
    qf.flash_attn_func(q, k, v)  # after the blocks: recorded nowhere
    assert len(outer) == 3 and len(inner) == 2


def test_decorator_and_threads():
    mon = qf.monitor()
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)

    @mon
    def work(n):
        threads = [threading.Thread(target=lambda: [qf.flash_attn_func(q, k, v, backend="sdpa") for _ in range(n)])
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert work.monitor is mon and not mon.active
    work(5)
    assert len(mon) == 15 and all(r.backend == "sdpa" for r in mon.records)


def test_bad_arguments():
    with pytest.raises(TypeError, match="sync must be a bool"):
        qf.monitor(sync=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qf.monitor(model="model")


def test_summary_and_csv(tmp_path):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    with qf.monitor() as m:
        for _ in range(3):
            qf.flash_attn_func(q, k, v, backend="tiled")
        qf.flash_attn_func(q, k, v, backend="eager")
        qf.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens([3, 5]), cu_seqlens([3, 5]), 5, 5, backend="sdpa")
    text = m.summary()
    lines = text.splitlines()
    assert lines[0].startswith("qwen3vl_flash monitor: 5 attention calls")
    rows = {tuple(line.split()[:3]) for line in lines[3:-2]}
    assert rows == {("flash_attn_func", "tiled", "3"), ("flash_attn_func", "eager", "1"),
                    ("flash_attn_varlen_func", "sdpa", "1")}
    total = lines[-1].split()
    assert total[0] == "total" and total[1] == "5"
    assert float(total[2]) == pytest.approx(sum(r.wall_ms for r in m.records), abs=2e-3)
    tiled = next(line.split() for line in lines if line.startswith("flash_attn_func") and " tiled " in line)
    tiled_ms = sum(r.wall_ms for r in m.records if r.backend == "tiled")
    assert float(tiled[3]) == pytest.approx(tiled_ms, abs=2e-3)
    assert float(tiled[4]) == pytest.approx(tiled_ms / 3, abs=2e-3)
    assert float(tiled[5].rstrip("%")) == pytest.approx(100 * tiled_ms / sum(r.wall_ms for r in m.records), abs=0.1)

    path = tmp_path / "calls.csv"
    m.to_csv(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        got = list(reader)
    assert len(got) == 5
    for row, rec in zip(got, m.records):
        assert (row["function"], row["backend"], row["dtype"], row["device"]) == (
            rec.function, rec.backend, rec.dtype, rec.device)
        assert tuple(tuple(int(d) for d in s.split("x")) for s in row["shapes"].split(";")) == rec.shapes
        assert float(row["wall_ms"]) == pytest.approx(rec.wall_ms, abs=1e-6)
        assert row["kind"] == row["reason"] == row["device_ms"] == row["quant"] == ""
    assert qf.monitor().summary() == "qwen3vl_flash monitor: no attention calls recorded"


# --------------------------------------------------------------------------------------------
# off: nothing recorded, no clock read, no hook entered
# --------------------------------------------------------------------------------------------


def test_off_path_reads_no_clock_and_enters_no_hook(monkeypatch):
    reads = []
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: reads.append(1) or real())

    def forbidden(*a, **k):
        raise AssertionError("a monitor hook ran with no monitor active")

    for mod, name in ((interface, "_begin_call"), (interface, "_monitored_kvcache"), (api, "_begin_call")):
        monkeypatch.setattr(mod, name, forbidden)
    idle = qf.monitor()  # made, never entered
    _calls()
    api.context_parallel_attn(*make_qkv(1, 8, 8, 2, 1, 16), backend="tiled")
    assert reads == [] and len(idle) == 0 and idle.records == []
    monkeypatch.undo()
    monkeypatch.setattr(time, "perf_counter", lambda: reads.append(1) or real())
    with qf.monitor() as m:  # the same calls monitored: the counter does count
        _calls()
    assert len(m) == 3 and len(reads) >= 6


# --------------------------------------------------------------------------------------------
# QWEN3VL_FLASH_MONITOR
# --------------------------------------------------------------------------------------------


def test_env_monitor_prints_summary_at_exit(tmp_path):
    code = ("import torch, qwen3vl_flash as qf\n"
            "q = torch.randn(1, 8, 2, 16)\n"
            "qf.flash_attn_func(q, q, q, backend='tiled'); qf.flash_attn_func(q, q, q, backend='eager')\n"
            "print('done')\n")
    env = dict(os.environ, QWEN3VL_FLASH_MONITOR="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "done"
    err = res.stderr
    assert "qwen3vl_flash monitor: 2 attention calls" in err, err
    rows = {tuple(line.split()[:3]) for line in err.splitlines()}
    assert ("flash_attn_func", "tiled", "1") in rows and ("flash_attn_func", "eager", "1") in rows, err


def test_env_monitor_values(monkeypatch):
    mod = sys.modules["qwen3vl_flash.monitor"]  # qwen3vl_flash.monitor, the attribute, is the function
    monkeypatch.setenv("QWEN3VL_FLASH_MONITOR", "maybe")
    with pytest.raises(ValueError, match="QWEN3VL_FLASH_MONITOR must be 0, 1 or sync, got 'maybe'"):
        _start_from_env()
    monkeypatch.setenv("QWEN3VL_FLASH_MONITOR", "0")
    monkeypatch.setattr(mod, "_PROCESS_MONITOR", None)
    _start_from_env()
    assert mod._PROCESS_MONITOR is None and not _ACTIVE
    monkeypatch.setenv("QWEN3VL_FLASH_MONITOR", "sync")
    registered = []
    monkeypatch.setattr(mod.atexit, "register", registered.append)
    _start_from_env()
    pm = mod._PROCESS_MONITOR
    try:
        assert isinstance(pm, Monitor) and pm.sync and pm.active and registered == [mod._print_process_summary]
        q = randn(1, 8, 2, 16)
        qf.flash_attn_func(q, q, q, backend="eager")
        assert len(pm) == 1 and pm.records == []  # the process monitor keeps aggregates only
        assert "flash_attn_func  eager" in pm.summary()
    finally:
        pm.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# the transformers integration: every text and vision layer's call, labelled
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from qwen3vl_flash.testing import tiny

    cfg = tiny.tiny_config(layers=3, vision_depth=2)
    model = qf.enable(tiny.build_model(cfg, "sdpa", seed=int(torch.randint(0, 2**30, (1,)))))
    return cfg, model


def test_tiny_qwen3vl_generate_records_every_layer(tiny_model):
    from qwen3vl_flash.testing import tiny

    cfg, model = tiny_model
    batch = tiny.make_batch(cfg, seed=int(torch.randint(0, 2**30, (1,))))  # images + a video, left-padded
    new = 3
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
    with torch.no_grad():
        plain = model.generate(**batch, **kw)
        with qf.monitor(model=model) as m:
            seen = model.generate(**batch, **kw)
    assert torch.equal(plain, seen)
    text_layers = list(range(cfg.text_config.num_hidden_layers))
    vision_layers = list(range(cfg.vision_config.depth))
    towers = 2  # the images and the video go through the vision tower separately
    by_kind = {}
    for r in m.records:
        by_kind.setdefault(r.kind, []).append(r)
    assert set(by_kind) == {"vision", "text.prefill", "text.decode"}, set(by_kind)
    assert [r.layer for r in by_kind["vision"]] == vision_layers * towers
    assert [r.layer for r in by_kind["text.prefill"]] == text_layers
    assert [r.layer for r in by_kind["text.decode"]] == text_layers * (new - 1)
    for r in by_kind["vision"]:  # one varlen call over the frames / images per layer
        assert r.function == "flash_attn_varlen_func" and r.shapes[0][1:] == (cfg.vision_config.num_heads, 8)
    assert all(r.function == "flash_attn_with_kvcache" and r.shapes[0][1] == 1 for r in by_kind["text.decode"])
    for r in m.records:  # what auto serves calls of these shapes with (dense, or varlen for packed rows)
        q, k = torch.empty(r.shapes[0]), torch.empty(r.shapes[1])
        assert r.backend in {_auto_choice(q, k), _auto_choice(q, k, varlen=q.dim() == 3)}
        assert r.dtype == "float32" and r.device == "cpu"
    text = m.summary()
    for kind in ("vision", "text.prefill", "text.decode"):
        assert f"\n{kind} " in text
    print(text)


def test_tiny_qwen3vl_without_model_has_no_vision_index_and_packed_rows_are_labelled(tiny_model):
    transformers = pytest.importorskip("transformers")
    from qwen3vl_flash.testing import tiny

    cfg, model = tiny_model
    lens = [5, 9, 3]
    feats = [{"input_ids": torch.randint(tiny.FIRST_TEXT_TOKEN, cfg.text_config.vocab_size, (n,)).tolist()}
             for n in lens]
    packed = transformers.DataCollatorWithFlattening()(feats)
    packed.pop("labels", None)
    with torch.no_grad(), qf.monitor() as m:
        model(**packed)
    assert [(r.kind, r.layer, r.function) for r in m.records] == [
        ("text.packed", i, "flash_attn_varlen_func") for i in range(cfg.text_config.num_hidden_layers)]
    batch = tiny.make_batch(cfg, seed=0)
    with torch.no_grad(), qf.monitor() as m:
        model(**batch)
    vision = [r for r in m.records if r.kind == "vision"]
    assert vision and all(r.layer is None for r in vision)  # no model=: transformers' vision attention has no index


def test_demo_monitor_prints_the_summary(capsys):
    pytest.importorskip("transformers")
    from qwen3vl_flash.cli.main import main

    assert main(["demo", "--max-new-tokens", "3", "--monitor"]) == 0
    out = capsys.readouterr().out
    assert "tokens identical : yes" in out
    summary = out[out.index("qwen3vl_flash monitor:"):]
    rows = {line.split()[0]: int(line.split()[2]) for line in summary.splitlines()[3:]
            if line and not line.startswith("-") and line.split()[0] != "total"}
    # the demo model: 2 text layers, 2 vision layers, an image and a video (two tower calls), 3 new tokens
    assert rows == {"vision": 4, "text.prefill": 2, "text.decode": 4}, summary
