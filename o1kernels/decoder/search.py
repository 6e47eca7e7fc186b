"""Test-time search over reasoning steps, with Hugging Face search-and-learn's semantics.

Strategies (each runs many prompts batched into one decoder; every `generate_step` call advances
all live branches of all prompts by one step):
  majority            N samples, the most frequent final answer wins (self-consistency, no PRM).
  best_of_n           N samples scored by the PRM; the candidate with the highest aggregated score wins
                      (among those that reached an answer, when any did).
  weighted_best_of_n  N samples; the answer with the largest SUM of aggregated scores wins.
  beam_search         N beams, beam width M: each iteration every active beam writes one step, all are
                      scored, the top N/M are kept and each is forked back into M children (sharing its
                      KV read-only); pruned beams are released. Finished beams leave the pool. With
                      filter_duplicates (search-and-learn's option; on by default here) beams whose text
                      equals a better-ranked beam's are pruned before the top N/M are taken, and the
                      result lists each distinct finished chain once.
  dvts                diverse verifier tree search: N/M independent subtrees; each iteration a subtree's
                      node is forked into M children, each writes one step and the best-scored one is kept.
                      Subtrees compete only at the end; each returns its chain (equal chains of different
                      subtrees are kept: each is a vote for "weighted").
beam_search and dvts pick their final answer among the finished chains by SearchConfig.select: "argmax" (the
best-scored chain, search-and-learn's `pred`/naive) or "weighted" (the answer with the largest sum of chain
scores, its `weighted@n`).

The decoder is any object with the decoder interface of o1kernels.decoder (TreeDecoder, NaiveDecoder):
add_prompt, fork, release, generate_step, kv_bytes, kv_bytes_naive. A step ends at a step-separator
token or at <eos>; its PRM score is the reward head at its last token (StepOutput.step_scores).
A chain's score aggregates its step scores: "last" (search-and-learn's default), "min", "prod" or "mean".
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from o1kernels.prm_formats import chain_score

from .task import extract_answer
from .tokenizers import as_search_tokenizer

AGGREGATES = ("last", "min", "prod", "mean")
STRATEGIES = ("majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts")
# How each sampling strategy picks its answer among its candidates (see `choose`); the tree strategies use
# SearchConfig.select, one of TREE_SELECTIONS.
SELECTION = {"majority": "majority", "best_of_n": "argmax", "weighted_best_of_n": "weighted"}
PRM_STRATEGIES = ("best_of_n", "weighted_best_of_n", "beam_search", "dvts")
TREE_STRATEGIES = ("beam_search", "dvts")
TREE_SELECTIONS = ("argmax", "weighted")


@dataclass(frozen=True)
class SearchConfig:
    """n candidates (beams), beam_width M (beam_search/dvts need n % M == 0), limits and sampling."""

    n: int = 4
    beam_width: int = 4
    max_steps: int = 8
    max_step_tokens: int = 16
    temperature: float = 0.8
    top_p: float = 1.0
    aggregate: str = "last"
    seed: int = 0
    filter_duplicates: bool = True  # beam_search: prune beams whose text repeats a kept beam's
    select: str = "argmax"  # beam_search/dvts: final choice among the finished chains, "argmax" or "weighted"

    def __post_init__(self):
        for name in ("n", "beam_width", "max_steps", "max_step_tokens"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not isinstance(self.filter_duplicates, bool):
            raise ValueError(f"filter_duplicates must be a bool, got {self.filter_duplicates!r}")
        if self.select not in TREE_SELECTIONS:
            raise ValueError(f"select must be one of {TREE_SELECTIONS}, got {self.select!r}")


def aggregate_scores(scores: list[float | None], how: str) -> float | None:
    """Chain score from its step scores; None if a score is missing or there are no steps."""
    if not scores or any(s is None for s in scores):
        return None
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    return chain_score(scores, how)


@dataclass
class Candidate:
    """One chain: its steps (token ids and text), per-step PRM scores, aggregated score, final answer."""

    step_tokens: list[list[int]] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    step_scores: list[float | None] = field(default_factory=list)
    finished: bool = False  # emitted <eos>
    score: float | None = None
    answer: Hashable | None = None

    @property
    def text(self) -> str:
        return "".join(self.steps)

    def copy(self) -> "Candidate":
        return Candidate([list(t) for t in self.step_tokens], list(self.steps), list(self.step_scores),
                         self.finished, self.score, self.answer)


@dataclass
class SearchResult:
    """Candidates of one prompt (best first for PRM strategies) and the chosen one."""

    strategy: str
    candidates: list[Candidate]
    chosen: int | None  # index into candidates, None when no candidate has an answer
    tokens_generated: int

    @property
    def answer(self):
        return None if self.chosen is None else self.candidates[self.chosen].answer


def choose(candidates: list[Candidate], method: str) -> int | None:
    """Index of the chosen candidate: "majority" (most frequent answer), "argmax" (highest score among the
    candidates that reached an answer; among all scored ones when none did) or "weighted" (answer with the
    largest sum of scores, then its best candidate). Ties go to the earliest."""
    answered = [i for i, c in enumerate(candidates) if c.answer is not None]
    if method == "argmax":
        pool = [i for i in answered if candidates[i].score is not None]
        pool = pool or [i for i in range(len(candidates)) if candidates[i].score is not None]
        return max(pool, key=lambda i: candidates[i].score, default=None)
    if not answered:
        return None
    if method == "majority":
        counts = Counter(candidates[i].answer for i in answered)
        best = max(counts.values())
        return next(i for i in answered if counts[candidates[i].answer] == best)
    if method == "weighted":
        totals: dict = {}
        for i in answered:
            totals[candidates[i].answer] = totals.get(candidates[i].answer, 0.0) + (candidates[i].score or 0.0)
        best_answer = max(totals, key=totals.get)  # dicts keep first-seen order, so ties go to the earliest
        ties = [i for i in answered if candidates[i].answer == best_answer]
        return max(ties, key=lambda i: candidates[i].score or 0.0)
    raise ValueError(f"selection method must be 'majority', 'argmax' or 'weighted', got {method!r}")


@dataclass(eq=False)
class _Branch:
    """A live decoder branch and the chain it carries."""

    branch: int
    prompt: int  # index of its prompt in the batch
    chain: Candidate
    done: bool = False  # finished, out of steps, or its step ran out of tokens without a separator


class _Run:
    """Shared machinery: the decoder, sampling settings, step advance, accounting of tokens and KV bytes."""

    def __init__(self, decoder, tokenizer, config: SearchConfig, answer_fn, progress):
        self.decoder, self.tokenizer, self.config = decoder, tokenizer, config
        self.answer_fn, self.progress = answer_fn, progress
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stop_ids = {tokenizer.step_id}
        self.tokens: Counter = Counter()
        self.peak_kv_bytes = 0
        self.peak_kv_bytes_naive = 0

    def roots(self, prompts: list[list[int]]) -> list[int]:
        return [self.decoder.add_prompt(list(p)) for p in prompts]

    def fork(self, parent: _Branch, n: int) -> list[_Branch]:
        """n children of `parent` (which is released: the children keep its KV alive)."""
        kids = self.decoder.fork(parent.branch, n)
        self.decoder.release(parent.branch)
        return [_Branch(k, parent.prompt, parent.chain.copy()) for k in kids]

    def release(self, branches) -> None:
        for b in branches:
            self.decoder.release(b.branch)

    def advance(self, branches: list[_Branch]) -> None:
        """Every branch writes one step; its tokens, text, score and done flag are recorded."""
        cfg = self.config
        out = self.decoder.generate_step(
            [b.branch for b in branches], max_new_tokens=cfg.max_step_tokens, stop_ids=self.stop_ids,
            eos_id=self.tokenizer.eos_id, temperature=cfg.temperature, top_p=cfg.top_p, generator=self.generator)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.decoder.kv_bytes())
        self.peak_kv_bytes_naive = max(self.peak_kv_bytes_naive, self.decoder.kv_bytes_naive())
        for b, toks, score, finished in zip(branches, out.new_tokens, out.step_scores, out.finished):
            c = b.chain
            c.step_tokens.append(list(toks))
            c.steps.append(self.tokenizer.decode(toks))
            c.step_scores.append(None if score is None else float(score))
            c.finished = bool(finished)
            c.score = aggregate_scores(c.step_scores, cfg.aggregate)
            c.answer = self.answer_fn(c.text)
            truncated = not toks or toks[-1] not in self.stop_ids and not finished
            b.done = c.finished or truncated or len(c.steps) >= cfg.max_steps
            self.tokens[b.prompt] += len(toks)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(branches=len(branches), refresh=False)


def _sample(run: _Run, prompts: list[list[int]]) -> list[list[Candidate]]:
    """N independent samples per prompt: fork each prompt once into N branches, step until all are done."""
    live = [kid for r, root in enumerate(run.roots(prompts))
            for kid in run.fork(_Branch(root, r, Candidate()), run.config.n)]
    chains: list[list[Candidate]] = [[] for _ in prompts]
    for b in live:
        chains[b.prompt].append(b.chain)
    while live:
        run.advance(live)
        run.release(b for b in live if b.done)
        live = [b for b in live if not b.done]
    return chains


def _beam_search(run: _Run, prompts: list[list[int]]) -> list[list[Candidate]]:
    n, width = run.config.n, run.config.beam_width
    keep = n // width
    live = [kid for r, root in enumerate(run.roots(prompts))
            for kid in run.fork(_Branch(root, r, Candidate()), n)]
    completed: list[list[Candidate]] = [[] for _ in prompts]
    while live:
        run.advance(live)
        next_live = []
        for r in range(len(prompts)):
            mine = [b for b in live if b.prompt == r]
            completed[r].extend(b.chain for b in mine if b.done)
            active = [b for b in mine if not b.done]
            # Top n / width by aggregated score (stable: ties keep the earlier beam), duplicates filtered first.
            ranked = sorted(active, key=lambda b: -_score_or_low(b.chain))
            if run.config.filter_duplicates:
                ranked = _first_per_text(ranked, lambda b: b.chain.text)
            top = ranked[:keep]
            kept = [b for b in active if b in top]  # in beam order (_Branch compares by identity)
            run.release(b for b in mine if b not in kept)
            # Refill to n beams: the kept beams round-robin, as search-and-learn duplicates them.
            copies = Counter(i % len(kept) for i in range(n)) if kept else {}
            for i, b in enumerate(kept):
                next_live.extend(run.fork(b, copies[i]))
        live = next_live
    ranked = [sorted(c, key=lambda x: -_score_or_low(x)) for c in completed]
    if run.config.filter_duplicates:  # one candidate per distinct text, the best-ranked
        ranked = [_first_per_text(c, lambda x: x.text) for c in ranked]
    return [c[:n] for c in ranked]


def _dvts(run: _Run, prompts: list[list[int]]) -> list[list[Candidate]]:
    n, width = run.config.n, run.config.beam_width
    nodes = [kid for r, root in enumerate(run.roots(prompts))
             for kid in run.fork(_Branch(root, r, Candidate()), n // width)]
    finals: list[list[Candidate]] = [[] for _ in prompts]
    while nodes:
        groups = [run.fork(node, width) for node in nodes]
        run.advance([b for g in groups for b in g])
        nodes = []
        for g in groups:
            best = max(range(len(g)), key=lambda i: _score_or_low(g[i].chain))  # first among equals
            run.release(b for i, b in enumerate(g) if i != best)
            if g[best].done:
                finals[g[best].prompt].append(g[best].chain)
                run.release([g[best]])
            else:
                nodes.append(g[best])
    return finals


def _first_per_text(items: list, text: Callable[[object], str]) -> list:
    """The items whose text(item) no earlier item in the list has, in order."""
    seen: set[str] = set()
    return [x for x in items if not (text(x) in seen or seen.add(text(x)))]


def _score_or_low(c: Candidate) -> float:
    return -math.inf if c.score is None else c.score


_SEARCHES = {"majority": _sample, "best_of_n": _sample, "weighted_best_of_n": _sample,
             "beam_search": _beam_search, "dvts": _dvts}


def check_strategy(strategy: str, config: SearchConfig, has_prm: bool) -> None:
    """ValueError when the strategy is unknown, needs a PRM the model lacks, or n % beam_width != 0."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in PRM_STRATEGIES and not has_prm:
        raise ValueError(f"strategy {strategy!r} needs a PRM: the model has no reward head")
    if strategy in TREE_STRATEGIES and config.n % config.beam_width:
        raise ValueError(f"{strategy} needs n divisible by beam_width, got n={config.n}, "
                         f"beam_width={config.beam_width}")


