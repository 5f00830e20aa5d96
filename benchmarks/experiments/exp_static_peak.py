"""GPU experiment: where does ours' +16 MB of peak memory in StaticCache generate come from
(docs/performance.md, issue 4)? ``generate`` after a 4k-token prompt on Qwen3-VL-8B dimensions
with few layers, StaticCache and DynamicCache, sdpa beside ours: peak memory beyond what was
allocated before the call. ``--tokens 1`` is the prefill alone (no decode step, no compile).

    PYTHONPATH=src python3 benchmarks/experiments/exp_static_peak.py [--layers 2]
"""

import argparse

import torch

import qwen3vl_flash as qf
from qwen3vl_flash.testing import tiny


def print_peak_allocations(snap, label, top=8):
    """Replay the allocator trace: the allocations made during the call that are alive at its
    peak, largest first, each with its innermost frames from our package or transformers."""
    live, total, best, best_set = {}, 0, -1, {}
    for ev in snap["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > best:
                best, best_set = total, dict(live)
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    print(f"  {label}: peak of the traced allocations {best / 2**20:.1f} MB; largest alive then:")
    for ev in sorted(best_set.values(), key=lambda e: -e["size"])[:top]:
        frames = [f"{f['filename'].split('site-packages/')[-1].split('src/')[-1]}:{f['line']} {f['name']}"
                  for f in ev.get("frames", []) if "qwen3vl_flash" in f["filename"] or "transformers" in f["filename"]]
        print(f"    {ev['size'] / 2**20:8.2f} MB  " + " <- ".join(frames[:4]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1, help="new tokens (1: the prefill only)")
    ap.add_argument("--no-compile", action="store_true", help="StaticCache decode steps without generate's compile")
    ap.add_argument("--snapshot", action="store_true",
                    help="record the allocator's history of each measured call and print what is alive at its peak")
    args = ap.parse_args()
    dev = torch.device("cuda")
    qf.register()
    cfg = tiny.real_config("8b", layers=args.layers)
    inputs = tiny.make_prompt_inputs(cfg, [[args.prompt]], device=dev, dtype=torch.bfloat16)
    for impl in ("sdpa", qf.ATTN_IMPLEMENTATION):
        model = tiny.build_model(cfg, impl, dtype=torch.bfloat16, seed=3, device=dev)
        for cache in ("static", None):
            for i in range(2):  # the second call is measured (allocator warm)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                if args.snapshot and i == 1:
                    torch.cuda.memory._record_memory_history(max_entries=200000)
                model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               cache_implementation=cache, disable_compile=args.no_compile)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - start) / 2**20
            if args.snapshot:
                snap = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                print_peak_allocations(snap, f"{impl} {cache or 'dynamic'}")
            print(f"{impl:14s} {cache or 'dynamic':8s} layers {args.layers} prompt {args.prompt} tokens {args.tokens}"
                  f"{' (no compile)' if args.no_compile else ''}: peak {peak:8.1f} MB", flush=True)
        del model


if __name__ == "__main__":
    main()
