"""Bad input to the three public functions raises ValueError/TypeError naming the argument.

One test case per bad-input class; each asserts the exception type and that the message names
the offending argument (and, where useful, the expected value). The kv-cache cases also check that
the cache is untouched after the error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cu_seqlens, make_qkv, randn

import qwen3vl_flash as qf

F32 = torch.float32


def _unservable():
    """(backend, dtype): a registered backend that reports it cannot serve a plain CPU call in that
    dtype (triton: not on CPU, or, under TRITON_INTERPRET=1, not in float64)."""
    import dataclasses

    from conftest import _plain_request

    from qwen3vl_flash.backends.base import get_backend

    for dtype in (torch.float32, torch.float64):
        for name in qf.available_backends():
            if get_backend(name).check(dataclasses.replace(_plain_request("cpu"), dtype=dtype)) is not None:
                return name, dtype
    pytest.skip("every backend serves every CPU call on this machine")


def _use_unservable(args: dict) -> str:
    """Point ``args`` at an unservable backend, casting its float tensors to the refused dtype."""
    name, dtype = _unservable()
    for key, x in args.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            args[key] = x.to(dtype)
    args["backend"] = name
    return name


NO = "__unservable__"  # placeholder replaced by _use_unservable() at run time


def qkv(B=2, Sq=8, Sk=10, H=4, Hkv=2, D=16, dtype=F32):
    return make_qkv(B, Sq, Sk, H, Hkv, D, dtype)


# --------------------------------------------------------------------------------------------
# flash_attn_func
# --------------------------------------------------------------------------------------------


def _bad_dense_cases():
    """(id, kwargs-builder, exception, regex naming the argument)."""
    q, k, v = qkv()
    meta = torch.empty_like(k, device="meta")
    cases = [
        ("q-rank3", lambda: dict(q=q[0], k=k, v=v), ValueError, r"\bq\b.*4 dimensions"),
        ("k-rank5", lambda: dict(q=q, k=k[None], v=v), ValueError, r"\bk\b.*4 dimensions"),
        ("v-rank3", lambda: dict(q=q, k=k, v=v[0]), ValueError, r"\bv\b.*4 dimensions"),
        ("q-not-tensor", lambda: dict(q=q.tolist(), k=k, v=v), TypeError, r"\bq\b.*torch.Tensor"),
        ("v-numpy", lambda: dict(q=q, k=k, v=v.numpy()), TypeError, r"\bv\b.*torch.Tensor"),
        ("q-int-dtype", lambda: dict(q=q.to(torch.int32), k=k, v=v), TypeError, r"\bq\b.*float"),
        ("k-bool-dtype", lambda: dict(q=q, k=k > 0, v=v), TypeError, r"\bk\b.*float"),
        ("k-dtype-mismatch", lambda: dict(q=q, k=k.double(), v=v), TypeError, r"k\.dtype.*float32"),
        ("v-dtype-mismatch", lambda: dict(q=q, k=k, v=v.bfloat16()), TypeError, r"v\.dtype.*float32"),
        ("k-device-mismatch", lambda: dict(q=q, k=meta, v=v), ValueError, r"\bk\b.*device"),
        ("batch-mismatch", lambda: dict(q=q, k=k[:1], v=v[:1]), ValueError, r"batch size.*\b2\b"),
        ("kv-length-mismatch", lambda: dict(q=q, k=k, v=v[:, :7]), ValueError, r"\bv\b.*sequence length.*10"),
        ("k-head-dim-mismatch", lambda: dict(q=q, k=k[..., :8], v=v), ValueError, r"\bk\b.*head_dim.*16"),
        ("v-head-dim-mismatch", lambda: dict(q=q, k=k, v=v[..., :8]), ValueError, r"\bv\b.*head_dim.*16"),
        ("v-heads-mismatch", lambda: dict(q=q, k=k, v=v[:, :, :1]), ValueError, r"\bv\b.*heads.*2"),
        ("H-not-multiple-of-Hkv", lambda: dict(q=q[:, :, :3], k=k, v=v), ValueError, r"head count.*num_kv_heads"),
        ("zero-kv-heads", lambda: dict(q=q, k=k[:, :, :0], v=v[:, :, :0]), ValueError, r"num_kv_heads"),
        ("head-dim-over-256", lambda: dict(q=randn(1, 2, 2, 264), k=randn(1, 2, 2, 264), v=randn(1, 2, 2, 264)),
         ValueError, r"head_dim.*256.*264"),
        ("window-below-minus-one", lambda: dict(q=q, k=k, v=v, window_size=(-2, 0)), ValueError, r"window_size"),
        ("window-not-a-pair", lambda: dict(q=q, k=k, v=v, window_size=5), TypeError, r"window_size"),
        ("window-triple", lambda: dict(q=q, k=k, v=v, window_size=(1, 2, 3)), TypeError, r"window_size"),
        ("causal-not-bool", lambda: dict(q=q, k=k, v=v, causal=1), TypeError, r"causal.*bool"),
        ("causal-string", lambda: dict(q=q, k=k, v=v, causal="yes"), TypeError, r"causal.*bool"),
        ("return_lse-not-bool", lambda: dict(q=q, k=k, v=v, return_lse=None), TypeError, r"return_lse"),
        ("softmax_scale-string", lambda: dict(q=q, k=k, v=v, softmax_scale="0.1"), TypeError, r"softmax_scale"),
        ("softmax_scale-nan", lambda: dict(q=q, k=k, v=v, softmax_scale=float("nan")), ValueError,
         r"softmax_scale.*finite"),
        ("backend-unknown", lambda: dict(q=q, k=k, v=v, backend="flash3"), ValueError,
         r"backend.*'flash3'.*(eager|sdpa|tiled)"),
        ("backend-not-str", lambda: dict(q=q, k=k, v=v, backend=None), TypeError, r"backend"),
        ("explicit-backend-cannot-serve", lambda: dict(q=q, k=k, v=v, backend=NO), ValueError,
         r"backend='{NO}' cannot run"),
    ]
    return [pytest.param(b, e, r, id=i) for i, b, e, r in cases]


@pytest.mark.parametrize("build,exc,pattern", _bad_dense_cases())
def test_flash_attn_func_rejects(build, exc, pattern):
    args = build()
    if args.get("backend") == NO:
        pattern = pattern.replace("{NO}", _use_unservable(args))
    with pytest.raises(exc, match=pattern):
        qf.flash_attn_func(**args)


def test_explicit_backend_without_lse_raises():
    """Where a backend reports it cannot return the lse (sdpa on CUDA), asking it for one raises
    (not garbage). The dispatch decision is checked with a CUDA request, so it runs without a GPU."""
    from conftest import serves_lse

    from qwen3vl_flash.backends.base import AttnRequest
    from qwen3vl_flash.interface import choose_backend

    req = AttnRequest(device_type="cuda", dtype=torch.bfloat16, head_dim=64, num_heads=4, num_kv_heads=2,
                      seqlen_q=16, seqlen_k=16, need_lse=True, device_capability=(9, 0))
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot run this call: .*log-sum-exp"):
        choose_backend(req, "sdpa", qf.PROFILES["sm90"])
    if not serves_lse("sdpa"):  # on a device where sdpa has no lse, the public call refuses too
        q, k, v = qkv()
        with pytest.raises(ValueError, match=r"backend='sdpa'"):
            qf.flash_attn_func(q, k, v, return_lse=True, backend="sdpa")


def test_env_backend_that_cannot_serve_raises(monkeypatch):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    name = _use_unservable(args)
    del args["backend"]
    monkeypatch.setenv("QWEN3VL_FLASH_BACKEND", name)
    with pytest.raises(ValueError, match=rf"backend='{name}'"):
        qf.flash_attn_func(**args)


def test_valid_call_passes_validation():
    """The control case: the builder's tensors are valid, so every rejection above is targeted."""
    q, k, v = qkv()
    assert qf.flash_attn_func(q, k, v, causal=True, window_size=[3, 0], softmax_scale=1).shape == q.shape


