"""Split-KV Triton decode (``backends/triton_decode.py``) under Triton's CPU interpreter.

The comparison rule is conftest's (flash-attn's: 2x PyTorch's own low-precision error plus the
rounding slack), against the float64 reference over the keys each batch row really has (cache prefix
+ appended rows). Outputs are NaN-poisoned before the kernels run (the ``poison_outputs`` fixture),
so an unwritten element fails. Every case also checks the cache:
the appended rows hold k/v, and every other element is bitwise what it was.

Small profiles (``min_chunk`` 16, ``block_n`` 16) force several splits per row at these lengths,
so the lse merge, empty splits and chunks that straddle the cache/new-key boundary are exercised.
"""

import math
import os

import pytest
import torch
from conftest import LSE_ATOL, assert_close_to_ref, reference_triplet

from qwen3vl_flash.backends.base import AttnParams
from qwen3vl_flash.hardware.profiles import PROFILES, DecodeTiles, TritonTiles

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from qwen3vl_flash.backends import triton_decode as td  # noqa: E402

# triton.language's own jit helpers (tl.zeros, tl.sum, ...) are interpreted only if triton was
# first imported with TRITON_INTERPRET=1 (torch may import it earlier: set it in the environment,
# as tests/run.sh does)
pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="TRITON_INTERPRET is not set"),
    pytest.mark.skipif(
        type(tl.zeros).__name__ == "JITFunction",
        reason="triton was imported before TRITON_INTERPRET=1 was set; run with it in the environment (tests/run.sh)",
    ),
    pytest.mark.usefixtures("poison_outputs"),
]

# splits of 16 keys (several per row at these lengths), 16-key tiles
SMALL = PROFILES["generic-cpu"].replace(
    triton=TritonTiles(decode=DecodeTiles(min_chunk=16, min_chunk_per_row=1, block_n={64: 16, 128: 16, 256: 16},
                                          fuse_merge_max_rows=16))
)  # the fused merge; UNFUSED below and DEFAULT test the separate merge kernel
DEFAULT = PROFILES["generic-cpu"]


def _fresh(shape, dtype):
    return torch.randn(shape, dtype=torch.float32).to(dtype)


def _params(D, causal=True, window=(-1, -1), profile=SMALL, scale=None):
    return AttnParams(1.0 / math.sqrt(D) if scale is None else scale, causal, window, profile=profile)


def _check_row(b, q, k, v, out, lse, **kw):
    """Batch row ``b`` of (out, lse) against the reference over its keys k/v (1, L, Hkv, D)."""
    ref, low = reference_triplet(q[b:b + 1], k, v, **kw)
    assert_close_to_ref(out[b:b + 1], ref["out"], low["out"], 2.0, name=f"row {b} out")
    assert_close_to_ref(lse[b:b + 1], ref["lse"], low["lse"], 2.0, LSE_ATOL[q.dtype], f"row {b} lse")


def _check_decode(q, kc0, vc0, kn, vn, seqlens, out, lse, causal=True, window=(-1, -1)):
    """Compare (out, lse) per batch row with the reference over that row's keys."""
    B, Sq, H, D = q.shape
    for b in range(B):
        c = int(seqlens[b])
        keys = [kc0[b, :c]] + ([kn[b]] if kn is not None else [])
        vals = [vc0[b, :c]] + ([vn[b]] if vn is not None else [])
        k = torch.cat(keys).unsqueeze(0)
        v = torch.cat(vals).unsqueeze(0)
        if k.shape[1] == 0:  # nothing to attend to
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b}: output of an empty row must be 0"
            assert torch.isneginf(lse[b]).all(), f"row {b}: lse of an empty row must be -inf"
            continue
        _check_row(b, q, k, v, out, lse, causal=causal, window_size=window)


