"""Attention plans: every work list of tree_attention and shared_prefix_attention is built here, once.

A plan says which query rows attend to which KV *segments*. A segment is a run of tokens stored in
order in pages of one KV *source* (source 0: tree_attention's paged pool, or the G prompts of
shared_prefix_attention viewed as G pages of P tokens; source 1: the B suffixes viewed as B pages of
S tokens). A query attends to the union of the segments listing it (none: o = 0, lse = -inf).

Two plans, one layout (`PlanLayout`: int32 device tensors):
  TreeAttentionPlan  any tree over a paged pool; laid out on the host, one host-to-device copy.
  SharedPrefixPlan   B branches over G shared prompts + one suffix each; laid out by a few device ops
                     from the branch -> prompt map (no host sync, so it may live on the GPU).
Each segment is read along one of two paths, chosen per segment at plan time by a cost model:
  shared  work items (segment, kv chunk, query tile): the partial kernel loads each chunk once for all
          the tile's queries x GQA heads (one matrix product) and writes an fp32 partial (o, lse) per
          (query, head) into the plan's workspace; long segments are split into chunks (flash-decoding).
  direct  each of its queries reads it inside the final kernel (a plain paged decode, no partial).
The final kernel attends each query over its direct segments and folds in its partials by log-sum-exp.
Backends consume a layout through these two primitives: Triton the "fused" layout (both paths); the
compiled cpu/cuda ops the "split" layout (every segment shared, merge of partials only).

Segment lengths live in `plan.seg_lens` (device int32), changed in place by set_lengths and clamped
into [0, capacity] by every kernel: a step needs no re-plan and no host sync (CUDA-graph capturable).
Layouts, workspaces and the resolved backend are built on the first run with given head counts (or
at construction when num_heads/head_dim are given) and reused by every later run: do one run before
capturing a CUDA graph.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ._backend import resolve_backend
from ._checks import check_count, check_shape, check_tensor
from .capabilities import spec_of

INT32_MAX = 2**31 - 1
# Work items a plan may hold: far above any real tree (a 32K prompt in 256-token chunks read by
# 256 queries in tiles of 32 is 1K items) and small enough that laying them out stays fast.
MAX_WORK_ITEMS = 1 << 24

# ---- launch geometry ---------------------------------------------------------------------------------------------
# Default kv chunking of a shared segment read by n queries: clamp(next_pow2(32 * n), 256, 8192) tokens.
# Each chunk writes n fp32 partials per head, so 32 tokens per query keeps partial traffic well below
# the chunk's KV bytes while segments read by few queries still split into many programs.
MIN_KV_CHUNK, MAX_KV_CHUNK, TOKENS_PER_QUERY = 256, 8192, 32
# Rows (query x GQA head) per partial program on a GPU: wgmma wants M tiles of 64-128 rows.
GPU_TILE_ROWS = 128
CPU_TILE_ROWS = 64
DEFAULT_GQA_GROUP = 4  # Hq / Hkv assumed when the plan is not told the head counts (Llama-3, Qwen2.5 sizes)
DEFAULT_KV_HEADS = 8


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_kv_chunk(num_queries_of_segment: int, cap: int = MAX_KV_CHUNK) -> int:
    """Tokens per work item of a shared segment read by `num_queries_of_segment` queries."""
    return min(cap, max(MIN_KV_CHUNK, next_pow2(TOKENS_PER_QUERY * max(1, num_queries_of_segment))))


# ---- cost model (shared vs direct path) --------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """What the cost model needs to know about a device."""

    num_sms: int  # programs that run at once (CUDA SMs; CPU: cores)
    l2_bytes: int  # last-level cache that absorbs re-reads of a small segment
    gbps: float  # sustained memory bandwidth


# Copy bandwidths measured on our H200 (4.3 TB/s) and H100 (3.0 TB/s) (shared/docs/FIELD.md); others: datasheet-ish.
_KNOWN_GBPS = (("H200", 4300.0), ("H100", 3000.0), ("A100", 1700.0))


@functools.lru_cache(maxsize=None)
def device_profile(device: torch.device) -> DeviceProfile:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gbps = next((g for name, g in _KNOWN_GBPS if name in props.name), 2000.0)
        return DeviceProfile(props.multi_processor_count, int(getattr(props, "L2_cache_size", 40 << 20)), gbps)
    return DeviceProfile(os.cpu_count() or 1, 32 << 20, 20.0)


# The thresholds below are starting points from the byte counts, not yet calibrated on a GPU (the
# session that wrote them had none): plan.tune() measures instead, and the GPU benchmark reports the
# path each plan chose. A segment read by n >= 2 queries goes direct when the n re-reads hit L2:
# the segment is at most L2_FRACTION of L2 and the re-reads (n x its bytes) take at most
# DIRECT_REREAD_US at L2_SPEEDUP x the HBM bandwidth; otherwise it is read once through the shared
# path. A segment read by one query goes direct unless it holds more than SPLIT_FACTOR x the tokens a
# direct program gets on average while the direct grid alone would not fill the device (flash-decoding).
L2_FRACTION, L2_SPEEDUP, DIRECT_REREAD_US, SPLIT_FACTOR, MIN_SPLIT_TOKENS = 0.25, 3.0, 4.0, 4, 2048


def choose_direct(caps, counts, num_queries: int, kv_heads: int, head_dim: int, elem_bytes: int,
                  profile: DeviceProfile) -> np.ndarray:
    """Per segment (capacity in tokens, number of queries reading it; arrays [S]): True = direct path."""
    caps, counts = np.asarray(caps, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    token_bytes = 2 * kv_heads * head_dim * elem_bytes
    direct_tokens = int(caps[counts == 1].sum()) or 1
    fair_share = direct_tokens * kv_heads / max(1, profile.num_sms)
    grid_filled = num_queries * kv_heads >= 2 * profile.num_sms
    single = grid_filled | (caps <= max(MIN_SPLIT_TOKENS, SPLIT_FACTOR * fair_share))
    seg_bytes = caps * token_bytes
    reread_us = counts * seg_bytes / (L2_SPEEDUP * profile.gbps * 1e3)
    shared = (seg_bytes <= L2_FRACTION * profile.l2_bytes) & (reread_us <= DIRECT_REREAD_US)
    return np.where(counts == 1, single, np.where(counts == 0, False, shared))


def default_kv_chunks(counts: np.ndarray) -> np.ndarray:
    """default_kv_chunk of each segment, from its query count [S]."""
    want = TOKENS_PER_QUERY * np.maximum(np.asarray(counts, dtype=np.int64), 1)
    pow2 = np.left_shift(1, np.ceil(np.log2(want)).astype(np.int64))
    return np.clip(pow2, MIN_KV_CHUNK, MAX_KV_CHUNK)


def fill_grid_chunks(chunks, caps, tiles, kv_heads: int, profile: DeviceProfile) -> np.ndarray:
    """Halve the kv chunks of shared segments (largest chunk first, not below MIN_KV_CHUNK) until the
    partial grid has >= 2 programs per SM: split over kv only when the grid would not fill the device."""
    chunks = np.array(chunks, dtype=np.int64)
    caps, tiles = np.asarray(caps, dtype=np.int64), np.asarray(tiles, dtype=np.int64)
    programs = kv_heads * int((-(-caps // chunks) * tiles)[tiles > 0].sum())
    candidates = sorted((int(i) for i in np.flatnonzero(tiles)), key=lambda i: -chunks[i])
    while programs < 2 * profile.num_sms and candidates:
        i = candidates[0]
        if chunks[i] <= MIN_KV_CHUNK or caps[i] <= chunks[i] // 2:
            candidates.pop(0)
            continue
        before = -(-caps[i] // chunks[i])
        chunks[i] //= 2
        programs += kv_heads * int(tiles[i] * (-(-caps[i] // chunks[i]) - before))
        candidates.sort(key=lambda j: -chunks[j])
    return chunks


# ---- layout ------------------------------------------------------------------------------------------------------
@dataclass
class SourceWork:
    """Shared-path work items of one KV source: (seg, kv_start, kv_end, q_start, q_end, out) int32 [num_work].

    The source's segments are the range [seg_lo, seg_hi) of the plan's segments (`seg` counts from seg_lo)
    and its page-table entries the range [page_lo, page_hi) (seg_page_start counts from page_lo): kernels
    read the source's slices (see PlanLayout.source_views)."""

    work: tuple
    num_work: int
    max_work_queries: int
    seg_lo: int
    seg_hi: int
    page_lo: int
    page_hi: int


