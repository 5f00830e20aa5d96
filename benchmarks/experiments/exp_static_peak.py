"""GPU experiment: where does ours' +16 MB of peak memory in StaticCache generate come from
(docs/performance.md, issue 4)? ``generate`` after a 4k-token prompt on Qwen3-VL-8B dimensions
with few layers, StaticCache and DynamicCache, sdpa beside ours: peak memory beyond what was
allocated before the call. ``--tokens 1`` is the prefill alone (no decode step, no compile).

    PYTHONPATH=src python3 benchmarks/experiments/exp_static_peak.py [--layers 2]
"""

import argparse

import torch

import qwen3vl_flash as qf
from qwen3vl_flash.integrations import tiny


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1, help="new tokens (1: the prefill only)")
    ap.add_argument("--no-compile", action="store_true", help="StaticCache decode steps without generate's compile")
    args = ap.parse_args()
    dev = torch.device("cuda")
    qf.register()
    cfg = tiny.real_config("8b", layers=args.layers)
    inputs = tiny.make_prompt_inputs(cfg, [[args.prompt]], device=dev, dtype=torch.bfloat16)
    for impl in ("sdpa", qf.ATTN_IMPLEMENTATION):
        model = tiny.build_model(cfg, impl, dtype=torch.bfloat16, seed=3, device=dev)
        for cache in ("static", None):
            for _ in range(2):  # the second call is measured (allocator warm)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               cache_implementation=cache, disable_compile=args.no_compile)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - start) / 2**20
            print(f"{impl:14s} {cache or 'dynamic':8s} layers {args.layers} prompt {args.prompt} tokens {args.tokens}"
                  f"{' (no compile)' if args.no_compile else ''}: peak {peak:8.1f} MB", flush=True)
        del model


if __name__ == "__main__":
    main()
