"""Paged KV cache shared across search branches.

PagedKVPool: per layer, K and V page pools in vLLM/flash-attn layout [num_pages, page_size, Hkv, D] and a host
reference count per page. KVTree: the branches of a search as chains of Segments (runs of tokens in pages).

Sharing rule: every branch holds one reference on each page of its chain (ancestor segments + its own tail), so a
page's refcount is the number of live branches that read it and it returns to the free list when that reaches 0.
`fork` freezes the branch's tail into a read-only segment that becomes the last ancestor of the parent and of every
child; each then writes new tokens into a tail of its own (a fresh page, never the partially filled last page of a
frozen segment). Nothing is copied.

Atomicity: `KVTree.atomic` wraps an operation so that, if it raises (a fixed pool running out of pages, a growable
one out of device memory, an error in the model), the pool's refcounts and free list, the branch table and the
touched branches' chains are restored exactly; the pool records its changes while a transaction is open and undoes
them in reverse.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from o1kernels._checks import INT32_MAX, available_memory, check_fits_memory, format_bytes

BRANCH_HOST_BYTES = 512  # host memory of one branch (Branch, its Segment, table entries; 441 B by tracemalloc)


class KVPoolExhausted(RuntimeError):
    """The fixed-size pool has too few free pages."""


class PagedKVPool:
    """K/V pages of every layer plus reference counts.

    k[layer], v[layer]: [num_pages, page_size, Hkv, D] in `dtype` on `device`. With num_pages=None the pool starts
    small and grows (doubling, page indices stay valid) when it runs out; with a fixed num_pages running out raises
    KVPoolExhausted saying how many pages were needed.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
                 num_pages: int | None = None, dtype=torch.float32, device="cpu", initial_pages: int = 64):
        for name, val in (("page_size", page_size), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("initial_pages", initial_pages)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if num_pages is not None and (isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1):
            raise ValueError(f"num_pages must be a positive integer or None (grow on demand), got {num_pages!r}")
        self.page_size = page_size
        self.growable = num_pages is None
        size = initial_pages if num_pages is None else num_pages
        shape = (size, page_size, num_kv_heads, head_dim)
        element = torch.empty((), dtype=dtype).element_size()
        check_fits_memory("initial_pages" if self.growable else "num_pages",
                          2 * num_layers * size * page_size * num_kv_heads * head_dim * element, torch.device(device),
                          f"a KV pool of {size} pages of {page_size} tokens")
        # Zero-filled, not empty: slots past a segment's length are read (and given weight 0) by attention
        # backends, and uninitialised memory can hold NaN/inf bit patterns, which 0 * x does not remove.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.refcount = np.zeros(size, dtype=np.int64)
        self._free = list(range(size - 1, -1, -1))  # pop() hands out low page ids first
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * element
        self.bytes_per_page = self.bytes_per_token * page_size
        self.peak_pages = 0
        self._journal: list[tuple] | None = None  # changes since a transaction began (None: not recording)

    @property
    def num_pages(self) -> int:
        return self.refcount.shape[0]

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def kv_bytes(self) -> int:
        """Bytes of the pages referenced now."""
        return self.pages_in_use * self.bytes_per_page

    def _grow(self, needed: int) -> None:
        """Add at least `needed` pages (doubling when memory allows); KVPoolExhausted when the device cannot hold
        them."""
        old = self.num_pages
        device = self.k[0].device
        avail = available_memory(device)
        new = max(2 * old, old + needed)
        if avail is not None and (new - old) * self.bytes_per_page > avail:
            new = old + needed
            if needed * self.bytes_per_page > avail:
                raise KVPoolExhausted(
                    f"KV pool cannot grow: {needed} more pages ({format_bytes(needed * self.bytes_per_page)}) are "
                    f"needed, {format_bytes(avail)} are available on {device}")
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                extra = torch.zeros((new - old, *t.shape[1:]), dtype=t.dtype, device=t.device)
                cache[i] = torch.cat((t, extra))
        self.refcount = np.concatenate((self.refcount, np.zeros(new - old, dtype=np.int64)))
        self._free = list(range(new - 1, old - 1, -1)) + self._free
        self._record("grow", old)

    def alloc(self, n: int) -> list[int]:
        """n free pages, each with refcount 1."""
        if n > len(self._free):
            if not self.growable:
                raise KVPoolExhausted(
                    f"KV pool exhausted: needs {n} free pages, has {len(self._free)} of {self.num_pages} "
                    f"(page_size={self.page_size}, {self.bytes_per_page} bytes per page); create the decoder with a "
                    f"larger num_pages, or num_pages=None to grow the pool on demand")
            self._grow(n - len(self._free))
        pages = [self._free.pop() for _ in range(n)]
        self.refcount[pages] = 1
        self.peak_pages = max(self.peak_pages, self.pages_in_use)
        self._record("alloc", tuple(pages))
        return pages

    def retain(self, pages: list[int], times: int = 1) -> None:
        if pages:
            idx = np.asarray(pages)
            if (self.refcount[idx] <= 0).any():
                raise RuntimeError("retain of a free KV page (refcount bookkeeping error)")
            self.refcount[idx] += times
            self._record("retain", idx, times)

    def release(self, pages: list[int]) -> None:
        """Drop one reference on each page; pages reaching 0 return to the free list."""
        if not pages:
            return
        idx = np.asarray(pages)
        if (self.refcount[idx] <= 0).any():
            raise RuntimeError("release of a free KV page (refcount bookkeeping error)")
        self.refcount[idx] -= 1
        freed = [int(p) for p in idx[self.refcount[idx] == 0]]
        self._free.extend(freed)
        self._record("release", idx, len(freed))

    def _record(self, *change) -> None:
        if self._journal is not None:
            self._journal.append(change)

    @contextmanager
    def undo_on_error(self):
        """Record the pool's changes inside the block; if it raises, undo them in reverse (refcounts, free list
        and its order, and the size of a pool that grew) and re-raise. Blocks may nest."""
        outer = self._journal is None
        if outer:
            self._journal = []
        mark = len(self._journal)
        try:
            yield
        except BaseException:
            self._undo(mark)
            raise
        finally:
            if outer:
                self._journal = None

    def _undo(self, mark: int) -> None:
        while len(self._journal) > mark:
            kind, *arg = self._journal.pop()
            if kind == "alloc":  # alloc popped these pages off the end of the free list
                self.refcount[list(arg[0])] = 0
                self._free.extend(reversed(arg[0]))
            elif kind == "retain":
                self.refcount[arg[0]] -= arg[1]
            elif kind == "release":  # it appended the pages that reached 0 to the free list
                del self._free[len(self._free) - arg[1]:]
                self.refcount[arg[0]] += 1
            else:  # grow: drop the pages it added (a view of the first `old` pages; the storage is kept)
                old = arg[0]
                del self._free[:self.num_pages - old]
                self.refcount = self.refcount[:old].copy()
                for cache in (self.k, self.v):
                    cache[:] = [t[:old] for t in cache]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [N, Hkv, D] at flat slots [N] (page * page_size + slot) of `layer`."""
        self.k[layer].view(-1, *self.k[layer].shape[2:])[slots] = k
        self.v[layer].view(-1, *self.v[layer].shape[2:])[slots] = v


@dataclass(eq=False)
class Segment:
    """A run of `length` tokens stored in order in `pages` (token t at pages[t // page_size], slot t % page_size)."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    tokens: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Branch:
    ancestors: tuple[Segment, ...]  # read-only, shared with other branches
    tail: Segment  # written by this branch only

    def chain(self) -> list[Segment]:
        return [*self.ancestors, self.tail]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.ancestors) + self.tail.length


class KVTree:
    """Branches over a PagedKVPool. `version` changes whenever any branch's pages or the set of branches change
    (a cached TreeAttentionPlan keyed on it stays valid while it is unchanged)."""

    def __init__(self, pool: PagedKVPool):
        self.pool = pool
        self.branches: dict[int, Branch] = {}
        self._next_id = 0
        self.version = 0
        self._released: list[tuple[int, Branch]] | None = None  # branches released inside a transaction

    def _new(self, ancestors: tuple[Segment, ...]) -> int:
        bid = self._next_id
        self._next_id += 1
        self.branches[bid] = Branch(ancestors, Segment())
        self.version += 1
        return bid

    def new_branch(self) -> int:
        """An empty root branch."""
        return self._new(())

    def get(self, branch) -> Branch:
        if isinstance(branch, bool) or not isinstance(branch, int) or branch not in self.branches:
            live = sorted(self.branches)
            raise ValueError(f"unknown branch id {branch!r} (live branches: {live[:16]}{' ...' if len(live) > 16 else ''})")
        return self.branches[branch]

    def _pages_short(self, tail: Segment, num_tokens: int) -> int:
        """Pages `tail` lacks to hold num_tokens more tokens."""
        return max(0, -(-(tail.length + num_tokens) // self.pool.page_size) - len(tail.pages))

    def reserve(self, branch: int, num_tokens: int) -> None:
        """Make room for num_tokens more tokens in the branch's tail (allocating pages if needed)."""
        self.reserve_all([branch], num_tokens)

    def pages_to_reserve(self, branches: Iterable[int], num_tokens: int) -> int:
        """Pages `reserve_all(branches, num_tokens)` would allocate."""
        return sum(self._pages_short(self.get(b).tail, num_tokens) for b in branches)

    def reserve_all(self, branches: list[int], num_tokens: int) -> None:
        """reserve(b, num_tokens) for every branch, all pages taken in one allocation (all or nothing)."""
        tails = [self.get(b).tail for b in branches]
        needs = [self._pages_short(t, num_tokens) for t in tails]
        pages = self.pool.alloc(sum(needs))
        if pages:
            self.version += 1
        for tail, need in zip(tails, needs):
            tail.pages += pages[:need]
            del pages[:need]

    def trim(self, branch: int) -> None:
        """Free the tail's pages past its length (unused reservation)."""
        tail = self.get(branch).tail
        keep = -(-tail.length // self.pool.page_size)
        if keep < len(tail.pages):
            self.pool.release(tail.pages[keep:])
            del tail.pages[keep:]
            self.version += 1

    def append(self, branch: int, tokens: list[int]) -> list[int]:
        """Append tokens to the branch's tail; return their flat pool slots (page * page_size + slot)."""
        self.reserve(branch, len(tokens))
        tail = self.get(branch).tail
        ps = self.pool.page_size
        slots = [tail.pages[t // ps] * ps + t % ps for t in range(tail.length, tail.length + len(tokens))]
        tail.length += len(tokens)
        tail.tokens += tokens
        return slots

    def fork(self, branch: int, n: int) -> list[int]:
        """n children sharing the branch's tokens read-only; the parent continues in a new tail of its own."""
        parent = self.get(branch)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if n > INT32_MAX - len(self.branches):
            raise ValueError(f"n: at most 2**31 - 1 live branches (attention query rows are int32), "
                             f"{len(self.branches)} live + n = {n}")
        check_fits_memory("n", n * BRANCH_HOST_BYTES, torch.device("cpu"), f"forking {n} branches")
        self.trim(branch)
        if parent.tail.length:
            parent.ancestors = (*parent.ancestors, parent.tail)
            parent.tail = Segment()
        self.pool.retain([p for seg in parent.ancestors for p in seg.pages], times=n)
        return [self._new(parent.ancestors) for _ in range(n)]

    def release(self, branch: int) -> None:
        br = self.get(branch)
        self.pool.release([p for seg in br.chain() for p in seg.pages])
        del self.branches[branch]
        if self._released is not None:
            self._released.append((branch, br))
        self.version += 1

    @contextmanager
    def atomic(self, branches: Iterable[int] = ()):
        """Run a block that changes the tree; if it raises, restore the pool (refcounts, free list), the branch
        table (branches created inside dropped and their ids reused, released ones back) and the chains of
        `branches` (the existing branches whose chains the block may change: appended to, reserved, trimmed,
        forked) exactly, then re-raise. `version` moves on (a plan cached inside is stale). Not nestable."""
        saved = [(br, br.ancestors, br.tail, list(br.tail.pages), br.tail.length, len(br.tail.tokens))
                 for br in map(self.get, branches)]
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
            for br, ancestors, tail, pages, length, num_tokens in saved:
                br.ancestors, br.tail = ancestors, tail
                tail.pages[:] = pages
                tail.length = length
                del tail.tokens[num_tokens:]
            self.version += 1
            raise
        finally:
            self._released = None

    def tokens(self, branch: int) -> list[int]:
        return [t for seg in self.get(branch).chain() for t in seg.tokens]

    def live_tokens(self) -> int:
        """Tokens summed over live branches (what dense per-branch copies would hold)."""
        return sum(b.length for b in self.branches.values())
