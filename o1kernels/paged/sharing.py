"""Which leading pages the rows of a block table share: runs of pages read by the same set of rows.

find_runs(block_table, num_pages) -> Runs. The rows' pages form a forest (a page's parent is the
page before it in any row holding it); a run is a maximal stretch of a row's pages read by the same rows, which in a
forest is where the number of rows reading a page stays the same. Each run becomes one segment of the attention
plan, read once for all its rows. The compiled host planner (csrc/cpu/paged_runs.cpp, one pass over the table) runs
when o1kernels._C is built; `find_runs_numpy` is the same computation in array operations (the reference the tests
compare it with, and the fallback).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from o1kernels import _ext


@dataclass
class Runs:
    """segments int32 [S, 4]: (representative row, first column, pages, rows reading it) of each run shared by its
    rows; row_runs int32 [*] / row_run_ptr int64 [R+1]: each row's segments in order (CSR); max_page: the largest
    page id the rows read (-1: none)."""

    segments: np.ndarray
    row_runs: np.ndarray
    row_run_ptr: np.ndarray
    max_page: int


def find_runs(block_table: np.ndarray, num_pages: np.ndarray) -> Runs:
    """Runs of a block table (int32 [R, W]; row r's pages are its first num_pages[r] entries, int32 [R]).
    ValueError for a negative page id or a page at different columns in two rows."""
    if _ext._C is None:
        return find_runs_numpy(block_table, num_pages)
    entries = int(num_pages.sum())  # worst case: every page a segment and a run of its own
    segs = np.empty((entries, 4), dtype=np.int32)
    runs = np.empty(entries, dtype=np.int32)
    ptr = np.empty(len(num_pages) + 1, dtype=np.int64)
    try:
        num_segs, num_runs, max_page = torch.ops.o1kernels.paged_runs(
            torch.from_numpy(block_table), torch.from_numpy(num_pages), torch.from_numpy(segs),
            torch.from_numpy(runs), torch.from_numpy(ptr))
    except RuntimeError as exc:  # TORCH_CHECK_VALUE arrives as ValueError; keep torch's prefix out of the message
        raise ValueError(str(exc).split("\n")[0]) from None
    return Runs(segs[:num_segs], runs[:num_runs], ptr, max_page)


def find_runs_numpy(block_table: np.ndarray, num_pages: np.ndarray) -> Runs:
    """find_runs in numpy array operations (same segments, same order)."""
    rows, width = block_table.shape
    if len(num_pages) and (num_pages.min() < 0 or num_pages.max() > width):
        r = int(np.flatnonzero((num_pages < 0) | (num_pages > width))[0])
        raise ValueError(f"o1kernels: num_pages[{r}] = {int(num_pages[r])} must be in [0, {width}] (the block "
                         "table's width)")
    valid = np.arange(width)[None, :] < num_pages[:, None]
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
    parent = np.where(col > 0, np.concatenate([[-1], page[:-1]]), -1)
    forest = bool((parent == parent[first[page]]).all())
    count = np.bincount(page, minlength=num_ids)[page]
    start = np.ones(len(page), dtype=bool)
    if forest:
        start[1:] = (col[1:] == 0) | (count[1:] != count[:-1])
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
    return Runs(segments.astype(np.int32).reshape(-1, 4), seg_of_run.astype(np.int32), ptr, num_ids - 1)
