"""TreeAttentionPlan + tree_attention against float64 attention over each query's explicit key list."""
import random

import pytest
import torch

from o1kernels import TreeAttentionPlan, tree_attention
from o1kernels.plan import PlanCapacity
from attention_reference import (LSE_TOLERANCES, TOLERANCES, backends_on, random_tree, random_values, report_mismatch,
                                 tree_attention_f64, tree_segments)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = backends_on("cpu")


def _pool(num_pages, page_size, hkv, d, dtype, device):
    k = torch.randn(num_pages, page_size, hkv, d, device=device).to(dtype)
    v = random_values((num_pages, page_size, hkv, d), dtype, device)
    return k, v


def _check(q, k, v, segments, plan, backend, lengths=None, sm_scale=None):
    lengths = [s[1] for s in segments] if lengths is None else lengths
    o, lse = tree_attention(q, k, v, plan, sm_scale=sm_scale, return_lse=True, backend=backend)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    o_ref, lse_ref = tree_attention_f64(q, k.cpu(), v.cpu(), segments, plan.page_size, lengths, scale)
    report_mismatch(f"o ({backend})", o, o_ref, *TOLERANCES[q.dtype])
    report_mismatch(f"lse ({backend})", lse, lse_ref, *LSE_TOLERANCES[q.dtype])


# (depth, max leaves, max segment length, page_size, Hq, Hkv, D, kv_chunk_size, queries_per_tile)
TREE_CASES = [
    (1, 3, 97, 16, 4, 4, 16, None, None),   # one segment shared by all; GQA 1
    (2, 8, 40, 8, 8, 2, 64, 32, None),      # two levels, GQA 4, kv split in chunks
    (3, 6, 33, 4, 8, 1, 32, 16, 2),         # MQA, query tiles of 2
    (4, 10, 21, 4, 16, 2, 16, 8, 3),        # depth 4, GQA 8, many small chunks
    (4, 6, 17, 4, 4, 2, 24, 16, 4),         # head_dim not a power of two
    (2, 4, 300, 16, 8, 2, 32, 128, 8),      # long segments: several BLOCK_N blocks per chunk
]


