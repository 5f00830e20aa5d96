"""Training-step benchmark (issue 16, item 4): Qwen3-VL-8B dimensions, packed rows vs padding.

One training step = forward + backward + AdamW step (fused on CUDA, what transformers' Trainer
uses by default), on a model with Qwen3-VL-8B's dimensions and random weights: the text decoder cut
to ``--layers`` layers (default 2) and the vision tower to ``--vision-layers`` (default: the same),
embeddings and LM head in full, bf16 weights. The data: rows of ``--row-tokens`` (16384) tokens,
each filled exactly with samples of mixed lengths (``--min-len``-``--max-len``, 256-4096 tokens),
about half with an image (64-768 image tokens), as Qwen3-VL's processor lays them out; the first
``--rows`` rows (default 3) are cycled. Providers, each on a model built from the same seed (the
same weights) fed the same rows in the same order:

* ``ours``: ``qf.enable(model)`` + ``qf.PackingCollator`` (one row, its ``cu_seq_lens``); the model's
  ``use_cache`` left True, so transformers builds no mask: one varlen call per layer, text and vision;
* ``ours-blockmask``: the same packed row with ``use_cache=False``: transformers builds its (T x T)
  block-diagonal mask, which we read back as the same segments (what TRL's SFTTrainer and gradient
  checkpointing give: both turn the cache off);
* ``sdpa-padded``: transformers' ``sdpa`` on the same samples as a batch padded to the longest, with
  the padding mask (the vision tower one sdpa call per image);
* ``sdpa-blockmask``: ``sdpa`` on the packed row with ``use_cache=False``: transformers' block mask.

Measured per provider: wall time per step (``torch.cuda.synchronize`` before and after each step;
``--warmup`` steps first, default one pass over the rows, so every shape has been compiled /
autotuned / allocated; then the median and 20th / 80th percentiles of ``--steps`` steps), tokens/s
(real tokens, not padding, at the median), peak memory (CUDA allocator: beyond what was allocated
at the start of a step (weights and optimizer states), and in total), attention's share (one more
step under ``torch.profiler``: GPU time of the attention kernels, forward and backward, text and
vision, matched by kernel name as in ``bench_e2e``, over that step's wall time; on the CPU: not
measured), and every step's loss (all providers start from the same weights and see the same rows,
so their loss curves should agree within bf16 noise; float32 on the CPU: to ~1e-5). The host time
of building the batch (the collator, or the padding) is not in the step; it is shown apart.

    PYTHONPATH=src python3 benchmarks/bench_train.py                    # one GPU, bf16 (~1-2 min on an H200)
    PYTHONPATH=src python3 benchmarks/bench_train.py --layers 4 --providers ours,sdpa-padded
    PYTHONPATH=src python3 benchmarks/bench_train.py --quick            # tiny model on the CPU, code path

Rows (``qwen3vl_flash.benchmarking`` schema, bench ``bench_train``): per provider a ``step time``
row (ms; rate = tokens/s; memory_mb = peak beyond the step's start) and an ``attention time`` row,
appended to ``benchmarks/results/<gpu kind>.csv`` (``--quick``: a smoke CSV in ``$OUT`` or the
temp folder); a table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # bench_e2e's profile helper, also when loaded from elsewhere
    sys.path.insert(0, HERE)

import qwen3vl_flash as qf  # noqa: E402
from qwen3vl_flash.benchmarking import Recorder, extra, other_versions, quantiles, results_csv  # noqa: E402
from qwen3vl_flash.testing import tiny  # noqa: E402

RESULTS = os.path.join(HERE, "results")
PROVIDERS = ("sdpa-padded", "sdpa-blockmask", "ours", "ours-blockmask")
# image sizes in patches (h, w); 2 x 2 patches merge into one token (16 px patches: 16 x 16 = 256 px)
IMAGE_SIZES = {"real": [(16, 16), (24, 32), (32, 32), (48, 64)], "tiny": [(4, 4), (4, 6), (8, 8)]}
QUICK = dict(row_tokens=256, min_len=16, max_len=96, rows=2, steps=3, lr=2e-3)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def row_lengths(row_tokens: int, min_len: int, max_len: int, gen: torch.Generator) -> List[int]:
    """Sample lengths in [min_len, max_len] that add up to exactly ``row_tokens``: drawn
    uniformly, the last one taking what is left (the draw leaves at least ``min_len`` for it)."""
    out, rest = [], row_tokens
    while rest > 0:
        if rest <= max_len:
            n = rest
        else:
            n = int(torch.randint(min_len, min(max_len, rest - min_len) + 1, (1,), generator=gen))
        out.append(n)
        rest -= n
    return out


def sample(config, length: int, image, seed: int) -> Dict[str, torch.Tensor]:
    """One processor-like sample of ``length`` tokens: prompt (text, the image if any) + answer;
    labels -100 over the prompt."""
    if image is not None:
        n_image = image[0] * image[1] // 4 + 2
        question = max(1, (length - n_image) // 4)
        layout, prompt = [question, tiny.Image(*image), length - n_image - question], question + n_image
    else:
        layout, prompt = [length], max(1, length // 4)
    inputs = tiny.make_prompt_inputs(config, [layout], seed=seed)
    inputs.pop("attention_mask")
    s = {k: (v[0] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in inputs.items()}
    s["labels"] = s["input_ids"].clone()
    s["labels"][:prompt] = -100
    return s


def make_rows(config, args, sizes) -> List[List[dict]]:
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for r in range(args.rows):
        row = []
        for i, n in enumerate(row_lengths(args.row_tokens, args.min_len, args.max_len, gen)):
            fits = [s for s in sizes if s[0] * s[1] // 4 + 4 <= n]
            image = None
            if fits and float(torch.rand((), generator=gen)) < args.image_fraction:
                image = fits[int(torch.randint(len(fits), (1,), generator=gen))]
            row.append(sample(config, n, image, seed=args.seed * 7919 + r * 1009 + i))
        rows.append(row)
    return rows


def padded_batch(config, features: List[dict]) -> Dict[str, torch.Tensor]:
    """The samples as one right-padded batch (B = samples, S = the longest), the padding masked
    and unlabelled; the model computes its MRoPE ids from the mask and the grids."""
    B, S = len(features), max(f["input_ids"].numel() for f in features)
    pad = getattr(config.text_config, "pad_token_id", None) or 0
    batch = {"input_ids": torch.full((B, S), pad, dtype=torch.long),
             "attention_mask": torch.zeros((B, S), dtype=torch.long),
             "labels": torch.full((B, S), -100, dtype=torch.long)}
    if "mm_token_type_ids" in features[0]:
        batch["mm_token_type_ids"] = torch.zeros((B, S), dtype=torch.int32)
    for b, f in enumerate(features):
        n = f["input_ids"].numel()
        batch["input_ids"][b, :n] = f["input_ids"]
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = f["labels"]
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"][b, :n] = f["mm_token_type_ids"]
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        have = [f for f in features if pix in f]
        if have:
            batch[pix] = torch.cat([f[pix] for f in have])
            batch[grid] = torch.cat([f[grid] for f in have])
    return batch


def to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# one provider
# ------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config, provider: str, dtype, device, seed: int):
    """The model for one provider: same seed, same weights; ours switched on with qf.enable."""
    model = tiny.build_model(config, "sdpa", dtype=dtype, seed=seed, device=device)
    if provider.startswith("ours"):
        qf.enable(model)
    # transformers builds the packed rows' block mask only without a cache: the -blockmask
    # providers need it off; plain ``ours`` keeps Qwen3-VL's default (True): no (T x T) mask at all
    use_cache = provider == "ours"
    model.config.use_cache = model.config.text_config.use_cache = use_cache
    return model.train()


def train_step(model, opt, batches, losses, i: int) -> None:
    """One training step on row ``i`` (cycled): forward (the model's own loss), backward, AdamW."""
    loss = model(**batches[i % len(batches)]).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.detach().float())  # no host sync inside the step


