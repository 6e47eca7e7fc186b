"""The compiled extension o1kernels._C on the CPU: its torch ops against float64 references,
fake tensors, torch.library.opcheck, torch.compile(fullgraph=True), and the C++ argument checks.

backend="cpu" is also checked against the float64 references over the op owners' full case lists
in test_tree_attention.py, test_shared_prefix_attention.py, test_merge_states.py and
test_step_rewards.py (they run every available backend); this file covers what only the compiled
layer has: the ops called directly (each split-K partial before merging, the CSR merge), the
device-side planning of shared_prefix_attention, tracing, and TORCH_CHECKs.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import o1kernels
from o1kernels import TreeAttentionPlan, _ext
from attention_reference import (LSE_TOLERANCES, TOLERANCES, attention_f64, positioned_tree, random_tree, random_values,
                                 report_mismatch, tree_segments)
from step_rewards_reference import reference_step_rewards

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"{_ext._IMPORT_ERROR} (csrc/tools/compile_check.sh fails CI on this)")
if _ext._C is not None:
    from o1kernels import _compiled

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ops = torch.ops.o1kernels


def split_layout(plan, window=None):
    """The layout the compiled ops run (every segment through work items) and its one source."""
    layout = plan.layout("split", window=window)
    return layout, layout.sources[0]


def plan_fields(plan, window=None):
    """tree_attention_partial's index arguments for a TreeAttentionPlan, up to max_work_queries (seg_start and q_pos
    None without positions)."""
    layout, source = split_layout(plan, window)
    positions = (layout.seg_start, layout.q_pos) if layout.causal else (None, None)
    return (*layout.source_views(source), layout.seg_queries, *source.work, *positions)


def segment_tokens(cache, pages, page_size, tokens):
    """The given tokens of a segment living in `pages`, gathered one by one: [len(tokens), Hkv, D]."""
    rows = [cache[pages[t // page_size], t % page_size] for t in tokens]
    return torch.stack(rows) if rows else cache.new_zeros((0,) + tuple(cache.shape[2:]))


# The CPU kernel runs a work item of <= 64 kv tokens read by <= 16 query heads per kv head as loops, a larger one
# as batched matrix products (csrc/cpu/tree_attention.cpp): "loops" has small items only, "mixed" (a 200-token root
# read in 128-token chunks) large ones too.
SMALL_ITEM_TOKENS, SMALL_ITEM_ROWS = 64, 16
ITEM_SIZES = {"loops": (8, 2), "mixed": (128, 16)}  # (kv_chunk_size, queries_per_tile)


# "positions": segments start where their parent ends, each of 3 leaves has up to 3 query rows (a chunk, causal
# inside), window 150 (rows of one item see different parts of a root chunk, or none of it) and softcap 4.
VARIANTS = {"plain": dict(window=None, softcap=None), "positions": dict(window=150, softcap=4.0)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 32), (4, 1, 64), (6, 6, 24)])
@pytest.mark.parametrize("items", ITEM_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_partial_matches_float64(dtype, hq, hkv, d, items, variant):
    """Every work item's partial (one kv chunk of one segment), checked before any merging."""
    rng = random.Random(f"{dtype}{hq}{hkv}{d}")
    nodes, leaves = random_tree(6, 3, 30, rng)
    nodes[0] = (200, -1)
    window, softcap = VARIANTS[variant]["window"], VARIANTS[variant]["softcap"]
    if variant == "plain":
        segments, num_pages = tree_segments(nodes, leaves, 4, 2, rng)
        positions, num_q = None, len(leaves)
    else:  # a root and two levels below it, three leaves of up to 3 rows each
        nodes = [(200, -1)] + [(rng.randint(0, 30), parent) for parent in (0, 0, 1, 1, 2)]
        segments, positions, num_pages = positioned_tree(nodes, [3, 4, 5], 4, rng, max_new=3)
        num_q = len(positions)
    kv_chunk, q_tile = ITEM_SIZES[items]
    plan = TreeAttentionPlan(segments, num_q, 4, kv_chunk_size=kv_chunk, queries_per_tile=q_tile, positions=positions)
    q = (torch.randn(num_q, hq, d) * 2).to(dtype)
    k = torch.randn(num_pages, 4, hkv, d).to(dtype)
    v = random_values((num_pages, 4, hkv, d), dtype)
    layout, source = split_layout(plan, window)

    def visible(seg, query, lo, hi):
        """Tokens of [lo, hi) of segment seg the query sees."""
        if positions is None:
            return list(range(lo, hi))
        start, pos = segments[seg][3], positions[query]
        return [t for t in range(lo, hi) if start + t <= pos and (window is None or pos - start - t < window)]

    work = list(zip(*(w.tolist() for w in source.work)))
    read = [set().union(*(visible(seg, int(layout.seg_queries[i]), lo, min(hi, segments[seg][1]))
                          for i in range(q0, q1))) for seg, lo, hi, q0, q1, _ in work]
    small = [len(r) <= SMALL_ITEM_TOKENS and (q1 - q0) * (hq // hkv) <= SMALL_ITEM_ROWS
             for r, (_, _, _, q0, q1, _) in zip(read, work)]  # the kernel reads the union of what its rows see
    assert all(small) if items == "loops" else not all(small)  # the path(s) this case tests
    if positions is not None:  # the per-row masks matter: some rows see less of an item than it reads
        assert any(len(visible(seg, int(layout.seg_queries[i]), lo, min(hi, segments[seg][1]))) < len(r)
                   for (seg, lo, hi, q0, q1, _), r in zip(work, read) for i in range(q0, q1))
    part_o = torch.full((layout.num_partials, hq, d), math.nan)
    part_lse = torch.full((layout.num_partials, hq), math.nan)
    ops.tree_attention_partial(q, k, v, *plan_fields(plan, window), source.max_work_queries, d ** -0.5, window,
                               softcap, part_o, part_lse)
    o_ref, lse_ref = torch.empty(part_o.shape, dtype=torch.float64), torch.empty(part_lse.shape, dtype=torch.float64)
    for seg, kv_lo, kv_hi, q_lo, q_hi, out in work:
        pages, length = segments[seg][:2]
        for j in range(q_hi - q_lo):
            query = int(layout.seg_queries[q_lo + j])
            tokens = visible(seg, query, kv_lo, min(kv_hi, length))
            keys = segment_tokens(k, pages, 4, tokens)
            values = segment_tokens(v, pages, 4, tokens)
            o_ref[out + j], lse_ref[out + j] = attention_f64(q[query], keys, values, d ** -0.5, softcap)
    # Partials are fp32 results of rounded inputs: the q-dtype tolerances apply.
    report_mismatch("part_o", part_o, o_ref, *TOLERANCES[dtype])
    report_mismatch("part_lse", part_lse, lse_ref, *LSE_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_sinks", (False, True), ids=("no_sinks", "sinks"))
def test_merge_partials_matches_float64(dtype, with_sinks):
    """CSR merge with shuffled slots, -inf partials, a query whose partials are all -inf and one with none; sinks:
    one more logit per head (a slot with o = 0), so those two queries get o = 0, lse = sink."""
    num_partials, h, d = 12, 3, 40
    part_o = torch.randn(num_partials, h, d)
    part_lse = torch.randn(num_partials, h) * 3
    part_lse[[1, 4, 7]] = -math.inf
    part_o[[1, 4, 7]] = 0
    slots_of = [[5, 0, 9], [1, 4], [], [11, 2, 8, 3, 7], [10, 6]]
    indptr = torch.tensor([0] + [len(s) for s in slots_of], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    slots = torch.tensor([x for s in slots_of for x in s], dtype=torch.int32)
    sinks = torch.randn(h) * 3 if with_sinks else None
    o = torch.full((len(slots_of), h, d), math.nan).to(dtype)
    lse = torch.full((len(slots_of), h), math.nan)
    ops.merge_partials(part_o, part_lse, indptr, slots, sinks, o, lse)
    o_ref = torch.zeros(len(slots_of), h, d, dtype=torch.float64)
    lse_ref = torch.full((len(slots_of), h), -math.inf, dtype=torch.float64)
    for n, s in enumerate(slots_of):
        lses, outs = part_lse[s].double(), part_o[s].double()
        if with_sinks:
            lses, outs = torch.cat([lses, sinks.double()[None]]), torch.cat([outs, torch.zeros(1, h, d)])
        if len(lses):
            lse_ref[n] = torch.logsumexp(lses, dim=0)
            weights = torch.exp(lses - lse_ref[n]).nan_to_num(0.0)  # -inf - -inf: no weight
            o_ref[n] = (weights.unsqueeze(-1) * outs).sum(0)
    # Outputs are stored in `dtype`: one rounding of a convex combination of values of size ~3.
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1e-2)}[dtype]
    report_mismatch("o", o, o_ref, atol, rtol)
    report_mismatch("lse", lse, lse_ref, 1e-5, 1e-5)


def test_shared_prefix_device_planning_clamps_unchecked_values():
    """The compiled run of a SharedPrefixPlan (which the CUDA path reaches without host checks) clamps
    lengths into [0, P] / [0, S] and groups into [0, G-1]. 20 branches: 17 on group 0, one on group 1,
    two on group 2 (clamped from 9 and -3); P and S over more than one kv chunk."""
    b, g, p, s, hq, hkv, d = 20, 3, 300, 260, 4, 2, 16
    q = torch.randn(b, hq, d) * 2
    pk, pv = torch.randn(g, p, hkv, d), random_values((g, p, hkv, d), torch.float32)
    sk, sv = torch.randn(b, s, hkv, d), random_values((b, s, hkv, d), torch.float32)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    prefix_lens = i32(999, 270, -4)
    suffix_lens = i32(-1, 0, 5, 260, 1000, 257, 3, *torch.randint(0, s + 1, (b - 7,)).tolist())
    groups = i32(0, 9, 0, -3, 0, 1, *([0] * (b - 6)))
    plan = o1kernels.SharedPrefixPlan(b, p, s, num_prefixes=g, kv_chunk_size=128)
    plan.seg_lens.copy_(torch.cat([prefix_lens, suffix_lens]))  # bypasses set_lengths' checks
    plan.branch_group.copy_(groups)
    plan.refill_groups()
    o, lse = _compiled.run_plan(plan, q, ((pk, pv), (sk, sv)), 0.3)
    outs, lses = [], []
    for i in range(b):
        gi = min(max(int(groups[i]), 0), g - 1)
        pl, sl = min(max(int(prefix_lens[gi]), 0), p), min(max(int(suffix_lens[i]), 0), s)
        o_i, lse_i = attention_f64(q[i], torch.cat([pk[gi, :pl], sk[i, :sl]]), torch.cat([pv[gi, :pl], sv[i, :sl]]), 0.3)
        outs.append(o_i)
        lses.append(lse_i)
    report_mismatch("o", o, torch.stack(outs), *TOLERANCES[torch.float32])
    report_mismatch("lse", lse, torch.stack(lses), *LSE_TOLERANCES[torch.float32])


# ---- tracing: fake tensors, opcheck, torch.compile ----

def small_attention_inputs(dtype=torch.float32):
    plan = TreeAttentionPlan([([2, 0], 7, [0, 1, 2]), ([5], 3, [1]), ([4, 1], 5, [2])], 3, 4, kv_chunk_size=4,
                             queries_per_tile=2)
    q = torch.randn(3, 8, 32).to(dtype)
    k, v = torch.randn(6, 4, 2, 32).to(dtype), random_values((6, 4, 2, 32), dtype)
    return q, k, v, plan


def positioned_inputs(dtype=torch.float32):
    """small_attention_inputs' tree with positions: a 7-token prompt, each row's tail ending at its position."""
    plan = TreeAttentionPlan([([2, 0], 7, [0, 1, 2], 0), ([5], 3, [1], 7), ([4, 1], 5, [2], 7)], 3, 4,
                             kv_chunk_size=4, queries_per_tile=2, positions=[5, 9, 11])
    q = torch.randn(3, 8, 32).to(dtype)
    k, v = torch.randn(6, 4, 2, 32).to(dtype), random_values((6, 4, 2, 32), dtype)
    return q, k, v, plan


def small_step_inputs(packed=False):
    hidden, mask = torch.randn(3, 10, 32) * 2, torch.rand(3, 10) < 0.4
    kwargs = dict(norm_weight=torch.rand(32) + 0.5, mlp_weight=torch.randn(16, 32) / 6, mlp_bias=torch.randn(16),
                  aggregate="mean")
    if packed:
        hidden, mask = hidden.reshape(30, 32), mask.reshape(30)
        kwargs["cu_seqlens"] = torch.tensor([0, 10, 10, 30], dtype=torch.int32)
    return hidden, mask, torch.randn(2, 16) / 4, torch.randn(2), kwargs


def test_fake_tensor_shape_propagation():
    q, k, v, plan = small_attention_inputs(torch.bfloat16)
    hidden, mask, weight, bias, kwargs = small_step_inputs(packed=True)
    pk, sk = torch.randn(2, 9, 2, 32, dtype=torch.bfloat16), torch.randn(3, 5, 2, 32, dtype=torch.bfloat16)
    sp_plan = o1kernels.SharedPrefixPlan(3, 9, 5, num_prefixes=2, branch_group=[1, 0, 1])
    pos_plan = positioned_inputs()[3]
    plan.layout("split")  # layouts are host-built before tracing, as they are when a real run comes first
    sp_plan.layout("split")
    pos_plan.layout("split", window=4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = _compiled.run_plan(plan, q, ((k, v),), 0.2)
        assert (o.shape, o.dtype, lse.shape, lse.dtype) == ((3, 8, 32), torch.bfloat16, (3, 8), torch.float32)
        o, lse = _compiled.run_plan(sp_plan, q, ((pk, pk), (sk, sk)), 0.2)
        assert (o.shape, o.dtype, lse.shape) == ((3, 8, 32), torch.bfloat16, (3, 8))
        o, lse = _compiled.run_plan(pos_plan, q, ((k, v),), 0.2, window=4, softcap=3.0, sinks=torch.randn(8))
        assert (o.shape, o.dtype, lse.shape, lse.dtype) == ((3, 8, 32), torch.bfloat16, (3, 8), torch.float32)
        o, lse = _compiled.merge_states(q, lse, q.float(), lse)
        assert (o.shape, o.dtype, lse.shape) == ((3, 8, 32), torch.bfloat16, (3, 8))
        args = (hidden, mask, kwargs["cu_seqlens"], weight, bias, kwargs["norm_weight"], 1e-6, kwargs["mlp_weight"],
                kwargs["mlp_bias"], "softmax", 1, "mean")
        scores, chain = _compiled.step_rewards(*args)
        assert (scores.shape, chain.shape, scores.dtype) == ((30,), (3,), torch.float32)


def opcheck_samples():
    q, k, v, plan = small_attention_inputs()
    layout, source = split_layout(plan)
    part_o, part_lse = torch.empty(layout.num_partials, 8, 32), torch.empty(layout.num_partials, 8)
    yield "tree_attention_partial", (q, k, v, *plan_fields(plan), source.max_work_queries, 0.2, None, None, part_o,
                                     part_lse)
    q, k, v, pos_plan = positioned_inputs()
    pos_layout, pos_source = split_layout(pos_plan, 4)
    yield "tree_attention_partial", (q, k, v, *plan_fields(pos_plan, 4), pos_source.max_work_queries, 0.2, 4, 3.0,
                                     torch.empty(pos_layout.num_partials, 8, 32), torch.empty(pos_layout.num_partials, 8))
    part_lse = torch.randn(layout.num_partials, 8)
    for sinks in (None, torch.randn(8)):
        yield "merge_partials", (torch.randn(layout.num_partials, 8, 32), part_lse, layout.slot_indptr,
                                 layout.slots, sinks, torch.empty(3, 8, 32), torch.empty(3, 8))
    yield "merge_states", (q, torch.randn(3, 8), q * 2, torch.randn(3, 8), torch.empty(3, 8, 32), torch.empty(3, 8))
    hidden, mask, weight, bias, kwargs = small_step_inputs()
    yield "step_rewards", (hidden, mask, None, weight, bias, kwargs["norm_weight"], 1e-6, kwargs["mlp_weight"],
                           kwargs["mlp_bias"], "softmax", 1, "mean", torch.empty(3, 10), torch.empty(3))


@pytest.mark.parametrize("name,args", list(opcheck_samples()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    """Schema (declared mutations), fake implementation and AOT dispatch agree with the real op."""
    torch.library.opcheck(getattr(ops, name).default, args)


def test_torch_compile_fullgraph_matches_eager():
    """A decode step through the public API (backend="cpu") compiles without graph breaks, and the
    compiled graph reads plan.seg_lens at run time (set_lengths needs no recompile)."""
    q, k, v, plan = small_attention_inputs()
    hidden, mask, weight, bias, kwargs = small_step_inputs()

    def step(q, k, v, plan, hidden, mask):
        o, lse = o1kernels.tree_attention(q, k, v, plan, return_lse=True, backend="cpu")
        o2, lse2 = o1kernels.merge_states(o, lse, o * 0.5, lse - 1.0, backend="cpu")
        scores, chain = o1kernels.step_rewards(hidden, mask, weight, bias, backend="cpu", **kwargs)
        return o2, lse2, scores, chain

    step(q, k, v, plan, hidden, mask)  # the first run lays the plan out and allocates its workspace
    compiled = torch.compile(step, fullgraph=True)
    for lengths in ([7, 3, 5], [2, 0, 8]):
        plan.set_lengths(lengths)
        for got, expected in zip(compiled(q, k, v, plan, hidden, mask), step(q, k, v, plan, hidden, mask)):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_torch_compile_fullgraph_with_variants():
    """tree_attention with positions, a window, softcap and sinks (backend="cpu") traces without graph breaks and
    reads plan.q_pos / plan.seg_lens at run time (set_positions and set_lengths need no recompile)."""
    q, k, v, plan = positioned_inputs()
    sinks = torch.randn(8)

    def call(q, k, v, plan, sinks):
        return o1kernels.tree_attention(q, k, v, plan, window=6, softcap=3.0, sinks=sinks, return_lse=True,
                                        backend="cpu")

    call(q, k, v, plan, sinks)  # lays the windowed layout out
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for positions, lengths in (([5, 9, 11], [7, 3, 5]), ([6, 10, 13], [7, 4, 7])):
        plan.set_positions(positions)
        plan.set_lengths(lengths)
        for got, expected in zip(compiled(q, k, v, plan, sinks), call(q, k, v, plan, sinks)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_shared_prefix_traces_fullgraph():
    """What a planned shared_prefix_attention call runs after its checks (on a GPU the checks read no
    values): lengths and groups written into the plan, its groups laid out by device ops, then the
    compiled ops. It traces without graph breaks. (aot_eager: Inductor's codegen of the index glue
    takes ~30 s on a 2-core CI machine and adds nothing here.)"""
    q = torch.randn(5, 4, 16)
    pk, sk = torch.randn(2, 9, 2, 16), torch.randn(5, 6, 2, 16)
    plan = o1kernels.SharedPrefixPlan(5, 9, 6, num_prefixes=2)
    plan.layout("split")

    def call(q, lens, groups):
        plan.seg_lens.copy_(lens)
        plan.branch_group.copy_(groups)
        plan.refill_groups()
        return _compiled.run_plan(plan, q, ((pk, pk * 0.5), (sk, sk * 0.5)), 0.25)

    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    args = (q, i32(9, 4, 6, 0, 3, 6, 1), i32(1, 0, 1, 1, 0))
    expected = [t.clone() for t in call(*args)]
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- bad input reaching the C++ layer directly ----

def tree_args(**overrides):
    """Valid arguments of tree_attention_partial with positions, a window and softcap (positioned_inputs)."""
    q, k, v, plan = positioned_inputs()
    args = dict(zip(("page_table", "seg_page_start", "seg_capacity", "seg_lens", "seg_queries", "work_seg",
                     "work_kv_start", "work_kv_end", "work_q_start", "work_q_end", "work_out", "seg_start", "q_pos"),
                    (t.clone() for t in plan_fields(plan, 4))))
    layout, source = split_layout(plan, 4)
    args.update(q=q, k_cache=k, v_cache=v, max_work_queries=source.max_work_queries, sm_scale=0.2, window=4,
                softcap=3.0, part_o=torch.empty(layout.num_partials, 8, 32),
                part_lse=torch.empty(layout.num_partials, 8))
    for name, fn in overrides.items():
        args[name] = fn(args[name], args)
    return args


def set_at(index, value):
    def fn(t, _):
        t[index] = value
        return t
    return fn


TREE_BAD = {
    "q 2-D": (dict(q=lambda t, _: t[0]), "q must have 3 dimensions"),
    "q int": (dict(q=lambda t, _: t.int()), "q must be float16, bfloat16 or float32"),
    "k dtype": (dict(k_cache=lambda t, _: t.half()), "k_cache must be Float"),
    "v shape": (dict(v_cache=lambda t, _: t[:5]), r"v_cache must have shape \[6, 4, 2, 32\]"),
    "k head_dim": (dict(k_cache=lambda t, _: t[..., :16], v_cache=lambda t, _: t[..., :16]), "k_cache must have head_dim 32"),
    "gqa": (dict(k_cache=lambda t, _: torch.randn(6, 4, 3, 32), v_cache=lambda t, _: torch.randn(6, 4, 3, 32)),
            "must be a positive multiple"),
    "head_dim 288": (dict(q=lambda t, _: t.repeat(1, 1, 9), k_cache=lambda t, _: t.repeat(1, 1, 1, 9),
                          v_cache=lambda t, _: t.repeat(1, 1, 1, 9)), r"head_dim must be in \[1, 256\]"),
    "q strided": (dict(q=lambda t, _: t.transpose(0, 2).contiguous().transpose(0, 2)), "q must be contiguous in its last"),
    "index int64": (dict(page_table=lambda t, _: t.long()), "page_table must be Int"),
    "seg_lens len": (dict(seg_lens=lambda t, _: t[:2]), "seg_lens must have 3 entries"),
    "work_out len": (dict(work_out=lambda t, _: t[1:]), "work_out must have"),
    "part_o dtype": (dict(part_o=lambda t, _: t.double()), "part_o must be Float"),
    "part_o shape": (dict(part_o=lambda t, _: t[:, :4]), "part_o must have shape"),
    "part_lse strided": (dict(part_lse=lambda t, _: torch.empty(8, t.shape[0]).T), "part_lse must be contiguous"),
    "sm_scale": (dict(sm_scale=lambda t, _: 0.0), "sm_scale must be finite and positive"),
    "page value": (dict(page_table=set_at(0, 6)), r"page_table\[0\] = 6 is outside \[0, 6\)"),
    "query value": (dict(seg_queries=set_at(1, 3)), r"seg_queries\[1\] = 3 is outside \[0, 3\)"),
    "segment pages": (dict(seg_page_start=set_at(2, 4)), "segment 2 .* needs pages beyond page_table"),
    "work_seg value": (dict(work_seg=set_at(0, 9)), r"work_seg\[0\] = 9 is outside"),
    "kv range": (dict(work_kv_end=set_at(0, 99)), "work item 0 has token range"),
    "query range": (dict(work_q_end=set_at(0, 50)), "work item 0 has query range"),
    "max_work_queries": (dict(max_work_queries=lambda t, _: 1), "more than max_work_queries = 1"),
    "slot value": (dict(work_out=set_at(0, 40)), "work item 0 writes partial slots"),
    "seg_start alone": (dict(q_pos=lambda t, _: None), "seg_start and q_pos must be given together"),
    "q_pos alone": (dict(seg_start=lambda t, _: None, window=lambda t, _: None), "seg_start and q_pos must be given"),
    "seg_start len": (dict(seg_start=lambda t, _: t[:2]), "seg_start must have 3 entries"),
    "q_pos len": (dict(q_pos=lambda t, _: t[:2]), r"q_pos must have 3 entries \(q.shape\[0\]\)"),
    "q_pos int64": (dict(q_pos=lambda t, _: t.long()), "q_pos must be Int"),
    "window alone": (dict(seg_start=lambda t, _: None, q_pos=lambda t, _: None), "window needs seg_start and q_pos"),
    "window 0": (dict(window=lambda t, _: 0), r"window must be in \[1, 2\^31 - 1\]"),
    "softcap 0": (dict(softcap=lambda t, _: 0.0), "softcap must be finite and positive"),
    "softcap nan": (dict(softcap=lambda t, _: math.nan), "softcap must be finite and positive"),
}


@pytest.mark.parametrize("overrides,match", TREE_BAD.values(), ids=TREE_BAD.keys())
def test_tree_attention_partial_rejects(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        ops.tree_attention_partial(**tree_args(**overrides))


def merge_partials_args(**overrides):
    args = dict(part_o=torch.randn(5, 2, 8), part_lse=torch.randn(5, 2),
                query_slot_indptr=torch.tensor([0, 2, 2, 5], dtype=torch.int32),
                query_slots=torch.tensor([4, 0, 1, 3, 2], dtype=torch.int32), sinks=torch.randn(2),
                o=torch.empty(3, 2, 8), lse=torch.empty(3, 2))
    for name, fn in overrides.items():
        args[name] = fn(args[name], args)
    return args


MERGE_PARTIALS_BAD = {
    "part_o half": (dict(part_o=lambda t, _: t.half()), "part_o must be Float"),
    "indptr end": (dict(query_slot_indptr=set_at(3, 4)), "query_slot_indptr must start at 0 and end at"),
    "indptr order": (dict(query_slot_indptr=set_at(1, 3)), "query_slot_indptr must be non-decreasing"),
    "slot value": (dict(query_slots=set_at(2, 5)), r"query_slots\[2\] = 5 is outside \[0, 5\)"),
    "o shape": (dict(o=lambda t, _: t[:2]), r"o must have shape \[3, 2, 8\]"),
    "lse dtype": (dict(lse=lambda t, _: t.half()), "lse must be Float"),
    "head_dim": (dict(part_o=lambda t, _: torch.randn(5, 2, 300), o=lambda t, _: torch.empty(3, 2, 300)),
                 r"head_dim must be in \[1, 256\]"),
    "sinks shape": (dict(sinks=lambda t, _: t[:1]), r"sinks must have shape \[2\]"),
    "sinks half": (dict(sinks=lambda t, _: t.half()), "sinks must be Float"),
}


@pytest.mark.parametrize("overrides,match", MERGE_PARTIALS_BAD.values(), ids=MERGE_PARTIALS_BAD.keys())
def test_merge_partials_rejects(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        ops.merge_partials(**merge_partials_args(**overrides))


def merge_states_args(**overrides):
    args = dict(o_a=torch.randn(4, 2, 8), lse_a=torch.randn(4, 2), o_b=torch.randn(4, 2, 8), lse_b=torch.randn(4, 2),
                o=torch.empty(4, 2, 8), lse=torch.empty(4, 2))
    for name, fn in overrides.items():
        args[name] = fn(args[name], args)
    return args


MERGE_STATES_BAD = {
    "o_b dtype": (dict(o_b=lambda t, _: t.bfloat16()), "o_b must be Float"),
    "o_a 2-D": (dict(o_a=lambda t, _: t[0]), "o_a must have 3 dimensions"),
    "lse_a shape": (dict(lse_a=lambda t, _: t[:3]), r"lse_a must have shape \[4, 2\]"),
    "lse_b dtype": (dict(lse_b=lambda t, _: t.double()), "lse_b must be Float"),
    "o strided": (dict(o=lambda t, _: torch.empty(8, 2, 4).transpose(0, 2)), "o must"),
}


@pytest.mark.parametrize("overrides,match", MERGE_STATES_BAD.values(), ids=MERGE_STATES_BAD.keys())
def test_merge_states_rejects(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        ops.merge_states(**merge_states_args(**overrides))


def step_args(**overrides):
    hidden, mask, weight, bias, kwargs = small_step_inputs()
    args = dict(hidden=hidden, step_mask=mask, cu_seqlens=None, weight=weight, bias=bias,
                norm_weight=kwargs["norm_weight"], norm_eps=1e-6, mlp_weight=kwargs["mlp_weight"],
                mlp_bias=kwargs["mlp_bias"], activation="softmax", positive_index=1, aggregate="mean",
                step_scores=torch.empty(3, 10), chain_scores=torch.empty(3))
    for name, fn in overrides.items():
        args[name] = fn(args[name], args)
    return args


def packed(cu):
    return dict(hidden=lambda t, _: t.reshape(30, 32), step_mask=lambda t, _: t.reshape(30),
                step_scores=lambda t, _: torch.empty(30), cu_seqlens=lambda t, _: cu)


STEP_BAD = {
    "hidden int": (dict(hidden=lambda t, _: t.int()), "hidden must be float16, bfloat16 or float32"),
    "hidden 2-D": (dict(hidden=lambda t, _: t[0]), r"hidden \(padded layout, without cu_seqlens\) must have 3"),
    "mask dtype": (dict(step_mask=lambda t, _: t.to(torch.uint8)), "step_mask must be Bool"),
    "mask shape": (dict(step_mask=lambda t, _: t[:, :9]), r"step_mask must have shape \[3, 10\]"),
    "activation": (dict(activation=lambda t, _: "tanh"), "activation must be 'softmax' or 'sigmoid'"),
    "aggregate": (dict(aggregate=lambda t, _: "sum"), "aggregate must be one of"),
    "norm_eps": (dict(norm_eps=lambda t, _: -1.0), "norm_eps must be finite and >= 0"),
    "norm_weight": (dict(norm_weight=lambda t, _: t[:31]), r"norm_weight must have shape \[32\]"),
    "mlp_weight Hd": (dict(mlp_weight=lambda t, _: t[:, :31]), r"mlp_weight must have shape \[Hm, Hd\] with Hd = 32"),
    "mlp_bias alone": (dict(mlp_weight=lambda t, _: None), "mlp_bias was given without mlp_weight"),
    "mlp_bias shape": (dict(mlp_bias=lambda t, _: t[:15]), r"mlp_bias must have shape \[16\]"),
    "weight K": (dict(weight=lambda t, _: t[:, :15]), r"weight must have shape \[C, 16\]"),
    "bias shape": (dict(bias=lambda t, _: t[:1]), r"bias must have shape \[2\]"),
    "softmax C=1": (dict(weight=lambda t, _: t[:1], bias=lambda t, _: t[:1], positive_index=lambda t, _: 0),
                    "softmax' needs weight with C >= 2"),
    "sigmoid C=2": (dict(activation=lambda t, _: "sigmoid", positive_index=lambda t, _: 0), "sigmoid' needs weight with C == 1"),
    "positive_index": (dict(positive_index=lambda t, _: 2), r"positive_index must be in \[0, 2\)"),
    "sigmoid index": (dict(activation=lambda t, _: "sigmoid", weight=lambda t, _: t[:1], bias=lambda t, _: t[:1]),
                      "positive_index must be 0 with activation 'sigmoid'"),
    "C=65": (dict(weight=lambda t, _: torch.randn(65, 16), bias=lambda t, _: None), "1 to 64 rows"),
    "scores dtype": (dict(step_scores=lambda t, _: t.double()), "step_scores must be Float"),
    "chain shape": (dict(chain_scores=lambda t, _: t[:2]), r"chain_scores must have shape \[3\]"),
    "cu_seqlens float": (packed(torch.tensor([0.0, 10.0, 10.0, 30.0])), "cu_seqlens must be int32 or int64"),
    "cu_seqlens end": (packed(torch.tensor([0, 10, 10, 29])), "cu_seqlens must start at 0 and end at T"),
    "cu_seqlens order": (packed(torch.tensor([0, 10, 9, 30])), "cu_seqlens must be non-decreasing"),
}


@pytest.mark.parametrize("overrides,match", STEP_BAD.values(), ids=STEP_BAD.keys())
def test_step_rewards_rejects(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        ops.step_rewards(**step_args(**overrides))


def test_valid_direct_calls_pass_the_checks():
    """The argument builders above are valid as given, so each rejection is due to its one change."""
    ops.tree_attention_partial(**tree_args())
    ops.merge_partials(**merge_partials_args())
    ops.merge_states(**merge_states_args())
    args = step_args()
    ops.step_rewards(**args)
    kwargs = {k: args[k] for k in ("norm_weight", "mlp_weight", "mlp_bias", "activation", "positive_index",
                                   "aggregate")}
    ref_scores, ref_chain = reference_step_rewards(args["hidden"], args["step_mask"], args["weight"], args["bias"],
                                                   **kwargs)
    torch.testing.assert_close(args["step_scores"].double(), ref_scores, rtol=1e-4, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(args["chain_scores"].double(), ref_chain, rtol=1e-4, atol=2e-5, equal_nan=True)
