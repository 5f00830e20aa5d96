"""Figures from the results tables (``benchmarks/results/<device kind>.csv``): the ones in the docs,
or any slice of a table.

    python benchmarks/plot.py                          # redraw every figure of the docs (FIGURES)
    python benchmarks/plot.py --figure kernels_h100    # one of them (--out elsewhere; --img DIR: all)
    python benchmarks/plot.py benchmarks/results/h200.csv --bench experiments/exp_gqa_1gpu \\
        --case "text causal 32/8 hd128 B=1" --y rate --panel mode --out /tmp/gqa.png   # lines of any slice

A figure is lines of ``--y`` (a column: p50, rate, memory_mb) against ``x``, one panel per value of
``--panel`` and one line per provider, or grouped bars (the CP figure). Each FIGURES entry names
the table, the rows it draws (``run`` = the archived file the rows came from, or a run id) and
the image it writes; ``benchmarks/results/archive/README.md`` lists which doc shows which.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from qwen3vl_flash.benchmarking import bar_plot, line_plot, read_rows  # noqa: E402

RESULTS = os.path.join(HERE, "results")
IMG = os.path.join(HERE, "..", "docs", "img")
TEXT = "text causal 32/8 hd128 B=1"
CPU_LINES = [("torch_sdpa", "PyTorch SDPA", "-o"), ("auto", "auto", "-o"), ("eager", "eager", "-o"),
             ("sdpa", "sdpa", "-o"), ("tiled", "tiled", "-o")]
KERNEL_LINES = [("triton", "ours (Triton)", "C3-o"), ("sdpa-cudnn", "SDPA cuDNN", "C0-s"),
                ("sdpa-flash", "SDPA flash", "C1--^"), ("sdpa-efficient", "SDPA efficient", "C2:v")]
# issue 3's targets (TFLOP/s) at S: forward >= 1.05x cuDNN's anchor, fwd+bwd >= 1.0x
KERNEL_TARGETS = {"fwd": {4096: 550, 16384: 615, 32768: 650}, "fwd+bwd": {4096: 425, 16384: 532}}
CP_MHA = ["ours-1gpu-mha", "ours-ring-mha", "ours-ulysses-mha", "ours-ring-triton-mha", "torch-cp-cudnn",
          "torch-cp-flash"]
CP_GQA = ["ours-1gpu", "ours-ring", "ours-ulysses", "ours-allgather", "ours-ring-triton"]


def _cpu(y, ylabel):
    return dict(table="cpu_2core.csv", match=dict(bench="bench_cpu", run="cpu_2core_2026-11-25"), kind="lines",
                args=dict(y=y, ylabel=ylabel, panel="dtype", lines=CPU_LINES,
                          title="{panel}, {mode}, {device}, {date}"))


FIGURES = {
    "cpu_text8b_time": _cpu("p50", "median time (ms)"),
    "cpu_text8b_memory": _cpu("memory_mb", "peak extra memory (MB)"),
    "kernels_h100": dict(
        table="h100.csv", match=dict(bench="bench_gpu", run="gpu_kernels_2026-11-25_text_run3", case=TEXT,
                                     metric="time"), kind="lines",
        args=dict(y="rate", ylabel="TFLOP/s", panel="mode", panels=["fwd", "fwd+bwd"], lines=KERNEL_LINES,
                  targets=KERNEL_TARGETS, logy=False, title="{panel}, causal 32/8 heads hd128 bf16",
                  suptitle="{device}, {date}")),
    "cp_2xh100": dict(
        table="h100.csv", match=dict(bench="bench_cp", run="cp_2xh100_2026-11-25_run2", metric="time", status="ok"),
        kind="bars",
        args=dict(panels=[("MHA 32/32 heads (PyTorch's shape)", lambda r: r["case"].startswith("causal 32/32"), CP_MHA),
                          ("GQA 32/8 heads (Qwen3-VL-8B)", lambda r: r["case"].startswith("causal 32/8"), CP_GQA)],
                  ylabel="fwd+bwd time, ms (log; lower is better)", xlabel="global sequence length",
                  xfmt=lambda v: f"{int(v) // 1024}k",
                  suptitle="Context parallelism on 2 x {device}, causal hd128 bf16 "
                           "(1gpu rows: one GPU, full sequence)")),
}


def draw(rows, kind, out, args):
    if not rows:
        raise SystemExit(f"no rows match: nothing drawn for {out}")
    args = dict(args)
    if "suptitle" in args:
        args["suptitle"] = args["suptitle"].format(**rows[0])
    if kind == "bars":
        return bar_plot(rows, out, **args)
    return line_plot(rows, args.pop("y"), out, **args)


def figure(name, out=None, results=RESULTS, img=IMG):
    spec = FIGURES[name]
    rows = read_rows(os.path.join(results, spec["table"]), **spec["match"])
    return draw(rows, spec["kind"], out or os.path.join(img, f"{name}.png"), spec["args"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tables", nargs="*", help="results CSVs for a slice (none: the docs' figures)")
    ap.add_argument("--figure", choices=sorted(FIGURES), help="draw one figure of the docs")
    ap.add_argument("--results", default=RESULTS, help="folder of the tables the docs' figures are drawn from")
    ap.add_argument("--out", default=None, help="image path (default for --figure: docs/img/<figure>.png)")
    ap.add_argument("--img", default=IMG, help="folder the docs' figures are written to")
    for col in ("bench", "case", "mode", "dtype", "metric", "run", "status"):
        ap.add_argument(f"--{col}", default=None, help=f"keep rows whose {col} is this")
    ap.add_argument("--y", default="p50", help="column on the y axis (p50, rate, memory_mb, ...)")
    ap.add_argument("--panel", default="dtype", help="one panel per value of this column")
    ap.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    args = ap.parse_args(argv)
    if args.tables:
        match = {c: getattr(args, c) for c in ("bench", "case", "mode", "dtype", "metric", "run", "status")
                 if getattr(args, c) is not None}
        rows = read_rows(*args.tables, **match)
        out = args.out or "plot.png"
        draw(rows, "lines", out, dict(y=args.y, panel=args.panel, logy=not args.linear,
                                      title="{panel}, {case}, {device}"))
        print(f"wrote {out} ({len(rows)} rows)")
        return 0
    for name in [args.figure] if args.figure else sorted(FIGURES):
        print(f"wrote {figure(name, args.out if args.figure else None, args.results, args.img)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
