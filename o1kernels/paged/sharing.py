"""Which leading pages the rows of a block table share: runs of pages read by the same set of rows.

The rows' pages form a forest (a page's parent is the page before it in any row holding it); a run is a maximal
stretch of a row's pages read by the same rows, which in a forest is where the number of rows reading a page stays
the same. Each run becomes one segment of the attention plan, read once for all its rows.

SharingPlanner keeps the rows in slots of the kernels' copy of the block table and, with the compiled host planner
(csrc/cpu/paged_runs.cpp), the per-page state between plans: a plan whose rows say which row of the previous plan
they continue (`continues`) reads and counts only the pages that changed. `find_runs_numpy` is the same
computation in numpy array operations: the reference the tests compare the compiled planner with, and the path
without o1kernels._C (every plan in full).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from o1kernels._ext import unavailable_reason

STATE_FIELDS = 6  # per page id: epoch, readers, column, parent, stamp, segment (csrc/cpu/paged_runs.cpp)


@dataclass
class Runs:
    """segments int32 [S, 4]: (slot of a row reading it, first column, pages, rows reading it) of each run shared by
    its rows; row_runs int32 [*] / row_run_ptr int64 [R+1]: each row's segments in order (CSR); max_page: the largest
    page id the rows read (-1: none); slots int64 [R]: each row's slot in the slot table. A SharingPlanner's Runs
    are views of its buffers: valid until its next plan."""

    segments: np.ndarray
    row_runs: np.ndarray
    row_run_ptr: np.ndarray
    max_page: int
    slots: np.ndarray


class SharingPlanner:
    """Runs of successive block tables, rows kept in slots of `slot_table` (int32 [slots, WC], the caller's: 0 past
    each row's pages), incrementally where rows continue rows of the previous plan."""

    def __init__(self):
        self.compiled = unavailable_reason("cpu") is None
        self._state = np.zeros((0, STATE_FIELDS), dtype=np.int32)
        self._segs_out = np.empty((0, 4), dtype=np.int32)  # the compiled planner's outputs (Runs are views of them,
        self._runs_out = np.empty(0, dtype=np.int32)        # valid until the next plan)
        self._epoch = self._stamp = 0
        self._slots: np.ndarray | None = None  # slots of the previous plan's rows (None: no plan to continue)
        self._slot_pages = np.zeros(0, dtype=np.int32)
        self._table_id = None
        self._max_page = -1
        self._prev_rows = 0  # rows of the last plan that succeeded (what `continues` may name)

    def reset(self) -> None:
        """Forget the previous plan (the next one is planned in full)."""
        self._slots = None

    def plan(self, table: np.ndarray, num_pages: np.ndarray, slot_table: np.ndarray, continues=None,
             kept_pages=None, first_pages=None) -> Runs:
        """Runs of `table` (int32 [R, W]; row r's pages are its first num_pages[r] entries, int32 [R]), its rows
        written into slots of slot_table (the caller sizes it: at least R x W). continues [R] (optional): the row of
        the previous plan each row continues, -1 for a new row, with kept_pages [R]: how many of its leading pages
        that row still holds unchanged (those holding the tokens it had). first_pages [R] int64 (optional): each
        row's first column read; the entries before it are ignored (0 in slot_table); a plan with one > 0 is a full
        plan, and so is the next. ValueError for a negative page id, a page at different columns in two rows, or a
        continued row whose last kept page moved."""
        rows, width = table.shape
        if continues is not None:
            continues = self._check_continues(continues, rows)
        first = np.zeros(rows, dtype=np.int64) if first_pages is None else first_pages
        offset = bool(first.any())
        if not self.compiled:
            runs = self._numpy(table, num_pages, slot_table, first)
            self._prev_rows = rows
            return runs
        if self._table_id != id(slot_table) or len(self._slot_pages) != len(slot_table):
            self._table_id, self._slot_pages = id(slot_table), np.zeros(len(slot_table), dtype=np.int32)
            self._slots = None
        incremental = continues is not None and self._slots is not None and not offset
        if incremental:
            slots, kept, released = self._continue(continues, np.asarray(kept_pages, dtype=np.int64), num_pages,
                                                   len(slot_table))
            if slots is None:
                incremental = False
        if not incremental:
            self._epoch += 1
            self._max_page = -1
            slots, kept, released = (np.arange(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64),
                                     np.zeros(0, dtype=np.int64))
        try:
            runs = self._run(table, num_pages, slots, kept, first, released, slot_table)
            if runs is None:  # an incremental plan met a row that breaks the forest: in full, from the table
                self._epoch += 1
                self._max_page = -1
                slots = np.arange(rows, dtype=np.int64)
                runs = self._run(table, num_pages, slots, np.zeros(rows, dtype=np.int64), first,
                                 np.zeros(0, np.int64), slot_table)
        except BaseException:
            self._slots = None  # the state is half updated: the next plan starts over
            raise
        if offset:
            self._slots = None  # the slots hold 0 before each row's first page: the next plan reads them in full
        self._prev_rows = rows
        return runs

    def _check_continues(self, continues, rows: int) -> np.ndarray:
        continues = np.asarray(continues)
        if continues.shape != (rows,) or not np.issubdtype(continues.dtype, np.integer):
            raise ValueError(f"continues must have one int per row ({rows}), got {continues.dtype} of shape "
                             f"{list(continues.shape)}")
        bad = continues[(continues < -1) | (continues >= self._prev_rows)]
        if len(bad):
            raise ValueError(f"continues values must be -1 or rows of the previous plan in [0, {self._prev_rows}), "
                             f"got {int(bad[0])}")
        named = continues[continues >= 0]
        if len(named) and np.bincount(named).max() > 1:
            raise ValueError("continues: a row of the previous plan is continued by at most one row")
        return continues.astype(np.int64)

    def _continue(self, continues: np.ndarray, kept_pages: np.ndarray, num_pages: np.ndarray, num_slots: int):
        """(slots, kept, released) of an incremental plan, or None when the rows do not fit the free slots."""
        prev = self._slots
        cont = continues >= 0
        slots = np.empty(len(continues), dtype=np.int64)
        slots[cont] = prev[continues[cont]]
        dropped = np.ones(len(prev), dtype=bool)
        dropped[continues[cont]] = False
        in_use = np.zeros(num_slots, dtype=bool)
        in_use[slots[cont]] = True
        free = np.flatnonzero(~in_use)
        if len(free) < int((~cont).sum()):
            return None, None, None
        slots[~cont] = free[:int((~cont).sum())]
        kept = np.where(cont, np.minimum(np.minimum(self._slot_pages[slots], num_pages), kept_pages), 0)
        return slots, kept, prev[dropped]

    def _run(self, table, num_pages, slots, kept, first, released, slot_table) -> Runs | None:
        entries = int(num_pages.sum())
        if len(self._runs_out) < entries:  # outputs kept between plans (no 8 MB allocation per plan at 256 x 2,048)
            self._segs_out = np.empty((2 * entries, 4), dtype=np.int32)
            self._runs_out = np.empty(2 * entries, dtype=np.int32)
        segs, runs = self._segs_out, self._runs_out
        ptr = np.empty(len(num_pages) + 1, dtype=np.int64)
        while True:
            self._stamp += 1
            try:
                num_segs, num_runs, max_page, status, forest = torch.ops.o1kernels.paged_plan_rows(
                    *(torch.from_numpy(a) for a in (table, num_pages, slots, kept, first, released, slot_table,
                                                     self._slot_pages, self._state)),
                    self._epoch, self._stamp, *(torch.from_numpy(a) for a in (segs, runs, ptr)))
            except RuntimeError as exc:  # TORCH_CHECK_VALUE arrives as ValueError; keep torch's prefix out
                raise ValueError(str(exc).split("\n")[0]) from None
            if status == 1:  # the state grows past the largest page id (nothing was changed)
                grown = np.zeros((max(2 * len(self._state), max_page + 1), STATE_FIELDS), dtype=np.int32)
                grown[:len(self._state)] = self._state
                self._state = grown
                continue
            if status == 2:
                return None
            break
        self._slots = slots if forest else None  # a table that is not a forest is planned in full next time
        self._max_page = max(self._max_page, max_page)
        return Runs(segs[:num_segs], runs[:num_runs], ptr, self._max_page, slots)

    def _numpy(self, table, num_pages, slot_table, first) -> Runs:
        rows, width = table.shape
        runs = find_runs_numpy(table, num_pages, first)
        cols = np.arange(width)[None, :]
        np.multiply(table, (cols < num_pages[:, None]) & (cols >= first[:, None]), out=slot_table[:rows, :width])
        slot_table[:rows, width:] = 0
        return runs


def find_runs(block_table: np.ndarray, num_pages: np.ndarray, first_pages: np.ndarray | None = None) -> Runs:
    """Runs of one block table (int32 [R, W]; row r's pages are its entries first_pages[r] (default 0) up to
    num_pages[r], int32 [R]), planned in full on its own (slot r = row r). ValueError for a negative page id or a
    page at different columns."""
    first = None if first_pages is None else np.asarray(first_pages, dtype=np.int64)
    return SharingPlanner().plan(block_table, num_pages, np.zeros(block_table.shape, dtype=np.int32),
                                 first_pages=first)


def find_runs_numpy(block_table: np.ndarray, num_pages: np.ndarray, first_pages: np.ndarray | None = None) -> Runs:
    """find_runs in numpy array operations (same segments, same order)."""
    rows, width = block_table.shape
    if len(num_pages) and (num_pages.min() < 0 or num_pages.max() > width):
        r = int(np.flatnonzero((num_pages < 0) | (num_pages > width))[0])
        raise ValueError(f"o1kernels: num_pages[{r}] = {int(num_pages[r])} must be in [0, {width}] (the block "
                         "table's width)")
    first_col = (np.zeros(rows, dtype=np.int64) if first_pages is None
                 else np.asarray(first_pages, dtype=np.int64))
    bad = np.flatnonzero((first_col < 0) | (first_col > num_pages))
    if len(bad):
        r = int(bad[0])
        raise ValueError(f"o1kernels: row {r} begins at column {int(first_col[r])}: must be in [0, "
                         f"{int(num_pages[r])}]")
    cols = np.arange(width)[None, :]
    valid = (cols < num_pages[:, None]) & (cols >= first_col[:, None])
    row, col = np.nonzero(valid)
    page = block_table[row, col].astype(np.int64)
    bad = np.flatnonzero(page < 0)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"o1kernels: block_table[{row[i]}, {col[i]}] = {page[i]} is not a page id (>= 0)")
    num_ids = int(page.max()) + 1 if len(page) else 0
    first = np.full(num_ids, -1, dtype=np.int64)
    first[page[::-1]] = np.arange(len(page))[::-1]  # each page's first entry
    moved = np.flatnonzero(col != col[first[page]])
    if len(moved):
        i = int(moved[0])
        raise ValueError(f"o1kernels: page {page[i]} is at column {col[i]} of block_table row {row[i]} but at column "
                         f"{col[first[page[i]]]} where it first appears: a page holds the same positions in every "
                         "row that reads it")
    begins = col == first_col[row]  # a row's first page: no parent
    parent = np.where(begins, -1, np.concatenate([[-1], page[:-1]]))
    forest = bool((parent == parent[first[page]]).all())
    count = np.bincount(page, minlength=num_ids)[page]
    start = np.ones(len(page), dtype=bool)
    if forest:
        start[1:] = begins[1:] | (count[1:] != count[:-1])
    key = page[start]
    run_len = np.diff(np.append(np.flatnonzero(start), len(page)))
    # a segment per distinct key, numbered in order of first appearance (row-major), as the compiled planner does
    _, first_run, seg_of_run = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first_run, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    seg_of_run = rank[seg_of_run]
    firsts = first_run[order]
    start_entry = np.flatnonzero(start)[firsts]
    segments = np.stack([row[start_entry], col[start_entry], run_len[firsts], count[start_entry]], axis=1)
    run_row = row[start]
    ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(run_row, minlength=rows), out=ptr[1:])
    return Runs(segments.astype(np.int32).reshape(-1, 4), seg_of_run.astype(np.int32), ptr, num_ids - 1,
                np.arange(rows, dtype=np.int64))
