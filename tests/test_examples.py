"""examples/finetune_qwen3vl.py (issue 16, item 3), run as CI runs it: its ``main`` on the tiny
Qwen3-VL on the CPU, through transformers' ``Trainer`` with ``qf.PackingCollator``.

* The loss falls, meaningfully: three distinct samples (random tokens, images) cycled for 16 steps,
  so the model can memorise them; the mean loss of the last steps must drop below half of the
  first steps' and below half the loss of guessing the text tokens uniformly (ln of their count),
  which unigram statistics alone cannot reach (seen: last / first 0.07-0.24 over 8 seeds).
* Every attention call of training (text layers and vision blocks) is one varlen call, never the
  dense-mask fallback, eager, or a dense call (spied as in tests/test_packing.py).
* The same run with transformers' ``sdpa`` (packed rows under its block-diagonal mask) has the same
  loss at every step (seen: 7e-7 after 16 AdamW steps, float32).
* Bad arguments stop with an error naming the argument.

Needs ``accelerate`` (transformers' Trainer does); LoRA is checked where ``peft`` is installed.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
import statistics
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate: pip install accelerate")

from qwen3vl_flash.integrations import transformers as qt  # noqa: E402
from qwen3vl_flash.testing import tiny  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_qwen3vl.py"
STEPS = 16
ARGS = ["--steps", str(STEPS), "--batch-size", "4", "--distinct", "3", "--lr", "4e-3", "--min-len", "12",
        "--max-len", "32", "--no-progress"]
LOSS_TOL = 1e-4  # ours vs sdpa, per step, after up to 16 AdamW steps in float32 (seen 7e-7)
_SPIED = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "_sdpa_with_mask", "_eager")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share between threads; on a loaded machine two
    threads waiting on each other made a 3 s run take 100 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_qwen3vl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _counted(calls, name, fn, *a, **k):
    calls[name] += 1
    return fn(*a, **k)


@pytest.fixture(scope="module")
def ours(example):
    """One run of the example with our attention, every attention entry point counted."""
    seed = int(torch.randint(0, 2**30, (1,)))
    calls = collections.Counter()
    with pytest.MonkeyPatch.context() as mp:
        for name in _SPIED:
            mp.setattr(qt, name, functools.partial(_counted, calls, name, getattr(qt, name)))
        result = example.main(ARGS + ["--seed", str(seed)])
    print(f"example seed {seed}: losses {[round(x, 4) for x in result['losses']]}; calls {dict(calls)}")
    return seed, result, calls


def test_loss_falls(ours):
    _, r, _ = ours
    losses = r["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    first, last = statistics.mean(losses[:2]), statistics.mean(losses[-3:])
    uniform = math.log(tiny.tiny_config().text_config.vocab_size - tiny.FIRST_TEXT_TOKEN)
    assert last < 0.5 * first, (first, last)
    assert last < 0.5 * uniform, (last, uniform)
    assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), r["tokens_per_s"]
    assert r["trainable"] == r["params"]  # full fine-tuning


def test_every_training_attention_call_is_one_varlen_call(ours):
    _, r, calls = ours
    assert r["forwards"] == STEPS and r["image_forwards"] > 0, r
    assert calls["_sdpa_with_mask"] == 0 and calls["_eager"] == 0, dict(calls)
    assert calls["flash_attn_func"] == 0 and calls["flash_attn_with_kvcache"] == 0, dict(calls)
    expect = (r["forwards"] * r["text_layers"]
              + (r["image_forwards"] + r["video_forwards"]) * r["vision_layers"])
    assert calls["flash_attn_varlen_func"] == expect, (dict(calls), r)


def test_sdpa_on_the_same_packed_rows_has_the_same_losses(example, ours):
    seed, r, _ = ours
    ref = example.main(ARGS + ["--seed", str(seed), "--attn", "sdpa"])["losses"]
    diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
    print(f"max |loss ours - loss sdpa| over {STEPS} steps: {diff:.2e}")
    assert len(ref) == len(r["losses"]) and diff <= LOSS_TOL, (r["losses"], ref)


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps"),
    (["--max-tokens", "16", "--max-len", "32"], "--max-tokens"),
    (["--min-len", "40", "--max-len", "20"], "--max-len"),
    (["--image-fraction", "1.5"], "--image-fraction"),
    (["--device", "nowhere"], "--device"),
])
def test_bad_arguments_name_the_argument(example, argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        example.parse_args(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_lora_trains_only_the_adapters(example):
    pytest.importorskip("peft", reason="--lora needs peft: pip install peft")
    seed = int(torch.randint(0, 2**30, (1,)))
    r = example.main(ARGS + ["--seed", str(seed), "--lora", "--lr", "1e-2"])
    assert 0 < r["trainable"] < 0.2 * r["params"], r
    losses = r["losses"]
    assert statistics.mean(losses[-3:]) < 0.8 * statistics.mean(losses[:2]), losses
