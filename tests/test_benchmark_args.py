"""Benchmark scripts reject bad size arguments at parse time, with the argument named, before any model is built."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import positive_int, positive_ints  # noqa: E402


def test_positive_int_types():
    assert positive_ints("1,4,16") == (1, 4, 16) and positive_ints("7") == (7,)
    assert positive_int("3") == 3
    for bad in ("", "0", "4,0", "-1", "1,,4", "a,b", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="integers >= 1"):
            positive_ints(bad)
    for bad in ("0", "-2", "x", "2.0"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer >= 1"):
            positive_int(bad)


@pytest.mark.parametrize("script,args,name", [
    ("bench_decode.py", ["--new-tokens", "0"], "--new-tokens"),
    ("bench_decode.py", ["--prompt-lens", "1024,0"], "--prompt-lens"),
    ("bench_decode.py", ["--branches", "16,x"], "--branches"),
    ("scaling.py", ["--ns", "1,0"], "--ns"),
    ("scaling.py", ["--problems", "0"], "--problems"),
    ("scaling.py", ["--beam-width", "0"], "--beam-width"),
    ("scaling.py", ["--max-branches", "-1"], "--max-branches"),
])
def test_bad_size_arguments_exit_2_naming_the_argument(script, args, name):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"argument {name}" in proc.stderr and "Traceback" not in proc.stderr
