"""The ``cudnn`` backend's plumbing (layouts, GQA repeat / group sum, lse shapes, refusals).

cuDNN itself needs an NVIDIA GPU; here its two aten ops are replaced by the same maths in plain
PyTorch (top-left causal, like cuDNN), so what is tested is everything of ours around them. The
real kernels are checked on the H100 by benchmarks/bench_cp.py (correctness rows before timing).
"""

import pytest
import torch

from qwen3vl_flash.reference import attention_ref
from qwen3vl_flash.backends import cudnn as cudnn_mod
from qwen3vl_flash.backends.base import AttnParams, AttnRequest, get_backend


def _math(q, k, v, causal, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(1), float("-inf"))  # top-left
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def _fake_fwd(q, k, v, causal, scale):
    assert q.dim() == 4 and q.shape[1] == k.shape[1], "cuDNN gets (B, H, S, D) with K/V repeated"
    out, lse = _math(q, k, v, causal, scale)
    return out, lse.unsqueeze(-1).float()


def _fake_bwd(dout, q, k, v, out, lse4, causal, scale):
    assert lse4.shape == q.shape[:3] + (1,) and lse4.dtype == torch.float32
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o, lse = _math(qq, kk, vv, causal, scale)
        torch.testing.assert_close(lse4[..., 0], lse.float(), atol=1e-5, rtol=1e-5)
        return torch.autograd.grad(o, (qq, kk, vv), dout)


@pytest.fixture
def fake_ops(monkeypatch):
    monkeypatch.setattr(cudnn_mod, "cudnn_forward_op", _fake_fwd)
    monkeypatch.setattr(cudnn_mod, "cudnn_backward_op", _fake_bwd)


@pytest.mark.parametrize("H,Hkv,Sq,Sk,causal", [(4, 2, 64, 64, True), (4, 4, 33, 70, False), (6, 1, 48, 48, False)])
def test_forward_backward_match_reference(fake_ops, H, Hkv, Sq, Sk, causal):
    torch.manual_seed(H * 100 + Sq)
    be = get_backend("cudnn")
    q = torch.randn(2, Sq, H, 32)
    k, v = torch.randn(2, Sk, Hkv, 32), torch.randn(2, Sk, Hkv, 32)
    dout = torch.randn_like(q)
    p = AttnParams(softmax_scale=32 ** -0.5, causal=causal)
    out, lse = be.forward(q, k, v, p)
    assert out.shape == q.shape and lse.shape == (2, H, Sq) and lse.dtype == torch.float32
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, p)
    assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape

    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = attention_ref(qr, kr, vr, causal=causal, return_lse=True)
    gq, gk, gv = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    for got, want in [(out, ref), (lse, ref_lse), (dq, gq), (dk, gk), (dv, gv)]:
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-5, rtol=2e-5)


def _req(**kw):
    base = dict(device_type="cuda", dtype=torch.bfloat16, head_dim=128, num_heads=32, num_kv_heads=8,
                seqlen_q=1024, seqlen_k=1024, causal=True, need_lse=True, need_grad=True, device_capability=(9, 0))
    base.update(kw)
    return AttnRequest(**base)


@pytest.mark.parametrize("kw,words", [
    (dict(device_type="cpu"), "CUDA"),
    (dict(dtype=torch.float32), "float16/bfloat16"),
    (dict(device_capability=(6, 1)), "8.0"),
    (dict(head_dim=72 + 4), "multiple of 8"),
    (dict(head_dim=192, device_capability=(8, 0)), "up to 128"),
    (dict(window=True), "window"),
    (dict(varlen=True), "varlen"),
    (dict(seqlen_k=2048), "square"),
])
def test_check_names_the_limit(kw, words):
    reason = get_backend("cudnn").check(_req(**kw))
    assert reason is not None and words in reason


def test_check_accepts_the_ring_blocks():
    be = get_backend("cudnn")
    assert cudnn_mod._op_available(), "every supported PyTorch build has the cuDNN attention ops"
    assert be.check(_req()) is None
    assert be.check(_req(causal=False, seqlen_k=4096, head_dim=256)) is None  # sm90: head_dim 256


def test_forward_refuses_non_square_causal(fake_ops):
    be = get_backend("cudnn")
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 16, 2, 16)
    with pytest.raises(ValueError, match="Sq == Sk"):
        be.forward(q, k, k, AttnParams(softmax_scale=0.25, causal=True))


def test_context_parallel_auto_prefers_cudnn_only_on_cuda():
    from qwen3vl_flash.parallel import choose_kernel

    q = torch.randn(1, 16, 4, 32)
    assert choose_kernel(q, 2, True).name == "tiled"
    with pytest.raises(ValueError, match="cudnn: needs a CUDA GPU"):
        choose_kernel(q, 2, True, "cudnn")


