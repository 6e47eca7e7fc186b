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
own, in a sliding window if one is given. A sliding-window decoder that frees and reuses the pages behind every
window plans with plan(..., window=W): the entries before each row's first page in the window are not read.

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

from o1kernels._checks import FLOAT_DTYPES, INT32_MAX, check_count, check_tensor
from o1kernels.plan import (PlanCapacity, SegmentArrays, TreeAttentionPlan, capturing, plan_device,
                            refuse_host_values_in_capture)
from o1kernels.tree_attention import tree_attention

from .sharing import SharingPlanner


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


def batch_segments(runs, seq: np.ndarray, qlen: np.ndarray, table_width: int, page_size: int, compiled: bool):
    """The plan's side of a batch from its runs: (SegmentArrays over the device table of `table_width` columns,
    each segment's current length and longest reader, each query's position, row and offset (position =
    seq_lens[row] + offset), whether position masks change what some query sees). The compiled host pass
    (csrc/cpu/paged_runs.cpp: paged_segments) or the same in numpy."""
    num_segs, rows = len(runs.segments), len(seq)
    if compiled:
        refs = int((qlen * np.diff(runs.row_run_ptr)).sum())
        nq = int(qlen.sum())
        out = [np.empty(n, dtype=np.int64) for n in (num_segs, num_segs, num_segs, num_segs, num_segs, num_segs + 1,
                                                     refs, nq, nq, nq)]
        masks = torch.ops.o1kernels.paged_segments(
            torch.from_numpy(runs.segments), torch.from_numpy(runs.row_runs), torch.from_numpy(runs.row_run_ptr),
            torch.from_numpy(seq), torch.from_numpy(qlen), table_width, page_size, *map(torch.from_numpy, out))
        page_start, cap, start, lengths, longest, query_ptr, queries, positions, query_row, query_offset = out
        segs = SegmentArrays(np.zeros(0, dtype=np.int32), page_start, cap, start, query_ptr, queries)
        return segs, lengths, positions, longest, query_row, query_offset, bool(masks)
    segs_raw = runs.segments.astype(np.int64)
    pair_row = np.repeat(np.arange(rows), np.diff(runs.row_run_ptr))
    pair_seg = runs.row_runs.astype(np.int64)
    order = np.argsort(pair_seg, kind="stable")  # pairs by segment, rows ascending
    pair_row, pair_seg = pair_row[order], pair_seg[order]
    col, npg = segs_raw[:, 1], segs_raw[:, 2]
    start, cap = col * page_size, npg * page_size
    # each segment's query rows: every pair's row expands into its query_lens[r] consecutive queries
    q_off = np.cumsum(qlen) - qlen
    pair_q = qlen[pair_row]
    queries = np.repeat(q_off[pair_row] - (np.cumsum(pair_q) - pair_q), pair_q) + np.arange(int(pair_q.sum()))
    query_ptr = np.zeros(num_segs + 1, dtype=np.int64)
    np.cumsum(np.bincount(pair_seg, weights=pair_q, minlength=num_segs).astype(np.int64), out=query_ptr[1:])
    pair_len = np.clip(seq[pair_row] - start[pair_seg], 0, cap[pair_seg])
    lengths = np.zeros(num_segs, dtype=np.int64)
    np.maximum.at(lengths, pair_seg, pair_len)
    # Decode rows whose segments they read whole need no position masks (every backend runs them); chunks and rows
    # that end inside a page others read on do.
    masks = bool((qlen > 1).any() or (pair_len < lengths[pair_seg]).any())
    query_row = np.repeat(np.arange(rows), qlen)
    query_offset = np.arange(int(qlen.sum())) - np.repeat(q_off + qlen, qlen)
    by_length = np.lexsort((-pair_len, pair_seg))  # pairs by segment, longest first
    longest = pair_row[by_length[np.searchsorted(pair_seg, np.arange(num_segs))]]  # pair_seg is sorted
    segs = SegmentArrays(np.zeros(0, dtype=np.int32), segs_raw[:, 0] * table_width + col, cap, start, query_ptr,
                         queries)
    return segs, lengths, seq[query_row] + query_offset, longest, query_row, query_offset, masks


