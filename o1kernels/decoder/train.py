"""Deterministic training of the shipped tiny policy + PRM on the arithmetic task (2-core CPU, minutes).

    python -m o1kernels.decoder.train [--out o1kernels/decoder/weights/tiny-arith]

The PRM is a reward head on the policy's own hidden states: final norm -> Linear -> ReLU -> Linear ->
sigmoid at each step's last token (what o1kernels.step_rewards computes at decode time), trained with
binary cross-entropy on step labels (1 iff the step and every earlier step are correct).

Phase 1 (policy): next-token loss on correct worked solutions (prompt tokens are not predicted). The
reward head learns at the same time, from those solutions and from synthetic ones with one slipped
result (the tiny policy's typical error), so the trunk learns to check steps while it learns to write
them. (A head trained only in phase 2 on a finished policy stayed weak: step AUC ~0.67, and best-of-N
got worse as N grew.)
Phase 2 (PRM on the policy's own errors): rounds of (a) sampling rollouts from the current policy with
the search code's sampler, (b) labelling each step by checking it, (c) updates that mix rollout steps
with synthetic solutions (half correct, half slipped). The trunk is fine-tuned jointly at a lower
learning rate, and the next-token loss on the correct synthetic solutions is kept in every update so
the policy stays as good as after phase 1.

Determinism: fixed seeds, a fixed data order (problems drawn from seeded generators), the sampling
generator seeded per round, torch.set_num_threads(2).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .engine import TreeDecoder
from .model import ModelConfig, Transformer
from .search import SearchConfig, search
from .task import STEP_SEPARATOR, CharTokenizer, Problem, check_steps, generate_problems, is_correct

DEFAULT_OUT = Path(__file__).parent / "weights" / "tiny-arith"
# Seeds of the disjoint problem streams.
SEED_LM, SEED_ROLLOUT, SEED_EVAL, SEED_SYNTHETIC = 1, 2, 3, 4
# Result slips of the synthetic negatives, drawn uniformly (+-1 listed twice: the policy's most common error).
SLIPS = (-1, 1, -1, 1, -2, 2, -10, 10)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    reward_hidden: int = 64
    batch_size: int = 64
    slips_per_batch: int = 32  # phase 1: synthetic solutions with one slip, next to batch_size correct ones
    lm_steps: int = 1500
    lm_lr: float = 3e-3
    prm_rounds: int = 3
    rollout_problems: int = 128  # per round
    rollouts_per_problem: int = 8
    prm_steps_per_round: int = 150
    rollouts_per_batch: int = 32  # + batch_size synthetic solutions per phase-2 update
    trunk_lr: float = 3e-4
    head_lr: float = 2e-3
    temperature: float = 1.0  # of the rollouts (the search's sampling temperature)
    eval_problems: int = 200
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
    """One training sequence: prompt ids, its steps' token ids, per-step PRM labels (None: no PRM loss) and
    whether its steps are a correct solution to learn (next-token loss)."""

    prompt: list[int]
    steps: list[list[int]]
    labels: list[bool] | None
    lm: bool


def solution_row(problem: Problem, tok: CharTokenizer, steps: list[str] | None = None, *, lm: bool) -> Row:
    """A worked solution (default: the correct one) as a Row; the answer step ends with <eos>."""
    steps = problem.solution_steps() if steps is None else steps
    ids = [tok.encode(s) for s in steps]
    ids[-1].append(tok.eos_id)
    return Row(tok.encode(problem.prompt, bos=True), ids, check_steps(problem, steps), lm)


def corrupted_steps(problem: Problem, rng: random.Random) -> list[str]:
    """The solution with one slip: a random step's result is off by a small amount (the tiny policy's errors are
    mostly +-1 in the ones digit), later steps compute correctly from the wrong value, the answer repeats it."""
    k = rng.randrange(len(problem.ops))
    acc, steps = problem.operands[0], []
    for i, (op, v) in enumerate(zip(problem.ops, problem.operands[1:])):
        new = acc + v if op == "+" else acc - v
        if i == k:
            delta = rng.choice(SLIPS)
            new = new + delta if new + delta >= 0 else new - delta
        steps.append(f"{acc}{op}{v}={new}{STEP_SEPARATOR}")
        acc = new
    return steps + [f"A:{acc}"]


def pack(rows: list[Row], pad_id: int):
    """Rows -> ids [B, T] (right-padded), lm_mask [B, T] (next-token targets: solution tokens of lm rows),
    step_mask [B, T] (last token of every step of labelled rows), labels [S] float32 in step_mask's row-major order."""
    seqs = [r.prompt + [t for s in r.steps for t in s] for r in rows]
    ids = torch.full((len(rows), max(map(len, seqs))), pad_id, dtype=torch.long)
    lm_mask = torch.zeros_like(ids, dtype=torch.bool)
    step_mask = torch.zeros_like(ids, dtype=torch.bool)
    labels = []
    for i, (r, seq) in enumerate(zip(rows, seqs)):
        ids[i, :len(seq)] = torch.tensor(seq)
        if r.lm:
            lm_mask[i, len(r.prompt):len(seq)] = True
        if r.labels is not None:
            ends = torch.tensor([len(s) for s in r.steps]).cumsum(0) + len(r.prompt) - 1
            step_mask[i, ends] = True
            labels += r.labels
    return ids, lm_mask, step_mask, torch.tensor(labels, dtype=torch.float32)


