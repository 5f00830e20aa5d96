"""Host time per call of the Triton forward (public API and launcher) and the launcher's device time
at 4k, for the refactor parity check (issue 13); run once per tree, alternating:
    PYTHONPATH=<tree> python3 benchmarks/experiments/exp_refactor_host.py
Results of 2026-12-01 (H200): benchmarks/results/h200.csv, bench experiments/exp_refactor_host.
"""
import time, torch, qwen3vl_flash as qf, triton
def per_call(fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
g = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
q, k = r(1, 128, 32, 128), r(1, 128, 8, 128)
Q, K = r(1, 4096, 32, 128), r(1, 4096, 8, 128)
import qwen3vl_flash.backends.triton_fwd as tf
cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
res = {}
res["api_tiny_us"] = per_call(lambda: qf.flash_attn_func(q, k, k, causal=True, backend="triton"))
res["launcher_tiny_us"] = per_call(lambda: tf.attention_forward(q, k, k, 0.088, causal=True, config=cfg))
res["api_4k_ms"] = triton.testing.do_bench(lambda: qf.flash_attn_func(Q, K, K, causal=True, backend="triton"), warmup=25, rep=300)
res["launcher_4k_ms"] = triton.testing.do_bench(lambda: tf.attention_forward(Q, K, K, 0.088, causal=True, config=cfg), warmup=25, rep=300)
res["api_4k_ms_again"] = triton.testing.do_bench(lambda: qf.flash_attn_func(Q, K, K, causal=True, backend="triton"), warmup=25, rep=300)
print({a: round(b, 4) for a, b in res.items()}, flush=True)
