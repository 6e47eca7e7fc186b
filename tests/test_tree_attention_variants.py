"""tree_attention with positions (causal masking, chunks), sliding windows, logit soft-capping, attention sinks and a
custom sm_scale, against an independent float64 computation over each query's visible keys.

Each test runs every backend usable here: backends that implement the call (o1kernels.capabilities) are compared
with float64, the others must refuse an explicit request with a ValueError naming what they lack.
"""
import random

import pytest
import torch

from o1kernels import TreeAttentionPlan, tree_attention
from o1kernels.capabilities import backend_unsupported_reason, spec_of
from o1kernels.plan import PlanCapacity
from attention_reference import (LSE_TOLERANCES, TOLERANCES, backends_on, positioned_attention_f64, positioned_tree,
                                 random_tree, random_values, report_mismatch)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = backends_on("cpu")


def _features(window, softcap, sinks):
    return dict(positions=True, sliding_window=window, softcap=softcap, sinks=sinks is not None)


def _run_or_refused(backend, q, k, v, plan, **kw):
    """tree_attention's (o, lse), or None after checking that `backend` refuses a call it does not implement."""
    spec = spec_of(q, k, **_features(kw.get("window"), kw.get("softcap"), kw.get("sinks")))
    reason = backend_unsupported_reason(backend, spec)
    if reason is not None:
        with pytest.raises(ValueError, match="does not implement"):
            tree_attention(q, k, v, plan, backend=backend, **kw)
        return None
    return tree_attention(q, k, v, plan, return_lse=True, backend=backend, **kw)


def _compare(backend, q, k, v, plan, segments, lengths, positions, *, sm_scale=None, window=None, softcap=None,
             sinks=None):
    out = _run_or_refused(backend, q, k, v, plan, sm_scale=sm_scale, window=window, softcap=softcap, sinks=sinks)
    if out is None:
        return
    o, lse = out
    assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == q.shape[:2]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    o_ref, lse_ref = positioned_attention_f64(q, k, v, segments, plan.page_size, lengths, positions, scale,
                                              window=window, softcap=softcap, sinks=sinks)
    report_mismatch(f"o ({backend})", o, o_ref, *TOLERANCES[q.dtype])
    report_mismatch(f"lse ({backend})", lse, lse_ref, *LSE_TOLERANCES[q.dtype])


