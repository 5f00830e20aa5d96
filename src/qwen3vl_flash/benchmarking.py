"""The shared benchmark runner: one row schema, one environment record, one FLOP count, timers.

Every benchmark (``benchmarks/bench_*.py``, ``qwen3vl-flash bench``) writes rows of :class:`Row`
(columns :data:`FIELDS`) through a :class:`Recorder`, which appends them to one CSV per device kind:
``benchmarks/results/h200.csv``, ``h100.csv``, ``cpu_2core.csv`` (:func:`device_kind`). A row is one
measured quantity: which benchmark (``bench``), which workload (``case``, ``dtype``, the swept
variable ``x_name`` = ``x``), whose implementation (``provider``) doing what (``mode``: ``fwd``,
``fwd+bwd``, ``bwd``, a decode variant), what was measured (``metric`` in ``unit``, the 20th / 50th
/ 80th percentiles ``p20`` / ``p50`` / ``p80``; a throughput at p50 in ``rate`` / ``rate_unit``;
peak extra memory ``memory_mb``), whether it ran (``status``), free-form ``extra`` (``key=value``
pairs: tiles, errors, notes), and where: ``device``, ``world`` (GPUs), versions, ``date`` and
``run`` (one id per invocation of a script; rows converted from the old files carry that file's
name). ``benchmarks/README.md`` shows how to read a row.

* :func:`env_row` -- device name, torch, triton, cuDNN, package version, date.
* :func:`attention_flops` -- FLOPs as DESIGN.md counts them: 4*B*H*Sq*Sk*D, halved for causal,
  x2.5 for forward+backward, x1.5 for the backward alone.
* :func:`time_fn` / :func:`time_quantiles` -- wall time after warm-up (synchronising on CUDA);
  :func:`do_bench_quantiles` -- ``triton.testing.do_bench`` percentiles (L2 flushed per call).
* :func:`peak_extra_bytes` -- peak bytes allocated by a call beyond what existed before it, on
  CUDA (the caching allocator's counters) and on CPU (the profiler's allocation events).
* :func:`line_plot` / :func:`bar_plot` -- the figures of ``benchmarks/plot.py`` and the CLI.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata

import torch


@dataclasses.dataclass
class Row:
    """One measured quantity. Empty strings mean "not measured" / "not recorded"."""

    bench: str  # the script: bench_gpu, bench_decode, bench_cp, bench_e2e, bench_cpu, cli, experiments/exp_*
    case: str  # the workload, e.g. "text causal 32/8 hd128 B=1"
    provider: str  # whose implementation: triton, sdpa-cudnn, auto, torch_sdpa, ours-ring, ...
    mode: str = ""  # fwd, fwd+bwd, bwd, check, or a decode / CP variant
    dtype: str = ""
    x_name: str = ""  # the swept variable (S, L, T, tokens) ...
    x: object = ""  # ... and its value
    metric: str = "time"  # what p20/p50/p80 hold: time, graph time, host time, check, max length, ...
    unit: str = "ms"
    p20: object = ""
    p50: object = ""
    p80: object = ""
    rate: object = ""  # a throughput at p50 ...
    rate_unit: str = ""  # ... in TFLOP/s, TB/s, tok/s
    memory_mb: object = ""  # peak extra memory (MiB)
    status: str = "ok"
    extra: str = ""  # "key=value; key=value": tiles, errors, notes
    device: str = ""
    world: object = 1
    torch: str = ""
    triton: str = ""
    cudnn: str = ""
    package: str = ""
    date: str = ""
    run: str = ""


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Row))
ENV_FIELDS = ("device", "torch", "triton", "cudnn", "package", "date")


# ---------------------------------------------------------------------------------------------
# the environment
# ---------------------------------------------------------------------------------------------


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def versions() -> dict[str, str]:
    """torch, triton, cuDNN and this package's versions ("" where absent)."""
    cudnn = ""
    if torch.cuda.is_available():
        cudnn = str(torch.backends.cudnn.version() or "")
    from . import __version__  # the tree's own version, also when run from src/ uninstalled

    return {"torch": torch.__version__, "triton": _dist_version("triton"), "cudnn": cudnn, "package": __version__}