def _check_cache(kc, vc, kc0, vc0, kn, vn, seqlens):
    """Appended rows hold k/v; every other element is bitwise untouched."""
    exp_k, exp_v = kc0.clone(), vc0.clone()
    if kn is not None:
        for b in range(kc.shape[0]):
            c = int(seqlens[b])
            exp_k[b, c : c + kn.shape[1]] = kn[b]
            exp_v[b, c : c + vn.shape[1]] = vn[b]
    assert torch.equal(kc, exp_k), "k_cache: wrong append or an element outside the appended rows changed"
    assert torch.equal(vc, exp_v), "v_cache: wrong append or an element outside the appended rows changed"


def _run_case(B, Sq, H, Hkv, D, Smax, snew, lens, dtype, causal=True, window=(-1, -1), profile=SMALL):
    q = _fresh((B, Sq, H, D), dtype)
    kc, vc = _fresh((B, Smax, Hkv, D), dtype), _fresh((B, Smax, Hkv, D), dtype)
    kn = _fresh((B, snew, Hkv, D), dtype) if snew else None
    vn = _fresh((B, snew, Hkv, D), dtype) if snew else None
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    p = _params(D, causal, window, profile)
    assert td.decode_check(q, kc, p) is None
    out, lse = td.decode_attention(q, kc, vc, kn, vn, seqlens, p)
    assert out.shape == (B, Sq, H, D) and out.dtype == dtype
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    _check_cache(kc, vc, kc0, vc0, kn, vn, seqlens)
    _check_decode(q, kc0, vc0, kn, vn, seqlens, out, lse, causal, window)
    return out, lse


# (B, Sq, H, Hkv, D, Smax, Snew, cache_seqlens, dtype)
CASES = [
    pytest.param(4, 1, 8, 2, 64, 80, 1, [0, 1, 37, 79], torch.bfloat16, id="ragged-incl0-snew1-gqa4-hd64-bf16"),
    pytest.param(3, 4, 8, 2, 128, 70, 4, [0, 17, 66], torch.float16, id="ragged-incl0-snew4-sq4-gqa4-hd128-fp16"),
    pytest.param(2, 4, 8, 2, 64, 64, 4, [3, 40], torch.bfloat16, id="sq4-snew4-bf16"),
    pytest.param(2, 1, 4, 1, 64, 50, 0, [0, 45], torch.float16, id="no-append-mqa-incl0-fp16"),
    pytest.param(2, 3, 6, 2, 72, 40, 2, [5, 30], torch.bfloat16, id="hd72-gqa3-sq3-snew2-bf16"),
    pytest.param(2, 2, 4, 2, 64, 48, 2, [9, 33], torch.float32, id="fp32-ieee"),
]


@pytest.mark.parametrize("B,Sq,H,Hkv,D,Smax,snew,lens,dtype", CASES)
def test_decode_matches_reference(B, Sq, H, Hkv, D, Smax, snew, lens, dtype):
    _run_case(B, Sq, H, Hkv, D, Smax, snew, lens, dtype)


UNFUSED = PROFILES["generic-cpu"].replace(
    name="decode-unfused",
    triton=TritonTiles(decode=DecodeTiles(min_chunk=16, min_chunk_per_row=1, block_n={64: 16, 128: 16},
                                          fuse_merge_max_rows=0)),
)


def test_decode_separate_merge_kernel():
    """Packed rows above fuse_merge_max_rows: partials merged by the second kernel."""
    _run_case(3, 4, 8, 2, 64, 70, 4, [0, 17, 66], torch.bfloat16, profile=UNFUSED)


def test_decode_repeated_calls_reuse_split_counters():
    """The fused merge's counters reset themselves: the same call twice gives the same result,
    and a second, different step (new lengths, same shapes) is right too."""
    B, H, Hkv, D, Smax = 3, 8, 2, 64, 96
    q = _fresh((B, 1, H, D), torch.bfloat16)
    kc, vc = _fresh((B, Smax, Hkv, D), torch.bfloat16), _fresh((B, Smax, Hkv, D), torch.bfloat16)
    kn, vn = _fresh((B, 1, Hkv, D), torch.bfloat16), _fresh((B, 1, Hkv, D), torch.bfloat16)
    p = _params(D)
    seqlens = torch.tensor([40, 0, 90], dtype=torch.int32)
    out1, lse1 = td.decode_attention(q, kc, vc, kn, vn, seqlens, p)
    out2, lse2 = td.decode_attention(q, kc, vc, kn, vn, seqlens, p)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    kc0, vc0 = kc.clone(), vc.clone()
    seqlens = torch.tensor([41, 1, 91], dtype=torch.int32)
    out, lse = td.decode_attention(q, kc, vc, kn, vn, seqlens, p)
    _check_cache(kc, vc, kc0, vc0, kn, vn, seqlens)
    _check_decode(q, kc0, vc0, kn, vn, seqlens, out, lse)


