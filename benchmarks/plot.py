"""Bar chart of a bench_cp.py CSV: fwd+bwd time per sequence length, ours vs PyTorch's
context_parallel (MHA rows, the shape PyTorch's figures use) and our GQA rows.

    python3 benchmarks/plot_cp.py benchmarks/results/cp_2xh100_2026-11-25_run2.csv docs/img/cp_2xh100.png
"""

from __future__ import annotations

import csv
import sys


def main(path: str, out: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(path)) if r["status"] == "ok" and r["p50_ms"]]
    gpu = rows[0]["gpu"] if rows else "?"
    panels = [
        ("MHA 32/32 heads (PyTorch's shape)", ["ours-1gpu-mha", "ours-ring-mha", "ours-ulysses-mha",
                                               "ours-ring-triton-mha", "torch-cp-cudnn", "torch-cp-flash"]),
        ("GQA 32/8 heads (Qwen3-VL-8B)", ["ours-1gpu", "ours-ring", "ours-ulysses", "ours-allgather",
                                          "ours-ring-triton"]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (title, providers) in zip(axes, panels):
        seqlens = sorted({int(r["seqlen"]) for r in rows if r["provider"] in providers})
        width = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            ys = []
            for S in seqlens:
                hit = [r for r in rows if r["provider"] == prov and int(r["seqlen"]) == S]
                ys.append(float(hit[0]["p50_ms"]) if hit else 0.0)
            xs = [j + i * width for j in range(len(seqlens))]
            ax.bar(xs, ys, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(seqlens))])
        ax.set_xticklabels([f"{S // 1024}k" for S in seqlens])
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd time, ms (log; lower is better)")
        ax.set_xlabel("global sequence length")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"Context parallelism on 2 x {gpu}, causal hd128 bf16 (1gpu rows: one GPU, full sequence)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