def run_provider(provider: str, config, rows: List[List[dict]], args, device, dtype, progress) -> dict:
    from bench_e2e import _profiled_attention_ms

    collate_ms = []
    if provider == "sdpa-padded":
        make = lambda feats: padded_batch(config, feats)  # noqa: E731
    else:
        make = qf.PackingCollator(config)
    batches = []
    for feats in rows:
        t0 = time.perf_counter()
        b = make(feats)
        collate_ms.append(1e3 * (time.perf_counter() - t0))
        batches.append(to_device(b, device, dtype))
    real = [sum(f["input_ids"].numel() for f in feats) for feats in rows]
    shaped = [b["input_ids"].numel() for b in batches]

    model = build(config, provider, dtype, device, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    losses: List[torch.Tensor] = []
    step = functools.partial(train_step, model, opt, batches, losses)

    progress(f"{provider}: {args.warmup} warm-up steps")
    for i in range(args.warmup):
        step(i)
    _sync(device)
    times, peaks, starts, tokens = [], [], [], []
    for i in range(args.warmup, args.warmup + args.steps):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            starts.append(torch.cuda.memory_allocated(device))
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(real[i % len(batches)])
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
    i_prof = args.warmup + args.steps
    t0 = time.perf_counter()
    attn_ms, kernels_ms = _profiled_attention_ms(functools.partial(step, i_prof), device)
    prof_wall_ms = 1e3 * (time.perf_counter() - t0)
    p20, p50, p80 = (1e3 * t for t in quantiles(times))
    res = dict(
        provider=provider, p20=p20, p50=p50, p80=p80,
        tokens_per_s=statistics.median(tokens) / (p50 / 1e3),
        peak_extra_mb=max((p - s) for p, s in zip(peaks, starts)) / 2**20 if peaks else float("nan"),
        peak_total_mb=max(peaks) / 2**20 if peaks else float("nan"),
        attn_ms=attn_ms, kernels_ms=kernels_ms, prof_wall_ms=prof_wall_ms,
        attn_share=attn_ms / p50,  # nan on the CPU
        losses=[float(x) for x in losses], collate_ms=statistics.median(collate_ms),
        real_tokens=statistics.median(real), shaped_tokens=statistics.median(shaped),
        batch_shape=tuple(batches[0]["input_ids"].shape),
    )
    del step, model, opt, params, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    progress(f"{provider}: {p50:.1f} ms/step, {res['tokens_per_s']:.0f} tok/s" +
             (f", peak +{res['peak_extra_mb']:.0f} MiB" if peaks else ""))
    return res


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def run(args) -> List[dict]:
    device, dtype = args.device, {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.quick:
        config = tiny.tiny_config(layers=args.layers, vision_depth=args.vision_layers)
        name, sizes = "tiny", IMAGE_SIZES["tiny"]
    else:
        config = tiny.real_config(args.config, layers=args.layers, vision_depth=args.vision_layers)
        name, sizes = args.config, IMAGE_SIZES["real"]
    t_start = time.perf_counter()

    def progress(msg):  # a run cut short still shows how far it got
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    qf.register()
    rows = make_rows(config, args, sizes)
    n_samples = [len(r) for r in rows]
    n_images = [sum("pixel_values" in f for f in r) for r in rows]
    lengths = sorted(f["input_ids"].numel() for r in rows for f in r)
    case = (f"train {name} L={config.text_config.num_hidden_layers} V={config.vision_config.depth} "
            f"row={args.row_tokens}")
    progress(f"{case}: {args.rows} rows of {n_samples} samples ({n_images} with images), lengths "
             f"{lengths[0]}-{lengths[-1]}, {args.dtype} on {device}")
    rec = Recorder("bench_train", args.csv or results_csv(RESULTS, device, args.quick, "bench_train"),
                   device=device, echo=False)
    results = []
    for provider in args.providers:
        try:
            results.append(run_provider(provider, config, rows, args, device, dtype, progress))
        except Exception as exc:  # noqa: BLE001 - one provider failing (e.g. out of memory) keeps the others
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            progress(f"{provider}: FAILED ({why})")
            rec.add(case=case, provider=provider, mode="fwd+bwd+adamw", dtype=args.dtype, x_name="tokens",
                    x=args.row_tokens, metric="step time", unit="ms", status="error", extra=extra(error=why))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not results:
        raise RuntimeError("every provider failed (see above)")
    base = next((r for r in results if r["provider"] == "sdpa-padded"), results[0])
    for r in results:
        r["loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        common = dict(case=case, provider=r["provider"], mode="fwd+bwd+adamw", dtype=args.dtype, x_name="tokens",
                      x=args.row_tokens, unit="ms")
        notes = dict(config=name, layers=config.text_config.num_hidden_layers, vision_layers=config.vision_config.depth,
                     rows=args.rows, samples=n_samples[0], images=n_images[0],
                     batch_shape="x".join(map(str, r["batch_shape"])),
                     real_tokens=r["real_tokens"], shaped_tokens=r["shaped_tokens"], peak_total_mb=r["peak_total_mb"],
                     collate_ms=r["collate_ms"], loss_first=r["losses"][0], loss_last=r["losses"][-1],
                     max_loss_diff_vs=f"{base['provider']}:{r['loss_diff']:.3g}", lr=args.lr,
                     steps=f"{args.warmup}+{args.steps}")
        rec.add(**common, metric="step time", p20=r["p20"], p50=r["p50"], p80=r["p80"], rate=r["tokens_per_s"],
                rate_unit="tok/s", memory_mb=r["peak_extra_mb"],
                extra=extra(other_versions("transformers"), **notes))
        rec.add(**common, metric="attention time", p50=r["attn_ms"],
                status="not measured on CPU" if math.isnan(r["attn_ms"]) else "ok",
                extra=extra(attn_share=r["attn_share"], kernels_ms=r["kernels_ms"], profiled_step_ms=r["prof_wall_ms"],
                            how="torch.profiler CUDA kernels named like attention (bench_e2e.ATTN_KERNELS), fwd+bwd, "
                                "over the median step time"))
    print(f"\nrows appended to {rec.path}\n")
    def num(v, spec):
        return "-".rjust(len(format(0.0, spec))) if math.isnan(v) else format(v, spec)

    hdr = (f"{'provider':15s} {'batch[0]':>9s} {'ms/step p50':>11s} {'tok/s':>9s} {'x base':>10s} "
           f"{'peak+ MiB':>10s} {'x base':>10s} {'total MiB':>10s} {'attn ms':>8s} {'share':>6s} "
           f"{'loss first->last':>18s} {'max|dloss|':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        speed = r["tokens_per_s"] / base["tokens_per_s"]
        mem = r["peak_extra_mb"] / base["peak_extra_mb"]  # nan on the CPU
        shape = "x".join(map(str, r["batch_shape"]))
        print(f"{r['provider']:15s} {shape:>9s} {r['p50']:11.1f} {r['tokens_per_s']:9.0f} {speed:9.2f}x "
              f"{num(r['peak_extra_mb'], '10.0f')} {num(mem, '9.2f')}x {num(r['peak_total_mb'], '10.0f')} "
              f"{num(r['attn_ms'], '8.1f')} {num(r['attn_share'], '6.1%')} "
              f"{r['losses'][0]:8.4f}->{r['losses'][-1]:8.4f} {r['loss_diff']:10.2e}")
    print(f"\ntok/s: real tokens of a row ({base['real_tokens']:.0f}) per median step; 'peak+': CUDA memory allocated "
          f"beyond a step's start (weights and AdamW states), 'total': including them; attention: its kernels' GPU "
          f"time (forward + backward) in one profiled step over the median step time (CPU: not measured); "
          f"base and max|dloss| (over every step): {base['provider']}. Host time to build a batch (not in the step): "
          + ", ".join(f"{r['provider']} {r['collate_ms']:.0f} ms" for r in results))
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="8b", choices=sorted(tiny.REAL_SIZES))
    p.add_argument("--layers", type=int, default=2, help="text decoder layers (default 2)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision tower layers (default: --layers)")
    p.add_argument("--row-tokens", type=int, default=16384, help="tokens of a packed row")
    p.add_argument("--min-len", type=int, default=256, help="shortest sample (tokens)")
    p.add_argument("--max-len", type=int, default=4096, help="longest sample (tokens)")
    p.add_argument("--image-fraction", type=float, default=0.5, help="share of the samples with an image")
    p.add_argument("--rows", type=int, default=3, help="distinct rows, cycled over the steps")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: --rows, one pass)")
    p.add_argument("--steps", type=int, default=6, help="measured steps")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated from {list(PROVIDERS)}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 (CPU: float32)")
    p.add_argument("--device", default=None, help="default cuda if available; cpu implies --quick")
    p.add_argument("--csv", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny model, small rows ({QUICK}): the code path, on the CPU in < 1 min")
    args = p.parse_args(argv)
    try:
        _validate(args, argv)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _validate(args, argv) -> None:
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}") from exc
    if args.device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.device.type == "cpu" and not args.quick:
        print("--device cpu: running the --quick mode (tiny model); 8B dimensions need a GPU", flush=True)
        args.quick = True
    if args.quick:  # the quick sizes, unless given on the command line
        given = " ".join(argv if argv is not None else sys.argv[1:])
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(args, k, v)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    if args.vision_layers is None:
        args.vision_layers = args.layers
    if args.warmup is None:
        args.warmup = args.rows
    for name in ("layers", "vision_layers", "row_tokens", "rows", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.min_len < 8:
        raise ValueError(f"--min-len must be at least 8 tokens, got {args.min_len}")
    if not args.min_len <= args.max_len <= args.row_tokens:
        raise ValueError(f"need --min-len <= --max-len <= --row-tokens, got {args.min_len}, {args.max_len}, "
                         f"{args.row_tokens}")
    if 2 * args.min_len > args.max_len:
        raise ValueError(f"--max-len ({args.max_len}) must be at least twice --min-len ({args.min_len}), so a row "
                         "can always be filled exactly")
    if not 0.0 <= args.image_fraction <= 1.0:
        raise ValueError(f"--image-fraction must be in [0, 1], got {args.image_fraction}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or not providers:
        raise ValueError(f"--providers must be a comma-separated subset of {list(PROVIDERS)}, got {args.providers!r}")
    args.providers = providers


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
