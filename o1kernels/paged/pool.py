"""PagedKVPool: per layer, K and V page pools in vLLM/flash-attn layout [num_pages, page_size, Hkv, D] and a host
reference count per page (the number of branches whose block-table row holds it); a page returns to the free list
when that reaches 0.

Atomicity: while a transaction is open (`undo_on_error`) the pool journals its changes (allocations, retains,
releases, growth) and undoes them in reverse if the block raises, so an operation that fails half-way (a fixed pool
running out of pages, a growable one out of device memory, an error in the model) leaves refcounts and free list as
they were.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from o1kernels._checks import available_memory, check_fits_memory, format_bytes


class KVPoolExhausted(RuntimeError):
    """The fixed-size pool has too few free pages (or a KVBudget is spent)."""


class KVBudget:
    """One byte budget for the pages referenced in several pools (a policy's and its PRM's, whose page shapes
    differ): memory goes to whichever pool needs it. A pool's alloc raises KVPoolExhausted when the referenced
    pages of all pools sharing the budget would exceed max_bytes. `used`: bytes referenced now, all pools together.
    The pools' storage may exceed the budget (a growable pool doubles); the budget bounds the KV held."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.used = 0


class PagedKVPool:
    """K/V pages of every layer plus reference counts.

    k[layer], v[layer]: [num_pages, page_size, Hkv, D] in `dtype` on `device`. With num_pages=None the pool starts
    small and grows (doubling, page indices stay valid) when it runs out; with a fixed num_pages running out raises
    KVPoolExhausted saying how many pages were needed. budget: a KVBudget shared with other pools (None: none).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
                 num_pages: int | None = None, dtype=torch.float32, device="cpu", initial_pages: int = 64,
                 budget: KVBudget | None = None):
        for name, val in (("page_size", page_size), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("initial_pages", initial_pages)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if budget is not None and not isinstance(budget, KVBudget):
            raise TypeError(f"budget must be a KVBudget or None, got {type(budget).__name__}")
        self.budget = budget
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
        budget, need = self.budget, n * self.bytes_per_page
        if budget is not None and budget.used + need > budget.max_bytes:
            raise KVPoolExhausted(
                f"KV budget exhausted: {n} more pages ({format_bytes(need)}) would bring the KV held to "
                f"{format_bytes(budget.used + need)}, over the budget of {format_bytes(budget.max_bytes)} its pools "
                "share")
        if n > len(self._free):
            if not self.growable:
                raise KVPoolExhausted(
                    f"KV pool exhausted: needs {n} free pages, has {len(self._free)} of {self.num_pages} "
                    f"(page_size={self.page_size}, {self.bytes_per_page} bytes per page); create the decoder with a "
                    f"larger num_pages, or num_pages=None to grow the pool on demand")
            self._grow(n - len(self._free))
        pages = [self._free.pop() for _ in range(n)]
        if budget is not None:
            budget.used += need
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
        if self.budget is not None:
            self.budget.used -= len(freed) * self.bytes_per_page
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
                if self.budget is not None:
                    self.budget.used -= len(arg[0]) * self.bytes_per_page
            elif kind == "retain":
                self.refcount[arg[0]] -= arg[1]
            elif kind == "release":  # it appended the pages that reached 0 to the free list
                del self._free[len(self._free) - arg[1]:]
                self.refcount[arg[0]] += 1
                if self.budget is not None:
                    self.budget.used += arg[1] * self.bytes_per_page
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

    def copy_tokens(self, src_page: int, dst_pages: list[int], num_tokens: int) -> None:
        """Copy the first num_tokens slots of src_page into each of dst_pages, in every layer (K and V): a fork gives
        each child its own copy of the parent's partial last page."""
        if not dst_pages or not num_tokens:
            return
        dst = torch.tensor(dst_pages, device=self.k[0].device)
        for cache in (self.k, self.v):
            for t in cache:
                t[dst, :num_tokens] = t[src_page, :num_tokens]
