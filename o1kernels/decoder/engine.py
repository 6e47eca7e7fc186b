"""TreeDecoder: batched decoding of search branches over a shared paged KV cache, on our kernels.

Every attention runs through o1kernels.paged.PagedAttention over the branches' block tables (KVTree rows: a fork
shares the full pages and copies the partial last one), which finds the shared pages itself.
Decode (generate_step): o1kernels/decoder/runner.py runs the step on the device -- per token, sampling (greedy or
seeded, o1kernels/decoder/sampling.py), Transformer.run_layers with an attention callback that writes each layer's
k/v into the pool at device-provided slots and runs the bucket's capture-stable PagedAttention (laid out in place
once per step, lengths grown on the device), and stop detection on the device; on a GPU as the replay of a CUDA
graph per batch bucket. The host reads the stop flag every `tokens_per_check` tokens and the step's tokens once at
its end.
Prefill and teacher_force: one chunk of new tokens on one branch, causal inside the chunk and over what the branch
held before, in one PagedAttention call.
Rewards: the reward head at each step's last token via o1kernels.step_rewards on the pre-norm hidden states of the
decode forward (no second forward).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from o1kernels._backend import resolve_backend
from o1kernels._checks import check_fits_memory
from o1kernels.paged import KVBudget, KVTree, PagedAttention, PagedKVPool
from o1kernels.tree_attention import SUPPORTED_BACKENDS

from .model import Transformer
from .runner import DEFAULT_BUCKETS, DecodeRunner
from .sampling import draw_step_seed


@dataclass
class StepOutput:
    new_tokens: list[list[int]]  # per branch, this step's tokens
    step_scores: list[float | None]  # per branch, PRM reward of the step (None without a reward head)
    finished: list[bool]  # per branch, emitted eos_id


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


class SearchDecoder:
    """What TreeDecoder and NaiveDecoder share: argument checks, atomic operations, the step's output and stats.

    Subclasses store the KV and implement _prefill, _teacher_force, _generate_step, _score, _store_atomic,
    _branch_table, _check_step_fits, fork, release, tokens, kv_bytes, kv_bytes_naive. Both sample with
    o1kernels.decoder.sampling (one seed per step from the generator), so they draw the same tokens from the same
    logits.

    add_prompt, fork, teacher_force and generate_step are atomic: if one raises (the KV store out of pages or
    memory, an error in the model), the KV store, the branch table and each branch's last hidden state are as
    they were before the call (generate_step also restores the generator's state).
    """

    def __init__(self, model: Transformer):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be an o1kernels.decoder.Transformer, got {type(model).__name__}")
        if model.reward_head is not None and model.config.reward_head["likelihood_weight"]:
            raise ValueError("model: its reward head's scores include the step's likelihood (likelihood_weight "
                             f"{model.config.reward_head['likelihood_weight']}), which only a PRMScorer computes: "
                             "score with it as a separate PRM (PRMScoredDecoder), not as a policy's own head")
        self.model = model
        self._last_hidden: dict[int, torch.Tensor] = {}  # branch -> pre-norm hidden [H] of its last token
        # host_syncs: reads of device values by the decode loop (per token in the naive loop; per
        # tokens_per_check tokens + once per step in TreeDecoder's)
        self.stats = {"tokens_generated": 0, "decode_seconds": 0.0, "decode_iterations": 0, "steps": 0,
                      "prefill_tokens": 0, "prefill_seconds": 0.0, "plans_built": 0, "peak_kv_bytes": 0,
                      "host_syncs": 0, "graph_captures": 0, "decode_plans": 0}

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

    def _step_output(self, t0: float, new_tokens: list[list[int]], scores: list[float] | None,
                     eos_id: int | None) -> StepOutput:
        """Count the step into stats (decode time since t0) and package it."""
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self.stats["tokens_generated"] += sum(len(t) for t in new_tokens)
        self.stats["steps"] += 1
        finished = [eos_id is not None and t[-1] == eos_id for t in new_tokens]
        return StepOutput(new_tokens, scores if scores is not None else [None] * len(new_tokens), finished)

    @torch.no_grad()
    def warm_up(self, prompt_ids, batch_sizes, *, max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0) -> float:
        """Run each decode path once, on a throwaway copy of `prompt_ids`, for every batch size in `batch_sizes`:
        prefill, fork, a one-token teacher_force and a step with the given sampling settings that
        reserves max_new_tokens per branch and stops after one token (every token is a stop token). On a GPU this
        compiles the Triton kernels and captures the decode graph of each batch bucket, with the step's pages
        reserved as a real step would, so the first timed step does neither. Everything is released afterwards and
        the decode statistics are left as they were. Returns the seconds it took."""
        t0 = time.perf_counter()
        saved = {k: v for k, v in self.stats.items() if k not in ("plans_built", "decode_plans", "graph_captures")}
        root = self.add_prompt(prompt_ids)
        every_token = range(self.model.config.vocab_size)
        for n in batch_sizes:
            kids = self.fork(root, n)
            self.teacher_force(kids[0], list(prompt_ids[-1:]))
            self.generate_step(kids, max_new_tokens=max_new_tokens, stop_ids=every_token, temperature=temperature,
                               top_p=top_p, generator=torch.Generator().manual_seed(0))
            for k in kids:
                self.release(k)
        self.release(root)
        self._sync()
        self.stats.update(saved)
        return time.perf_counter() - t0

    def tokens_per_second(self) -> float:
        return self.stats["tokens_generated"] / self.stats["decode_seconds"] if self.stats["decode_seconds"] else 0.0


class TreeDecoder(SearchDecoder):
    """Search branches over one paged, reference-counted KV pool, attention by o1kernels.tree_attention.

    page_size: tokens per KV page; num_pages: fixed pool size (None: grow on demand; with CUDA graphs a grown pool
    means capturing again, so give a fixed size where you can); backend: of tree_attention (resolved once here),
    merge_states and step_rewards.
    cuda_graphs: run each decode iteration as the replay of a CUDA graph captured per batch bucket and sampling mode
    (default: on for a CUDA model whose attention backend is not torch; the torch reference is not capturable).
    batch_buckets: increasing batch sizes a step's branches are padded up to (default: DEFAULT_BUCKETS with graphs,
    no padding without). Padding takes one scratch page from the pool (not counted by kv_bytes).
    tokens_per_check: decode iterations between host reads of the stop flag (default 8 on a GPU, where a read is a
    device sync; 1 on the CPU, where it is a read of host memory and stops the step as soon as all rows are done).
    on_capture(message): called before each graph capture (the CLI prints it, so a first GPU run shows progress).
    compile_layers: torch.compile each layer's halves around its attention and the logits (fuses the decode
    iteration's many small kernels; compiled on the first decode step, once for all layers and batch sizes).
    kv_budget: an o1kernels.paged.KVBudget its pool shares (with a PRMScorer's: one memory budget), or None.
    """

    def __init__(self, model: Transformer, *, backend: str = "auto", page_size: int = 16,
                 num_pages: int | None = None, cuda_graphs: bool | None = None, batch_buckets=None,
                 tokens_per_check: int | None = None, on_capture=None, compile_layers: bool = False,
                 kv_budget: KVBudget | None = None):
        super().__init__(model)
        cfg = model.config
        device = model.device
        attention = resolve_backend(backend, device, SUPPORTED_BACKENDS)  # a bad or unavailable backend fails here
        self.backend = backend
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and attention != "torch"
        elif not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool or None, got {type(cuda_graphs).__name__}")
        elif cuda_graphs and (device.type != "cuda" or attention == "torch"):
            raise ValueError(f"cuda_graphs=True needs a CUDA model and an attention backend other than torch, got "
                             f"device {device} and backend {attention!r}")
        if batch_buckets is None:
            batch_buckets = DEFAULT_BUCKETS if cuda_graphs else None
        else:
            batch_buckets = _check_buckets(batch_buckets)
        if not isinstance(compile_layers, bool):
            raise TypeError(f"compile_layers must be a bool, got {type(compile_layers).__name__}")
        if tokens_per_check is None:
            tokens_per_check = 8 if device.type == "cuda" else 1
        elif isinstance(tokens_per_check, bool) or not isinstance(tokens_per_check, int) or tokens_per_check < 1:
            raise ValueError(f"tokens_per_check must be a positive integer, got {tokens_per_check!r}")
        self.pool = PagedKVPool(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, page_size=page_size,
                                num_pages=num_pages, dtype=model.dtype, device=device, budget=kv_budget)
        self.tree = KVTree(self.pool)
        self.sm_scale = cfg.head_dim ** -0.5
        self._chunk_attn = PagedAttention(page_size, (cfg.num_attention_heads, cfg.num_key_value_heads), cfg.head_dim,
                                          device=device, backend=backend, dtype=model.dtype)
        self._scratch_pages = self.pool.alloc(1) if cuda_graphs or batch_buckets is not None else []
        self.runner = DecodeRunner(model, self.pool, attention, cuda_graphs=cuda_graphs, buckets=batch_buckets,
                                   tokens_per_check=tokens_per_check,
                                   scratch_slot=self._scratch_pages[0] * page_size if self._scratch_pages else None,
                                   stats=self.stats, on_capture=on_capture, compile_layers=compile_layers)

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
        return branch, self._forward_chunk(branch, ids)[-1]

    def _generate_step(self, branches, max_new_tokens, stop, eos_id, temperature, top_p, generator) -> StepOutput:
        """Reserve the step's pages, run it on the device (runner), then append its tokens to the tree (their K/V
        is already in the pool) and free the unused reservation."""
        t0 = time.perf_counter()
        self.tree.reserve_all(branches, max_new_tokens)
        self._note_kv()
        seed = draw_step_seed(generator, self.model.device) if temperature > 0 else None
        hidden = torch.stack([self._last_hidden[b] for b in branches])
        score = self._score if self.model.reward_head is not None else None
        result = self.runner.step(self.tree, branches, hidden, max_new_tokens, stop, float(temperature),
                                  float(top_p), seed, score)
        for i, b in enumerate(branches):
            self.tree.append(b, result.tokens[i])
            self.tree.trim(b)
            self._last_hidden[b] = result.hidden[i]
        return self._step_output(t0, result.tokens, result.scores, eos_id)

    def _teacher_force(self, branch: int, ids: list[int]) -> torch.Tensor:
        return self._forward_chunk(branch, ids)

    def _forward_chunk(self, branch: int, ids: list[int]) -> torch.Tensor:
        """Append `ids` to the branch and run them through the model in one forward (causal inside the chunk, over
        what the branch held before too); returns their pre-norm hidden states [T, H]."""
        dev = self.model.device
        start = self.tree.get(branch).length
        slots = torch.tensor(self.tree.append(branch, ids), device=dev)
        self.tree.trim(branch)
        table, num_pages = self.tree.block_table([branch])
        self._chunk_attn.plan(table, np.array([start + len(ids)]), query_lens=[len(ids)], num_pages=num_pages)
        self.stats["plans_built"] += 1

        def attend(layer, q, k, v):
            self.pool.write(layer, slots, k, v)
            return self._chunk_attn.run(q, self.pool.k[layer], self.pool.v[layer], sm_scale=self.sm_scale)

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
        """Bytes of the KV pages branches reference now (the padding rows' scratch page left out)."""
        return self.pool.kv_bytes() - len(self._scratch_pages) * self.pool.bytes_per_page

    def kv_bytes_naive(self) -> int:
        return self.tree.live_tokens() * self.pool.bytes_per_token


def _check_buckets(buckets) -> tuple[int, ...]:
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
        raise TypeError(f"batch_buckets must be a sequence of batch sizes, got {type(buckets).__name__}")
    sizes = tuple(buckets)
    if (not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes)
            or list(sizes) != sorted(set(sizes))):
        raise ValueError(f"batch_buckets must be increasing positive integers, got {buckets!r}")
    return sizes