def test_decode_default_profile_one_split():
    """The shipped table (256-key chunks): one split per row here, merge of one partial."""
    _run_case(3, 1, 8, 2, 64, 96, 1, [0, 20, 95], torch.bfloat16, profile=DEFAULT)


def test_decode_causal_more_queries_than_keys():
    """Sq > keys: the first queries see nothing (bottom-right): zeros and lse -inf there."""
    out, lse = _run_case(2, 6, 4, 2, 64, 32, 2, [1, 0], torch.bfloat16)
    # row 1 has 2 keys: queries 0..3 see none
    assert torch.isneginf(lse[1, :, :4]).all() and torch.equal(out[1, :4], torch.zeros_like(out[1, :4]))


@pytest.mark.parametrize("window", [(8, -1), (3, 0), (5, 2)], ids=["left8", "left3-right0", "left5-right2"])
def test_decode_sliding_window(window):
    _run_case(2, 4, 8, 2, 64, 72, 4, [20, 64], torch.bfloat16, window=window)


def test_decode_non_causal():
    _run_case(2, 4, 4, 2, 64, 40, 4, [10, 30], torch.float16, causal=False)


def test_paged_equals_contiguous():
    """A paged cache (shuffled pages of 16 rows) gives bitwise the contiguous result and append."""
    B, Sq, H, Hkv, D, page, pages_per_row = 3, 2, 8, 2, 64, 16, 5
    Smax, snew, dtype = page * pages_per_row, 2, torch.bfloat16
    q = _fresh((B, Sq, H, D), dtype)
    kc, vc = _fresh((B, Smax, Hkv, D), dtype), _fresh((B, Smax, Hkv, D), dtype)
    kn, vn = _fresh((B, snew, Hkv, D), dtype), _fresh((B, snew, Hkv, D), dtype)
    seqlens = torch.tensor([0, 31, 78], dtype=torch.int32)
    num_pages = B * pages_per_row + 3  # spare pages that must stay untouched
    perm = torch.randperm(num_pages)[: B * pages_per_row]
    block_table = perm.view(B, pages_per_row).to(torch.int32)
    kp, vp = _fresh((num_pages, page, Hkv, D), dtype), _fresh((num_pages, page, Hkv, D), dtype)
    kp.view(num_pages, -1)[perm.long()] = kc.reshape(B * pages_per_row, -1)
    vp.view(num_pages, -1)[perm.long()] = vc.reshape(B * pages_per_row, -1)
    kp0, vp0 = kp.clone(), vp.clone()
    kc0, vc0 = kc.clone(), vc.clone()
    p = _params(D)
    out_c, lse_c = td.decode_attention(q, kc, vc, kn, vn, seqlens, p)
    out_p, lse_p = td.decode_attention(q, kp, vp, kn, vn, seqlens, p, block_table=block_table)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    # the paged cache, read back in row order, equals the appended contiguous cache ...
    assert torch.equal(kp.view(num_pages, -1)[block_table.view(-1).long()].view_as(kc), kc)
    assert torch.equal(vp.view(num_pages, -1)[block_table.view(-1).long()].view_as(vc), vc)
    # ... and pages no row owns are untouched
    spare = torch.ones(num_pages, dtype=torch.bool)
    spare[perm] = False
    assert torch.equal(kp[spare], kp0[spare]) and torch.equal(vp[spare], vp0[spare])
    _check_decode(q, kc0, vc0, kn, vn, seqlens, out_c, lse_c)


