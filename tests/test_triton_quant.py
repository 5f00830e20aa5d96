"""The quantised Triton kernels (``backends/triton_quant.py``) under Triton's CPU interpreter.

Three kinds of check, on fresh random inputs (conftest's seed), outputs poisoned before the
kernels write them (the ``poison_outputs`` fixture; the quantised buffers get -128 / NaN codes):

* the fused quantisers against :func:`qwen3vl_flash.quant.quantize.quantize_qkv`, code for code
  (K's mean is summed in another order: the codes are checked exactly against quantize_int8 of K
  minus *our* mean, and against quantize_qkv's within one code at ties);
* the attention against a float64 emulation over the dequantised operands that rounds P as the
  kernel does (per key block, relative to the running max): the only differences left are fp32
  rounding and, rarely, a P element that rounds the other way (bounded per row, counted);
* the attention against float64 attention of the unquantised inputs: issue 14's cosine and
  relative L1 thresholds, also with K channel outliers (+20 on a few channels).

What the interpreter runs (triton 3.9): int8 dots with int32 accumulation and fp8 dots both
run; its fp32 -> e4m3 cast is wrong when rounding carries into the next binade, which the
kernels avoid under the interpreter (``_to_e4m3``); ``test_fp8_codes_at_ties_and_carries``
covers that path. The GPU path (native casts, tensor cores) is checked by
``benchmarks/experiments/exp_quant_fwd.py``.
"""

import math
import os

import pytest
import torch
from conftest import cu_seqlens, randn, rounding_slack

triton = pytest.importorskip("triton", reason="triton is not installed")

from qwen3vl_flash.backends import triton_quant as tq  # noqa: E402  (after the importorskip)
from qwen3vl_flash.quant.quantize import FP8_DTYPE, lse_shift, quantize_int8, quantize_qkv  # noqa: E402
from qwen3vl_flash.reference import attention_ref, attention_ref_varlen, visibility_mask  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                       reason="CPU tensors reach the Triton kernels only under TRITON_INTERPRET"),
    pytest.mark.usefixtures("poison_outputs"),
]

# issue 14: (cos >=, rel-L1 <=) against float64 attention of the unquantised inputs
THRESHOLDS = {("int8", False): (0.9995, 0.02), ("int8", True): (0.9993, 0.035),
              ("fp8", False): (0.999, 0.045), ("fp8", True): (0.999, 0.045)}
TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}  # many block boundaries
# (mantissa bits, smallest normal exponent) of the formats P is rounded to
FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14), FP8_DTYPE: (3, -6)}


def _with_outliers(k, channels=(3, 17, 30)):
    k = k.float()
    k[..., list(channels)] += 20.0
    return k


def _cos_l1(out, ref):
    a, b = out.double().flatten(), ref.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item(), ((a - b).abs().sum() / b.abs().sum()).item()


