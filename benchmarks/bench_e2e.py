"""End-to-end Qwen3-VL benchmark (issue 4): our attention vs transformers' ``sdpa``, same weights.

Qwen3-VL-8B dimensions with random weights (``--config``, ``--layers`` to cut depth), bf16, one
model switched between implementations (``sdpa`` first, then ``qwen3vl_flash.enable``). Cases:

* ``vision-video``: the vision tower on a video of 32 frames at 448x448 (16 temporal patches of
  28x28 = 16 segments of 784 patches; sdpa makes one call per segment, we make one varlen call);
* ``vision-image``: the vision tower on one 1792x1792 image (12,544 patches, one segment);
* ``prefill``: the text model on a ~16k-token image + text prompt (``logits_to_keep=1``);
* ``decode-dynamic-4k`` / ``decode-dynamic-32k`` / ``decode-static-4k``: greedy decoding after
  a 4k / 32k prompt, DynamicCache or StaticCache (generate compiles the static-cache forward when
  it can); tokens/s = (N - 1) / (time(generate N) - time(generate 1)).

Per case and implementation: median wall time (CUDA-synchronised) over ``--repeats`` after a
warm-up, time inside attention (CUDA events around every call of the registered attention
function, summed; its share of the wall time), peak memory allocated above the start, and for
decode the tokens/s. Rows (``qwen3vl_flash.benchmarking`` schema, bench ``bench_e2e``: per case and
implementation a ``wall time`` row, with the peak memory and, for decode, tokens/s as its rate,
and an ``attention time`` row) are appended to ``benchmarks/results/<gpu kind>.csv`` (or
``--csv``); a table is printed last.

    PYTHONPATH=src python3 benchmarks/bench_e2e.py                    # on one GPU (H100: ~10 min)
    PYTHONPATH=src python3 benchmarks/bench_e2e.py --cases vision-video,prefill --layers 4
    PYTHONPATH=src python3 benchmarks/bench_e2e.py --smoke             # tiny model, CPU, code path only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

import qwen3vl_flash as qf
from qwen3vl_flash.benchmarking import Recorder, extra, other_versions, results_csv
from qwen3vl_flash.testing import tiny

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

K = 1024
ALL_CASES = ["vision-video", "vision-image", "prefill", "decode-dynamic-4k", "decode-dynamic-32k", "decode-static-4k"]


def schema_rows(r: dict):
    """One (case, implementation) result as rows of the benchmark schema: wall time (with the peak
    memory and tokens/s) and the time inside attention (also used on the archived CSVs)."""
    base = dict(case=r["case"], provider=r["impl"], mode="inference", dtype=r["dtype"], x_name="tokens",
                x=r["tokens"], unit="ms")
    ex = dict(config=r["config"], layers=r["layers"], vision_depth=r["vision_depth"], note=r["note"])
    versions = r.get("versions") or (f"transformers={r['transformers']}" if r.get("transformers") else "")
    wall = dict(base, metric="wall time", p50=r["ms_p50"], memory_mb=r["peak_mb"],
                extra=extra(versions, ms_min=r["ms_min"], same_as_sdpa=r["same_as_sdpa"], **ex))
    if str(r["tokens_per_s"]) not in ("nan", ""):  # decode: the rate
        wall.update(rate=r["tokens_per_s"], rate_unit="tok/s")
    attn = dict(base, metric="attention time", p50=r["attn_ms"], extra=extra(attn_share=r["attn_share"], **ex))
    return [wall, attn]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AttentionTimer:
    """Wraps the registered attention functions (ours and sdpa) with CUDA events (CPU: wall)."""

    def __init__(self, device):
        from transformers import AttentionInterface

        self.device = device
        self.mapping = AttentionInterface._global_mapping
        self.pairs = []
        self.originals = {}

    def __enter__(self):
        for name in (qf.ATTN_IMPLEMENTATION, "sdpa"):
            fn = self.mapping[name]
            self.originals[name] = fn

            def timed(*a, _fn=fn, **k):
                if self.device.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    out = _fn(*a, **k)
                    e.record()
                    self.pairs.append((s, e))
                else:
                    t0 = time.perf_counter()
                    out = _fn(*a, **k)
                    self.pairs.append(time.perf_counter() - t0)
                return out

            self.mapping[name] = timed
        return self

    def __exit__(self, *exc):
        self.mapping.update(self.originals)

    def reset(self):
        self.pairs = []

    @contextlib.contextmanager
    def paused(self):
        """The plain attention functions for a while: the timer's Python callbacks (event records,
        list appends) break the graph that generate compiles for a StaticCache."""
        wrapped = {name: self.mapping[name] for name in self.originals}
        self.mapping.update(self.originals)
        try:
            yield
        finally:
            self.mapping.update(wrapped)

    def total_ms(self) -> float:
        _sync(self.device)
        if self.device.type == "cuda":
            return sum(s.elapsed_time(e) for s, e in self.pairs)
        return 1e3 * sum(self.pairs)


# GPU kernels counted as attention in a profile: cuDNN's fused SDPA, PyTorch's flash and
# memory-efficient (fmha) kernels, and ours (Triton: forward, backward, split-KV decode + merge)
ATTN_KERNELS = ("sdpa", "flash", "fmha", "attention", "_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_preprocess",
                "_split_kernel", "_merge_kernel")


def _profiled_attention_ms(fn, device):
    """(attention kernel ms, all kernel ms) over one call of fn, from torch.profiler's GPU
    activity, matched by kernel name (ATTN_KERNELS). Works where event timers cannot: inside
    generate's compiled, CUDA-graph-replayed step. (nan, nan) on CPU or if no kernel was seen."""
    if device.type != "cuda":
        fn()
        return float("nan"), float("nan")
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    attn = total = 0.0
    for e in prof.events():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not us:
            continue
        total += us
        if any(k in e.name for k in ATTN_KERNELS):
            attn += us
    if total == 0:
        return float("nan"), float("nan")
    return attn / 1e3, total / 1e3


