"""``qwen3vl-flash demo``: a Qwen3-VL end to end, our attention against ``sdpa``, no downloads.

    qwen3vl-flash demo                                   # tiny random model, CPU, < 1 min
    qwen3vl-flash demo --config 8b --layers 4 --device cuda --dtype bfloat16

One image + video + text prompt goes through ``generate`` twice on the same weights: with
transformers' ``sdpa`` and with ours (switched by ``qwen3vl_flash.enable``). Printed: whether the
generated tokens are identical, the largest difference of the per-step logits, the time of each
run and its peak memory (CUDA: peak allocated bytes above the start; CPU: peak resident-set growth,
sampled every 2 ms).
"""

from __future__ import annotations

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
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
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
    # random weights in bf16/fp16 have near-ties that rounding can flip; fp32 must agree
    return 0 if same or dtype != torch.float32 else 1


def argparse_ns(args, **changes):
    import argparse

    d = dict(vars(args))
    d.update(changes)
    return argparse.Namespace(**d)
