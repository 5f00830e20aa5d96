"""Accuracy of quantised attention (``quant="int8"`` / ``"fp8"``) against a float64 reference.

For the Qwen3-VL shapes -- text causal 32/8 heads hd128 (dense, B=1) and the vision tower's
non-causal hd72 16 heads over packed frames (varlen, frames of 1024 and 784 tokens) -- on N(0,1)
bf16 inputs and on inputs whose K has channel outliers (4 channels of every kv head biased by
+20, as real K activations have), the quantised output is compared with attention computed in
float64 over the same bf16 inputs (our ``tiled`` backend in float64: O(seq) memory):

* cosine similarity of the flattened outputs, and relative L1 = sum|out - ref| / sum|ref|;
* the largest |lse - lse_ref| (the lse of the true scores: smoothing's shift undone).

Providers: ``ours-int8`` (the public ``flash_attn_*(..., quant="int8")``: the portable path on the
CPU, Triton's kernels on CUDA where they serve the call); ``ours-fp8`` (the public call on GPUs of
compute capability >= 8.9, else the portable path's exact emulation of the same arithmetic,
``extra`` says which); ``ours-bf16`` (the exact unquantised call, the anchor). Rows go through the
shared runner (``qwen3vl_flash.benchmarking``: metric ``cosine`` / ``rel L1`` / ``lse max err``,
the value in p50) to ``benchmarks/results/quant_accuracy_<device kind>.csv`` (or ``--csv``).

    python benchmarks/bench_quant_accuracy.py                 # ~2-4 min on 2 CPU cores
    python benchmarks/bench_quant_accuracy.py --smoke --csv /tmp/qa.csv
"""

from __future__ import annotations

import argparse
import os

import torch

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import Recorder, device_kind, extra
from qwen3vl_flash.quant import quant_backend_reason
from qwen3vl_flash.quant.portable import quant_attention_portable
from qwen3vl_flash.quant.quantize import FP8_MIN_CAPABILITY

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUTLIER_CHANNELS, OUTLIER_BIAS = 4, 20.0
FRAMES = (1024, 784)  # vision segment lengths, alternating (448x448 / 392x392 frames after 2x2 merge x4)


def metrics(out: torch.Tensor, ref: torch.Tensor):
    """(cosine of the flattened tensors, relative L1 = sum|out - ref| / sum|ref|), in float64."""
    o, r = out.double().flatten(), ref.double().flatten()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    return cos, ((o - r).abs().sum() / r.abs().sum()).item()


def lse_err(lse: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    return (lse.double()[fin] - ref.double()[fin]).abs().max().item()


def make_inputs(shape_q, shape_kv, outliers: bool, gen: torch.Generator, device):
    """bf16 q (shape_q), k, v (shape_kv); with ``outliers`` 4 channels of each kv head of K get +20."""
    q = torch.randn(shape_q, generator=gen)
    k = torch.randn(shape_kv, generator=gen)
    v = torch.randn(shape_kv, generator=gen)
    if outliers:
        D = shape_kv[-1]
        for h in range(shape_kv[-2]):
            ch = torch.randperm(D, generator=gen)[:OUTLIER_CHANNELS]
            k[..., h, ch] += OUTLIER_BIAS
    return tuple(t.to(device, torch.bfloat16) for t in (q, k, v))


def fp8_native(device: torch.device) -> bool:
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= FP8_MIN_CAPABILITY


def run_case(rec: Recorder, case: str, x_name: str, x: int, q, k, v, causal: bool, varlen, inputs: str,
             device: torch.device) -> None:
    """One shape and input kind: every provider's metrics as rows."""
    D = q.shape[-1]
    scale = D ** -0.5
    kw = dict(softmax_scale=scale, causal=causal, return_lse=True)
    if varlen is not None:
        cu, max_len = varlen

        def public(qq, kk, vv, **more):
            return qf.flash_attn_varlen_func(qq, kk, vv, cu, cu, max_len, max_len, **kw, **more)

        port_kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)
    else:

        def public(qq, kk, vv, **more):
            return qf.flash_attn_func(qq, kk, vv, **kw, **more)

        port_kw = {}
    with torch.no_grad():
        ref, ref_lse = public(q.double(), k.double(), v.double(), backend="tiled")
        results = {"ours-bf16": (public(q, k, v), "exact (auto)")}
        path = "tiled" if quant_backend_reason(q, k, "int8") is not None or device.type != "cuda" else "triton"
        results["ours-int8"] = (public(q, k, v, quant="int8"), path)
        if fp8_native(device):
            path = "tiled" if quant_backend_reason(q, k, "fp8") is not None else "triton"
            results["ours-fp8"] = (public(q, k, v, quant="fp8"), path)
        else:  # the public call refuses fp8 here: the portable path's emulation of the same arithmetic
            results["ours-fp8"] = (quant_attention_portable(q, k, v, "fp8", scale, causal, need_lse=True, **port_kw),
                                   "tiled (emulated e4m3: no FP8 tensor cores here)")
    for provider, ((out, lse), path) in results.items():
        cos, l1 = metrics(out, ref)
        note = extra(inputs=inputs, path=path, reference="float64 of the bf16 inputs")
        for metric, val in (("cosine", cos), ("rel L1", l1), ("lse max err", lse_err(lse, ref_lse))):
            rec.add(case=case, provider=provider, mode="fwd", dtype="bfloat16", x_name=x_name, x=x, metric=metric,
                    unit="", p50=val, extra=note)


def vision_segments(total: int):
    lens, i = [], 0
    while sum(lens) < total:
        lens.append(min(FRAMES[i % len(FRAMES)], total - sum(lens)))
        i += 1
    return lens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--text-seqlens", default="1024,4096")
    ap.add_argument("--vision-tokens", default="4096,8192", help="packed vision tokens (frames of 1024 / 784)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code path")
    ap.add_argument("--csv", default=None, help="default: benchmarks/results/quant_accuracy_<device kind>.csv")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        args.text_seqlens, args.vision_tokens = "128", "300"
    path = args.csv or (os.path.join(os.environ.get("OUT") or "/tmp", "smoke_bench_quant_accuracy.csv") if args.smoke
                        else os.path.join(RESULTS, f"quant_accuracy_{device_kind(device)}.csv"))
    rec = Recorder("bench_quant_accuracy", path, device=device)
    gen = torch.Generator().manual_seed(0)
    for outliers in (False, True):
        inputs = f"K outliers (+{OUTLIER_BIAS:g} on {OUTLIER_CHANNELS} channels)" if outliers else "N(0,1)"
        for S in (int(s) for s in args.text_seqlens.split(",")):
            q, k, v = make_inputs((1, S, 32, 128), (1, S, 8, 128), outliers, gen, device)
            run_case(rec, "text causal 32/8 hd128 B=1", "S", S, q, k, v, True, None, inputs, device)
        for T in (int(t) for t in args.vision_tokens.split(",")):
            lens = vision_segments(T)
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
            q, k, v = make_inputs((T, 16, 72), (T, 16, 72), outliers, gen, device)
            run_case(rec, f"vision hd72 16h varlen frames {'/'.join(map(str, FRAMES))}", "T", T, q, k, v, False,
                     (cu, max(lens)), inputs, device)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
