"""``qwen3vl-flash bench``: our backends against PyTorch SDPA and eager, over sequence lengths.

Writes ``bench.csv`` in the benchmark schema (``qwen3vl_flash.benchmarking.FIELDS``: one row per
backend x dtype x length with the p20/p50/p80 time in ms, TFLOP/s at p50, peak extra MB, device,
versions, date; ``benchmarks/README.md`` explains the columns) and, with matplotlib,
``bench_time.png`` / ``bench_memory.png``. The default (text-8B heads: 32 query / 8 kv, head_dim
128, causal) finishes in about a minute on 2 CPU cores. Providers ``ours-int8`` / ``ours-fp8`` are
our quantised attention (``flash_attn_func(..., quant=...)``, forward on 16-bit inputs; fp8 on
sm89+ GPUs), timed beside the exact backends.
"""

from __future__ import annotations

import os
import platform

import torch

import qwen3vl_flash as qf
from qwen3vl_flash._optional import available
from qwen3vl_flash.benchmarking import (
    Recorder,
    append_rows,
    attention_flops,
    extra,
    line_plot,
    peak_extra_bytes,
    tflops,
    time_quantiles,
)


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="comma list: float32,bfloat16,float16 (default cpu: float32,bfloat16; cuda: bfloat16)")
    p.add_argument("--seqlens", default=None, help="comma list of lengths (default cpu: 256,512,1024; cuda: 1024,4096,16384)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true", help="non-causal attention (default: causal)")
    p.add_argument("--mode", choices=["fwd", "fwd_bwd", "fwd+bwd"], default="fwd")
    p.add_argument("--backends", default=None, help="comma list (default: every backend that can run, plus auto; "
                   "on GPUs also torch-flash, torch-cudnn, torch-efficient: PyTorch SDPA with that kernel forced; "
                   "for 16-bit forward runs also ours-int8 and, on sm89+ GPUs, ours-fp8: flash_attn_func(..., "
                   "quant=...) on the auto path)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_out", help="folder for bench.csv and the PNG plots")
    p.add_argument("--no-plot", action="store_true")


def _progress(items: list, desc: str):
    if available("tqdm"):
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="run")
    return _PlainProgress(items, desc)


class _PlainProgress:
    def __init__(self, items, desc):
        self.items, self.desc = items, desc

    def __iter__(self):
        n = len(self.items)
        for i, item in enumerate(self.items, 1):
            print(f"[{i}/{n}] {self.desc}: {item}", flush=True)
            yield item

    def set_postfix_str(self, s):
        pass


# PyTorch SDPA with one kernel forced, timed beside ours on GPUs (name -> SDPBackend member)
TORCH_KERNELS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION"}