@contextmanager
def _peak(device, box):
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        _sync(device)
        box["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
    else:
        yield
        box["peak_mb"] = float("nan")


def _timed(fn, device, repeats, timer):
    fn()  # warm-up
    times, attn = [], []
    box = {}
    for i in range(repeats):
        timer.reset()
        with _peak(device, box) if i == 0 else _null():
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
        attn.append(timer.total_ms())
    return out, statistics.median(times), min(times), statistics.median(attn), box.get("peak_mb", float("nan"))


@contextmanager
def _null():
    yield


def _vision_inputs(cfg, case, device, dtype, smoke):
    vc = cfg.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    gen = torch.Generator(device=device).manual_seed(0)  # the same pixels for both implementations
    if case == "vision-video":
        grid = [[2, 4, 4]] if smoke else [[16, 28, 28]]  # 32 frames of 448x448
    else:
        grid = [[1, 8, 8]] if smoke else [[1, 112, 112]]  # 1792x1792
    grid = torch.tensor(grid, device=device)
    pixels = torch.randn(int(grid.prod(-1).sum()), dim, device=device, generator=gen).to(dtype)
    return pixels, grid


def _text_prompt(cfg, total, device, dtype, smoke, with_image=True):
    """An image + text prompt of about ``total`` tokens."""
    side = 8 if smoke else 56  # 896x896 image: 56x56 patches -> 784 tokens
    img = [tiny.Image(side, side)] if with_image else []
    n_img = side * side // 4 + 2 if with_image else 0
    text = max(8, total - n_img)
    return tiny.make_prompt_inputs(cfg, [[text // 2, *img, text - text // 2]], device=device, dtype=dtype)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    smoke = args.smoke
    if smoke:
        cfg = tiny.tiny_config()
    else:
        cfg = tiny.real_config(args.config, layers=args.layers, vision_depth=args.vision_depth)
    cases = ALL_CASES if args.cases == "all" else args.cases.split(",")
    meta = dict(config="tiny" if smoke else args.config, layers=cfg.text_config.num_hidden_layers,
                vision_depth=cfg.vision_config.depth, dtype=args.dtype, versions=other_versions("transformers"))
    rec = Recorder("bench_e2e", args.csv or results_csv(RESULTS, device, smoke, "bench_e2e"), device=device,
                   echo=False)
    t_start = time.perf_counter()

    def progress(msg):  # a long run that gets killed still shows how far it got
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    qf.register()
    progress(f"building {meta['config']} ({meta['layers']} text layers, vision depth {meta['vision_depth']}) on {device}")
    model = tiny.build_model(cfg, "sdpa", dtype=dtype, seed=0, device=device)
    progress("model built")
    rows = []
    scale = 1 / 64 if smoke else 1
    with AttentionTimer(device) as timer, torch.no_grad():
        for case in cases:
            results = {}
            impls = ["sdpa", qf.ATTN_IMPLEMENTATION] + [f"{qf.ATTN_IMPLEMENTATION}-{m}" for m in args.quant]
            for impl in impls:
                progress(f"{case}: {impl}")
                if impl == "sdpa":
                    model.set_attn_implementation("sdpa") if hasattr(model, "set_attn_implementation") else None
                    for c in (model.config, model.config.text_config, model.config.vision_config):
                        c._attn_implementation = "sdpa"
                else:  # "qwen3vl_flash-int8": quantised vision tower and prefill (decode stays exact)
                    qf.enable(model, quant=impl.rsplit("-", 1)[1] if impl != qf.ATTN_IMPLEMENTATION else None)
                note = ""
                tokens_per_s = float("nan")
                if case.startswith("vision"):
                    pixels, grid = _vision_inputs(cfg, case, device, dtype, smoke)
                    tokens = pixels.shape[0]

                    def fn():
                        out = model.model.visual(pixels, grid_thw=grid)
                        return out[0] if isinstance(out, tuple) else getattr(out, "pooler_output", out)

                    out, p50, mn, attn, peak = _timed(fn, device, args.repeats, timer)
                elif case == "prefill":
                    inputs = _text_prompt(cfg, int(16 * K * scale), device, dtype, smoke)
                    tokens = inputs["input_ids"].shape[1]

                    def fn():
                        return model(**inputs, logits_to_keep=1, use_cache=False).logits

                    out, p50, mn, attn, peak = _timed(fn, device, args.repeats, timer)
                else:
                    _, kind, length = case.split("-")
                    L = int(int(length[:-1]) * K * scale)
                    inputs = _text_prompt(cfg, L, device, dtype, smoke, with_image=False)
                    tokens = inputs["input_ids"].shape[1]
                    n = args.decode_tokens
                    kw = dict(do_sample=False, cache_implementation=None if kind == "dynamic" else "static")

                    def gen(m):
                        return model.generate(**inputs, max_new_tokens=m, min_new_tokens=m, **kw)

                    static = kind == "static"
                    pause = timer.paused() if static else _null()
                    pause.__enter__()
                    gen(n)  # warm-up (and compile, for the static cache)
                    t1s, tns = [], []
                    box = {}
                    for i in range(args.repeats):
                        _sync(device)
                        t0 = time.perf_counter()
                        gen(1)
                        _sync(device)
                        t1s.append(time.perf_counter() - t0)
                        timer.reset()
                        with _peak(device, box) if i == 0 else _null():
                            t0 = time.perf_counter()
                            out = gen(n)
                            _sync(device)
                        tns.append(time.perf_counter() - t0)
                    decode_s = statistics.median(tns) - statistics.median(t1s)
                    tokens_per_s = (n - 1) / decode_s if decode_s > 0 else float("nan")
                    p50, mn = 1e3 * statistics.median(tns), 1e3 * min(tns)
                    attn, peak = timer.total_ms(), box.get("peak_mb", float("nan"))
                    note = f"generate {n} tokens"
                    if static:  # the event timer would break generate's compiled graph: a profile
                        attn, gpu_ms = _profiled_attention_ms(lambda: gen(n), device)
                        note += (f", attention from a profile of one generate (kernels by name; all GPU kernels "
                                 f"{gpu_ms:.1f} ms)")
                    pause.__exit__(None, None, None)
                results[impl] = out
                same = ""
                if impl != "sdpa":
                    ref = results["sdpa"]
                    same = bool(torch.equal(out, ref)) if case.startswith("decode") else \
                        f"max|diff| {(out.float() - ref.float()).abs().max().item():.3g}"
                rows.append(dict(case=case, impl=impl, tokens=tokens, ms_p50=round(p50, 3), ms_min=round(mn, 3),
                                 attn_ms=round(attn, 3), attn_share=round(attn / p50, 3) if p50 else "",
                                 peak_mb=round(peak, 1), tokens_per_s=round(tokens_per_s, 2), same_as_sdpa=same,
                                 note=note, **meta))
                print(f"{case:20s} {impl:14s} tokens {tokens:6d}  {p50:9.2f} ms  attn {attn:9.2f} ms "
                      f"({attn / p50:5.1%})  peak {peak:9.1f} MB  {tokens_per_s:8.2f} tok/s  {same}", flush=True)

    for r in rows:
        for sr in schema_rows(r):
            rec.add(**sr)
    print(f"\nrows appended to {rec.path}")
    print(f"\n{'case':20s} {'ours':20s} {'speed-up':>9s} {'attn speed-up':>14s} {'peak ratio':>11s}")
    by = {(r["case"], r["impl"]): r for r in rows}
    for case, impl in [(c, i) for c in cases for i in impls[1:]]:
        a, b = by[(case, "sdpa")], by[(case, impl)]
        if case.startswith("decode"):
            speed = b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] else float("nan")
        else:
            speed = a["ms_p50"] / b["ms_p50"]
        attn = a["attn_ms"] / b["attn_ms"] if b["attn_ms"] else float("nan")
        peak = b["peak_mb"] / a["peak_mb"] if a["peak_mb"] and a["peak_mb"] == a["peak_mb"] else float("nan")
        print(f"{case:20s} {impl:20s} {speed:8.2f}x {attn:13.2f}x {peak:10.2f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="8b", choices=sorted(tiny.REAL_SIZES))
    p.add_argument("--layers", type=int, default=None, help="text layers (default: the model's)")
    p.add_argument("--vision-depth", type=int, default=None, help="vision layers (default: the model's)")
    p.add_argument("--cases", default="all", help=f"comma-separated from {ALL_CASES}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=65)
    p.add_argument("--quant", default="", help="also run qf.enable(model, quant=...) for these modes, e.g. int8,fp8")
    p.add_argument("--csv", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU), to check the code path")
    args = p.parse_args(argv)
    args.quant = [m for m in args.quant.split(",") if m]
    if args.smoke:
        args.dtype = ("float32" if args.dtype == "bfloat16" and not torch.cuda.is_available() and not args.quant
                      else args.dtype)
        args.decode_tokens = min(args.decode_tokens, 5)
        args.repeats = min(args.repeats, 2)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
