"""Compile Triton kernels for a GPU target on a machine without one (Triton's bundled ptxas), in a subprocess
without TRITON_INTERPRET: catches what the interpreter accepts but the compiler rejects."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_compile_script(script: str, cache_dir, timeout: int = 600) -> None:
    """Run `script` (it compiles kernels and prints "compiled") with a fresh Triton cache in cache_dir."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache_dir), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout + run.stderr[-3000:]
