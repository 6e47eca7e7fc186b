"""DecodeRunner: TreeDecoder's generate_step on the device. One decode iteration (sample -> embedding -> layers
with K/V written into the pool and PagedAttention on a capture-stable plan -> stop bookkeeping) runs on static
buffers per batch bucket, eagerly or as the replay of a CUDA graph captured once per (bucket, sampling mode).

Per step (n branches, at most M new tokens each; the caller has reserved the pages for M tokens per branch):
  host, once: pad n up to a bucket of B rows; hand the rows' block tables (their pages, the reservation included)
  to the bucket's PagedAttention, which finds the sharing and lays it out in place (same tensors, so the graphs
  stay valid) or, when the batch outgrew them, into new ones twice the size (and the graphs are captured again);
  upload the step's inputs in one host-to-device copy: positions, the rows' lengths before the step, the stop-token
  mask, and the K/V slot of every (token, row).
  per token: copy the token's slots into the slot buffer, run the iteration (or replay its graph), copy the
  sampled tokens out. Every `tokens_per_check` tokens the host reads one flag (all rows done?): with stop tokens
  these are the step's only host syncs before the final read of tokens, counts and step scores (one sync);
  without stop tokens the step has that one sync alone.
Rows 0..n-1 are the branches, rows n..B-1 padding: rows of one token in a scratch page (their own K/V slot) that
no branch reads. A row is done after a stop token or M tokens; done rows keep computing
(the batch has one shape) but change nothing anyone reads: their hidden state, count and segment length are frozen,
and their K/V lands in their own reserved slots past their final length, which no plan reads and the next step
overwrites before its attention reads them.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from o1kernels.paged import KVTree, PagedAttention, PagedKVPool

from .model import DecoderLayer, Transformer
from .sampling import host_to_device, row_uniforms, sample_tokens

# Batch buckets of captured graphs (vLLM-like: dense at small sizes, where decode is bound by reading the weights
# and padding is nearly free). Beyond the largest, rows are padded to a multiple of it.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
EAGER_BUCKETS_KEPT = 8  # eager mode keeps the plans and buffers of this many recent batch sizes
COMPILE_BACKEND = "inductor"  # of compile_layers (the CPU test traces with "eager": Inductor's C++ build takes ~30 s)


def pad_rows(n: int, buckets: tuple[int, ...] | None) -> int:
    """Rows a step of n branches runs with: the smallest bucket >= n (None: n itself)."""
    if buckets is None:
        return n
    for size in buckets:
        if size >= n:
            return size
    return -(-n // buckets[-1]) * buckets[-1]


@functools.lru_cache(maxsize=None)
def compile_rows_dynamic(fn: Callable) -> Callable:
    """torch.compile(fn) with only dim 0 (rows) of its tensor arguments dynamic: one compilation serves every batch
    size >= 2 (and every layer: modules are inlined, their parameters become inputs). dynamic=True would also make
    head counts and widths symbols, and duck sizing then specializes a batch size that equals one of them. Cached:
    every decoder of the process shares the compiled code."""
    compiled = torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args)

    return call


def capture_graph(fn: Callable[[], None], device: torch.device, pool) -> torch.cuda.CUDAGraph:
    """Run fn once on a side stream (Triton compilation, lazy allocations, library handles), then capture one call
    of it into a CUDA graph whose memory comes from `pool` (shared by all of a runner's graphs: they write their
    results into static buffers and never run concurrently)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


@dataclass
class StepResult:
    tokens: list[list[int]]  # per branch, the step's tokens
    hidden: torch.Tensor  # [n, H] pre-norm hidden state of each branch's last token (a copy)
    scores: list[float] | None  # per branch, score(hidden), when a score function was given


@dataclass(eq=False)
class Bucket:
    """Static buffers of one padded batch size and the capture-stable PagedAttention its graphs read.

    tokens, positions, count [B] int64; done [B] bool; hidden [B, H] (model dtype); slots [B] int64 (this token's
    K/V slots); base [B] int64 (each row's length before the step: row i holds base[i] + count[i] tokens, + 1 while
    it is active, the token being fed); stop_mask [V] bool; max_new [1] int64; seed [1] int64; temperature, top_p
    [1] float32; row_ids [B] = arange(B) (sampling's row index)."""

    rows: int
    attn: PagedAttention
    tokens: torch.Tensor
    positions: torch.Tensor
    count: torch.Tensor
    done: torch.Tensor
    hidden: torch.Tensor
    slots: torch.Tensor
    base: torch.Tensor
    stop_mask: torch.Tensor
    max_new: torch.Tensor
    seed: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    row_ids: torch.Tensor
    graphs: dict = field(default_factory=dict)  # mode -> torch.cuda.CUDAGraph
    pool_key: tuple = ()  # the pool tensors the graphs were captured over
    planned: dict = field(default_factory=dict)  # branch -> its row in the last plan (the next plan continues them)


