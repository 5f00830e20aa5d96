"""The command line: info describes the machine, bench writes a CSV (and plots) that match its runs."""

import csv

import pytest

from qwen3vl_flash.benchmarking import FIELDS
from qwen3vl_flash.cli.main import main


def test_info_names_profile_and_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "profile" in text and ("generic-cpu" in text or "i5-10210u" in text)
    for name in ("tiled", "sdpa", "eager", "triton"):
        assert f"  {name}" in text


def test_info_with_named_profile(capsys):
    assert main(["info", "--profile", "sm61"]) == 0
    assert "sm61" in capsys.readouterr().out


def test_info_unknown_profile_is_a_clear_error(capsys):
    assert main(["info", "--profile", "nope"]) == 2
    assert "profile 'nope' is unknown" in capsys.readouterr().err


def test_bench_writes_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "b"
    rc = main([
        "bench", "--seqlens", "64,128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
        "--dtype", "float32", "--backends", "tiled,sdpa,eager", "--repeats", "1", "--out", str(out),
    ])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert tuple(rows[0]) == FIELDS  # the benchmark schema, as benchmarks/results/*.csv
    assert {(r["provider"], int(r["x"])) for r in rows} == {
        (b, s) for b in ("tiled", "sdpa", "eager") for s in (64, 128)
    }
    assert all(r["bench"] == "cli" and r["x_name"] == "S" and r["mode"] == "fwd" for r in rows)
    assert all(0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in rows)
    assert all(float(r["memory_mb"]) >= 0 and float(r["rate"]) > 0 and r["date"] and r["torch"] for r in rows)
    pytest.importorskip("matplotlib")
    assert (out / "bench_time.png").stat().st_size > 1000
    assert (out / "bench_memory.png").stat().st_size > 1000


def test_bench_rejects_bad_heads(capsys):
    assert main(["bench", "--heads", "6", "--kv-heads", "4", "--seqlens", "16", "--out", "/tmp/x"]) == 2
    assert "--heads (6) must be a multiple of --kv-heads (4)" in capsys.readouterr().err


def test_demo_through_the_cli_agrees_with_sdpa(capsys):
    pytest.importorskip("transformers")
    assert main(["demo"]) == 0
    text = capsys.readouterr().out
    assert "tokens identical : yes" in text
