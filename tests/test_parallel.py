"""Context parallelism on CPU with gloo: 2, 4 and 8 spawned processes, float64, ``tiled`` inside.

Each world size is one spawn (module-scoped fixture) running many cases in
tests/_parallel_worker.py; every test below asserts on one case. The bar (issue 6): output, lse
and dq/dk/dv equal the single-process ``flash_attn_func(backend="tiled")`` result to 1e-9.
Single-process pieces (the lse merge, the no-op path, the zigzag reorder) are tested in-process.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

import _parallel_worker
from qwen3vl_flash import flash_attn_func
from qwen3vl_flash.parallel import choose_mode, context_parallel_attn, merge_attn_outputs, shard, unshard
from qwen3vl_flash.parallel.ulysses import ring_to_zigzag_gathered, zigzag_gathered_to_ring
from qwen3vl_flash.reference import attention_ref

TOL = 1e-9
SPAWN_TIMEOUT_S = 300


def _attn(name, mode, causal, layout, S, H, Hkv, B=2, D=8, **kw):
    return dict(kind="attn", name=name, mode=mode, causal=causal, layout=layout, S=S, H=H, Hkv=Hkv, B=B, D=D, **kw)


def _grid(world, modes, heads, S):
    """mode x causal x layout, with the heads given per mode."""
    out = []
    for mode in modes:
        H, Hkv = heads[mode]
        for causal in (True, False):
            for layout in ("zigzag", "contiguous"):
                out.append(_attn(f"w{world}-{mode}-{'causal' if causal else 'full'}-{layout}-h{H}kv{Hkv}",
                                 mode, causal, layout, S, H, Hkv))
    return out


# 2 processes: every mode x causal x layout; GQA everywhere; odd lengths per rank (S_local = 14)
CASES_2 = _grid(2, ["ring", "ulysses", "auto", "allgather"],
                {"ring": (4, 2), "ulysses": (4, 2), "auto": (4, 2), "allgather": (4, 2)}, S=28) + [
    _attn("w2-ring-causal-zigzag-odd-heads-h3kv1", "ring", True, "zigzag", 20, 3, 1, D=12),
    _attn("w2-auto-causal-zigzag-h3kv1", "auto", True, "zigzag", 20, 3, 1, expect_mode="ring"),
    _attn("w2-ulysses-causal-zigzag-mqa-h4kv1", "ulysses", True, "zigzag", 12, 4, 1, B=1),
    _attn("w2-ring-causal-zigzag-scale", "ring", True, "zigzag", 12, 2, 2, scale=0.37),
    _attn("w2-ring-causal-zigzag-S4", "ring", True, "zigzag", 4, 2, 1, B=1),  # one token per chunk
    _attn("w2-NEGATIVE-ring-zigzag-sharded-as-contiguous", "ring", True, "contiguous", 16, 2, 1,
          attn_layout="zigzag", negative=True),
    dict(kind="attn_lowp", name="w2-lowp-ring-causal-zigzag-float32", mode="ring", causal=True, layout="zigzag",
         dtype="float32", S=64, H=4, Hkv=2, B=1, D=16),
    dict(kind="attn_lowp", name="w2-lowp-ring-causal-zigzag-bfloat16", mode="ring", causal=True, layout="zigzag",
         dtype="bfloat16", S=64, H=4, Hkv=2, B=1, D=16),
    dict(kind="attn_lowp", name="w2-lowp-ulysses-full-contiguous-bfloat16", mode="ulysses", causal=False,
         layout="contiguous", dtype="bfloat16", S=64, H=4, Hkv=1, B=1, D=16),
    dict(kind="shard", name="w2-shard-unshard", S=24),
    dict(kind="errors", name="w2-errors"),
]
for _c in CASES_2:
    if _c.get("mode") == "auto":
        _c.setdefault("expect_mode", "ring")  # two ranks: the ring (measured faster than Ulysses there)

# 4 processes: ring, Ulysses with kv heads replicated (Hkv < W), auto's three answers, hybrid 2x2
# from a flat group, from a 2-D DeviceMesh and from a (ring, Ulysses) pair of groups
CASES_4 = [
    _attn("w4-ring-causal-zigzag-h4kv2", "ring", True, "zigzag", 24, 4, 2),
    _attn("w4-ring-causal-contiguous-h4kv2", "ring", True, "contiguous", 24, 4, 2),
    _attn("w4-ring-full-zigzag-h2kv1", "ring", False, "zigzag", 24, 2, 1),
    _attn("w4-ulysses-causal-zigzag-h8kv2", "ulysses", True, "zigzag", 16, 8, 2, D=4),
    _attn("w4-ulysses-causal-contiguous-h4kv4", "ulysses", True, "contiguous", 16, 4, 4),
    _attn("w4-ulysses-full-zigzag-h4kv1", "ulysses", False, "zigzag", 16, 4, 1),
    _attn("w4-auto-causal-zigzag-h8kv2", "auto", True, "zigzag", 16, 8, 2, D=4, expect_mode="ulysses"),
    _attn("w4-auto-causal-zigzag-h6kv2", "auto", True, "zigzag", 16, 6, 2, D=4, expect_mode="hybrid"),
    _attn("w4-auto-causal-zigzag-h3kv3", "auto", True, "zigzag", 16, 3, 3, D=4, expect_mode="ring"),
    _attn("w4-hybrid-causal-zigzag-h4kv2", "hybrid", True, "zigzag", 24, 4, 2),
    _attn("w4-hybrid-causal-contiguous-h4kv2", "hybrid", True, "contiguous", 24, 4, 2),
    _attn("w4-hybrid-full-zigzag-h4kv2", "hybrid", False, "zigzag", 24, 4, 2),
    _attn("w4-hybrid-mesh2x2-causal-zigzag-h4kv1", "hybrid", True, "zigzag", 16, 4, 1, group="mesh:2x2"),
    _attn("w4-hybrid-pair2x2-causal-zigzag-h2kv2", "hybrid", True, "zigzag", 16, 2, 2, group="pair:2x2"),
    _attn("w4-auto-mesh2x2-causal-contiguous-h4kv2", "auto", True, "contiguous", 16, 4, 2, group="mesh:2x2",
          expect_mode="hybrid"),
    dict(kind="plan", name="w4-plan-causal-zigzag", S=32, causal=True, layout="zigzag"),
    dict(kind="plan", name="w4-plan-causal-contiguous", S=32, causal=True, layout="contiguous"),
    dict(kind="plan", name="w4-plan-full-zigzag", S=32, causal=False, layout="zigzag"),
    dict(kind="shard", name="w4-shard-unshard", S=32),
    dict(kind="errors", name="w4-errors"),
]

# 8 processes (issue 7, CPU part): tiny shapes, one case per mode
CASES_8 = [
    _attn("w8-ring-causal-zigzag-h4kv2", "ring", True, "zigzag", 32, 4, 2, B=1, D=4),
    _attn("w8-ulysses-causal-zigzag-h8kv2", "ulysses", True, "zigzag", 32, 8, 2, B=1, D=4),
    _attn("w8-hybrid-mesh2x4-causal-zigzag-h8kv2", "hybrid", True, "zigzag", 32, 8, 2, B=1, D=4, group="mesh:2x4"),
    _attn("w8-auto-node4-causal-zigzag-h8kv2", "auto", True, "zigzag", 32, 8, 2, B=1, D=4,
          local_world_size=4, expect_mode="hybrid"),
]


def _spawn(world, cases):
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        ctx = mp.start_processes(_parallel_worker.run, args=(world, os.path.join(d, "init"), d, cases),
                                 nprocs=world, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=5):
                if time.time() - t0 > SPAWN_TIMEOUT_S:
                    raise TimeoutError(f"{world} gloo processes did not finish in {SPAWN_TIMEOUT_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        ranks = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    print(f"\n{world} gloo processes, {len(cases)} cases: {time.time() - t0:.1f} s")
    return ranks


@pytest.fixture(scope="module")
def results2():
    return _spawn(2, CASES_2)


@pytest.fixture(scope="module")
def results4():
    return _spawn(4, CASES_4)


@pytest.fixture(scope="module")
def results8():
    return _spawn(8, CASES_8)


def _ids(cases, kind="attn"):
    return [c["name"] for c in cases if c["kind"] == kind]


def _case(cases, name):
    return next(c for c in cases if c["name"] == name)


def _check_attn(ranks, case):
    name = case["name"]
    for r, res in enumerate(ranks):
        got = res.get(name)
        assert got is not None, f"rank {r} has no result for {name}"
        assert "error" not in got, f"rank {r} raised in {name}:\n{got.get('error')}"
        assert got["ref_vs_definition"] <= TOL, f"reference disagrees with attention_ref: {got}"
        assert got["dtypes"] == ["torch.float64"] * 5, f"rank {r}: dtypes {got['dtypes']}"
        assert got["local_len"] * len(ranks) == case["S"]
        if case.get("negative"):
            # the comparison is sensitive: a layout mix-up must show up far above the tolerance
            assert got["out"] > 1e-3 or math.isnan(got["out"]), f"negative control passed: {got}"
            continue
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert got[key] <= TOL, f"rank {r}: max|{key} - single-process| = {got[key]:.3e} > {TOL} in {name}"
        if "expect_mode" in case:
            assert got["auto_mode"] == case["expect_mode"], f"auto picked {got['auto_mode']}"


@pytest.mark.parametrize("name", _ids(CASES_2))
def test_two_processes(results2, name):
    _check_attn(results2, _case(CASES_2, name))


@pytest.mark.parametrize("name", _ids(CASES_4))
def test_four_processes(results4, name):
    _check_attn(results4, _case(CASES_4, name))


@pytest.mark.parametrize("name", _ids(CASES_8))
def test_eight_processes(results8, name):
    _check_attn(results8, _case(CASES_8, name))


@pytest.mark.parametrize("name", _ids(CASES_4, "plan"))
def test_ring_block_plan(results4, name):
    """Which blocks the ring computes (W=4, S_local = 2c = 8): zigzag causal = one causal diagonal
    block then exactly half a block per step on every rank; contiguous causal = rank r computes r+1
    blocks (later ones skipped); non-causal = W full blocks. Forward and backward alike."""
    case = _case(CASES_4, name)
    W, L = 4, case["S"] // 4
    c = L // 2
    for r, res in enumerate(results4):
        got = res[name]
        assert "error" not in got, got.get("error")
        if case["layout"] == "zigzag" and case["causal"]:
            # step s brings rank (r - s) mod W: lower ranks give (2c x c), higher ranks (c x 2c)
            expect = [[L, L, True]] + [[L, c, False] if (r - s) % W < r else [c, L, False] for s in range(1, W)]
        elif case["causal"]:
            expect = [[L, L, True]] + [[L, L, False]] * r
        else:
            expect = [[L, L, False]] * W
        assert got["fwd"] == expect, f"rank {r} forward calls {got['fwd']} != {expect}"
        assert got["bwd"] == expect, f"rank {r} backward calls {got['bwd']} != {expect}"


LOWP_ATOL = {"float32": 1e-6, "bfloat16": 1e-3}


@pytest.mark.parametrize("name", _ids(CASES_2, "attn_lowp"))
def test_two_processes_low_precision(results2, name):
    """float32 / bf16 inside: within 2x (out, lse) / 3x (grads) of PyTorch's own low-precision error."""
    case = _case(CASES_2, name)
    atol = LOWP_ATOL[case["dtype"]]
    for r, got in enumerate(res[name] for res in results2):
        assert "error" not in got, f"rank {r} raised in {name}:\n{got.get('error')}"
        lse_dtype = "torch.float32"
        assert got["dtypes"] == [f"torch.{case['dtype']}", lse_dtype] + [f"torch.{case['dtype']}"] * 3
        for key, factor, slack in (("out", 2, 1), ("lse", 2, 10), ("dq", 3, 4), ("dk", 3, 4), ("dv", 3, 4)):
            bound = factor * got[key + "_lowprec"] + atol * slack
            assert got[key] <= bound, f"rank {r}: {key} error {got[key]:.3e} > {bound:.3e} in {name}"