# --------------------------------------------------------------------------------------------
# the quantisers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("varlen,quant,D,dtype", [
    pytest.param(False, "int8", 72, torch.bfloat16, id="dense-int8-hd72-bf16"),
    pytest.param(False, "fp8", 128, torch.float16, id="dense-fp8-hd128-fp16"),
    pytest.param(True, "fp8", 72, torch.bfloat16, id="varlen-fp8-hd72-bf16"),
    pytest.param(True, "int8", 64, torch.float16, id="varlen-int8-hd64-fp16"),
])
def test_quantisers_match_quantize_py(varlen, quant, D, dtype):
    # (the packed layouts differ between head splits; quantize_qkv_triton's views do not)
    shape_q, shape_k = ((83, 4, D), (70, 2, D)) if varlen else ((2, 41, 4, D), (2, 53, 2, D))
    q, k, v = randn(*shape_q, dtype=dtype), randn(*shape_k, dtype=dtype), randn(*shape_k, dtype=dtype)
    k = _with_outliers(k).to(dtype)
    q[..., 5, 1, :] = 0  # an all-zero row: scale 1, codes 0
    v[..., 3] = 0  # an all-zero channel: V scale 1
    got = tq.quantize_qkv_triton(q, k, v, quant, varlen)
    ref = quantize_qkv(q, k, v, quant, varlen)
    for name in ("q_codes", "q_scale") + (("v", "v_scale") if quant == "fp8" else ()):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a.float(), b.float()), f"{name}: {(a.float() != b.float()).sum().item()} elements differ"
    if quant == "int8":
        assert got.v is v and got.v_scale is None
    # K: the mean (fp32, summed in chunk order) within a few ulps of torch's ...
    torch.testing.assert_close(got.k_mean, ref.k_mean, rtol=4 * 2.0 ** -23, atol=1e-6)
    # ... and the codes exactly those of quantize_int8 on K minus our mean
    codes, scale = quantize_int8(k.float() - got.k_mean)
    assert torch.equal(got.k_codes, codes) and torch.equal(got.k_scale, scale)
    # against quantize_qkv's own mean: a code at an exact tie may move by one, nothing more
    diff = (got.k_codes.int() - ref.k_codes.int()).abs()
    assert diff.max().item() <= 1 and diff.sum().item() <= max(1, diff.numel() // 1000)


def test_fp8_codes_at_ties_and_carries():
    # V scale 1 on every channel (each holds a 448), so the codes are fp8(v) itself: ties (17 ->
    # 16, 19 -> 20, 0.01953125 = 2.5 * 2**-7 in the subnormals), carries into the next binade
    # (31.5 -> 32, 15.75 -> 16, 0.2421875 -> 0.25), negatives, values below the smallest subnormal
    vals = torch.tensor([448.0, 17.0, 19.0, 31.5, 15.75, 0.2421875, 0.01953125, -17.0, -31.5, -0.2421875,
                         2.0 ** -10, 3 * 2.0 ** -11, 0.0, 1.0, -448.0, 240.0, 232.0, 0.8125, -0.90625, 5.5])
    v = vals[torch.randperm(vals.numel())].reshape(20, 1, 1).expand(20, 1, 8).contiguous().to(torch.float16)
    v[0, 0, :] = 448.0
    k = randn(20, 1, 8, dtype=torch.float16)
    got = tq.quantize_qkv_triton(k, k, v, "fp8", True)
    ref = quantize_qkv(k, k, v, "fp8", True)
    assert torch.equal(got.v_scale, ref.v_scale) and (got.v_scale == 1).all()
    assert torch.equal(got.v.float(), ref.v.float()), torch.stack([v[:, 0, 0].float(), got.v[:, 0, 0].float(),
                                                                   ref.v[:, 0, 0].float()], 1)


# --------------------------------------------------------------------------------------------
# the attention: a float64 emulation of the kernel's rounding, and the unquantised truth
# --------------------------------------------------------------------------------------------


def _ulp(x: torch.Tensor, fmt) -> torch.Tensor:
    """Spacing of ``fmt``'s numbers at |x| (float64)."""
    mant, emin = FORMATS[fmt]
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** (emin - mant)))).clamp_min(emin)
    return torch.exp2(e - mant)