def test_block_table_checks():
    """The block-table checks live in the interface (validation there, kernels in kernel files):
    bad dtype / shape through the public call, values through the interface's value check."""
    import qwen3vl_flash as qf
    from qwen3vl_flash.interface import _check_cache_values

    q = _fresh((2, 1, 4, 16), torch.float16)
    kp = _fresh((6, 16, 2, 16), torch.float16)
    seqlens = torch.tensor([3, 20], dtype=torch.int32)
    with pytest.raises(TypeError, match="block_table"):
        qf.flash_attn_with_kvcache(q, kp, kp.clone(), cache_seqlens=seqlens, block_table=torch.zeros(2, 3),
                                   backend="triton")
    with pytest.raises(ValueError, match="block_table"):
        qf.flash_attn_with_kvcache(q, kp, kp.clone(), cache_seqlens=seqlens,
                                   block_table=torch.zeros(3, 3, dtype=torch.int32), backend="triton")
    bt = torch.tensor([[0, 1], [2, 6]], dtype=torch.int32)  # page 6 does not exist
    with pytest.raises(ValueError, match="page indices"):
        _check_cache_values(seqlens, 1, 32, bt, num_pages=6, page_size=16)
    with pytest.raises(ValueError, match="overflow"):
        _check_cache_values(torch.tensor([3, 32], dtype=torch.int32), 1, 32, bt, num_pages=6, page_size=16)
    _check_cache_values(seqlens, 1, 32, torch.tensor([[0, 1], [2, 5]], dtype=torch.int32), num_pages=6, page_size=16)


def test_overflow_never_writes_outside_the_cache():
    """Lengths past Smax (what only an unchecked CUDA-graph replay could pass) are clamped: the
    kernels write nothing past the cache and produce finite output over the clamped keys."""
    B, Hkv, D, Smax = 2, 2, 64, 32
    buf = _fresh((B, Smax + 8, Hkv, D), torch.bfloat16)  # guard rows after each batch row's cache
    kc = buf[:, :Smax]
    vbuf = _fresh((B, Smax + 8, Hkv, D), torch.bfloat16)
    vc = vbuf[:, :Smax]
    buf0, vbuf0 = buf.clone(), vbuf.clone()
    q = _fresh((B, 1, 4, D), torch.bfloat16)
    kn, vn = _fresh((B, 3, Hkv, D), torch.bfloat16), _fresh((B, 3, Hkv, D), torch.bfloat16)
    seqlens = torch.tensor([31, 40], dtype=torch.int32)  # 31 + 3 > 32; 40 > 32
    out, lse = td.decode_attention(q, kc, vc, kn, vn, seqlens, _params(D))
    assert torch.equal(buf[:, Smax:], buf0[:, Smax:]) and torch.equal(vbuf[:, Smax:], vbuf0[:, Smax:])
    assert torch.equal(buf[1], buf0[1]) and torch.equal(buf[0, :31], buf0[0, :31])
    assert torch.equal(buf[0, 31], kn[0, 0])  # the one row that fits was written
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_decode_check_reasons(monkeypatch):
    p = _params(64)
    kc = _fresh((1, 8, 2, 64), torch.float16)
    assert td.decode_check(_fresh((1, 1, 4, 64), torch.float16), kc, p) is None
    assert "query tokens" in td.decode_check(_fresh((1, 17, 4, 64), torch.float16), kc, p)
    assert "float64" in td.decode_check(_fresh((1, 1, 4, 64), torch.float64), kc.double(), p)
    assert "head_dim" in td.decode_check(torch.empty(1, 1, 2, 320, dtype=torch.float16), kc, p)
    assert "stride" in td.decode_check(_fresh((1, 1, 4, 64), torch.float16), kc.transpose(1, 3), p)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in td.decode_check(_fresh((1, 1, 4, 64), torch.float16), kc, p)