def other_versions(*names: str) -> str:
    """``"nccl=2.28.9; transformers=5.17.0"`` for an ``extra`` column (nccl only with CUDA)."""
    out = []
    for name in names:
        if name == "nccl":
            try:
                v = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else ""
            except Exception:  # noqa: BLE001 - a build without NCCL
                v = ""
        else:
            v = _dist_version(name)
        out.append(f"{name}={v or '-'}")
    return "; ".join(out)


def device_name(device=None) -> str:
    """The GPU's name, or the CPU model with its core count."""
    from .hardware.detect import detect_hardware

    device = torch.device(device) if device is not None else None
    hw = detect_hardware(device)
    if hw.device_type == "cuda":
        return hw.name
    return f"{hw.cpu_model} ({hw.cpu_cores} cores)"


def env_row(device=None) -> dict[str, str]:
    """The columns every row shares: device name, torch, triton, cuDNN, package version, date."""
    return {"device": device_name(device), **versions(), "date": datetime.date.today().isoformat()}


def device_kind(device=None) -> str:
    """The results file a device's rows go to: ``h200``, ``h100``, ``a100``, ``cpu_2core``."""
    from .hardware.detect import detect_hardware

    device = torch.device(device) if device is not None else None
    hw = detect_hardware(device)
    if hw.device_type != "cuda":
        return f"cpu_{hw.cpu_cores}core"
    return kind_of_name(hw.name)


def kind_of_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``h100``; a name without a model number -> its slug."""
    low = name.lower()
    m = re.search(r"\b(rtx|gtx)\s*([a-z]?\d{3,4}\w*)", low)
    if m:
        return m.group(1) + m.group(2)
    m = re.search(r"\b([a-z]{1,3}\d{1,4}[a-z]?)\b", low.replace("nvidia", ""))
    if m:
        return m.group(1)
    return re.sub(r"[^a-z0-9]+", "_", low).strip("_") or "unknown"


def run_id(bench: str) -> str:
    """One id per invocation of a script: ``bench_gpu@2026-12-01T10:20:30``."""
    return f"{bench}@{datetime.datetime.now().isoformat(timespec='seconds')}"


# ---------------------------------------------------------------------------------------------
# counting and timing
# ---------------------------------------------------------------------------------------------

FLOP_FACTOR = {"fwd": 1.0, "bwd": 1.5, "fwd+bwd": 2.5, "fwd_bwd": 2.5}


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: str = "fwd") -> float:
    """4*B*H*Sq*Sk*D for the forward (two matmuls), halved for causal; the backward counts 1.5x
    the forward, forward+backward 2.5x (``mode``: fwd, bwd, fwd+bwd or fwd_bwd)."""
    if mode not in FLOP_FACTOR:
        raise ValueError(f"mode must be one of {sorted(FLOP_FACTOR)}, got {mode!r}")
    flops = 4.0 * B * H * Sq * Sk * D
    if causal:
        flops /= 2
    return flops * FLOP_FACTOR[mode]


def tflops(flops: float, ms) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds (nan where ms is nan, missing or <= 0)."""
    try:
        ms = float(ms)
    except (TypeError, ValueError):
        return float("nan")
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def tile_str(cfg) -> str:
    """``{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}`` -> ``64x64w4s3``."""
    if not cfg:
        return ""
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"


def tiles(*specs: tuple[int, int, int, int]) -> list[dict]:
    """Launch configs from ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples."""
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in specs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_times(fn: Callable[[], object], device, warmup: int, repeats: int) -> list[float]:
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``values``; p50 is the median."""
    vals = list(values)
    if len(vals) < 2:
        return vals[0], vals[0], vals[0]
    qs = statistics.quantiles(vals, n=10, method="inclusive")
    return qs[1], statistics.median(vals), qs[7]


def time_fn(fn: Callable[[], object], device="cpu", warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` (after ``warmup`` calls)."""
    return statistics.median(_wall_times(fn, device, warmup, repeats))


def time_quantiles(fn: Callable[[], object], device="cpu", warmup: int = 1, repeats: int = 5):
    """(p20, p50, p80) seconds per call of ``fn`` (after ``warmup`` calls); p50 is :func:`time_fn`."""
    return quantiles(_wall_times(fn, device, warmup, repeats))


