"""Faults that never hang (issue 15): an error on one context-parallel rank makes every rank raise,
naming the failing rank, well inside the process group's timeout.

One spawn of W gloo processes per world size (2 and 4) runs every case of the list below, one
after the other on one process group, in tests/_parallel_worker.py (``run_faults``); each rank
writes what it raised per case. The spawn is guarded by a wall-clock limit: a worker still alive
after it is killed and every test of that world size fails with "hang". A fault must also be
reported fast (``FAST_S``, far below ``PG_TIMEOUT_S``): a rank that only raised because gloo's
timeout expired did not learn of the fault, it waited for it.

Faults injected:
  * malformed input on one rank only (k/v with another head_dim than q: the local validation);
  * inputs that are valid on each rank but differ across ranks (dtype, kv head count);
  * a simulated allocation failure (torch.OutOfMemoryError) in ring step 1 on one rank, through the
    test hook ``qwen3vl_flash.parallel.faults._FAULT_HOOK`` (ring, Ulysses, and hybrid on 4 ranks);
  * the local attention kernel raising in the backward's ring step 1 (a Backend object that fails);
then valid calls on the same group (per-step checks on, and off with QWEN3VL_FLASH_CP_STEP_CHECK=0),
which must still equal the single-process result, and last a rank failing before it posted its
step's transfers (nothing can be drained: the message says to re-create the group).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest
import torch.multiprocessing as mp

import _parallel_worker

PG_TIMEOUT_S = 30  # the process group's timeout in the workers
HANG_LIMIT_S = 50  # wall clock for one whole spawn; after it the run counts as hung
FAST_S = 10  # a detected fault raises on every rank within this (the guards, not the timeout)
TOL = 1e-9


def _cases(world):
    last = world - 1
    cases = [
        dict(name="bad_local", kind="bad_local", bad_rank=last),
        dict(name="mismatch_dtype", kind="mismatch_dtype", bad_rank=last),
        dict(name="mismatch_heads", kind="mismatch_heads", bad_rank=1),
        dict(name="oom_ring_forward_step1", kind="hook", mode="ring", phase="forward", step=1, bad_rank=1),
        dict(name="oom_ring_backward_step1", kind="hook", mode="ring", phase="backward", step=1, bad_rank=0,
             backward=True),
        dict(name="kernel_ring_backward_step1", kind="kernel", phase="backward", step=1, bad_rank=last,
             backward=True),
        dict(name="oom_ulysses_forward", kind="hook", mode="ulysses", phase="forward", step=0, bad_rank=last),
    ]
    if world == 4:  # 2 x 2: the guard spans the ring group and the Ulysses group
        cases.append(dict(name="oom_hybrid_forward_step1", kind="hook", mode="hybrid", phase="forward", step=1,
                          bad_rank=2))
    cases += [
        dict(name="valid_after_faults", kind="valid", backward=True),
        dict(name="valid_without_step_checks", kind="valid", backward=True, env={"QWEN3VL_FLASH_CP_STEP_CHECK": "0"}),
        # last: a rank that fails before posting its step's transfers leaves the group unmatched
        dict(name="unposted_ring_forward_step0", kind="unposted", phase="forward", step=0, bad_rank=1),
    ]
    return cases


CASES = {w: _cases(w) for w in (2, 4)}


def _spawn(world):
    cases = CASES[world]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        ctx = mp.start_processes(_parallel_worker.run_faults,
                                 args=(world, os.path.join(d, "init"), d, cases, PG_TIMEOUT_S),
                                 nprocs=world, join=False, start_method="spawn")
        hung = False
        try:  # poll (ctx.join would kill the other workers as soon as one dies)
            while any(p.is_alive() for p in ctx.processes):
                if time.time() - t0 > HANG_LIMIT_S:
                    hung = True
                    break
                time.sleep(0.2)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
        died = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(ctx.processes)
                if p.exitcode not in (0, None) and not hung]
        reports = {}
        for c in cases:
            for r in range(world):
                path = os.path.join(d, f"{c['name']}.rank{r}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        reports[(c["name"], r)] = json.load(f)
    seconds = time.time() - t0
    print(f"\n{world} gloo processes, {len(cases)} fault cases: {seconds:.1f} s{' (HUNG)' if hung else ''}")
    return {"hung": hung, "died": died, "reports": reports, "seconds": seconds}


@pytest.fixture(scope="module")
def runs():
    return {}


def _run(runs, world):
    if world not in runs:
        runs[world] = _spawn(world)
    return runs[world]


def _reports(runs, world, name):
    run = _run(runs, world)
    got = [run["reports"].get((name, r)) for r in range(world)]
    missing = [r for r, g in enumerate(got) if g is None]
    if missing:
        done = sorted({n for n, _ in run["reports"]})
        why = "hang" if run["hung"] else f"workers died ({', '.join(run['died'])})" if run["died"] else "no report"
        pytest.fail(f"{why}: ranks {missing} of {world} never finished case {name!r} "
                    f"(limit {HANG_LIMIT_S} s; cases with reports: {done})")
    return got


def _ids():
    return [(w, c["name"]) for w in (2, 4) for c in CASES[w] if c["kind"] != "valid"]


@pytest.mark.parametrize("world,name", _ids(), ids=[f"w{w}-{n}" for w, n in _ids()])
def test_every_rank_raises_naming_the_failing_rank(runs, world, name):
    case = next(c for c in CASES[world] if c["name"] == name)
    bad = case["bad_rank"] % world
    got = _reports(runs, world, name)
    for r, rep in enumerate(got):
        assert rep["raised"], f"rank {r} of {world} returned normally in {name} (rank {bad} failed)"
        msg = rep["message"]
        assert rep["seconds"] < FAST_S, (
            f"rank {r} took {rep['seconds']} s to raise in {name}: it waited for the process group's "
            f"timeout instead of learning of the fault ({rep['type']}: {msg})")
        assert f"rank {bad} of {world}" in msg, f"rank {r}'s message does not name rank {bad}: {rep['type']}: {msg}"
        if "step" in case:
            assert f"step {case['step']}" in msg, f"rank {r}'s message does not name the step: {msg}"
            assert case["phase"] in msg, f"rank {r}'s message does not name the {case['phase']}: {msg}"
        if r == bad:  # the failing rank raises its own error, with its rank and step added
            expect = {"bad_local": "ValueError", "hook": "OutOfMemoryError", "kernel": "RuntimeError",
                      "unposted": "OutOfMemoryError"}.get(case["kind"])
            if expect is not None:
                assert rep["type"] == expect, f"failing rank {r}: {rep['type']}: {msg}"
                assert rep["cause_type"] == expect, f"failing rank {r}: not chained from the original: {rep}"
            if case["kind"] == "bad_local":
                assert "head_dim" in msg, msg
        else:  # the others: ContextParallelError (a RuntimeError), input problems also a ValueError
            assert "ContextParallelError" in rep["mro"] and "RuntimeError" in rep["mro"], f"rank {r}: {rep}"
        if case["kind"] in ("bad_local", "mismatch_dtype", "mismatch_heads"):
            assert "ValueError" in rep["mro"] or "TypeError" in rep["mro"], f"rank {r}: {rep['type']}: {msg}"
        if case["kind"] == "mismatch_dtype":
            assert "dtype" in msg and "float32" in msg and "float64" in msg, msg
        if case["kind"] == "mismatch_heads":
            assert "kv head" in msg, msg
        if case["kind"] == "unposted":  # nothing could be drained: the message says what to do
            assert "re-create the process group" in msg, msg


@pytest.mark.parametrize("name", ["valid_after_faults", "valid_without_step_checks"])
@pytest.mark.parametrize("world", [2, 4])
def test_valid_call_after_the_faults_matches_one_process(runs, world, name):
    """The group is still usable after the faults above (their in-flight transfers were drained),
    with the per-step checks on (the default) and off."""
    for r, rep in enumerate(_reports(runs, world, name)):
        assert not rep["raised"], f"rank {r}: {rep['type']}: {rep['message']}\n{rep.get('traceback')}"
        for key in ("out", "dq", "dk", "dv"):
            assert rep[key] <= TOL, f"rank {r}: max|{key} - single-process| = {rep[key]:.3e}"
