"""``qf.tune()`` / ``qwen3vl-flash tune`` and the tuned profiles ``auto`` loads.

A real (tiny) tune checks the file and its schema; where a decision is tested, the timings are
injected (``fake_timings``), because which backend wins on a shared CI machine is noise."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import sys

import pytest
import torch
from conftest import assert_close_to_ref, make_qkv, reference_triplet

import qwen3vl_flash as qf
from qwen3vl_flash.backends.base import AttnRequest, get_backend
from qwen3vl_flash.cli.main import build_parser, main
from qwen3vl_flash.hardware import profiles as P
from qwen3vl_flash.hardware import tuning as T
from qwen3vl_flash.interface import choose_backend

CPU = torch.device("cpu")
TINY_SHAPES = (
    T.ShapeClass("text", 4, 2, 16, causal=True),
    T.ShapeClass("vision", 2, 2, 8, causal=False, varlen=True, segment=24),
)
TINY_LENGTHS = (40, 64)
TINY_BLOCKS = ((16, 32), (32, 16))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory, tiny shapes for --quick, no profile overrides."""
    monkeypatch.setenv(T.ENV_CACHE_DIR, str(tmp_path))
    for name in (T.ENV_TUNED, P.ENV_PROFILE, "QWEN3VL_FLASH_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(T, "QUICK_SHAPES", TINY_SHAPES)
    monkeypatch.setattr(T, "QUICK_LENGTHS", {"cpu": TINY_LENGTHS})
    monkeypatch.setattr(T, "QUICK_TILED_BLOCKS", TINY_BLOCKS)
    monkeypatch.setattr(T, "QUICK_REPEATS", 2)
    P.reset_profile_cache()
    yield tmp_path
    P.reset_profile_cache()


def _fake_ms(case, cand) -> float:
    """fp32: tiled at 16x32 fastest (the shipped CPU order says sdpa); bf16: tiled 32x16 wins the
    forward by 1.2x, sdpa wins forward+backward by 2x, so the order over both modes is sdpa's."""
    if case.dtype == "float32":
        return {"sdpa": 2.0, "tiled 16x32": 1.0, "tiled 32x16": 1.5}[cand.name]
    if case.mode == "fwd":
        return {"sdpa": 1.2, "tiled 16x32": 3.0, "tiled 32x16": 1.0}[cand.name]
    return {"sdpa": 1.0, "tiled 16x32": 6.0, "tiled 32x16": 2.0}[cand.name]


@pytest.fixture
def fake_timings(cache, monkeypatch):
    """tune() with the timings of :func:`_fake_ms` instead of measured ones (same ticks)."""

    def measure(case, cands, base, device, repeats, tick):
        for _ in range((repeats + 1) * len(cands)):
            tick(case.label())
        return {c: [_fake_ms(case, c) * (1 + 0.01 * r) for r in range(repeats)] for c in cands}

    monkeypatch.setattr(T, "_measure_case", measure)
    return cache


def _base_name() -> str:
    return P._profile_for(qf.detect_hardware(CPU)).name


def _request(dtype, need_grad=False, S=512):
    return AttnRequest(device_type="cpu", dtype=dtype, head_dim=128, num_heads=32, num_kv_heads=8, seqlen_q=S,
                       seqlen_k=S, causal=True, need_grad=need_grad)


def _params(prof):
    from qwen3vl_flash.backends.base import AttnParams

    return AttnParams(1.0, profile=prof)


def _tuned_file(cache) -> str:
    tuned = qf.tune(device="cpu", quick=True, progress=False)
    return tuned.source


def _write(path, text) -> None:
    with open(path, "w") as f:
        f.write(text)


def _edit(path, fn) -> None:
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)
    P.reset_profile_cache()


# --------------------------------------------------------------------------------------------
# a real run writes a valid file
# --------------------------------------------------------------------------------------------