def _emulate_one(qc, qs, kc, ks, v, vs, quant, scale, mask, block_n, v_dtype):
    """One (Sq, D) x (Sk, D) head in float64: out, the per-row flip bound, and l."""
    log2e = 1.0 / math.log(2.0)
    s = (qc.double() @ kc.double().t()) * qs.double()[:, None] * ks.double()[None, :] * scale * log2e
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    Sq, Sk = s.shape
    nb = max(1, -(-Sk // block_n))
    pad = torch.full((Sq, nb * block_n - Sk), float("-inf"), dtype=s.dtype)
    sb = torch.cat([s, pad], 1).view(Sq, nb, block_n)
    m_run = torch.cummax(sb.amax(-1), dim=1).values  # running max after each key block
    m_last = m_run[:, -1:]
    pivot = torch.where(torch.isneginf(m_run), torch.zeros_like(m_run), m_run)
    p = torch.exp2(sb - pivot[..., None])  # what the kernel rounds, relative to the running max
    if quant == "fp8":
        p_scaled = p * 448.0
        p_r = p_scaled.float().to(FP8_DTYPE).double()
        ulp = _ulp(p_scaled, FP8_DTYPE)
        vd = v.double() * vs.double()
        w_unit = 1.0 / 448.0
    else:
        p_r = p.float().to(v_dtype).double()
        ulp = _ulp(p, v_dtype)
        vd = v.double()
        w_unit = 1.0
    # rescale every block to the final max: 2^(m_b - m_last)
    resc = torch.where(torch.isneginf(m_last), torch.zeros_like(m_run), torch.exp2(pivot - m_last))
    w = (p_r * w_unit * resc[..., None]).reshape(Sq, -1)[:, :Sk]
    l_ = (p * resc[..., None]).reshape(Sq, -1)[:, :Sk].sum(1)
    flip = (ulp * w_unit * resc[..., None]).reshape(Sq, -1)[:, :Sk]
    if mask is not None:
        flip = flip * mask
    seen = l_ > 0
    inv_l = torch.where(seen, 1.0 / torch.where(seen, l_, torch.ones_like(l_)), torch.zeros_like(l_))
    out = (w @ vd) * inv_l[:, None]
    flip_bound = (flip[:, :, None] * vd.abs()[None]).amax(1) * inv_l[:, None]  # one flip of the worst term
    return out, flip_bound


def emulate(q, k, v, quant, scale, causal, window, block_n, varlen=None):
    """The kernel's arithmetic in float64 over quantize_qkv's operands: (out, flip bound) like q."""
    r = quantize_qkv(q, k, v, quant, varlen is not None)
    H, Hkv = q.shape[-2], k.shape[-2]
    g = H // Hkv
    vs = r.v_scale if quant == "fp8" else None
    out = torch.zeros(q.shape, dtype=torch.float64)
    bound = torch.zeros(q.shape, dtype=torch.float64)
    if varlen is None:
        segs = [(b, slice(None), slice(None)) for b in range(q.shape[0])]
    else:
        cq, ck = varlen
        segs = [(None, slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1])))
                for i in range(len(cq) - 1)]
    for b, sq_, sk_ in segs:
        def pick(t, sl, bb=b):
            return t[bb][sl] if bb is not None else t[sl]
        qc, qs, kc, ks = pick(r.q_codes, sq_), pick(r.q_scale, sq_), pick(r.k_codes, sk_), pick(r.k_scale, sk_)
        vv = pick(r.v, sk_)
        Sq, Sk = qc.shape[0], kc.shape[0]
        if Sq == 0:
            continue
        mask = visibility_mask(Sq, Sk, causal, window)
        for h in range(H):
            hk = h // g
            vsh = (vs[b, 0, hk] if b is not None else vs[0, hk]) if vs is not None else None
            o, fb = _emulate_one(qc[:, h], qs[:, h], kc[:, hk], ks[:, hk], vv[:, hk], vsh, quant, scale, mask,
                                 block_n, v.dtype)
            if b is not None:
                out[b, :, h], bound[b, :, h] = o, fb
            else:
                out[sq_, h], bound[sq_, h] = o, fb
    return out, bound, r


def _check_against_emulation(out, emu, bound, dtype, what):
    """|out - emu| <= output rounding slack everywhere but in rows where one P element rounded
    the other way (fp32 vs float64 exponentials at a rounding boundary): those stay within one
    flip of the row's worst term, and are rare."""
    err = (out.double() - emu).abs()
    slack = rounding_slack(emu, dtype) + 1e-5 * emu.abs().max().item()
    rows_err = err.amax(-1)
    rows_slack = torch.full_like(rows_err, slack)
    rows_flip = slack + 2 * bound.amax(-1)
    assert (rows_err <= rows_flip).all(), (
        f"{what}: max|out - emulation| {rows_err.max().item():.3e} beyond two P flips "
        f"({rows_flip.flatten()[rows_err.flatten().argmax()].item():.3e})")
    frac = (rows_err > rows_slack).double().mean().item()
    assert frac <= 0.03, f"{what}: {frac:.1%} of rows beyond the rounding slack {slack:.2e} (flips should be rare)"


# (B, Sq, Sk, H, Hkv, D, causal, window, dtype, quant, outliers, need_lse)
DENSE = [
    pytest.param(1, 37, 75, 4, 2, 64, True, (-1, -1), torch.bfloat16, "int8", False, True, id="int8-causal-sq<sk-gqa2"),
    pytest.param(1, 70, 40, 4, 1, 72, True, (-1, -1), torch.float16, "fp8", False, True,
                 id="fp8-causal-sq>sk-empty-rows-gqa4-hd72"),
    pytest.param(2, 48, 48, 2, 2, 80, False, (9, 4), torch.bfloat16, "int8", True, False,
                 id="int8-window-9-4-hd80-outliers"),
    pytest.param(1, 64, 96, 2, 1, 128, False, (-1, -1), torch.bfloat16, "fp8", True, True,
                 id="fp8-full-hd128-outliers"),
]


