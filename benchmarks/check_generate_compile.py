"""GPU check: generate with a StaticCache and transformers' own compile (inductor,
``mode="reduce-overhead"``: CUDA-graph trees), ours beside sdpa, on a tiny Qwen3-VL or on real
dimensions with few layers. Prints the time of each generate call, the number of compiled graphs,
recompiles and graph breaks, and whether the tokens equal sdpa's.

    PYTHONPATH=src python3 benchmarks/check_generate_compile.py [--config 8b --layers 4 --prompt 4096]
"""

import argparse
import sys
import time

import torch
from torch._dynamo.utils import counters

import qwen3vl_flash as qf
from qwen3vl_flash.integrations import tiny


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="2b|4b|8b (default: the tiny test model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512, help="text tokens of the prompt (real configs)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (the eager compile backend, no graphs)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    kw = {}
    if dev.type == "cpu":  # generate compiles on accelerators only, unless told
        from transformers.generation.configuration_utils import CompileConfig

        kw["compile_config"] = CompileConfig(backend="eager")
        kw["compile_config"]._compile_all_devices = True
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    qf.register()
    if args.config:
        cfg = tiny.real_config(args.config, layers=args.layers)
        dtype = torch.bfloat16
        inputs = tiny.make_prompt_inputs(cfg, [[args.prompt]], device=dev, dtype=dtype)
    else:
        cfg, dtype = tiny.tiny_config(), torch.float32
        inputs = {k: v.to(dev) for k, v in tiny.make_batch(cfg, seed=5).items()}
    toks = {}
    for impl in ("sdpa", qf.ATTN_IMPLEMENTATION):
        torch._dynamo.reset()
        counters.clear()
        model = tiny.build_model(cfg, impl, dtype=dtype, seed=3, device=dev)
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                 cache_implementation="static", **kw)
            sync()
            times.append(time.perf_counter() - t0)
        toks[impl] = out[:, -args.tokens:].tolist()
        stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}
        print(f"{impl:14} generate s: {', '.join(f'{t:.2f}' for t in times)}  "
              f"({args.tokens / times[-1]:.1f} tok/s last)  {stats}", flush=True)
        del model
    same = toks["sdpa"] == toks[qf.ATTN_IMPLEMENTATION]
    print(f"tokens equal to sdpa: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