def test_kv_head_chunks_give_the_same_result(fake_ops, monkeypatch):
    """Near the memory limit a block runs in KV-head chunks (the GQA repeat of a few heads at a
    time): forward and backward equal the one-call result."""
    torch.manual_seed(3)
    be = get_backend("cudnn")
    q, k, v = torch.randn(1, 24, 8, 16), torch.randn(1, 24, 4, 16), torch.randn(1, 24, 4, 16)
    dout = torch.randn_like(q)
    p = AttnParams(softmax_scale=0.25, causal=True)
    out1, lse1 = be.forward(q, k, v, p)
    g1 = be.backward(dout, q, k, v, out1, lse1, p)
    seen = []

    def chunks(q_, k_, backward):
        seen.append((k_.shape[2], backward))
        return 2 if k_.shape[2] == 4 else 1

    monkeypatch.setattr(cudnn_mod, "kv_head_chunks", chunks)
    out2, lse2 = be.forward(q, k, v, p)
    g2 = be.backward(dout, q, k, v, out2, lse2, p)
    assert (4, False) in seen and (2, False) in seen and (4, True) in seen and (2, True) in seen
    torch.testing.assert_close(out2, out1)
    torch.testing.assert_close(lse2, lse1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_kv_head_chunks_is_one_call_off_gpu_and_for_mha():
    q, k = torch.zeros(1, 8, 8, 16), torch.zeros(1, 8, 2, 16)
    assert cudnn_mod.kv_head_chunks(q, k, backward=True) == 1  # CPU tensors
    assert cudnn_mod.kv_head_chunks(q, q, backward=True) == 1  # no GQA repeat


def _fake_fwd_gqa(q, k, v, causal, scale):
    """cuDNN taking GQA K/V as they are: each KV head serves H // Hkv query heads."""
    g = q.shape[1] // k.shape[1]
    out, lse = _math(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), causal, scale)
    return out, lse.unsqueeze(-1).float()


def _fake_bwd_gqa(dout, q, k, v, out, lse4, causal, scale):
    g = q.shape[1] // k.shape[1]
    dq, dk, dv = _fake_bwd(dout, q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), out, lse4, causal, scale)
    B, H, S, D = dk.shape
    return dq, dk.view(B, H // g, g, S, D).sum(2), dv.view(B, H // g, g, S, D).sum(2)


@pytest.mark.parametrize("native", [True, False])
def test_gqa_without_repeat_where_cudnn_takes_it(monkeypatch, native):
    """Where the probe says cuDNN takes GQA, K/V reach it with their own head count (no repeat,
    no group sum) and the result is the same; where it does not, they are repeated."""
    seen = []

    def fwd(q, k, v, causal, scale):
        seen.append(k.shape[1])
        return (_fake_fwd_gqa if native else _fake_fwd)(q, k, v, causal, scale)

    def bwd(dout, q, k, v, out, lse4, causal, scale):
        seen.append(k.shape[1])
        return (_fake_bwd_gqa if native else _fake_bwd)(dout, q, k, v, out, lse4, causal, scale)

    monkeypatch.setattr(cudnn_mod, "cudnn_forward_op", fwd)
    monkeypatch.setattr(cudnn_mod, "cudnn_backward_op", bwd)
    monkeypatch.setattr(cudnn_mod, "native_gqa", lambda device, dtype: native)
    torch.manual_seed(7)
    be = get_backend("cudnn")
    q, dout = torch.randn(2, 40, 6, 16), torch.randn(2, 40, 6, 16)
    k, v = torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    p = AttnParams(softmax_scale=0.25, causal=True)
    out, lse = be.forward(q, k, v, p)
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, p)
    assert seen == ([2, 2] if native else [6, 6])
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = attention_ref(qr, kr, vr, causal=True, softmax_scale=0.25)
    ref.backward(dout.double())
    for got, want in ((out, ref), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got.double(), want.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ops,expect", [
    ((_fake_fwd_gqa, _fake_bwd_gqa), True),  # takes GQA and agrees with the repeated call
    ((_fake_fwd, _fake_bwd), False),  # refuses mismatched head counts (raises)
])
def test_native_gqa_probe(monkeypatch, ops, expect):
    monkeypatch.setattr(cudnn_mod, "cudnn_forward_op", ops[0])
    monkeypatch.setattr(cudnn_mod, "cudnn_backward_op", ops[1])
    assert cudnn_mod._probe_native_gqa(torch.device("cpu"), torch.float32) is expect


def test_native_gqa_probe_rejects_wrong_results(monkeypatch):
    """A build that runs GQA but reads the wrong KV head for some query heads is not trusted."""
    def wrong_fwd(q, k, v, causal, scale):
        g = q.shape[1] // k.shape[1]
        if g == 1:
            return _fake_fwd(q, k, v, causal, scale)
        out, lse = _math(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), causal, scale)  # tiled, not interleaved
        return out, lse.unsqueeze(-1).float()

    monkeypatch.setattr(cudnn_mod, "cudnn_forward_op", wrong_fwd)
    monkeypatch.setattr(cudnn_mod, "cudnn_backward_op", _fake_bwd_gqa)
    assert cudnn_mod._probe_native_gqa(torch.device("cpu"), torch.float32) is False


def test_native_gqa_is_false_off_gpu():
    assert cudnn_mod.native_gqa(torch.device("cpu"), torch.bfloat16) is False