# --------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# --------------------------------------------------------------------------------------------


def _varlen_args(**over):
    lq, lk = [3, 0, 5], [4, 2, 6]
    args = dict(
        q=randn(8, 4, 16), k=randn(12, 2, 16), v=randn(12, 2, 16),
        cu_seqlens_q=cu_seqlens(lq), cu_seqlens_k=cu_seqlens(lk), max_seqlen_q=5, max_seqlen_k=6,
    )
    args.update(over)
    return args


def _i32(vals):
    return torch.tensor(vals, dtype=torch.int32)


VARLEN_BAD = [
    ("q-rank4", dict(q=randn(1, 8, 4, 16)), ValueError, r"\bq\b.*3 dimensions"),
    ("k-int", dict(k=torch.ones(12, 2, 16, dtype=torch.int64)), TypeError, r"\bk\b.*float"),
    ("v-tokens-mismatch", dict(v=randn(11, 2, 16)), ValueError, r"\bv\b.*tokens.*12"),
    ("H-not-multiple", dict(q=randn(8, 3, 16)), ValueError, r"num_kv_heads"),
    ("cu_q-int64", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 8])), TypeError, r"cu_seqlens_q.*int32"),
    ("cu_k-float", dict(cu_seqlens_k=torch.tensor([0.0, 4, 6, 12])), TypeError, r"cu_seqlens_k.*int32"),
    ("cu_q-list", dict(cu_seqlens_q=[0, 3, 3, 8]), TypeError, r"cu_seqlens_q"),
    ("cu_q-2d", dict(cu_seqlens_q=_i32([[0, 3, 3, 8]])), ValueError, r"cu_seqlens_q.*shape"),
    ("cu_k-single-entry", dict(cu_seqlens_k=_i32([0])), ValueError, r"cu_seqlens_k.*N\+1"),
    ("cu_q-not-from-0", dict(cu_seqlens_q=_i32([1, 3, 3, 8])), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    ("cu_k-decreasing", dict(cu_seqlens_k=_i32([0, 7, 5, 12]), max_seqlen_k=7), ValueError,
     r"cu_seqlens_k.*non-decreasing"),
    ("cu_q-last-short", dict(cu_seqlens_q=_i32([0, 3, 3, 7])), ValueError, r"cu_seqlens_q\[-1\].*\b8\b"),
    ("cu_k-last-long", dict(cu_seqlens_k=_i32([0, 4, 6, 13])), ValueError, r"cu_seqlens_k\[-1\].*\b12\b"),
    ("max_seqlen_q-too-small", dict(max_seqlen_q=4), ValueError, r"max_seqlen_q.*\b4\b.*\b5\b"),
    ("max_seqlen_k-too-small", dict(max_seqlen_k=5), ValueError, r"max_seqlen_k.*\b5\b.*\b6\b"),
    ("max_seqlen-negative", dict(max_seqlen_k=-1), ValueError, r"max_seqlen_k"),
    ("max_seqlen-float", dict(max_seqlen_q=5.0), TypeError, r"max_seqlen_q.*int"),
    ("count-mismatch", dict(cu_seqlens_k=_i32([0, 4, 12]), max_seqlen_k=8), ValueError,
     r"cu_seqlens_q and cu_seqlens_k.*same number"),
    ("cu_q-other-device", dict(cu_seqlens_q=torch.empty(4, dtype=torch.int32, device="meta")), ValueError,
     r"cu_seqlens_q.*device"),
    ("causal-int", dict(causal=0), TypeError, r"causal"),
    ("window-bad", dict(window_size=(0, -5)), ValueError, r"window_size"),
    ("explicit-backend-cannot-serve", dict(backend=NO), ValueError, r"backend='{NO}' cannot run"),
]


