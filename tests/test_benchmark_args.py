"""Benchmark scripts: bad size arguments rejected at parse time (the argument named, before any model is built);
where results are written; console table layout."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    ("scaling.py", ["--aggregate", "sum"], "--aggregate"),
    ("bench_vllm.py", ["--new-tokens", "0"], "--new-tokens"),
    ("bench_vllm.py", ["--branches", "16,0"], "--branches"),
    ("bench_prm.py", ["--cases", "16:0:400"], "--cases"),
    ("bench_prm.py", ["--cases", "6:8:400"], "--cases"),
    ("bench_prm.py", ["--hidden", "0"], "--hidden"),
])
def test_bad_size_arguments_exit_2_naming_the_argument(script, args, name):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"argument {name}" in proc.stderr and "Traceback" not in proc.stderr


def _output_args(*argv):
    from benchmarks.common import ArgumentParser, add_output_args

    parser = ArgumentParser(prog="bench")
    add_output_args(parser)
    return parser, parser.parse_args(list(argv))


def test_output_location(tmp_path, capsys):
    """Runs write new timestamped files (never the shipped ones) unless --update-shipped; --out picks the place."""
    from benchmarks.common import RESULTS_DIR, output_prefix

    cpu = torch.device("cpu")
    default = output_prefix(*_output_args(), "bench_x", cpu)
    assert default.parent == RESULTS_DIR and re.fullmatch(r"bench_x_cpu_\d{8}-\d{6}", default.name)
    subprocess.run(["git", "check-ignore", "-q", f"{default}.json"], cwd=ROOT, check=True)  # git status stays clean
    assert output_prefix(*_output_args("--update-shipped"), "bench_x", cpu) == RESULTS_DIR / "bench_x_cpu"
    chosen = tmp_path / "a" / "run1"
    assert output_prefix(*_output_args("--out", str(chosen)), "bench_x", cpu) == chosen
    in_dir = output_prefix(*_output_args("--out", str(tmp_path)), "bench_x", cpu)
    assert in_dir.parent == tmp_path and in_dir.name.startswith("bench_x_cpu_")
    (tmp_path / f"{in_dir.name}.json").write_text("{}")  # a second run in the same second gets a new name
    assert output_prefix(*_output_args("--out", str(tmp_path)), "bench_x", cpu) == Path(f"{in_dir}-1")
    for argv in (["--out", str(RESULTS_DIR / "bench_x_cpu")], ["--out", "x", "--update-shipped"]):
        with pytest.raises(SystemExit) as exc:
            output_prefix(*_output_args(*argv), "bench_x", cpu)
        assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--update-shipped" in err[0] and "not allowed with argument" in err[1]


def test_console_table_header_rows_legend_and_files(tmp_path):
    """bench_decode prints the header first, then the rows, then the legend; files go to --out."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--device", "cpu",
                           "--prompt-lens", "16", "--branches", "2", "--new-tokens", "2", "--reps", "1",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(f"{os.cpu_count()} logical CPUs), 1 torch thread(s)")  # not "2 threads" with 1 used
    header = next(i for i, line in enumerate(lines) if line.startswith("| P | N | S |"))
    assert lines[header + 1].startswith("|---|") and lines[header + 2].startswith("| 16 | 2 | 2 |")
    assert lines[header + 3] == "columns:" and any(line.strip().startswith("speedup") for line in lines)
    md = (tmp_path / "run.md").read_text()
    assert "| P | N | S |" in md and "Columns:" in md
    assert json.loads((tmp_path / "run.json").read_text())["rows"][0]["P"] == 16


def test_timed_calls_rotate_input_sets_beyond_l2(monkeypatch):
    """On a GPU consecutive timed calls must not find their inputs in L2: enough input sets to cover twice the L2
    (capped), used in turn by bench(); one set on the CPU or when one call reads more than twice the L2."""
    import benchmarks.common as common

    cpu = torch.device("cpu")
    assert common.rotating_sets(1e6, cpu) == 1
    monkeypatch.setattr(common, "l2_bytes", lambda device: 60 << 20)
    assert common.rotating_sets(3 << 20, cpu) == 40
    assert common.rotating_sets(1 << 10, cpu) == 64 and common.rotating_sets(1 << 30, cpu) == 1
    order = []
    common.bench([lambda i=i: order.append(i) for i in range(3)], cpu, warmup=1, reps=7)
    assert order == [0, 1, 2] + [0, 1, 2, 0, 1, 2, 0]


def test_partial_results_say_so(tmp_path):
    """Benchmarks write their files after every row (complete=False) so a stopped run keeps its rows; the files
    say the run had not finished."""
    from benchmarks.common import write_results

    cpu = torch.device("cpu")
    json_path, md_path = write_results("bench_x", cpu, ["a"], [{"a": 1}], [], prefix=tmp_path / "x", complete=False)
    assert json.loads(json_path.read_text())["meta"]["complete"] is False and "Partial: 1 row" in md_path.read_text()
    json_path, md_path = write_results("bench_x", cpu, ["a"], [{"a": 1}, {"a": 2}], [], prefix=tmp_path / "x")
    assert json.loads(json_path.read_text())["meta"]["complete"] is True and "Partial" not in md_path.read_text()