@pytest.mark.parametrize("world", [2, 4])
def test_shard_unshard_layouts(results2, results4, world):
    ranks = results2 if world == 2 else results4
    for r, res in enumerate(ranks):
        got = dict(res[f"w{world}-shard-unshard"])
        assert "error" not in got, got.get("error")
        got.pop("seconds")
        bad = [k for k, ok in got.items() if not ok]
        assert not bad and len(got) == 12, f"rank {r}: wrong {bad}"


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_lengths_and_bad_arguments_raise(results2, results4, world):
    ranks = results2 if world == 2 else results4
    for r, res in enumerate(ranks):
        e = res[f"w{world}-errors"]
        assert "error" not in e, e.get("error")
        assert f"multiple of {2 * world}" in e["shard_zigzag"], e["shard_zigzag"]
        assert f"multiple of {world}" in e["shard_contiguous"], e["shard_contiguous"]
        assert e["shard_contiguous_ok"] == "no error"
        assert f"multiple of {2 * world}" in e["attn_odd_local"], e["attn_odd_local"]
        assert "query head count (3)" in e["ulysses_heads"], e["ulysses_heads"]
        assert "hybrid" in e["hybrid_heads"], e["hybrid_heads"]
        assert "mode must be one of" in e["bad_mode"], e["bad_mode"]