@dataclass
class PlanLayout:
    """The tensors every backend reads (int32, on the plan's device).

    page_table [*] pages of all segments; seg_page_start, seg_capacity, seg_lens [num_segments]
    (seg_page_start counts from the first page-table entry of the segment's source);
    seg_queries [*] query rows of all segments, each segment's in order; sources[s]: its shared work
    items (item i covers tokens [kv_start, kv_end) of segment seg for the queries
    seg_queries[q_start:q_end]; its j-th query writes partial slot out + j); slot_indptr [NQ+1] /
    slots: CSR of each query's partial slots; direct[s]: None or (indptr [NQ+1], segs) CSR of the
    segments of source s each query reads itself in the final kernel, in order.
    """

    page_table: torch.Tensor
    seg_page_start: torch.Tensor
    seg_capacity: torch.Tensor
    seg_lens: torch.Tensor
    seg_queries: torch.Tensor
    sources: list
    num_partials: int
    slot_indptr: torch.Tensor
    slots: torch.Tensor
    direct: list
    num_direct: int  # direct (query, segment) pairs, for reports
    num_slots: int  # partial slots in use (slots[:num_slots]; the rest is a capacity's padding)
    launches: dict = field(default_factory=dict)  # backend launch specs built on first use (see triton_ops)
    buffer: torch.Tensor | None = None  # the flat int32 tensor the index views live in (host-built layouts)
    # Masking by position (plans built with positions; see TreeAttentionPlan): seg_start [num_segments] is the
    # position of each segment's first token, q_pos [num_queries] the plan's query positions (plan.q_pos, shared).
    # Key t of segment s is visible to query i iff seg_start[s] + t <= q_pos[i] and, with window W,
    # q_pos[i] - (seg_start[s] + t) < W. causal False: no masking (seg_start / q_pos unused, may be None).
    seg_start: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None
    causal: bool = False
    window: int | None = None

    @property
    def num_work(self) -> int:
        return sum(s.num_work for s in self.sources)

    def source_views(self, source: SourceWork) -> tuple:
        """(page_table, seg_page_start, seg_capacity, seg_lens) of a source, indexed by its work items' seg."""
        lo, hi = source.seg_lo, source.seg_hi
        return (self.page_table[source.page_lo:source.page_hi], self.seg_page_start[lo:hi], self.seg_capacity[lo:hi],
                self.seg_lens[lo:hi])


def capturing(device: torch.device) -> bool:
    """Whether a CUDA-graph capture is under way on the current stream of `device` (never for a CPU device)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_host_values_in_capture(device: torch.device, name: str) -> None:
    """RuntimeError when `name` came as host values (Python ints, a CPU tensor) during a CUDA-graph capture: they
    reach the GPU through a pinned staging buffer that is recycled once the capture ends, so every replay would
    copy whatever that buffer holds by then."""
    if capturing(device):
        raise RuntimeError(f"{name}: inside a CUDA-graph capture pass an int32/int64 tensor on {device} (Python ints "
                           "are copied from a host buffer that is reused after the capture, so replays would read "
                           "stale values); or set the values between replays")


def int32_on(device: torch.device, values) -> torch.Tensor:
    """An int32 tensor of `values` (ints or a numpy array) on `device`; to a GPU through pinned memory without a
    host sync (the caching host allocator keeps the staging buffer until the copy has run)."""
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32)) if isinstance(values, np.ndarray) else \
        torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device, copy=True)


def _pack(device: torch.device, arrays: dict[str, np.ndarray], flat: np.ndarray) -> dict[str, torch.Tensor]:
    """One host buffer (`flat`: the arrays one after another), one host-to-device copy, then a view per array."""
    sizes = [len(values) for values in arrays.values()]
    buf = int32_on(device, flat)
    offsets = np.cumsum([0] + sizes)
    return {"buffer": buf, **{name: buf[int(o):int(o) + n] for name, o, n in zip(arrays, offsets, sizes)}}


@dataclass(frozen=True)
class PlanCapacity:
    """Fixed sizes of a capture-stable TreeAttentionPlan. Its layouts are allocated at these sizes once (grids
    and workspaces too; padding is empty work), and plan.update(segments) rewrites them in place while the new
    tree fits, so a CUDA graph captured over the plan's kernels stays valid across forks and releases."""

    segments: int  # segments
    pages: int  # page-table entries (sum of the segments' pages)
    query_refs: int  # (segment, query) pairs
    work: int  # shared work items
    partials: int  # partial slots
    direct: int  # (query, direct segment) pairs

    def __post_init__(self):
        for name in ("segments", "pages", "query_refs", "work", "partials", "direct"):
            check_count(f"capacity.{name}", getattr(self, name))


_WORK_KEYS = ("seg", "kv_start", "kv_end", "q_start", "q_end", "out")
# A layout's arrays, in the order its buffer holds them (layout_arrays' dict order; plan_layout writes the same)
_LAYOUT_ARRAYS = ("page_table", "seg_page_start", "seg_capacity", "seg_start", "seg_queries",
                  *(f"work_{k}" for k in _WORK_KEYS), "slot_indptr", "slots", "direct_indptr", "direct_segs")


@functools.lru_cache(maxsize=None)
def compiled_layout_available() -> bool:
    """Whether the compiled host layout (o1kernels._C's plan_layout) can lay plans out (else numpy does)."""
    from ._ext import unavailable_reason

    return unavailable_reason("cpu") is None


@dataclass
class SegmentArrays:
    """Host description of a plan's segments (numpy; int64 unless noted).

    pages: int32 [*] the host page table; segment s's tokens are in pages[page_start[s]:], token t at
      pages[page_start[s] + t // page_size] (the segments' own pages one after another, or the rows of a block
      table, flattened, that block-table plans index into);
    page_start, capacity (tokens it can hold), start (position of its first token; 0 without positions): [S];
    query_ptr [S+1], queries [*]: CSR of the query rows reading each segment, in order."""

    pages: np.ndarray
    page_start: np.ndarray
    capacity: np.ndarray
    start: np.ndarray
    query_ptr: np.ndarray
    queries: np.ndarray

    @property
    def num_segments(self) -> int:
        return int(self.capacity.shape[0])

    def counts(self) -> np.ndarray:
        """Query rows per segment [S]."""
        return np.diff(self.query_ptr)

    def with_queries(self, keep: np.ndarray) -> "SegmentArrays":
        """The same segments with only the (segment, query) pairs where keep [len(queries)] is True."""
        seg_of_pair = np.repeat(np.arange(self.num_segments), self.counts())
        ptr = np.zeros(self.num_segments + 1, dtype=np.int64)
        np.cumsum(np.bincount(seg_of_pair[keep], minlength=self.num_segments), out=ptr[1:])
        return SegmentArrays(self.pages, self.page_start, self.capacity, self.start, ptr, self.queries[keep])


