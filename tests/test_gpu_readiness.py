"""What the first minutes on a GPU machine rely on, checked without one: test collection there, the build failing
loudly when CUDA kernels were expected, the compile check importing the tree it checked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("O1K_REQUIRE_CUDA", "PYTHONPATH")}
    env.update(extra)
    return env


def test_cuda_collection_survives_a_missing_hypothesis(tmp_path):
    """A GPU image without hypothesis: `pytest -m cuda tests` must still collect every other module (test_fuzz.py
    skipped), not stop at a collection error."""
    shim = tmp_path / "hypothesis"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'hypothesis'\", name='hypothesis')\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:hypothesispytest",
                          "-p", "no:cacheprovider", "tests/test_fuzz.py", "tests/test_merge_states.py"],
                         cwd=ROOT, env=_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stdout.lower(), run.stdout[-3000:]
    assert "test_merge_states.py::" in run.stdout and "test_fuzz.py::" not in run.stdout, run.stdout[-3000:]