def test_tiny_tune_writes_valid_json(cache):
    tuned = qf.tune(device="cpu", quick=True, progress=False)
    path = T.tuned_path("cpu")
    assert tuned.source == path == os.path.join(str(cache), "tuned-cpu.json")
    with open(path) as f:
        data = json.load(f)
    assert data["schema"] == T.SCHEMA_VERSION and "source" not in data
    assert T.read_tuned(path) == tuned  # every field survives the round trip, typed
    assert tuned.fingerprint == T.fingerprint(qf.detect_hardware(CPU))
    assert tuned.versions == T.current_versions() and tuned.versions.torch == torch.__version__
    assert tuned.tool_version == qf.__version__ and tuned.device_kind == "cpu" and tuned.quick
    datetime.datetime.fromisoformat(tuned.date)
    # every candidate of every call shape was timed, QUICK_REPEATS times, interleaved
    cases = {(d, m, s.name, n) for d in ("float32", "bfloat16") for m in T.MODES for s in TINY_SHAPES
             for n in TINY_LENGTHS}
    cands = {"sdpa", "tiled 16x32", "tiled 32x16"}
    got = {(m.dtype, m.mode, m.shape, m.seqlen, m.candidate) for m in tuned.measurements}
    assert got == {c + (x,) for c in cases for x in cands}
    for m in tuned.measurements:
        assert m.status == "ok", m.error
        assert 1 <= len(m.times_ms) <= 2 and all(t > 0 for t in m.times_ms)  # 1: pruned (far behind)
    # one winner per (dtype, mode, shape, bucket), the fastest of its measurements
    assert {(w.dtype, w.mode, w.shape, w.bucket) for w in tuned.winners} == cases
    for w in tuned.winners:
        times = [m.median_ms for m in tuned.measurements if (m.dtype, m.mode, m.shape, m.seqlen) ==
                 (w.dtype, w.mode, w.shape, w.bucket)]
        assert w.median_ms == min(times) and set(w.order) == {"sdpa", "tiled"}
    assert set(tuned.auto_order) == {"float32", "bfloat16"}
    # auto now runs with the tuned profile, and its results are still right
    prof = P.profile_for_device(CPU)
    assert prof.name == f"{_base_name()}+tuned"
    q, k, v = make_qkv(1, 300, 300, 4, 2, 32)
    ref, low = reference_triplet(q, k, v, causal=True)
    assert_close_to_ref(qf.flash_attn_func(q, k, v, causal=True), ref["out"], low["out"])


def test_candidates_are_interleaved_pruned_and_failures_kept(monkeypatch):
    """Round-robin with a rotating start; a candidate far behind twice sits out; one that raises
    is kept with its error; every call ticks the progress bar."""
    import time

    calls = []

    def runner(case, cand, base, device):
        def run():
            calls.append(cand.name)
            if cand.backend == "eager":
                raise RuntimeError("no such kernel")
            # 20x behind the others: pruned; the others are within 3x of each other, unless two
            # of their calls in a row are held up by 10 ms more than the sleep
            time.sleep(0.1 if cand.block_m == 2 else 0.005)
        return run

    monkeypatch.setattr(T, "_runner", runner)
    cands = [T._Candidate("sdpa"), T._Candidate("tiled", 1, 1), T._Candidate("tiled", 2, 2), T._Candidate("eager")]
    case = T._Case("float32", "fwd", TINY_SHAPES[0], 8)
    ticks = []
    got = T._measure_case(case, cands, None, CPU, 3, ticks.append)
    assert len(ticks) == 4 * 4
    assert isinstance(got[cands[3]], RuntimeError)
    assert len(got[cands[0]]) == len(got[cands[1]]) == 3 and len(got[cands[2]]) == 1
    # warm-ups in order, then rounds starting at candidate 0, 1, 2 (skipping the failed and the pruned)
    assert calls == ["sdpa", "tiled 1x1", "tiled 2x2", "eager",
                     "sdpa", "tiled 1x1", "tiled 2x2",
                     "tiled 1x1", "sdpa",
                     "sdpa", "tiled 1x1"]


# --------------------------------------------------------------------------------------------
# auto uses it (decisions tested on injected timings)
# --------------------------------------------------------------------------------------------