# (depth, max leaves, max segment length, page_size, Hq, Hkv, D, max new tokens per leaf)
CASES = [
    (3, 6, 40, 16, 8, 2, 32, 1),    # decode rows, GQA 4
    (2, 5, 70, 8, 4, 1, 16, 6),     # chunks of up to 6 rows per leaf (causal inside), MQA
    (4, 8, 23, 4, 4, 4, 24, 3),     # head_dim not a power of two, GQA 1, page size 4
    (1, 1, 129, 32, 8, 2, 64, 40),  # one sequence: a prefill chunk of up to 40 rows
]
VARIANTS = [  # (window, softcap, with sinks, sm_scale)
    (None, None, False, None),
    (17, None, False, None),      # windows that start inside shared segments for some rows and not others
    (None, 5.0, False, 0.3),
    (None, None, True, None),
    (9, 3.0, True, 0.2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"w{v[0]}-cap{v[1]}-sinks{int(v[2])}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"depth{c[0]}-hq{c[4]}-hkv{c[5]}-d{c[6]}-new{c[7]}")
def test_positioned_tree_matches_float64(case, variant, backend, dtype):
    depth, leaves_max, seg_len_max, page_size, hq, hkv, d, max_new = case
    window, softcap, with_sinks, sm_scale = variant
    rng = random.Random(str(case))
    nodes, leaves = random_tree(leaves_max, depth, seg_len_max, rng)
    segments, positions, num_pages = positioned_tree(nodes, leaves, page_size, rng, max_new=max_new)
    plan = TreeAttentionPlan(segments, len(positions), page_size, positions=positions)
    q = (torch.randn(len(positions), hq, d) * 2).to(dtype)
    k = (torch.randn(num_pages, page_size, hkv, d) * 1.5).to(dtype)
    v = random_values((num_pages, page_size, hkv, d), dtype)
    sinks = torch.randn(hq) * 2 if with_sinks else None
    _compare(backend, q, k, v, plan, segments, [s[1] for s in segments], positions, sm_scale=sm_scale, window=window,
             softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arbitrary_positions_mask_inside_segments(backend):
    """Positions anywhere (before, inside and after each segment): rows see exactly the keys at or before them."""
    rng = random.Random(3)
    page_size, hq, hkv, d = 8, 4, 2, 16
    segments = [([3, 0, 5], 21, [0, 1, 2, 3], 0), ([1, 4], 12, [1, 2], 21), ([2], 6, [3, 4], 40)]
    positions = [rng.randint(0, 50) for _ in range(5)]
    plan = TreeAttentionPlan(segments, 5, page_size, positions=positions)
    q = torch.randn(5, hq, d)
    k = torch.randn(6, page_size, hkv, d)
    v = random_values((6, page_size, hkv, d), torch.float32)
    for window in (None, 4, 30):
        _compare(backend, q, k, v, plan, segments, [21, 12, 6], positions, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_and_lengths_grow_in_place(backend):
    """A decode step with positions: set_lengths + set_positions (ints and tensors) move it on, no re-plan."""
    page_size, hq, hkv, d = 4, 4, 2, 16
    segments = [([0, 1, 2], 10, [0, 1, 2], 0), ([3, 4], 1, [0], 10), ([5, 6], 2, [1], 10), ([7, 8], 0, [2], 10)]
    positions = [10, 11, 9]
    plan = TreeAttentionPlan(segments, 3, page_size, positions=positions, capacity=PlanCapacity(8, 16, 16, 16, 32, 16))
    q = torch.randn(3, hq, d)
    k = torch.randn(9, page_size, hkv, d)
    v = random_values((9, page_size, hkv, d), torch.float32)
    _compare(backend, q, k, v, plan, segments, [10, 1, 2, 0], positions, window=6)
    plan.set_lengths([10, 3, 4, 1])
    plan.set_positions(torch.tensor([12, 13, 10]))
    _compare(backend, q, k, v, plan, segments, [10, 3, 4, 1], [12, 13, 10], window=6)
    plan.set_positions([12, 13, 10])
    _compare(backend, q, k, v, plan, segments, [10, 3, 4, 1], [12, 13, 10], window=6)
    # a structural change: the same tensors laid out again, positions given with it
    new = [([0, 1, 2], 10, [0, 1], 0), ([3, 4], 5, [0, 1], 10), ([5, 6], 1, [2], 0)]
    plan.update(new, positions=[15, 14, 0])
    _compare(backend, q, k, v, plan, new, [10, 5, 1], [15, 14, 0], window=6)


def test_window_layout_leaves_out_segments_before_every_window():
    """The plan drops (segment, query) pairs whose segment ends before the query's window at plan time; a segment
    the window starts inside is kept (masked per row by the kernels)."""
    segments = [([0, 1, 2, 3], 64, [0, 1], 0), ([4], 16, [0], 64), ([5], 16, [1], 64)]
    plan = TreeAttentionPlan(segments, 2, 16, positions=[79, 70])
    full = plan.layout("split")
    windowed = plan.layout("split", window=10)
    assert full.seg_queries.numel() == 4 and windowed.seg_queries.numel() == 3  # row 0 (79) skips the prompt
    assert plan.layout("split", window=20).seg_queries.numel() == 4  # 79 - 20 + 1 = 60 < 64: prompt kept
    assert windowed.window == 10 and windowed.causal and torch.equal(windowed.seg_start[:3].cpu(),
                                                                        torch.tensor([0, 64, 64], dtype=torch.int32))


def test_bad_variant_arguments_raise_before_any_kernel():
    seg = [([0], 4, [0], 0)]
    plan = TreeAttentionPlan(seg, 1, 4, positions=[3])
    plain = TreeAttentionPlan([([0], 4, [0])], 1, 4)
    q, k = torch.randn(1, 2, 8), torch.randn(1, 4, 1, 8)
    for kw, err, match in [
        (dict(window=0), ValueError, "window must be an int"),
        (dict(window=2.5), ValueError, "window must be an int"),
        (dict(softcap=0.0), ValueError, "softcap must be"),
        (dict(softcap=float("inf")), ValueError, "softcap must be"),
        (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \[2\]"),
        (dict(sinks=torch.zeros(2, dtype=torch.int32)), TypeError, "sinks must have dtype"),
        (dict(sinks=[0.0, 1.0]), TypeError, "sinks must be a torch.Tensor"),
    ]:
        with pytest.raises(err, match=match):
            tree_attention(q, k, k, plan, **kw)
    with pytest.raises(ValueError, match="window needs a plan with positions"):
        tree_attention(q, k, k, plain, window=4)
    with pytest.raises(ValueError, match="takes \\(pages, length, queries, start\\)"):
        TreeAttentionPlan([([0], 4, [0])], 1, 4, positions=[3])
    with pytest.raises(ValueError, match="takes \\(pages, length, queries\\)"):
        TreeAttentionPlan(seg, 1, 4)
    with pytest.raises(ValueError, match="positions must have num_queries=1"):
        TreeAttentionPlan(seg, 1, 4, positions=[3, 4])
    with pytest.raises(ValueError, match="positions must be in"):
        TreeAttentionPlan(seg, 1, 4, positions=[-1])
    with pytest.raises(ValueError, match="start must be an int"):
        TreeAttentionPlan([([0], 4, [0], -2)], 1, 4, positions=[3])
    with pytest.raises(ValueError, match="not below the position"):
        plan.set_positions([2])
    with pytest.raises(ValueError, match="needs a plan built with positions"):
        plain.set_positions([3])
    with pytest.raises(ValueError, match=r"positions must have shape \[1\]"):
        plan.set_positions(torch.tensor([3, 4]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_auto_runs_what_a_backend_implements(backend):
    """backend='auto' never refuses a supported variant: it picks a backend that implements it."""
    seg = [([0, 1], 7, [0, 1], 0)]
    plan = TreeAttentionPlan(seg, 2, 4, positions=[3, 6])
    q, k = torch.randn(2, 4, 8), torch.randn(2, 4, 2, 8)
    v = random_values(k.shape, torch.float32)
    sinks = torch.randn(4)
    o_auto = tree_attention(q, k, v, plan, window=3, softcap=2.0, sinks=sinks)
    o_ref, _ = positioned_attention_f64(q, k, v, seg, 4, [7], [3, 6], 8 ** -0.5, window=3, softcap=2.0, sinks=sinks)
    report_mismatch("o (auto)", o_auto, o_ref, *TOLERANCES[torch.float32])