def _csr_by_query(query: np.ndarray, values: np.ndarray, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr [num_queries + 1], values grouped by query, in their given order within a query)."""
    order = np.argsort(query, kind="stable")
    indptr = np.zeros(num_queries + 1, dtype=np.int64)
    np.cumsum(np.bincount(query, minlength=num_queries), out=indptr[1:])
    return indptr, values[order]


def layout_arrays(segs: SegmentArrays, direct: np.ndarray, chunks: np.ndarray, queries_per_tile: int,
                  num_queries: int, capacity: PlanCapacity | None = None, *,
                  external_pages: bool = False) -> tuple[dict, dict]:
    """Host arrays (numpy) of the layout of segments over one KV source (TreeAttentionPlan; see PlanLayout) and its
    counts, built with array operations (no loop over segments, queries or work items). direct [S] bool: read in
    the final kernel; chunks [S]: kv tokens per shared work item. external_pages: the page table is a device
    tensor the plan's owner keeps (a block table), not part of the layout. With `capacity` every array is padded
    to its capacity (padding work items are empty); ValueError when the layout does not fit."""
    num_segs = segs.num_segments
    counts = segs.counts()
    cap = segs.capacity
    arrays = {} if external_pages else {"page_table": segs.pages}
    arrays.update(seg_page_start=segs.page_start, seg_capacity=cap, seg_start=segs.start, seg_queries=segs.queries)

    # shared work items: per shared segment, kv chunks x query tiles (tiles fastest)
    shared = ~direct & (counts > 0) & (cap > 0)
    n_chunks = np.where(shared, -(-cap // np.maximum(chunks, 1)), 0)
    n_tiles = np.where(shared, -(-counts // queries_per_tile), 0)
    per_seg = n_chunks * n_tiles
    num_work = int(per_seg.sum())
    if num_work > MAX_WORK_ITEMS:
        raise ValueError(f"the plan would hold {num_work} work items, more than {MAX_WORK_ITEMS}: use a larger "
                         "kv_chunk_size / queries_per_tile or fewer, shorter segments")
    seg = np.repeat(np.arange(num_segs), per_seg)
    local = np.arange(num_work) - np.repeat(np.cumsum(per_seg) - per_seg, per_seg)
    tiles = n_tiles[seg]
    chunk = chunks[seg]
    kv_start = (local // np.maximum(tiles, 1)) * chunk
    kv_end = np.minimum(kv_start + chunk, cap[seg])
    q_start = segs.query_ptr[seg] + (local % np.maximum(tiles, 1)) * queries_per_tile
    q_end = np.minimum(q_start + queries_per_tile, segs.query_ptr[seg + 1])
    size = q_end - q_start
    out = np.cumsum(size) - size
    num_partials = int(size.sum())
    max_q = int(size.max()) if num_work else 0
    for key, value in zip(_WORK_KEYS, (seg, kv_start, kv_end, q_start, q_end, out)):
        arrays[f"work_{key}"] = value

    # each query's partial slots (in work-item order) and direct segments (in segment order)
    slot_query = segs.queries[np.repeat(q_start - out, size) + np.arange(num_partials)]
    arrays["slot_indptr"], arrays["slots"] = _csr_by_query(slot_query, np.arange(num_partials), num_queries)
    is_direct = direct & (counts > 0) & (cap > 0)
    pair_direct = np.repeat(is_direct, counts)
    num_direct = int(pair_direct.sum())
    has_direct = capacity is not None or num_direct > 0
    if has_direct:
        arrays["direct_indptr"], arrays["direct_segs"] = _csr_by_query(
            segs.queries[pair_direct], np.repeat(np.arange(num_segs), counts)[pair_direct], num_queries)
    num_slots = num_partials
    if capacity is not None:
        sizes = {"seg_page_start": capacity.segments, "seg_capacity": capacity.segments, "seg_start": capacity.segments,
                 "seg_queries": capacity.query_refs, "slots": capacity.partials, "direct_segs": capacity.direct,
                 **{f"work_{k}": capacity.work for k in _WORK_KEYS}}
        needs = {"segments": num_segs, "pages": len(segs.pages), "query_refs": len(segs.queries), "work": num_work,
                 "partials": num_partials, "direct": num_direct}
        if not external_pages:
            sizes["page_table"] = capacity.pages
        over = [f"{k} {v} > {getattr(capacity, k)}" for k, v in needs.items() if v > getattr(capacity, k)
                and not (k == "pages" and external_pages)]
        if over:
            raise ValueError(f"the plan does not fit its capacity ({', '.join(over)}): build a new plan (and capture "
                             "a new graph) with a larger PlanCapacity")
        for name, n in sizes.items():
            arrays[name] = np.concatenate([arrays[name], np.zeros(n - len(arrays[name]), dtype=np.int64)])
        num_work, num_partials, max_q = capacity.work, capacity.partials, queries_per_tile
    return arrays, dict(num_work=num_work, num_partials=num_partials, max_q=max_q, num_direct=num_direct,
                        has_direct=has_direct, num_slots=num_slots)


def layout_needs(segs: SegmentArrays, direct: np.ndarray, chunks: np.ndarray, queries_per_tile: int) -> dict:
    """What a layout of these segments needs of a PlanCapacity, counted without building it (a dry count)."""
    counts = segs.counts()
    cap = segs.capacity
    shared = ~direct & (counts > 0) & (cap > 0)
    n_chunks = np.where(shared, -(-cap // np.maximum(chunks, 1)), 0)
    n_tiles = np.where(shared, -(-counts // queries_per_tile), 0)
    return dict(segments=segs.num_segments, pages=len(segs.pages), query_refs=len(segs.queries),
                work=int((n_chunks * n_tiles).sum()), partials=int((n_chunks * counts * shared).sum()),
                direct=int((counts * (direct & (counts > 0) & (cap > 0))).sum()))


def materialize(arrays: dict, meta: dict, seg_lens: torch.Tensor, into: PlanLayout | None = None, *,
                q_pos: torch.Tensor | None = None, window: int | None = None,
                page_table: torch.Tensor | None = None) -> PlanLayout:
    """The PlanLayout of layout_arrays' output on seg_lens' device (one host-to-device copy); or `into`, a layout
    of the same capacity, rewritten in place (its tensors, and so every graph captured over them, stay).
    q_pos: the plan's query positions (a plan with positions: the layout masks by position), window: its window;
    page_table: the device page table when it is not part of the arrays (block-table plans)."""
    flat = meta.get("flat")
    if flat is None:
        flat = np.concatenate(list(arrays.values()))
    if into is not None:
        into.buffer.copy_(int32_on(into.buffer.device, flat))
        into.num_direct, into.num_slots = meta["num_direct"], meta["num_slots"]
        return into
    t = _pack(seg_lens.device, arrays, flat)
    table = page_table if page_table is not None else t["page_table"]
    return PlanLayout(
        table, t["seg_page_start"], t["seg_capacity"], seg_lens, t["seg_queries"],
        [SourceWork(tuple(t[f"work_{k}"] for k in _WORK_KEYS), meta["num_work"], meta["max_q"], 0,
                    len(t["seg_capacity"]), 0, len(table))],
        meta["num_partials"], t["slot_indptr"], t["slots"],
        [(t["direct_indptr"], t["direct_segs"]) if meta["has_direct"] else None], meta["num_direct"],
        meta["num_slots"], buffer=t["buffer"], seg_start=t["seg_start"], q_pos=q_pos, causal=q_pos is not None,
        window=window)


# ---- argument helpers --------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(name: str, value) -> list[int]:
    """A 1-D sequence or integer tensor as a list of python ints."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got a {value.dim()}-D "
                            f"{value.dtype} tensor")
        return [int(v) for v in value.tolist()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {type(value).__name__}")
    out = []
    for j, v in enumerate(value):
        if not _is_int(v):
            raise TypeError(f"{name}[{j}] must be an int, got {type(v).__name__}")
        out.append(v)
    return out


def plan_device(device) -> torch.device:
    """torch.device of a plan, with a clear error for a bad name or an unusable device."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available to this torch ({torch.__version__})")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type not in ("cpu", "meta"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    return dev


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _check_heads(num_heads, head_dim):
    if num_heads is not None:
        if (not isinstance(num_heads, (tuple, list)) or len(num_heads) != 2 or not all(_is_int(h) and h > 0 for h in num_heads)
                or num_heads[0] % num_heads[1]):
            raise ValueError(f"num_heads must be (num_q_heads, num_kv_heads) with num_q_heads a positive multiple of "
                             f"num_kv_heads, got {num_heads!r}")
    if head_dim is not None and (not _is_int(head_dim) or not 1 <= head_dim <= 1024):
        raise ValueError(f"head_dim must be an int in [1, 1024], got {head_dim!r}")


PATHS = ("auto", "cascade", "decode")


# ---- plans -------------------------------------------------------------------------------------------------------
class AttentionPlan:
    """What both plans share: device, segment lengths, cached layouts, workspaces and backend runners.

    path: "auto" (cost model per segment), "cascade" (every segment read by >= 2 queries, and long ones,
    through the shared path) or "decode" (every segment direct: one kernel, no partials, no merge).
    """

    num_queries: int
    num_segments: int
    # fp32 inputs on the Triton backend: "ieee" (exact fp32 dots) or "tf32" (tensor cores in TF32, ~1e-3 relative
    # error; set it on a plan to opt in)
    fp32_precision: str = "ieee"

    def __init__(self, device, path: str, num_heads, head_dim):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        _check_heads(num_heads, head_dim)
        self.device = plan_device(device)
        self.path = path
        self.num_heads = tuple(num_heads) if num_heads is not None else None
        self.head_dim = head_dim
        self._layouts: dict = {}
        self._workspaces: dict = {}
        self._runners: dict = {}
        self.causal = False  # masks keys by query position (TreeAttentionPlan with positions)
        self.tuned: dict = {}  # what tune() chose: {"config": partial-kernel tile or None, "ms": ...}
        self.checked_signature = None  # input shapes/dtypes/devices the op last validated against this plan

    # -- set by subclasses
    def _build(self, key: tuple) -> PlanLayout:
        raise NotImplementedError

    def layout(self, kind: str, num_q_heads: int | None = None, num_kv_heads: int | None = None,
               head_dim: int | None = None, elem_bytes: int = 2, window: int | None = None) -> PlanLayout:
        """The plan's layout of `kind` ("split": every segment shared; "fused": per-segment paths by
        self.path) for these head counts (default: the plan's num_heads/head_dim, else a typical GQA shape) and
        sliding window (None: full attention; a plan with positions leaves out the (segment, query) pairs that
        lie wholly before the query's window)."""
        if num_q_heads is None:
            num_q_heads, num_kv_heads = self.num_heads or (DEFAULT_GQA_GROUP * DEFAULT_KV_HEADS, DEFAULT_KV_HEADS)
        head_dim = head_dim or self.head_dim or 128
        key = self._layout_key(kind, num_q_heads // num_kv_heads, num_kv_heads, head_dim, elem_bytes, window)
        lay = self._layouts.get(key)
        if lay is None:
            if capturing(self.device):
                raise RuntimeError("this plan has not run with these head counts yet, and laying it out now would copy "
                                   "to the GPU inside a CUDA-graph capture: run it once before capturing (or pass "
                                   "num_heads/head_dim when building the plan)")
            lay = self._build(key)
            self._layouts[key] = lay
        return lay

    def _layout_key(self, kind, group, kv_heads, head_dim, elem_bytes, window=None) -> tuple:
        """(kind, path, group, kv_heads, head_dim, elem_bytes, window); the split layout depends on the window alone."""
        if kind == "split":
            return ("split", None, DEFAULT_GQA_GROUP, DEFAULT_KV_HEADS, 128, 2, window)
        return (kind, self.path, group, kv_heads, head_dim, elem_bytes, window)

    def workspace(self, kind: str, num_partials: int, num_q_heads: int, width: int):
        """Plan-owned fp32 partial buffers (o [num_partials, Hq, width], lse [num_partials, Hq]), reused by
        every run: runs of one plan must be ordered on one stream (as decode steps and layers are)."""
        key = (kind, num_partials, num_q_heads, width)
        ws = self._workspaces.get(key)
        if ws is None:
            nbytes = 4 * num_partials * num_q_heads * (width + 1)
            if self.device.type == "cuda" and nbytes > torch.cuda.mem_get_info(self.device)[0]:
                raise ValueError(f"the plan's partial workspace needs {nbytes / 2**30:.1f} GiB, more than the GPU has "
                                 "free: use a larger kv_chunk_size or fewer queries per plan")
            ws = (torch.empty(num_partials, num_q_heads, width, dtype=torch.float32, device=self.device),
                  torch.empty(num_partials, num_q_heads, dtype=torch.float32, device=self.device))
            self._workspaces[key] = ws
        return ws

    def runner(self, backend: str, supported: dict, spec=None):
        """(backend name, run function) for `backend` on this plan's device, resolved once per plan and `spec`.

        supported: backend name -> zero-argument loader returning the op's run function for it; spec: the
        AttentionSpec of the call (auto skips backends that do not implement it, see _backend.resolve_backend)."""
        hit = self._runners.get((backend, spec))
        if hit is None:
            name = resolve_backend(backend, self.device, tuple(supported), spec)
            hit = (name, supported[name]())
            self._runners[(backend, spec)] = hit
            self._supported = supported
        return hit

    def tune(self, q, pools, *, backend: str = "auto", sm_scale: float | None = None, reps: int = 20) -> dict:
        """Time this plan's paths ("auto", "cascade", "decode") and, on Triton, the partial kernel's candidate
        tiles on these inputs (CUDA events, median of `reps`); with backend="auto" also the compiled "cuda"
        backend when it is available. Keep the fastest for every later run of this plan with `backend`.

        Call it eagerly, after one ordinary run of the plan with `backend` (which resolves the op), never
        inside a CUDA-graph capture. q: [num_queries, Hq, D]; pools: ((k, v),) for a TreeAttentionPlan,
        ((prefix_k, prefix_v), (suffix_k, suffix_v)) for a SharedPrefixPlan. Returns {"backend", "path",
        "config", "ms", "candidates": [(ms, backend, path, config)]}; {} off CUDA (interpreter timings mean
        nothing)."""
        if self.device.type != "cuda":
            return {}
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("plan.tune() times kernels: call it before capturing a CUDA graph")
        if not hasattr(self, "_supported"):
            raise RuntimeError("run the plan once with its op before tune() (that run also compiles the kernels)")
        spec = spec_of(q, pools[0][0])
        names = [self.runner(backend, self._supported, spec)[0]]
        if backend == "auto" and "cuda" not in names and resolve_available(self, "cuda"):
            names.append("cuda")
        scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        heads = (q.shape[1], pools[0][0].shape[2], q.shape[2], q.element_size())
        candidates = []
        for name in names:
            run = self._supported[name]()
            configs, paths = [None], [self.path]
            if name == "triton":
                from .triton_ops._target import gpu_target
                from .triton_ops.tree_attention import dtype_class, partial_candidates

                kind = dtype_class(q.dtype, self.fp32_precision)
                configs = configs + partial_candidates(gpu_target(self.device), kind, q.shape[-1])
                paths = list(PATHS)
            for path in paths:
                self.path = path
                has_partials = name != "triton" or self.layout("fused", *heads).num_partials > 0
                for config in configs if has_partials else [None]:
                    self.tuned = {"config": config}
                    try:
                        ms = _median_ms(lambda: run(self, q, pools, scale), reps)
                    except Exception:  # a tile that does not fit this GPU (shared memory, registers): not a candidate
                        continue
                    candidates.append((ms, name, path, config))
        ms, name, self.path, config = min(candidates, key=lambda c: c[0])
        self.tuned = {"config": config, "ms": ms}
        self._runners[(backend, spec)] = (name, self._supported[name]())
        return {"backend": name, "path": self.path, "config": config, "ms": ms, "candidates": candidates}


def resolve_available(plan: AttentionPlan, name: str) -> bool:
    """Whether backend `name` can run this plan's op on its device."""
    try:
        resolve_backend(name, plan.device, tuple(plan._supported))
    except (ValueError, RuntimeError):
        return False
    return True


def _median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class TreeAttentionPlan(AttentionPlan):
    """Validated description of which query rows attend to which paged KV segments (any tree).

    segments: sequence of (pages, length, queries) or (pages, length, queries, start). The segment's tokens
      live in order in `pages` (token t at page pages[t // page_size], slot t % page_size); `length` is its
      initial length (0 <= length <= len(pages) * page_size = its capacity); `queries` are distinct query rows
      in [0, num_queries) that attend to it; `start` (plans with positions) the position of its first token.
    positions: None (every listed query attends to every token of its segments), or the position of each query
      row [num_queries] (ints or a CPU integer tensor): the plan masks by position (causal): key t of segment s is
      visible to query i iff start_s + t <= positions[i] (and, run with a sliding window W, positions[i] -
      (start_s + t) < W). Every segment must then give its start. set_positions() moves the positions on (no
      re-plan, no sync); they must not go below the positions the plan was built or updated with, which windowed
      layouts use to leave out segments wholly before a query's window.
    kv_chunk_size: tokens per shared work item (default per segment clamp(next_pow2(32 * its query count),
      256, 8192), halved while the grid would not fill the device); queries_per_tile: queries per work
      item (default: 128 rows on a GPU / 64 on a CPU, divided by the GQA group).
    num_heads=(Hq, Hkv), head_dim: the shapes the plan will run with (lays the plan out now; else on
      the first run); path: "auto" | "cascade" | "decode" (see AttentionPlan).
    capacity: a PlanCapacity makes the plan capture-stable: update(segments) re-lays it out in place.

    Host: num_queries, page_size, num_segments, max_page (-1 without pages), causal (built with positions), masks
    (the position masks change what some query sees: False when every query sits at or after the last token of each
    of its segments, as decode rows over whole segments do, so backends without position masks can run it), segs
    (SegmentArrays; seg_pages_host, seg_queries_host, seg_capacity_host, seg_start_host list them).
    Device int32: seg_lens [num_segments] (current lengths; see set_lengths), q_pos [num_queries] (positions; see
    set_positions; all INT32_MAX without positions). The work lists are in plan.layout("split") /
    plan.layout("fused", ...) (PlanLayout).
    Block-table plans (o1kernels.paged.PagedAttention) are built by TreeAttentionPlan.from_arrays over a page table
    the caller keeps on the device.
    """

    def __init__(self, segments, num_queries: int, page_size: int, *, device=None, kv_chunk_size: int | None = None,
                 queries_per_tile: int | None = None, num_heads=None, head_dim: int | None = None, path: str = "auto",
                 capacity: PlanCapacity | None = None, positions=None):
        self._setup(num_queries, page_size, device, kv_chunk_size, queries_per_tile, num_heads, head_dim, path,
                    capacity, positions is not None)
        segs, lengths, self.max_page = self._parse(segments)
        self._set_tree(segs, lengths, self._parse_positions(positions))
        self.seg_lens = int32_on(self.device, self._padded(lengths))
        self.q_pos = int32_on(self.device, self.positions_host)
        if self.num_heads is not None:
            self.layout("fused", *self.num_heads, head_dim or 128)

    @classmethod
    def from_arrays(cls, segs: SegmentArrays, lengths: np.ndarray, positions: np.ndarray | None, num_queries: int,
                    page_size: int, page_table: torch.Tensor, *, max_page: int, capacity: PlanCapacity | None = None,
                    masks: bool = True, **options) -> "TreeAttentionPlan":
        """A plan over segments already laid out and checked by its caller (o1kernels.paged: block tables), whose
        pages are read from `page_table` (int32 device tensor that `segs.page_start` index into, kept by the
        caller: a structural change re-plans with update_arrays). masks: see the class docstring (the caller knows
        whether its positions mask anything). options: device, kv_chunk_size, queries_per_tile, num_heads, head_dim,
        path (as in the constructor)."""
        plan = cls.__new__(cls)
        plan._setup(num_queries, page_size, options.get("device"), options.get("kv_chunk_size"),
                    options.get("queries_per_tile"), options.get("num_heads"), options.get("head_dim"),
                    options.get("path", "auto"), capacity, positions is not None)
        plan.page_table = page_table
        plan.max_page = max_page
        plan.masks = masks and positions is not None
        pos = np.full(num_queries, INT32_MAX, dtype=np.int64) if positions is None else positions
        plan._set_tree(segs, lengths, pos)
        plan.seg_lens = int32_on(plan.device, plan._padded(lengths))
        plan.q_pos = int32_on(plan.device, pos)
        if plan.num_heads is not None:
            plan.layout("fused", *plan.num_heads, plan.head_dim or 128)
        return plan

    def _setup(self, num_queries, page_size, device, kv_chunk_size, queries_per_tile, num_heads, head_dim, path,
               capacity, causal) -> None:
        check_count("num_queries", num_queries)
        check_count("page_size", page_size, minimum=1)
        if kv_chunk_size is not None:
            check_count("kv_chunk_size", kv_chunk_size, minimum=1)
        if queries_per_tile is not None:
            check_count("queries_per_tile", queries_per_tile, minimum=1)
        if capacity is not None and not isinstance(capacity, PlanCapacity):
            raise TypeError(f"capacity must be a PlanCapacity or None, got {type(capacity).__name__}")
        super().__init__(device, path, num_heads, head_dim)
        if 16 * num_queries > _host_memory_bytes() // 4:
            raise ValueError(f"num_queries={num_queries} needs more host memory to lay out than is available")
        self.num_queries = num_queries
        self.page_size = page_size
        self.kv_chunk_size = kv_chunk_size
        self.queries_per_tile = queries_per_tile
        self.capacity = capacity
        self.causal = causal
        self.masks = causal
        self._layout_out = np.empty(0, dtype=np.int32)  # the compiled layout's host output, grown as needed
        self._layout_params: dict = {}  # layout key -> plan_layout's parameter tensors
        self.page_table = None  # device page table kept by the caller (block-table plans); None: in the layouts

    def _set_tree(self, segs: SegmentArrays, lengths: np.ndarray, positions: np.ndarray) -> None:
        if self.capacity is not None and segs.num_segments > self.capacity.segments:
            raise ValueError(f"the plan does not fit its capacity (segments {segs.num_segments} > "
                             f"{self.capacity.segments}): build a new plan with a larger PlanCapacity")
        self.segs = segs
        self.num_segments = segs.num_segments
        self.positions_host = positions

    def _parse(self, segments) -> tuple[SegmentArrays, np.ndarray, int]:
        """Validate `segments` (TypeError/ValueError naming the entry); return (SegmentArrays, lengths, max page)."""
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
            raise TypeError(f"segments must be a sequence of (pages, length, queries), got {type(segments).__name__}")
        page_size, num_queries = self.page_size, self.num_queries
        seg_pages, seg_lens, seg_queries, seg_starts = [], [], [], []
        num_items = 0
        for s, seg in enumerate(segments):
            if not isinstance(seg, (tuple, list)) or len(seg) not in (3, 4):
                raise TypeError(f"segments[{s}] must be a (pages, length, queries) or (pages, length, queries, start) "
                                f"tuple, got {seg!r:.80}")
            if self.causal != (len(seg) == 4):
                raise ValueError(f"segments[{s}]: a plan {'with' if self.causal else 'without'} positions takes "
                                 f"{'(pages, length, queries, start)' if self.causal else '(pages, length, queries)'} "
                                 f"segments, got {len(seg)} fields")
            start = seg[3] if len(seg) == 4 else 0
            if not _is_int(start) or not 0 <= start <= INT32_MAX:
                raise ValueError(f"segments[{s}].start must be an int in [0, 2**31 - 1], got {start!r}")
            pages = _int_list(f"segments[{s}].pages", seg[0])
            length = seg[1]
            queries = _int_list(f"segments[{s}].queries", seg[2])
            if pages and not 0 <= min(pages) <= max(pages) <= INT32_MAX:
                bad = min(pages) if min(pages) < 0 else max(pages)
                raise ValueError(f"segments[{s}].pages must be page indices in [0, 2**31 - 1], got {bad}")
            capacity = len(pages) * page_size
            if capacity > INT32_MAX:
                raise ValueError(f"segments[{s}] holds {len(pages)} pages x page_size {page_size} = {capacity} tokens; "
                                 "a segment must hold fewer than 2**31 tokens")
            if not _is_int(length) or not 0 <= length <= capacity:
                raise ValueError(f"segments[{s}].length must be an int in [0, {capacity}] (len(pages)={len(pages)} x "
                                 f"page_size={page_size}), got {length!r}")
            bad = [qi for qi in queries if not 0 <= qi < num_queries]
            if bad:
                raise ValueError(f"segments[{s}].queries must be in [0, {num_queries}), got {bad[0]}")
            if len(set(queries)) != len(queries):
                raise ValueError(f"segments[{s}].queries must be distinct, got duplicates in {queries[:16]}")
            if queries:  # an upper bound of the work items of the split layout, checked before any is built
                chunk = self.kv_chunk_size or MIN_KV_CHUNK
                num_items += -(-capacity // chunk) * -(-len(queries) // (self.queries_per_tile or 1))
                if num_items > MAX_WORK_ITEMS:
                    raise ValueError(f"the plan would hold more than {MAX_WORK_ITEMS} work items (at segments[{s}]): "
                                     "use a larger kv_chunk_size / queries_per_tile or fewer, shorter segments")
            if start + capacity > INT32_MAX + 1:
                raise ValueError(f"segments[{s}]: start {start} + capacity {capacity} passes position 2**31 - 1")
            seg_pages.append(pages)
            seg_lens.append(length)
            seg_queries.append(queries)
            seg_starts.append(start)
        npages = np.array([len(p) for p in seg_pages], dtype=np.int64)
        page_start = np.cumsum(npages) - npages
        query_ptr = np.zeros(len(seg_pages) + 1, dtype=np.int64)
        np.cumsum([len(q) for q in seg_queries], out=query_ptr[1:])
        flat_pages = np.array([p for pages in seg_pages for p in pages], dtype=np.int64)
        segs = SegmentArrays(flat_pages.astype(np.int32), page_start, npages * page_size,
                             np.array(seg_starts, dtype=np.int64), query_ptr,
                             np.array([qi for qs in seg_queries for qi in qs], dtype=np.int64))
        return segs, np.array(seg_lens, dtype=np.int64), int(flat_pages.max()) if len(flat_pages) else -1

    # -- host views of the segments (tests, the torch reference)
    def pages_of(self, s: int) -> np.ndarray:
        """Page ids of segment s (its capacity's worth; read back from the device page table of a block-table plan)."""
        lo = int(self.segs.page_start[s])
        hi = lo + -(-int(self.segs.capacity[s]) // self.page_size)
        if self.page_table is not None:
            return self.page_table[lo:hi].cpu().numpy()
        return self.segs.pages[lo:hi]

    def page_ids(self, s: int) -> torch.Tensor:
        """Page ids of segment s as a long tensor on the plan's device (no host round trip for block-table plans)."""
        if self.page_table is None:
            return torch.from_numpy(self.pages_of(s).astype(np.int64)).to(self.device)
        lo = int(self.segs.page_start[s])
        return self.page_table[lo:lo + -(-int(self.segs.capacity[s]) // self.page_size)].long()

    def queries_of(self, s: int) -> np.ndarray:
        return self.segs.queries[self.segs.query_ptr[s]:self.segs.query_ptr[s + 1]]

    @property
    def seg_pages_host(self) -> list[list[int]]:
        return [self.pages_of(s).tolist() for s in range(self.num_segments)]

    @property
    def seg_queries_host(self) -> list[list[int]]:
        return [self.queries_of(s).tolist() for s in range(self.num_segments)]

    @property
    def seg_capacity_host(self) -> list[int]:
        return self.segs.capacity.tolist()

    @property
    def seg_start_host(self) -> list[int]:
        return self.segs.start.tolist()

    def _padded(self, lengths: np.ndarray) -> np.ndarray:
        if self.capacity is None:
            return lengths
        return np.concatenate([lengths, np.zeros(self.capacity.segments - len(lengths), dtype=np.int64)])

    def update(self, segments, positions=None) -> None:
        """Replace the tree (same num_queries and page_size; positions: as in the constructor, required for a plan
        with positions) and re-lay every layout built so far out in place: its device tensors, grids and workspace
        stay, so a captured CUDA graph replays the new tree. Needs a plan built with a PlanCapacity; ValueError
        when the new tree does not fit it (then nothing changed)."""
        if (positions is not None) != self.causal:
            raise ValueError(f"positions must be {'given' if self.causal else 'None'} for a plan "
                             f"{'with' if self.causal else 'without'} positions")
        if self.capacity is None:
            raise ValueError("update() needs a plan built with capacity=PlanCapacity(...); build a new plan instead")
        segs, lengths, max_page = self._parse(segments)
        self.update_arrays(segs, lengths, self._parse_positions(positions), max_page=max_page)

    def update_arrays(self, segs: SegmentArrays, lengths: np.ndarray, positions: np.ndarray, *, max_page: int,
                      masks: bool = True) -> None:
        """update() with segments already laid out and checked (from_arrays' form); a plan with a PlanCapacity."""
        if self.capacity is None:
            raise ValueError("update() needs a plan built with capacity=PlanCapacity(...); build a new plan instead")
        refuse_host_values_in_capture(self.device, "update(segments)")
        old = (self.segs, self.num_segments, self.positions_host)
        try:
            self._set_tree(segs, lengths, positions)
            layouts = [(key, self._arrays(*key)) for key in self._layouts]
        except ValueError:
            self.segs, self.num_segments, self.positions_host = old
            raise
        self.max_page = max_page
        self.masks = masks and self.causal
        self._runners.clear()  # resolved per call signature, which includes whether masks are needed
        for key, (arrays, meta) in layouts:
            materialize(arrays, meta, self.seg_lens, into=self._layouts[key])
        self.seg_lens.copy_(int32_on(self.device, self._padded(lengths)))
        self.q_pos.copy_(int32_on(self.device, positions))
        self.checked_signature = None

    def _parse_positions(self, positions) -> np.ndarray:
        """Host array of the query positions (INT32_MAX for every query without positions)."""
        if positions is None:
            return np.full(self.num_queries, INT32_MAX, dtype=np.int64)
        values = _int_list("positions", positions)
        if len(values) != self.num_queries:
            raise ValueError(f"positions must have num_queries={self.num_queries} entries, got {len(values)}")
        if values and not 0 <= min(values) <= max(values) <= INT32_MAX:
            raise ValueError(f"positions must be in [0, 2**31 - 1], got values in [{min(values)}, {max(values)}]")
        return np.array(values, dtype=np.int64)

    def set_positions(self, positions) -> None:
        """Move the query positions on in place (a plan with positions; no re-plan). positions: num_queries ints
        (checked: not below the positions the plan was built/updated with) or an integer tensor [num_queries] on the
        plan's device (copied without a host sync; CPU values checked, device values trusted)."""
        if not self.causal:
            raise ValueError("set_positions() needs a plan built with positions=")
        if isinstance(positions, torch.Tensor):
            check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device)
            check_shape("positions", positions, (self.num_queries,))
            if positions.device.type == "cpu":
                self._check_positions(positions.numpy())
            self.q_pos.copy_(positions)
            return
        refuse_host_values_in_capture(self.device, "positions")
        values = self._parse_positions(positions)
        self._check_positions(values)
        self.q_pos.copy_(int32_on(self.device, values))

    def _check_positions(self, values: np.ndarray) -> None:
        low = np.flatnonzero((values < self.positions_host) | (values > INT32_MAX))
        if len(low):
            i = int(low[0])
            raise ValueError(f"positions[{i}] must be in [{int(self.positions_host[i])}, 2**31 - 1] (not below the "
                             f"position the plan was laid out with), got {int(values[i])}")

    def _tile(self, group: int) -> int:
        if self.queries_per_tile is not None:
            return self.queries_per_tile
        rows = GPU_TILE_ROWS if self.device.type == "cuda" else CPU_TILE_ROWS
        return max(1, rows // group)

    def _windowed(self, window: int | None) -> SegmentArrays:
        """The segments without the (segment, query) pairs whose window (at the plan's positions, which only grow)
        lies wholly after the segment's last possible token."""
        segs = self.segs
        if window is None or not self.causal:
            return segs
        seg_of_pair = np.repeat(np.arange(segs.num_segments), segs.counts())
        last = segs.start[seg_of_pair] + segs.capacity[seg_of_pair]
        keep = (segs.capacity[seg_of_pair] == 0) | (last > self.positions_host[segs.queries] - window + 1)
        return segs.with_queries(keep)

    def _paths(self, segs: SegmentArrays, kind, path, group, kv_heads, head_dim, elem_bytes):
        """(direct [S] bool, chunks [S], tile) of a layout."""
        caps, counts = segs.capacity, segs.counts()
        profile = device_profile(self.device)
        if kind == "split":
            direct = np.zeros(len(caps), dtype=bool)
        elif path == "decode":
            direct = counts > 0
        elif path == "cascade":
            direct = (counts == 1) & (caps <= MIN_SPLIT_TOKENS)
        else:
            direct = choose_direct(caps, counts, self.num_queries, kv_heads, head_dim, elem_bytes, profile)
        tile = self._tile(group)
        if self.kv_chunk_size is not None:
            chunks = np.full(len(caps), self.kv_chunk_size, dtype=np.int64)
        else:
            chunks = default_kv_chunks(counts)
            if kind == "fused":
                tiles = np.where(direct | (counts == 0), 0, -(-counts // tile))
                chunks = fill_grid_chunks(chunks, caps, tiles, kv_heads, profile)
        return direct, chunks, tile

    def _arrays(self, kind, path, group, kv_heads, head_dim, elem_bytes, window):
        """layout_arrays of the layout with this key (see _layout_key) for the current tree (ValueError when it
        does not fit the capacity): the compiled host layout (csrc/cpu/plan_layout.cpp) when o1kernels._C is built,
        these numpy functions otherwise."""
        if compiled_layout_available():
            return self._compiled_arrays(kind, path, group, kv_heads, head_dim, elem_bytes, window)
        segs = self._windowed(window)
        direct, chunks, tile = self._paths(segs, kind, path, group, kv_heads, head_dim, elem_bytes)
        return layout_arrays(segs, direct, chunks, tile, self.num_queries, self.capacity,
                             external_pages=self.page_table is not None)

    def _compiled_arrays(self, kind, path, group, kv_heads, head_dim, elem_bytes, window, *, count_only=False):
        """_arrays through torch.ops.o1kernels.plan_layout (the same layout; count_only: its needs, nothing
        written)."""
        segs, cap = self.segs, self.capacity
        params = self._layout_params.get((kind, path, group, kv_heads, head_dim, elem_bytes, window, count_only))
        if params is None:  # the key's parameters, as plan_layout takes them (fixed for the plan's lifetime)
            profile = device_profile(self.device)
            caps = (-1,) * 6 if cap is None or count_only else (cap.segments, cap.pages, cap.query_refs, cap.work,
                                                                cap.partials, cap.direct)
            ints = np.array([self.num_queries, kind == "split", PATHS.index(path or "auto"), group, kv_heads,
                             head_dim, elem_bytes, -1 if window is None or not self.causal else window,
                             self._tile(group), self.kv_chunk_size or 0, profile.num_sms, self.page_table is not None,
                             *caps, MIN_KV_CHUNK, MAX_KV_CHUNK, TOKENS_PER_QUERY], dtype=np.int64)
            floats = np.array([profile.l2_bytes, profile.gbps, L2_FRACTION, L2_SPEEDUP, DIRECT_REREAD_US,
                               SPLIT_FACTOR, MIN_SPLIT_TOKENS], dtype=np.float64)
            sizes = np.empty(len(_LAYOUT_ARRAYS), dtype=np.int64)
            params = self._layout_params[(kind, path, group, kv_heads, head_dim, elem_bytes, window, count_only)] = (
                torch.from_numpy(ints), torch.from_numpy(floats), sizes, torch.from_numpy(sizes))
        ints, floats, sizes, sizes_t = params
        args = [torch.from_numpy(a) for a in (segs.pages, segs.page_start, segs.capacity, segs.start, segs.query_ptr,
                                              segs.queries, self.positions_host)] + [ints, floats]
        buffer = self._layout_out if not count_only else np.zeros(0, dtype=np.int32)
        while True:
            res = torch.ops.o1kernels.plan_layout(*args, torch.from_numpy(buffer), sizes_t)
            total, num_work, num_partials, max_q, num_direct, has_direct, num_slots = res[:7]
            needs = dict(segments=segs.num_segments, pages=len(segs.pages), query_refs=res[10], work=res[7],
                         partials=res[8], direct=res[9])
            if count_only:
                return needs
            if total < 0:
                over = [f"{k} {v} > {getattr(cap, k)}" for k, v in needs.items() if v > getattr(cap, k)
                        and not (k == "pages" and self.page_table is not None)]
                raise ValueError(f"the plan does not fit its capacity ({', '.join(over)}): build a new plan (and "
                                 "capture a new graph) with a larger PlanCapacity")
            if total <= len(buffer):
                break
            buffer = self._layout_out = np.empty(2 * total, dtype=np.int32)
        arrays, offset = {}, 0
        for name, n in zip(_LAYOUT_ARRAYS, sizes.tolist()):
            if n >= 0:
                arrays[name] = buffer[offset:offset + n]
                offset += n
        meta = dict(num_work=num_work, num_partials=num_partials, max_q=max_q, num_direct=num_direct,
                    has_direct=bool(has_direct), num_slots=num_slots, flat=buffer[:offset])
        return arrays, meta

    def needs(self, kind: str = "split", num_q_heads: int | None = None, num_kv_heads: int | None = None,
              head_dim: int | None = None, elem_bytes: int = 2, window: int | None = None) -> dict:
        """What the layout of `kind` (see layout()) needs of a PlanCapacity, counted without building it."""
        if num_q_heads is None:
            num_q_heads, num_kv_heads = self.num_heads or (DEFAULT_GQA_GROUP * DEFAULT_KV_HEADS, DEFAULT_KV_HEADS)
        key = self._layout_key(kind, num_q_heads // num_kv_heads, num_kv_heads, head_dim or self.head_dim or 128,
                               elem_bytes, window)
        if compiled_layout_available():
            return self._compiled_arrays(*key, count_only=True)
        segs = self._windowed(window)
        direct, chunks, tile = self._paths(segs, *key[:-1])
        return layout_needs(segs, direct, chunks, tile)

    def _build(self, key: tuple) -> PlanLayout:
        window = key[-1]
        if window is not None and not self.causal:
            raise ValueError("a sliding window needs a plan built with positions= (TreeAttentionPlan(..., positions=))")
        return materialize(*self._arrays(*key), self.seg_lens, q_pos=self.q_pos if self.causal else None,
                           window=window, page_table=self.page_table)

    def set_lengths(self, lengths) -> None:
        """Set the current segment lengths in place (the plan's structure is unchanged).

        lengths: sequence of num_segments ints (checked against each capacity on the host), or an
        integer tensor [num_segments] on the plan's device (copied without a host sync; values are
        checked only when it is on the CPU, otherwise kernels clamp them into [0, capacity]).
        """
        if isinstance(lengths, torch.Tensor):
            check_tensor("lengths", lengths, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device)
            check_shape("lengths", lengths, (self.num_segments,))
            if lengths.device.type == "cpu":
                self._check_lengths(lengths.numpy())
            self.seg_lens[:self.num_segments].copy_(lengths)
            return
        refuse_host_values_in_capture(self.device, "lengths")
        values = np.array(_int_list("lengths", lengths), dtype=np.int64)
        if len(values) != self.num_segments:
            raise ValueError(f"lengths must have num_segments={self.num_segments} entries, got {len(values)}")
        self._check_lengths(values)
        self.seg_lens[:self.num_segments].copy_(int32_on(self.device, values))

    def _check_lengths(self, values: np.ndarray) -> None:
        bad = np.flatnonzero((values < 0) | (values > self.segs.capacity))
        if len(bad):
            s = int(bad[0])
            raise ValueError(f"lengths[{s}] must be in [0, {int(self.segs.capacity[s])}] (capacity of segment {s}), "
                             f"got {int(values[s])}")

    def __repr__(self) -> str:
        return (f"TreeAttentionPlan(num_segments={self.num_segments}, num_queries={self.num_queries}, "
                f"page_size={self.page_size}, path={self.path!r}, device={self.device})")


class SharedPrefixPlan(AttentionPlan):
    """Plan of shared_prefix_attention: B branches over G shared prompts (capacity P) and one suffix each
    (capacity S). Build once, update lengths (and groups) per step, run with shared_prefix_attention(..., plan=).

    Segments: prompt g is segment g (source 0: prefix_k[g] as one page of P tokens), branch b's suffix
    is segment G + b (source 1: suffix_k[b]). branch_group [B] (tensor on the plan's device, or ints;
    None: every branch reads prompt 0) is turned into the layout by device ops (branches sorted by
    prompt, cut into tiles), so a device tensor is never read back; values are clamped into [0, G).
    """

    def __init__(self, num_branches: int, prefix_capacity: int, suffix_capacity: int, *, num_prefixes: int = 1,
                 branch_group=None, device=None, num_heads=None, head_dim: int | None = None, path: str = "auto",
                 kv_chunk_size: int | None = None):
        b = check_count("num_branches", num_branches)
        p = check_count("prefix_capacity", prefix_capacity)
        s = check_count("suffix_capacity", suffix_capacity)
        g = check_count("num_prefixes", num_prefixes, minimum=1)
        if kv_chunk_size is not None:
            check_count("kv_chunk_size", kv_chunk_size, minimum=1)
        super().__init__(device, path, num_heads, head_dim)
        if -(-p // (kv_chunk_size or MIN_KV_CHUNK)) * (b + g) + -(-s // (kv_chunk_size or MIN_KV_CHUNK)) * b > MAX_WORK_ITEMS:
            raise ValueError(f"the plan would hold more than {MAX_WORK_ITEMS} work items: use a larger kv_chunk_size")
        self.num_branches, self.prefix_capacity, self.suffix_capacity, self.num_prefixes = b, p, s, g
        self.num_queries, self.num_segments = b, g + b
        self.kv_chunk_size = kv_chunk_size
        self.seg_capacity_host = [p] * g + [s] * b
        self._layout_meta: dict = {}  # layout key -> (tile, num_tiles, prefix chunks, slots per branch)
        # Built by device ops only (no host-to-device copy): shared_prefix_attention may build a plan inside a step.
        self.seg_lens = self._capacities()
        self.branch_group = torch.zeros(b, dtype=torch.int32, device=self.device)
        if branch_group is not None:
            self.set_branch_group(branch_group)
        if self.num_heads is not None:
            self.layout("fused", *self.num_heads, head_dim or 128)

    def _capacities(self) -> torch.Tensor:
        i32 = dict(dtype=torch.int32, device=self.device)
        return torch.cat([torch.full((self.num_prefixes,), self.prefix_capacity, **i32),
                          torch.full((self.num_branches,), self.suffix_capacity, **i32)])

    # -- per-step updates
    def set_lengths(self, prefix_lens=None, suffix_lens=None) -> None:
        """Current lengths: prefix_lens [G], suffix_lens [B] (ints, or integer tensors on the plan's device,
        copied without a sync; CPU values are checked, device values clamped by the kernels). None: unchanged."""
        g = self.num_prefixes
        for name, value, lo, n, cap in (("prefix_lens", prefix_lens, 0, g, self.prefix_capacity),
                                        ("suffix_lens", suffix_lens, g, self.num_branches, self.suffix_capacity)):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                check_tensor(name, value, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device)
                check_shape(name, value, (n,))
                if value.device.type == "cpu" and n:
                    _check_range(name, int(value.min()), int(value.max()), cap)
                self.seg_lens[lo:lo + n].copy_(value)
            else:
                refuse_host_values_in_capture(self.device, name)
                values = _int_list(name, value)
                if len(values) != n:
                    raise ValueError(f"{name} must have {n} entries, got {len(values)}")
                if values:
                    _check_range(name, min(values), max(values), cap)
                self.seg_lens[lo:lo + n].copy_(int32_on(self.device, values))

    def set_branch_group(self, branch_group) -> None:
        """branch_group [B]: the prompt each branch reads (tensor on the plan's device, or ints); laid out again
        by device ops into every layout already built (no host sync, capturable)."""
        if isinstance(branch_group, torch.Tensor):
            check_tensor("branch_group", branch_group, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device)
            check_shape("branch_group", branch_group, (self.num_branches,))
            if branch_group.device.type == "cpu" and self.num_branches:
                _check_range("branch_group", int(branch_group.min()), int(branch_group.max()), self.num_prefixes - 1)
            self.branch_group.copy_(branch_group)
        else:
            refuse_host_values_in_capture(self.device, "branch_group")
            values = _int_list("branch_group", branch_group)
            if len(values) != self.num_branches:
                raise ValueError(f"branch_group must have {self.num_branches} entries, got {len(values)}")
            if values:
                _check_range("branch_group", min(values), max(values), self.num_prefixes - 1)
            self.branch_group.copy_(int32_on(self.device, values))
        self.refill_groups()

    def refill_groups(self) -> None:
        """Lay self.branch_group out again into every layout built so far (device ops, no sync)."""
        for key, lay in self._layouts.items():
            self._fill_groups(lay, *self._layout_meta[key])

    # -- layout
    def _paths(self, kind, group, kv_heads, head_dim, elem_bytes) -> tuple[bool, bool]:
        """(prefix direct, suffix direct)."""
        b, g, p, s = self.num_branches, self.num_prefixes, self.prefix_capacity, self.suffix_capacity
        if kind == "split":
            return False, False
        if self.path == "decode":
            return True, True
        per_prompt = max(1, -(-b // g))
        if self.path == "cascade":
            return per_prompt == 1 and p <= MIN_SPLIT_TOKENS, s <= MIN_SPLIT_TOKENS
        prefix_direct, suffix_direct = choose_direct([p, s], [per_prompt, 1], b, kv_heads, head_dim, elem_bytes,
                                                     device_profile(self.device))
        return prefix_direct, suffix_direct

    def _build(self, key: tuple) -> PlanLayout:
        """Regular structure on the device: page_table = [0..G) ++ [0..B) (prompt g is page g of source 0,
        suffix b page b of source 1; each source counts its own page-table entries and segments); prefix
        tiles over branches sorted by prompt; suffix items per branch."""
        kind, _, group, kv_heads, head_dim, elem_bytes, window = key
        if window is not None:
            raise ValueError("shared_prefix_attention has no positions: it does not take a sliding window")
        dev = self.device
        b, g, p, s = self.num_branches, self.num_prefixes, self.prefix_capacity, self.suffix_capacity
        prefix_direct, suffix_direct = self._paths(kind, group, kv_heads, head_dim, elem_bytes)
        profile = device_profile(dev)
        rows = GPU_TILE_ROWS if dev.type == "cuda" else CPU_TILE_ROWS
        tile = max(1, min(b, rows // group)) if b else 1
        prefix_shared = not prefix_direct and p > 0 and b > 0
        suffix_shared = not suffix_direct and s > 0 and b > 0
        # Prefix tiles: each prompt's branches cut into tiles of `tile`; at most cdiv(B, tile) + G - 1 tiles.
        num_tiles = min(b, -(-b // tile) + g - 1) if prefix_shared else 0
        p_chunk = self.kv_chunk_size or default_kv_chunk(-(-b // g))
        s_chunk = self.kv_chunk_size or default_kv_chunk(1)
        if kind == "fused" and self.kv_chunk_size is None:
            p_chunk, s_chunk = fill_grid_chunks([p_chunk, s_chunk], [p, s], [num_tiles, b if suffix_shared else 0],
                                                kv_heads, profile)
        ncp = -(-p // p_chunk) if prefix_shared else 0
        ncs = -(-s // s_chunk) if suffix_shared else 0
        i32 = dict(dtype=torch.int32, device=dev)
        arange_b = torch.arange(b, **i32)

        def chunk_bounds(cap, chunk, n):
            lo = torch.arange(n, **i32) * chunk
            return lo, torch.clamp(lo + chunk, max=cap)

        sources = []
        # source 0: prefix items (c, t) -> filled by _fill_groups (they depend on the groups)
        pw = tuple(torch.zeros(ncp * num_tiles, **i32) for _ in range(6))
        if prefix_shared:
            lo, hi = chunk_bounds(p, p_chunk, ncp)
            pw[1].copy_(lo.repeat_interleave(num_tiles))
            pw[2].copy_(hi.repeat_interleave(num_tiles))
        sources.append(SourceWork(pw, ncp * num_tiles, min(tile, b), 0, g, 0, g))
        # source 1: suffix items (c, branch): segment G + b (b in the source's range), query row b (seg_queries[B + b])
        if suffix_shared:
            lo, hi = chunk_bounds(s, s_chunk, ncs)
            branch = arange_b.repeat(ncs)
            chunk_of = torch.arange(ncs, **i32).repeat_interleave(b)
            sw = (branch, lo.repeat_interleave(b), hi.repeat_interleave(b), b + branch, b + branch + 1,
                  ncp * b + chunk_of * b + branch)
        else:
            sw = tuple(torch.zeros(0, **i32) for _ in range(6))
        sources.append(SourceWork(sw, ncs * b, 1, g, g + b, g, g + b))

        slots_per_branch = ncp + ncs
        slot_indptr = torch.arange(b + 1, **i32) * slots_per_branch
        slots = torch.zeros(b, slots_per_branch, **i32)
        if suffix_shared:
            slots[:, ncp:] = ncp * b + torch.arange(ncs, **i32).view(1, -1) * b + arange_b.view(-1, 1)
        direct = [None, None]
        if prefix_direct and p > 0:
            direct[0] = (torch.arange(b + 1, **i32), torch.zeros(b, **i32))  # filled by _fill_groups
        if suffix_direct and s > 0:
            direct[1] = (torch.arange(b + 1, **i32), g + arange_b)
        lay = PlanLayout(
            page_table=torch.cat([torch.arange(g, **i32), arange_b]),
            seg_page_start=torch.cat([torch.arange(g, **i32), arange_b]),
            seg_capacity=self._capacities(), seg_lens=self.seg_lens,
            seg_queries=torch.cat([arange_b, arange_b]), sources=sources, num_partials=b * slots_per_branch,
            slot_indptr=slot_indptr, slots=slots.view(-1), direct=direct,
            num_direct=b * (int(direct[0] is not None) + int(direct[1] is not None)), num_slots=b * slots_per_branch)
        meta = (tile, num_tiles, ncp, slots_per_branch)
        self._layout_meta[key] = meta
        self._fill_groups(lay, *meta)
        return lay

    def _fill_groups(self, lay: PlanLayout, tile: int, num_tiles: int, ncp: int, slots_per_branch: int) -> None:
        """Write the group-dependent parts of a layout in place with device ops (no sync): the sorted branch
        order (seg_queries[:B]), the prefix items' prompt and query ranges, each branch's prefix slots and
        its direct prompt."""
        b, g = self.num_branches, self.num_prefixes
        if b == 0:
            return
        group = self.branch_group.long().clamp(0, g - 1)
        if lay.direct[0] is not None:
            lay.direct[0][1].copy_(group)
        if not num_tiles:
            return
        dev = group.device
        order = torch.sort(group, stable=True).indices  # sorted position -> branch
        position = torch.empty_like(order)
        position[order] = torch.arange(b, device=dev)
        lay.seg_queries[:b].copy_(order)
        counts = torch.zeros(g, dtype=torch.long, device=dev).scatter_add_(0, group, torch.ones_like(group))
        first = torch.cumsum(counts, 0) - counts
        tiles = (counts + tile - 1) // tile
        tiles_end = torch.cumsum(tiles, 0)
        t = torch.arange(num_tiles, device=dev)
        tile_group = torch.searchsorted(tiles_end, t, right=True).clamp(max=g - 1)
        valid = t < tiles_end[-1]
        q_lo = first[tile_group] + (t - (tiles_end - tiles)[tile_group]) * tile
        q_hi = torch.minimum(q_lo + tile, first[tile_group] + counts[tile_group])
        q_lo, q_hi = torch.where(valid, q_lo, 0), torch.where(valid, q_hi, 0)  # spare tiles: empty items
        seg, _, _, q_start, q_end, out = lay.sources[0].work
        seg.copy_(tile_group.repeat(ncp))
        q_start.copy_(q_lo.repeat(ncp))
        q_end.copy_(q_hi.repeat(ncp))
        out.copy_(torch.arange(ncp, device=dev).repeat_interleave(num_tiles) * b + q_lo.repeat(ncp))
        lay.slots.view(b, slots_per_branch)[:, :ncp].copy_(
            torch.arange(ncp, device=dev).view(1, -1) * b + position.view(-1, 1))

    def __repr__(self) -> str:
        return (f"SharedPrefixPlan(num_branches={self.num_branches}, num_prefixes={self.num_prefixes}, "
                f"prefix_capacity={self.prefix_capacity}, suffix_capacity={self.suffix_capacity}, path={self.path!r}, "
                f"device={self.device})")


def _check_range(name: str, lo: int, hi: int, upper: int) -> None:
    if lo < 0 or hi > upper:
        raise ValueError(f"{name} values must be in [0, {upper}], got values in [{lo}, {hi}]")