def do_bench_quantiles(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds from ``triton.testing.do_bench`` (CUDA; L2 flushed per call)."""
    import triton

    return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8]))


def peak_extra_bytes(fn: Callable[[], object], device="cpu") -> int:
    """Peak bytes allocated while ``fn`` runs, beyond the allocations alive before it started."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ---------------------------------------------------------------------------------------------
# rows and files
# ---------------------------------------------------------------------------------------------


def fmt(v) -> str:
    """A cell: floats to 6 significant digits, nan / None as empty, the rest as str."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def extra(*parts: str, **kv) -> str:
    """``extra(tile="64x64w4s3", err=1e-3)`` -> ``"tile=64x64w4s3; err=0.001"`` (empty values left
    out); positional ``parts`` are ready-made ``key=value`` strings put in front."""
    return "; ".join([p for p in parts if p] + [f"{k}={fmt(v)}" for k, v in kv.items() if fmt(v) != ""])


def parse_extra(text: str) -> dict[str, str]:
    """The inverse of :func:`extra` (a part without ``=`` is kept under ``note``)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split("; "))):
        key, sep, val = part.partition("=")
        if sep and re.fullmatch(r"[\w.:+-]+", key):
            out[key] = val
        else:
            out["note"] = f"{out['note']}; {part}" if "note" in out else part
    return out


def append_rows(path: str, rows: Iterable[dict]) -> int:
    """Append rows (dicts with keys of :data:`FIELDS`) to ``path``, writing the header if new."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            raise ValueError(f"{path}: its header is not the benchmark schema {FIELDS}")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            unknown = set(r) - set(FIELDS)
            if unknown:
                raise ValueError(f"not columns of the benchmark schema: {sorted(unknown)}")
            w.writerow({k: fmt(r.get(k, "")) for k in FIELDS})
    return len(rows)


def read_rows(*paths: str, **match) -> list[dict[str, str]]:
    """Rows of one or more results CSVs whose columns equal ``match`` (a value may be a tuple of
    accepted values, or a callable taking the cell)."""
    out = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if all(_matches(r.get(k, ""), want) for k, want in match.items()):
                    out.append(r)
    return out


def _matches(cell: str, want) -> bool:
    if callable(want):
        return bool(want(cell))
    if isinstance(want, (tuple, list, set, frozenset)):
        return cell in {str(w) for w in want}
    return cell == str(want)


def results_csv(results_dir: str, device=None, smoke: bool = False, bench: str = "bench",
                out_dir: str | None = None) -> str:
    """Where a script's rows go by default: ``<results_dir>/<device kind>.csv`` (``out_dir``, e.g.
    a lent machine's ``$OUT``, instead of ``results_dir`` where given); a smoke run (tiny shapes, a
    code-path check) writes ``smoke_<bench>.csv`` to ``out_dir``, ``$OUT`` or the temp folder,
    never to the committed tables."""
    if smoke:
        import tempfile

        return os.path.join(out_dir or os.environ.get("OUT") or tempfile.gettempdir(), f"smoke_{bench}.csv")
    return os.path.join(out_dir or results_dir, f"{device_kind(device)}.csv")


class Recorder:
    """Appends :class:`Row` s to a CSV as they are measured (a run cut short keeps what it
    measured), with the environment, the run id and the fixed columns (``world=2``, ...) filled in.

        rec = Recorder("bench_gpu", path, device="cuda")
        rec.add(case="text causal 32/8 hd128 B=1", provider="triton", mode="fwd", x_name="S", x=4096,
                p50=0.41, rate=416.0, rate_unit="TFLOP/s")
    """

    def __init__(self, bench: str, path: str | None, device=None, echo: bool = True, env: dict | None = None,
                 **fixed):
        self.bench, self.path, self.echo = bench, path, echo
        self.env = env if env is not None else env_row(device)
        self.fixed = {"run": run_id(bench), **fixed}
        self.rows: list[dict] = []

    def add(self, **fields) -> dict:
        row = dataclasses.asdict(Row(bench=self.bench, **{**self.env, **self.fixed, **fields}))
        self.rows.append(row)
        if self.path:
            append_rows(self.path, [row])
        if self.echo:
            self.print_row(row)
        return row

    @staticmethod
    def print_row(r: dict) -> None:
        x = f"{r['x_name']}={r['x']}" if r["x_name"] else ""
        val = f"{fmt(r['p50'])} {r['unit']}" if fmt(r["p50"]) else "-"
        rate = f"{fmt(r['rate'])} {r['rate_unit']}" if fmt(r["rate"]) else ""
        print(f"  {r['case'][:34]:<34} {x:<9} {r['provider'][:24]:<24} {r['mode'][:12]:<12} {r['metric'][:12]:<12} "
              f"{val:>14} {rate:>16} {r['status'] if r['status'] != 'ok' else ''} {r['extra'][:60]}", flush=True)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


XLABELS = {"S": "sequence length", "T": "tokens in the batch", "L": "KV length", "tokens": "tokens"}


def line_plot(rows: list[dict], y: str, out: str, *, panel: str = "dtype", line: str = "provider",
              ylabel: str = "", title: str = "{panel}", suptitle: str = "", logy: bool = True,
              lines: Sequence[tuple[str, str, str]] | None = None, targets: dict[str, dict] | None = None,
              panels: Sequence[str] | None = None) -> str:
    """One panel per value of ``panel``, one line per value of ``line``: ``y`` against ``x``.
    ``lines`` = [(value, label, matplotlib format)] fixes the order, labels and styles;
    ``targets`` = {panel value: {x: y}} marks stars; ``title`` may name ``{panel}`` and any column
    of the panel's first row."""
    plt = _pyplot()
    panels = list(panels or sorted({r[panel] for r in rows}))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, pv in zip(axes[0], panels):
        sub = [r for r in rows if r[panel] == pv]
        styles = lines or [(v, v, "-o") for v in sorted({r[line] for r in sub})]
        for value, label, style in styles:
            pts = {}
            for r in sub:
                if r[line] == value and not math.isnan(_num(r[y])):
                    pts[_num(r["x"])] = _num(r[y])  # a repeated point: the last row
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[v] for v in xs], style, label=label)
        for tx, ty in sorted((targets or {}).get(pv, {}).items()):
            ax.plot([tx], [ty], "k*", markersize=11, label="target" if tx == min(targets[pv]) else None)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(XLABELS.get(sub[0]["x_name"], sub[0]["x_name"]) if sub else "x")
        ax.set_ylabel(ylabel or y)
        ax.set_title(title.format(panel=pv, **(sub[0] if sub else {})), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, out, suptitle)


