"""The GPU check scripts of this folder in their CPU modes (a code-path check: a script broken by
an API change would waste a device call). The scripts themselves run on a GPU: see README.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_check_generate_compile_cpu_smoke():
    """The GPU check of generate's StaticCache compile, in its CPU mode (eager compile backend)."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, "tests/gpu/check_generate_compile.py", "--device", "cpu", "--tokens", "4",
                          "--repeats", "1", "--profile"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = res.stdout
    assert "tokens equal to sdpa: True" in out
    assert out.count("'unique_graphs': 1") == 2, out  # one compiled graph for every step, both