def test_auto_uses_the_tuned_order_and_tiles(fake_timings, monkeypatch):
    shipped = P.profile_for_device(CPU)
    assert shipped is P.PROFILES[_base_name()]
    assert choose_backend(_request(torch.float32), "auto", shipped)[0].name == "sdpa"  # what tuning changes
    tuned = qf.tune(device="cpu", quick=True, progress=False)
    assert tuned.auto_order["float32"][0] == "tiled" and tuned.auto_order["bfloat16"][0] == "sdpa"
    assert tuned.mode_orders["fwd"]["bfloat16"][0] == "tiled"
    assert tuned.mode_orders["fwd+bwd"]["bfloat16"][0] == "sdpa"
    assert tuned.tiled_blocks == {"float32": (16, 32), "bfloat16": (32, 16)}
    # over every dtype and mode 32x16 is at most 1.5x from the best, 16x32 up to 3x
    assert (tuned.block_m, tuned.block_n) == (32, 16)

    prof = P.profile_for_device(CPU)
    assert prof.name == f"{shipped.name}+tuned" and qf.select_profile().name == prof.name
    assert P.profile_for_device(CPU) is prof  # one object per process
    assert (prof.block_m, prof.block_n) == (32, 16) and prof.tiled_blocks == tuned.tiled_blocks
    assert prof.mode_orders["fwd"]["bfloat16"][0] == "tiled"
    assert prof.auto_order["default"] == shipped.auto_order["default"]  # dtypes not tuned: shipped
    assert choose_backend(_request(torch.float32), "auto", prof)[0].name == "tiled"
    # bf16: tiled won the forward, sdpa forward+backward: each mode gets its own order
    assert choose_backend(_request(torch.bfloat16), "auto", prof)[0].name == "tiled"
    assert choose_backend(_request(torch.bfloat16, need_grad=True), "auto", prof)[0].name == "sdpa"
    assert prof.auto_order["float32"][-1] == "eager"  # the shipped tail stays

    # a real auto call goes to tiled, with the tuned tiles
    tiled = get_backend("tiled")
    seen = []
    orig = tiled.forward

    def spy(q, k, v, p):
        seen.append((p.profile.name, p.profile.block_m, p.profile.block_n))
        return orig(q, k, v, p)

    monkeypatch.setattr(tiled, "forward", spy)
    q, k, v = make_qkv(1, 300, 300, 4, 2, 32)
    out = qf.flash_attn_func(q, k, v, causal=True)
    assert seen == [(prof.name, 32, 16)]
    assert tiled._blocks(_params(prof), 32, torch.float32) == (16, 32)  # the tuned blocks of the dtype
    assert tiled._blocks(_params(prof), 32, torch.bfloat16) == (32, 16)
    ref, low = reference_triplet(q, k, v, causal=True)
    assert_close_to_ref(out, ref["out"], low["out"])

    # QWEN3VL_FLASH_TUNED=0: the shipped profile again, without a reset
    monkeypatch.setenv(T.ENV_TUNED, "0")
    assert P.profile_for_device(CPU) is shipped and qf.select_profile() is shipped
    assert T.tuned_status().state == "disabled"


def test_ties_keep_the_shipped_order(fake_timings, monkeypatch):
    """Timings within TIE of each other are noise: the shipped order (sdpa first on CPU) stays."""
    def measure(case, cands, base, device, repeats, tick):
        for _ in range((repeats + 1) * len(cands)):
            tick(case.label())
        return {c: [1.0 if c.backend == "sdpa" else 0.99] * repeats for c in cands}

    monkeypatch.setattr(T, "_measure_case", measure)
    tuned = qf.tune(device="cpu", quick=True, progress=False)
    shipped = P.PROFILES[_base_name()].auto_order["default"]
    assert tuned.auto_order["float32"][:2] == shipped[:2]
    assert (tuned.block_m, tuned.block_n) == TINY_BLOCKS[0]  # tied tiles: the first candidate


