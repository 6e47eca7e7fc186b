"""CLI `python -m o1kernels.decode`: --json fields, text report, and one-line errors for bad arguments."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from o1kernels.decode import DEFAULT_MODEL, DEFAULT_SCORER, TREE_PAGE_SIZE, VERIFIER_MODEL, main
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
        assert c["score"] == min(c["step_scores"])  # default --aggregate min
        assert c["answer"] == extract_answer(c["text"])
    assert report["tokens_generated"] == sum(len(s) for c in report["candidates"] for s in c["steps"]) + sum(
        c["finished"] for c in report["candidates"])  # <eos> tokens do not show in the text
    # dense rows: the ideal within one page per branch (the task's prompts are shorter than a page, so a fork's copy
    # of the prompt's partial page is what a branch holds beyond its own tokens)
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    page_bytes = TREE_PAGE_SIZE * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    assert report["tokens_per_s"] > 0 and 0 < report["kv_bytes"] <= report["kv_bytes_naive"] + 4 * page_bytes
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
    """Run as a program, the CLI restarts itself with OMP_WAIT_POLICY=PASSIVE (unless it is set): spinning OpenMP
    threads collapsed the demo's speed beside any busy process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-m", "o1kernels.decode", "--json", "--n", "2", "--beam-width", "2",
                           "--problems", "2", *FAST], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["problems"]) == 2 and report["strategy"] == "beam_search"
    assert report["omp_wait_policy"] == "PASSIVE"


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


