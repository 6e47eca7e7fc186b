"""Tree attention over a paged KV pool: TreeAttentionPlan (host-built once) + tree_attention (per step).

Public op: ``tree_attention(q, k_cache, v_cache, plan, *, sm_scale=None, return_lse=False, backend="auto")``.

Internal signature shared by every backend (the compiled ``o1kernels._compiled.tree_attention``
receives exactly these arguments, already validated):
    tree_attention_<backend>(q, k_cache, v_cache, plan, sm_scale) -> (o, lse)
    q: [num_queries, Hq, D], k_cache/v_cache: [num_pages, page_size, Hkv, D] (one dtype, one device),
    plan: TreeAttentionPlan on that device, sm_scale: python float;
    returns o [num_queries, Hq, D] in q's dtype and lse [num_queries, Hq] float32 (natural log).

Segment lengths are read at run time from ``plan.seg_lens`` and clamped into [0, capacity],
so no backend needs a host-device sync and a step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._backend import resolve_backend
from ._checks import FLOAT_DTYPES, check_shape, check_tensor, default_sm_scale
from .merge_states import merge_states_torch

SUPPORTED_BACKENDS = ("torch", "triton", "cpu", "cuda")

# Default kv chunking when the caller gives none: a segment read by n queries is split into
# chunks of clamp(next_pow2(32 * n), 256, 8192) tokens. Each chunk writes n fp32 partials per
# head, so 32 tokens per query keeps partial traffic well below the chunk's KV bytes while
# short-query segments (a few branches over a long prompt) still split into many programs.
_MIN_CHUNK, _MAX_CHUNK, _TOKENS_PER_QUERY = 256, 8192, 32
DEFAULT_QUERIES_PER_TILE = 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_kv_chunk(num_queries_of_segment: int, cap: int = _MAX_CHUNK) -> int:
    """Tokens per work item for a segment read by `num_queries_of_segment` queries."""
    return min(cap, max(_MIN_CHUNK, _next_pow2(_TOKENS_PER_QUERY * max(1, num_queries_of_segment))))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(name: str, value) -> list[int]:
    """A 1-D sequence or integer tensor as a list of python ints."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got a {value.dim()}-D {value.dtype} tensor")
        return [int(v) for v in value.tolist()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {type(value).__name__}")
    out = []
    for j, v in enumerate(value):
        if not _is_int(v):
            raise TypeError(f"{name}[{j}] must be an int, got {type(v).__name__}")
        out.append(v)
    return out


class TreeAttentionPlan:
    """Validated, device-resident description of which query rows attend to which paged KV segments.

    segments: sequence of (pages, length, queries). The segment's tokens live in order in `pages`
      (token t at page pages[t // page_size], slot t % page_size); `length` is its initial length
      (0 <= length <= len(pages) * page_size = its capacity); `queries` are distinct query rows
      in [0, num_queries) that attend to the whole segment. A query attends to the union of the
      segments listing it; a query listed by none gets o = 0, lse = -inf.
    kv_chunk_size: tokens per work item (flash-decoding split); default per segment
      clamp(next_pow2(32 * its query count), 256, 8192). queries_per_tile: queries per work item (16).

    Host ints: num_queries, page_size, num_segments, num_work, num_partials, max_page (-1 if no
    pages), kv_chunk_size (upper bound of work_kv_end - work_kv_start), queries_per_tile,
    max_work_queries (largest work_q_end - work_q_start).
    Device int32 tensors (on `device`):
      page_table [total_pages]          pages of all segments concatenated
      seg_page_start [num_segments]     offset of segment s's pages in page_table
      seg_capacity [num_segments]       len(pages) * page_size
      seg_lens [num_segments]           current lengths (mutable, see set_lengths; kernels clamp to [0, capacity])
      seg_queries [total_query_refs]    query rows of all segments concatenated, each in given order
      work_seg, work_kv_start, work_kv_end, work_q_start, work_q_end, work_out [num_work]:
        one item per (segment, kv chunk, query tile) in that nesting order; token range
        [kv_start, kv_end) inside the segment (laid over capacity), query range [q_start, q_end)
        into seg_queries; its j-th query writes partial slot work_out + j.
      query_slot_indptr [num_queries + 1], query_slots [num_partials]: CSR of each query's partial slots.
    Host copies for the torch backend: seg_pages_host, seg_queries_host (lists of lists), seg_capacity_host.
    """

    def __init__(self, segments, num_queries: int, page_size: int, *, device=None,
                 kv_chunk_size: int | None = None, queries_per_tile: int | None = None):
        if not _is_int(num_queries) or num_queries < 0:
            raise ValueError(f"num_queries must be a non-negative int, got {num_queries!r}")
        if not _is_int(page_size) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if kv_chunk_size is not None and (not _is_int(kv_chunk_size) or kv_chunk_size < 1):
            raise ValueError(f"kv_chunk_size must be a positive int or None, got {kv_chunk_size!r}")
        if queries_per_tile is None:
            queries_per_tile = DEFAULT_QUERIES_PER_TILE
        if not _is_int(queries_per_tile) or queries_per_tile < 1:
            raise ValueError(f"queries_per_tile must be a positive int or None, got {queries_per_tile!r}")
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
            raise TypeError(f"segments must be a sequence of (pages, length, queries), got {type(segments).__name__}")

        self.num_queries = num_queries
        self.page_size = page_size
        self.queries_per_tile = queries_per_tile
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        seg_pages, seg_lens, seg_queries, seg_chunk = [], [], [], []
        for s, seg in enumerate(segments):
            if not isinstance(seg, (tuple, list)) or len(seg) != 3:
                raise TypeError(f"segments[{s}] must be a (pages, length, queries) tuple, got {seg!r:.80}")
            pages = _int_list(f"segments[{s}].pages", seg[0])
            length = seg[1]
            queries = _int_list(f"segments[{s}].queries", seg[2])
            if any(p < 0 for p in pages):
                raise ValueError(f"segments[{s}].pages must be non-negative page indices, got {min(pages)}")
            capacity = len(pages) * page_size
            if not _is_int(length) or not 0 <= length <= capacity:
                raise ValueError(
                    f"segments[{s}].length must be an int in [0, {capacity}] (len(pages)={len(pages)} x page_size={page_size}), got {length!r}")
            bad = [qi for qi in queries if not 0 <= qi < num_queries]
            if bad:
                raise ValueError(f"segments[{s}].queries must be in [0, {num_queries}), got {bad[0]}")
            if len(set(queries)) != len(queries):
                raise ValueError(f"segments[{s}].queries must be distinct, got duplicates in {queries[:16]}")
            seg_pages.append(pages)
            seg_lens.append(length)
            seg_queries.append(queries)
            seg_chunk.append(kv_chunk_size if kv_chunk_size is not None else default_kv_chunk(len(queries)))

        self.num_segments = len(seg_pages)
        self.seg_pages_host = seg_pages
        self.seg_queries_host = seg_queries
        self.seg_capacity_host = [len(p) * page_size for p in seg_pages]
        all_pages = [p for pages in seg_pages for p in pages]
        self.max_page = max(all_pages) if all_pages else -1
        self.kv_chunk_size = max(seg_chunk) if kv_chunk_size is None and seg_chunk else (kv_chunk_size or _MAX_CHUNK)

        page_start, query_start = [], []
        n_pages = n_queries = 0
        for pages, queries in zip(seg_pages, seg_queries):
            page_start.append(n_pages)
            query_start.append(n_queries)
            n_pages += len(pages)
            n_queries += len(queries)

        work = {k: [] for k in ("seg", "kv_start", "kv_end", "q_start", "q_end", "out")}
        slots_of_query: list[list[int]] = [[] for _ in range(num_queries)]
        num_partials = 0
        for s, (queries, cap, chunk) in enumerate(zip(seg_queries, self.seg_capacity_host, seg_chunk)):
            if not queries:
                continue
            for kv_start in range(0, cap, chunk):
                for t in range(0, len(queries), queries_per_tile):
                    tile = queries[t:t + queries_per_tile]
                    work["seg"].append(s)
                    work["kv_start"].append(kv_start)
                    work["kv_end"].append(min(kv_start + chunk, cap))
                    work["q_start"].append(query_start[s] + t)
                    work["q_end"].append(query_start[s] + t + len(tile))
                    work["out"].append(num_partials)
                    for j, qi in enumerate(tile):
                        slots_of_query[qi].append(num_partials + j)
                    num_partials += len(tile)
        self.num_work = len(work["seg"])
        self.num_partials = num_partials
        self.max_work_queries = max((e - b for b, e in zip(work["q_start"], work["q_end"])), default=0)

        indptr = [0]
        for slots in slots_of_query:
            indptr.append(indptr[-1] + len(slots))

        def i32(values):
            return torch.tensor(values, dtype=torch.int32).to(self.device)

        self.page_table = i32(all_pages)
        self.seg_page_start = i32(page_start)
        self.seg_capacity = i32(self.seg_capacity_host)
        self.seg_lens = i32(seg_lens)
        self.seg_queries = i32([qi for queries in seg_queries for qi in queries])
        self.work_seg = i32(work["seg"])
        self.work_kv_start = i32(work["kv_start"])
        self.work_kv_end = i32(work["kv_end"])
        self.work_q_start = i32(work["q_start"])
        self.work_q_end = i32(work["q_end"])
        self.work_out = i32(work["out"])
        self.query_slot_indptr = i32(indptr)
        self.query_slots = i32([slot for slots in slots_of_query for slot in slots])
        # torch.device("cuda") -> "cuda:0": compare against tensors' devices exactly.
        self.device = self.seg_lens.device

    def set_lengths(self, lengths) -> None:
        """Set the current segment lengths in place (the plan's structure is unchanged).

        lengths: sequence of num_segments ints (checked against each capacity on the host), or an
        integer tensor [num_segments] on the plan's device (copied without a host sync; values
        are checked only when it is on the CPU, otherwise kernels clamp them into [0, capacity]).
        """
        if isinstance(lengths, torch.Tensor):
            check_tensor("lengths", lengths, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device)
            check_shape("lengths", lengths, (self.num_segments,))
            if lengths.device.type == "cpu":
                self._check_lengths(lengths.tolist())
            self.seg_lens.copy_(lengths)
            return
        values = _int_list("lengths", lengths)
        if len(values) != self.num_segments:
            raise ValueError(f"lengths must have num_segments={self.num_segments} entries, got {len(values)}")
        self._check_lengths(values)
        self.seg_lens.copy_(torch.tensor(values, dtype=torch.int32))

    def _check_lengths(self, values: list[int]) -> None:
        for s, (n, cap) in enumerate(zip(values, self.seg_capacity_host)):
            if not 0 <= n <= cap:
                raise ValueError(f"lengths[{s}] must be in [0, {cap}] (capacity of segment {s}), got {n}")

    def __repr__(self) -> str:
        return (f"TreeAttentionPlan(num_segments={self.num_segments}, num_queries={self.num_queries}, "
                f"page_size={self.page_size}, num_work={self.num_work}, num_partials={self.num_partials}, "
                f"device={self.device})")


def attend_segment_torch(q_rows, k, v, length, sm_scale):
    """Attention of q_rows [n, Hq, D] over the first `length` tokens of k, v [T, Hkv, D] (fp32 math).

    `length` is a 0-d integer tensor (read on the device, clamped into [0, T]).
    Returns (o [n, Hq, D] float32, lse [n, Hq] float32); an empty key set gives o = 0, lse = -inf.
    """
    group = q_rows.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->nht", q_rows.float(), k) * sm_scale
    valid = torch.arange(k.shape[0], device=k.device) < length.clamp(0, k.shape[0])
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    # Slots past `length` may hold stale or unwritten values (NaN): 0 * NaN would leak.
    v = torch.where(valid[:, None, None], v, 0.0)
    return torch.einsum("nht,thd->nhd", probs, v), lse


def tree_attention_torch(q, k_cache, v_cache, plan: TreeAttentionPlan, sm_scale: float):
    """Reference: loop over segments, gather their pages, attend, merge per query by LSE."""
    num_q, hq, d = q.shape
    o = torch.zeros(num_q, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((num_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    for s, (pages, queries) in enumerate(zip(plan.seg_pages_host, plan.seg_queries_host)):
        if not queries or not pages:
            continue
        page_idx = torch.tensor(pages, dtype=torch.long, device=q.device)
        k = k_cache[page_idx].reshape(len(pages) * page_size, hkv, d)
        v = v_cache[page_idx].reshape(len(pages) * page_size, hkv, d)
        rows = torch.tensor(queries, dtype=torch.long, device=q.device)
        o_s, lse_s = attend_segment_torch(q[rows], k, v, plan.seg_lens[s], sm_scale)
        o[rows], lse[rows] = merge_states_torch(o[rows], lse[rows], o_s, lse_s)
    return o.to(q.dtype), lse


def _validate(q, k_cache, v_cache, plan):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype ({q.dtype}), got {k_cache.dtype} and {v_cache.dtype}")
    num_q, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_cache.shape
    check_shape("k_cache", k_cache, (None, None, None, d))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"num q heads ({hq}) must be a positive multiple of num kv heads ({hkv}); q {list(q.shape)}, k_cache {list(k_cache.shape)}")
    if not isinstance(plan, TreeAttentionPlan):
        raise TypeError(f"plan must be a TreeAttentionPlan, got {type(plan).__name__}")
    if plan.num_queries != num_q:
        raise ValueError(f"plan.num_queries ({plan.num_queries}) must equal q.shape[0] ({num_q})")
    if plan.page_size != page_size:
        raise ValueError(f"plan.page_size ({plan.page_size}) must equal k_cache.shape[1] ({page_size})")
    if plan.max_page >= num_pages:
        raise ValueError(f"plan uses page {plan.max_page} but k_cache has only {num_pages} pages (shape {list(k_cache.shape)})")
    if plan.device != device:
        raise ValueError(f"plan is on {plan.device} but q is on {device}: build the plan with device=q.device")


def tree_attention(q, k_cache, v_cache, plan: TreeAttentionPlan, *, sm_scale=None, return_lse: bool = False,
                   backend: str = "auto"):
    """Attention of each query row over the union of its plan segments in a paged KV pool.

    q: [num_queries, Hq, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D] (q's dtype: fp16/bf16/fp32),
    Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)); plan: TreeAttentionPlan on q's device.
    Returns o [num_queries, Hq, D] (q's dtype), or (o, lse [num_queries, Hq] float32 natural-log LSE of
    sm_scale * q.k, -inf where a query attends to nothing) with return_lse=True.
    No host-device sync: a call can be captured in a CUDA graph and replayed after plan.set_lengths.
    """
    _validate(q, k_cache, v_cache, plan)
    scale = default_sm_scale(sm_scale, q.shape[-1])
    name = resolve_backend(backend, q.device, SUPPORTED_BACKENDS)
    if name == "torch":
        o, lse = tree_attention_torch(q, k_cache, v_cache, plan, scale)
    elif name == "triton":
        from .triton_ops.tree_attention import tree_attention_triton

        o, lse = tree_attention_triton(q, k_cache, v_cache, plan, scale)
    else:
        from . import _compiled

        o, lse = _compiled.tree_attention(q, k_cache, v_cache, plan, scale)
    return (o, lse) if return_lse else o