def test_file_read_once_per_process(fake_timings, monkeypatch):
    _tuned_file(fake_timings)
    calls = []
    orig = T.read_tuned
    monkeypatch.setattr(T, "read_tuned", lambda path: calls.append(path) or orig(path))
    for _ in range(3):
        P.profile_for_device(CPU)
        qf.select_profile()
        qf.flash_attn_func(*make_qkv(1, 8, 8, 2, 1, 16))
    assert len(calls) == 1


def test_out_elsewhere_is_used_only_when_named(fake_timings, tmp_path, monkeypatch):
    out = str(tmp_path / "elsewhere" / "mine.json")
    tuned = qf.tune(device="cpu", quick=True, progress=False, out=out)
    assert tuned.source == out and os.path.exists(out) and not os.path.exists(T.tuned_path("cpu"))
    assert P.profile_for_device(CPU).name == _base_name()
    monkeypatch.setenv(T.ENV_TUNED, out)
    assert P.profile_for_device(CPU).name == f"{_base_name()}+tuned"


# --------------------------------------------------------------------------------------------
# a file that does not apply: ignored, with one warning
# --------------------------------------------------------------------------------------------


def _set_fingerprint_name(d):
    d["fingerprint"]["name"] = "Some Other CPU"


def _set_torch(d):
    d["versions"]["torch"] = "0.0.1"


def _set_package(d):
    d["versions"]["package"] = "0.0.0"


def _set_isa_env(d):
    d["fingerprint"]["isa_env"] = [["ONEDNN_MAX_CPU_ISA", "SSE41"]]


@pytest.mark.parametrize("edit, reason", [
    (_set_fingerprint_name, "measured on Some Other CPU"),
    (_set_isa_env, "ONEDNN_MAX_CPU_ISA=SSE41"),
    (_set_torch, "measured with torch 0.0.1"),
    (_set_package, "measured with package 0.0.0"),
])
def test_mismatch_is_ignored_with_one_warning(fake_timings, caplog, edit, reason):
    path = _tuned_file(fake_timings)
    _edit(path, edit)
    with caplog.at_level(logging.WARNING, logger="qwen3vl_flash"):
        assert P.profile_for_device(CPU) is P.PROFILES[_base_name()]
        assert qf.select_profile() is P.PROFILES[_base_name()]
        P.reset_profile_cache()
        P.profile_for_device(CPU)  # read again: still one warning
    warned = [r.getMessage() for r in caplog.records if "tuned profile" in r.getMessage()]
    assert len(warned) == 1 and path in warned[0] and reason in warned[0], warned
    status = T.tuned_status()
    assert status.state == "ignored" and reason in status.reason


@pytest.mark.parametrize("corrupt, reason", [
    (lambda p: _write(p, "{not json"), "not JSON"),
    (lambda p: _write(p, "[]"), "expected an object"),
    (lambda p: _edit(p, lambda d: d.update(auto_ordr=d.pop("auto_order"))), "auto_ordr"),
    (lambda p: _edit(p, lambda d: d.update(schema=99)), "TunedProfile.schema"),
    (lambda p: _edit(p, lambda d: d["measurements"][0].update(mode="sideways")), "Measurement.mode"),
    (lambda p: _edit(p, lambda d: d["auto_order"].update(float32=["sdpa", "warp-drive"])), "auto_order"),
    (lambda p: _edit(p, lambda d: d.update(block_m="256")), "block_m"),
])
def test_corrupt_file_is_ignored_with_a_warning(fake_timings, caplog, corrupt, reason):
    path = _tuned_file(fake_timings)
    corrupt(path)
    P.reset_profile_cache()
    with caplog.at_level(logging.WARNING, logger="qwen3vl_flash"):
        prof = P.profile_for_device(CPU)
    assert prof is P.PROFILES[_base_name()]
    warned = [r.getMessage() for r in caplog.records if "tuned profile" in r.getMessage()]
    assert len(warned) == 1 and path in warned[0] and reason in warned[0], warned
    with pytest.raises((ValueError, TypeError), match=reason):
        T.read_tuned(path)