# --------------------------------------------------------------------------------------------
# single process
# --------------------------------------------------------------------------------------------


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("causal", [True, False])
def test_one_process_is_flash_attn_func(causal):
    q, k, v = _rand(2, 10, 4, 8), _rand(2, 10, 2, 8), _rand(2, 10, 2, 8)
    out, lse = context_parallel_attn(q, k, v, causal=causal, return_lse=True, backend="tiled")
    ref, ref_lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="tiled")
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert shard(q, 1) is q and unshard(q, 1) is q  # no process group: no-op, any length
    assert choose_mode(4, 2) == "local"


def test_merge_of_key_halves_is_full_attention():
    q, k, v = _rand(2, 7, 4, 8), _rand(2, 13, 2, 8), _rand(2, 13, 2, 8)
    full, full_lse = attention_ref(q, k, v, return_lse=True)
    o1, l1 = attention_ref(q, k[:, :5], v[:, :5], return_lse=True)
    o2, l2 = attention_ref(q, k[:, 5:], v[:, 5:], return_lse=True)
    for (a, la), (b, lb) in (((o1, l1), (o2, l2)), ((o2, l2), (o1, l1))):  # order does not matter
        out, lse = merge_attn_outputs(a, la, b, lb)
        assert (out - full).abs().max().item() <= TOL
        assert (lse - full_lse).abs().max().item() <= TOL
    # low-precision block into an fp32 accumulator: the result stays fp32
    out32, _ = merge_attn_outputs(o1.float(), l1.float(), o2.bfloat16(), l2.float())
    assert out32.dtype == torch.float32 and (out32.double() - full).abs().max().item() < 2e-2