@pytest.mark.parametrize("over,exc,pattern", [pytest.param(o, e, r, id=i) for i, o, e, r in VARLEN_BAD])
def test_flash_attn_varlen_func_rejects(over, exc, pattern):
    args = _varlen_args(**over)
    if args.get("backend") == NO:
        pattern = pattern.replace("{NO}", _use_unservable(args))
    with pytest.raises(exc, match=pattern):
        qf.flash_attn_varlen_func(**args)


def test_varlen_valid_control_and_all_empty():
    out = qf.flash_attn_varlen_func(**_varlen_args())
    assert out.shape == (8, 4, 16)
    # every sequence empty: zeros and lse=-inf, no backend call
    out, lse = qf.flash_attn_varlen_func(
        randn(0, 4, 16), randn(0, 2, 16), randn(0, 2, 16), _i32([0, 0]), _i32([0, 0]), 0, 0, return_lse=True
    )
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0)


# --------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# --------------------------------------------------------------------------------------------


def _cache_args(**over):
    B, Smax, Hkv, D = 2, 10, 2, 16
    args = dict(
        q=randn(B, 1, 4, D), k_cache=randn(B, Smax, Hkv, D), v_cache=randn(B, Smax, Hkv, D),
        k=randn(B, 2, Hkv, D), v=randn(B, 2, Hkv, D), cache_seqlens=_i32([3, 8]),
    )
    args.update(over)
    return args