@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,causal,window,dtype,quant,outliers,need_lse", DENSE)
def test_dense(B, Sq, Sk, H, Hkv, D, causal, window, dtype, quant, outliers, need_lse):
    split = "split" if D == 72 else None  # the non-default head split, on one case (80 takes the default)
    q, k, v = randn(B, Sq, H, D, dtype=dtype), randn(B, Sk, Hkv, D, dtype=dtype), randn(B, Sk, Hkv, D, dtype=dtype)
    if outliers:
        k = _with_outliers(k).to(dtype)
    scale = D ** -0.5
    out, lse = tq.quant_attention_triton(q, k, v, quant, scale, causal, window, None, None, 0, 0, need_lse, config=TILE,
                                         head_split=split)
    assert out.dtype == dtype and out.shape == q.shape and not torch.isnan(out).any()
    emu, bound, r = emulate(q, k, v, quant, scale, causal, window, TILE["BLOCK_N"])
    _check_against_emulation(out, emu, bound, dtype, "out")
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=causal, window_size=window, return_lse=True)
    seen = torch.isfinite(ref_lse).transpose(1, 2)  # (B, Sq, H)
    assert (out[~seen] == 0).all(), "rows that see no key must be 0"
    cos, l1 = _cos_l1(out[seen], ref[seen])
    cmin, lmax = THRESHOLDS[(quant, outliers)]
    assert cos >= cmin and l1 <= lmax, (
        f"against unquantised float64: cos {cos:.6f} (>= {cmin}), rel-L1 {l1:.4f} (<= {lmax})")
    if need_lse:
        _check_lse(lse, q, k, r, scale, causal, window, None)
    else:
        assert lse is None


@pytest.mark.parametrize("lens_q,lens_k,H,Hkv,D,causal,dtype,quant,split", [
    pytest.param([37, 0, 50, 19], [37, 0, 50, 19], 4, 4, 72, False, torch.bfloat16, "fp8", "pad",
                 id="vision-fp8-hd72-empty-pad"),
    pytest.param([20, 0, 33], [20, 0, 33], 2, 2, 72, False, torch.bfloat16, "int8", "split",
                 id="vision-int8-hd72-empty-split"),
    pytest.param([5, 40, 1, 0], [30, 40, 17, 9], 4, 2, 64, True, torch.float16, "int8", None,
                 id="causal-int8-sq<sk-gqa2"),
])
def test_varlen(lens_q, lens_k, H, Hkv, D, causal, dtype, quant, split):
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = randn(sum(lens_q), H, D, dtype=dtype)
    k, v = randn(sum(lens_k), Hkv, D, dtype=dtype), randn(sum(lens_k), Hkv, D, dtype=dtype)
    scale = D ** -0.5
    out, lse = tq.quant_attention_triton(q, k, v, quant, scale, causal, (-1, -1), cu_q, cu_k, max(lens_q), max(lens_k),
                                         True, config=TILE, head_split=split)
    assert out.shape == q.shape and lse.shape == (H, sum(lens_q)) and not torch.isnan(out).any()
    emu, bound, r = emulate(q, k, v, quant, scale, causal, (-1, -1), TILE["BLOCK_N"], varlen=(cu_q, cu_k))
    _check_against_emulation(out, emu, bound, dtype, "out")
    ref = attention_ref_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal)
    cos, l1 = _cos_l1(out, ref)
    cmin, lmax = THRESHOLDS[(quant, False)]
    assert cos >= cmin and l1 <= lmax, f"against unquantised float64: cos {cos:.6f}, rel-L1 {l1:.4f}"
    _check_lse(lse, q, k, r, scale, causal, (-1, -1), (cu_q, cu_k))