def test_schema_types_fail_loudly():
    with pytest.raises(ValueError, match="Measurement.dtype"):
        T.Measurement(dtype="float8", mode="fwd", shape="text", seqlen=8, backend="sdpa", times_ms=(1.0,),
                      median_ms=1.0)
    with pytest.raises(ValueError, match="median_ms"):
        T.Measurement(dtype="float32", mode="fwd", shape="text", seqlen=8, backend="sdpa", times_ms=(1.0, 3.0),
                      median_ms=1.0)
    with pytest.raises(ValueError, match="ShapeClass.num_kv_heads"):
        T.ShapeClass("text", 6, 4, 128, causal=True)
    with pytest.raises(TypeError, match="tiled_blocks"):
        P.PROFILES["generic-cpu"].replace(tiled_blocks={"float32": [256, 256]})


# --------------------------------------------------------------------------------------------
# where it goes; the command line
# --------------------------------------------------------------------------------------------


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(T.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert T.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv(T.ENV_CACHE_DIR)
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # not installed: the plain fallback, no error
    assert T.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "qwen3vl-flash")


def test_bad_device_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="device must be"):
        qf.tune(device="tpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            qf.tune(device="cuda", progress=False)


def test_info_prints_the_tuned_profile_in_use(fake_timings, capsys, monkeypatch):
    assert main(["info", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "tuned     : none (no " in text and T.tuned_path("cpu") in text
    path = _tuned_file(fake_timings)
    assert main(["info", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"tuned     : {path} (measured" in text and f"{_base_name()}+tuned" in text
    assert re.search(r"float32\s+inference\s+-> tiled", text)  # auto's chain, from the tuned order
    monkeypatch.setenv(T.ENV_TUNED, "off")
    assert main(["info", "--device", "cpu"]) == 0
    assert "tuned     : none: disabled by QWEN3VL_FLASH_TUNED=off" in capsys.readouterr().out


def test_cli_tune_show_writes_table_and_png(fake_timings, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t" / "tuned.json"
    assert main(["tune", "--quick", "--show", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "winner" in text and "tiled 16x32" in text and f"tuned profile: {out}" in text
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert T.read_tuned(str(out)).quick


def test_progress_without_tqdm_prints_lines(fake_timings, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    qf.tune(device="cpu", quick=True, progress=True)
    err = capsys.readouterr().err
    total = 2 * 2 * len(TINY_SHAPES) * len(TINY_LENGTHS) * 3 * (T.QUICK_REPEATS + 1)
    assert f"tune: {total}/{total} calls (100%)" in err and err.count("tune: ") <= 11


def test_cli_parses():
    args = build_parser().parse_args(["tune", "--quick", "--show", "--device", "cpu", "--out", "p.json",
                                      "--no-progress"])
    assert (args.quick, args.show, args.device, args.out, args.no_progress) == (True, True, "cpu", "p.json", True)
    args = build_parser().parse_args(["tune"])
    assert (args.quick, args.show, args.device, args.out) == (False, False, None, None)
    from qwen3vl_flash.cli import tune as tune_cli

    assert args.func is tune_cli.main


def test_to_tile_profile_is_a_replace_of_the_shipped_one(fake_timings):
    tuned = qf.tune(device="cpu", quick=True, progress=False)
    base = P.PROFILES[_base_name()]
    prof = tuned.to_tile_profile(base)
    same = {f.name for f in dataclasses.fields(base)} - {"name", "auto_order", "block_m", "block_n", "mode_orders",
                                                         "tiled_blocks", "description"}
    assert all(getattr(prof, n) == getattr(base, n) for n in same)
    assert prof.tiled_min_seqlen == base.tiled_min_seqlen and prof.triton == base.triton


def test_plot_keeps_one_colour_per_candidate(tmp_path, monkeypatch):
    """The H100 quick tune of 2026-12-07 (no cudnn for the vision shapes): before, each panel cycled its own
    colours, so `tiled` took cudnn's colour wherever cudnn was missing."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tuned = T.read_tuned(os.path.join(root, "benchmarks", "results", "tuned_cuda_h100_2026-12-07.json"))
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    assert T.plot(tuned, str(tmp_path / "t.png")).startswith("plot:")
    colours = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert {"sdpa", "triton", "cudnn"} <= set(colours), colours
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)
