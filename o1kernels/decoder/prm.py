"""A process reward model in its own checkpoint, run beside the policy, scoring steps with o1kernels.step_rewards.

PRMScoredDecoder(policy, prm) joins a policy decoder and a decoder over the PRM model (the same decoder class:
TreeDecoder or NaiveDecoder) and has the decoder interface search() uses: add_prompt, fork, release, generate_step,
kv_bytes, kv_bytes_naive, stats. Every policy branch has a twin in the PRM decoder: prompts are prefilled in both and
forks / releases are mirrored, so the PRM's KV is shared across branches exactly as the policy's. After each
generate_step, each branch's new step is teacher-forced into its twin (one chunk: attention over the twin's KV plus
causal attention inside the step; one forward per branch) and the step's reward is read at its last token by
step_rewards on the PRM's pre-norm hidden state, final norm fused, from
  - the PRM checkpoint's reward head (config "o1kernels_reward_head": value head or classifier, optional hidden
    layer), or
  - two rows of its LM head, token_pair=(positive_id, negative_id): reward = P(positive) of the pair (Math-Shepherd
    style), for a PRM that is a plain causal LM.
The PRM reads the policy's token ids, so it must share the policy's tokenizer.
"""
from __future__ import annotations

import torch

from o1kernels.step_rewards import step_rewards

from .engine import StepOutput
from .model import Transformer


class PRMScoredDecoder:
    """Policy decoder whose step scores come from a separate PRM decoder (see the module docstring)."""

    def __init__(self, policy, prm, *, token_pair: tuple[int, int] | None = None):
        for name, dec in (("policy", policy), ("prm", prm)):
            if not isinstance(getattr(dec, "model", None), Transformer):
                raise TypeError(f"{name} must be a decoder of o1kernels.decoder (TreeDecoder, NaiveDecoder), "
                                f"got {type(dec).__name__}")
        if type(prm) is not type(policy):
            raise TypeError(f"prm must be a {type(policy).__name__} like the policy, got {type(prm).__name__}")
        pv, rv = policy.model.config.vocab_size, prm.model.config.vocab_size
        if rv < pv:
            raise ValueError(f"the PRM's vocabulary ({rv} tokens) is smaller than the policy's ({pv}): the PRM must "
                             "share the policy's tokenizer")
        if token_pair is None:
            if prm.model.reward_head is None:
                raise ValueError("the PRM checkpoint has no reward head (config 'o1kernels_reward_head'): give "
                                 "token_pair=(positive_id, negative_id) to score with two rows of its LM head")
        else:
            if (not isinstance(token_pair, (tuple, list)) or len(token_pair) != 2
                    or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < rv for t in token_pair)):
                raise ValueError(f"token_pair must be two token ids in [0, {rv}), got {token_pair!r}")
            token_pair = tuple(token_pair)
        self.policy, self.prm, self.token_pair = policy, prm, token_pair
        self.model = policy.model
        self._twin: dict[int, int] = {}  # policy branch -> PRM branch

    @property
    def stats(self) -> dict:
        return self.policy.stats

    def add_prompt(self, prompt_ids) -> int:
        branch = self.policy.add_prompt(prompt_ids)
        self._twin[branch] = self.prm.add_prompt(prompt_ids)
        return branch

    def fork(self, branch: int, n: int) -> list[int]:
        kids = self.policy.fork(branch, n)
        for kid, twin in zip(kids, self.prm.fork(self._twin[branch], n)):
            self._twin[kid] = twin
        return kids

    def release(self, branch: int) -> None:
        self.policy.release(branch)
        self.prm.release(self._twin.pop(branch))

    def tokens(self, branch: int) -> list[int]:
        return self.policy.tokens(branch)

    def generate_step(self, branches, **kwargs) -> StepOutput:
        """policy.generate_step(branches, **kwargs) with each step scored by the PRM at its last token."""
        out = self.policy.generate_step(branches, **kwargs)
        twins = [self._twin[b] for b in branches]
        for twin, toks in zip(twins, out.new_tokens):
            self.prm.teacher_force(twin, toks)
        if not twins:
            return out
        hidden = torch.stack([self.prm.last_hidden(t) for t in twins])
        return StepOutput(out.new_tokens, self._score(hidden).tolist(), out.finished)

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        """PRM pre-norm hidden [B, H] of each step's last token -> rewards [B] float32 (fused step_rewards)."""
        model, backend = self.prm.model, getattr(self.prm, "backend", "auto")
        mask = torch.ones(hidden.shape[0], 1, dtype=torch.bool, device=hidden.device)
        if self.token_pair is None:
            scores, _ = model.step_rewards(hidden.unsqueeze(1), mask, aggregate="last", backend=backend)
        else:
            scores, _ = step_rewards(hidden.unsqueeze(1), mask, model.lm_head.weight[list(self.token_pair)],
                                     norm_weight=model.model.norm.weight, norm_eps=model.config.rms_norm_eps,
                                     positive_index=0, aggregate="last", backend=backend)
        return scores[:, 0]

    def kv_bytes(self) -> int:
        """KV bytes of the policy and the PRM together."""
        return self.policy.kv_bytes() + self.prm.kv_bytes()

    def kv_bytes_naive(self) -> int:
        return self.policy.kv_bytes_naive() + self.prm.kv_bytes_naive()
