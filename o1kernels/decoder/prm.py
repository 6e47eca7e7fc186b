"""A process reward model in its own checkpoint, scoring the search's new steps incrementally in one batched pass.

PRMScorer(model, fmt) keeps the PRM's own branch tree (a KVTree over its own PagedKVPool) mirrored from the search:
add_prompt (the PRM's prompt, prefilled once), fork (children share the pages), release. score(branches, steps)
appends every branch's new step, in the PRM's input format (o1kernels.prm_formats: its template, the separator it
expects after each step, its own tokenizer), and runs them ALL in ONE forward: the new tokens of every branch
packed [sum T_b], one PagedAttention plan over the branches' block tables (query_lens = T_b: causal inside each
row's new tokens, over its branch's KV; pages shared by branches read once), then o1kernels.step_rewards on the
packed pre-norm hidden states (final norm fused) with the step mask at each row's last token. Only the new PRM
tokens are processed: nothing is re-encoded.

The reward is the model's reward head (config "o1kernels_reward_head", or a Qwen2.5-Math-PRM checkpoint's score.0 /
score.2) or, when the format names a token pair (Math-Shepherd), P(positive) of those two LM-head rows. A reward head
whose spec sets likelihood_weight w > 0 (the shipped verifier) is multiplied by the PRM's own LM probability of the
step's tokens given the prefix, to the power w: a step the PRM would not have written is doubted even where the head
misses it. Each PRM branch keeps its last token's hidden state, which predicts the next step's first token.

PRMScoredDecoder(policy, scorer, tokenizer=) joins a policy decoder (TreeDecoder, NaiveDecoder) and a PRMScorer into
the decoder interface search() uses (add_prompt, fork, release, generate_step, kv_bytes, kv_bytes_naive, stats):
each generate_step's steps are scored by scorer.score in one PRM forward. With a text format the policy's tokens are
decoded with `tokenizer` (the policy's) and the PRM re-tokenizes each step on its own.

One memory budget: give the policy's TreeDecoder and the PRMScorer one o1kernels.paged.KVBudget (kv_budget=): the
pages both hold count against it, whichever needs them; PRMScoredDecoder.kv_bytes reports both.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from o1kernels.paged import KVBudget, KVTree, PagedAttention, PagedKVPool
from o1kernels.prm_formats import PRMFormat, RewardHeadFormat, chain_score
from o1kernels.step_rewards import AGGREGATES, step_rewards

from .engine import StepOutput
from .model import Transformer


class PRMScorer:
    """Incremental, batched PRM scoring over the PRM's own paged branch tree (see the module docstring).

    model: the PRM (a Transformer); fmt: its PRMFormat (default RewardHeadFormat(): the policy's ids, no separator);
    page_size, num_pages: its KV pool (num_pages None: grow on demand); backend: of attention and step_rewards;
    aggregate: how chain scores combine a branch's step scores; kv_budget: a KVBudget shared with the policy's pool.
    stats: forwards (PRM forwards run), tokens (new-step PRM tokens processed), prompt_tokens, seconds, peak_kv_bytes.
    """

    def __init__(self, model: Transformer, fmt: PRMFormat | None = None, *, page_size: int = 16,
                 num_pages: int | None = None, backend: str = "auto", aggregate: str = "last",
                 kv_budget: KVBudget | None = None):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be an o1kernels.decoder.Transformer, got {type(model).__name__}")
        fmt = RewardHeadFormat() if fmt is None else fmt
        if not isinstance(fmt, PRMFormat):
            raise TypeError(f"fmt must be an o1kernels.prm_formats.PRMFormat, got {type(fmt).__name__}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        cfg = model.config
        if fmt.token_pair is None:
            if model.reward_head is None:
                raise ValueError(f"model has no reward head, which {type(fmt).__name__} scores with (config "
                                 "'o1kernels_reward_head' or a Qwen2ForProcessRewardModel checkpoint)")
        elif model.lm_head is None or not all(0 <= t < cfg.vocab_size for t in fmt.token_pair):
            raise ValueError(f"fmt's token pair {fmt.token_pair} needs a model with an LM head over those ids "
                             f"(vocab_size {cfg.vocab_size})")
        self.model, self.fmt, self.backend, self.aggregate = model, fmt, backend, aggregate
        self.pool = PagedKVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, page_size=page_size,
                                num_pages=num_pages, dtype=model.dtype, device=model.device, budget=kv_budget)
        self.tree = KVTree(self.pool)
        self.attn = PagedAttention(page_size, (cfg.num_attention_heads, cfg.num_key_value_heads), cfg.head_dim,
                                   device=model.device, backend=backend, dtype=model.dtype)
        self.likelihood_weight = model.config.reward_head["likelihood_weight"] if fmt.token_pair is None else 0.0
        if self.likelihood_weight and model.lm_head is None:
            raise ValueError(f"model: its reward head multiplies by the step's likelihood (likelihood_weight "
                             f"{self.likelihood_weight}), which needs an LM head; the model has none")
        self.sm_scale = cfg.head_dim ** -0.5
        self._steps: dict[int, list[float]] = {}  # branch -> its step scores so far
        self._last: dict[int, torch.Tensor] = {}  # branch -> pre-norm hidden [H] of its last token (likelihood only)
        self.stats = {"forwards": 0, "tokens": 0, "prompt_tokens": 0, "seconds": 0.0, "peak_kv_bytes": 0}

    def _check_branches(self, branches) -> list[int]:
        if isinstance(branches, (str, bytes)) or not hasattr(branches, "__iter__"):
            raise TypeError(f"branches must be a list of branch ids, got {type(branches).__name__}")
        branches = list(branches)
        for b in branches:
            self.tree.get(b)
        if len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct, got {branches}")
        return branches

    @torch.no_grad()
    def add_prompt(self, question) -> int:
        """Prefill the PRM's prompt of `question` (text or ids, per the format); return its branch id."""
        ids = self.fmt.prompt_ids(question)
        self._check_ids("question", ids)
        with self.tree.atomic():
            branch = self.tree.new_branch()
            hidden, _ = self._forward([branch], [ids])
        self._steps[branch] = []
        if self.likelihood_weight:
            self._last[branch] = hidden[-1].clone()
        self.stats["prompt_tokens"] += len(ids)
        return branch

    def fork(self, branch: int, n: int) -> list[int]:
        """n children sharing the branch's PRM KV (and its step scores so far); the branch stays alive."""
        with self.tree.atomic([branch]):
            kids = self.tree.fork(branch, n)
        for k in kids:
            self._steps[k] = list(self._steps[branch])
            if self.likelihood_weight:
                self._last[k] = self._last[branch]
        return kids

    def release(self, branch: int) -> None:
        self.tree.release(branch)
        del self._steps[branch]
        self._last.pop(branch, None)

    @torch.no_grad()
    def score(self, branches, steps) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one new step to each branch and score it, all branches in one PRM forward.

        steps: per branch its new step (text or ids, per the format). Returns (step_scores [B], chain_scores [B])
        float32 on the CPU: each new step's reward and the `aggregate` of the branch's step scores."""
        branches = self._check_branches(branches)
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or len(steps) != len(branches):
            raise ValueError(f"steps must hold one step per branch ({len(branches)}), got "
                             f"{len(steps) if hasattr(steps, '__len__') else type(steps).__name__}")
        if not branches:
            return torch.zeros(0), torch.zeros(0)
        ids = [self.fmt.step_ids(s, len(self._steps[b])) for b, s in zip(branches, steps)]
        for i, row in enumerate(ids):
            self._check_ids(f"steps[{i}]", row)
        t0 = time.perf_counter()
        with self.tree.atomic(branches):
            hidden, tokens = self._forward(branches, ids)
            lens = torch.tensor([len(r) for r in ids])
            cu = torch.zeros(len(ids) + 1, dtype=torch.int64)
            torch.cumsum(lens, 0, out=cu[1:])
            mask = torch.zeros(int(cu[-1]), dtype=torch.bool)
            mask[cu[1:] - 1] = True
            dev = hidden.device
            _, last = self._head(hidden, mask.to(dev), cu.to(dev))  # per row its one step: "last" = the new score
            if self.likelihood_weight:
                last = last * self._likelihood(branches, tokens, hidden, cu.to(dev)) ** self.likelihood_weight
            new = last.cpu()  # the one host read of the step
        for b, s in zip(branches, new.tolist()):
            self._steps[b].append(s)
        if self.likelihood_weight:
            for b, h in zip(branches, hidden[cu[1:] - 1]):
                self._last[b] = h
        self.stats["tokens"] += int(cu[-1])
        self.stats["seconds"] += time.perf_counter() - t0
        chain = torch.tensor([chain_score(self._steps[b], self.aggregate) for b in branches], dtype=torch.float32)
        return new, chain

    def step_scores(self, branch: int) -> list[float]:
        """The branch's step scores so far (its ancestors' included)."""
        self.tree.get(branch)
        return list(self._steps[branch])

    def _check_ids(self, name: str, ids: list[int]) -> None:
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name}: token ids {bad[:4]} outside the PRM's vocabulary [0, {vocab})")

    def _forward(self, branches: list[int], ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ids[i] to branches[i] and run all of them in one forward -> (pre-norm hidden [sum T_i, H], the
        packed token ids [sum T_i])."""
        dev = self.model.device
        starts = [self.tree.get(b).length for b in branches]
        slots = torch.tensor([s for b, row in zip(branches, ids) for s in self.tree.append(b, row)], device=dev)
        for b in branches:
            self.tree.trim(b)
        table, num_pages = self.tree.block_table(branches)
        qlens = np.array([len(r) for r in ids])
        self.attn.plan(table, self.tree.lengths(branches), query_lens=qlens, num_pages=num_pages)
        positions = torch.tensor([p for s, n in zip(starts, qlens) for p in range(s, s + n)], device=dev)
        tokens = torch.tensor([t for row in ids for t in row], device=dev)

        def attend(layer, q, k, v):
            self.pool.write(layer, slots, k, v)
            return self.attn.run(q, self.pool.k[layer], self.pool.v[layer], sm_scale=self.sm_scale)

        hidden = self.model.run_layers(tokens, positions, attend)
        self.stats["forwards"] += 1
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.kv_bytes())
        return hidden, tokens

    def _likelihood(self, branches: list[int], tokens: torch.Tensor, hidden: torch.Tensor, cu: torch.Tensor):
        """The PRM's LM probability of each row's new tokens (packed `tokens` [T], their hidden [T, H], cu_seqlens
        [B+1]) given its branch -> [B] float32: each token is predicted by the hidden state before it (the branch's last
        one for the first token)."""
        dev = hidden.device
        before = torch.cat([torch.stack([self._last[b] for b in branches]), hidden])  # branch lasts, then the rows
        n = len(branches)
        position = torch.arange(hidden.shape[0], device=dev)
        row = torch.repeat_interleave(torch.arange(n, device=dev), cu[1:] - cu[:-1])
        source = torch.where(position == cu[:-1][row], row, n + position - 1)  # a row's first token: its branch's last
        logp = torch.log_softmax(self.model.logits(before[source]), dim=-1)
        per_token = logp.gather(1, tokens[:, None])[:, 0]
        return torch.zeros(n, device=dev).index_add_(0, row, per_token).exp()

    def _head(self, hidden, mask, cu):
        """Packed pre-norm hidden [T, H], step mask [T], cu_seqlens [B+1] -> step_rewards' (step_scores [T], chain
        [B]) with the reward head or the format's LM-head token pair, final norm fused."""
        model = self.model
        if self.fmt.token_pair is None:
            head, spec = model.reward_head, model.config.reward_head
            return step_rewards(hidden, mask, head.out.weight, head.out.bias, norm_weight=model.model.norm.weight,
                                norm_eps=model.config.rms_norm_eps,
                                mlp_weight=None if head.mlp is None else head.mlp.weight,
                                mlp_bias=None if head.mlp is None else head.mlp.bias,
                                activation=spec["activation"], positive_index=spec["positive_index"],
                                aggregate="last", cu_seqlens=cu, backend=self.backend)
        return step_rewards(hidden, mask, model.lm_head.weight[list(self.fmt.token_pair)],
                            norm_weight=model.model.norm.weight, norm_eps=model.config.rms_norm_eps,
                            activation="softmax", positive_index=0, aggregate="last", cu_seqlens=cu,
                            backend=self.backend)

    def kv_bytes(self) -> int:
        return self.pool.kv_bytes()

    def kv_bytes_naive(self) -> int:
        return self.tree.live_tokens() * self.pool.bytes_per_token


