"""TreeDecoder: batched decoding of search branches over a shared paged KV cache, on our kernels.

Data path per decode iteration (one new token per active branch, all branches batched into one forward):
  sample from the branches' last logits -> append the tokens to their tails in the KVTree (pages reserved at step
  start) -> Transformer.run_layers with an attention callback that writes each layer's k/v into the pool and runs
  o1kernels.tree_attention over the branches' segments. The TreeAttentionPlan (segments = the distinct Segments of
  the branches' chains; the shared prompt is one segment read by every branch) is rebuilt only when the tree
  changes: fork, release, new pages, or a different set of decoding branches (step start, a branch finishing its
  step). Between rebuilds each tail's growth is passed in with plan.set_lengths.
Prefill: causal SDPA over the prompt, its k/v written to pages. teacher_force: tree_attention over the branch's
segments (return_lse=True) + causal attention inside the chunk, merged with o1kernels.merge_states.
Rewards: the reward head at each step's last token via o1kernels.step_rewards on the pre-norm hidden states of the
decode forward (no second forward).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from o1kernels._backend import resolve_backend
from o1kernels._checks import check_fits_memory
from o1kernels.merge_states import merge_states
from o1kernels.tree_attention import SUPPORTED_BACKENDS, TreeAttentionPlan, tree_attention

from .kv_cache import KVTree, PagedKVPool
from .model import Transformer


@dataclass
class StepOutput:
    new_tokens: list[list[int]]  # per branch, this step's tokens
    step_scores: list[float | None]  # per branch, PRM reward of the step (None without a reward head)
    finished: list[bool]  # per branch, emitted eos_id


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64 (argmax when temperature == 0, else nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def causal_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float):
    """Causal attention inside one chunk: q [T, Hq, D], k, v [T, Hkv, D] -> (o [T, Hq, D] q.dtype, lse [T, Hq] f32)."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) * sm_scale
    t = q.shape[0]
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, T], finite: every row sees its own token
    o = torch.einsum("hts,shd->thd", torch.exp(scores - lse[..., None]), vf)
    return o.to(q.dtype), lse.transpose(0, 1).contiguous()


def _check_token_ids(name: str, tokens, vocab_size: int, *, allow_empty: bool = False) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"{name} must be a list of token ids, got {type(tokens).__name__}")
    tokens = list(tokens)
    if not tokens and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"{name}[{i}] must be a token id in [0, {vocab_size}), got {t!r}")
    return tokens


def plan_segments(tree: KVTree, branches: list[int], rows_per_branch: int = 1):
    """TreeAttentionPlan segments for query rows laid out branch by branch (`rows_per_branch` consecutive rows per
    branch): (segments, [the tree's Segment behind each plan segment]). A Segment shared by several branches is one
    plan segment listing all their rows; segments without pages are left out."""
    index: dict[int, int] = {}
    segs, owners = [], []
    for qi, b in enumerate(branches):
        rows = range(qi * rows_per_branch, (qi + 1) * rows_per_branch)
        for seg in tree.get(b).chain():
            if not seg.pages:
                continue
            s = index.setdefault(id(seg), len(segs))
            if s == len(segs):
                segs.append((seg.pages, seg.length, []))
                owners.append(seg)
            segs[s][2].extend(rows)
    return segs, owners


