"""KVTree: the branches of a search over a PagedKVPool, each a dense block-table row (its pages in token order).

Sharing rule (as vLLM and FlashInfer do): every branch holds one reference on each page of its row, so a page's
refcount is the number of live branches that read it. `fork` gives each child the parent's full pages (shared,
read-only from then on: nobody writes into a full page) and a copy of the parent's partial last page (at most
page_size - 1 tokens copied per child, all layers); the parent keeps its own partial page. So every branch's
tokens are dense in its row, writes never touch a shared page, and the KV held is the ideal within one page per
branch. Which leading pages rows share is found from the page ids by o1kernels.paged.PagedAttention.plan.

Atomicity: `KVTree.atomic` wraps an operation so that, if it raises, the pool (refcounts, free list), the branch
table and the touched branches' rows are restored exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from o1kernels._checks import INT32_MAX, check_fits_memory

from .pool import PagedKVPool

BRANCH_HOST_BYTES = 512  # host memory of one branch (Branch, its lists, table entries)


@dataclass(eq=False)
class Branch:
    """One row: `length` tokens in `pages` (token t at pages[t // page_size], slot t % page_size; pages past the
    length are reserved room). Token ids: token_base (a tuple shared with the branches it was forked with) then
    token_tail."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    token_base: tuple = ()
    token_tail: list[int] = field(default_factory=list)

    def tokens(self) -> list[int]:
        return [*self.token_base, *self.token_tail]


class KVTree:
    """Branches over a PagedKVPool. `version` changes whenever any branch's pages or the set of branches change (a
    plan laid out from the block tables stays valid while it is unchanged; lengths may grow within the pages)."""

    def __init__(self, pool: PagedKVPool):
        self.pool = pool
        self.branches: dict[int, Branch] = {}
        self._next_id = 0
        self.version = 0
        self._released: list[tuple[int, Branch]] | None = None  # branches released inside a transaction

    def _new(self, branch: Branch) -> int:
        bid = self._next_id
        self._next_id += 1
        self.branches[bid] = branch
        self.version += 1
        return bid

    def new_branch(self) -> int:
        """An empty root branch."""
        return self._new(Branch())

    def get(self, branch) -> Branch:
        if isinstance(branch, bool) or not isinstance(branch, int) or branch not in self.branches:
            live = sorted(self.branches)
            raise ValueError(f"unknown branch id {branch!r} (live branches: {live[:16]}{' ...' if len(live) > 16 else ''})")
        return self.branches[branch]

    def _pages_short(self, br: Branch, num_tokens: int) -> int:
        """Pages `br` lacks to hold num_tokens more tokens."""
        return max(0, -(-(br.length + num_tokens) // self.pool.page_size) - len(br.pages))

    def reserve(self, branch: int, num_tokens: int) -> None:
        """Make room for num_tokens more tokens in the branch's row (allocating pages if needed)."""
        self.reserve_all([branch], num_tokens)

    def pages_to_reserve(self, branches: Iterable[int], num_tokens: int) -> int:
        """Pages `reserve_all(branches, num_tokens)` would allocate."""
        return sum(self._pages_short(self.get(b), num_tokens) for b in branches)

    def reserve_all(self, branches: list[int], num_tokens: int) -> None:
        """reserve(b, num_tokens) for every branch, all pages taken in one allocation (all or nothing)."""
        rows = [self.get(b) for b in branches]
        needs = [self._pages_short(br, num_tokens) for br in rows]
        pages = self.pool.alloc(sum(needs))
        if pages:
            self.version += 1
        for br, need in zip(rows, needs):
            br.pages += pages[:need]
            del pages[:need]

    def trim(self, branch: int) -> None:
        """Free the row's pages past its length (unused reservation)."""
        br = self.get(branch)
        keep = -(-br.length // self.pool.page_size)
        if keep < len(br.pages):
            self.pool.release(br.pages[keep:])
            del br.pages[keep:]
            self.version += 1

    def slots(self, branch: int, start: int, num_tokens: int) -> list[int]:
        """Flat pool slots (page * page_size + slot) of the branch's tokens [start, start + num_tokens) (reserved)."""
        br, ps = self.get(branch), self.pool.page_size
        return [br.pages[t // ps] * ps + t % ps for t in range(start, start + num_tokens)]

    def append(self, branch: int, tokens: list[int]) -> list[int]:
        """Append tokens to the branch (reserving pages as needed); return their flat pool slots."""
        self.reserve(branch, len(tokens))
        br = self.get(branch)
        slots = self.slots(branch, br.length, len(tokens))
        br.length += len(tokens)
        br.token_tail += tokens
        return slots

    def fork(self, branch: int, n: int) -> list[int]:
        """n children with the branch's tokens: its full pages shared, a copy of its partial last page each. The
        parent's unused reservation is freed; the parent stays live."""
        parent = self.get(branch)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if n > INT32_MAX - len(self.branches):
            raise ValueError(f"n: at most 2**31 - 1 live branches (attention query rows are int32), "
                             f"{len(self.branches)} live + n = {n}")
        check_fits_memory("n", n * BRANCH_HOST_BYTES, torch.device("cpu"), f"forking {n} branches")
        self.trim(branch)
        ps = self.pool.page_size
        full, partial = divmod(parent.length, ps)
        shared = parent.pages[:full]
        copies = self.pool.alloc(n) if partial else []
        self.pool.copy_tokens(parent.pages[full] if partial else 0, copies, partial)
        self.pool.retain(shared, times=n)
        if parent.token_tail:  # children and parent share one tuple of the tokens so far
            parent.token_base, parent.token_tail = (*parent.token_base, *parent.token_tail), []
        return [self._new(Branch(shared + copies[i:i + 1], parent.length, parent.token_base)) for i in range(n)]

    def release(self, branch: int) -> None:
        br = self.get(branch)
        self.pool.release(br.pages)
        del self.branches[branch]
        if self._released is not None:
            self._released.append((branch, br))
        self.version += 1

    @contextmanager
    def atomic(self, branches: Iterable[int] = ()):
        """Run a block that changes the branches; if it raises, restore the pool (refcounts, free list), the branch
        table (branches created inside dropped and their ids reused, released ones back) and the rows of `branches`
        (the existing branches the block may change: appended to, reserved, trimmed, forked) exactly, then
        re-raise. `version` moves on (a plan laid out inside is stale). Not nestable."""
        saved = [(br, list(br.pages), br.length, br.token_base, len(br.token_tail)) for br in map(self.get, branches)]
        next_id = self._next_id
        self._released = []
        try:
            with self.pool.undo_on_error():
                yield
        except BaseException:
            for bid in range(next_id, self._next_id):
                self.branches.pop(bid, None)
            self._next_id = next_id
            if self._released:  # ids are handed out in increasing order: the table is sorted by id
                table = sorted([*self.branches.items(), *((b, br) for b, br in self._released if b < next_id)])
                self.branches.clear()
                self.branches.update(table)
            for br, pages, length, base, num_tail in saved:
                tokens = [*br.token_base, *br.token_tail][len(base):]
                br.pages[:], br.length, br.token_base, br.token_tail = pages, length, base, tokens[:num_tail]
            self.version += 1
            raise
        finally:
            self._released = None

    def tokens(self, branch: int) -> list[int]:
        return self.get(branch).tokens()

    def live_tokens(self) -> int:
        """Tokens summed over live branches (what dense per-branch copies would hold)."""
        return sum(b.length for b in self.branches.values())

    def block_table(self, branches: list[int], extra_rows: list[list[int]] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(block_table int32 [R, W], num_pages int32 [R]) of the branches' rows in order (then `extra_rows`, page
        lists of rows that are not branches, e.g. padding); W = the most pages of a row (at least 1)."""
        rows = [self.get(b).pages for b in branches] + [list(r) for r in extra_rows]
        num_pages = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
        table = np.zeros((len(rows), max(1, int(num_pages.max(initial=0)))), dtype=np.int32)
        for i, pages in enumerate(rows):
            table[i, :len(pages)] = pages
        return table, num_pages

    def lengths(self, branches: list[int]) -> np.ndarray:
        """Tokens held by each branch [R] int64."""
        return np.fromiter((self.get(b).length for b in branches), dtype=np.int64, count=len(branches))