def _check_lse(lse, q, k, r, scale, causal, window, varlen):
    """lse = logsumexp of the dequantised scores + quantize.lse_shift (fp32 rounding only)."""
    qd = r.q_codes.double() * r.q_scale.double()[..., None]
    kd = r.k_codes.double() * r.k_scale.double()[..., None]
    v0 = torch.zeros_like(kd)
    if varlen is None:
        _, ref = attention_ref(qd, kd, v0, softmax_scale=scale, causal=causal, window_size=window, return_lse=True)
    else:
        _, ref = attention_ref_varlen(qd, kd, v0, *varlen, softmax_scale=scale, causal=causal, return_lse=True)
    ref = ref + lse_shift(q.double(), r.k_mean.double(), scale, varlen is not None)
    assert lse.dtype == torch.float32 and lse.shape == ref.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "lse -inf (rows without keys) misplaced"
    fin = torch.isfinite(ref)
    err = (lse.double()[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= 2e-5 * (1 + ref[fin].abs().max().item()), f"lse: max error {err:.2e}"


def test_serves_and_refuses():
    q = randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert tq.quant_triton_serves(q, q, "int8") is None and tq.quant_triton_serves(q, q, "fp8") is None
    assert "quant" in tq.quant_triton_serves(q, q, "int4")
    assert "float16/bfloat16" in tq.quant_triton_serves(q.float(), q.float(), "int8")
    big = randn(1, 2, 1, 272, dtype=torch.bfloat16)
    assert "head_dim" in tq.quant_triton_serves(big, big, "int8")
    with pytest.raises(ValueError, match="quant='int4'"):
        tq.quant_attention_triton(q, q, q, "int4", 0.125)
    assert tq.qk_split(72) == (64, 32) and tq.qk_split(96) == (64, 32) and tq.qk_split(128) == (128, 0)
    assert tq.qk_split(16) == (32, 0) and tq.qk_split(72, "pad") == (128, 0) and tq.qk_split(200) == (256, 0)


@pytest.mark.parametrize("knobs", [
    pytest.param(dict(score_convert="magic"), id="scores-magic"),
    pytest.param(dict(fp8_exp="f16x2"), id="fp8-exp-f16"),
    pytest.param(dict(fp8_accumulate="tensor_core"), id="fp8-acc-tensor-core"),
    pytest.param(dict(align8=False), id="no-align8"),
])
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_kernel_variants(knobs, quant):
    """The QuantTiles knobs of the attention kernel (measured on GPUs in
    benchmarks/experiments/exp_quant_variants.py): the exact ones ("magic" int -> float, the
    alignment hint) give the default kernel's output bit for bit; the others keep issue 14's
    thresholds against float64 attention (hd72 padded, causal, GQA, rows past a key block)."""
    import dataclasses
    q, k, v = (randn(1, s, h, 72, dtype=torch.bfloat16) for s, h in ((70, 4), (90, 2), (90, 2)))
    scale = 72 ** -0.5
    tiles = dataclasses.replace(tq.QUANT_TILES, **knobs)
    base, _ = tq.quant_attention_triton(q, k, v, quant, scale, True, (-1, -1), None, None, 0, 0, False, config=TILE)
    out, _ = tq.quant_attention_triton(q, k, v, quant, scale, True, (-1, -1), None, None, 0, 0, False, config=TILE,
                                       tiles=tiles)
    exact = "score_convert" in knobs or "align8" in knobs
    if exact or quant == "int8":  # the FP8-only knobs leave the int8 kernel unchanged
        assert torch.equal(out, base), f"{knobs}: not bit for bit the default kernel"
    ref = attention_ref(q.double(), k.double(), v.double(), causal=True)
    cos, l1 = _cos_l1(out, ref)
    cmin, lmax = THRESHOLDS[(quant, False)]
    assert cos >= cmin and l1 <= lmax, f"{knobs}: cos {cos:.6f} (>= {cmin}), rel-L1 {l1:.4f} (<= {lmax})"


def test_kernel_variant_knobs_are_checked():
    import dataclasses
    for field, bad in (("score_convert", "fast"), ("fp8_exp", "f16"), ("fp8_accumulate", "tc"), ("align8", 1)):
        with pytest.raises(ValueError, match=f"QuantTiles.{field}"):
            dataclasses.replace(tq.QUANT_TILES, **{field: bad})


def test_segment_start_alignment_check():
    assert tq._starts_aligned(torch.tensor([0, 16, 48, 2304], dtype=torch.int32), 16)
    assert not tq._starts_aligned(torch.tensor([0, 16, 47], dtype=torch.int32), 16)
    assert tq._starts_aligned(torch.tensor([0], dtype=torch.int32), 16)