def test_num_splits_heuristic():
    """Splits come from shapes and SMs only; a single long row is spread over the chip whatever
    the batch size (ragged batches), short caches and wide query packs get fewer."""
    cfg = DecodeTiles()
    assert td.num_splits(8, 131072, 4, 132, cfg) == 33  # ~2 programs per SM for one row
    assert td.num_splits(8, 4096, 4, 132, cfg) == 16  # chunks of >= 256 keys
    assert td.num_splits(8, 100, 4, 132, cfg) == 1
    assert td.num_splits(8, 4096, 64, 132, cfg) == 2  # 64 packed rows: >= 2048 keys a split
    assert td.num_splits(1, 1 << 20, 4, 132, cfg) == cfg.max_splits


def test_through_public_api():
    """flash_attn_with_kvcache(..., backend="triton") reaches the decode kernels (when delegated)."""
    import qwen3vl_flash as qf
    from qwen3vl_flash.backends.base import get_backend

    be = get_backend("triton")
    assert getattr(be, "kvcache_check", None) is not None, "the triton backend must delegate kvcache calls"
    B, Sq, H, Hkv, D, Smax = 3, 1, 8, 2, 64, 48
    q = _fresh((B, Sq, H, D), torch.bfloat16)
    kc, vc = _fresh((B, Smax, Hkv, D), torch.bfloat16), _fresh((B, Smax, Hkv, D), torch.bfloat16)
    kn, vn = _fresh((B, 1, Hkv, D), torch.bfloat16), _fresh((B, 1, Hkv, D), torch.bfloat16)
    seqlens = torch.tensor([0, 12, 47], dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, backend="triton",
                                          return_lse=True)
    _check_cache(kc, vc, kc0, vc0, kn, vn, seqlens)
    _check_decode(q, kc0, vc0, kn, vn, seqlens, out, lse)
    # overflow is refused before anything is written
    with pytest.raises(ValueError, match="overflow"):
        qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=torch.full((B,), Smax, dtype=torch.int32),
                                   backend="triton")
    _check_cache(kc, vc, kc0, vc0, kn, vn, seqlens)


@pytest.mark.parametrize("Sq", [1, 3])
def test_strided_history_views_as_cache(Sq):
    """transformers' DynamicCache hands K/V as (B, Hkv, S, D); the integration passes their
    (B, S, Hkv, D) transposed views straight to the decode path: no copy, same result."""
    import qwen3vl_flash as qf

    B, H, Hkv, D, S = 2, 8, 2, 64, 45
    k = _fresh((B, Hkv, S, D), torch.bfloat16)
    v = _fresh((B, Hkv, S, D), torch.bfloat16)
    q = _fresh((B, Sq, H, D), torch.bfloat16)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    assert not kt.is_contiguous()
    k0, v0 = k.clone(), v.clone()
    out = qf.flash_attn_with_kvcache(q, kt, vt, causal=True, backend="triton")
    ref, low = reference_triplet(q, kt, vt, causal=True)
    assert_close_to_ref(out, ref["out"], low["out"], 2.0)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # nothing appended, nothing written


# (B, Sq, H, Hkv, D, Smax, Snew, cache_seqlens, cache_leftpad, dtype)
LEFTPAD_CASES = [
    pytest.param(3, 1, 8, 2, 64, 80, 1, [40, 79, 10], [0, 33, 20], torch.bfloat16,
                 id="snew1-pad-0-33-and-beyond-length"),
    pytest.param(2, 4, 8, 2, 64, 70, 4, [50, 60], [7, 58], torch.float16, id="sq4-snew4-pad-into-new-keys"),
    pytest.param(2, 1, 4, 1, 64, 50, 0, [45, 30], [12, 0], torch.bfloat16, id="no-append-mqa"),
]


