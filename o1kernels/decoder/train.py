"""Deterministic training of the shipped tiny policy + PRM on the arithmetic task (2-core CPU, minutes).

    python -m o1kernels.decoder.train [--out DIR]                  all three phases, from scratch
    python -m o1kernels.decoder.train --policy DIR [--out DIR]     phase 3 alone, on DIR's policy
    python -m o1kernels.decoder.train --verifier [--policy DIR] [--out DIR]   the separate verifier (see below)

The shipped o1kernels/decoder/weights/tiny-arith is `--policy o1kernels/decoder/weights/tiny-arith`'s output:
its policy is phase 2's of an earlier run of this script (see below), its reward head phase 3's. Phase 3
re-initialises the head from the seed and never reads the old one, so the command is idempotent: run on its
own output it writes the same bytes.

The PRM is a reward head on the policy's own hidden states: final norm -> Linear -> ReLU -> Linear ->
sigmoid at each step's last token (what o1kernels.step_rewards computes at decode time), trained with
binary cross-entropy on step labels (1 iff the step and every earlier step are correct).

Phase 1 (policy): next-token loss on correct worked solutions (prompt tokens are not predicted). Its
length sets the policy's strength: 800 updates leave it right on about half of the problems (greedy 0.56,
one sample at T=1 0.40 in our run), so there is room for search to help.
Phase 2 (PRM): rounds of (a) sampling rollouts from the policy with the search code's sampler,
(b) labelling each step with the task's checker, (c) updates on those rollouts plus synthetic solutions
(a third correct, two thirds with the policy's kinds of errors: slipped results, slipped copies of the
previous value, misread operands, skipped operations, early or slipped answers; see slipped_steps),
trunk and head together. A KL term to a frozen copy of the phase-1 policy, at every solution token of the
batch, holds the policy's next-token distribution near phase 1's: with a next-token loss on correct
solutions instead, the extra updates made the policy itself near perfect (greedy 0.985, one sample 0.95),
leaving nothing for search to fix. (It drifts some all the same: greedy 0.81, one sample 0.30 at the end.)
An auxiliary, training-only linear head predicts at each step's last token the digits of the result of
the step's own operation and of the problem's true running value at that step. It makes the trunk
compute what checking a step needs where the reward head reads: without it the reward head stayed near
chance on slipped results (step AUC ~0.7) and best-of-N got worse as N grew; with it the head's AUC on
fresh rollouts, before it trains on them, is 0.81 after round 0 and 0.91 after round 1. The auxiliary head
is not saved.
Phase 3 (reward head): a fresh reward head (initialised from the seed) on the frozen trunk, so the policy is
exactly phase 2's. It sees the features (final-normed hidden states at step ends, computed once) of 32K fresh
on-policy rollouts, which hold enough of the policy's rare errors (copies of a wrong value such as "8+1=9"
then "8+38=46", misread operands, wrong answers after correct steps, extra steps) to learn from, and it learns
each step's correctness given a correct prefix: every step up to a chain's first wrong one, labelled 1 for a
correct step and 0 for the first wrong one; later steps are not trained on. A chain's product of these step
scores is then the head's probability that the whole chain is correct. Phase 2's labels (1 iff the step and
all earlier ones are correct) make the head rate correct late steps low for the errors that might precede
them, which the product counts again at every step. What the exploration runs for this recipe measured (on
the shipped policy, the sampler before decoder/sampling.py, 200 eval problems x 256 samples): best-of-N with
the phase-2 head fell from 0.80 at N=64 to 0.62 at N=256; a head trained on more rollouts with phase 2's
labels reached 0.68, with these labels 0.64 (prod) / 0.75 (min), while weighted best-of-N rose to 0.93-0.97.
Synthetic errors of the missed kinds mixed in did not raise the held-out AUCs (copy 0.86 with a fifth of them,
0.88 without), nor did a 4x wider head (hidden 256) or more updates, so phase 3 trains on rollouts alone.
Training the trunk too (phase 2's loop run again) moved the policy: after 100 more updates its rollouts had
4x the copy errors.
After training, the script logs the head's step-level AUC per error kind (task.step_error_kinds) on rollouts of
fresh held-out problems, and picks the chain-score aggregate on its eval problems (disjoint from the scaling
benchmark's): the one with the best mean accuracy of best-of-N and DVTS, each with both final choices, at N=64.
The head scores steps locally and rates a step that continues correctly from an earlier wrong value highly,
so a chain's score must aggregate all its steps (prod or min), not take the last one.

The verifier (--verifier; train_verifier; default policy weights/tiny-arith, output weights/tiny-arith-verifier) is a
separate PRM in its own checkpoint, run beside the policy by PRMScoredDecoder, so that a step is judged by weights the
policy's sampling does not use. It is a copy of the policy (trunk and head: 0.8M parameters) trained, as the policy's
head is in phase 3, on each step's correctness given a correct prefix: every step up to a chain's first wrong one,
labelled 1 for a correct step and 0 for the first wrong one, so that a chain's min (or product) of step scores rates
it. Each batch pairs correct solutions (also next-token targets) with synthetic chains going wrong at one step of the
same prefix (first_error_steps; the kinds behind best-of-N's losses at large N drawn more often: misread operands,
wrong copies, slipped answers) and adds rollouts of the policy drawn with weight 1 / sqrt(rollouts of their first
error kind) (its common result slips, and its rare errors more often). Auxiliary digit targets at every step's end
(aux_targets: phase 2's, plus the value the step must start from and the operand and op due) make the trunk compute
what checking needs where the reward head reads. Its step score is the reward head's times the verifier's own LM
probability of the step's tokens given the prefix (likelihood_weight 1 in its reward-head spec, which PRMScorer and
step_log_scores compute): the LM, trained further on correct solutions, gives a slipped digit a low probability where
the head can still rate the step 0.99. What the exploration runs measured on the eval problems (200 x 256 policy
samples, best-of-N with min at N = 16 / 64 / 256; the first version's 0.855 / 0.828 / 0.670):
- first-error labels, pairs, these kinds, 1000 updates of 128 rows, then a fresh head on frozen features: 0.887 /
  0.917 / 0.840 (the trunk's own head 0.884 / 0.916 / 0.845: the refit was dropped);
- + the start/operand/op targets, 1400 updates: 0.886 / 0.934 / 0.900 (copy AUC 0.942, operand 0.956);
- the same rows in 2600 updates of 64: 0.891 / 0.951 / 0.945, no drop beyond the paired 95% interval; held-out AUC
  after an error 0.563 (the head's 0.796), copy 0.943 (0.933);
- + the steps after the first error in the PRM loss at weight 0.3 (labelled 0) and in the auxiliary loss: 0.886 /
  0.936 / 0.910; correct answer lines then score lower (a step must vouch for the whole prefix);
- those steps in the auxiliary loss alone (their targets are the true values, which the written chain contradicts),
  5000 updates of 32 rows at lr 7e-4: 0.890 / 0.951 / 0.940. Its run through --verifier, the previous shipped
  weights: 0.893 / 0.943 / 0.910, a drop beyond the interval (-0.033, [-0.064, -0.001]); DVTS (beam width 4, min) on
  the same problems 0.955 / 0.970 / 0.945. Runs of one recipe differ most on misread operands (5 and 12 of their
  losses);
- + the start value and operand as written and three checks against the correct prefix (start, operation, result)
  as targets, and more slip shapes (a digit appended or dropped, another term of the problem as the operand): 0.885
  / 0.931 / 0.875; with an average of the weights over the second half 0.879 / 0.915 / 0.845;
- two verifiers of 4000 updates each (side by side, one thread each), their step logits averaged: 0.889 / 0.944 /
  0.925 (alone 0.883 / 0.922 / 0.875 and 0.887 / 0.940 / 0.925), DVTS 0.950 / 0.940 / 0.910;
- two more layers after the policy's four (output projections zero at first, so training starts from the policy),
  4000 updates (what the budget affords at 1.5x the cost): 0.887 / 0.939 / 0.925;
- ties of the chain score broken by the next-weakest step (leximin) in beam search, DVTS and the final choice: DVTS
  0.945 / 0.960 / 0.925 with the previous weights; not kept;
- the shipped recipe: 6000 updates, each batch run as two forwards over its rows sorted by length (each padded to
  its own longest row: 14% less time per update): 0.891 / 0.955 / 0.955 (an earlier run of it at one thread). The
  shipped weights are its run through --verifier: 0.892 / 0.959 / 0.955, no drop (-0.004, [-0.028, +0.020]);
  held-out AUC copy 0.962, operand 0.989, after an error 0.767; 756 s. On the scaling benchmark's own 200 problems
  it still falls from N=64 to 256 under best-of-N (0.961 -> 0.925) and DVTS (0.965 -> 0.915), as the previous
  weights did (0.964 -> 0.935, 0.970 -> 0.915);
- the same weights, each step score times the step's likelihood under the verifier's LM (scoring alone changes):
  0.895 / 0.966 / 0.990 (times its fourth root 0.895 / 0.968 / 0.990; the likelihood alone 0.897 / 0.964 / 0.990,
  under the policy's LM 0.775 / 0.792 / 0.795); DVTS 0.970 / 0.995 / 0.995, no drop. Held-out AUC 1.000 on every
  first-error kind (copy and operand 1.000 against 0.962 and 0.989 without the factor). This is the shipped scorer.
A verifier trained from scratch (3 layers, hidden 96, 313K parameters) was near chance after 400 updates (step AUC on
slipped results 0.58), too slow for the 15-minute budget. The script then logs each scorer's held-out step AUCs per
error kind on the same rollouts (the verifier once per likelihood_weight in VerifierConfig.likelihood_weights) and
which scorer (with its chain-score aggregate) does best on the eval problems: the CLI's default. It writes the
verifier with the likelihood_weight that did best there.

Determinism: fixed seeds, a fixed data order (problems drawn from seeded generators), the sampling
generator seeded per round, torch.set_num_threads(2). The rollouts go through TreeDecoder(backend="auto"),
so bit-identical weights also need the same kernel backend (compiled CPU extension built or not), and the
same torch build and CPU kind (float results of the trunk's training differ across them): on a later 2-core
machine with torch 2.13.0+cpu, phase 1 ended at greedy 0.48 / one sample 0.24 instead of the shipped run's
0.56 / 0.40, so a from-scratch run there gives another policy. That is why the shipped reward head is
retrained on the shipped policy (--policy), which reproduces bit for bit where the rollouts do.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import TreeDecoder
from .model import REWARD_HEAD_KEY, ModelConfig, Transformer, _parse_reward_head
from .prm import PRMScoredDecoder
from .search import AGGREGATES, SearchConfig, aggregate_scores, choose, search
from .task import (ERROR_KINDS, STEP_SEPARATOR, CharTokenizer, Problem, generate_problems, is_correct,
                   step_error_kinds)

DEFAULT_OUT = Path(__file__).parent / "weights" / "tiny-arith"
VERIFIER_OUT = Path(__file__).parent / "weights" / "tiny-arith-verifier"
# Seeds of the disjoint problem streams.
SEED_LM, SEED_ROLLOUT, SEED_EVAL, SEED_SYNTHETIC, SEED_HELDOUT, SEED_VERIFIER = 1, 2, 3, 4, 5, 6
# Result slips of the synthetic negatives, drawn uniformly (+-1 listed twice: the policy's most common error).
SLIPS = (-1, 1, -1, 1, -2, 2, -10, 10)
SLIP_PROB = 0.35  # per step of a slipped synthetic solution
ERRORS = ("result", "result", "result", "copy", "operand", "skip")  # synthetic error kinds, "result" the commonest
AUX_DIGITS = 3  # the auxiliary head predicts ones, tens, hundreds of |a op b| and of the true running value
AUX_TARGETS = 2 * AUX_DIGITS + AUX_DIGITS + 3  # + (verifier) the value the step must start from, its operand and op
_OPERATION = re.compile(r"(\d+)([+-])(\d+)=")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    reward_hidden: int = 64
    batch_size: int = 64  # phase 1 rows per update
    lm_steps: int = 800
    lm_lr: float = 3e-3
    prm_rounds: int = 3
    rollout_problems: int = 128  # per round
    rollouts_per_problem: int = 8
    prm_steps_per_round: int = 400
    rollouts_per_batch: int = 32  # phase 2 rows per update: these + correct_per_batch + slipped_per_batch
    correct_per_batch: int = 32
    slipped_per_batch: int = 64
    prm_lr: float = 1e-3
    aux_weight: float = 2.0
    kl_weight: float = 1.0  # phase 2: KL(phase-1 policy || policy) at solution tokens
    temperature: float = 1.0  # of the rollouts (the search's sampling temperature)
    head_rollout_problems: int = 4096  # phase 3: x rollouts_per_problem on-policy rollouts
    head_steps: int = 3000
    head_batch: int = 4096  # steps per phase-3 update
    head_lr: float = 1e-3
    eval_problems: int = 200
    heldout_problems: int = 512  # fresh problems whose rollouts give the final per-kind AUCs
    select_n: int = 64  # samples per eval problem when the chain-score aggregate is chosen
    seed: int = 0


def model_config(cfg: TrainConfig, tok: CharTokenizer) -> ModelConfig:
    head = {"activation": "sigmoid", "num_classes": 1, "hidden": cfg.reward_hidden, "positive_index": 0,
            "step_token_id": tok.step_id}
    return ModelConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=True, model_type="llama",
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, reward_head=head)


@dataclasses.dataclass
class Row:
    """One training sequence: prompt ids, its steps' token ids, per-step PRM labels (None: no PRM loss), error kinds
    (task.step_error_kinds; None for a correct step) and auxiliary targets (see aux_targets), and whether its steps
    are a correct solution to learn (next-token loss)."""

    prompt: list[int]
    steps: list[list[int]]
    labels: list[bool] | None
    kinds: list[str | None]
    aux: list[list[int]]
    lm: bool


def labelled_row(problem: Problem, tok: CharTokenizer, step_ids: list[list[int]], steps: list[str], *,
                 lm: bool) -> Row:
    """A Row for `problem` whose steps have these token ids and texts, labelled by the task's checker."""
    kinds = step_error_kinds(problem, steps)
    return Row(tok.encode(problem.prompt, bos=True), step_ids, [k is None for k in kinds], kinds,
               [aux_targets(s, k, problem) for k, s in enumerate(steps)], lm)


