"""The scaling benchmark's analysis: each problem's fate (right, PRM error, policy limit), the paired bootstrap test
for drops with N (per strategy and scorer), the compute-optimal frontier, and merging runs."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scaling import (BOOTSTRAP, bootstrap_indices, drops, fate, frontier, interval, main,  # noqa: E402
                                scorer_list)
from o1kernels.decoder.search import Candidate  # noqa: E402
from o1kernels.decoder.task import Problem  # noqa: E402

PROBLEM = Problem((17, 25, 9), ("+", "-"))  # 17+25=42, 42-9=33
RIGHT = ["17+25=42\n", "42-9=33\n", "A:33"]
WRONG = ["17+25=43\n", "43-9=34\n", "A:34"]


def _cand(steps, finished=True):
    answer = int(steps[-1][2:]) if steps and steps[-1].startswith("A:") else None
    return Candidate(steps=list(steps), finished=finished, answer=answer)


def test_fate_of_a_sampling_strategy():
    cands = [_cand(WRONG), _cand(RIGHT)]
    assert fate(PROBLEM, cands, 1) == "correct"
    assert fate(PROBLEM, cands, 0) == "chose_wrong"  # a correct chain was there
    assert fate(PROBLEM, [_cand(WRONG)], 0) == "no_correct"
    assert fate(PROBLEM, [_cand(WRONG)], None) == "no_correct"


def test_fate_of_a_tree_search_tells_pruning_from_policy_limit():
    wrong = [_cand(WRONG)]
    # Explored chains (step texts) -> finished. The correct first step was expanded into a wrong second one only.
    explored = {tuple(RIGHT[:1]): False, tuple(RIGHT[:1]) + ("42-9=32\n",): False,
                tuple(WRONG[:1]): False, tuple(WRONG[:2]): False, tuple(WRONG): True}
    explored_more = {**explored, tuple(RIGHT[:1]) + ("42-9=32\n", "A:32"): True}
    assert fate(PROBLEM, wrong, 0, explored_more) == "no_correct"  # the only correct prefix was expanded
    # A correct partial chain that was generated but never expanded: pruned by the search.
    pruned = {**explored_more, tuple(RIGHT[:2]): False}
    assert fate(PROBLEM, wrong, 0, pruned) == "pruned_correct"
    # A correct finished chain that the search did not return.
    dropped = {**explored_more, tuple(RIGHT[:2]): False, tuple(RIGHT): True}
    assert fate(PROBLEM, wrong, 0, dropped) == "pruned_correct"
    # ... and when it was returned but not chosen, the selection erred.
    assert fate(PROBLEM, [*wrong, _cand(RIGHT)], 0, dropped) == "chose_wrong"


def test_bootstrap_interval_and_drops():
    gen = torch.Generator().manual_seed(0)
    problems = 400
    resample = bootstrap_indices(problems)
    assert resample.shape == (BOOTSTRAP, problems) and torch.equal(resample, bootstrap_indices(problems))
    base = (torch.rand(problems, generator=gen) < 0.8).double()
    lo, hi = interval(base[resample].mean(1))
    assert lo < base.mean().item() < hi and hi - lo < 0.1
    worse = base.clone()
    worse[torch.nonzero(base)[:60, 0]] = 0  # 60 problems lost: -0.15
    better = base.clone()
    better[torch.nonzero(base == 0)[:10, 0]] = 1
    noisy = base.clone()  # one problem lost, one gained: no significant change
    noisy[torch.nonzero(base)[0, 0]], noisy[torch.nonzero(base == 0)[0, 0]] = 0, 1
    rows = [{"strategy": s, "n": n} for s in ("a", "b") for n in (1, 4, 16)]
    scores = {("a", 1): base, ("a", 4): better, ("a", 16): worse,
              ("b", 1): base, ("b", 4): noisy, ("b", 16): better}
    found = drops(rows, scores, resample)
    assert len(found) == 1 and found[0].startswith("a N=4 -> 16: -0.1")


def test_frontier_keeps_the_best_strategy_per_budget():
    rows = [{"strategy": "greedy", "n": 1, "tokens_per_problem": 30, "accuracy": 0.8},
            {"strategy": "majority", "n": 1, "tokens_per_problem": 30, "accuracy": 0.3},
            {"strategy": "best_of_n", "n": 4, "tokens_per_problem": 120, "accuracy": 0.7},
            {"strategy": "beam_search", "n": 4, "tokens_per_problem": 125, "accuracy": 0.85},
            {"strategy": "weighted_best_of_n", "n": 16, "tokens_per_problem": 480, "accuracy": 0.9},
            {"strategy": "dvts", "n": 16, "tokens_per_problem": 480, "accuracy": 0.92},
            {"strategy": "majority", "n": 64, "tokens_per_problem": 1900, "accuracy": 0.6}]
    assert [(r["strategy"], r["n"]) for r in frontier(rows)] == [("greedy", 1), ("beam_search", 4), ("dvts", 16)]
    assert frontier([]) == []



def test_scorer_list():
    assert scorer_list("verifier") == ("verifier",) and scorer_list("head,verifier") == ("head", "verifier")
    for bad in ("", "prm", "head,head", "head,"):
        with pytest.raises(Exception, match="expected distinct comma-separated names among head,verifier"):
            scorer_list(bad)


def _rows(scorer, accuracies):
    return [{"scorer": scorer, "strategy": "best_of_n", "n": n, "accuracy": sum(a) / len(a), "ci_low": 0, "ci_high": 1,
             "tokens_per_problem": 30 * n, "seconds": 1.0, "chose_wrong": 0, "pruned_correct": 0, "no_correct": 0,
             "per_problem": a} for n, a in accuracies.items()]


def test_merge_tests_drops_per_scorer_across_runs(tmp_path, capsys):
    """--merge: the rows of a head run and a verifier run in one table; the head's fall is a drop, the verifier's
    rise is not, and the same strategy and N under two scorers stay apart."""
    problems = 200
    good = [1.0] * 180 + [0.0] * 20
    for name, rows in (("head", _rows("head", {4: good, 16: [0.0] * 60 + good[60:]})),
                       ("verifier", _rows("verifier", {4: good, 16: [1.0] * problems}))):
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"notes": [f"{name} run"]}, "rows": rows}))
    main(["--merge", f"{tmp_path / 'head.json'},{tmp_path / 'verifier.json'}", "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [(r["scorer"], r["n"]) for r in merged["rows"]] == [("head", 4), ("head", 16), ("verifier", 4),
                                                               ("verifier", 16)]
    drop_note = merged["meta"]["notes"][-1]
    assert "best_of_n (head) N=4 -> 16: -0.3" in drop_note and "verifier" not in drop_note
    assert "head.json: head run" in merged["meta"]["notes"]
    assert "| verifier | best_of_n | 16 | 1 |" in (tmp_path / "merged.md").read_text()
