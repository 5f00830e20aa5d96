"""Line chart of a bench_gpu.py CSV: TFLOP/s against sequence length for the text shape (causal,
32/8 heads, hd128), ours beside SDPA's cuDNN / flash / efficient kernels, forward and
forward+backward, with the issue's targets marked.

    python3 benchmarks/plot_kernels.py benchmarks/results/gpu_kernels_2026-11-25_text_run3.csv docs/img/kernels_h100.png
"""

from __future__ import annotations

import csv
import re
import sys

# issue 3's targets (TFLOP/s) at S: forward >= 1.05x cuDNN's anchor, fwd+bwd >= 1.0x
TARGETS = {"fwd": {4096: 550, 16384: 615, 32768: 650}, "fwd+bwd": {4096: 425, 16384: 532}}
PROVIDERS = [("triton", "ours (Triton)", "C3", "-o"), ("sdpa-cudnn", "SDPA cuDNN", "C0", "-s"),
             ("sdpa-flash", "SDPA flash", "C1", "--^"), ("sdpa-efficient", "SDPA efficient", "C2", ":v")]


def main(path: str, out: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(path)) if r.get("tflops") and r["op"].startswith("text causal")]
    if not rows:
        print(f"no text-shape rows with TFLOP/s in {path}")
        return 1
    gpu, date = rows[0]["gpu"], rows[0]["date"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for prov, label, color, style in PROVIDERS:
            pts = {}
            for r in rows:
                if r["provider"] == prov and r["mode"] == mode:
                    S = int(re.search(r"S=(\d+)", r["op"]).group(1))
                    pts[S] = float(r["tflops"])  # a repeated row: the last one
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[s] for s in xs], style, color=color, label=label)
        tx = sorted(TARGETS[mode])
        ax.plot(tx, [TARGETS[mode][s] for s in tx], "k*", markersize=11, label="target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, causal 32/8 heads hd128 bf16")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{gpu}, {date}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