@dataclass
class _Lengths:
    """Device tensors that turn row lengths into segment lengths and query positions (set_lengths):
    seg_lens[s] = clamp(seq_lens[seg_row[s]] - start[s], 0, capacity[s]), seg_row[s] being the segment's longest
    reader at plan time (rows grow only in pages of their own: the longest stays the longest; a shared segment
    every reader runs past has its capacity whichever it is); q_pos[i] = seq_lens[query_row[i]] + query_offset[i].
    index int64 = [seg_row (segment capacity), query_row], values int32 = [start, capacity, query_offset]; padding
    segments read row 0 with start = capacity = 0."""

    index: torch.Tensor
    values: torch.Tensor
    num_segments: int
    seg_row: torch.Tensor = None
    query_row: torch.Tensor = None
    start: torch.Tensor = None
    cap: torch.Tensor = None
    query_offset: torch.Tensor = None

    def __post_init__(self):
        s = self.num_segments
        self.seg_row, self.query_row = self.index[:s], self.index[s:]
        self.start, self.cap, self.query_offset = self.values[:s], self.values[s:2 * s], self.values[2 * s:]


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
        check_count("page_size", page_size, minimum=1)
        if (not isinstance(num_heads, (tuple, list)) or len(num_heads) != 2
                or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in num_heads)
                or num_heads[0] % num_heads[1]):
            raise ValueError(f"num_heads must be (num_q_heads, num_kv_heads) with num_q_heads a positive multiple of "
                             f"num_kv_heads, got {num_heads!r}")
        check_count("head_dim", head_dim, minimum=1)
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
        self._table: torch.Tensor | None = None  # device block table [row slots, width capacity] int32
        self._planner = SharingPlanner()  # the rows' slots in it and the per-page state between plans
        self._lengths: _Lengths | None = None
        self.planned_window: int | None = None  # plan()'s window: run() attends in it or a narrower one
        self.plans_built = 0  # TreeAttentionPlans constructed (tensors allocated): a capture_stable owner recaptures

    # ---- planning ----------------------------------------------------------------------------------------------
    def plan(self, block_table=None, seq_lens=None, *, query_lens=None, num_pages=None, kv_indptr=None,
             kv_indices=None, continues=None, window: int | None = None) -> bool:
        """Lay a batch out. block_table [R, W] int (host: CPU tensor, numpy or lists) or kv_indptr [R+1] + kv_indices;
        seq_lens [R]: each row's KV tokens, this call's new ones included; query_lens [R] (default 1): new query
        tokens per row (q rows, packed in row order); num_pages [R] (default ceil(seq_lens / page_size)): the row's
        valid pages (more give room for set_lengths to grow into); continues [R] (optional): for each row, the row
        of the previous plan() it continues -- the same sequence: the pages holding the tokens it had then are
        unchanged, pages past them may have been appended or trimmed -- or -1 for a new row; only the other pages
        are read (without it, or after a failed plan, every row is); window (optional): run() will attend in this
        sliding window or a narrower one, so each row's pages wholly behind the window of its first new query are
        not read and their entries may be anything (pages freed and reused). Returns True when the plan's device
        tensors are new (a CUDA graph captured over the previous ones must be captured again)."""
        if capturing(self.device):
            raise RuntimeError("PagedAttention.plan() inside a CUDA-graph capture: plan before capturing (the capture "
                               "replays set_lengths + run)")
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
        first = None
        if window is not None:
            check_count("window", window, minimum=1)
            first = np.maximum(seq - qlen - window + 1, 0) // self.page_size
            np.minimum(first, npages, out=first)
        new = self._fit_table(rows, width)
        if self.device.type == "cuda" and self._uploaded is not None:
            self._uploaded.synchronize()  # the previous upload has read the staging copy the planner writes
        kept = None
        if continues is not None:  # kept: the pages holding each continued row's tokens at the last plan
            continues = _host_ints("continues", continues, rows)
            prev_seq = self.batch.seq_lens if self.batch is not None else np.zeros(0, dtype=np.int64)
            named = (continues >= 0) & (continues < len(prev_seq))
            kept = np.zeros(rows, dtype=np.int64)
            kept[named] = -(-prev_seq[continues[named]] // self.page_size)
        try:  # the planner checks the table and writes the kernels' copy of it (0 past each row's pages) as it reads
            runs = self._planner.plan(table, npages.astype(np.int32), self._host_table, continues, kept, first)
        except ValueError:
            self.plan_obj, self.batch = None, None  # the table buffer is half written: no plan until the next one
            raise
        self.planned_window = window
        self._upload_table()
        return self._lay_out(rows, seq, qlen, npages, runs, new)

    def _check_rows(self, seq, qlen, npages, need, width) -> None:
        # one combined test (seq >= qlen >= 0 and npages >= need >= 0 bound the rest); the details only on failure
        if ((qlen >= 0) & (qlen <= seq) & (npages >= need) & (npages <= width) & (seq <= INT32_MAX)).all() \
                and int(qlen.sum()) <= INT32_MAX:
            return
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

    def _lay_out(self, rows, seq, qlen, npages, runs, new: bool) -> bool:
        (segs, lengths, positions, longest, query_row, query_offset,
         masks) = batch_segments(runs, seq, qlen, self._table.shape[1], self.page_size, self._planner.compiled)
        num_queries = len(positions)
        plan = self.plan_obj
        if not new and plan is not None and plan.num_queries == num_queries and plan.capacity is not None:
            try:
                plan.update_arrays(segs, lengths, positions, max_page=runs.max_page, masks=masks)
            except ValueError:  # outgrew the plan's capacity: a new plan below
                new = True
        else:
            new = True
        if new:
            plan = self._new_plan(segs, lengths, positions, num_queries, runs.max_page, masks)
        self.plan_obj = plan
        self._set_lengths_tensors(longest, segs.start, segs.capacity, query_row, query_offset, new)
        self.batch = Batch(rows, num_queries, qlen, seq, npages, runs.segments.copy())
        return new

    def _fit_table(self, rows: int, width: int) -> bool:
        """Make the device block table hold rows x width: while it does, its rows keep their slots (incremental
        plans); else a new one, twice that for capture_stable (returns True: new tensors)."""
        t = self._table
        if t is not None and rows <= t.shape[0] and width <= t.shape[1]:
            return False
        grow = 2 if self.capture_stable else 1
        self._alloc_table(grow * rows + (8 if self.capture_stable else 0), grow * width)
        return self.capture_stable

    def _alloc_table(self, rows: int, width: int) -> None:
        """A zero device block table and its host side: on the CPU a numpy array sharing its memory, on a GPU a
        pinned staging copy uploaded after each plan."""
        if self.device.type == "cpu":
            self._host_table = np.zeros((rows, max(1, width)), dtype=np.int32)
            self._table = torch.from_numpy(self._host_table)
        else:
            self._table = torch.zeros(rows, max(1, width), dtype=torch.int32, device=self.device)
            staging = torch.zeros(self._table.shape, dtype=torch.int32, pin_memory=True)
            self._host_table, self._staging = staging.numpy(), staging
        self._uploaded = None

    def _upload_table(self) -> None:
        """The staged table to the device (a GPU: one asynchronous copy from pinned memory; the CPU: in place)."""
        if self.device.type == "cuda":
            self._table.copy_(self._staging, non_blocking=True)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

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
        # layouts are built on the first run (only the backend's own: split for the compiled ops, fused for Triton)
        return TreeAttentionPlan.from_arrays(segs, lengths, positions, num_queries, self.page_size, page_table,
                                             max_page=max_page, capacity=capacity, masks=masks, **common)

    def _set_lengths_tensors(self, seg_row, start_tok, cap, query_row, query_offset, new: bool) -> None:
        """Upload set_lengths' tensors (two host-to-device copies; in place while they fit the plan's capacity)."""
        size = len(self.plan_obj.seg_lens)  # the plan's segment capacity
        pad = np.zeros(size - len(seg_row), dtype=np.int64)
        index = np.concatenate([seg_row, pad, query_row])
        values = np.concatenate([start_tok, pad, cap, pad, query_offset]).astype(np.int32)
        cur = self._lengths
        if not new and cur is not None and cur.num_segments == size and cur.index.shape[0] == len(index):
            cur.index.copy_(torch.from_numpy(index))
            cur.values.copy_(torch.from_numpy(values))
            return
        self._lengths = _Lengths(torch.from_numpy(index).to(self.device), torch.from_numpy(values).to(self.device),
                                 size)

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
            lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.int()
        else:
            refuse_host_values_in_capture(self.device, "seq_lens")
            seq = _host_ints("seq_lens", seq_lens, rows)
            bad = np.flatnonzero((seq < self.batch.query_lens) | (seq > self.batch.num_pages * self.page_size))
            if len(bad):
                r = int(bad[0])
                raise ValueError(f"seq_lens[{r}] = {int(seq[r])} must be in [{int(self.batch.query_lens[r])}, "
                                 f"{int(self.batch.num_pages[r]) * self.page_size}] (query_lens .. the row's pages "
                                 "at plan time); re-plan when a row needs more pages")
            lens = torch.from_numpy(seq.astype(np.int32)).to(self.device)
        lz, plan = self._lengths, self.plan_obj
        torch.sub(lens[lz.seg_row], lz.start, out=plan.seg_lens).clamp_(min=0)
        torch.minimum(plan.seg_lens, lz.cap, out=plan.seg_lens)
        torch.add(lens[lz.query_row], lz.query_offset, out=plan.q_pos)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, sm_scale: float | None = None,
            window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
            return_lse: bool = False):
        """Attention of the planned batch's queries q [sum(query_lens), Hq, D] over the pool k_cache, v_cache
        [num_pages, page_size, Hkv, D] (q's dtype). Variants as tree_attention's (window: keys at query position -
        key position < window; softcap; sinks [Hq]). Returns o [sum(query_lens), Hq, D] (or (o, lse))."""
        if self.plan_obj is None:
            raise RuntimeError("run() before plan()")
        if self.planned_window is not None and (window is None or window > self.planned_window):
            raise ValueError(f"window must be at most {self.planned_window}, the window plan() was given (pages behind "
                             f"it were not planned), got {window}")
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