@pytest.fixture
def truncated_weights(tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(DEFAULT_MODEL, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    return bad


@pytest.fixture
def corrupt_weights(tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(DEFAULT_MODEL, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:40] = b"x" * 32  # the JSON header
    (bad / "model.safetensors").write_bytes(bytes(data))
    return bad


# Each message names the option; the issue-13 reproducers (tracebacks, hangs, silently accepted values) among them.
BAD_ARGUMENTS = [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: checkpoint directory"),
    (["--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
    (["--n", "-1"], "argument --n: expected an integer >= 1, got '-1'"),
    (["--n", "1e9"], "argument --n: expected an integer >= 1, got '1e9'"),
    (["--n", "1000000000"], "--n 1000000000 x --problems 3 = 3000000000 branches: at most 2**31 - 1"),
    (["--n", "100000000"], "--n 100000000 x --problems 3 branches of up to"),  # ... need N TiB of KV cache
    (["--problems", "1000000000000"], "--n 8 x --problems 1000000000000 = 8000000000000 branches"),
    (["--problems", "100000000"], "--n 8 x --problems 100000000 branches of up to"),
    (["--max-steps", "1000000000000"], "--max-steps 1000000000000 x --max-step-tokens 12) may need"),
    (["--n", "6", "--beam-width", "4"], "--n 6 must be divisible by --beam-width 4 for beam_search"),
    (["--strategy", "mcts"], "argument --strategy: invalid choice: 'mcts'"),
    (["--aggregate", "sum"], "argument --aggregate: invalid choice: 'sum'"),
    (["--select", "majority"], "argument --select: invalid choice: 'majority'"),
    (["--n", "four"], "argument --n: expected an integer >= 1, got 'four'"),
    (["--temperature", "-1"], "argument --temperature: expected a number in [0, 1e+06], got '-1'"),
    (["--temperature", "nan"], "argument --temperature"),
    (["--top-p", "2"], "argument --top-p: expected a number in (0, 1], got '2'"),
    (["--top-p", "0"], "argument --top-p"),
    (["--seed", "1180591620717411303424"], "argument --seed: expected an integer in [0, 18446744073709551615]"),
    (["--seed", "-1"], "argument --seed"),
    (["--max-step-tokens", "1000000000"], "--max-step-tokens 1000000000: a step cannot be longer than the "
                                          "model's 128 positions"),
    (["--max-step-tokens", "0"], "argument --max-step-tokens"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--prompt", "what is 2*3?"], "--prompt: text contains 'w', which is not in the task vocabulary"),
    (["--prompt", "Q:" + "+".join(["11"] * 134)], "--prompt: 405 tokens (with <bos>) leave no room to generate in "
                                                  "the model's 128 positions"),
    (["--prompt", "Q:1+2", "--problems", "2"], "--problems: not with --prompt"),
    (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["--backend", "cuda", "--decoder", "naive"], "--backend cuda: only the tree decoder runs our kernels"),
    (["--backend", "cuda"], "--backend cuda: backend 'cuda' is unavailable"),
    (["--problems", "0"], "argument --problems: expected an integer >= 1, got '0'"),
    (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
    (["--device", "cpu:5"], "--device cpu:5: the CPU has no device index 5"),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1"),
    (["--scorer", "both"], "argument --scorer: invalid choice: 'both'"),
    (["--scorer", "head", "--prm", str(DEFAULT_MODEL)], "--scorer head: not with --prm"),
    (["--model", str(VERIFIER_MODEL)], f"--model {VERIFIER_MODEL}: its reward head multiplies by the step's "
                                       "likelihood (likelihood_weight 1), which only a separate PRM computes"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["--device", "cuda"], "--device cuda: CUDA is not available"))


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=lambda x: " ".join(x)[:40] if isinstance(x, list) else "")
def test_bad_arguments_give_one_line_error(capsys, argv, message):
    code, out, err = _run(capsys, argv + ["--no-progress"])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("fixture", ["truncated_weights", "corrupt_weights"])
def test_damaged_weights_file(capsys, request, fixture):
    """A truncated or corrupt model.safetensors used to end in a SafetensorError traceback."""
    path = request.getfixturevalue(fixture)
    code, out, err = _run(capsys, ["--model", str(path), "--no-progress"])
    assert code == 2 and out == ""
    assert err.startswith(f"error: --model {path}: corrupt or truncated safetensors file") and err.count("\n") == 1


def test_checks_come_before_the_model_load(capsys, monkeypatch):
    """Bad options fail without loading weights (a bad --prompt with a damaged checkpoint reports the prompt)."""
    import o1kernels.decoder

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(o1kernels.decoder, "load_checkpoint", no_load)
    for argv in (["--prompt", "Q:" + "+".join(["11"] * 134)], ["--n", "100000000"], ["--backend", "cuda"],
                 ["--device", "cpu:5"], ["--max-step-tokens", "500"]):
        code, _, err = _run(capsys, argv + ["--no-progress"])
        assert code == 2 and err.startswith("error: --"), err


def test_beam_search_with_one_candidate(capsys):
    """--n 1 with beam search runs one beam (width min(--beam-width, --n), as the scaling script does)."""
    code, out, err = _run(capsys, ["--json", "--n", "1", *FAST])
    assert code == 0, err
    report = json.loads(out)
    assert report["n"] == 1 and report["beam_width"] == 1 and len(report["candidates"]) == 1


def test_text_report_explains_scores_and_merged_duplicates(capsys):
    code, out, err = _run(capsys, ["--n", "8", "--threads", "1", *FAST])
    assert code == 0, err
    assert "score = the minimum of its step scores (--aggregate min)" in out
    assert "each distinct finished chain is listed once" in out and "on cpu, 1 CPU thread\n" in out
    assert "the answer: the best-scored chain's (--select argmax)" in out
    code, out, err = _run(capsys, ["--n", "8", "--keep-duplicate-beams", "--aggregate", "prod", "--select", "weighted",
                                   *FAST])
    assert "score = the product of its step scores" in out and "listed once" not in out
    assert "the answer: the one with the largest sum of chain scores (--select weighted)" in out


def test_threads_option_sets_torch_threads_for_the_run_only(capsys):
    before = torch.get_num_threads()
    code, out, err = _run(capsys, ["--json", "--threads", "1", "--n", "2", *FAST])
    assert code == 0 and json.loads(out)["threads"] == 1 and torch.get_num_threads() == before


def test_scaling_forwards_its_own_options(capsys, tmp_path):
    """--scaling used to reject scaling.py's own --ns and to print its usage on a bad --problems."""
    code, out, err = _run(capsys, ["--scaling", "--problems", "0"])
    assert code == 2 and out == ""
    assert err.strip() == ("python -m o1kernels.decode --scaling: error: argument --problems: expected an integer "
                           ">= 1, got '0'")
    code, out, err = _run(capsys, ["--scaling", "--ns", "1", "--problems", "2", "--strategies", "beam_search",
                                   "--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "run")])
    assert code == 0, err
    assert "beam_search N=1" in err and "problem/s" in err  # the progress bar on stderr
    rows = json.loads((tmp_path / "run.json").read_text())["rows"]
    scored = [("best_of_n", 1), ("weighted_best_of_n", 1), ("beam_search", 1), ("beam_search_weighted", 1)]
    assert [(r["scorer"], r["strategy"], r["n"]) for r in rows] == [
        ("-", "greedy", 1), ("-", "majority", 1), *[("head", *k) for k in scored], *[("verifier", *k) for k in scored]]
    for r in rows:  # every problem is right or has one fate; the interval holds the accuracy
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        assert r["accuracy"] + r["chose_wrong"] + r["pruned_correct"] + r["no_correct"] == pytest.approx(1)
    assert out.startswith("| scorer | strategy | n |") and "columns:" in out and (tmp_path / "run.md").is_file()
    if importlib.util.find_spec("matplotlib") is not None:  # optional (the "plot" extra)
        assert (tmp_path / "run.png").is_file() and (tmp_path / "run_frontier.png").is_file()


@pytest.mark.parametrize("fixture", ["malformed_model", "wrong_field_model"])
def test_malformed_checkpoint_config(capsys, request, fixture):
    path = request.getfixturevalue(fixture)
    code, out, err = _run(capsys, ["--model", str(path), "--no-progress"])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--n", "0"], ["--device", "meta"], ["--scaling", "--problems", "0"]])
def test_bad_argument_in_a_subprocess_has_no_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "o1kernels.decode", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "error: " in proc.stderr and "Traceback" not in proc.stderr


def test_reader_leaving_early_is_no_error():
    """`python -m o1kernels.decode | head`: the report's writes hit a closed pipe; the CLI stops without a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "o1kernels.decode", "--problems", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the search ends, so the first write of the report fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == ""


@pytest.mark.cuda
def test_cuda_run_warms_up_and_says_so(capsys):
    """On a GPU the CLI compiles and captures before the timed search and says so on stderr."""
    code, out, err = _run(capsys, ["--json", "--device", "cuda", "--n", "4", "--problems", "2", "--max-steps", "8"])
    assert code == 0, err
    assert "warming up on cuda" in err and "capturing a CUDA graph" in err and "warm-up done" in err
    report = json.loads(out)
    assert report["tokens_per_s"] > 0 and len(report["problems"]) == 2


def test_scorer_chooses_the_reward_head_or_the_shipped_verifier(capsys):
    """--scorer: the policy's reward head, or the shipped verifier run beside it as a separate PRM (the default for the
    shipped model, as its training script chose); another --model defaults to its own head."""
    reports = {}
    for scorer in ("head", "verifier"):
        code, out, err = _run(capsys, ["--json", "--scorer", scorer, "--n", "4", *FAST])
        assert code == 0, err
        reports[scorer] = json.loads(out)
    assert reports["head"]["prm"] is None and reports["verifier"]["prm"] == str(VERIFIER_MODEL)
    head, verifier = reports["head"]["candidates"], reports["verifier"]["candidates"]
    assert [c["steps"] for c in head] == [c["steps"] for c in verifier]  # the same samples, scored differently
    assert [c["step_scores"] for c in head] != [c["step_scores"] for c in verifier]
    code, out, err = _run(capsys, ["--n", "4", *FAST])
    assert code == 0, err
    assert {"verifier": "step scores from the shipped verifier (--scorer verifier)",
            "head": "step scores from the policy's reward head (--scorer head)"}[DEFAULT_SCORER] in out