def _check_leftpad(q, kc0, vc0, kn, vn, seqlens, pads, out, lse):
    """Row b attends keys [pad, seqlen + Snew) of its (appended) cache, causal aligned to the end."""
    full_k, full_v = kc0.clone(), vc0.clone()
    for b in range(q.shape[0]):
        c = int(seqlens[b])
        if kn is not None:
            full_k[b, c:c + kn.shape[1]], full_v[b, c:c + vn.shape[1]] = kn[b], vn[b]
    snew = 0 if kn is None else kn.shape[1]
    for b in range(q.shape[0]):
        end = int(seqlens[b]) + snew
        start = min(int(pads[b]), end)
        k, v = full_k[b:b + 1, start:end], full_v[b:b + 1, start:end]
        if k.shape[1] == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and torch.isneginf(lse[b]).all()
            continue
        _check_row(b, q, k, v, out, lse, causal=True)


@pytest.mark.parametrize("backend", ["triton", "tiled"])
@pytest.mark.parametrize("B,Sq,H,Hkv,D,Smax,snew,lens,pads,dtype", LEFTPAD_CASES)
def test_cache_leftpad(backend, B, Sq, H, Hkv, D, Smax, snew, lens, pads, dtype):
    """flash_attn_with_kvcache(cache_leftpad=...): keys before a row's pad are never attended (they
    hold NaN here), through the split-KV kernel and through the generic varlen fallback."""
    import qwen3vl_flash as qf

    q = _fresh((B, Sq, H, D), dtype)
    kc, vc = _fresh((B, Smax, Hkv, D), dtype), _fresh((B, Smax, Hkv, D), dtype)
    for b, pad in enumerate(pads):  # what lies before the pad must not be read
        kc[b, :pad] = float("nan")
        vc[b, :pad] = float("nan")
    kn = _fresh((B, snew, Hkv, D), dtype) if snew else None
    vn = _fresh((B, snew, Hkv, D), dtype) if snew else None
    seqlens, leftpad = torch.tensor(lens, dtype=torch.int32), torch.tensor(pads, dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                          backend=backend, return_lse=True)
    _check_leftpad(q, kc0, vc0, kn, vn, seqlens, pads, out, lse)


def test_cache_leftpad_errors():
    import qwen3vl_flash as qf

    q, kc = torch.zeros(2, 1, 4, 64), torch.zeros(2, 16, 2, 64)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_leftpad must be an int32"):
        qf.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens, cache_leftpad=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cache_leftpad must have shape \(B,\)"):
        qf.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens, cache_leftpad=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad must be >= 0"):
        qf.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens,
                                   cache_leftpad=torch.tensor([0, -1], dtype=torch.int32))


def test_decode_op_keeps_no_buffer_between_calls():
    """The custom op (what a compiled decode step calls) must not keep any allocation past the
    call: torch.compile's CUDA-graph trees allocate from the graph's pool while warming up and
    refuse a live pool allocation that is not an output (the fused merge's split counters were
    one, allocated on every call even when unfused: found on an H200 with generate's StaticCache
    compile). The op takes the separate merge; a profile that fuses keeps the counters, and both
    give the same result."""
    import qwen3vl_flash.backends.triton_backend  # noqa: F401  (registers the op)

    B, H, Hkv, D, Smax = 2, 8, 2, 64, 80
    q = _fresh((B, 1, H, D), torch.bfloat16)
    kc, vc = _fresh((B, Smax, Hkv, D), torch.bfloat16), _fresh((B, Smax, Hkv, D), torch.bfloat16)
    seqlens, pads = torch.tensor([33, 80], dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32)
    td._PLANS.clear()
    out_op, lse_op = torch.ops.qwen3vl_flash.triton_decode(q, kc, vc, seqlens, pads, D ** -0.5, True)
    assert td._PLANS and all(not pl.fuse and not pl.sems for pl in td._PLANS.values())
    out, lse = td.decode_attention(q, kc, vc, None, None, seqlens, _params(D, scale=D ** -0.5, profile=SMALL),
                                   cache_leftpad=pads)
    assert any(pl.fuse and pl.sems for pl in td._PLANS.values())  # this one fuses
    torch.testing.assert_close(out_op.float(), out.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(lse_op, lse, rtol=0, atol=1e-4)