def test_merge_fully_masked_block_leaves_result_unchanged():
    out, lse = _rand(1, 6, 3, 4), _rand(1, 3, 6)
    empty_out, empty_lse = torch.zeros(1, 6, 3, 4, dtype=torch.float64), torch.full((1, 3, 6), -math.inf,
                                                                                     dtype=torch.float64)
    m_out, m_lse = merge_attn_outputs(out, lse, empty_out, empty_lse)
    assert torch.equal(m_out, out) and torch.equal(m_lse, lse)
    # nothing so far + a real block: exactly the block
    b_out, b_lse = merge_attn_outputs(empty_out, empty_lse, out, lse)
    assert torch.equal(b_out, out) and torch.equal(b_lse, lse)
    # neither side saw a key: zeros and -inf, no NaN
    z_out, z_lse = merge_attn_outputs(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(z_out, empty_out) and torch.isneginf(z_lse).all()
    # a mix, row by row
    mixed_lse = lse.clone()
    mixed_lse[..., ::2] = -math.inf
    mixed_out = out.clone()
    mixed_out[:, ::2] = 0
    r_out, r_lse = merge_attn_outputs(out, lse, mixed_out, mixed_lse)
    assert torch.equal(r_out[:, ::2], out[:, ::2]) and torch.equal(r_lse[..., ::2], lse[..., ::2])
    assert not torch.isnan(r_out).any()


@pytest.mark.parametrize("size", [1, 2, 3])
def test_zigzag_reorder_round_trip(size):
    # shards of ring-level zigzag: [a0 b0 | a1 b1 | ...] -> [a0 a1 .. b1 b0]
    c = 3
    x = torch.arange(size * 2 * c).view(1, -1, 1, 1)
    y = zigzag_gathered_to_ring(x, size, 1)
    a = [list(range(u * 2 * c, u * 2 * c + c)) for u in range(size)]
    b = [list(range(u * 2 * c + c, (u + 1) * 2 * c)) for u in range(size)]
    expect = sum(a, []) + sum(reversed(b), [])
    assert y.flatten().tolist() == expect
    assert torch.equal(ring_to_zigzag_gathered(y, size, 1), x)


def test_kernel_choice_and_argument_errors():
    from qwen3vl_flash.parallel import choose_kernel

    q = _rand(1, 8, 4, 8)
    assert choose_kernel(q, 2, True).name == "tiled"  # CPU: tiled (triton is for CUDA tensors)
    assert choose_kernel(q, 2, True, "tiled").name == "tiled"
    with pytest.raises(ValueError, match="forward/backward"):
        choose_kernel(q, 2, True, "eager")  # differentiable-only backends cannot take a global lse
    with pytest.raises(ValueError, match="backend="):
        choose_kernel(q, 2, True, "nonexistent")
    k = _rand(1, 6, 2, 8)
    with pytest.raises(ValueError, match="same positions"):
        context_parallel_attn(q, k, k)
    with pytest.raises(ValueError, match="layout must be one of"):
        context_parallel_attn(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="multiple of k's head count"):
        context_parallel_attn(q, _rand(1, 8, 3, 8), _rand(1, 8, 3, 8))
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(q, 1, layout="spiral")
