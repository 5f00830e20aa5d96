"""GPU check of the quantised Triton forward (issue 14) against the portable path on the same card.

Each case runs in its own process (an illegal address would poison the CUDA context of every
later case): dense and varlen, causal or not, GQA, head dims 64/72/128, int8/fp8, both head
splits. Per case: finite output, cosine / max |diff| against the portable path (same formats,
PyTorch ops) and cosine against fp32 attention of the unquantised inputs; rows with no key.

    PYTHONPATH=src python3 benchmarks/experiments/exp_quant_gpu_check.py
"""

import json
import subprocess
import sys

CASES = [
    # layout, head_dim, causal, H, Hkv, lengths (varlen) or (B, Sq, Sk) (dense)
    ("dense", 128, True, 32, 8, (1, 1024, 1024)),
    ("dense", 128, True, 8, 2, (2, 300, 777)),
    ("dense", 72, False, 16, 16, (2, 1024, 1024)),
    ("dense", 64, False, 16, 16, (1, 1000, 1000)),
    ("varlen", 72, False, 16, 16, [2304, 2304, 1000, 0, 17]),
    ("varlen", 64, False, 16, 16, [1024, 513, 1]),
    ("varlen", 128, True, 32, 8, [4096, 100, 2000]),
]


def one(spec):
    import torch
    import torch.nn.functional as F

    from qwen3vl_flash.backends import triton_quant as tq
    from qwen3vl_flash.quant.portable import quant_attention_portable

    layout, D, causal, H, Hkv, shape, quant, split = spec
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    r = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5
    if layout == "dense":
        B, Sq, Sk = shape
        q, k, v = r(B, Sq, H, D), r(B, Sk, Hkv, D), r(B, Sk, Hkv, D)
        kw = dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0)
    else:
        lens = shape
        T = sum(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=dev)
        q, k, v = r(T, H, D), r(T, Hkv, D), r(T, Hkv, D)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    out_t, lse_t = tq.quant_attention_triton(q, k, v, quant, scale, causal, (-1, -1), need_lse=True,
                                             head_split=split, **kw)
    torch.cuda.synchronize()
    out_p, lse_p = quant_attention_portable(q, k, v, quant, scale, causal, (-1, -1), need_lse=True, **kw)
    # fp32 reference of the unquantised call
    if layout == "dense":
        g_ = H // Hkv
        ref = F.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().repeat_interleave(g_, 2).transpose(1, 2),
            v.float().repeat_interleave(g_, 2).transpose(1, 2), is_causal=False,
            attn_mask=(torch.ones(shape[1], shape[2], dtype=torch.bool, device=dev).tril(shape[2] - shape[1])
                       if causal else None)).transpose(1, 2)
    else:
        ref = torch.zeros_like(q, dtype=torch.float32)
        c = cu.tolist()
        g_ = H // Hkv
        for a, b in zip(c, c[1:]):
            if b > a:
                ref[a:b] = F.scaled_dot_product_attention(
                    q[a:b].float().transpose(0, 1), k[a:b].float().repeat_interleave(g_, 1).transpose(0, 1),
                    v[a:b].float().repeat_interleave(g_, 1).transpose(0, 1), is_causal=causal).transpose(0, 1)

    def cos(a, b):
        a, b = a.double().flatten(), b.double().flatten()
        return (a @ b / (a.norm() * b.norm() + 1e-300)).item()

    fin = bool(torch.isfinite(out_t).all())
    lfin = lse_t[torch.isfinite(lse_p)]
    return dict(finite=fin, cos_vs_portable=cos(out_t, out_p), maxdiff_vs_portable=(out_t.float() - out_p.float()).abs().max().item(),
                cos_vs_fp32=cos(out_t, ref), lse_maxdiff=(lse_t - lse_p)[torch.isfinite(lse_p)].abs().max().item() if lfin.numel() else 0.0,
                lse_inf_match=bool((torch.isinf(lse_t) == torch.isinf(lse_p)).all()))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        spec = json.loads(sys.argv[2])
        spec[5] = tuple(spec[5]) if spec[0] == "dense" else spec[5]
        print("RESULT " + json.dumps(one(spec)))
        return
    rows = []
    for layout, D, causal, H, Hkv, shape in CASES:
        for quant in ("int8", "fp8"):
            splits = ("split", "pad") if D not in (64, 128) else ("split",)
            for split in splits:
                spec = [layout, D, causal, H, Hkv, list(shape), quant, split]
                p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, timeout=120)
                res = next((json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                err = "" if res else (p.stderr.strip().splitlines() or ["?"])[-1][:150]
                rows.append((spec, res, err))
                print(spec, res or err, flush=True)
    print("\nlayout D  causal H/Hkv quant split | finite cos_portable maxdiff cos_fp32 lse_diff inf_ok")
    for spec, res, err in rows:
        head = f"{spec[0]:6s} {spec[1]:3d} {str(spec[2]):5s} {spec[3]}/{spec[4]} {spec[6]:4s} {spec[7]:5s} |"
        if res:
            print(head, f"{res['finite']} {res['cos_vs_portable']:.6f} {res['maxdiff_vs_portable']:.4f} {res['cos_vs_fp32']:.6f} "
                  f"{res['lse_maxdiff']:.2e} {res['lse_inf_match']}")
        else:
            print(head, "ERROR", err)


if __name__ == "__main__":
    main()