KVCACHE_BAD = [
    ("overflow", dict(cache_seqlens=_i32([3, 9])), ValueError, r"cache overflow.*Smax=10"),
    ("overflow-int", dict(cache_seqlens=9), ValueError, r"cache overflow"),
    ("negative-length", dict(cache_seqlens=_i32([-1, 2])), ValueError, r"cache_seqlens.*>= 0"),
    ("cache_seqlens-int64", dict(cache_seqlens=torch.tensor([3, 4])), TypeError, r"cache_seqlens.*int32"),
    ("cache_seqlens-float", dict(cache_seqlens=3.0), TypeError, r"cache_seqlens"),
    ("cache_seqlens-shape", dict(cache_seqlens=_i32([3, 4, 5])), ValueError, r"cache_seqlens.*shape.*\(2,\)"),
    ("cache_seqlens-2d", dict(cache_seqlens=_i32([[3, 4]])), ValueError, r"cache_seqlens.*shape"),
    ("k-without-v", dict(v=None), ValueError, r"\bk\b and \bv\b.*together"),
    ("v-without-k", dict(k=None), ValueError, r"\bk\b and \bv\b.*together"),
    ("append-without-seqlens", dict(cache_seqlens=None), ValueError, r"cache_seqlens.*required"),
    ("k-wrong-heads", dict(k=randn(2, 2, 1, 16), v=randn(2, 2, 1, 16)), ValueError, r"\bk\b must have shape"),
    ("v-wrong-len", dict(v=randn(2, 3, 2, 16)), ValueError, r"\bv\b must have shape"),
    ("k-wrong-batch", dict(k=randn(1, 2, 2, 16), v=randn(1, 2, 2, 16)), ValueError, r"\bk\b must have shape"),
    ("k-dtype", dict(k=randn(2, 2, 2, 16).double()), TypeError, r"k\.dtype"),
    ("v_cache-shape", dict(v_cache=randn(2, 9, 2, 16)), ValueError, r"v_cache.*shape"),
    ("k_cache-batch", dict(k_cache=randn(3, 10, 2, 16), v_cache=randn(3, 10, 2, 16)), ValueError,
     r"k_cache.*batch"),
    ("k_cache-rank3", dict(k_cache=randn(10, 2, 16)), ValueError, r"k_cache.*4 dimensions"),
    ("q-rank3", dict(q=randn(2, 4, 16)), ValueError, r"\bq\b.*4 dimensions"),
    ("H-not-multiple", dict(q=randn(2, 1, 3, 16)), ValueError, r"num_kv_heads"),
    ("cache-dtype", dict(k_cache=randn(2, 10, 2, 16).double()), TypeError, r"k_cache\.dtype"),
    ("causal-not-bool", dict(causal=None), TypeError, r"causal"),
    ("cache_seqlens-device", dict(cache_seqlens=torch.empty(2, dtype=torch.int32, device="meta")), ValueError,
     r"cache_seqlens.*device"),
    ("backend-unknown", dict(backend="nope"), ValueError, r"backend='nope'"),
]


def _paged_args(**over):
    B, num_pages, page, Hkv, D = 2, 6, 16, 2, 16
    args = dict(
        q=randn(B, 1, 4, D), k_cache=randn(num_pages, page, Hkv, D), v_cache=randn(num_pages, page, Hkv, D),
        k=randn(B, 2, Hkv, D), v=randn(B, 2, Hkv, D), cache_seqlens=_i32([3, 20]),
        block_table=_i32([[0, 1], [2, 5]]),  # capacity 2 pages x 16 = 32 keys per row
    )
    args.update(over)
    return args