class DecodeRunner:
    """Runs decode steps of a TreeDecoder (see the module docstring).

    cuda_graphs: capture one graph per (bucket, mode) and replay it (CUDA, a backend other than torch);
    buckets: batch sizes rows are padded to (None: no padding); tokens_per_check: tokens between host reads of the
    stop flag; scratch_slot: a pool slot padding rows write to (needed when buckets pad); stats: the decoder's
    stats dict (host_syncs, graph_captures, plans_built and decode_plans -- the bucket plans (new plan tensors)
    among them --, decode_iterations are counted into it);
    on_capture(message): called before a graph is captured (progress for a first run);
    compile_layers: run each layer's halves around its attention (norms, projections, RoPE, MLP) and the logits
    through torch.compile (one compilation serves every layer and batch size; attention stays our kernel).
    """

    def __init__(self, model: Transformer, pool: PagedKVPool, backend: str, *, cuda_graphs: bool,
                 buckets: tuple[int, ...] | None, tokens_per_check: int, scratch_slot: int | None, stats: dict,
                 on_capture: Callable[[str], None] | None = None, compile_layers: bool = False):
        self.model, self.pool, self.backend = model, pool, backend
        self.cuda_graphs, self.buckets, self.tokens_per_check = cuda_graphs, buckets, tokens_per_check
        self.scratch_slot = scratch_slot
        self.stats = stats
        self.on_capture = on_capture
        self.device = model.device
        self.sm_scale = model.config.head_dim ** -0.5
        self._buckets: OrderedDict[int, Bucket] = OrderedDict()
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        # Eager: the model's own functions. Compiled: each layer issues a few fused kernels instead of ~45 small ones
        # (a bf16 Llama layer at decode: norms, 3+1 projections, RoPE, MLP), the launch-bound part of a step.
        self._logits = Transformer.logits
        self._layer_fns = {}
        if compile_layers:
            self._logits = compile_rows_dynamic(Transformer.logits)
            self._layer_fns = {"layer_input": compile_rows_dynamic(DecoderLayer.attention_input),
                               "layer_output": compile_rows_dynamic(DecoderLayer.attention_output)}

    # ---- per step --------------------------------------------------------------------------------------------
    def step(self, tree: KVTree, branches: list[int], hidden: torch.Tensor, max_new_tokens: int, stop: set[int],
             temperature: float, top_p: float, seed: torch.Tensor | None,
             score: Callable[[torch.Tensor], torch.Tensor] | None) -> StepResult:
        """Generate up to max_new_tokens tokens on each branch (hidden [n, H]: their last hidden states; seed [1]
        on the device when temperature > 0). Writes the tokens' K/V into the pool; the caller appends the returned
        tokens to the tree."""
        n = len(branches)
        rows = pad_rows(n, self.buckets)
        bucket = self._bucket(rows, tree, branches)
        mode = "greedy" if temperature == 0 else "top_p" if top_p < 1 else "sample"
        upload, slot_table = self._inputs(tree, branches, bucket, max_new_tokens, stop)
        if self.cuda_graphs and mode not in bucket.graphs:
            self._capture(bucket, mode, upload)
        self._load(bucket, upload, hidden, max_new_tokens, seed, temperature, top_p)
        run_iteration = bucket.graphs[mode].replay if self.cuda_graphs else lambda: self._iteration(bucket, mode)
        out = torch.empty(max_new_tokens, rows, dtype=torch.long, device=self.device)
        check = bool(stop)  # without stop tokens every row runs max_new_tokens: nothing to check
        iterations = max_new_tokens
        for j in range(max_new_tokens):
            bucket.slots.copy_(slot_table[j])
            run_iteration()
            out[j].copy_(bucket.tokens)
            last = j + 1 == max_new_tokens
            if check and not last and (j + 1) % self.tokens_per_check == 0 and self._read(bucket.done.all())[0][0]:
                iterations = j + 1
                break
        self.stats["decode_iterations"] += iterations
        end_hidden = bucket.hidden[:n].clone()
        scores = score(end_hidden) if score is not None else None
        counts, tokens, scores = self._read(bucket.count[:n], out[:iterations, :n].t(), scores)
        counts = [int(c) for c in counts]
        tokens = [[int(t) for t in tokens[i * iterations:i * iterations + c]] for i, c in enumerate(counts)]
        return StepResult(tokens, end_hidden, scores)

    def _read(self, *tensors):
        """The values of the tensors (None: skipped) on the host, each as a flat list of floats: one float64 tensor
        (exact for token ids, counts, flags and float32 scores), ONE transfer and ONE host sync for all of them."""
        self.stats["host_syncs"] += 1
        given = [t for t in tensors if t is not None]
        flat = torch.cat([t.reshape(-1).double() for t in given])
        if self.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            copied.synchronize()
            flat = host
        values, out, start = flat.tolist(), [], 0
        for t in tensors:
            out.append(None if t is None else values[start:start + t.numel()])
            start += 0 if t is None else t.numel()
        return out

    def _inputs(self, tree: KVTree, branches, bucket: Bucket, max_new_tokens: int, stop: set[int]):
        """The step's inputs as one device tensor (one host-to-device copy; views by _load) and the K/V slot table
        [M, B] int64 (row i's token j goes to its position base_i + j; padding rows: the scratch slot)."""
        n, rows, ps = len(branches), bucket.rows, self.pool.page_size
        lengths = torch.from_numpy(tree.lengths(branches))
        width = max(len(tree.get(b).pages) for b in branches)
        pages = torch.tensor([tree.get(b).pages + [0] * (width - len(tree.get(b).pages)) for b in branches],
                             dtype=torch.long)
        pos = lengths[:, None] + torch.arange(max_new_tokens)  # within the reservation made for this step
        table = torch.full((max_new_tokens, rows), -1 if self.scratch_slot is None else self.scratch_slot,
                           dtype=torch.long)
        table[:, :n] = (pages.gather(1, pos // ps) * ps + pos % ps).t()
        positions = torch.zeros(rows, dtype=torch.long)
        positions[:n] = lengths
        base = torch.ones(rows, dtype=torch.long)  # padding: one token (the scratch slot)
        base[:n] = lengths
        done = torch.arange(rows) >= n
        stop_mask = torch.zeros(self.model.config.vocab_size, dtype=torch.long)
        stop_mask[sorted(stop)] = 1
        flat = torch.cat([positions, done.long(), base, stop_mask, table.view(-1)])
        flat = host_to_device(flat, self.device)
        return flat[:-table.numel()], flat[-table.numel():].view(max_new_tokens, rows)

    def _load(self, b: Bucket, upload: torch.Tensor, hidden: torch.Tensor, max_new_tokens: int,
              seed: torch.Tensor | None, temperature: float, top_p: float) -> None:
        """Fill the bucket's static buffers with the step's state (device copies only)."""
        rows, n = b.rows, hidden.shape[0]
        positions, done, base, stop_mask = upload.split([rows, rows, rows, b.stop_mask.shape[0]])
        b.positions.copy_(positions)
        b.done.copy_(done)
        b.base.copy_(base)
        b.stop_mask.copy_(stop_mask)
        b.hidden[:n].copy_(hidden)
        b.hidden[n:].zero_()
        b.tokens.zero_()
        b.count.zero_()
        b.max_new.fill_(max_new_tokens)
        b.temperature.fill_(max(temperature, 1e-6))
        b.top_p.fill_(top_p)
        if seed is not None:
            b.seed.copy_(seed)

    # ---- one decode iteration (the captured region) ------------------------------------------------------------
    def _iteration(self, b: Bucket, mode: str) -> None:
        """Sample each row's next token from its last hidden state, feed it through the model (K/V written at
        b.slots), and update the rows' state. Device ops only: no host sync, no host-dependent shapes."""
        logits = self._logits(self.model, b.hidden)
        if mode == "greedy":
            token = sample_tokens(logits)
        else:
            uniforms = row_uniforms(b.seed, b.row_ids, b.count)
            token = sample_tokens(logits, uniforms, b.temperature, b.top_p if mode == "top_p" else None)
        active = ~b.done
        b.tokens.copy_(token)
        b.attn.set_lengths(b.base + b.count + active)  # the rows' lengths include the token being fed
        hidden = self.model.run_layers(b.tokens, b.positions, lambda layer, q, k, v: self._attend(b, layer, q, k, v),
                                       **self._layer_fns)
        b.hidden.copy_(torch.where(active[:, None], hidden, b.hidden))
        b.count += active
        b.done |= b.stop_mask[token] | (b.count >= b.max_new)
        b.positions += 1

    def _attend(self, b: Bucket, layer: int, q, k, v):
        pool = self.pool
        pool.write(layer, b.slots, k, v)
        return b.attn.run(q, pool.k[layer], pool.v[layer], sm_scale=self.sm_scale)

    def _capture(self, b: Bucket, mode: str, upload: torch.Tensor) -> None:
        """Capture one iteration of `mode` on bucket b. The warm-up run before it (Triton compilation, the plan's
        layout and workspace) and the capture see every row done and writing to the scratch slot, so they change
        no state anyone reads; the caller loads the step's state afterwards."""
        if self.on_capture is not None:
            self.on_capture(f"capturing a CUDA graph of one decode iteration for {b.rows} rows ({mode})")
        self._load(b, upload, b.hidden[:0], 1, None, 1.0, 1.0)
        b.done.fill_(True)
        b.slots.fill_(self.scratch_slot)
        b.graphs[mode] = capture_graph(lambda: self._iteration(b, mode), self.device, self._graph_pool)
        self.stats["graph_captures"] += 1

    # ---- buckets and plans -----------------------------------------------------------------------------------
    def _bucket(self, rows: int, tree: KVTree, branches: list[int]) -> Bucket:
        """The bucket of `rows` rows with the step's block tables laid out in its PagedAttention (in place when they
        fit its tensors; new tensors clear the bucket's graphs)."""
        b = self._buckets.get(rows)
        if b is None:
            b = self._new_bucket(rows)
            self._buckets[rows] = b
        self._buckets.move_to_end(rows)
        if not self.cuda_graphs and len(self._buckets) > EAGER_BUCKETS_KEPT:
            self._buckets.popitem(last=False)
        n = len(branches)
        scratch = [] if self.scratch_slot is None else [self.scratch_slot // self.pool.page_size]
        table, num_pages = tree.block_table(branches, [scratch] * (rows - n))
        seq = np.ones(rows, dtype=np.int64)  # the first token of the step (padding: its scratch slot)
        seq[:n] = tree.lengths(branches) + 1
        continues = [b.planned.get(branch, -1) for branch in branches] + [-1] * (rows - n)  # branches only grow/trim
        b.planned = {branch: i for i, branch in enumerate(branches)}
        if b.attn.plan(table, seq, num_pages=num_pages, continues=continues):
            b.graphs.clear()
            self.stats["decode_plans"] += 1
        self.stats["plans_built"] += 1
        pool_key = (self.pool.k[0].data_ptr(), self.pool.num_pages)
        if pool_key != b.pool_key:  # a pool that grew has new tensors: graphs over the old ones are stale
            b.graphs.clear()
            b.pool_key = pool_key
        return b

    def _new_bucket(self, rows: int) -> Bucket:
        cfg, dev = self.model.config, self.device
        attn = PagedAttention(self.pool.page_size, (cfg.num_attention_heads, cfg.num_key_value_heads), cfg.head_dim,
                              device=dev, backend=self.backend, capture_stable=True, dtype=self.model.dtype)
        long = dict(dtype=torch.long, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        return Bucket(
            rows=rows, attn=attn, tokens=torch.zeros(rows, **long), positions=torch.zeros(rows, **long),
            count=torch.zeros(rows, **long), done=torch.ones(rows, dtype=torch.bool, device=dev),
            hidden=torch.zeros(rows, cfg.hidden_size, dtype=self.model.dtype, device=dev),
            slots=torch.zeros(rows, **long), base=torch.ones(rows, **long),
            stop_mask=torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev), max_new=torch.ones(1, **long),
            seed=torch.zeros(1, **long), temperature=torch.ones(1, **f32), top_p=torch.ones(1, **f32),
            row_ids=torch.arange(rows, **long))