def solution_row(problem: Problem, tok: CharTokenizer, steps: list[str] | None = None, *, lm: bool) -> Row:
    """A worked solution (default: the correct one) as a Row; the answer step ends with <eos>."""
    steps = problem.solution_steps() if steps is None else steps
    ids = [tok.encode(s) for s in steps]
    ids[-1].append(tok.eos_id)
    return labelled_row(problem, tok, ids, steps, lm=lm)


def _slip(value: int, rng: random.Random) -> int:
    delta = rng.choice(SLIPS)
    return value + delta if value + delta >= 0 else value - delta


def slipped_steps(problem: Problem, rng: random.Random) -> list[str]:
    """A solution with the policy's kinds of errors. Each operation goes wrong with probability SLIP_PROB, in one
    of ERRORS ways: its result slips by one of SLIPS ("result"), it starts from a slipped copy of the previous value
    ("copy"), its second operand is misread ("operand"), or it is left out ("skip"); later steps continue from the
    value written. The answer repeats the last value, or (probability SLIP_PROB) comes one step early or slips."""
    values, steps = [problem.operands[0]], []
    for op, v in zip(problem.ops, problem.operands[1:]):
        kind = rng.choice(ERRORS) if rng.random() < SLIP_PROB else None
        if kind == "skip":
            continue
        a = _slip(values[-1], rng) if kind == "copy" else values[-1]
        b = _slip(v, rng) if kind == "operand" else v
        new = a + b if op == "+" else a - b
        if kind == "result" or new < 0:
            a, b, new = values[-1], v, _slip(values[-1] + v if op == "+" else values[-1] - v, rng)
        steps.append(f"{a}{op}{b}={new}{STEP_SEPARATOR}")
        values.append(new)
    answer = values[-1]
    if rng.random() < SLIP_PROB:
        if len(steps) > 1 and rng.random() < 0.5:
            steps, answer = steps[:-1], values[-2]
        else:
            answer = _slip(answer, rng)
    return steps + [f"A:{answer}"]


