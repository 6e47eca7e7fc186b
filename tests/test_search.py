"""Search strategies: aggregation and selection rules, beam/DVTS bookkeeping on a scripted decoder, and every
strategy end to end on the shipped tiny model with both decoders (tree and naive)."""
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from o1kernels.decoder import NaiveDecoder, TreeDecoder, load_checkpoint
from o1kernels.decoder.search import (
    STRATEGIES, Candidate, SearchConfig, aggregate_scores, choose, search,
)
from o1kernels.decoder.task import CharTokenizer, check_steps, extract_answer, generate_problems
from o1kernels.decode import DEFAULT_MODEL

TOK = CharTokenizer()


def test_aggregate_scores():
    s = [0.9, 0.5, 0.8]
    assert aggregate_scores(s, "last") == 0.8
    assert aggregate_scores(s, "min") == 0.5
    assert math.isclose(aggregate_scores(s, "prod"), 0.9 * 0.5 * 0.8)
    assert math.isclose(aggregate_scores(s, "mean"), (0.9 + 0.5 + 0.8) / 3)
    assert aggregate_scores([], "last") is None and aggregate_scores([0.5, None], "min") is None
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_scores(s, "median")


def _cands(pairs):
    return [Candidate(score=s, answer=a) for a, s in pairs]


def test_choose_rules():
    c = _cands([(1, 0.9), (2, 0.5), (2, 0.6), (3, 0.1), (None, 0.95)])
    assert choose(c, "argmax") == 0  # best score among the candidates with an answer
    assert choose(_cands([(None, 0.2), (None, 0.7)]), "argmax") == 1  # none answered: best score of all
    assert choose(c, "majority") == 1  # answer 2 twice; first candidate with it
    assert choose(c, "weighted") == 2  # 2: 1.1 > 1: 0.9; its best-scored candidate
    ties = _cands([(5, 0.5), (6, 0.5)])
    assert choose(ties, "majority") == 0 and choose(ties, "weighted") == 0 and choose(ties, "argmax") == 0
    assert choose(_cands([(None, None)]), "majority") is None
    with pytest.raises(ValueError):
        choose(c, "vote")


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(beam_width=0), dict(max_steps=0), dict(temperature=-1.0),
                                    dict(top_p=0.0), dict(aggregate="median"), dict(n=2.5),
                                    dict(filter_duplicates=1), dict(select="majority")])
def test_bad_search_config(kwargs):
    with pytest.raises(ValueError):
        SearchConfig(**kwargs)


def test_bad_strategy_arguments():
    dec = ScriptedDecoder()
    with pytest.raises(ValueError, match="strategy"):
        search(dec, TOK, [[1]], "greedy", SearchConfig())
    with pytest.raises(ValueError, match="divisible"):
        search(dec, TOK, [[1]], "beam_search", SearchConfig(n=6, beam_width=4))
    with pytest.raises(ValueError, match="PRM"):
        search(dec, TOK, [[1]], "best_of_n", SearchConfig(), has_prm=False)


@dataclass
class _Out:
    new_tokens: list
    step_scores: list
    finished: list