def _torch_sdpa(kernel: str, q, k, v, causal: bool):
    """PyTorch's SDPA called directly with one kernel; K/V repeated for GQA outside the timing
    where the kernel lacks enable_gqa support, as the anchors were measured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, TORCH_KERNELS[kernel])
    g = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(g, 1).detach().requires_grad_(k.requires_grad)
    vt = v.transpose(1, 2).repeat_interleave(g, 1).detach().requires_grad_(v.requires_grad)

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return fwd


# our quantised attention, timed as providers: name -> flash_attn_func's quant= (forward only)
QUANT_PROVIDERS = {"ours-int8": "int8", "ours-fp8": "fp8"}


def _quant_providers(device: torch.device) -> list[str]:
    """The quantised providers this device runs: ours-int8 everywhere, ours-fp8 on sm89+ GPUs."""
    from qwen3vl_flash.quant.quantize import FP8_MIN_CAPABILITY

    names = ["ours-int8"]
    if device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= FP8_MIN_CAPABILITY:
        names.append("ours-fp8")
    return names


def _call(backend: str, q, k, v, causal: bool, mode: str):
    if backend in TORCH_KERNELS:
        fwd = _torch_sdpa(backend, q, k, v, causal)
    elif backend in QUANT_PROVIDERS:

        def fwd():
            return qf.flash_attn_func(q, k, v, causal=causal, quant=QUANT_PROVIDERS[backend])
    else:

        def fwd():
            return qf.flash_attn_func(q, k, v, causal=causal, backend=backend)

    if mode == "fwd":
        return lambda: torch.no_grad()(fwd)()

    def fwd_bwd():
        out = fwd()
        out.backward(torch.ones_like(out))

    return fwd_bwd


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtypes = (args.dtype or ("bfloat16" if on_gpu else "float32,bfloat16")).split(",")
    seqlens = [int(s) for s in (args.seqlens or ("1024,4096,16384" if on_gpu else "256,512,1024")).split(",")]
    for name, val in (("--batch", args.batch), ("--heads", args.heads), ("--kv-heads", args.kv_heads), ("--head-dim", args.head_dim)):
        if val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    wanted = args.backends.split(",") if args.backends else qf.available_backends() + ["auto"]
    if on_gpu and not args.backends:
        wanted += list(TORCH_KERNELS)  # PyTorch's flash / cuDNN / efficient kernels, same run
    if not args.backends:
        wanted += _quant_providers(device)  # kept below for 16-bit forward runs only
    causal = not args.no_causal
    profile = qf.select_profile(qf.detect_hardware(device))
    case = f"{'causal' if causal else 'full'} {args.heads}/{args.kv_heads} hd{args.head_dim} B={args.batch}"
    rec = Recorder("cli", None, device=device, echo=False)
    mode = "fwd" if args.mode == "fwd" else "fwd+bwd"
    jobs = [(dt, S, b) for dt in dtypes for S in seqlens for b in wanted]
    bar = _progress(jobs, "bench")
    for dt_name, S, backend in bar:
        dtype = getattr(torch, dt_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"--dtype: unknown dtype {dt_name!r}")
        if (backend in QUANT_PROVIDERS and not args.backends
                and (mode != "fwd" or dtype not in (torch.float16, torch.bfloat16))):
            continue  # quantised attention is forward-only on 16-bit inputs (asked for explicitly: the probe says why)
        g = torch.Generator(device="cpu").manual_seed(S)
        shape_q = (args.batch, S, args.heads, args.head_dim)
        shape_kv = (args.batch, S, args.kv_heads, args.head_dim)
        grad = mode != "fwd"
        q = torch.randn(shape_q, generator=g).to(device, dtype).requires_grad_(grad)
        k = torch.randn(shape_kv, generator=g).to(device, dtype).requires_grad_(grad)
        v = torch.randn(shape_kv, generator=g).to(device, dtype).requires_grad_(grad)
        fn = _call(backend, q, k, v, causal, mode)
        try:
            fn()  # also the "can this backend run it" probe
        except (ValueError, RuntimeError) as exc:
            if hasattr(bar, "write"):
                bar.write(f"skip {backend} {dt_name} S={S}: {str(exc).splitlines()[0]}")
            continue
        p20, p50, p80 = time_quantiles(fn, device, warmup=0, repeats=args.repeats)
        peak = peak_extra_bytes(fn, device)
        flops = attention_flops(args.batch, args.heads, S, S, args.head_dim, causal, mode)
        rec.add(case=case, provider=backend, mode=mode, dtype=dt_name, x_name="S", x=S, p20=p20 * 1e3,
                p50=p50 * 1e3, p80=p80 * 1e3, rate=tflops(flops, p50 * 1e3), rate_unit="TFLOP/s",
                memory_mb=peak / 2**20, extra=extra(profile=profile.name))
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{backend} {dt_name} S={S}: {p50 * 1e3:.1f} ms")
    return rec.rows


def write_outputs(rows: list[dict], out: str, plot: bool) -> list[str]:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.csv")
    if os.path.exists(path):
        os.remove(path)  # one run per folder
    append_rows(path, rows)
    written = [path]
    if plot:
        if not available("matplotlib"):
            print("plots skipped: matplotlib is not installed (pip install 'qwen3vl-flash[bench]')")
        else:
            written += _plot(rows, out)
    return written


def _plot(rows: list[dict], out: str) -> list[str]:
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    title = "{panel}, {mode}, {device}, {date}"
    return [
        line_plot(rows, "p50", os.path.join(out, "bench_time.png"), ylabel="median time (ms)", title=title),
        line_plot(rows, "memory_mb", os.path.join(out, "bench_memory.png"), ylabel="peak extra memory (MB)",
                  title=title),
    ]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'backend':15s} {'dtype':9s} {'S':>6s} {'ms':>9s} {'GFLOP/s':>9s} {'peak MB':>9s}")
    for r in rows:
        print(f"{r['provider']:15s} {r['dtype']:9s} {r['x']:6d} {r['p50']:9.2f} {r['rate'] * 1e3:9.1f} "
              f"{r['memory_mb']:9.1f}")


def main(args) -> int:
    print(f"qwen3vl-flash bench on {platform.node() or 'this machine'} -- {qf.detect_hardware().summary()}")
    rows = run(args)
    if not rows:
        print("no backend could run the requested configuration")
        return 1
    paths = write_outputs(rows, args.out, plot=not args.no_plot)
    print_table(rows)
    print("\nwrote " + ", ".join(paths))
    return 0