def search(decoder, tokenizer, prompts: list[list[int]], strategy: str, config: SearchConfig, *,
           has_prm: bool = True, answer_fn: Callable[[str], Hashable | None] = extract_answer,
           progress=None, step_separator: int | str | None = None) -> tuple[list[SearchResult], dict]:
    """Run `strategy` on every prompt (token ids) in one batched decoder.

    tokenizer: has step_id, eos_id and decode(ids) (CharTokenizer, tokenizers.HFTokenizer), or is a Hugging Face
    tokenizer (transformers / tokenizers), used with step_separator: the token id or one-token string that ends a step.
    progress: a tqdm-like object updated once per step.
    Returns one SearchResult per prompt and stats {tokens_generated, peak_kv_bytes, peak_kv_bytes_naive}.
    """
    tokenizer = as_search_tokenizer(tokenizer, step_separator)
    check_strategy(strategy, config, has_prm)
    run = _Run(decoder, tokenizer, config, answer_fn, progress)
    chains = _SEARCHES[strategy](run, prompts)
    method = config.select if strategy in TREE_STRATEGIES else SELECTION[strategy]
    results = [SearchResult(strategy, c, choose(c, method), run.tokens[r])
               for r, c in enumerate(chains)]
    stats = {"tokens_generated": sum(run.tokens.values()), "peak_kv_bytes": run.peak_kv_bytes,
             "peak_kv_bytes_naive": run.peak_kv_bytes_naive}
    return results, stats