def _save(plt, fig, out: str, suptitle: str) -> str:
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def bar_plot(rows: list[dict], out: str, *, panels: Sequence[tuple[str, Callable[[dict], bool], Sequence[str]]],
             y: str = "p50", ylabel: str = "", xlabel: str = "", suptitle: str = "",
             xfmt: Callable[[float], str] = str) -> str:
    """Grouped bars: per panel (title, row filter, providers), one group per ``x``, one bar per
    provider, log y."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (ptitle, keep, providers) in zip(axes[0], panels):
        sub = [r for r in rows if keep(r) and r["provider"] in providers]
        xs = sorted({_num(r["x"]) for r in sub})
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            ys = []
            for xv in xs:
                hit = [_num(r[y]) for r in sub if r["provider"] == prov and _num(r["x"]) == xv]
                ys.append(hit[-1] if hit else 0.0)
            ax.bar([j + i * width for j in range(len(xs))], ys, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))])
        ax.set_xticklabels([xfmt(v) for v in xs])
        ax.set_yscale("log")
        ax.set_ylabel(ylabel or y)
        ax.set_xlabel(xlabel)
        ax.set_title(ptitle)
        ax.legend(fontsize=7)
    return _save(plt, fig, out, suptitle)


__all__ = [
    "FIELDS", "Row", "Recorder", "append_rows", "attention_flops", "bar_plot", "device_kind", "device_name",
    "do_bench_quantiles", "env_row", "extra", "fmt", "kind_of_name", "line_plot", "other_versions", "parse_extra",
    "peak_extra_bytes", "quantiles", "read_rows", "results_csv", "run_id", "tflops", "tile_str", "tiles", "time_fn",
    "time_quantiles", "versions",
]

if __name__ == "__main__":  # pragma: no cover
    print(env_row(), device_kind(), file=sys.stdout)