class ScriptedDecoder:
    """Decoder interface without a model: each step is one digit + "\\n" (the last step: digit + <eos>); the digit is
    random, or digit(history) when given; the score is score(history, lineage), by default a fixed function of the
    history. lineage: the index of the branch's ancestor among the first children forked from its prompt (a DVTS
    subtree, a first beam). Records each call's histories before and after."""

    def __init__(self, depth=3, digit=None, score=None):
        self.depth, self.hist, self.lineage, self.next_id = depth, {}, {}, 0
        self.digit = digit
        self.score = score or (lambda h, lineage: self.default_score(h))
        self.before, self.after = [], []  # per generate_step call: [history], [(history, score)]
        self.lineages = []  # per generate_step call: [lineage]

    def _new(self, h, lineage):
        self.hist[self.next_id], self.lineage[self.next_id] = tuple(h), lineage
        self.next_id += 1
        return self.next_id - 1

    def add_prompt(self, ids):
        return self._new([-1 - i for i in ids], None)  # prompt ids as negatives, so histories of prompts differ

    def fork(self, b, n):
        return [self._new(self.hist[b], i if self.lineage[b] is None else self.lineage[b]) for i in range(n)]

    def release(self, b):
        del self.hist[b], self.lineage[b]

    def kv_bytes(self):
        return len(self.hist)

    kv_bytes_naive = kv_bytes

    @staticmethod
    def default_score(h):
        return (sum((i + 1) * v for i, v in enumerate(h)) * 37 % 101) / 101

    def generate_step(self, branches, *, max_new_tokens, stop_ids, eos_id, temperature, top_p, generator):
        self.before.append([self.hist[b] for b in branches])
        self.lineages.append([self.lineage[b] for b in branches])
        out = _Out([], [], [])
        for b in branches:
            random_digit = 3 + int(torch.randint(10, (1,), generator=generator))
            digit = random_digit if self.digit is None else self.digit(self.hist[b])
            last = sum(v >= 0 for v in self.hist[b]) == self.depth
            self.hist[b] += (digit,)
            out.new_tokens.append([digit, eos_id if last else TOK.step_id])
            out.step_scores.append(self.score(self.hist[b], self.lineage[b]))
            out.finished.append(last)
        self.after.append([(self.hist[b], s) for b, s in zip(branches, out.step_scores)])
        return out


def _prompt_of(h):
    return tuple(v for v in h if v < 0)


