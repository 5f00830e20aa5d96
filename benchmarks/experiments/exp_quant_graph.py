"""GPU experiment: device time of the quantised forward without host time (issue 14).

``exp_quant_fwd`` times each call with ``do_bench``: the GPU idles while the host launches the
K/V quantisers and the attention kernel (three Triton launches), which at 4k costs as much as the
quantisers' work. Here every provider is captured in a CUDA graph and replayed
(``triton.testing.do_bench_cudagraph``), so the figures are device time only -- what a model
whose host runs ahead of its GPU sees. Causal 32/8 hd128 B=1 bf16, and the vision varlen case.

    PYTHONPATH=src python3 benchmarks/experiments/exp_quant_graph.py
"""

import os

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import Recorder, attention_flops, extra, results_csv

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")


def main():
    dev = torch.device("cuda")
    rec = Recorder("experiments/exp_quant_graph", results_csv(RESULTS, dev, out_dir=os.environ.get("OUT") or None),
                   device=dev, echo=False)
    g = torch.Generator(device=dev).manual_seed(0)
    table = []
    for S in (4096, 16384, 32768):
        q = torch.randn(1, S, 32, 128, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, S, 8, 128, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, S, 8, 128, device=dev, dtype=torch.bfloat16, generator=g)
        qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2), v.repeat_interleave(4, 2).transpose(1, 2)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        provs = {"sdpa-cudnn": cudnn,
                 "triton-bf16": lambda: qf.flash_attn_func(q, k, v, causal=True, backend="triton"),
                 "triton-int8": lambda: qf.flash_attn_func(q, k, v, causal=True, quant="int8", backend="triton"),
                 "triton-fp8": lambda: qf.flash_attn_func(q, k, v, causal=True, quant="fp8", backend="triton")}
        flops = attention_flops(1, 32, S, S, 128, True)
        row = {}
        for name, fn in provs.items():
            try:
                with torch.no_grad():
                    fn(); fn()  # compile / autotune outside the graph
                    ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                row[name] = flops / ms / 1e9
                rec.add(case="text causal 32/8 hd128 B=1", provider=name, mode="fwd", dtype="bfloat16", x_name="S", x=S,
                        metric="graph time", unit="ms", p50=ms, rate=row[name], rate_unit="TFLOP/s (bf16 count)",
                        extra=extra(statistic="median (do_bench_cudagraph)"))
            except Exception as exc:
                print(name, S, type(exc).__name__, str(exc)[:200])
        table.append((S, row))
    print("\nTFLOP/s (bf16 count), device time only (CUDA graph replay); x = against cuDNN")
    for S, row in table:
        base = row.get("sdpa-cudnn")
        print(f"S={S:6d} " + "  ".join(f"{n} {t:6.1f} ({t / base:4.2f}x)" for n, t in row.items() if base))


if __name__ == "__main__":
    main()
