"""The training script on a few-update configuration: it runs both phases end to end, writes a checkpoint that the
decoder loads, and is deterministic (two runs give bit-identical weights; a different seed does not)."""
import dataclasses

import torch

from o1kernels.decoder import load_checkpoint
from o1kernels.decoder.train import TrainConfig, train

TINY = TrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, reward_hidden=8,
                   batch_size=8, lm_steps=3, prm_rounds=1, rollout_problems=2, rollouts_per_problem=2,
                   prm_steps_per_round=2, rollouts_per_batch=2, correct_per_batch=2, slipped_per_batch=2,
                   eval_problems=2)


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
    assert any("prm round 0" in line for line in logs) and any("wrote" in line for line in logs)
    loaded = load_checkpoint(tmp_path / "a", device="cpu", dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, first[name]), name
    assert loaded.reward_head is not None