@pytest.mark.parametrize("filter_duplicates", [False, True])
@pytest.mark.parametrize("n,width", [(8, 2), (8, 4), (4, 4), (6, 3), (16, 2)])
def test_beam_search_keeps_top_n_over_width_and_refills(n, width, filter_duplicates):
    dec = ScriptedDecoder()
    cfg = SearchConfig(n=n, beam_width=width, seed=1, filter_duplicates=filter_duplicates)
    results, _ = search(dec, TOK, [[1, 2], [1, 3]], "beam_search", cfg)
    assert not dec.hist, "every branch must be released"
    assert len(dec.before) == 4  # 3 steps + the answer step, then all beams are finished
    saw_duplicates = False
    for after, nxt in zip(dec.after, dec.before[1:]):
        for prompt in {_prompt_of(h) for h, _ in after}:
            outs = [(h, s) for h, s in after if _prompt_of(h) == prompt]
            ranked = [h for h, _ in sorted(outs, key=lambda x: -x[1])]
            if filter_duplicates:
                saw_duplicates |= len(set(ranked)) < len(ranked)
                ranked = list(dict.fromkeys(ranked))
            kept = ranked[: n // width]
            # the kept beams are refilled round-robin to n beams
            expected = Counter(kept[i % len(kept)] for i in range(n))
            parents = Counter(h for h in nxt if _prompt_of(h) == prompt)
            assert len(outs) == n and parents == expected
    if filter_duplicates and n == 16:
        assert saw_duplicates, "the scripted run should have produced duplicate beams to filter"
    for r in results:
        texts = [c.text for c in r.candidates]
        if filter_duplicates:
            assert 0 < len(texts) <= n and len(set(texts)) == len(texts)
        else:
            assert len(texts) == n
        scores = [c.score for c in r.candidates]
        assert scores == sorted(scores, reverse=True) and r.chosen == 0


@pytest.mark.parametrize("n,width", [(8, 4), (4, 2)])
def test_dvts_keeps_best_child_per_subtree(n, width):
    dec = ScriptedDecoder()
    results, _ = search(dec, TOK, [[1, 2]], "dvts", SearchConfig(n=n, beam_width=width, seed=2))
    assert not dec.hist
    for after, nxt in zip(dec.after, dec.before[1:]):
        assert len(after) == n  # n // width subtrees, width children each, laid out subtree by subtree
        groups = [after[g * width:(g + 1) * width] for g in range(n // width)]
        best = [max(g, key=lambda x: x[1])[0] for g in groups]
        assert sorted(nxt) == sorted(h for h in best for _ in range(width))
    assert len(results[0].candidates) == n // width


def _texts(results):
    return [[c.text for c in r.candidates] for r in results]


@pytest.mark.parametrize("n,width", [(8, 2), (16, 4)])
def test_dvts_subtrees_are_independent_and_compete_only_at_the_end(n, width):
    """search-and-learn's DVTS: n / width subtrees, each greedy on its own children's scores. Making one subtree's
    scores tiny changes no chain (no subtree is pruned by another's scores, unlike beam search) and only the final
    choice across subtrees, which then avoids it."""
    cfg = SearchConfig(n=n, beam_width=width, seed=5, aggregate="prod")
    normal, _ = search(ScriptedDecoder(), TOK, [[1, 2]], "dvts", cfg)
    dec = ScriptedDecoder(score=lambda h, lineage: ScriptedDecoder.default_score(h) * (1e-3 if lineage == 0 else 1))
    damped, _ = search(dec, TOK, [[1, 2]], "dvts", cfg)
    assert not dec.hist and all(call.count(0) == width for call in dec.lineages)  # subtree 0 expanded to the end
    assert _texts(damped) == _texts(normal) and len(damped[0].candidates) == n // width
    scores = [c.score for c in damped[0].candidates]
    assert damped[0].chosen == max(range(len(scores)), key=scores.__getitem__) != 0  # subtree 0 finishes first
    assert all(c.finished for c in damped[0].candidates)
    # Beam search ranks all beams together: the first beam's descendants are pruned at the first selection.
    dec = ScriptedDecoder(score=lambda h, lineage: ScriptedDecoder.default_score(h) * (1e-3 if lineage == 0 else 1))
    search(dec, TOK, [[1, 2]], "beam_search", dataclasses.replace(cfg, filter_duplicates=False))
    assert 0 in dec.lineages[0] and all(0 not in call for call in dec.lineages[1:])


def test_dvts_keeps_converging_subtrees_as_votes_and_beam_search_filters_them():
    """Subtrees that reach the same chain each return it (each is a vote for weighted selection); beam search with
    filter_duplicates lists the chain once."""
    dec = ScriptedDecoder(digit=lambda h: 3 + len(h) % 5)  # every child of a node writes the same step
    cfg = SearchConfig(n=8, beam_width=2, seed=0)
    dvts, _ = search(dec, TOK, [[1]], "dvts", cfg)
    assert len(dvts[0].candidates) == 4 and len(set(_texts(dvts)[0])) == 1
    beams, _ = search(ScriptedDecoder(digit=lambda h: 3 + len(h) % 5), TOK, [[1]], "beam_search", cfg)
    assert _texts(beams) == [[_texts(dvts)[0][0]]]


def test_sampling_strategies_on_scripted_decoder():
    dec = ScriptedDecoder()
    results, stats = search(dec, TOK, [[1], [2]], "weighted_best_of_n", SearchConfig(n=6))
    assert not dec.hist and len(dec.before) == 4 and all(len(b) == 12 for b in dec.before)
    assert [len(r.candidates) for r in results] == [6, 6]
    assert stats["tokens_generated"] == 2 * 6 * 4 * 2


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(DEFAULT_MODEL, device="cpu", dtype=torch.float32)


def _decoder(kind, model):
    return TreeDecoder(model, backend="torch") if kind == "tree" else NaiveDecoder(model)


@pytest.mark.parametrize("decoder_kind", ["tree", "naive"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_on_tiny_model(tiny, strategy, decoder_kind):
    problems = generate_problems(2, 99)
    prompts = [TOK.encode(p.prompt, bos=True) for p in problems]
    cfg = SearchConfig(n=4, beam_width=2, max_steps=8, max_step_tokens=12, temperature=1.0, seed=3)
    dec = _decoder(decoder_kind, tiny)
    results, stats = search(dec, TOK, prompts, strategy, cfg)
    assert dec.kv_bytes() == 0, "KV pages leaked after the search released every branch"
    # dense rows (a fork copies the partial last page) hold the ideal within one page per live branch, the prompts
    # here being shorter than a page: at most n branches per prompt live at once (twice while a step forks them)
    assert stats["peak_kv_bytes"] > 0
    if decoder_kind == "tree":
        slack = 2 * cfg.n * len(prompts) * dec.pool.bytes_per_page
        assert stats["peak_kv_bytes"] <= stats["peak_kv_bytes_naive"] + slack
    expected = {"dvts": 2, "beam_search": 4}.get(strategy, 4)
    total = 0
    for p, r in zip(problems, results):
        texts = [c.text for c in r.candidates]
        if strategy == "beam_search":  # duplicates filtered (the default)
            assert 0 < len(texts) <= expected and len(set(texts)) == len(texts)
        else:
            assert len(texts) == expected
        assert r.strategy == strategy
        for c in r.candidates:
            assert c.steps == [TOK.decode(t) for t in c.step_tokens]
            assert len(c.step_scores) == len(c.steps) and all(0 <= s <= 1 for s in c.step_scores)
            assert c.score == aggregate_scores(c.step_scores, "last")
            assert c.answer == extract_answer(c.text)
            assert len(check_steps(p, c.steps)) == len(c.steps)
        total += r.tokens_generated
        assert r.chosen is not None and r.answer == r.candidates[r.chosen].answer
    assert total == stats["tokens_generated"]


def test_step_scores_match_full_forward(tiny):
    """The decoder's step scores (reward head on incremental decode states) equal the head on a plain full forward."""
    p = generate_problems(1, 5)[0]
    prompt = TOK.encode(p.prompt, bos=True)
    results, _ = search(TreeDecoder(tiny, backend="torch"), TOK, [prompt], "best_of_n",
                        SearchConfig(n=3, temperature=1.0, seed=0))
    for c in results[0].candidates:
        ids = prompt + [t for step in c.step_tokens for t in step]
        ends = torch.tensor(prompt.__len__() - 1) + torch.tensor([len(s) for s in c.step_tokens]).cumsum(0)
        with torch.no_grad():
            _, hidden = tiny(torch.tensor([ids]), return_hidden=True)
            x = tiny.model.norm(hidden[0, ends].double())
            head = tiny.reward_head
            if head.mlp is not None:
                x = torch.relu(x @ head.mlp.weight.double().T + head.mlp.bias.double())
            ref = torch.sigmoid(x @ head.out.weight.double().T + head.out.bias.double())[:, 0]
        torch.testing.assert_close(torch.tensor(c.step_scores, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_search_is_deterministic_for_a_seed(tiny):
    prompts = [TOK.encode(p.prompt, bos=True) for p in generate_problems(2, 7)]
    cfg = SearchConfig(n=4, beam_width=2, temperature=1.0, seed=11)
    runs = [search(TreeDecoder(tiny, backend="torch"), TOK, prompts, "beam_search", cfg)[0] for _ in range(2)]
    assert [[c.text for c in r.candidates] for r in runs[0]] == [[c.text for c in r.candidates] for r in runs[1]]


def test_greedy_is_the_same_on_both_decoders(tiny):
    prompts = [TOK.encode(p.prompt, bos=True) for p in generate_problems(3, 8)]
    cfg = SearchConfig(n=1, temperature=0.0)
    texts = [[r.candidates[0].text for r in search(_decoder(kind, tiny), TOK, prompts, "majority", cfg)[0]]
             for kind in ("tree", "naive")]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("strategy", ["beam_search", "dvts"])
def test_tree_strategies_final_choice_follows_select(strategy):
    """The same run (same chains), final answer by the best chain (argmax) or by the largest score sum (weighted)."""
    cfg = SearchConfig(n=16, beam_width=4, seed=3, aggregate="prod", filter_duplicates=False)
    prompts = [[1, 2], [3], [4, 5], [6]]
    runs = {select: search(ScriptedDecoder(), TOK, prompts, strategy, dataclasses.replace(cfg, select=select),
                           answer_fn=lambda text: text.strip()[-1:] or None)[0]
            for select in ("argmax", "weighted")}
    for argmax, weighted in zip(runs["argmax"], runs["weighted"]):
        assert _texts([argmax]) == _texts([weighted])
        assert argmax.chosen == choose(argmax.candidates, "argmax")
        assert weighted.chosen == choose(weighted.candidates, "weighted")
    assert [r.answer for r in runs["argmax"]] != [r.answer for r in runs["weighted"]]  # the choice matters here