class PRMScoredDecoder:
    """Policy decoder whose step scores come from a PRMScorer (see the module docstring).

    policy: TreeDecoder or NaiveDecoder; scorer: a PRMScorer (or a Transformer, scored with RewardHeadFormat over the
    policy's ids); tokenizer: the policy's tokenizer (decode(ids) -> text), needed when the scorer's format reads
    text.
    """

    def __init__(self, policy, scorer, *, tokenizer=None):
        if not isinstance(getattr(policy, "model", None), Transformer):
            raise TypeError(f"policy must be a decoder of o1kernels.decoder (TreeDecoder, NaiveDecoder), "
                            f"got {type(policy).__name__}")
        if isinstance(scorer, Transformer):
            scorer = PRMScorer(scorer, backend=getattr(policy, "backend", "auto"))
        if not isinstance(scorer, PRMScorer):
            raise TypeError(f"scorer must be a PRMScorer or a Transformer, got {type(scorer).__name__}")
        if scorer.fmt.reads_text and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer: {type(scorer.fmt).__name__} reads text, give the policy's tokenizer "
                             "(decode(ids) -> text)")
        if not scorer.fmt.reads_text and scorer.model.config.vocab_size < policy.model.config.vocab_size:
            raise ValueError(f"the PRM's vocabulary ({scorer.model.config.vocab_size} tokens) is smaller than the "
                             f"policy's ({policy.model.config.vocab_size}): a PRM reading the policy's ids must share "
                             "its tokenizer (or use a format with the PRM's own tokenizer)")
        self.policy, self.scorer, self.tokenizer = policy, scorer, tokenizer
        self.model = policy.model
        self._twin: dict[int, int] = {}  # policy branch -> PRM branch

    @property
    def stats(self) -> dict:
        return self.policy.stats

    def _text(self, ids):
        return self.tokenizer.decode(ids) if self.scorer.fmt.reads_text else list(ids)

    def add_prompt(self, prompt_ids) -> int:
        branch = self.policy.add_prompt(prompt_ids)
        try:
            self._twin[branch] = self.scorer.add_prompt(self._text(prompt_ids))
        except BaseException:
            self.policy.release(branch)
            raise
        return branch

    def fork(self, branch: int, n: int) -> list[int]:
        kids = self.policy.fork(branch, n)
        for kid, twin in zip(kids, self.scorer.fork(self._twin[branch], n)):
            self._twin[kid] = twin
        return kids

    def release(self, branch: int) -> None:
        self.policy.release(branch)
        self.scorer.release(self._twin.pop(branch))

    def tokens(self, branch: int) -> list[int]:
        return self.policy.tokens(branch)

    def generate_step(self, branches, **kwargs) -> StepOutput:
        """policy.generate_step(branches, **kwargs), every branch's step scored in one PRM forward."""
        out = self.policy.generate_step(branches, **kwargs)
        if not out.new_tokens:
            return out
        scores, _ = self.scorer.score([self._twin[b] for b in branches], [self._text(t) for t in out.new_tokens])
        return StepOutput(out.new_tokens, scores.tolist(), out.finished)

    def kv_bytes(self) -> int:
        """KV bytes of the policy and the PRM together."""
        return self.policy.kv_bytes() + self.scorer.kv_bytes()

    def kv_bytes_naive(self) -> int:
        return self.policy.kv_bytes_naive() + self.scorer.kv_bytes_naive()