PAGED_BAD = [
    ("block_table-float", dict(block_table=torch.zeros(2, 2)), TypeError, r"block_table.*int32"),
    ("block_table-batch", dict(block_table=_i32([[0, 1], [2, 3], [4, 5]])), ValueError, r"block_table.*shape"),
    ("block_table-1d", dict(block_table=_i32([0, 1])), ValueError, r"block_table.*shape"),
    ("block_table-device", dict(block_table=torch.zeros(2, 2, dtype=torch.int32, device="meta")), ValueError,
     r"block_table.*device"),
    ("page-out-of-range", dict(block_table=_i32([[0, 1], [2, 6]])), ValueError, r"page indices outside \[0, 6\)"),
    ("page-negative", dict(block_table=_i32([[-1, 1], [2, 3]])), ValueError, r"page indices.*min -1"),
    ("overflow", dict(cache_seqlens=_i32([3, 31])), ValueError,
     r"cache overflow.*block table's capacity Smax=32 \(2 pages x page_size 16\)"),
    ("leftpad", dict(cache_leftpad=_i32([0, 0])), ValueError, r"cache_leftpad.*paged"),
]


@pytest.mark.parametrize(
    "make,over,exc,pattern",
    [pytest.param(_cache_args, o, e, r, id=i) for i, o, e, r in KVCACHE_BAD]
    + [pytest.param(_paged_args, o, e, r, id=f"paged-{i}") for i, o, e, r in PAGED_BAD],
)
def test_flash_attn_with_kvcache_rejects_and_leaves_cache(make, over, exc, pattern):
    """Bad arguments raise naming the argument, before anything is written (paged: the block-table
    checks, shapes and the values of the pages each row uses)."""
    args = make(**over)
    kc, vc = args["k_cache"], args["v_cache"]
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(exc, match=pattern):
        qf.flash_attn_with_kvcache(**args)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "the cache was modified by a rejected call"


def test_paged_kvcache_takes_a_strided_block_table():
    """A block table with a non-unit stride along its pages gives the contiguous table's result."""
    bt = _i32([[0, 2], [1, 5]])
    strided = bt.t().contiguous().t()  # same values, stride (1, 2)
    assert strided.stride(1) != 1
    a = _paged_args(block_table=bt)
    b = dict(a, block_table=strided, k_cache=a["k_cache"].clone(), v_cache=a["v_cache"].clone())
    out_a = qf.flash_attn_with_kvcache(**a)
    out_b = qf.flash_attn_with_kvcache(**b)
    assert torch.equal(out_a, out_b) and torch.equal(a["k_cache"], b["k_cache"])


def test_kvcache_explicit_backend_that_cannot_serve_leaves_cache():
    """An explicit backend that cannot serve: ValueError, and nothing written to the cache."""
    args = _cache_args()
    name = _use_unservable(args)
    kc0 = args["k_cache"].clone()
    with pytest.raises(ValueError, match=rf"backend='{name}'"):
        qf.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], kc0)


def test_kvcache_valid_control():
    args = _cache_args()
    assert qf.flash_attn_with_kvcache(**args).shape == (2, 1, 4, 16)


def test_host_values_cached_per_tensor_and_invalidated_by_writes():
    from qwen3vl_flash.interface import _HOST_VALUES, host_values

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert host_values(cu) == [0, 3, 7]
    assert _HOST_VALUES[id(cu)][2] == [0, 3, 7]
    cu[2] = 9  # in place: the version counter moves, the values are read again
    assert host_values(cu) == [0, 3, 9]
    other = torch.tensor([0, 5], dtype=torch.int32)
    assert host_values(other) == [0, 5]
    key = id(cu)
    del cu  # the weak reference dies with the tensor: a new tensor at the same id is not mistaken
    ref = _HOST_VALUES.get(key)
    assert ref is None or ref[0]() is None


def test_varlen_reads_cu_seqlens_once_per_tensor(monkeypatch):
    import qwen3vl_flash.interface as itf

    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(self.numel())
        return real(self)

    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    for _ in range(3):  # three "layers" with the same cu_seqlens tensor
        itf.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, backend="tiled")
    assert calls.count(3) == 1
