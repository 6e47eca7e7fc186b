"""The training script on a few-update configuration: it runs every phase end to end, writes a checkpoint that the
decoder loads, and is deterministic (two runs give bit-identical weights; a different seed does not); phase 3 changes
the reward head alone; the rank-based AUC equals the pairwise definition; the separate verifier's training is
reproducible and its synthetic chains go wrong as asked."""
import dataclasses
import math
import random

import pytest
import torch

from o1kernels.decoder import load_checkpoint
from o1kernels.decoder.task import ERROR_KINDS, CharTokenizer, generate_problems, step_error_kinds
from o1kernels.decoder.train import TrainConfig, VerifierConfig, auc, build_verifier, first_error_steps, train

TINY = TrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, reward_hidden=8,
                   batch_size=8, lm_steps=3, prm_rounds=1, rollout_problems=2, rollouts_per_problem=2,
                   prm_steps_per_round=2, rollouts_per_batch=2, correct_per_batch=2, slipped_per_batch=2,
                   head_rollout_problems=2, head_steps=3, head_batch=8,
                   eval_problems=2, heldout_problems=2, select_n=2)


def _run(cfg, out):
    logs = []
    model = train(cfg, out, log=logs.append)
    return {k: v.clone() for k, v in model.state_dict().items()}, logs


def test_train_is_deterministic_and_writes_a_loadable_checkpoint(tmp_path):
    threads = torch.get_num_threads()
    try:
        first, logs = _run(TINY, tmp_path / "a")
        second, _ = _run(TINY, tmp_path / "b")
        other, _ = _run(dataclasses.replace(TINY, seed=1), tmp_path / "c")
    finally:
        torch.set_num_threads(threads)
    assert first.keys() == second.keys() and any(k.startswith("reward_head.") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    for expected in ("prm round 0", "head step", "phase 3", "held-out rollouts", "chosen aggregate", "wrote"):
        assert any(expected in line for line in logs), expected
    loaded = load_checkpoint(tmp_path / "a", device="cpu", dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, first[name]), name
    assert loaded.reward_head is not None


def _pairwise_auc(scores, labels):
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    return ((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()).item()


@pytest.mark.parametrize("levels", [None, 5])  # continuous scores, and heavily tied ones
def test_auc_equals_the_pairwise_definition(levels):
    gen = torch.Generator().manual_seed(0)
    for size in (2, 17, 400):
        labels = torch.randint(2, (size,), generator=gen).float()
        labels[0], labels[1] = 0.0, 1.0
        scores = torch.randn(size, generator=gen) + labels * 0.7
        if levels:
            scores = torch.round(scores * levels / 4)
        assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) == 0.5
    assert math.isnan(auc(torch.tensor([0.5, 0.7]), torch.tensor([1.0, 1.0])))  # no negatives


def test_phase_3_trains_the_reward_head_alone():
    from o1kernels.decoder.model import Transformer
    from o1kernels.decoder.task import CharTokenizer
    from o1kernels.decoder.train import model_config, train_head

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(model_config(TINY, tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = []
    train_head(model, TINY, tok, logs.append)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("reward_head.") for k in changed), changed
    assert any("head step" in line for line in logs)


def test_head_only_run_keeps_the_policy_and_is_idempotent(tmp_path):
    """`train --policy DIR`: phase 3 alone, its head re-initialised from the seed (never read), so it reproduces a full
    run from that run's own output, and again from its own output: how the shipped checkpoint is made."""
    _run(TINY, tmp_path / "full")
    logs = []
    train(TINY, tmp_path / "head", log=logs.append, policy=tmp_path / "full")
    assert not any("phase 1" in line or "phase 2" in line for line in logs)
    assert any("phase 3" in line for line in logs) and any("chosen aggregate" in line for line in logs)
    train(TINY, tmp_path / "again", log=lambda _: None, policy=tmp_path / "head")
    full, head, again = (load_checkpoint(tmp_path / d, device="cpu", dtype=torch.float32).state_dict()
                         for d in ("full", "head", "again"))
    assert full.keys() == head.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], head[name]) and torch.equal(head[name], again[name]), name


