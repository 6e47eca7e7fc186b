"""CLI `python -m o1kernels.decode`: --json fields, text report, and one-line errors for bad arguments."""
import json
import math
import shutil
import subprocess
import sys

import pytest

from o1kernels.decode import DEFAULT_MODEL, main
from o1kernels.decoder.task import extract_answer, generate_problems

FAST = ["--no-progress", "--max-steps", "8", "--backend", "torch"]


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_fields(capsys):
    code, out, err = _run(capsys, ["--json", "--strategy", "weighted_best_of_n", "--n", "4", *FAST])
    assert code == 0, err
    report = json.loads(out)
    for key in ("answer", "correct", "candidates", "strategy", "n", "tokens_generated", "tokens_per_s", "kv_bytes",
                "kv_bytes_naive", "problems", "accuracy"):
        assert key in report, key
    assert report["strategy"] == "weighted_best_of_n" and report["n"] == 4 and len(report["candidates"]) == 4
    for c in report["candidates"]:
        assert set(c) >= {"text", "step_scores", "score"}
        assert len(c["step_scores"]) == len(c["steps"])
        assert c["score"] == pytest.approx(math.prod(c["step_scores"]), rel=1e-12)  # default --aggregate prod
        assert c["answer"] == extract_answer(c["text"])
    assert report["tokens_generated"] == sum(len(s) for c in report["candidates"] for s in c["steps"]) + sum(
        c["finished"] for c in report["candidates"])  # <eos> tokens do not show in the text
    assert report["tokens_per_s"] > 0 and 0 < report["kv_bytes"] <= report["kv_bytes_naive"]
    assert report["correct"] == (report["answer"] == report["problems"][0]["expected"])
    assert report["problems"][0]["expected"] == generate_problems(1, 1234)[0].answer


@pytest.mark.parametrize("strategy", ["beam_search", "majority"])
def test_text_report_and_prompt(capsys, strategy):
    code, out, err = _run(capsys, ["--prompt", "Q:17+25-9+38", "--strategy", strategy, "--n", "4",
                                   "--beam-width", "2", *FAST])
    assert code == 0, err
    assert "[1/1] Q:17+25-9+38   (expected 71)" in out and "<- chosen" in out
    assert "answer:" in out and "correct:" in out and "tokens/s" in out and "KV cache" in out


def test_module_entry_point_prints_json():
    proc = subprocess.run([sys.executable, "-m", "o1kernels.decode", "--json", "--n", "2", "--beam-width", "2",
                           "--problems", "2", *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["problems"]) == 2 and report["strategy"] == "beam_search"


@pytest.fixture
def malformed_model(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_MODEL, bad)
    (bad / "config.json").write_text('{"vocab_size": 32, "hidden_size": ')
    return bad


@pytest.fixture
def wrong_field_model(tmp_path):
    bad = tmp_path / "wrong"
    shutil.copytree(DEFAULT_MODEL, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--n", "0"], "n must be"),
    (["--n", "6", "--beam-width", "4"], "divisible"),
    (["--strategy", "mcts"], "strategy must be one of"),
    (["--n", "four"], "invalid int"),
    (["--temperature", "-1"], "temperature"),
    (["--dtype", "float8"], "--dtype"),
    (["--prompt", "what is 2*3?"], "not in the task vocabulary"),
    (["--backend", "tpu"], "--backend"),
    (["--problems", "0"], "--problems"),
])
def test_bad_arguments_give_one_line_error(capsys, argv, message):
    code, out, err = _run(capsys, argv + ["--no-progress"])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("fixture", ["malformed_model", "wrong_field_model"])
def test_malformed_checkpoint_config(capsys, request, fixture):
    path = request.getfixturevalue(fixture)
    code, out, err = _run(capsys, ["--model", str(path), "--no-progress"])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "Traceback" not in err


def test_bad_argument_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "o1kernels.decode", "--n", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
