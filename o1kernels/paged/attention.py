"""PagedAttention: one attention layer for every paged decoder. Block tables in, the sharing found, decode rows
and chunks in one call.

    attn = PagedAttention(page_size=16, num_heads=(32, 8), head_dim=128, device="cuda")
    attn.plan(block_table, seq_lens, query_lens=query_lens)     # once per batch structure (host arrays)
    o = attn.run(q, k_cache, v_cache)                           # per layer
    attn.set_lengths(seq_lens)                                  # next decode step, same pages (device tensor ok)

Input is the paged format engines already keep: a pool `k_cache, v_cache [num_pages, page_size, Hkv, D]`, per row
its pages in token order (a block table [R, W], vLLM's `block_table` + `seq_lens`; or FlashInfer's `kv_indptr` /
`kv_indices`), its KV length `seq_lens[r]` (this call's new tokens included: their K/V are already written) and
its number of new query tokens `query_lens[r]` (1 for decode; more for a chunk, a prefill or a teacher-forced
step; 0 for a row that asks nothing). q packs the rows' queries in row order `[sum(query_lens), Hq, D]`; row r's
j-th query sits at position `seq_lens[r] - query_lens[r] + j` and attends causally: the keys at positions up to its
own, in a sliding window if one is given.

plan() finds, from the page ids alone (o1kernels.paged.sharing), which leading pages groups of rows share -- a
forest: many prompts, each with branches, each with step levels -- and lays those runs out as segments of a
TreeAttentionPlan read once for all their rows; a row's own pages are a segment of its own. Segments index the
wrapper's device copy of the block table, so pages never move between host and device again.

Lifecycle: plan() when the structure changes (a fork, a release, a new page); set_lengths() when only lengths grew
within the rows' pages (device ops, no host sync, capturable in a CUDA graph); run() per layer. With
capture_stable=True the plan lives in fixed-size tensors sized by a dry count (twice what the first batch needs):
later plans are laid out in place, and plan() returns True only when a batch outgrew them (new tensors: capture
again).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from o1kernels._checks import FLOAT_DTYPES, INT32_MAX, check_tensor
from o1kernels.plan import PlanCapacity, SegmentArrays, TreeAttentionPlan, _check_count, plan_device
from o1kernels.tree_attention import tree_attention

from .sharing import find_runs


def _host_ints(name: str, value, length: int | None = None) -> np.ndarray:
    """A 1-D int64 numpy array of a sequence, numpy array or CPU integer tensor (ValueError/TypeError naming it)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU (host planning reads it), got a tensor on {value.device}")
        value = value.numpy()
    arr = np.asarray(value)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{name} must be a 1-D sequence of ints, got {arr.dtype} of shape {list(arr.shape)}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (one per row), got {arr.shape[0]}")
    return arr.astype(np.int64, copy=False)


def _host_table(block_table) -> np.ndarray:
    if isinstance(block_table, torch.Tensor):
        if block_table.device.type != "cpu":
            raise ValueError(f"block_table must be on the CPU (host planning reads it), got a tensor on "
                             f"{block_table.device}")
        block_table = block_table.numpy()
    table = np.asarray(block_table)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise TypeError(f"block_table must be a 2-D integer array [rows, pages], got {table.dtype} of shape "
                        f"{list(table.shape)}")
    if table.dtype.itemsize > 4 and table.size and (table.min() < -1 or table.max() > INT32_MAX):
        raise ValueError(f"block_table entries must be page ids in [0, 2**31 - 1], got values in "
                         f"[{int(table.min())}, {int(table.max())}]")
    return np.ascontiguousarray(table, dtype=np.int32)  # the planner checks the entries rows read


def table_from_indptr(kv_indptr, kv_indices) -> tuple[np.ndarray, np.ndarray]:
    """(block_table int32 [R, max pages], num_pages int32 [R]) of FlashInfer's CSR form (kv_indptr [R+1],
    kv_indices [nnz])."""
    indptr = _host_ints("kv_indptr", kv_indptr)
    indices = _host_ints("kv_indices", kv_indices)
    if len(indptr) < 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != len(indices):
        raise ValueError(f"kv_indptr must start at 0, be non-decreasing and end at len(kv_indices) = {len(indices)}")
    counts = np.diff(indptr)
    rows = len(counts)
    table = np.zeros((rows, max(1, int(counts.max(initial=0)))), dtype=np.int32)
    row = np.repeat(np.arange(rows), counts)
    table[row, np.arange(len(indices)) - np.repeat(indptr[:-1], counts)] = _host_table(indices[None, :])[0]
    return table, counts.astype(np.int32)