# Only the Triton backend reads segments along the direct path, so only it is run with every path.
BACKEND_PATHS = [(b, p) for b in BACKENDS for p in (("auto", "cascade", "decode") if b == "triton" else ("auto",))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: f"depth{c[0]}-hq{c[4]}-hkv{c[5]}-d{c[6]}")
def test_random_tree_matches_float64(backend, dtype, case, path, device="cpu"):
    depth, leaves_max, seg_len_max, page_size, hq, hkv, d, chunk, tile = case
    rng = random.Random(str(case))
    nodes, leaves = random_tree(leaves_max, depth, seg_len_max, rng)
    segments, num_pages = tree_segments(nodes, leaves, page_size, 3, rng)
    num_queries = len(leaves) + 1  # the last query row is listed by no segment: o = 0, lse = -inf
    plan = TreeAttentionPlan(segments, num_queries, page_size, device=device, kv_chunk_size=chunk, queries_per_tile=tile,
                             path=path)
    q = (torch.randn(num_queries, hq, d, device=device) * 2).to(dtype)
    k, v = _pool(num_pages, page_size, hkv, d, dtype, device)
    _check(q, k, v, segments, plan, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_256_and_strided_q(backend):
    rng = random.Random(5)
    nodes, leaves = random_tree(4, 2, 20, rng)
    segments, num_pages = tree_segments(nodes, leaves, 8, 2, rng)
    q = torch.randn(len(leaves), 4, 512)[:, :, ::2].to(torch.float16)  # non-contiguous q, D = 256
    k, v = _pool(num_pages, 8, 2, 256, torch.float16, "cpu")
    plan = TreeAttentionPlan(segments, len(leaves), 8, kv_chunk_size=8)
    _check(q, k, v, segments, plan, backend, sm_scale=0.2)



@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_element_offsets_past_int32(backend):
    """A pool whose slot stride puts slot 2 of a page 3 * 2**30 elements in (as a 1M-token prompt held as one page
    of a shared-prefix plan does at Hkv = 8, D = 256): the kernels' K/V offsets must be int64 (int32 wraps to a
    wrong row). The view lives in a 10 GB virtual allocation of which only the touched pages become resident."""
    page_size, d, stride_slot = 3, 16, 3 << 29
    base = torch.empty((1 << 31) + page_size * stride_slot, dtype=torch.bfloat16)
    k, v = (base.as_strided((1, page_size, 1, d), (page_size * stride_slot, stride_slot, d, 1), (1 << 30) + i * d)
            for i in range(2))
    k.copy_(random_values(k.shape, torch.bfloat16))
    v.copy_(random_values(v.shape, torch.bfloat16))
    segments = [([0], page_size, [0])]
    q = random_values((1, 2, d), torch.bfloat16)
    _check(q, k, v, segments, TreeAttentionPlan(segments, 1, page_size), backend)

def _grown_tree(device):
    """Root prompt of 37 tokens (pages 5,2,7) shared by 3 branches, each with a tail of capacity 16."""
    segments = [([5, 2, 7], 37, [0, 1, 2]), ([0, 3], 1, [0]), ([4, 9], 0, [1]), ([8, 1], 16, [2])]
    return segments, TreeAttentionPlan(segments, 3, 16, device=device, kv_chunk_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_lengths_grows_segments_without_replanning(backend, device="cpu"):
    segments, plan = _grown_tree(device)
    q = torch.randn(3, 4, 32, device=device)
    k, v = _pool(10, 16, 2, 32, torch.float32, device)
    _check(q, k, v, segments, plan, backend)
    for lengths in ([48, 2, 1, 16], torch.tensor([10, 32, 17, 0], dtype=torch.int32, device=device)):
        plan.set_lengths(lengths)
        expected = lengths if isinstance(lengths, list) else lengths.tolist()
        _check(q, k, v, segments, plan, backend, lengths=expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_out_of_range_are_clamped(backend):
    segments, plan = _grown_tree("cpu")
    q = torch.randn(3, 4, 32)
    k, v = _pool(10, 16, 2, 32, torch.float32, "cpu")
    plan.seg_lens.copy_(torch.tensor([1000, -5, 32, 33]))  # bypasses set_lengths' checks
    _check(q, k, v, segments, plan, backend, lengths=[48, 0, 32, 32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_past_length_are_never_read(backend):
    """Pool slots past a segment's current length hold NaN (stale or unwritten KV): outputs stay exact."""
    segments, plan = _grown_tree("cpu")
    lengths = [37, 1, 0, 9]
    plan.set_lengths(lengths)
    q = torch.randn(3, 4, 32)
    k, v = _pool(10, 16, 2, 32, torch.float32, "cpu")
    for (pages, _, _), length in zip(segments, lengths):
        for t in range(length, len(pages) * 16):
            k[pages[t // 16], t % 16] = float("nan")
            v[pages[t // 16], t % 16] = float("nan")
    _check(q, k, v, segments, plan, backend, lengths=lengths)


def check_layout_covers(layout, seg_caps, seg_queries, num_queries, queries_per_tile=None, kv_chunk_size=None):
    """Every (query, segment) pair is read exactly once: all the segment's token positions by the query's
    partial slots (shared work items) or by the query's direct list, never both; slots are owned by one query."""
    seg_q = layout.seg_queries.tolist()
    covered = {}  # (query, segment) -> token positions covered through partial slots
    slot_owner = {}
    for source in layout.sources:
        work = [w.tolist() for w in source.work]
        assert all(len(w) == source.num_work for w in work)
        for seg, lo, hi, q_lo, q_hi, out in zip(*work):
            if q_lo == q_hi:  # padding of a plan with a fixed capacity: an empty item
                continue
            assert 0 <= seg < source.seg_hi - source.seg_lo
            seg += source.seg_lo
            rows = seg_q[q_lo:q_hi]
            assert 0 <= lo < hi <= seg_caps[seg] and len(rows) <= source.max_work_queries
            if kv_chunk_size:
                assert hi - lo <= kv_chunk_size
            if queries_per_tile:
                assert len(rows) <= queries_per_tile
            for j, qi in enumerate(rows):
                covered.setdefault((qi, seg), []).extend(range(lo, hi))
                assert out + j not in slot_owner
                slot_owner[out + j] = qi
    direct = {}
    for entry in layout.direct:
        if entry is not None:
            indptr, segs = entry[0].tolist(), entry[1].tolist()
            for qi in range(num_queries):
                for seg in segs[indptr[qi]:indptr[qi + 1]]:
                    direct[(qi, seg)] = direct.get((qi, seg), 0) + 1
    for seg, queries in enumerate(seg_queries):
        for qi in queries:
            if seg_caps[seg] == 0:
                continue
            if (qi, seg) in direct:
                assert direct[(qi, seg)] == 1 and (qi, seg) not in covered
            else:
                assert sorted(covered[(qi, seg)]) == list(range(seg_caps[seg])), (qi, seg)
    assert set(direct) | set(covered) == {(qi, s) for s, qs in enumerate(seg_queries) for qi in qs if seg_caps[s]}
    assert sorted(slot_owner) == list(range(len(slot_owner))) and len(slot_owner) <= layout.num_partials
    indptr = layout.slot_indptr.tolist()
    slots = layout.slots.tolist()
    for qi in range(num_queries):
        mine = slots[indptr[qi]:indptr[qi + 1]]
        assert sorted(mine) == sorted(sl for sl, owner in slot_owner.items() if owner == qi)
    assert all(t.dtype == torch.int32 for t in (layout.page_table, layout.seg_lens, layout.slots))


@pytest.mark.parametrize("path", ("auto", "cascade", "decode"))
def test_plan_layouts_cover_each_segment_once_per_query(path):
    rng = random.Random(3)
    nodes, leaves = random_tree(12, 4, 50, rng)
    segments, _ = tree_segments(nodes, leaves, 4, 0, rng)
    plan = TreeAttentionPlan(segments, len(leaves), 4, kv_chunk_size=12, queries_per_tile=3, path=path)
    caps = [len(p) * 4 for p, _, _ in segments]
    queries = [q for _, _, q in segments]
    split = plan.layout("split")
    check_layout_covers(split, caps, queries, len(leaves), 3, 12)
    assert all(d is None for d in split.direct)
    for hq, hkv in ((8, 2), (4, 4)):
        fused = plan.layout("fused", hq, hkv, 32)
        check_layout_covers(fused, caps, queries, len(leaves), 3, 12)
        if path == "decode":
            assert fused.num_partials == 0
    for s, (pages, _, _) in enumerate(segments):
        assert plan.seg_pages_host[s] == pages
        table, page_start = split.source_views(split.sources[0])[:2]
        assert table[page_start[s]:page_start[s] + len(pages)].tolist() == pages
    assert plan.max_page == max(p for pages, _, _ in segments for p in pages)


def test_default_chunks_and_tiles_cover_long_shared_segments():
    """Default chunking (grid filling) and tiles on a long prompt read by many queries plus private tails."""
    segments = [(list(range(40)), 600, list(range(20)))] + [([40 + i], 3, [i]) for i in range(20)]
    plan = TreeAttentionPlan(segments, 20, 16)
    caps = [len(p) * 16 for p, _, _ in segments]
    for lay in (plan.layout("split"), plan.layout("fused", 16, 2, 64), plan.layout("fused", 8, 8, 64)):
        check_layout_covers(lay, caps, [q for _, _, q in segments], 20)


# ---- plans with a fixed capacity (capture-stable) ----------------------------------------------------------------

CAPACITY = PlanCapacity(segments=40, pages=120, query_refs=120, work=200, partials=400, direct=60)


def _random_forest(seed, num_pages_total=100, page_size=4):
    """A random tree over pages drawn from one pool of num_pages_total pages (several trees can share the pool)."""
    rng = random.Random(seed)
    nodes, leaves = random_tree(8, 3, 23, rng)
    segments, num_pages = tree_segments(nodes, leaves, page_size, 0, rng)
    assert num_pages <= num_pages_total
    perm = list(range(num_pages_total))
    rng.shuffle(perm)
    return [([perm[p] for p in pages], length, queries) for pages, length, queries in segments], len(leaves)


def _capacity_trees(num_queries: int, count: int = 4):
    """`count` random trees over one 100-page pool, their query rows cut to [0, num_queries)."""
    trees = []
    for seed in range(count):
        segments, _ = _random_forest(seed)
        trees.append([(pages, length, [q for q in queries if q < num_queries]) for pages, length, queries in segments])
    return trees


@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
def test_capacity_plan_update_in_place(backend, path):
    """update() swaps the tree (as forks and releases do) without new tensors: every layout's index tensors
    keep their storage, and results match float64 for each tree; lengths grow with set_lengths in between."""
    num_queries = 8
    k, v = _pool(100, 4, 2, 16, torch.float32, "cpu")
    trees = _capacity_trees(num_queries, count=3)
    plan = TreeAttentionPlan(trees[0], num_queries, 4, path=path, capacity=CAPACITY, kv_chunk_size=8)
    q = torch.randn(num_queries, 4, 16)
    _check(q, k, v, trees[0], plan, backend)
    split = plan.layout("split")
    storage = {id(lay): lay.buffer.data_ptr() for lay in plan._layouts.values()}
    for segments in trees[1:]:
        plan.update(segments)
        grown = [min(length + 1, len(pages) * 4) for pages, length, _ in segments]
        plan.set_lengths(grown)
        q = torch.randn(num_queries, 4, 16)
        _check(q, k, v, segments, plan, backend, lengths=grown)
        assert {id(lay): lay.buffer.data_ptr() for lay in plan._layouts.values() if id(lay) in storage} == storage
        check_layout_covers(split, [len(p) * 4 for p, _, _ in segments], [qs for _, _, qs in segments], num_queries)


def test_capacity_plan_rejects_a_tree_that_does_not_fit():
    segments, _ = _random_forest(1)
    plan = TreeAttentionPlan(segments, 8, 4, capacity=CAPACITY, kv_chunk_size=8, queries_per_tile=1)
    before = plan.layout("split").buffer.clone()
    too_many = [([0], 1, [0])] * 41
    with pytest.raises(ValueError, match=r"does not fit its capacity \(segments 41 > 40\)"):
        plan.update(too_many)
    long_segment = [(list(range(100)), 400, list(range(8)))]  # 50 chunks x 8 one-query tiles
    with pytest.raises(ValueError, match=r"does not fit its capacity \(work 400 > 200\)"):
        plan.update(long_segment)
    assert torch.equal(plan.layout("split").buffer, before) and plan.num_segments == len(segments)
    with pytest.raises(ValueError, match="update\\(\\) needs a plan built with capacity"):
        TreeAttentionPlan(segments, 8, 4).update(segments)
    with pytest.raises(TypeError, match="capacity must be a PlanCapacity"):
        TreeAttentionPlan(segments, 8, 4, capacity=(1, 2))
    with pytest.raises(ValueError, match=r"capacity.work must be an int"):
        PlanCapacity(segments=1, pages=1, query_refs=1, work=-1, partials=1, direct=1)


# ---- bad input --------------------------------------------------------------------------------------------------


def test_host_values_inside_a_capture_raise(monkeypatch):
    """Inside a CUDA-graph capture, set_lengths with Python ints and update(segments) would be captured as copies
    from a pinned host buffer that is recycled after the capture (replays copy stale values): they raise and change
    nothing; lengths in a tensor on the plan's device are taken. The capture state is patched in (no GPU here)."""
    import o1kernels.plan as plan_module

    trees = _capacity_trees(8)
    plan = TreeAttentionPlan(trees[0], 8, 4, capacity=CAPACITY)
    before = plan.seg_lens.clone()
    lengths = [max(0, length - 1) for _, length, _ in trees[0]]
    monkeypatch.setattr(plan_module, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="lengths: inside a CUDA-graph capture pass an int32/int64 tensor"):
        plan.set_lengths(lengths)
    with pytest.raises(RuntimeError, match=r"update\(segments\): inside a CUDA-graph capture"):
        plan.update(trees[1])
    assert torch.equal(plan.seg_lens, before) and plan.seg_pages_host == [pages for pages, _, _ in trees[0]]
    plan.set_lengths(torch.tensor(lengths, dtype=torch.int32))
    assert plan.seg_lens[:len(lengths)].tolist() == lengths

def _plan_error(segments, num_queries=3, page_size=4, **kw):
    return lambda: TreeAttentionPlan(segments, num_queries, page_size, **kw)


GOOD_SEGMENTS = [([0, 1], 5, [0, 1]), ([2], 3, [2])]


@pytest.mark.parametrize("make,exc,match", [
    (_plan_error(GOOD_SEGMENTS, num_queries=-1), ValueError, r"num_queries must be an int in \[0, 2\*\*31 - 1\]"),
    (_plan_error(GOOD_SEGMENTS, num_queries=2.0), ValueError, "num_queries"),
    (_plan_error(GOOD_SEGMENTS, num_queries=2**31 + 3), ValueError, r"num_queries must be an int in \[0, 2\*\*31 - 1\], got 2147483651"),
    (_plan_error(GOOD_SEGMENTS, page_size=0), ValueError, r"page_size must be an int in \[1, 2\*\*31 - 1\]"),
    (_plan_error([([0, 1, 2], 5, [0])], page_size=2**31 - 1), ValueError, r"segments\[0\] holds 3 pages x page_size 2147483647"),
    (_plan_error([([0, 2**31], 5, [0])]), ValueError, r"segments\[0\].pages must be page indices in \[0, 2\*\*31 - 1\], got 2147483648"),
    (_plan_error([([2**63 - 1], 1, [0])]), ValueError, r"segments\[0\].pages must be page indices"),
    (_plan_error([(list(range(4096)), 5, [0, 1, 2])], page_size=4096, kv_chunk_size=1, queries_per_tile=1), ValueError,
     "more than 16777216 work items"),
    (_plan_error(GOOD_SEGMENTS, device="nonsense"), ValueError, "device must be a torch device such as 'cpu' or 'cuda:0', got 'nonsense'"),
    (_plan_error(GOOD_SEGMENTS, path="fast"), ValueError, "path must be one of"),
    (_plan_error(GOOD_SEGMENTS, num_heads=(6, 4)), ValueError, "num_heads must be"),
    (_plan_error(GOOD_SEGMENTS, kv_chunk_size=0), ValueError, "kv_chunk_size"),
    (_plan_error(GOOD_SEGMENTS, queries_per_tile=0), ValueError, "queries_per_tile"),
    (_plan_error(5), TypeError, "segments must be a sequence"),
    (_plan_error([([0], 1)]), TypeError, r"segments\[0\] must be a \(pages, length, queries\)"),
    (_plan_error([([0], 1, [0]), (torch.tensor([1.0]), 1, [1])]), TypeError, r"segments\[1\].pages must be a 1-D integer"),
    (_plan_error([([0, -2], 5, [0])]), ValueError, r"segments\[0\].pages must be page indices in \[0, 2\*\*31 - 1\], got -2"),
    (_plan_error([([0], 1, [0]), ([1], 5, [1])]), ValueError, r"segments\[1\].length must be an int in \[0, 4\]"),
    (_plan_error([([0], -1, [0])]), ValueError, r"segments\[0\].length"),
    (_plan_error([([0], 1, [0, 3])]), ValueError, r"segments\[0\].queries must be in \[0, 3\), got 3"),
    (_plan_error([([0], 1, [1, 1])]), ValueError, r"segments\[0\].queries must be distinct"),
    (_plan_error([([0], 1, [0.5])]), TypeError, r"segments\[0\].queries\[0\] must be an int"),
])
def test_plan_rejects_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_plan_on_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        TreeAttentionPlan(GOOD_SEGMENTS, 3, 4, device="cuda")


def test_set_lengths_rejects_bad_input():
    plan = TreeAttentionPlan(GOOD_SEGMENTS, 3, 4)
    with pytest.raises(ValueError, match="lengths must have num_segments=2 entries"):
        plan.set_lengths([1])
    with pytest.raises(ValueError, match=r"lengths\[0\] must be in \[0, 8\]"):
        plan.set_lengths([9, 0])
    with pytest.raises(ValueError, match=r"lengths\[1\] must be in \[0, 4\]"):
        plan.set_lengths(torch.tensor([1, -1]))
    with pytest.raises(TypeError, match="lengths must have dtype"):
        plan.set_lengths(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths must have shape \[2\]"):
        plan.set_lengths(torch.tensor([1, 2, 3]))
    assert plan.seg_lens.tolist() == [5, 3]


def _call_args():
    plan = TreeAttentionPlan(GOOD_SEGMENTS, 3, 4)
    return dict(q=torch.randn(3, 4, 16), k_cache=torch.randn(3, 4, 2, 16), v_cache=torch.randn(3, 4, 2, 16), plan=plan)


@pytest.mark.parametrize("name,bad,exc,match", [
    ("q", torch.randn(3, 64), ValueError, "q must have 3 dimensions"),
    ("q", torch.zeros(3, 4, 16, dtype=torch.int64), TypeError, "q must have dtype"),
    ("k_cache", torch.randn(3, 4, 2, 16, dtype=torch.float16), TypeError, "k_cache and v_cache must have q's dtype"),
    ("k_cache", torch.randn(3, 4, 2, 8), ValueError, r"k_cache must have shape \[\*, \*, \*, 16\]"),
    ("v_cache", torch.randn(3, 4, 1, 16), ValueError, r"v_cache must have shape \[3, 4, 2, 16\]"),
    ("v_cache", torch.randn(3, 4, 2, 16, device="meta"), ValueError, "v_cache must be on cpu"),
    (("k_cache", "v_cache"), torch.randn(3, 4, 3, 16), ValueError, r"num q heads \(4\) must be a positive multiple of num kv heads \(3\)"),
    ("plan", "plan", TypeError, "plan must be a TreeAttentionPlan"),
    ("plan", lambda: TreeAttentionPlan(GOOD_SEGMENTS, 4, 4), ValueError, r"plan.num_queries \(4\) must equal q.shape\[0\] \(3\)"),
    ("plan", lambda: TreeAttentionPlan([([0, 1], 3, [0])], 3, 2), ValueError, r"plan.page_size \(2\) must equal k_cache.shape\[1\] \(4\)"),
    ("plan", lambda: TreeAttentionPlan([([0, 3], 5, [0])], 3, 4), ValueError, "plan uses page 3 but k_cache has only 3 pages"),
    ("plan", lambda: TreeAttentionPlan(GOOD_SEGMENTS, 3, 4, device="meta"), ValueError, "plan is on meta but q is on cpu"),
])
def test_tree_attention_rejects_bad_input(name, bad, exc, match):
    args = _call_args()
    for n in (name,) if isinstance(name, str) else name:
        args[n] = bad() if callable(bad) else bad
    with pytest.raises(exc, match=match):
        tree_attention(**args)


def test_head_dim_zero_is_a_clear_error():
    args = dict(_call_args(), q=torch.randn(3, 4, 0), k_cache=torch.randn(3, 4, 2, 0), v_cache=torch.randn(3, 4, 2, 0))
    with pytest.raises(ValueError, match=r"head_dim \(q.shape\[-1\]\) must be >= 1, got shape \[3, 4, 0\]"):
        tree_attention(**args)


def test_tree_attention_rejects_bad_options():
    with pytest.raises(ValueError, match="sm_scale must be a finite positive number"):
        tree_attention(**_call_args(), sm_scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        tree_attention(**_call_args(), backend="flash")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        tree_attention(**_call_args(), backend="cuda")
    if "triton" in BACKENDS:
        args = _call_args()
        args["q"], args["k_cache"], args["v_cache"] = torch.randn(3, 4, 512), torch.randn(3, 4, 2, 512), torch.randn(3, 4, 2, 512)
        with pytest.raises(ValueError, match="head_dim up to 256, got 512"):
            tree_attention(**args, backend="triton")


# ---- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_attention_cuda(dtype):
    for backend in backends_on("cuda"):
        for case in TREE_CASES:
            for path in ("auto", "cascade", "decode"):
                if path == "auto" or backend == "triton":
                    test_random_tree_matches_float64(backend, dtype, case, path, device="cuda")
        test_set_lengths_grows_segments_without_replanning(backend, device="cuda")


# The backends a CUDA graph can capture (the torch reference builds index tensors on the device per call: not
# capturable, and a loop that met it first never reached these).
CAPTURE_BACKENDS = ("triton", "cuda")


def _capturable(backend):
    if backend not in backends_on("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU machine")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CAPTURE_BACKENDS)
def test_tree_attention_cuda_graph_replay_after_set_lengths(backend):
    _capturable(backend)
    segments, plan = _grown_tree("cuda")
    q = torch.randn(3, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = _pool(10, 16, 2, 64, torch.bfloat16, "cuda")
    tree_attention(q, k, v, plan, backend=backend)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = tree_attention(q, k, v, plan, return_lse=True, backend=backend)
    for lengths in ([40, 5, 16, 3], [48, 32, 0, 17]):
        plan.set_lengths(torch.tensor(lengths, dtype=torch.int32, device="cuda"))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        o_ref, lse_ref = tree_attention_f64(q, k.cpu(), v.cpu(), segments, 16, lengths, 64 ** -0.5)
        report_mismatch(f"o ({backend}, graph)", o, o_ref, *TOLERANCES[torch.bfloat16])
        report_mismatch(f"lse ({backend}, graph)", lse, lse_ref, *LSE_TOLERANCES[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CAPTURE_BACKENDS)
def test_capacity_plan_cuda_graph_replays_updated_trees(backend):
    """Capture tree_attention once on a plan with a fixed capacity; swap trees with update() and grow lengths
    with set_lengths between replays: the same graph computes each tree. Inside the capture, host values for
    set_lengths / update raise (they would be copied from a recycled host buffer at every replay)."""
    _capturable(backend)
    num_queries = 8
    k, v = _pool(100, 4, 2, 64, torch.bfloat16, "cuda")
    trees = _capacity_trees(num_queries)
    plan = TreeAttentionPlan(trees[0], num_queries, 4, device="cuda", capacity=CAPACITY)
    q = torch.randn(num_queries, 8, 64, device="cuda", dtype=torch.bfloat16)
    tree_attention(q, k, v, plan, backend=backend)  # lays out, compiles, allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = tree_attention(q, k, v, plan, return_lse=True, backend=backend)
        with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
            plan.set_lengths([length for _, length, _ in trees[0]])
        with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
            plan.update(trees[1])
    for segments in trees[1:] + trees[:1]:
        plan.update(segments)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        lengths = [length for _, length, _ in segments]
        o_ref, lse_ref = tree_attention_f64(q, k.cpu(), v.cpu(), segments, 4, lengths, 64 ** -0.5)
        report_mismatch(f"o ({backend}, graph)", o, o_ref, *TOLERANCES[torch.bfloat16])
        report_mismatch(f"lse ({backend}, graph)", lse, lse_ref, *LSE_TOLERANCES[torch.bfloat16])



@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_launches_on_the_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: the Triton launchers enter the inputs' device (device_guard)."""
    import o1kernels

    segments, plan = _grown_tree("cuda:1")
    q = torch.randn(3, 8, 64, device="cuda:1", dtype=torch.bfloat16)
    k, v = _pool(10, 16, 2, 64, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        _check(q, k, v, segments, plan, "triton")
        o, lse = tree_attention(q, k, v, plan, return_lse=True, backend="triton")
        merged, _ = o1kernels.merge_states(o, lse, o, lse, backend="triton")
    torch.cuda.synchronize(1)
    report_mismatch("merge_states on cuda:1", merged, o.float(), *TOLERANCES[torch.bfloat16])

def test_auto_backend_matches_float64():
    segments, plan = _grown_tree("cpu")
    q = torch.randn(3, 4, 32, dtype=torch.bfloat16)
    k, v = _pool(10, 16, 2, 32, torch.bfloat16, "cpu")
    _check(q, k, v, segments, plan, "auto")