def test_head_only_run_needs_a_checkpoint(tmp_path, capsys):
    from o1kernels.decoder.train import main

    with pytest.raises(SystemExit):
        main(["--policy", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "--policy" in capsys.readouterr().err


def test_head_only_run_needs_a_reward_head(tmp_path):
    from o1kernels.decoder import save_checkpoint
    from o1kernels.decoder.model import Transformer
    from o1kernels.decoder.task import CharTokenizer
    from o1kernels.decoder.train import model_config

    save_checkpoint(Transformer(dataclasses.replace(model_config(TINY, CharTokenizer()), reward_head=None)), tmp_path / "lm")
    with pytest.raises(ValueError, match="policy: .*lm has no reward head to train"):
        train(TINY, tmp_path / "out", log=lambda _: None, policy=tmp_path / "lm")
    assert not (tmp_path / "out").exists()


VERIFIER_TINY = VerifierConfig(rollout_problems=2, rollouts_per_problem=2, steps=2, paired_per_batch=2,
                               rollouts_per_batch=2, eval_problems=2, heldout_problems=2, select_n=2)


def test_verifier_training_writes_the_same_bytes_on_a_rerun(tmp_path):
    """`train --verifier` on a small configuration: a rerun writes the same bytes, another seed does not; the policy is
    left as it was; the log compares the verifier with the reward head and names the scorer it chose."""
    threads = torch.get_num_threads()
    try:
        _run(TINY, tmp_path / "policy")
        before = (tmp_path / "policy" / "model.safetensors").read_bytes()
        logs = []
        build_verifier(VERIFIER_TINY, tmp_path / "policy", tmp_path / "a", log=logs.append)
        build_verifier(VERIFIER_TINY, tmp_path / "policy", tmp_path / "b", log=lambda _: None)
        build_verifier(dataclasses.replace(VERIFIER_TINY, seed=1), tmp_path / "policy", tmp_path / "c",
                       log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    first = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first != (tmp_path / "c" / "model.safetensors").read_bytes()
    assert (tmp_path / "policy" / "model.safetensors").read_bytes() == before
    for expected in ("verifier step", "verifier: held-out step-level AUC", "reward head: held-out step-level AUC",
                     "verifier x likelihood^1: held-out step-level AUC", "chain's min so far", "chosen scorer:"):
        assert any(expected in line for line in logs), expected
    verifier = load_checkpoint(tmp_path / "a", device="cpu", dtype=torch.float32)
    assert verifier.reward_head is not None
    written = [line for line in logs if line.startswith("wrote")]
    assert written == [f"wrote {tmp_path / 'a'} (likelihood_weight {verifier.config.reward_head['likelihood_weight']:g})"]


def test_verifier_likelihood_weights_are_checked_before_training(tmp_path):
    threads = torch.get_num_threads()
    try:
        _run(TINY, tmp_path / "policy")
        for bad, message in (((), r"likelihood_weights must name at least one candidate"),
                             ((0.0, -1.0), "likelihood_weight must be a finite number >= 0, got -1.0"),
                             ((float("nan"),), "likelihood_weight must be a finite number >= 0, got nan")):
            logs = []
            with pytest.raises(ValueError, match=message):
                build_verifier(dataclasses.replace(VERIFIER_TINY, likelihood_weights=bad), tmp_path / "policy",
                               tmp_path / "v", log=logs.append)
            assert not any("verifier step" in line for line in logs) and not (tmp_path / "v").exists()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_synthetic_chains_go_wrong_first_as_asked(kind):
    """first_error_steps: the checker finds the first error of the kind asked for (nearly always: a slip can happen to
    look like another kind), the steps before it are the correct ones, and every step is in the task's vocabulary."""
    rng = random.Random(0)
    problems = generate_problems(200, 11)
    hits = 0
    for p in problems:
        steps = first_error_steps(p, kind, rng)
        kinds = step_error_kinds(p, steps)
        first = next((i for i, k in enumerate(kinds) if k is not None), None)
        assert first is not None or kind == "extra_step"  # an extra operation that would go negative is left out
        if first is None:
            continue
        assert steps[:first] == p.solution_steps()[:first]
        hits += kinds[first] == kind
        CharTokenizer().encode("".join(steps))
    assert hits >= 0.8 * len(problems), hits


def test_synthetic_chains_need_a_known_error_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        first_error_steps(generate_problems(1, 0)[0], "typo", random.Random(0))


def test_prm_until_first_error_reads_the_steps_up_to_the_first_wrong_one():
    """losses(prm_until_first_error=True): the PRM loss is the mean binary cross-entropy over every step up to each
    row's first wrong one (that one included), none after it; without it, over every step. The other losses are the
    same either way."""
    import torch.nn.functional as F

    from o1kernels.decoder.model import Transformer
    from o1kernels.decoder.train import AUX_TARGETS, losses, model_config, pack, reward_logits, solution_row

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(model_config(TINY, tok))
    aux_head = torch.nn.Linear(TINY.hidden_size, AUX_TARGETS * 10)
    p, q = generate_problems(2, 7)
    wrong = p.solution_steps()
    wrong[0] = wrong[0].replace("=", "=1", 1)  # a slipped first result: every later step is after_error
    rows = [solution_row(q, tok, lm=True), solution_row(p, tok, wrong, lm=False)]
    ids, _, _, step_mask, labels, _ = pack(rows, tok)
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        each = F.binary_cross_entropy_with_logits(reward_logits(model, hidden[step_mask]), labels, reduction="none")
        after = torch.tensor([k == "after_error" for r in rows for k in r.kinds])
        assert after.sum() == len(p.solution_steps()) - 1
        every = losses(model, rows, tok, aux_head)
        first = losses(model, rows, tok, aux_head, prm_until_first_error=True)
    torch.testing.assert_close(every[1], each.mean())
    torch.testing.assert_close(first[1], each[~after].mean())
    assert torch.equal(every[0], first[0]) and torch.equal(every[2], first[2])


def test_rows_without_a_next_token_target_give_a_zero_policy_loss():
    """losses on rows none of which is a next-token target (one half of a verifier batch can be): the policy loss is
    zero with a zero gradient, not NaN, and the PRM loss is unchanged."""
    from o1kernels.decoder.model import Transformer
    from o1kernels.decoder.train import AUX_TARGETS, losses, model_config, solution_row

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(model_config(TINY, tok))
    aux_head = torch.nn.Linear(TINY.hidden_size, AUX_TARGETS * 10)
    p, q = generate_problems(2, 8)
    rows = [solution_row(p, tok, lm=False), solution_row(q, tok, lm=False)]
    lm, prm, aux = losses(model, rows, tok, aux_head)
    assert lm.item() == 0.0 and torch.isfinite(prm) and torch.isfinite(aux)
    lm.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with_lm = losses(model, [dataclasses.replace(rows[0], lm=True), rows[1]], tok, aux_head)
    assert with_lm[0].item() > 0 and torch.equal(with_lm[1], prm)


def test_running_min_aucs_rank_each_step_by_its_chain_min_so_far():
    """prm_aucs(running_min=True): the AUCs of each step's lowest logit among it and the earlier steps of its row, rows
    of different lengths, at least one after an error; without it, of the step's own logit."""
    from o1kernels.decoder.model import Transformer
    from o1kernels.decoder.train import aucs_by_kind, head_logits, model_config, prm_aucs, solution_row, step_features

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(model_config(TINY, tok)).eval()
    rows = []
    for i, p in enumerate(generate_problems(6, 12)):
        steps = p.solution_steps()
        if i % 2:
            steps[0] = steps[0].replace("=", "=1", 1)
        rows.append(solution_row(p, tok, steps, lm=False))
    kinds = [k for r in rows for k in r.kinds]
    assert "after_error" in kinds and len({len(r.steps) for r in rows}) > 1
    logits = head_logits(model, step_features(model, rows, tok))
    running, i = [], 0
    for r in rows:
        running += [min(logits[i:i + j + 1].tolist()) for j in range(len(r.steps))]
        i += len(r.steps)
    assert prm_aucs(model, rows, tok, running_min=True) == aucs_by_kind(torch.tensor(running), kinds)
    assert prm_aucs(model, rows, tok) == aucs_by_kind(logits, kinds)


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_step_log_scores_equal_the_incremental_scorer(weight):
    """step_log_scores (the training script's AUCs) equals the log of PRMScorer's step scores, steps scored one at a
    time over the PRM's paged tree, with and without the step likelihood; rows of different lengths, some wrong."""
    from o1kernels.decoder.model import Transformer
    from o1kernels.decoder.prm import PRMScorer
    from o1kernels.decoder.train import model_config, solution_row, step_log_scores

    tok = CharTokenizer()
    cfg = model_config(TINY, tok)
    cfg = dataclasses.replace(cfg, reward_head={**cfg.reward_head, "likelihood_weight": weight})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights large enough that the scores spread
        for p in model.parameters():
            p.normal_(0, 0.3)
    rows = []
    for i, p in enumerate(generate_problems(5, 13)):
        steps = p.solution_steps()
        if i % 2:
            steps[-1] = steps[-1] + "7"
        rows.append(solution_row(p, tok, steps, lm=False))
    assert len({len(r.steps) for r in rows}) > 1
    expected = step_log_scores(model, rows, tok, chunk=2)
    scorer = PRMScorer(model, backend="torch")
    got = []
    for r in rows:
        branch = scorer.add_prompt(r.prompt)
        for step in r.steps:
            got.append(scorer.score([branch], [step])[0].log().item())
        scorer.release(branch)
    assert expected.std() > 0.01  # 100x the tolerance
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-4, rtol=1e-4)


def test_verifier_rows_pair_each_correct_solution_with_a_first_error_chain():
    from o1kernels.decoder.train import verifier_rows

    tok = CharTokenizer()
    problems = generate_problems(50, 8)
    rows = verifier_rows(problems, tok, random.Random(0))
    assert len(rows) == 2 * len(problems)
    for p, right, wrong in zip(problems, rows[0::2], rows[1::2]):
        assert right.lm and all(right.labels) and right.prompt == wrong.prompt
        assert not wrong.lm
        first = next((i for i, k in enumerate(wrong.kinds) if k is not None), None)
        if first is not None:  # an extra step that would go negative is left out (see first_error_steps)
            assert right.steps[:first] == wrong.steps[:first]


def test_rollout_weights_are_one_over_sqrt_of_the_kind_count():
    from o1kernels.decoder.train import labelled_row, rollout_weights

    tok = CharTokenizer()
    p = generate_problems(1, 9)[0]
    good = p.solution_steps()
    slipped = [good[0].replace("=", "=1", 1), *good[1:]]
    early = [f"A:{p.operands[0]}"]
    chains = [good] * 4 + [slipped] * 9 + [early]
    rows = [labelled_row(p, tok, [tok.encode(s) for s in steps], steps, lm=False) for steps in chains]
    w = rollout_weights(rows)
    assert w.dtype == torch.float64
    assert torch.allclose(w, torch.tensor([1 / 2] * 4 + [1 / 3] * 9 + [1.0], dtype=torch.float64))


def test_aux_targets_of_a_correct_solution():
    """aux_targets per step of correct solutions: |a op b| and the running value after it (the policy's six), then the
    value the step starts from (the answer for the answer step), the operand and op due; -100 where a target has no
    value (no operation in the answer step, nothing due after the last operation)."""
    from o1kernels.decoder.train import AUX_DIGITS, AUX_TARGETS, aux_targets

    def digits(v, k=AUX_DIGITS):
        return [v // 10 ** i % 10 for i in range(k)]

    for p in generate_problems(30, 10):
        values = [p.operands[0], *p.running_values()]
        steps = p.solution_steps()
        for i, step in enumerate(steps):
            t = aux_targets(step, i, p)
            assert len(t) == AUX_TARGETS
            if i < len(p.ops):
                assert t == (digits(values[i + 1]) * 2 + digits(values[i]) + digits(p.operands[i + 1], 2)
                             + ["+-".index(p.ops[i])])
            else:
                assert t == [-100] * AUX_DIGITS + digits(p.answer) * 2 + [-100] * 3
        extra = aux_targets("5+3=8\n", len(steps), p)  # an operation after the answer's place
        assert extra == digits(8) + [-100] * (AUX_TARGETS - AUX_DIGITS)
