"""flash_attn_with_kvcache: in-place append at cache_seqlens, attention over the valid prefix plus
the new keys (causal bottom-right), equal to the reference on the concatenated keys; rows outside
[cache_seqlens, cache_seqlens + Snew) are never written.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, assert_close_to_ref, atol_for, randn, serves_lse, skip_if_unavailable

import qwen3vl_flash as qf
from qwen3vl_flash import conventions
from qwen3vl_flash.backends.base import get_backend
from qwen3vl_flash.reference import attention_ref

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _reference_per_batch(q, k_cache0, v_cache0, k_new, v_new, lens, causal, window=(-1, -1)):
    """The reference on the concatenation [valid cache rows, new rows] for each batch row, in
    float64 (ref) and the input dtype (lowprec). Returns (ref_out, low_out, ref_lse, low_lse)."""
    outs = {True: [], False: []}
    lses = {True: [], False: []}
    for b, L in enumerate(lens):
        kk, vv = k_cache0[b, :L], v_cache0[b, :L]
        if k_new is not None:
            kk, vv = torch.cat([kk, k_new[b]]), torch.cat([vv, v_new[b]])
        for up in (True, False):
            dt = torch.float64 if up else q.dtype
            o, lse = attention_ref(q[b : b + 1].to(dt), kk[None].to(dt), vv[None].to(dt), causal=causal,
                                 window_size=window, upcast=up, return_lse=True)
            outs[up].append(o)
            lses[up].append(lse)
    return torch.cat(outs[True]), torch.cat(outs[False]), torch.cat(lses[True]), torch.cat(lses[False])


def _run_and_check(backend, dtype, B, Smax, H, Hkv, D, lens, snew, sq=None, causal=True, window=(-1, -1)):
    sq = snew if sq is None else sq
    q = randn(B, sq, H, D, dtype=dtype)
    k_cache, v_cache = randn(B, Smax, Hkv, D, dtype=dtype), randn(B, Smax, Hkv, D, dtype=dtype)
    k_new = randn(B, snew, Hkv, D, dtype=dtype) if snew else None
    v_new = randn(B, snew, Hkv, D, dtype=dtype) if snew else None
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor(lens, dtype=torch.int32)
    want_lse = serves_lse(backend)
    res = qf.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, seqlens, causal=causal,
                                     window_size=window, return_lse=want_lse, backend=backend)
    out, lse = res if want_lse else (res, None)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(seqlens, torch.tensor(lens, dtype=torch.int32)), "cache_seqlens was modified"

    # the caches: new rows written at [L, L + Snew), every other row bit-identical
    for b, L in enumerate(lens):
        for cache, cache0, new in ((k_cache, kc0, k_new), (v_cache, vc0, v_new)):
            assert torch.equal(cache[b, :L], cache0[b, :L]), f"batch {b}: valid cache rows changed"
            if snew:
                assert torch.equal(cache[b, L : L + snew], new[b]), f"batch {b}: new rows not appended"
            assert torch.equal(cache[b, L + snew :], cache0[b, L + snew :]), f"batch {b}: rows past the append written"

    ref, low, ref_lse, low_lse = _reference_per_batch(q, kc0, vc0, k_new, v_new, lens, causal, window)
    assert_close_to_ref(out, ref, low, 2.0, atol_for(dtype), "out")
    if lse is not None:
        assert lse.shape == (B, H, sq)
        assert_close_to_ref(lse, ref_lse, low_lse, 2.0, atol_for(dtype) * 10, "lse")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("snew", [1, 4])
@pytest.mark.parametrize("lens", [[0, 5, 17, 30], [9, 9, 9, 9]], ids=["ragged", "uniform"])
def test_append_and_attend(backend, dtype, snew, lens):
    skip_if_unavailable(backend)
    _run_and_check(backend, dtype, 4, 40, 8, 2, 72, lens, snew)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_noncausal_gqa16_hd128(backend):
    skip_if_unavailable(backend)
    _run_and_check(backend, F32, 3, 64, 16, 1, 128, [1, 33, 60], 4, causal=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_bf16(backend):
    skip_if_unavailable(backend)
    _run_and_check(backend, BF16, 2, 48, 4, 2, 64, [7, 40], 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_window(backend):
    skip_if_unavailable(backend)
    _run_and_check(backend, F64, 3, 32, 4, 2, 16, [2, 11, 25], 4, window=(6, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_queries_than_new_keys(backend):
    """Sq > Snew + cache length in one row: causal bottom-right leaves rows that see no key."""
    skip_if_unavailable(backend)
    out = _run_and_check(backend, F64, 2, 16, 4, 2, 16, [0, 6], 2, sq=5)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3])), "rows that see no key must be 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_append(backend):
    """k=v=None: attend over the first cache_seqlens rows; the cache is not written at all."""
    skip_if_unavailable(backend)
    _run_and_check(backend, F32, 3, 20, 4, 4, 32, [1, 20, 7], 0, sq=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_cache_and_int_seqlens(backend):
    skip_if_unavailable(backend)
    q = randn(2, 1, 4, 16, dtype=F64)
    kc, vc = randn(2, 12, 2, 16, dtype=F64), randn(2, 12, 2, 16, dtype=F64)
    ref = attention_ref(q, kc, vc, causal=True)
    out = qf.flash_attn_with_kvcache(q, kc, vc, backend=backend)  # cache_seqlens=None: all rows valid
    assert (out - ref).abs().max().item() < 1e-10
    out = qf.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7, backend=backend)  # an int for all rows
    ref = attention_ref(q, kc[:, :7], vc[:, :7], causal=True)
    assert (out - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache_no_append(backend):
    """Nothing to attend to: zeros (and lse -inf), no NaN."""
    skip_if_unavailable(backend)
    q = randn(2, 1, 4, 16)
    kc, vc = randn(2, 8, 2, 16), randn(2, 8, 2, 16)
    res = qf.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.zeros(2, dtype=torch.int32),
                                     return_lse=serves_lse(backend), backend=backend)
    out = res[0] if serves_lse(backend) else res
    assert torch.equal(out, torch.zeros_like(out))
    if serves_lse(backend):
        assert torch.isneginf(res[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_decode_equals_full_causal(backend):
    """Prefill 5 tokens then decode 6 one by one (ragged batch): every step equals full causal
    attention over everything seen so far, and the final cache holds exactly the sequence."""
    skip_if_unavailable(backend)
    B, Smax, H, Hkv, D = 2, 16, 4, 2, 32
    total = [11, 9]
    seq_k = [randn(total[b], Hkv, D, dtype=F64) for b in range(B)]
    seq_v = [randn(total[b], Hkv, D, dtype=F64) for b in range(B)]
    seq_q = [randn(total[b], H, D, dtype=F64) for b in range(B)]
    kc = torch.full((B, Smax, Hkv, D), 7.0, dtype=F64)  # sentinel: rows never written stay 7
    vc = kc.clone()
    lens = [5, 3]
    for b in range(B):
        kc[b, : lens[b]], vc[b, : lens[b]] = seq_k[b][: lens[b]], seq_v[b][: lens[b]]
    while any(lens[b] < total[b] for b in range(B)):
        steps = [min(lens[b], total[b] - 1) for b in range(B)]  # a finished row re-reads its last token
        q = torch.stack([seq_q[b][steps[b]] for b in range(B)])[:, None]
        kn = torch.stack([seq_k[b][steps[b]] for b in range(B)])[:, None]
        vn = torch.stack([seq_v[b][steps[b]] for b in range(B)])[:, None]
        cs = torch.tensor(steps, dtype=torch.int32)
        out = qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, cs, backend=backend)
        for b in range(B):
            n = steps[b] + 1
            ref = attention_ref(seq_q[b][None, n - 1 : n], seq_k[b][None, :n], seq_v[b][None, :n], causal=True)
            assert (out[b : b + 1] - ref).abs().max().item() < 1e-10, f"step {steps[b]} of row {b}"
        lens = [steps[b] + 1 for b in range(B)]
    for b in range(B):
        assert torch.equal(kc[b, : total[b]], seq_k[b]) and torch.equal(vc[b, : total[b]], seq_v[b])
        assert (kc[b, total[b] :] == 7.0).all() and (vc[b, total[b] :] == 7.0).all()


def test_backend_without_lse_serves_kvcache_and_cache_untouched_on_failure(monkeypatch):
    """On GPUs PyTorch SDPA has no lse (sdpa.check rejects need_lse). Simulated here on CPU: a
    kv-cache call that does not ask for the lse must still run on backend='sdpa'; and should any
    backend refuse, the cache must be left as it was."""
    be = get_backend("sdpa")
    orig = be.check
    monkeypatch.setattr(be, "check", lambda req: "no lse on this device" if req.need_lse else orig(req))
    q = randn(2, 1, 4, 16)
    kc, vc = randn(2, 10, 2, 16), randn(2, 10, 2, 16)
    kn, vn = randn(2, 1, 2, 16), randn(2, 1, 2, 16)
    kc0 = kc.clone()
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    try:
        out = qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, seqlens, backend="sdpa")
    except ValueError:
        assert torch.equal(kc, kc0), "a refused call wrote into the cache"
        raise
    ref, _, _, _ = _reference_per_batch(q, kc0, vc.clone(), kn, vn, [3, 5], True)
    assert (out - ref.float()).abs().max().item() < 1e-5


def test_auto_falls_back_when_the_fused_decode_path_fails(monkeypatch, caplog):
    """A fused decode backend that raises (e.g. a kernel that fails to compile) is skipped by auto
    with one warning; the generic path then appends and attends correctly."""
    import logging

    import qwen3vl_flash.interface as I
    from qwen3vl_flash.backends.base import get_backend

    be = get_backend("sdpa")

    def broken(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(type(be), "kvcache_attention", broken, raising=False)
    monkeypatch.setattr(type(be), "kvcache_check", lambda self, q, kc, p: None, raising=False)
    monkeypatch.setattr(I, "_KV_DISPATCH", {})
    monkeypatch.setattr(conventions, "_WARNED", set())  # the one warn-once registry
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    with caplog.at_level(logging.WARNING, logger="qwen3vl_flash"):
        out = qf.flash_attn_with_kvcache(q, kc, vc, kn, vn, lens)
        out2 = qf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), None, None, lens + 1)
    assert sum("decode path failed" in r.message for r in caplog.records) == 1
    for b in range(2):
        L = int(lens[b]) + 1
        assert torch.equal(kc[b, L - 1], kn[b, 0])
        ref = attention_ref(q[b : b + 1], kc[b : b + 1, :L], vc[b : b + 1, :L], causal=True)
        assert (out[b : b + 1] - ref).abs().max() < 1e-5
        assert (out2[b : b + 1] - ref).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="simulated"):
        qf.flash_attn_with_kvcache(q, kc, vc, None, None, lens, backend="sdpa")


@pytest.mark.parametrize("backend", ["tiled", "sdpa", "eager"])
def test_paged_unused_block_table_entries_are_never_read(backend):
    """Block-table entries past a row's used pages may hold anything (flash-attn's contract; the
    validation checks only the used ones): the generic paged path must not gather them
    (FOUND_BUGS: it raised IndexError for an entry past the pages; the fuzzer's reliability.md #9)."""
    kc, vc = torch.randn(4, 4, 2, 16), torch.randn(4, 4, 2, 16)
    q = torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    table = torch.tensor([[1, 99, -5], [2, 0, 77]], dtype=torch.int32)  # row 0 uses 1 page, row 1 uses 2
    out = qf.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, backend=backend)
    rows = [(kc[1, :3], vc[1, :3]), (torch.cat([kc[2], kc[0]])[:6], torch.cat([vc[2], vc[0]])[:6])]
    for b, (kb, vb) in enumerate(rows):
        ref = qf.flash_attn_func(q[b:b + 1].double(), kb[None].double(), vb[None].double(), causal=True, backend="eager")
        low = qf.flash_attn_func(q[b:b + 1], kb[None], vb[None], causal=True, backend="eager")
        assert_close_to_ref(out[b:b + 1], ref, low)