class SearchDecoder:
    """What TreeDecoder and NaiveDecoder share: the batched step loop, sampling, argument checks and stats.

    Subclasses store the KV and implement _prefill, _decode, _teacher_force, _score, _begin_step, _end_step,
    _store_atomic, _branch_table, _check_step_fits, fork, release, tokens, kv_bytes, kv_bytes_naive.

    add_prompt, fork, teacher_force and generate_step are atomic: if one raises (the KV store out of pages or
    memory, an error in the model), the KV store, the branch table and each branch's last hidden state are as
    they were before the call (generate_step also restores the generator's state).
    """

    def __init__(self, model: Transformer):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be an o1kernels.decoder.Transformer, got {type(model).__name__}")
        self.model = model
        self._last_hidden: dict[int, torch.Tensor] = {}  # branch -> pre-norm hidden [H] of its last token
        self.stats = {"tokens_generated": 0, "decode_seconds": 0.0, "decode_iterations": 0, "steps": 0,
                      "prefill_tokens": 0, "prefill_seconds": 0.0, "plans_built": 0, "peak_kv_bytes": 0}

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _note_kv(self) -> None:
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.kv_bytes())

    @contextmanager
    def _atomic(self, branches=(), generator: torch.Generator | None = None):
        """Undo the block's changes to the KV store, the branches' last hidden states and the generator's state if
        it raises; `branches`: the existing branches it may change."""
        hidden = {b: self._last_hidden[b] for b in branches if b in self._last_hidden}
        generator_state = None if generator is None else generator.get_state()
        try:
            with self._store_atomic(branches):
                yield
        except BaseException:
            live = self._branch_table()
            for b in [b for b in self._last_hidden if b not in live]:
                del self._last_hidden[b]
            self._last_hidden.update(hidden)
            if generator is not None:
                generator.set_state(generator_state)
            raise

    @torch.no_grad()
    def add_prompt(self, prompt_ids) -> int:
        """Prefill a prompt (causal attention) and return the id of its root branch."""
        ids = _check_token_ids("prompt_ids", prompt_ids, self.model.config.vocab_size)
        t0 = time.perf_counter()
        with self._atomic():
            branch, hidden = self._prefill(ids)
            self._last_hidden[branch] = hidden
        self._sync()
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] += len(ids)
        self._note_kv()
        return branch

    @torch.no_grad()
    def teacher_force(self, branch: int, tokens) -> torch.Tensor:
        """Append a chunk of given tokens to `branch`; return the logits after each of them [T, V] float32."""
        self._check_branches([branch])
        ids = _check_token_ids("tokens", tokens, self.model.config.vocab_size)
        with self._atomic([branch]):
            hidden = self._teacher_force(branch, ids)
            self._last_hidden[branch] = hidden[-1]
        self._note_kv()
        return self.model.logits(hidden)

    def last_hidden(self, branch: int) -> torch.Tensor:
        """Pre-norm hidden state [H] of the branch's last token (what its next logits and a step reward read)."""
        self._check_branches([branch])
        return self._last_hidden[branch]

    def _check_branches(self, branches) -> list[int]:
        if isinstance(branches, (str, bytes)) or not hasattr(branches, "__iter__"):
            raise TypeError(f"branches must be a list of branch ids, got {type(branches).__name__}")
        branches = list(branches)
        for b in branches:
            self._branch(b)
        if len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct, got {branches}")
        return branches

    @torch.no_grad()
    def generate_step(self, branches, *, max_new_tokens: int, stop_ids=frozenset(), eos_id: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> StepOutput:
        """Generate one reasoning step on every branch, batched.

        Each branch samples (greedy when temperature == 0) until it emits a token in stop_ids or eos_id (kept in its
        tokens) or reaches max_new_tokens. Every emitted token is fed through the model, so the step's last token is
        in the KV cache and its hidden state gives the step reward (models with a reward head) and the next logits.
        """
        branches = self._check_branches(branches)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
            raise TypeError(f"stop_ids must be a set of token ids, got {type(stop_ids).__name__}")
        stop = set(stop_ids)
        if eos_id is not None:
            stop.add(eos_id)
        _check_token_ids("stop_ids (with eos_id)", sorted(stop, key=str), self.model.config.vocab_size,
                         allow_empty=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self._check_step_fits(branches, max_new_tokens)
        with self._atomic(branches, generator):
            return self._generate_step(branches, max_new_tokens, stop, eos_id, temperature, top_p, generator)

    def _generate_step(self, branches, max_new_tokens, stop, eos_id, temperature, top_p, generator) -> StepOutput:
        """generate_step after its argument checks."""
        t0 = time.perf_counter()
        n = len(branches)
        new_tokens: list[list[int]] = [[] for _ in range(n)]
        finished = [False] * n
        end_hidden: list[torch.Tensor | None] = [None] * n
        active = list(range(n))
        self._begin_step(branches, max_new_tokens)
        while active:
            act = [branches[i] for i in active]
            logits = self.model.logits(torch.stack([self._last_hidden[b] for b in act]))
            toks = sample_tokens(logits, float(temperature), float(top_p), generator).tolist()
            hidden = self._decode(act, toks)
            self.stats["decode_iterations"] += 1
            still = []
            for j, i in enumerate(active):
                self._last_hidden[branches[i]] = hidden[j]
                new_tokens[i].append(toks[j])
                finished[i] = eos_id is not None and toks[j] == eos_id
                if toks[j] in stop or len(new_tokens[i]) >= max_new_tokens:
                    end_hidden[i] = hidden[j]
                else:
                    still.append(i)
            active = still
            self._note_kv()
        self._end_step(branches)
        scores: list[float | None] = [None] * n
        if self.model.reward_head is not None and n:
            scores = self._score(torch.stack(end_hidden)).tolist()
        self._sync()
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self.stats["tokens_generated"] += sum(len(t) for t in new_tokens)
        self.stats["steps"] += 1
        return StepOutput(new_tokens, scores, finished)

    def tokens_per_second(self) -> float:
        return self.stats["tokens_generated"] / self.stats["decode_seconds"] if self.stats["decode_seconds"] else 0.0


class TreeDecoder(SearchDecoder):
    """Search branches over one paged, reference-counted KV pool, attention by o1kernels.tree_attention.

    page_size: tokens per KV page; num_pages: fixed pool size (None: grow on demand); backend: passed to
    tree_attention, merge_states and step_rewards.
    """

    def __init__(self, model: Transformer, *, backend: str = "auto", page_size: int = 16,
                 num_pages: int | None = None):
        super().__init__(model)
        cfg = model.config
        resolve_backend(backend, model.device, SUPPORTED_BACKENDS)  # a bad or unavailable backend fails here
        self.backend = backend
        self.pool = PagedKVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, page_size=page_size,
                                num_pages=num_pages, dtype=model.dtype, device=model.device)
        self.tree = KVTree(self.pool)
        self.sm_scale = cfg.head_dim ** -0.5
        self._plan: TreeAttentionPlan | None = None
        self._plan_key = None
        self._plan_tails: list = []  # tail Segment of each plan segment that grows (None for frozen ones)

    def _branch(self, branch):
        return self.tree.get(branch)

    def _branch_table(self):
        return self.tree.branches

    def _store_atomic(self, branches):
        return self.tree.atomic(branches)

    def _check_step_fits(self, branches, max_new_tokens):
        """A growable pool must be able to grow by the step's reservation (a fixed one raises KVPoolExhausted)."""
        if self.pool.growable:
            short = self.tree.pages_to_reserve(branches, max_new_tokens) - self.pool.free_pages
            check_fits_memory("max_new_tokens", short * self.pool.bytes_per_page, self.model.device,
                              f"room for {max_new_tokens} new tokens on each of {len(branches)} branches")

    def _prefill(self, ids: list[int]):
        branch = self.tree.new_branch()
        slots = torch.tensor(self.tree.append(branch, ids), device=self.model.device)
        t = len(ids)

        def attend(layer, q, k, v):
            self.pool.write(layer, slots, k, v)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return o.squeeze(0).transpose(0, 1)

        dev = self.model.device
        hidden = self.model.run_layers(torch.tensor(ids, device=dev), torch.arange(t, device=dev), attend)
        return branch, hidden[-1]

    def _segments_of(self, branches: list[int], rows_per_branch: int = 1):
        return plan_segments(self.tree, branches, rows_per_branch)

    def _decode_plan(self, branches: list[int]) -> TreeAttentionPlan:
        key = (tuple(branches), self.tree.version)
        if key != self._plan_key:
            segs, self._plan_tails = self._segments_of(branches)
            self._plan = TreeAttentionPlan(segs, len(branches), self.pool.page_size, device=self.model.device)
            self._plan_key = key
            self.stats["plans_built"] += 1
        else:
            self._plan.set_lengths([seg.length for seg in self._plan_tails])
        return self._plan

    def _begin_step(self, branches, max_new_tokens):
        self.tree.reserve_all(branches, max_new_tokens)
        self._note_kv()

    def _end_step(self, branches):
        for b in branches:
            self.tree.trim(b)

    def _decode(self, branches: list[int], toks: list[int]) -> torch.Tensor:
        dev = self.model.device
        positions = torch.tensor([self.tree.get(b).length for b in branches], device=dev)
        slots = torch.tensor([s for b, t in zip(branches, toks) for s in self.tree.append(b, [t])], device=dev)
        plan = self._decode_plan(branches)

        def attend(layer, q, k, v):
            self.pool.write(layer, slots, k, v)
            return tree_attention(q, self.pool.k[layer], self.pool.v[layer], plan, sm_scale=self.sm_scale,
                                  backend=self.backend)

        return self.model.run_layers(torch.tensor(toks, device=dev), positions, attend)

    def _teacher_force(self, branch: int, ids: list[int]) -> torch.Tensor:
        dev = self.model.device
        start = self.tree.get(branch).length
        segs, _ = self._segments_of([branch], rows_per_branch=len(ids))
        plan = TreeAttentionPlan(segs, len(ids), self.pool.page_size, device=dev)  # context only: before the append
        self.stats["plans_built"] += 1
        slots = torch.tensor(self.tree.append(branch, ids), device=dev)
        self.tree.trim(branch)

        def attend(layer, q, k, v):
            self.pool.write(layer, slots, k, v)
            o_ctx, lse_ctx = tree_attention(q, self.pool.k[layer], self.pool.v[layer], plan, sm_scale=self.sm_scale,
                                            return_lse=True, backend=self.backend)
            o_new, lse_new = causal_attention_with_lse(q, k, v, self.sm_scale)
            return merge_states(o_ctx, lse_ctx, o_new, lse_new, backend=self.backend)[0]

        return self.model.run_layers(torch.tensor(ids, device=dev), torch.arange(start, start + len(ids), device=dev),
                                     attend)

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [B, H] of each step's last token -> rewards [B] float32 (fused step_rewards)."""
        mask = torch.ones(hidden.shape[0], 1, dtype=torch.bool, device=hidden.device)
        step_scores, _ = self.model.step_rewards(hidden.unsqueeze(1), mask, aggregate="last", backend=self.backend)
        return step_scores[:, 0]

    def fork(self, branch: int, n: int) -> list[int]:
        """n children sharing `branch`'s KV read-only (no copy); the parent stays alive until released."""
        with self._atomic([branch]):
            children = self.tree.fork(branch, n)
            for c in children:
                self._last_hidden[c] = self._last_hidden[branch]
        return children

    def release(self, branch: int) -> None:
        """Drop the branch; its pages are freed when no other branch references them."""
        self.tree.release(branch)
        del self._last_hidden[branch]

    def tokens(self, branch: int) -> list[int]:
        return self.tree.tokens(branch)

    def kv_bytes(self) -> int:
        return self.pool.kv_bytes()

    def kv_bytes_naive(self) -> int:
        return self.tree.live_tokens() * self.pool.bytes_per_token
