"""GPU check of the decode path changes (cache_leftpad, the decode custom op, the compiled
StaticCache step): correctness against the reference, CUDA-graph capture and replay, and a tiny
Qwen3-VL decode step under torch.compile(fullgraph=True) with tokens equal to sdpa's.

    PYTHONPATH=src python3 tests/gpu/check_decode_gpu.py
"""

from __future__ import annotations

import sys

import torch

import qwen3vl_flash as qf
from qwen3vl_flash.reference import attention_ref


def check_leftpad() -> bool:
    ok = True
    torch.manual_seed(0)
    for B, Sq, H, Hkv, D, Smax, snew, lens, pads in [
        (3, 1, 32, 8, 128, 4096, 1, [4000, 1000, 37], [0, 500, 37]),
        (2, 4, 16, 2, 64, 2048, 4, [1500, 2000], [100, 1999]),
    ]:
        dt = torch.bfloat16
        q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)
        kc = torch.randn(B, Smax, Hkv, D, device="cuda", dtype=dt)
        vc = torch.randn(B, Smax, Hkv, D, device="cuda", dtype=dt)
        for b, p in enumerate(pads):
            kc[b, :p] = float("nan")
            vc[b, :p] = float("nan")
        kn = torch.randn(B, snew, Hkv, D, device="cuda", dtype=dt)
        vn = torch.randn(B, snew, Hkv, D, device="cuda", dtype=dt)
        sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        lp = torch.tensor(pads, dtype=torch.int32, device="cuda")
        out = qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=sl, cache_leftpad=lp, backend="triton")
        for b in range(B):
            end = lens[b] + snew
            k, v = kc[b:b + 1, pads[b]:end], vc[b:b + 1, pads[b]:end]
            if k.shape[1] == 0:
                good = bool((out[b] == 0).all())
                err = 0.0
            else:
                ref = attention_ref(q[b:b + 1].float(), k.float(), v.float(), causal=True)
                low = attention_ref(q[b:b + 1], k, v, causal=True, upcast=False)
                err = (out[b:b + 1].float() - ref).abs().max().item()
                base = (low.float() - ref).abs().max().item()
                good = err <= 2 * base + 8e-3
            ok &= good
            print(f"leftpad B={B} Sq={Sq} row {b} pad {pads[b]} end {end}: err {err:.2e} {'ok' if good else 'FAILED'}")
    # CUDA graph: capture the decode op and replay with new lengths
    from qwen3vl_flash.backends import decode_op as triton_decode_op

    q = torch.randn(2, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    sl = torch.tensor([1000, 3000], dtype=torch.int32, device="cuda")
    lp = torch.tensor([10, 0], dtype=torch.int32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        triton_decode_op(q, kc, vc, sl, lp, 128 ** -0.5, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = triton_decode_op(q, kc, vc, sl, lp, 128 ** -0.5, True)
    sl.copy_(torch.tensor([2000, 4096], dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    for b, (p, e) in enumerate([(10, 2000), (0, 4096)]):
        ref = attention_ref(q[b:b + 1].float(), kc[b:b + 1, p:e].float(), vc[b:b + 1, p:e].float(), causal=True)
        err = (out[b:b + 1].float() - ref).abs().max().item()
        good = err < 2e-2
        ok &= good
        print(f"graph replay row {b} keys [{p}, {e}): err {err:.2e} {'ok' if good else 'FAILED'}")
    return ok


def check_compiled_step(backend: str = "eager", mode=None) -> bool:
    """4 greedy StaticCache steps of a padded batch of 3 through ``torch.compile(fullgraph=True)``;
    ``mode="reduce-overhead"`` (inductor) is what generate's own compile does: CUDA-graph trees."""
    from transformers import StaticCache

    from qwen3vl_flash.testing import tiny

    cfg = tiny.tiny_config()
    toks = {}
    for impl in ("sdpa", qf.ATTN_IMPLEMENTATION):
        model = tiny.build_model(cfg, impl, seed=3, device=torch.device("cuda")).eval()
        inputs = {k: v.cuda() for k, v in tiny.make_batch(cfg, seed=5).items()}
        B, L = inputs["input_ids"].shape
        cache = StaticCache(config=model.config, max_cache_len=L + 8)
        torch._dynamo.reset()
        with torch.no_grad():
            out = model(**inputs, past_key_values=cache, use_cache=True, cache_position=torch.arange(L, device="cuda"))
            tok = out.logits[:, -1:].argmax(-1)
            step = torch.compile(model, fullgraph=True, backend=backend, mode=mode)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :8])], 1)
            seq = []
            for i in range(4):
                pos = L + i
                pid = (pos + model.model.rope_deltas.view(B, 1)).view(1, B, 1).expand(3, B, 1)
                o = step(input_ids=tok, past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([pos], device="cuda"),
                         attention_mask=mask if mode else mask[:, :pos + 1],  # static shapes for the graphs
                         position_ids=pid)
                tok = o.logits[:, -1:].argmax(-1)
                seq.append(tok.flatten().tolist())
        toks[impl] = seq
    same = toks["sdpa"] == toks[qf.ATTN_IMPLEMENTATION]
    print(f"compiled ({backend}, mode={mode}) StaticCache decode, padded batch of 3: tokens equal to sdpa: {same}")
    return same


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    a = check_leftpad()
    b = check_compiled_step()
    try:
        c = check_compiled_step("inductor", "reduce-overhead")
    except Exception as exc:  # noqa: BLE001  (report it, then fail)
        print(f"compiled (inductor, reduce-overhead) StaticCache decode FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        c = False
    print("ALL OK" if a and b and c else "FAILURES")
    sys.exit(0 if a and b and c else 1)
