"""Running Triton kernels on the CPU for tests: Triton's interpreter (TRITON_INTERPRET=1) in a child process,
because the variable must be set before triton is imported and must not leak into other tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_under_interpreter(script: str, expect: str, timeout: float = 300) -> None:
    """Run `script` (it may import the test modules) under the interpreter; it must exit 0 and print `expect`."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=here)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-3000:]