def _digits(value: int, count: int = AUX_DIGITS) -> list[int]:
    """The lowest `count` decimal digits of value >= 0, ones first."""
    return [value // 10 ** i % 10 for i in range(count)]


def aux_targets(step_text: str, index: int, problem: Problem) -> list[int]:
    """Auxiliary targets of step `index` (AUX_TARGETS classes of 10, -100 = ignore): digits (ones first) of |a op b|
    for a step "a op b=..." and of the problem's true running value after index + 1 operations (the answer for the
    answer step), the policy's phase 2 reads these; then what checking the step against a correct prefix needs, the
    verifier reads all: digits of the value it must start from (the answer, for the answer step), of the operand due
    and the op due (0 "+", 1 "-")."""
    ignore = [-100] * AUX_DIGITS
    m = _OPERATION.match(step_text)
    own = ignore
    if m is not None:
        a, b = int(m.group(1)), int(m.group(3))
        own = _digits(abs(a + b if m.group(2) == "+" else a - b))
    values = [problem.operands[0], *problem.running_values()]
    n = len(problem.ops)
    running = start = ignore
    if index <= n:
        running, start = _digits(values[min(index, n - 1) + 1]), _digits(values[index])
    due = [-100] * 3
    if index < n:
        due = _digits(problem.operands[index + 1], 2) + ["+-".index(problem.ops[index])]
    return own + running + start + due


def pack(rows: list[Row], tok: CharTokenizer):
    """Rows -> ids [B, T] (right-padded), solution_mask [B, T] (solution tokens of every row), lm_rows [B] (rows
    whose solution is a next-token target), step_mask [B, T] (last token of every step of labelled rows), labels [S]
    float32 and aux targets [S, AUX_TARGETS] in step_mask's row-major order."""
    seqs = [r.prompt + [t for s in r.steps for t in s] for r in rows]
    ids = torch.full((len(rows), max(map(len, seqs))), tok.pad_id, dtype=torch.long)
    solution_mask = torch.zeros_like(ids, dtype=torch.bool)
    step_mask = torch.zeros_like(ids, dtype=torch.bool)
    labels, aux = [], []
    for i, (r, seq) in enumerate(zip(rows, seqs)):
        ids[i, :len(seq)] = torch.tensor(seq)
        solution_mask[i, len(r.prompt):len(seq)] = True
        if r.labels is not None:
            ends = torch.tensor([len(s) for s in r.steps]).cumsum(0) + len(r.prompt) - 1
            step_mask[i, ends] = True
            labels += r.labels
            aux += r.aux
    return (ids, solution_mask, torch.tensor([r.lm for r in rows]), step_mask, torch.tensor(labels, dtype=torch.float32),
            torch.tensor(aux, dtype=torch.long).view(-1, AUX_TARGETS))


def reward_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """Differentiable reward head on pre-norm step rows [S, H] -> logits [S] (sigmoid gives the reward); the same
    computation as o1kernels.step_rewards(..., norm_weight=model.model.norm.weight, activation="sigmoid")."""
    return head_logits(model, model.model.norm(hidden))


def head_logits(model: Transformer, normed: torch.Tensor) -> torch.Tensor:
    """The reward head alone on final-normed step rows [S, H] -> logits [S]."""
    x = normed
    if model.reward_head.mlp is not None:
        x = torch.relu(model.reward_head.mlp(x))
    return model.reward_head.out(x)[:, 0]


def losses(model: Transformer, rows: list[Row], tok: CharTokenizer, aux_head: torch.nn.Linear | None = None,
           teacher: Transformer | None = None, prm_until_first_error: bool = False):
    """One forward over the rows -> (policy loss, PRM binary cross-entropy on labelled steps or None, auxiliary
    result-digit cross-entropy or None). The policy loss is the next-token loss on the lm rows' solutions, or with a
    teacher the mean KL(teacher || model) of the next-token distributions at every row's solution tokens. The PRM loss
    reads every step, or with prm_until_first_error the steps up to each row's first wrong one; the auxiliary loss
    reads every step."""
    ids, solution_mask, lm_rows, step_mask, labels, aux = pack(rows, tok)
    logits, hidden = model(ids, return_hidden=True)
    if teacher is None:
        targets = (solution_mask & lm_rows[:, None])[:, 1:]
        policy = F.cross_entropy(logits[:, :-1][targets], ids[:, 1:][targets]) if targets.any() else logits.sum() * 0
    else:
        targets = solution_mask[:, 1:]
        with torch.no_grad():
            reference = F.log_softmax(teacher(ids)[:, :-1][targets], dim=-1)
        policy = F.kl_div(F.log_softmax(logits[:, :-1][targets], dim=-1), reference, log_target=True,
                          reduction="batchmean")
    if not len(labels):
        return policy, None, None
    steps = hidden[step_mask]
    logits = reward_logits(model, steps)
    if prm_until_first_error:
        keep = torch.tensor([k != "after_error" for r in rows if r.labels is not None for k in r.kinds])
        logits, labels = logits[keep], labels[keep]
    prm = F.binary_cross_entropy_with_logits(logits, labels)
    aux_loss = None
    if aux_head is not None:  # the first aux_head.out_features // 10 targets
        aux_logits = aux_head(model.model.norm(steps)).view(-1, 10)
        aux_loss = F.cross_entropy(aux_logits, aux[:, :aux_head.out_features // 10].reshape(-1), ignore_index=-100)
    return policy, prm, aux_loss


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_decoder(model: Transformer) -> TreeDecoder:
    """The rollout/evaluation decoder (backend "auto": the compiled CPU kernels when built, else torch)."""
    return TreeDecoder(model, backend="auto")


@torch.no_grad()
def evaluate(model: Transformer, tok: CharTokenizer, problems, temperature: float, seed: int) -> float:
    """Single-sample accuracy (greedy when temperature == 0) on `problems`."""
    model.eval()
    cfg = SearchConfig(n=1, max_steps=8, max_step_tokens=12, temperature=temperature, seed=seed)
    results, _ = search(make_decoder(model), tok, [tok.encode(p.prompt, bos=True) for p in problems],
                        "majority", cfg, has_prm=False)
    model.train()
    return sum(is_correct(p, r.candidates[0].text) for p, r in zip(problems, results)) / len(problems)


def train_policy(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, log) -> None:
    """Phase 1: next-token loss on correct solutions (a fixed, seeded stream of problems)."""
    trunk = [p for n, p in model.named_parameters() if not n.startswith("reward_head.")]
    opt = torch.optim.AdamW(trunk, lr=cfg.lm_lr, betas=(0.9, 0.98), weight_decay=0.01)
    stream = generate_problems(cfg.lm_steps * cfg.batch_size, SEED_LM)
    model.train()
    for step in range(cfg.lm_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lm_steps, cfg.lm_lr)
        batch = stream[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        rows = [dataclasses.replace(solution_row(p, tok, lm=True), labels=None) for p in batch]
        loss, _, _ = losses(model, rows, tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trunk, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.lm_steps - 1:
            log(f"lm step {step:5d}  loss {loss.item():.4f}")


@torch.no_grad()
def rollouts(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, problems, seed: int) -> list[Row]:
    """rollouts_per_problem samples per problem from the policy, each step labelled by the task's checker."""
    model.eval()
    scfg = SearchConfig(n=cfg.rollouts_per_problem, max_steps=8, max_step_tokens=12,
                        temperature=cfg.temperature, seed=seed)
    results, _ = search(make_decoder(model), tok, [tok.encode(p.prompt, bos=True) for p in problems],
                        "majority", scfg, has_prm=False)
    model.train()
    return [labelled_row(p, tok, c.step_tokens, c.steps, lm=False) for p, r in zip(problems, results)
            for c in r.candidates]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive step outscores a random negative one (ties count half): the Mann-Whitney
    statistic from average ranks, O(S log S)."""
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last of each group of equal scores (ranks start at 1)
    ranks = (last - (counts.double() - 1) / 2)[inverse]
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


@torch.no_grad()
def step_features(model: Transformer, rows: list[Row], tok: CharTokenizer, chunk: int = 1024) -> torch.Tensor:
    """What the reward head reads at every step of `rows`: final-normed hidden states [S, H] in pack's order."""
    model.eval()
    features = []
    for start in range(0, len(rows), chunk):
        ids, _, _, step_mask, _, _ = pack(rows[start:start + chunk], tok)
        _, hidden = model(ids, return_hidden=True)
        features.append(model.model.norm(hidden[step_mask]))
    model.train()
    return torch.cat(features)


def aucs_by_kind(scores: torch.Tensor, kinds: list[str | None]) -> dict[str, float]:
    """Step-level AUCs of `scores` [S] for steps of these error kinds (None: correct): "first_error" (correct steps vs
    every chain's first wrong step), then per error kind (correct steps vs the first wrong steps of that kind, and
    "after_error": the steps after them), for the kinds present. Also "n_<kind>": how many such steps there are."""
    correct = torch.tensor([k is None for k in kinds])
    first = torch.tensor([k != "after_error" for k in kinds])
    out = {"first_error": auc(scores[first], correct[first].float())}
    for kind in dict.fromkeys(k for k in kinds if k is not None):
        mask = correct | torch.tensor([k == kind for k in kinds])
        out[kind] = auc(scores[mask], correct[mask].float())
        out[f"n_{kind}"] = int((~correct & mask).sum())
    return out


@torch.no_grad()
def step_log_scores(model: Transformer, rows: list[Row], tok: CharTokenizer, chunk: int = 1024) -> torch.Tensor:
    """Log of every step's reward as a PRMScorer gives it, [S] in pack's order: log sigmoid of the head's logit, plus
    likelihood_weight times the model's log probability of the step's tokens given the row before them."""
    weight = model.config.reward_head["likelihood_weight"]
    model.eval()
    scores = []
    for start in range(0, len(rows), chunk):
        ids, solution_mask, _, step_mask, _, _ = pack(rows[start:start + chunk], tok)
        logits, hidden = model(ids, return_hidden=True)
        score = F.logsigmoid(head_logits(model, model.model.norm(hidden[step_mask])))
        if weight:
            token = torch.zeros(ids.shape)  # log P(ids[b, t] | ids[b, :t]) at solution tokens, 0 elsewhere
            token[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            upto = (token * solution_mask).cumsum(1)[step_mask]  # a row's log probability up to each step's end
            row = step_mask.nonzero()[:, 0]
            first = torch.ones_like(upto, dtype=torch.bool)  # the first step of its row
            first[1:] = row[1:] != row[:-1]
            score = score + weight * (upto - torch.where(first, 0.0, upto.roll(1)))
        scores.append(score)
    model.train()
    return torch.cat(scores)


@torch.no_grad()
def prm_aucs(model: Transformer, rows: list[Row], tok: CharTokenizer, running_min: bool = False) -> dict[str, float]:
    """aucs_by_kind of the step scores (step_log_scores) on the steps of `rows`; with running_min, of each step's
    chain score so far under the min aggregate (the lowest score of the step and the ones before it in its row: what
    search ranks the chain by after that step)."""
    logits = step_log_scores(model, rows, tok)
    if running_min:
        logits = torch.cat([torch.cummin(x, 0).values for x in logits.split([len(r.steps) for r in rows])])
    return aucs_by_kind(logits, [k for r in rows for k in r.kinds])


def format_aucs(aucs: dict[str, float]) -> str:
    kinds = sorted((k for k in aucs if not k.startswith("n_") and k != "first_error"), key=lambda k: -aucs[f"n_{k}"])
    return f"first_error {aucs['first_error']:.3f}; " + ", ".join(f"{k} {aucs[k]:.3f} (n={aucs[f'n_{k}']})" for k in kinds)


def train_prm(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, log) -> None:
    """Phase 2 (see the module docstring)."""
    aux_head = torch.nn.Linear(cfg.hidden_size, 2 * AUX_DIGITS * 10)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.prm_lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = cfg.prm_rounds * cfg.prm_steps_per_round
    per_update = cfg.correct_per_batch + cfg.slipped_per_batch
    synthetic = generate_problems(total * per_update, SEED_SYNTHETIC)
    rng = random.Random(SEED_SYNTHETIC)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    for rnd in range(cfg.prm_rounds):
        rows = rollouts(model, cfg, tok, generate_problems(cfg.rollout_problems, SEED_ROLLOUT * 1000 + rnd),
                        seed=cfg.seed + rnd)
        labels = torch.tensor([x for r in rows for x in r.labels], dtype=torch.float32)
        # The fresh rollouts are held out from everything trained so far: the head's AUCs on them are honest.
        log(f"prm round {rnd}: {len(rows)} rollouts, {len(labels)} steps, {labels.mean().item():.3f} correct; "
            f"reward head AUC on them before training: {format_aucs(prm_aucs(model, rows, tok))}")
        for _ in range(cfg.prm_steps_per_round):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.prm_lr)
            batch = [rows[i] for i in torch.randperm(len(rows), generator=gen)[:cfg.rollouts_per_batch].tolist()]
            problems = synthetic[step * per_update:(step + 1) * per_update]
            batch += [solution_row(p, tok, lm=True) for p in problems[:cfg.correct_per_batch]]
            batch += [solution_row(p, tok, slipped_steps(p, rng), lm=False) for p in problems[cfg.correct_per_batch:]]
            kl, prm, aux = losses(model, batch, tok, aux_head, teacher)
            opt.zero_grad(set_to_none=True)
            (cfg.kl_weight * kl + prm + cfg.aux_weight * aux).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 100 == 0 or step == total - 1:
                log(f"prm step {step:4d}  prm loss {prm.item():.4f}  aux loss {aux.item():.4f}  kl {kl.item():.5f}")
            step += 1


def train_head(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, log) -> None:
    """Phase 3 (see the module docstring): the reward head alone, under the frozen trunk, on the features of every
    step of fresh rollouts up to its chain's first wrong one, labelled 1 for a correct step, 0 for the first wrong one."""
    problems = generate_problems(cfg.head_rollout_problems, SEED_ROLLOUT * 1000 + 100)
    rows = rollouts(model, cfg, tok, problems, seed=cfg.seed + 100)
    kinds = [k for r in rows for k in r.kinds]
    features = step_features(model, rows, tok)
    with torch.no_grad():
        log(f"head: {len(rows)} rollouts; the replaced reward head's AUC on them: "
            f"{format_aucs(aucs_by_kind(head_logits(model, features), kinds))}")
    up_to_first_error = torch.tensor([k != "after_error" for k in kinds])
    features = features[up_to_first_error]
    labels = torch.tensor([k is None for k in kinds], dtype=torch.float32)[up_to_first_error]
    # a fresh head (seeded, the global RNG untouched): the result depends on the policy alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 100)
        for layer in (model.reward_head.mlp, model.reward_head.out):
            if layer is not None:
                layer.reset_parameters()
    gen = torch.Generator().manual_seed(cfg.seed + 100)
    opt = torch.optim.AdamW(model.reward_head.parameters(), lr=cfg.head_lr, weight_decay=0.01)
    for step in range(cfg.head_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.head_steps, cfg.head_lr)
        batch = torch.randint(len(labels), (cfg.head_batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(head_logits(model, features[batch]), labels[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 1000 == 0 or step == cfg.head_steps - 1:
            log(f"head step {step:5d}  loss {loss.item():.4f} ({len(labels)} steps)")


@torch.no_grad()
def select_aggregate(model: Transformer, tok: CharTokenizer, problems, n: int, temperature: float, seed: int,
                     log, decoder=None) -> tuple[str, float]:
    """The chain-score aggregate whose mean accuracy over best-of-N, weighted best-of-N and DVTS (beam width 4) with
    either final choice (SearchConfig.select), n candidates per problem, is the highest on `problems` (ties: the
    earlier in AGGREGATES), and that mean; logs all of them. decoder: a function returning a fresh search decoder
    (default: make_decoder(model), the policy scored by its own reward head)."""
    model.eval()
    decoder = decoder or (lambda: make_decoder(model))
    prompts = [tok.encode(p.prompt, bos=True) for p in problems]
    cfg = SearchConfig(n=n, beam_width=math.gcd(n, 4), max_steps=8, max_step_tokens=12, temperature=temperature,
                       seed=seed)
    samples, _ = search(decoder(), tok, prompts, "best_of_n", cfg, has_prm=True)
    accuracy = {}
    for how in AGGREGATES:
        dvts, _ = search(decoder(), tok, prompts, "dvts", dataclasses.replace(cfg, aggregate=how), has_prm=True)
        for name, results, method in (("best-of-N", samples, "argmax"), ("weighted best-of-N", samples, "weighted"),
                                      ("DVTS", dvts, "argmax"), ("weighted DVTS", dvts, "weighted")):
            right = 0
            for p, r in zip(problems, results):
                cands = [dataclasses.replace(c, score=aggregate_scores(c.step_scores, how)) for c in r.candidates]
                i = choose(cands, method)
                right += i is not None and cands[i].answer == p.answer
            accuracy[how, name] = right / len(problems)
    model.train()
    names = ("best-of-N", "weighted best-of-N", "DVTS", "weighted DVTS")
    mean = {how: sum(accuracy[how, name] for name in names) / len(names) for how in AGGREGATES}
    log(f"N={n} on {len(problems)} eval problems, {' / '.join(names)} by aggregate: "
        + ", ".join(f"{how} " + " / ".join(f"{accuracy[how, name]:.3f}" for name in names) for how in AGGREGATES))
    best = max(AGGREGATES, key=mean.get)
    return best, mean[best]


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """The separate verifier (see train_verifier): its data and its schedule (its sizes are the policy's)."""

    rollout_problems: int = 4096  # x rollouts_per_problem rollouts of the policy, sampled once
    rollouts_per_problem: int = 8
    temperature: float = 1.0
    steps: int = 6000  # updates of trunk and head together
    paired_per_batch: int = 10  # problems per update, each as its correct solution and a chain with a first error
    rollouts_per_batch: int = 12  # rollouts per update, drawn with weight 1 / sqrt(rollouts of their first error kind)
    lr: float = 7e-4
    aux_weight: float = 1.0
    lm_weight: float = 0.5
    eval_problems: int = 200
    heldout_problems: int = 512
    select_n: int = 16
    likelihood_weights: tuple[float, ...] = (0.0, 1.0)  # the verifier's reward-head likelihood_weight candidates
    seed: int = 0


def _hard_slip(value: int, rng: random.Random) -> int:
    """A plausible wrong result: off by SLIPS, a lost or extra carry (+-10, +-9, +-11), a digit replaced, the digits
    swapped; never `value` itself, never negative."""
    way = rng.randrange(4)
    if way == 0:
        return _slip(value, rng)
    if way == 1:
        delta = rng.choice((-11, -10, -9, 9, 10, 11))
        return value + delta if value + delta >= 0 else value - delta
    digits = list(str(value))
    if way == 2 and len(digits) > 1 and digits[0] != digits[-1]:
        wrong = int("".join(reversed(digits)))
    else:
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (d != "0" or i or len(digits) == 1)])
        wrong = int("".join(digits))
    return wrong if wrong != value else value + 1


def first_error_steps(problem: Problem, kind: str, rng: random.Random) -> list[str]:
    """A solution whose first wrong step is of this kind (task.ERROR_KINDS; the checker's kind may differ when a slip
    happens to look like another), at a random step; later operations continue from the values written, slipping
    again with probability SLIP_PROB / 2, and the answer repeats the last value written."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"kind must be one of {ERROR_KINDS}, got {kind!r}")
    ops = list(zip(problem.ops, problem.operands[1:]))
    values = [problem.operands[0], *problem.running_values()]
    n = len(ops)
    if kind in ("answer", "extra_step"):
        at = n
    elif kind == "skip":
        at = rng.randrange(n - 1) if n > 1 else 0
        kind = kind if n > 1 else "result"
    else:
        at = rng.randrange(n + (kind == "format"))
    steps = problem.solution_steps()[:at]
    value = values[at]
    if kind == "early_answer":
        return steps + [f"A:{value if rng.random() < 0.5 else _hard_slip(value, rng)}"]
    if kind == "answer":
        return steps + [f"A:{_hard_slip(value, rng)}"]
    if kind == "format":
        expected = problem.solution_steps()[at]
        return steps + [expected[:rng.randrange(1, len(expected) - 1)] + rng.choice(["", "=", "+", "A:"]) + "\n"]
    rest = ops[at:]
    if kind == "extra_step":
        rest = [(rng.choice("+-"), rng.randint(1, 49))]
    elif kind == "skip":
        del rest[0:rng.randint(1, len(rest) - 1)]
    for i, (op, b) in enumerate(rest):
        a = value
        slip = kind if i == 0 else ("result" if rng.random() < SLIP_PROB / 2 else None)
        if slip == "copy":
            a = _hard_slip(value, rng)
        elif slip == "operand":
            b = _hard_slip(b, rng) if rng.random() < 0.8 else b
            op = op if b != rest[0][1] else "+-"[op == "+"]
        c = a + b if op == "+" else a - b
        if c < 0:
            break
        if slip == "result":
            c = _hard_slip(c, rng)
        steps.append(f"{a}{op}{b}={c}{STEP_SEPARATOR}")
        value = c
    return steps + [f"A:{value}"]


# First-error kinds of the synthetic chains. The policy's own errors are nearly all slipped results, and its rollouts
# hold plenty of those; what wins best-of-N at large N is the rest (slipped answers, misread operands, wrong copies of
# the previous value), so those are drawn more often here.
VERIFIER_KINDS = ("result", "copy", "copy", "operand", "operand", "answer", "answer", "early_answer", "skip",
                  "extra_step", "format")


def verifier_rows(problems, tok: CharTokenizer, rng: random.Random) -> list[Row]:
    """Per problem its correct solution (also a next-token target) and a chain whose first error is of a kind drawn
    from VERIFIER_KINDS (the same prefix up to it), each labelled by the checker: a pair that differs at one step."""
    rows = []
    for p in problems:
        rows += [solution_row(p, tok, lm=True),
                 solution_row(p, tok, first_error_steps(p, rng.choice(VERIFIER_KINDS), rng), lm=False)]
    return rows


def rollout_weights(rows: list[Row]) -> torch.Tensor:
    """Sampling weight per rollout: 1 / sqrt(number of rollouts whose first error has its kind; correct chains are
    one kind), so the policy's rare errors are seen more often without the few of them crowding the batches."""
    first = [next((k for k in r.kinds if k is not None), None) for r in rows]
    counts = Counter(first)
    return torch.tensor([counts[k] ** -0.5 for k in first], dtype=torch.float64)


def train_verifier(cfg: VerifierConfig, policy: Transformer, tok: CharTokenizer, log) -> Transformer:
    """The verifier: a copy of the policy (trunk and reward head) trained to check steps (see the module docstring).
    cfg.steps updates of trunk and head on batches of verifier_rows pairs and rollouts of `policy` (sampled once,
    labelled by the checker, drawn by rollout_weights), each batch in two forwards over its rows sorted by length (less
    padding): binary cross-entropy on every step up to a chain's first wrong one, plus the next-token loss on the
    correct solutions and the auxiliary digit targets (aux_targets, every step) from a training-only linear head."""
    model = copy.deepcopy(policy).train()
    t0 = time.perf_counter()
    rows = rollouts(policy, cfg, tok, generate_problems(cfg.rollout_problems, SEED_VERIFIER * 1000), seed=cfg.seed + 200)
    weights = rollout_weights(rows)
    labels = torch.tensor([x for r in rows for x in r.labels], dtype=torch.float32)
    log(f"verifier: {len(rows)} policy rollouts, {len(labels)} steps, {labels.mean().item():.3f} correct "
        f"({time.perf_counter() - t0:.0f} s)")
    torch.manual_seed(cfg.seed + 200)
    aux_head = torch.nn.Linear(model.config.hidden_size, AUX_TARGETS * 10)
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    synthetic = generate_problems(cfg.steps * cfg.paired_per_batch, SEED_VERIFIER)
    rng = random.Random(SEED_VERIFIER)
    gen = torch.Generator().manual_seed(cfg.seed + 200)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr)
        batch = verifier_rows(synthetic[step * cfg.paired_per_batch:(step + 1) * cfg.paired_per_batch], tok, rng)
        batch += [rows[i] for i in torch.multinomial(weights, cfg.rollouts_per_batch, True, generator=gen).tolist()]
        # two forwards over the batch sorted by length, each padded to its own longest row (less padding)
        batch.sort(key=lambda r: len(r.prompt) + sum(map(len, r.steps)))
        opt.zero_grad(set_to_none=True)
        logged = torch.zeros(3)  # the batch's prm, aux and lm losses
        for part in (batch[:len(batch) // 2], batch[len(batch) // 2:]):
            lm, prm, aux = losses(model, part, tok, aux_head, prm_until_first_error=True)
            share = len(part) / len(batch)
            (share * (prm + cfg.lm_weight * lm + cfg.aux_weight * aux)).backward()
            logged += share * torch.stack([prm, aux, lm]).detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            prm, aux, lm = logged.tolist()
            log(f"verifier step {step:5d}  prm loss {prm:.4f}  aux loss {aux:.4f}  lm loss {lm:.4f}"
                f"  ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def train(cfg: TrainConfig, out: Path, log=print, policy: Path | None = None) -> Transformer:
    """All phases, or phase 3 alone on the policy of the checkpoint `policy` (its config's reward head spec is kept;
    cfg's model sizes are then unused); writes the checkpoint to `out` and logs times, accuracies, held-out AUCs
    per error kind and the chosen chain-score aggregate."""
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    if policy is None:
        model = Transformer(model_config(cfg, tok))
    else:
        model = load_checkpoint(policy, device="cpu", dtype=torch.float32)
        if model.reward_head is None:
            raise ValueError(f"policy: {policy} has no reward head to train (no {REWARD_HEAD_KEY!r} in its config)")
    log(f"policy + reward head: {sum(p.numel() for p in model.parameters()):,} parameters"
        + ("" if policy is None else f", policy from {policy}"))
    eval_set = generate_problems(cfg.eval_problems, SEED_EVAL)
    # (name, run, whether it changes the policy: phase 3 trains the reward head alone)
    phases = [("phase 1", lambda: train_policy(model, cfg, tok, log), True),
              ("phase 2", lambda: train_prm(model, cfg, tok, log), True),
              ("phase 3", lambda: train_head(model, cfg, tok, log), False)]
    if policy is not None:
        phases = phases[2:]
    wall_total = cpu_total = 0.0
    for name, run, changes_policy in phases:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall_total, cpu_total = wall_total + wall, cpu_total + cpu
        accuracy = (f"; accuracy greedy {evaluate(model, tok, eval_set, 0.0, 0):.3f}, sampled (T={cfg.temperature}) "
                    f"{evaluate(model, tok, eval_set, cfg.temperature, 0):.3f}") if changes_policy else ""
        log(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU{accuracy}")
    model.eval()
    save_checkpoint(model, out)
    log(f"wrote {out}; training took {wall_total:.0f} s wall, {cpu_total:.0f} s CPU (evaluations excluded)")
    heldout = rollouts(model, cfg, tok, generate_problems(cfg.heldout_problems, SEED_HELDOUT), seed=cfg.seed)
    log(f"held-out rollouts ({len(heldout)} on {cfg.heldout_problems} fresh problems), step-level AUC by error kind: "
        f"{format_aucs(prm_aucs(model, heldout, tok))}")
    log(f"chosen aggregate: {select_aggregate(model, tok, eval_set, cfg.select_n, cfg.temperature, cfg.seed, log)[0]}")
    return model


def build_verifier(cfg: VerifierConfig, policy: Path, out: Path, log=print) -> Transformer:
    """`train --verifier`: trains the verifier on the rollouts of `policy`'s checkpoint; logs held-out step AUCs per
    error kind of the verifier (with each of cfg.likelihood_weights as its reward head's likelihood_weight) and of the
    policy's reward head on the same rollouts, and the mean accuracy of each on the eval problems (select_aggregate,
    with its best chain-score aggregate); writes the verifier to `out` with the likelihood_weight that did best, and
    logs the scorer that did best overall (the CLI's default)."""
    torch.set_num_threads(2)
    tok = CharTokenizer()
    model = load_checkpoint(policy, device="cpu", dtype=torch.float32)
    if model.reward_head is None:
        raise ValueError(f"policy: {policy} has no reward head to compare the verifier with")
    if not cfg.likelihood_weights:
        raise ValueError("cfg.likelihood_weights must name at least one candidate likelihood_weight, got ()")
    for weight in cfg.likelihood_weights:  # each through the config's own check, before training
        _parse_reward_head({**model.config.reward_head, "likelihood_weight": weight}, model.config.vocab_size)
    log(f"verifier: {sum(p.numel() for p in model.parameters()):,} parameters, from the policy {policy}")
    wall, cpu = time.perf_counter(), time.process_time()
    verifier = train_verifier(cfg, model, tok, log)
    log(f"verifier training took {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
        "(evaluations excluded)")
    heldout = rollouts(model, cfg, tok, generate_problems(cfg.heldout_problems, SEED_HELDOUT), seed=cfg.seed)
    eval_set = generate_problems(cfg.eval_problems, SEED_EVAL)
    scorers = {"reward head": (model, None)}
    for weight in cfg.likelihood_weights:
        scorers[f"verifier x likelihood^{weight:g}" if weight else "verifier"] = (verifier, weight)
    choice = {}
    for name, (scorer, weight) in scorers.items():
        decoder = None
        if weight is not None:
            verifier.config.reward_head["likelihood_weight"] = weight
            decoder = lambda: PRMScoredDecoder(make_decoder(model), verifier)  # noqa: E731
        log(f"{name}: held-out step-level AUC by error kind ({len(heldout)} rollouts on {cfg.heldout_problems} fresh "
            f"problems): {format_aucs(prm_aucs(scorer, heldout, tok))}")
        log(f"{name}: the same, each step scored by its chain's min so far: "
            f"{format_aucs(prm_aucs(scorer, heldout, tok, running_min=True))}")
        choice[name] = select_aggregate(model, tok, eval_set, cfg.select_n, cfg.temperature, cfg.seed, log, decoder)
    best_verifier = max((name for name in scorers if scorers[name][1] is not None), key=lambda name: choice[name][1])
    verifier.config.reward_head["likelihood_weight"] = scorers[best_verifier][1]
    save_checkpoint(verifier, out)
    log(f"wrote {out} (likelihood_weight {scorers[best_verifier][1]:g})")
    best = max(choice, key=lambda name: choice[name][1])
    log("chosen scorer: " + best + " with aggregate " + choice[best][0] + " ("
        + ", ".join(f"{name}: {how} {mean:.3f}" for name, (how, mean) in choice.items()) + ")")
    return verifier


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory to write")
    parser.add_argument("--policy", type=Path, default=None,
                        help="checkpoint directory whose policy to keep: run phase 3 (the reward head) alone on it")
    parser.add_argument("--verifier", action="store_true",
                        help=f"train the separate verifier on --policy's rollouts (default policy {DEFAULT_OUT.name}, "
                             f"default --out {VERIFIER_OUT.name})")
    args = parser.parse_args(argv)
    if args.verifier:
        args.policy = DEFAULT_OUT if args.policy is None else args.policy
        args.out = VERIFIER_OUT if args.out is None else args.out
    if args.policy is not None and not (args.policy / "config.json").is_file():
        parser.error(f"--policy: {args.policy} is not a checkpoint directory (no config.json)")
    if args.verifier:
        build_verifier(VerifierConfig(), args.policy, args.out)
    else:
        train(TrainConfig(), args.out or DEFAULT_OUT, policy=args.policy)


if __name__ == "__main__":
    main()