@dataclass
class _Lengths:
    """Device tensors that turn row lengths into segment lengths and query positions (set_lengths):
    seg_lens[s] = max over pairs (s, r) of clamp(seq_lens[r] - start[s], 0, capacity[s]);
    q_pos[i] = seq_lens[query_row[i]] + query_offset[i]. Pair arrays padded to a capacity point at segment 0
    with start = capacity = 0 (a zero that changes no max)."""

    pair_seg: torch.Tensor
    pair_row: torch.Tensor
    pair_start: torch.Tensor
    pair_cap: torch.Tensor
    query_row: torch.Tensor
    query_offset: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """A planned batch's host description: rows, their query counts and the sharing found."""

    rows: int
    num_queries: int
    query_lens: np.ndarray
    seq_lens: np.ndarray
    num_pages: np.ndarray
    segments: np.ndarray  # int32 [S, 4]: representative row, first column, pages, rows reading it


class PagedAttention:
    """Attention over a paged KV pool from block tables (see the module docstring).

    page_size: tokens per page; num_heads=(Hq, Hkv), head_dim: the shapes run() takes; device: of the plan and the
    pools; backend: "auto" (the first backend that implements each call: o1kernels.capabilities), "torch",
    "triton", "cpu", "cuda"; capture_stable: fixed-size plan tensors updated in place (CUDA graphs);
    path, kv_chunk_size, queries_per_tile: TreeAttentionPlan's layout options; dtype: of the pools (the cost
    model's bytes per element; default float16).
    """

    def __init__(self, page_size: int, num_heads, head_dim: int, *, device=None, backend: str = "auto",
                 capture_stable: bool = False, path: str = "auto", kv_chunk_size: int | None = None,
                 queries_per_tile: int | None = None, dtype: torch.dtype = torch.float16):
        _check_count("page_size", page_size, minimum=1)
        if (not isinstance(num_heads, (tuple, list)) or len(num_heads) != 2
                or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in num_heads)
                or num_heads[0] % num_heads[1]):
            raise ValueError(f"num_heads must be (num_q_heads, num_kv_heads) with num_q_heads a positive multiple of "
                             f"num_kv_heads, got {num_heads!r}")
        _check_count("head_dim", head_dim, minimum=1)
        if not isinstance(capture_stable, bool):
            raise TypeError(f"capture_stable must be a bool, got {type(capture_stable).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.page_size, self.num_heads, self.head_dim = page_size, tuple(num_heads), head_dim
        self.device = plan_device(device)
        self.backend = backend
        self.capture_stable = capture_stable
        self.dtype = dtype
        self._options = dict(path=path, kv_chunk_size=kv_chunk_size, queries_per_tile=queries_per_tile)
        self.plan_obj: TreeAttentionPlan | None = None  # the TreeAttentionPlan of the current batch
        self.batch: Batch | None = None
        self._table: torch.Tensor | None = None  # device block table [rows capacity, width capacity] int32
        self._copied = (0, 0)  # rows, width of the table last copied in (entries beyond are 0)
        self._lengths: _Lengths | None = None
        self.plans_built = 0  # TreeAttentionPlans constructed (tensors allocated): a capture_stable owner recaptures

    # ---- planning ----------------------------------------------------------------------------------------------
    def plan(self, block_table=None, seq_lens=None, *, query_lens=None, num_pages=None, kv_indptr=None,
             kv_indices=None) -> bool:
        """Lay a batch out. block_table [R, W] int (host: CPU tensor, numpy or lists) or kv_indptr [R+1] + kv_indices;
        seq_lens [R]: each row's KV tokens, this call's new ones included; query_lens [R] (default 1): new query
        tokens per row (q rows, packed in row order); num_pages [R] (default ceil(seq_lens / page_size)): the row's
        valid pages (more give room for set_lengths to grow into). Returns True when the plan's device tensors are
        new (a CUDA graph captured over the previous ones must be captured again)."""
        if (block_table is None) == (kv_indptr is None):
            raise ValueError("give either block_table or kv_indptr + kv_indices")
        if kv_indptr is not None:
            if kv_indices is None:
                raise ValueError("kv_indptr needs kv_indices")
            table, given_pages = table_from_indptr(kv_indptr, kv_indices)
        else:
            table, given_pages = _host_table(block_table), None
        rows, width = table.shape
        seq = _host_ints("seq_lens", seq_lens, rows)
        qlen = np.ones(rows, dtype=np.int64) if query_lens is None else _host_ints("query_lens", query_lens, rows)
        need = -(-seq // self.page_size)
        if num_pages is not None:
            npages = _host_ints("num_pages", num_pages, rows)
        else:
            npages = need if given_pages is None else given_pages.astype(np.int64)
        self._check_rows(seq, qlen, npages, need, width)
        runs = find_runs(table, npages.astype(np.int32))
        return self._lay_out(table, seq, qlen, npages, runs)

    def _check_rows(self, seq, qlen, npages, need, width) -> None:
        for name, arr in (("seq_lens", seq), ("query_lens", qlen), ("num_pages", npages)):
            if len(arr) and (arr.min() < 0 or arr.max() > INT32_MAX):
                raise ValueError(f"{name} must be in [0, 2**31 - 1], got values in [{int(arr.min())}, {int(arr.max())}]")
        for cond, msg in (
            (qlen > seq, "query_lens[{r}] = {a} exceeds seq_lens[{r}] = {b} (seq_lens counts the new tokens too)"),
            (npages < need, "num_pages[{r}] = {a} pages cannot hold seq_lens[{r}] = {b} tokens of page_size "
                            f"{self.page_size}"),
            (npages > width, "num_pages[{r}] = {a} is more than the block table's {b} columns"),
        ):
            bad = np.flatnonzero(cond)
            if len(bad):
                r = int(bad[0])
                a = int(qlen[r] if "query" in msg else npages[r])
                b = int(width if "columns" in msg else seq[r])
                raise ValueError(msg.format(r=r, a=a, b=b))
        if int(qlen.sum()) > INT32_MAX:
            raise ValueError(f"sum(query_lens) = {int(qlen.sum())} query rows: at most 2**31 - 1")

    def _lay_out(self, table, seq, qlen, npages, runs) -> bool:
        ps = self.page_size
        rows, width = table.shape
        segs_raw = runs.segments.astype(np.int64)
        num_segs = len(segs_raw)
        counts = np.diff(runs.row_run_ptr)
        pair_row = np.repeat(np.arange(rows), counts)
        pair_seg = runs.row_runs.astype(np.int64)
        order = np.argsort(pair_seg, kind="stable")  # pairs by segment, rows ascending
        pair_row, pair_seg = pair_row[order], pair_seg[order]
        col, npg = segs_raw[:, 1], segs_raw[:, 2]
        start_tok, cap = col * ps, npg * ps
        # each segment's query rows: every pair's row expands into its query_lens[r] consecutive queries
        q_off = np.cumsum(qlen) - qlen
        pair_q = qlen[pair_row]
        num_refs = int(pair_q.sum())
        queries = np.repeat(q_off[pair_row] - (np.cumsum(pair_q) - pair_q), pair_q) + np.arange(num_refs)
        query_ptr = np.zeros(num_segs + 1, dtype=np.int64)
        np.cumsum(np.bincount(pair_seg, weights=pair_q, minlength=num_segs).astype(np.int64), out=query_ptr[1:])
        pair_len = np.clip(seq[pair_row] - start_tok[pair_seg], 0, cap[pair_seg])
        lengths = np.zeros(num_segs, dtype=np.int64)
        np.maximum.at(lengths, pair_seg, pair_len)
        # Decode rows whose segments they read whole need no position masks (every backend runs them); chunks and
        # rows that end inside a page others read on do.
        masks = bool((qlen > 1).any() or (pair_len < lengths[pair_seg]).any())
        num_queries = int(qlen.sum())
        query_row = np.repeat(np.arange(rows), qlen)
        query_offset = np.arange(num_queries) - np.repeat(q_off + qlen, qlen)
        positions = seq[query_row] + query_offset
        max_page = runs.max_page

        new = self._fit_table(rows, width)
        table_width = self._table.shape[1]
        segs = SegmentArrays(np.zeros(0, dtype=np.int32), segs_raw[:, 0] * table_width + col, cap, start_tok,
                             query_ptr, queries)
        plan = self.plan_obj
        if not new and plan is not None and plan.num_queries == num_queries and plan.capacity is not None:
            try:
                plan.update_arrays(segs, lengths, positions, max_page=max_page, masks=masks)
            except ValueError:  # outgrew the plan's capacity: a new plan below
                new = True
        else:
            new = True
        self._copy_table(table, npages)
        if new:
            plan = self._new_plan(segs, lengths, positions, num_queries, max_page, masks)
        self.plan_obj = plan
        self._set_pairs(pair_seg, pair_row, start_tok, cap, query_row, query_offset, new)
        self.batch = Batch(rows, num_queries, qlen, seq, npages, runs.segments)
        return new

    def _fit_table(self, rows: int, width: int) -> bool:
        """Make the device block table hold rows x width (capture_stable: a new, twice larger one when it does not,
        returning True; otherwise one of exactly that shape)."""
        t = self._table
        if self.capture_stable:
            if t is not None and rows <= t.shape[0] and width <= t.shape[1]:
                return False
            self._alloc_table(2 * rows + 8, 2 * width)
            return True
        if t is None or tuple(t.shape) != (rows, max(1, width)):
            self._alloc_table(rows, width)
        return False

    def _alloc_table(self, rows: int, width: int) -> None:
        """A zero device block table; on the CPU a numpy array shares its memory (host writes without torch)."""
        if self.device.type == "cpu":
            self._table_host = np.zeros((rows, max(1, width)), dtype=np.int32)
            self._table = torch.from_numpy(self._table_host)
        else:
            self._table = torch.zeros(rows, max(1, width), dtype=torch.int32, device=self.device)
        self._copied = (0, 0)

    def _copy_table(self, table: np.ndarray, npages: np.ndarray) -> None:
        """The host block table into the device one (a copy the caller cannot change behind the plan's back), with
        0 past each row's pages: every entry a kernel may be handed is a page id the planner checked (the compiled
        ops check the whole table)."""
        rows, width = table.shape
        valid = np.arange(width, dtype=np.int32)[None, :] < npages.astype(np.int32)[:, None]
        stale = self._copied
        self._copied = (rows, width)
        if self.device.type == "cpu":
            dst = self._table_host
            np.multiply(table, valid, out=dst[:rows, :width])  # (torch's strided int32 copy_ is ~50x slower here)
        else:
            dst = self._table
            dst[:rows, :width].copy_(torch.from_numpy(table * valid).pin_memory(), non_blocking=True)
        if stale[0] > rows:
            dst[rows:stale[0]] = 0
        if stale[1] > width:
            dst[:rows, width:stale[1]] = 0

    def _new_plan(self, segs, lengths, positions, num_queries, max_page, masks) -> TreeAttentionPlan:
        common = dict(device=self.device, **self._options)
        page_table = self._table.view(-1)
        capacity = None
        hq, hkv = self.num_heads
        if self.capture_stable:
            probe = TreeAttentionPlan.from_arrays(segs, lengths, positions, num_queries, self.page_size, page_table,
                                                  max_page=max_page, **common)
            needs = [probe.needs("split"), probe.needs("fused", hq, hkv, self.head_dim, self.dtype.itemsize)]
            capacity = PlanCapacity(**{k: 2 * max(n[k] for n in needs) + 8 for k in needs[0]})
        self.plans_built += 1
        return TreeAttentionPlan.from_arrays(segs, lengths, positions, num_queries, self.page_size, page_table,
                                             max_page=max_page, capacity=capacity, num_heads=self.num_heads,
                                             head_dim=self.head_dim, masks=masks, **common)

    def _set_pairs(self, pair_seg, pair_row, start_tok, cap, query_row, query_offset, new: bool) -> None:
        host = [pair_seg, pair_row, start_tok[pair_seg], cap[pair_seg], query_row, query_offset]
        cur = self._lengths
        if not new and cur is not None and len(pair_seg) <= cur.pair_seg.shape[0]:
            pad = cur.pair_seg.shape[0] - len(pair_seg)
            flat = np.concatenate([np.concatenate([a, np.zeros(pad, np.int64)]) for a in host[:4]] + host[4:])
            sizes = [cur.pair_seg.shape[0]] * 4 + [len(query_row)] * 2
            src = torch.from_numpy(flat)
            for t, part in zip((cur.pair_seg, cur.pair_row, cur.pair_start, cur.pair_cap, cur.query_row,
                                cur.query_offset), src.split(sizes)):
                t.copy_(part)
            return
        size = 2 * len(pair_seg) + 8 if self.capture_stable else len(pair_seg)
        pad = size - len(pair_seg)
        tensors = [torch.from_numpy(np.concatenate([a, np.zeros(pad, np.int64)])).to(self.device) for a in host[:4]]
        tensors += [torch.from_numpy(a).to(self.device) for a in host[4:]]
        self._lengths = _Lengths(*tensors)

    # ---- per step ----------------------------------------------------------------------------------------------
    def set_lengths(self, seq_lens) -> None:
        """The rows grew (or shrank) within the pages of the last plan(): seq_lens [R] (an int tensor on the plan's
        device: device ops only, no host sync, capturable, values clamped into the rows' pages by the kernels; or a
        host sequence / numpy array, checked against the rows' pages). Query counts and pages are the plan's."""
        if self.plan_obj is None:
            raise RuntimeError("set_lengths() before plan()")
        rows = self.batch.rows
        if isinstance(seq_lens, torch.Tensor):
            check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device)
            if seq_lens.shape[0] != rows:
                raise ValueError(f"seq_lens must have {rows} entries (one per row), got {seq_lens.shape[0]}")
            lens = seq_lens.long()
        else:
            seq = _host_ints("seq_lens", seq_lens, rows)
            bad = np.flatnonzero((seq < self.batch.query_lens) | (seq > self.batch.num_pages * self.page_size))
            if len(bad):
                r = int(bad[0])
                raise ValueError(f"seq_lens[{r}] = {int(seq[r])} must be in [{int(self.batch.query_lens[r])}, "
                                 f"{int(self.batch.num_pages[r]) * self.page_size}] (query_lens .. the row's pages "
                                 "at plan time); re-plan when a row needs more pages")
            lens = torch.from_numpy(seq).to(self.device)
        lz = self._lengths
        plan = self.plan_obj
        pair = torch.minimum((lens[lz.pair_row] - lz.pair_start).clamp_(min=0), lz.pair_cap).to(torch.int32)
        plan.seg_lens.zero_().scatter_reduce_(0, lz.pair_seg, pair, "amax")
        plan.q_pos.copy_(lens[lz.query_row] + lz.query_offset)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float | None = None,
            window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
            return_lse: bool = False):
        """Attention of the planned batch's queries q [sum(query_lens), Hq, D] over the pool k_cache, v_cache
        [num_pages, page_size, Hkv, D] (q's dtype). Variants as tree_attention's (window: keys at query position -
        key position < window; softcap; sinks [Hq]). Returns o [sum(query_lens), Hq, D] (or (o, lse))."""
        if self.plan_obj is None:
            raise RuntimeError("run() before plan()")
        if isinstance(q, torch.Tensor) and q.dim() == 3 and tuple(q.shape[1:]) != (self.num_heads[0], self.head_dim):
            raise ValueError(f"q must have shape [{self.batch.num_queries}, {self.num_heads[0]}, {self.head_dim}] "
                             f"(num_heads, head_dim of this PagedAttention), got {list(q.shape)}")
        if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and k_cache.shape[2] != self.num_heads[1]:
            raise ValueError(f"k_cache must have {self.num_heads[1]} kv heads ([num_pages, page_size, Hkv, D]), got "
                             f"shape {list(k_cache.shape)}")
        return tree_attention(q, k_cache, v_cache, self.plan_obj, sm_scale=sm_scale, window=window, softcap=softcap,
                              sinks=sinks, return_lse=return_lse, backend=self.backend)

    # ---- accounting ----------------------------------------------------------------------------------------------
    def kv_tokens_read(self, kind: str = "fused", window: int | None = None) -> int:
        """KV tokens (per kv head) the planned layout's programs load at the current lengths: every shared work
        item's tokens plus every direct (query, segment) pair's tokens (reads a host copy of the lengths: a sync).
        kind: "fused" (Triton) or "split" (compiled backends: every segment shared)."""
        plan = self.plan_obj
        lay = plan.layout(kind, *self.num_heads, self.head_dim, self.dtype.itemsize, window)
        lengths = plan.seg_lens.cpu().numpy().astype(np.int64)
        total = 0
        for source in lay.sources:
            seg, kv_start, kv_end = (t.cpu().numpy()[:source.num_work].astype(np.int64) for t in source.work[:3])
            total += int(np.clip(np.minimum(kv_end, lengths[seg]) - kv_start, 0, None).sum())
        for direct in lay.direct:
            if direct is not None:
                total += int(lengths[direct[1][:int(direct[0][-1])].cpu().numpy()].sum())
        return total

    def unique_kv_tokens(self) -> int:
        """Tokens of the distinct pages the planned rows hold (each shared page counted once), at the current
        lengths."""
        return int(self.plan_obj.seg_lens[:self.plan_obj.num_segments].sum())
