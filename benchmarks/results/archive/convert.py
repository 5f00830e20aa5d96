"""One-off (2026-12-01): the archived result CSVs of the old layout, converted into the one table per
device kind (``benchmarks/results/h100.csv``, ``h200.csv``, ``cpu_2core.csv``; schema
``qwen3vl_flash.benchmarking.FIELDS``). Each converted row's ``run`` is the archived file's name
without ``.csv``, so ``archive/<run>.csv`` is its source. The files here are kept as they were.

Where an old file lacks a column (the experiments' CSVs have no device, torch or date; some no
triton or cuDNN), the device and date come from the file name and the rest stays empty; ``extra``
says so. The scripts that still write these shapes map their rows with the same functions
(``bench_decode.schema_rows``, ``bench_e2e.schema_rows``, ``bench_cp.schema_row``,
``experiments/exp_gqa_1gpu.schema_rows``, ``exp_cudnn_gqa.schema_rows``, ``exp_fwd_variants.schema_row``).

    PYTHONPATH=src python benchmarks/results/archive/convert.py [--force]

(``--force`` rewrites the converted rows and keeps the rows measured since, whose run is not an
archived file.)
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import sys
from collections import defaultdict

from qwen3vl_flash.benchmarking import FIELDS, Row, append_rows, extra, kind_of_name

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
BENCH = os.path.dirname(RESULTS)
GPUS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
NO_ENV = "converted: the file had no device/torch/date columns (device and date from its name)"
TEXT = "text causal 32/8 hd128 B=1"


def _load(path):
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_conv_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return "" if f != f else f


def _name_env(fname):
    """Device and date from a file name (``..._h200_2026-11-25...``)."""
    date = re.search(r"\d{4}-\d{2}-\d{2}", fname).group(0)
    gpu = next((GPUS[k] for k in GPUS if re.search(rf"(^|_|x){k}(_|$)", fname)), "")
    return dict(device=gpu, date=date)


def _row_env(r, fname):
    env = _name_env(fname)
    if r.get("gpu"):
        env["device"] = r["gpu"]
    for key in ("torch", "triton", "cudnn"):
        if r.get(key) not in (None, "", "-"):
            env[key] = r[key]
    if r.get("date"):
        env["date"] = r["date"][:10]
    return env


def _text_case(op):
    """``text causal 32/8 hd128 S=4096`` / ``text causal hd128 S=4096`` (the sweep) -> (case, S)."""
    S = int(re.search(r"S=(\d+)", op).group(1))
    return TEXT, S


# ---- one function per family of old files: old row -> rows of the schema --------------------------


def cpu(r, fname):
    return [dict(bench="bench_cpu", case=f"text causal {r['H']}/{r['Hkv']} hd{r['D']} B=1", provider=r["impl"],
                 mode="fwd", dtype=r["dtype"], x_name="S", x=int(r["S"]), p50=r["ms"],
                 rate=float(r["gflops"]) / 1e3, rate_unit="TFLOP/s", memory_mb=r["peak_extra_mb"],
                 device=f"{r['cpu']} ({r['cores']} cores)", torch=r["torch"], date=r["date"],
                 extra="median of 3 (p20/p80 not recorded)")]


def gpu_kernels(r, fname):
    op, note = r["op"], r["note"]
    base = dict(bench="bench_gpu", provider=r["provider"], mode=r["mode"], dtype="bfloat16")
    if op.startswith("correctness"):
        return [dict(base, case=op, metric="check", unit="", status=note)]
    if "peak extra memory" in op:
        S = int(re.search(r"S=(\d+)", op).group(1))
        peak = float(re.search(r"peak ([\d.]+) MiB", note).group(1))
        return [dict(base, case=TEXT, x_name="S", x=S, metric="peak memory", unit="", memory_mb=peak,
                     extra=extra(note=note))]
    if op.startswith("text"):
        case, x = _text_case(op)
        x_name = "S"
    else:
        m = re.match(r"(.*) ([ST])=(\d+)$", op)
        case, x_name, x = m.group(1), m.group(2), int(m.group(3))
    failed = note.startswith("failed")
    return [dict(base, case=case, x_name=x_name, x=x, p50=r["ms"], rate=r["tflops"],
                 rate_unit="TFLOP/s" if r["tflops"] else "", status=note if failed else "ok",
                 extra=extra(tile=r["config"], note="" if failed else note))]


def decode(r, fname):
    return [dict(sr, bench="bench_decode") for sr in _load(os.path.join(BENCH, "bench_decode.py")).schema_rows(
        r, "bfloat16")]


def e2e(r, fname):
    return [dict(sr, bench="bench_e2e") for sr in _load(os.path.join(BENCH, "bench_e2e.py")).schema_rows(r)]


def cp(r, fname):
    return [dict(_load(os.path.join(BENCH, "bench_cp.py")).schema_row(r), bench="bench_cp")]


def gqa_1gpu(r, fname):
    mod = _load(os.path.join(BENCH, "experiments", "exp_gqa_1gpu.py"))
    return [dict(sr, bench=mod.BENCH) for sr in mod.schema_rows(r)]


def cudnn_gqa(r, fname):
    mod = _load(os.path.join(BENCH, "experiments", "exp_cudnn_gqa.py"))
    return [dict(sr, bench="experiments/exp_cudnn_gqa") for sr in mod.schema_rows(r)]


def bwd_tiles(r, fname):
    m = re.match(r"(.*) S=(\d+)k$", r["case"])
    name, S = m.group(1), int(m.group(2)) * 1024
    case = TEXT if name.startswith("text") else "vision hd72 full 16/16 B=1"
    return [dict(bench="experiments/exp_bwd_tiles", case=case, provider="triton", mode="bwd", dtype="bfloat16",
                 x_name="S", x=S, metric=f"kernel {r['kernel']}", p50=r["ms"],
                 extra=extra(NO_ENV, tile=r["tile"], max_diff_vs_64x64=r["err"],
                             statistic="profiler mean of 5 calls"))]


def fwd_variants(r, fname, bench="experiments/exp_fwd_variants"):
    row = _load(os.path.join(BENCH, "experiments", "exp_fwd_variants.py")).schema_row(r)
    return [dict(row, bench=bench, extra=extra(NO_ENV, row["extra"]))]


def tma_configs(r, fname):
    return fwd_variants(r, fname, bench="experiments/exp_tma_configs")


FAMILIES = [  # (file name pattern, converter)
    (r"cpu_\d+core_.*", cpu),
    (r"gpu_kernels_.*", gpu_kernels),
    (r"decode_.*", decode),
    (r"e2e_.*", e2e),
    (r"cp_.*", cp),
    (r"exp_gqa_1gpu_.*", gqa_1gpu),
    (r"exp_cudnn_gqa_.*", cudnn_gqa),
    (r"gpu_bwd_tiles_.*", bwd_tiles),
    (r"gpu_exp_fwd_variants_.*", fwd_variants),
    (r"gpu_tma_configs_.*", tma_configs),
]
NUMERIC = ("p20", "p50", "p80", "rate", "memory_mb")


def convert(fname):
    conv = next(fn for pat, fn in FAMILIES if re.fullmatch(pat + r"\.csv", fname))
    run = fname[: -len(".csv")]
    out = []
    with open(os.path.join(HERE, fname), newline="") as f:
        for r in csv.DictReader(f):
            env = _row_env(r, fname)
            for sr in conv(r, fname):
                row = {**Row(bench=sr.pop("bench"), case=sr.pop("case"), provider=sr.pop("provider")).__dict__,
                       **env, **sr, "run": run}
                for k in NUMERIC:
                    row[k] = _num(row[k])
                out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="overwrite the tables if they exist")
    args = ap.parse_args()
    tables = defaultdict(list)
    for fname in sorted(f for f in os.listdir(HERE) if f.endswith(".csv")):
        rows = convert(fname)
        for row in rows:
            kind = "cpu_2core" if row["bench"] == "bench_cpu" else kind_of_name(row["device"])
            tables[kind].append(row)
        print(f"{fname}: {len(rows)} rows")
    archived = {f[: -len(".csv")] for f in os.listdir(HERE) if f.endswith(".csv")}
    for kind, rows in sorted(tables.items()):
        path = os.path.join(RESULTS, f"{kind}.csv")
        later = []
        if os.path.exists(path):
            if not args.force:
                print(f"{path} exists: not overwritten (--force)", file=sys.stderr)
                return 1
            later = [r for r in csv.DictReader(open(path, newline="")) if r["run"] not in archived]
            os.remove(path)
        rows.sort(key=lambda r: (r["date"], r["run"]))  # stable: file order within a run
        append_rows(path, rows + later)
        print(f"wrote {len(rows)} converted rows to {path}" + (f" (+ {len(later)} later rows kept)" if later else ""))
    assert all(set(r) == set(FIELDS) for rows in tables.values() for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
