"""GPU check: generate with a StaticCache and transformers' own compile (inductor,
``mode="reduce-overhead"``: CUDA-graph trees), ours beside sdpa, on a tiny Qwen3-VL or on real
dimensions with few layers. Prints, per implementation:

* the time of each generate call and the decode rate (``t(n tokens) - t(1 token)``, prefill
  excluded), the number of compiled graphs, recompiles and graph breaks;
* with ``--profile``: from a profile of one generate, per decode step, how many CUDA graphs were
  launched and how many kernels were launched from the host *outside* graphs (a step that
  replays whole should launch ~0), and the host functions that took the most time;
* whether the tokens equal sdpa's, and where they do not: the first differing step, sdpa's
  margin between its two best logits there and the largest logit difference before it (a flip
  where the margin is within that difference is bf16 noise, not a wrong attention).

    PYTHONPATH=src python3 tests/gpu/check_generate_compile.py [--config 8b --layers 4 --prompt 4096]
"""

import argparse
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

import qwen3vl_flash as qf
from qwen3vl_flash.testing import tiny


def launch_counts(prof, steps: int):
    """(graph launches, host kernel launches, top host functions) per decode step of a profile."""
    graphs = kernels = 0
    for e in prof.events():
        name = e.name
        if "GraphLaunch" in name:
            graphs += 1
        elif "LaunchKernel" in name:
            kernels += 1
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60)
    return graphs / steps, kernels / steps, table


def divergence(a_logits, b_logits, a_tokens, b_tokens) -> str:
    """Where two greedy generations part: the step, the reference's top-2 margin there and the
    largest logit difference over the steps before it (batch row 0 of each)."""
    for i, (ta, tb) in enumerate(zip(a_tokens[0], b_tokens[0])):
        if ta != tb:
            top = a_logits[i][0].float().topk(2).values
            before = max((float((a_logits[j][0].float() - b_logits[j][0].float()).abs().max()) for j in range(i)),
                         default=float("nan"))
            here = float((a_logits[i][0].float() - b_logits[i][0].float()).abs().max())
            return (f"first differing step {i}: sdpa's top-2 margin {float(top[0] - top[1]):.4g}, "
                    f"max|logit diff| {here:.4g} there, {before:.4g} over the steps before")
    return "no differing step in row 0"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="2b|4b|8b (default: the tiny test model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512, help="text tokens of the prompt (real configs)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="profile one generate: launches per decode step")
    ap.add_argument("--impls", default=None, help="comma-separated (default: sdpa and ours)")
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
    n = args.tokens
    res = {}
    impls = args.impls.split(",") if args.impls else ["sdpa", qf.ATTN_IMPLEMENTATION]
    for impl in impls:
        torch._dynamo.reset()
        counters.clear()
        model = tiny.build_model(cfg, impl, dtype=dtype, seed=3, device=dev)

        def gen(m, **extra):
            return model.generate(**inputs, max_new_tokens=m, min_new_tokens=m, do_sample=False,
                                  cache_implementation="static", **kw, **extra)

        def timed(m):
            sync()
            t0 = time.perf_counter()
            gen(m)
            sync()
            return time.perf_counter() - t0

        first = [timed(n), timed(n)]  # compile, then the first replays
        t1 = [timed(1) for _ in range(args.repeats)]
        tn = [timed(n) for _ in range(args.repeats)]
        decode_s = statistics.median(tn) - statistics.median(t1)
        rate = (n - 1) / decode_s if decode_s > 0 else float("nan")
        out = gen(n, return_dict_in_generate=True, output_logits=True)
        res[impl] = (out.sequences[:, -n:].tolist(), [x.cpu() for x in out.logits])
        stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}
        print(f"{impl:14} generate s: {', '.join(f'{t:.2f}' for t in first)}; {n} tokens p50 "
              f"{statistics.median(tn):.3f} s, 1 token p50 {statistics.median(t1):.3f} s -> decode "
              f"{rate:.1f} tok/s  {stats}", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:  # n tokens again: the same cache, no recompile
                gen(n)
                sync()
            g, k, table = launch_counts(prof, n - 1)
            print(f"{impl:14} per decode step (incl. the prefill's share): {g:.1f} graph launches, "
                  f"{k:.1f} host kernel launches\n{table}", flush=True)
        del model
    if len(res) < 2:
        return 0
    (ta, la), (tb, lb) = res[impls[0]], res[impls[1]]
    print(f"tokens equal to {impls[0]}: {ta == tb}")
    if ta != tb:
        print(divergence(la, lb, ta, tb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
