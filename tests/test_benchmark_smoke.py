"""The shared benchmark runner (``qwen3vl_flash.benchmarking``: the row schema, the environment
record, the FLOP count, the CSV writer) and the benchmark scripts' CPU smoke modes (they are what
the GPU calls execute: a script broken by an API change would waste a device call). Tiny shapes;
no figure is checked here. The GPU check scripts' CPU modes are in ``tests/gpu/test_cpu_modes.py``."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_flash import benchmarking as bm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _run(args, timeout=300, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    env.update(env_extra or {})
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _load(rel):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path, bench):
    rows = list(csv.DictReader(open(path)))
    assert rows and tuple(rows[0]) == bm.FIELDS
    assert {r["bench"] for r in rows} == {bench}
    assert all(r["date"] and r["torch"] and r["device"] and r["run"] for r in rows)
    return rows


# ---- the shared runner ------------------------------------------------------------------------


def test_schema_columns():
    assert bm.FIELDS[:4] == ("bench", "case", "provider", "mode")
    for col in ("x_name", "x", "metric", "unit", "p20", "p50", "p80", "rate", "memory_mb", "status", "extra",
                "device", "world", "torch", "triton", "cudnn", "package", "date", "run"):
        assert col in bm.FIELDS
    assert set(bm.ENV_FIELDS) <= set(bm.FIELDS)


def test_env_row_keys_and_device_kind():
    env = bm.env_row("cpu")
    assert tuple(env) == bm.ENV_FIELDS
    assert env["torch"] and env["package"] and len(env["date"]) == 10 and "cores" in env["device"]
    assert bm.device_kind("cpu").startswith("cpu_") and bm.device_kind("cpu").endswith("core")
    assert bm.kind_of_name("NVIDIA H100 80GB HBM3") == "h100" and bm.kind_of_name("NVIDIA H200") == "h200"
    assert bm.kind_of_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert bm.kind_of_name("NVIDIA GeForce RTX 4090") == "rtx4090"


def test_attention_flops():
    assert bm.attention_flops(1, 32, 4096, 4096, 128, causal=False) == 4 * 32 * 4096 * 4096 * 128
    causal = bm.attention_flops(2, 32, 4096, 4096, 128, causal=True)
    assert causal == 2 * 32 * 4096 * 4096 * 128 * 2  # halved for causal, B=2
    assert bm.attention_flops(2, 32, 4096, 4096, 128, True, "fwd+bwd") == 2.5 * causal
    assert bm.attention_flops(2, 32, 4096, 4096, 128, True, "fwd_bwd") == 2.5 * causal
    assert bm.attention_flops(2, 32, 4096, 4096, 128, True, "bwd") == 1.5 * causal
    with pytest.raises(ValueError, match="mode"):
        bm.attention_flops(1, 1, 1, 1, 1, False, "backward")
    assert bm.tflops(1e12, 1000.0) == pytest.approx(1.0) and bm.tflops(1e12, float("nan")) != bm.tflops(1e12, 1.0)


def test_recorder_appends_one_schema(tmp_path):
    path = tmp_path / "t.csv"
    rec = bm.Recorder("unit", str(path), device="cpu", echo=False, world=2)
    rec.add(case="c", provider="p", mode="fwd", x_name="S", x=64, p20=1.0, p50=2.0, p80=3.0, rate=float("nan"),
            extra=bm.extra(tile="64x64w4s3", err=1e-3))
    bm.Recorder("unit", str(path), device="cpu", echo=False).add(case="c", provider="q", metric="check", unit="")
    rows = _rows(path, "unit")
    assert [r["provider"] for r in rows] == ["p", "q"] and rows[0]["world"] == "2" and rows[1]["world"] == "1"
    assert rows[0]["p50"] == "2" and rows[0]["rate"] == "" and rows[0]["run"].startswith("unit@")
    assert bm.parse_extra(rows[0]["extra"]) == {"tile": "64x64w4s3", "err": "0.001"}
    assert [r["provider"] for r in bm.read_rows(str(path), provider=("q", "z"))] == ["q"]
    with pytest.raises(ValueError, match="not columns"):
        bm.append_rows(str(path), [{"nope": 1}])
    with pytest.raises(TypeError):
        rec.add(case="c", provider="p", nope=1)
    old = tmp_path / "old.csv"
    old.write_text("op,ms\nx,1\n")
    with pytest.raises(ValueError, match="header"):
        bm.append_rows(str(old), rows)
    assert bm.quantiles([3.0, 1.0, 2.0])[1] == 2.0 and bm.tile_str(bm.tiles((64, 32, 4, 2))[0]) == "64x32w4s2"


def test_results_tables_hold_the_docs_rows():
    """One schema in every table; the H200 16k causal forward that docs/performance.md points to."""
    for name in ("h100.csv", "h200.csv", "cpu_2core.csv"):
        with open(RESULTS / name, newline="") as f:
            assert tuple(next(csv.reader(f))) == bm.FIELDS, name
    rows = bm.read_rows(str(RESULTS / "h200.csv"), bench="experiments/exp_gqa_1gpu", case="text causal 32/8 hd128 B=1",
                        mode="fwd", metric="time", x="16384")
    quoted = {r["provider"]: float(r["rate"]) for r in rows if r["run"] == "exp_gqa_1gpu_h200_2026-11-26"}
    assert quoted == {"auto": 621.6, "cudnn": 600.9, "triton": 496.0}  # DESIGN.md 5a, docs/performance.md
    assert all(r["device"] == "NVIDIA H200" and r["date"] and r["torch"] for r in rows)
    assert (RESULTS / "archive" / "exp_gqa_1gpu_h200_2026-11-26.csv").exists()


# ---- the scripts' smoke modes -----------------------------------------------------------------


def test_bench_cpu_smoke(tmp_path):
    out = _run([sys.executable, "benchmarks/bench_cpu.py", "--smoke", "--csv", str(tmp_path / "cpu.csv")])
    rows = _rows(tmp_path / "cpu.csv", "bench_cpu")
    assert {(r["provider"], r["x"]) for r in rows} >= {("torch_sdpa", "64"), ("tiled", "128")} and "auto/sdpa" in out


def test_bench_gpu_smoke_text(tmp_path):
    pytest.importorskip("triton")
    _run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--skip", "check,vision", "--csv",
          str(tmp_path / "g.csv")])
    rows = _rows(tmp_path / "g.csv", "bench_gpu")
    assert {(r["provider"], r["mode"], r["extra"]) for r in rows} == {
        ("triton", m, "tile=32x32w4s1") for m in ("fwd", "fwd+bwd")}


def test_bench_decode_schema_rows():
    """The decode script's rows (in process, no kernel run: its smoke mode takes minutes in the
    interpreter) -> one schema row per measured quantity."""
    pytest.importorskip("triton")
    mod = _load("benchmarks/bench_decode.py")
    r = dict(case="B1-L4k", provider="triton", mode="split-kv", B=1, L_max=4096, L_sum=4096, kv_bytes=16, us_p20=1.0,
             us_p50=2.0, us_p80=3.0, tbps=0.5, graph_us=1.5, graph_tbps=0.7, host_us=30.0, max_err=1e-4,
             torch_err=1e-3, ok=True, note="")
    rows = mod.schema_rows(r, "bfloat16")
    assert [(x["metric"], x["p50"], x["rate"]) for x in rows] == [
        ("time", 2.0, 0.5), ("graph time", 1.5, 0.7), ("host time", 30.0, "")]
    assert all(x["x"] == 4096 and x["unit"] == "us" and x["status"] == "ok" for x in rows)
    failed = mod.schema_rows(dict(r, ok="False", graph_us="nan", host_us=""), "bfloat16")
    assert [x["metric"] for x in failed] == ["time"] and failed[0]["status"] == "FAILED"


def test_exp_fwd_variants_smoke(tmp_path):
    pytest.importorskip("triton")
    out = _run([sys.executable, "benchmarks/experiments/exp_fwd_variants.py", "--smoke", "--out", str(tmp_path)])
    assert "0 rows failed" in out
    rows = _rows(tmp_path / "smoke_exp_fwd_variants.csv", "experiments/exp_fwd_variants")
    assert {r["provider"] for r in rows} >= {"exp", "exp+fma", "exp+tma"} and {r["status"] for r in rows} == {"ok"}


def test_bench_e2e_smoke(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "e2e.csv"
    out = _run([sys.executable, "benchmarks/bench_e2e.py", "--smoke", "--cases", "vision-video,decode-static-4k",
                "--csv", str(path)])
    rows = _rows(path, "bench_e2e")
    assert "decode-static-4k" in out and {r["metric"] for r in rows} == {"wall time", "attention time"}


def test_bench_cp_cpu_smoke(tmp_path):
    """Two gloo processes: the correctness check, timing rows and the longest-length search."""
    path = tmp_path / "cp.csv"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "benchmarks/bench_cp.py",
                "--device", "cpu", "--seqlens", "256", "--dtype", "float32", "--backend", "tiled", "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--warmup", "0", "--iters", "1", "--kernels", "auto",
                "--check-len", "128", "--no-mha", "--max-len", "--max-len-fit", "--max-len-modes", "ring,1gpu:tiled",
                "--len-step", "32", "--len-limit", "256", "--profile-len", "64",
                "--csv", str(path)], env_extra={"OMP_NUM_THREADS": "1"})
    assert "profile ring/auto S=64" in out and "profile 1gpu S=64" in out
    assert "ring      auto" in out and "ok" in out and "longest fwd+bwd that fits" in out
    # synthetic CPU memory (1 KB per token, 1 MB usable): predicted 1024 tokens, 972 checked
    assert "1gpu: predicted longest 1,024 tokens" in out and "ring: predicted longest 1,024 tokens" in out
    assert "1gpu:tiled: predicted longest" in out
    rows = _rows(path, "bench_cp")
    assert {r["metric"] for r in rows} == {"check", "time", "max length"}
    assert {r["world"] for r in rows if r["provider"] == "ours-ring"} == {"2"}


def test_bench_cp_model_max_len_cpu_smoke(tmp_path):
    """The model-level longest-sequence fit (the text decoder, one process vs context-parallel)."""
    pytest.importorskip("transformers")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "benchmarks/bench_cp.py",
                "--device", "cpu", "--seqlens", "", "--dtype", "float32", "--check-len", "0", "--no-mha",
                "--max-len-fit", "--model", "tiny", "--model-layers", "1", "--len-step", "16",
                "--csv", str(tmp_path / "cp.csv")], env_extra={"OMP_NUM_THREADS": "1"})
    assert "model-1gpu: predicted longest 1,024 tokens" in out and "model-cp: predicted longest 1,024" in out
    assert "model-cp: 1.00x the one-GPU length (model-1gpu, predicted)" in out


def test_bench_cp_max_len_prediction():
    """The least-squares line through measured peaks, solved for the usable memory."""
    mod = _load("benchmarks/bench_cp.py")
    xs = [1000.0, 2000.0, 4000.0]
    assert mod.predict_max_len(xs, [5e6 + 3e3 * x for x in xs], 80e6) == pytest.approx(25000.0)
    assert mod.predict_max_len(xs, [7.0, 7.0, 7.0], 80e6) == 0.0  # no growth: nothing to predict


def test_plot_draws_the_docs_figures_from_the_tables(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = _load("benchmarks/plot.py")
    assert plot.main(["--img", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"cpu_text8b_time.png", "cpu_text8b_memory.png", "kernels_h100.png", "cp_2xh100.png"}
    assert all(p.stat().st_size > 10_000 for p in tmp_path.iterdir())
    assert plot.main([str(RESULTS / "h200.csv"), "--bench", "experiments/exp_gqa_1gpu", "--case",
                      "text causal 32/8 hd128 B=1", "--metric", "time", "--run", "exp_gqa_1gpu_h200_2026-11-26",
                      "--y", "rate", "--panel", "mode", "--out", str(tmp_path / "slice.png")]) == 0
    assert (tmp_path / "slice.png").stat().st_size > 10_000 and "(18 rows)" in capsys.readouterr().out
