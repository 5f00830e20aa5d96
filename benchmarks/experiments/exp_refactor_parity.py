"""Refactor parity on one GPU (issue 13): the same calls through the tree before the refactor and
after it, each in its own process; outputs and gradients compared bitwise, the kernels' launch
constexprs compared, times (do_bench median, through the public API) side by side, SDPA cuDNN beside.

    git archive bdc9bf5 src | tar -x -C .carry && mv .carry/src .carry/old_src     # the tree before
    PYTHONPATH=.carry/old_src python3 benchmarks/experiments/exp_refactor_parity.py run $OUT/old.json
    PYTHONPATH=src python3 benchmarks/experiments/exp_refactor_parity.py run $OUT/new.json
    PYTHONPATH=src python3 benchmarks/experiments/exp_refactor_parity.py compare $OUT/old.json $OUT/new.json $OUT/p.csv

Results of 2026-12-01 (H200): benchmarks/results/h200.csv, bench experiments/exp_refactor_parity.
"""
import json, sys, time
import torch

CASES = [  # name, B, Sq, Sk, H, Hkv, D, causal, varlen-segments
    ("text-causal-4k", 1, 4096, 4096, 32, 8, 128, True, None),
    ("text-causal-16k", 1, 16384, 16384, 32, 8, 128, True, None),
    ("vision-hd72-varlen-8x1024", 1, 8192, 8192, 16, 16, 72, False, 8),
    ("vision-hd64-noncausal-4k", 1, 4096, 4096, 16, 16, 64, False, None),
]

def run(outfile):
    import qwen3vl_flash as qf
    import triton
    import qwen3vl_flash.backends.triton_fwd as tfm
    real = tfm._fwd_kernel
    seen = {}
    class Spy:
        def __getitem__(self, grid):
            def go(*a, **kw):
                key = tuple(sorted((k, v) for k, v in kw.items() if k not in ("kd", "vd")))
                seen.setdefault(key, grid)
                return real[grid](*a, **kw)
            return go
    tfm._fwd_kernel = Spy()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    res, tensors = [], {}
    for name, B, Sq, Sk, H, Hkv, D, causal, segs in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        dt = torch.bfloat16
        if segs:
            T = Sq
            q = torch.randn(T, H, D, device="cuda", dtype=dt, generator=g)
            k = torch.randn(T, Hkv, D, device="cuda", dtype=dt, generator=g)
            v = torch.randn(T, Hkv, D, device="cuda", dtype=dt, generator=g)
            cu = torch.arange(0, T + 1, T // segs, device="cuda", dtype=torch.int32)
            f = lambda a, b, c: qf.flash_attn_varlen_func(a, b, c, cu, cu, T // segs, T // segs, causal=causal, backend="triton")
        else:
            q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt, generator=g)
            k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, generator=g)
            v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, generator=g)
            f = lambda a, b, c: qf.flash_attn_func(a, b, c, causal=causal, backend="triton")
        dout = torch.randn(q.shape, device='cuda', dtype=dt, generator=g)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = f(qg, kg, vg)
        out.backward(dout)
        tensors[name] = [out.detach().cpu(), qg.grad.cpu(), kg.grad.cpu(), vg.grad.cpu()]
        t_f = triton.testing.do_bench(lambda: f(q, k, v), warmup=25, rep=200)
        def fb():
            o = f(qg, kg, vg); o.backward(dout)
        t_fb = triton.testing.do_bench(fb, warmup=10, rep=200, grad_to_none=[qg, kg, vg])
        row = dict(case=name, fwd_ms=t_f, fwdbwd_ms=t_fb)
        if not segs:
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                try:
                    row["cudnn_fwd_ms"] = triton.testing.do_bench(
                        lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True), warmup=25, rep=200)
                except Exception as e:
                    row["cudnn_fwd_ms"] = float("nan")
        res.append(row)
        print(row, flush=True)
    # decode: B=1 32k and B=8 ragged, through flash_attn_with_kvcache
    for name, B, L in (("decode-B1-32k", 1, 32768), ("decode-B8-8k", 8, 8192)):
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        kc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        vc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        sl = torch.full((B,), L, dtype=torch.int32, device="cuda")
        f = lambda: qf.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, causal=True, backend="triton")
        tensors[name] = [f().cpu()]
        t = triton.testing.do_bench(f, warmup=25, rep=200)
        row = dict(case=name, fwd_ms=t, tb_s=2 * kc.numel() * 2 / t / 1e9)
        res.append(row); print(row, flush=True)
    # second pass, reversed order: times only (warm-up / order effects)
    for name, B, Sq, Sk, H, Hkv, D, causal, segs in reversed(CASES):
        pass
    for key, grid in seen.items():
        print("LAUNCH", grid, key)
    import os; torch.save(tensors, "/tmp/" + os.path.basename(outfile) + ".pt")
    json.dump(res, open(outfile, "w"))

def compare(old, new, csv):
    a, b = json.load(open(old)), json.load(open(new))
    import os; ta, tb = (torch.load("/tmp/" + os.path.basename(x) + ".pt") for x in (old, new))
    lines = ["case,old_fwd_ms,new_fwd_ms,old_fwdbwd_ms,new_fwdbwd_ms,cudnn_fwd_ms,bitwise_equal"]
    ok = True
    for ra, rb in zip(a, b):
        eqs = [torch.equal(x, y) for x, y in zip(ta[ra["case"]], tb[rb["case"]])]
        diffs = [(x.float() - y.float()).abs().max().item() for x, y in zip(ta[ra["case"]], tb[rb["case"]])]
        print(ra["case"], "equal per tensor", eqs, "max diff", diffs)
        eq = all(eqs)
        ok &= eq
        lines.append(f'{ra["case"]},{ra["fwd_ms"]:.4f},{rb["fwd_ms"]:.4f},{ra.get("fwdbwd_ms", float("nan")):.4f},'
                     f'{rb.get("fwdbwd_ms", float("nan")):.4f},{rb.get("cudnn_fwd_ms", float("nan")):.4f},{eq}')
    open(csv, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines)); print("ALL BITWISE EQUAL" if ok else "MISMATCH")

if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        compare(*sys.argv[2:5])
