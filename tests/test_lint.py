"""The code base passes flake8 (setup.cfg's settings) — the lint check CI runs with the tests."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flake8_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "flake8", "hmem_jax", "bench", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
