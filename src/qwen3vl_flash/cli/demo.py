"""``qwen3vl-flash demo``: a Qwen3-VL end to end, our attention against ``sdpa``, no downloads.

    qwen3vl-flash demo                                   # tiny random model, CPU, < 1 min
    qwen3vl-flash demo --config 8b --layers 4 --device cuda --dtype bfloat16
    qwen3vl-flash demo --monitor                         # + which backend served each attention call

One image + video + text prompt goes through ``generate`` twice on the same weights: with
transformers' ``sdpa`` and with ours (switched by ``qwen3vl_flash.enable``). Printed: whether the
generated tokens are identical, the largest difference of the per-step logits, the time of each
run and its peak memory (CUDA: peak allocated bytes above the start; CPU: peak resident-set growth,
sampled every 2 ms).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from contextlib import contextmanager

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--config", default="tiny", choices=["tiny", "2b", "4b", "8b"],
                   help="tiny (default) or real Qwen3-VL dimensions with random weights")
    p.add_argument("--layers", type=int, default=None, help="text layers (real configs: default 2)")
    p.add_argument("--vision-depth", type=int, default=None, help="vision layers (real configs: default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="KV cache class")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (default: 64 tiny, 448 real)")
    p.add_argument("--video-frames", type=int, default=None, help="video frames (default: 4 tiny, 8 real)")
    p.add_argument("--video-size", type=int, default=None, help="video frame side in pixels (default: image size / 2)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens around the media (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--monitor", action="store_true",
                   help="record our timed run's attention calls (qwen3vl_flash.monitor) and print the summary")
    p.add_argument("--quant", default=None, choices=["int8", "fp8"],
                   help="also generate with quantised attention (qf.enable(model, quant=...)) and report token "
                        "agreement and logit differences against our exact run (default dtype then bfloat16)")


@contextmanager
def _peak_memory(device: torch.device):
    """Yields a dict that holds 'peak_mb' after the block."""
    result = {"peak_mb": float("nan"), "kind": ""}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        result["kind"] = "peak allocated above start"
        return
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        except OSError:
            return 0

    start = rss()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss())
        result["peak_mb"] = (peak[0] - start) / 2**20
        result["kind"] = "peak RSS growth (sampled)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(model, inputs, args, device):
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
              return_dict_in_generate=True, output_logits=True,
              cache_implementation=None if args.cache == "dynamic" else "static")
    with torch.no_grad(), _peak_memory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kw)
        _sync(device)
        seconds = time.perf_counter() - t0
    return out, seconds, mem


def main(args) -> int:
    import qwen3vl_flash as qf
    from qwen3vl_flash._optional import require
    from qwen3vl_flash.testing import tiny

    tf = require("transformers", "qwen3vl-flash demo")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" or getattr(args, "quant", None) else torch.float32)
    if getattr(args, "quant", None):  # refuse fp8 off sm89+ / a float32 run now, not after two generations
        from qwen3vl_flash.quant import check_quant

        probe = torch.empty(0, dtype=dtype, device=device)
        check_quant(args.quant, probe, probe, probe)
    real = args.config != "tiny"
    if real:
        cfg = tiny.real_config(args.config, layers=args.layers or 2, vision_depth=args.vision_depth or 2)
    else:
        kw = {}
        if args.layers:
            kw["layers"] = args.layers
        if args.vision_depth:
            kw["vision_depth"] = args.vision_depth
        cfg = tiny.tiny_config(**kw)
    patch = cfg.vision_config.patch_size
    merge = cfg.vision_config.spatial_merge_size
    image = args.image_size or (448 if real else 64)
    vsize = args.video_size or max(patch * merge, image // 2)
    frames = args.video_frames or (8 if real else 4)
    text = args.text_tokens or 24

    def grid(px):  # patches per side, a multiple of the 2x2 merge
        return max(merge, (px // patch) // merge * merge)

    prompt = [text // 2, tiny.Image(grid(image), grid(image)), 2,
              tiny.Video(max(1, frames // cfg.vision_config.temporal_patch_size), grid(vsize), grid(vsize)),
              text - text // 2]
    inputs = tiny.make_prompt_inputs(cfg, [prompt], seed=args.seed, device=device, dtype=dtype)
    prompt_len = inputs["input_ids"].shape[1]

    print(f"qwen3vl-flash demo: transformers {tf.__version__}, torch {torch.__version__}, device {device}, "
          f"{str(dtype)[6:]}, profile {qf.select_profile(qf.detect_hardware(device)).name}")
    tc, vc = cfg.text_config, cfg.vision_config
    print(f"model   : {args.config} dims, {tc.num_hidden_layers} text layers ({tc.num_attention_heads}/"
          f"{tc.num_key_value_heads} heads, hd {tc.head_dim}), {vc.depth} vision layers ({vc.num_heads} heads, "
          f"hd {vc.hidden_size // vc.num_heads}), random weights")
    print(f"prompt  : {prompt_len} tokens (image {image}px, video {frames} frames of {vsize}px, text); "
          f"generate {args.max_new_tokens} tokens greedily, {args.cache} cache")

    model = tiny.build_model(cfg, "sdpa", dtype=dtype, seed=args.seed, device=device)
    _run(model, inputs, argparse_ns(args, max_new_tokens=2), device)  # warm-up (allocator, kernels)
    ref, t_ref, mem_ref = _run(model, inputs, args, device)
    qf.enable(model)
    _run(model, inputs, argparse_ns(args, max_new_tokens=2), device)
    mon = qf.monitor(model=model) if args.monitor else contextlib.nullcontext()
    with mon:
        out, t_ours, mem_ours = _run(model, inputs, args, device)

    same = torch.equal(out.sequences, ref.sequences)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out.logits, ref.logits))
    scale = max(b.float().abs().max().item() for b in ref.logits)
    first_diff = None
    if not same:
        neq = (out.sequences[:, prompt_len:] != ref.sequences[:, prompt_len:]).any(0).nonzero()
        first_diff = int(neq[0]) if len(neq) else None
    print()
    print(f"{'attention':16s} {'time (s)':>9s} {'tokens/s':>9s} {'peak (MB)':>10s}")
    for name, secs, mem in (("sdpa", t_ref, mem_ref), (qf.ATTN_IMPLEMENTATION, t_ours, mem_ours)):
        print(f"{name:16s} {secs:9.3f} {args.max_new_tokens / secs:9.1f} {mem['peak_mb']:10.1f}")
    print(f"(peak = {mem_ours['kind']})")
    print()
    print(f"tokens identical : {'yes' if same else f'NO (first difference at new token {first_diff})'}")
    print(f"max logit diff   : {diff:.3g} (logits up to {scale:.3g})")
    print(f"generated        : {out.sequences[0, prompt_len:].tolist()}")
    if args.monitor:
        print()
        print(f"attention calls of the {qf.ATTN_IMPLEMENTATION} run above (its time includes the monitor's "
              "small per-call cost):")
        print(mon.summary())
    if getattr(args, "quant", None):
        _quant_report(model, inputs, args, device, out, prompt_len)
    # random weights in bf16/fp16 have near-ties that rounding can flip; fp32 must agree
    return 0 if same or dtype != torch.float32 else 1


def argparse_ns(args, **changes):
    import argparse

    d = dict(vars(args))
    d.update(changes)
    return argparse.Namespace(**d)


def _quant_report(model, inputs, args, device, exact, prompt_len: int) -> dict:
    """Generate again with ``qf.enable(model, quant=args.quant)`` and print how it agrees with
    ``exact`` (our unquantised run, same weights and dtype); returns the numbers.

    After the first divergence the two runs condition on different tokens, so logit differences
    are taken over the steps up to and including it. The margin at the divergence is the exact
    run's logit of its own pick minus its logit of the quantised run's pick (a near tie when
    small); without a divergence, the smallest top-1 / top-2 gap of the exact run (how far the
    closest step was from flipping)."""
    import qwen3vl_flash as qf

    qf.enable(model, quant=args.quant)
    try:
        _run(model, inputs, argparse_ns(args, max_new_tokens=2), device)
        res, secs, _ = _run(model, inputs, args, device)
    finally:
        qf.enable(model)  # back to exact attention for whoever holds the model
    a, b = exact.sequences[0, prompt_len:], res.sequences[0, prompt_len:]
    n = min(a.numel(), b.numel())
    neq = (a[:n] != b[:n]).nonzero().flatten()
    first = int(neq[0]) if neq.numel() else None
    upto = n if first is None else first + 1
    diffs = [(x.float() - y.float()).abs().max().item() for x, y in zip(exact.logits[:upto], res.logits[:upto])]
    scale = max(x.float().abs().max().item() for x in exact.logits[:upto])
    if first is not None:
        ref_logits = exact.logits[first][0].float()
        margin = (ref_logits[a[first]] - ref_logits[b[first]]).item()
    else:
        top2 = [x[0].float().topk(2).values for x in exact.logits[:n]]
        margin = min((t[0] - t[1]).item() for t in top2)
    agree = int((a[:n] == b[:n]).sum())
    print()
    dtype = next(model.parameters()).dtype
    print(f"quant={args.quant!r} against our exact {str(dtype)[6:]} run, same weights ({secs:.3f} s):")
    print(f"tokens equal     : {agree}/{n}" + ("" if first is None else f", first divergence at new token {first}"))
    print(f"max logit diff   : {max(diffs):.3g} over {upto} steps (logits up to {scale:.3g})")
    if first is not None:
        print(f"divergence margin: {margin:.3g} (exact run's logit of its token minus of the quantised pick)")
    else:
        print(f"closest margin   : {margin:.3g} (smallest top-1 minus top-2 logit of the exact run)")
    print(f"generated        : {b.tolist()}")
    return {"agree": agree, "n": n, "first_divergence": first, "max_logit_diff": max(diffs), "margin": margin}