def losses(model: Transformer, rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over the rows -> (next-token loss on lm rows, PRM binary cross-entropy on labelled steps)."""
    ids, lm_mask, step_mask, labels = pack(rows, pad_id)
    logits, hidden = model(ids, return_hidden=True)
    targets = lm_mask[:, 1:]
    lm = F.cross_entropy(logits[:, :-1][targets], ids[:, 1:][targets]) if targets.any() else logits.sum() * 0
    prm = None
    if model.reward_head is not None and len(labels):
        prm = F.binary_cross_entropy_with_logits(reward_logits(model, hidden[step_mask]), labels)
    return lm, prm


def reward_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """Differentiable reward head on pre-norm step rows [S, H] -> logits [S] (sigmoid gives the reward); the same
    computation as o1kernels.step_rewards(..., norm_weight=model.model.norm.weight, activation="sigmoid")."""
    x = model.model.norm(hidden)
    if model.reward_head.mlp is not None:
        x = torch.relu(model.reward_head.mlp(x))
    return model.reward_head.out(x)[:, 0]


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


def train_phase1(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, log) -> None:
    """Phase 1: next-token loss on correct solutions (a fixed, seeded stream of problems); the reward head learns
    at the same time from those solutions (every step correct) and from synthetic ones with one slipped result."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, betas=(0.9, 0.98), weight_decay=0.01)
    stream = generate_problems(cfg.lm_steps * cfg.batch_size, SEED_LM)
    slipped = generate_problems(cfg.lm_steps * cfg.slips_per_batch, SEED_SYNTHETIC)
    rng = random.Random(SEED_SYNTHETIC)
    model.train()
    for step in range(cfg.lm_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lm_steps, cfg.lm_lr)
        rows = [solution_row(p, tok, lm=True) for p in stream[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        rows += [solution_row(p, tok, corrupted_steps(p, rng), lm=False)
                 for p in slipped[step * cfg.slips_per_batch:(step + 1) * cfg.slips_per_batch]]
        lm, prm = losses(model, rows, tok.pad_id)
        opt.zero_grad(set_to_none=True)
        (lm + prm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.lm_steps - 1:
            log(f"phase 1 step {step:5d}  lm loss {lm.item():.4f}  prm loss {prm.item():.4f}")


@torch.no_grad()
def rollouts(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, problems, seed: int) -> list[Row]:
    """rollouts_per_problem samples per problem from the policy, each step labelled by the task's checker."""
    model.eval()
    scfg = SearchConfig(n=cfg.rollouts_per_problem, max_steps=8, max_step_tokens=12,
                        temperature=cfg.temperature, seed=seed)
    results, _ = search(make_decoder(model), tok, [tok.encode(p.prompt, bos=True) for p in problems],
                        "majority", scfg, has_prm=False)
    model.train()
    return [Row(tok.encode(p.prompt, bos=True), c.step_tokens, check_steps(p, c.steps), lm=False)
            for p, r in zip(problems, results) for c in r.candidates]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive step outscores a random negative one (ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return (greater + 0.5 * ties).item()


@torch.no_grad()
def prm_auc(model: Transformer, rows: list[Row], pad_id: int) -> float:
    model.eval()
    ids, _, step_mask, labels = pack(rows, pad_id)
    _, hidden = model(ids, return_hidden=True)
    model.train()
    return auc(reward_logits(model, hidden[step_mask]), labels)


def train_prm(model: Transformer, cfg: TrainConfig, tok: CharTokenizer, log) -> None:
    """Phase 2: rounds of on-policy rollouts; each update trains the reward head (and the trunk, at a lower rate)
    on rollout steps and on synthetic solutions (half correct, half with one slip), and keeps the next-token loss
    on the correct synthetic solutions."""
    head = [p for n, p in model.named_parameters() if n.startswith("reward_head.")]
    trunk = [p for n, p in model.named_parameters() if not n.startswith("reward_head.")]
    opt = torch.optim.AdamW([{"params": trunk, "peak": cfg.trunk_lr}, {"params": head, "peak": cfg.head_lr}],
                            betas=(0.9, 0.98), weight_decay=0.01)
    total = cfg.prm_rounds * cfg.prm_steps_per_round
    synthetic = generate_problems(total * cfg.batch_size, SEED_SYNTHETIC + 1)
    rng = random.Random(SEED_SYNTHETIC + 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    for rnd in range(cfg.prm_rounds):
        rows = rollouts(model, cfg, tok, generate_problems(cfg.rollout_problems, SEED_ROLLOUT * 1000 + rnd),
                        seed=cfg.seed + rnd)
        labels = torch.tensor([x for r in rows for x in r.labels], dtype=torch.float32)
        # The fresh rollouts are held out from everything trained so far: the head's AUC on them is honest.
        log(f"prm round {rnd}: {len(rows)} rollouts, {len(labels)} steps, {labels.mean().item():.3f} correct, "
            f"head AUC on them before training {prm_auc(model, rows, tok.pad_id):.3f}")
        for _ in range(cfg.prm_steps_per_round):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, g["peak"], warmup=20)
            batch = [rows[i] for i in torch.randperm(len(rows), generator=gen)[:cfg.rollouts_per_batch].tolist()]
            for p in synthetic[step * cfg.batch_size:(step + 1) * cfg.batch_size]:
                slip = rng.random() < 0.5
                batch.append(solution_row(p, tok, corrupted_steps(p, rng) if slip else None, lm=not slip))
            lm, prm = losses(model, batch, tok.pad_id)
            opt.zero_grad(set_to_none=True)
            (lm + prm).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == total - 1:
                log(f"prm step {step:4d}  prm loss {prm.item():.4f}  lm loss {lm.item():.4f}")
            step += 1


def train(cfg: TrainConfig, out: Path, log=print) -> Transformer:
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    tok = CharTokenizer()
    t0 = time.perf_counter()
    model = Transformer(model_config(cfg, tok))
    log(f"policy + reward head: {sum(p.numel() for p in model.parameters()):,} parameters")
    train_phase1(model, cfg, tok, log)
    t1 = time.perf_counter()
    eval_set = generate_problems(cfg.eval_problems, SEED_EVAL)
    log(f"phase 1 done in {t1 - t0:.0f} s; accuracy greedy {evaluate(model, tok, eval_set, 0.0, 0):.3f}, "
        f"sampled (T={cfg.temperature}) {evaluate(model, tok, eval_set, cfg.temperature, 0):.3f}")
    t2 = time.perf_counter()
    train_prm(model, cfg, tok, log)
    t3 = time.perf_counter()
    log(f"phase 2 done in {t3 - t2:.0f} s; accuracy greedy {evaluate(model, tok, eval_set, 0.0, 0):.3f}, "
        f"sampled (T={cfg.temperature}) {evaluate(model, tok, eval_set, cfg.temperature, 0):.3f}")
    model.eval()
    save_checkpoint(model, out)
    log(f"wrote {out}: training took {(t1 - t0) + (t3 - t2):.0f} s (phase 1 {t1 - t0:.0f} s, phase 2 {t3 - t2:.0f} s, "
        "evaluations excluded)")
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to write")
    args = parser.parse_args(argv)
    train(TrainConfig(), args.out)


if __name__ == "__main__":
    main()
