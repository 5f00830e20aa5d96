"""The benchmark scripts' CPU smoke modes still run (they are what the GPU calls execute: a script
broken by an API change would waste a device call). Tiny shapes; no figure is checked here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    env.update(env_extra or {})
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_exp_fwd_variants_smoke(tmp_path):
    pytest.importorskip("triton")
    out = _run([sys.executable, "benchmarks/exp_fwd_variants.py", "--smoke", "--out", str(tmp_path)])
    assert "0 rows failed" in out and (tmp_path / "exp_fwd_variants.csv").exists()


def test_bench_e2e_smoke(tmp_path):
    pytest.importorskip("transformers")
    csv = tmp_path / "e2e.csv"
    out = _run([sys.executable, "benchmarks/bench_e2e.py", "--smoke", "--cases", "vision-video,decode-static-4k",
                "--csv", str(csv)])
    assert "decode-static-4k" in out and csv.exists()


def test_bench_cp_cpu_smoke(tmp_path):
    """Two gloo processes: the correctness check, timing rows and the longest-length search."""
    csv = tmp_path / "cp.csv"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "benchmarks/bench_cp.py",
                "--device", "cpu", "--seqlens", "256", "--dtype", "float32", "--backend", "tiled", "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--warmup", "0", "--iters", "1", "--kernels", "auto",
                "--check-len", "128", "--no-mha", "--max-len", "--max-len-fit", "--max-len-modes", "ring,1gpu:tiled",
                "--len-step", "32", "--len-limit", "256", "--profile-len", "64",
                "--csv", str(csv)], env_extra={"OMP_NUM_THREADS": "1"})
    assert "profile ring/auto S=64" in out and "profile 1gpu S=64" in out
    assert "ring      auto" in out and "ok" in out and "longest fwd+bwd that fits" in out
    # synthetic CPU memory (1 KB per token, 1 MB usable): predicted 1024 tokens, 972 checked
    assert "1gpu: predicted longest 1,024 tokens" in out and "ring: predicted longest 1,024 tokens" in out
    assert "1gpu:tiled: predicted longest" in out
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("provider,") and len(rows) > 5


def test_bench_cp_model_max_len_cpu_smoke(tmp_path):
    """The model-level longest-sequence fit (the text decoder, one process vs context-parallel)."""
    pytest.importorskip("transformers")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "benchmarks/bench_cp.py",
                "--device", "cpu", "--seqlens", "", "--dtype", "float32", "--check-len", "0", "--no-mha",
                "--max-len-fit", "--model", "tiny", "--model-layers", "1", "--len-step", "16",
                "--csv", str(tmp_path / "cp.csv")], env_extra={"OMP_NUM_THREADS": "1"})
    assert "model-1gpu: predicted longest 1,024 tokens" in out and "model-cp: predicted longest 1,024" in out
    assert "model-cp: 1.00x the one-GPU length (model-1gpu, predicted)" in out


def test_plot_cp_from_committed_csv(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "cp.png"
    _run([sys.executable, "benchmarks/plot_cp.py", "benchmarks/results/cp_2xh100_2026-11-25_run2.csv", str(png)])
    assert png.stat().st_size > 10_000


def test_plot_kernels_from_committed_csv(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kernels.png"
    _run([sys.executable, "benchmarks/plot_kernels.py", "benchmarks/results/gpu_kernels_2026-11-25_text_run3.csv",
          str(png)])
    assert png.stat().st_size > 10_000


def test_bench_cp_max_len_prediction():
    """The least-squares line through measured peaks, solved for the usable memory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cp", ROOT / "benchmarks" / "bench_cp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    xs = [1000.0, 2000.0, 4000.0]
    assert mod.predict_max_len(xs, [5e6 + 3e3 * x for x in xs], 80e6) == pytest.approx(25000.0)
    assert mod.predict_max_len(xs, [7.0, 7.0, 7.0], 80e6) == 0.0  # no growth: nothing to predict


def test_check_generate_compile_cpu_smoke():
    """The GPU check of generate's StaticCache compile, in its CPU mode (eager compile backend)."""
    pytest.importorskip("transformers")
    out = _run([sys.executable, "benchmarks/check_generate_compile.py", "--device", "cpu", "--tokens", "4",
                "--repeats", "1", "--profile"])
    assert "tokens equal to sdpa: True" in out
    assert out.count("'unique_graphs': 1") == 2, out  # one compiled graph for every step, both
