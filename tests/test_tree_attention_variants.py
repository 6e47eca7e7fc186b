"""tree_attention with positions (causal masking, chunks), sliding windows, logit soft-capping, attention sinks and a
custom sm_scale, against an independent float64 computation over each query's visible keys.

Each test runs every backend usable here (all of them implement every variant: o1kernels.capabilities) against
float64.
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
# Triton reads a segment along the shared path (tiles of rows with different positions, masked per row) or the
# direct one (each query over its visible range): "cascade" and "decode" force each; the compiled backends and the
# torch reference have one path.
BACKEND_PATHS = [(b, p) for b in BACKENDS for p in (("auto", "cascade", "decode") if b == "triton" else ("auto",))]


def _features(window, softcap, sinks):
    return dict(positions=True, sliding_window=window, softcap=softcap, sinks=sinks is not None)


def _compare(backend, q, k, v, plan, segments, lengths, positions, *, sm_scale=None, window=None, softcap=None,
             sinks=None):
    spec = spec_of(q, k, **_features(window, softcap, sinks))
    assert backend_unsupported_reason(backend, spec) is None, f"{backend} must implement {spec}"
    o, lse = tree_attention(q, k, v, plan, sm_scale=sm_scale, window=window, softcap=softcap, sinks=sinks,
                            return_lse=True, backend=backend)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == q.shape[:2]
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    o_ref, lse_ref = positioned_attention_f64(q.cpu(), k.cpu(), v.cpu(), segments, plan.page_size, lengths, positions,
                                              scale, window=window, softcap=softcap,
                                              sinks=None if sinks is None else sinks.cpu())
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
@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"w{v[0]}-cap{v[1]}-sinks{int(v[2])}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"depth{c[0]}-hq{c[4]}-hkv{c[5]}-d{c[6]}-new{c[7]}")
def test_positioned_tree_matches_float64(case, variant, backend, path, dtype, device="cpu"):
    depth, leaves_max, seg_len_max, page_size, hq, hkv, d, max_new = case
    window, softcap, with_sinks, sm_scale = variant
    rng = random.Random(str(case))
    nodes, leaves = random_tree(leaves_max, depth, seg_len_max, rng)
    segments, positions, num_pages = positioned_tree(nodes, leaves, page_size, rng, max_new=max_new)
    plan = TreeAttentionPlan(segments, len(positions), page_size, positions=positions, path=path, device=device)
    q = (torch.randn(len(positions), hq, d, device=device) * 2).to(dtype)
    k = (torch.randn(num_pages, page_size, hkv, d, device=device) * 1.5).to(dtype)
    v = random_values((num_pages, page_size, hkv, d), dtype, device)
    sinks = torch.randn(hq, device=device) * 2 if with_sinks else None
    _compare(backend, q, k, v, plan, segments, [s[1] for s in segments], positions, sm_scale=sm_scale, window=window,
             softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
def test_arbitrary_positions_mask_inside_segments(backend, path, device="cpu"):
    """Positions anywhere (before, inside and after each segment): rows see exactly the keys at or before them; row 4
    (position 23, listed by the segment starting at 40) sees nothing, row 1 nothing within a window of 4: o = 0 and
    lse = -inf, or lse = the sink."""
    rng = random.Random(3)
    page_size, hq, hkv, d = 8, 4, 2, 16
    segments = [([3, 0, 5], 21, [0, 1, 2, 3], 0), ([1, 4], 12, [1, 2], 21), ([2], 6, [3, 4], 40)]
    positions = [rng.randint(0, 50) for _ in range(5)]  # [15, 37, 34, 8, 23]
    plan = TreeAttentionPlan(segments, 5, page_size, positions=positions, path=path, device=device)
    q = torch.randn(5, hq, d, device=device)
    k = torch.randn(6, page_size, hkv, d, device=device)
    v = random_values((6, page_size, hkv, d), torch.float32, device)
    for window, sinks in ((None, None), (4, None), (4, torch.randn(hq, device=device)), (30, None)):
        _compare(backend, q, k, v, plan, segments, [21, 12, 6], positions, window=window, sinks=sinks)


@pytest.mark.parametrize("backend,path", BACKEND_PATHS)
def test_tokens_no_query_sees_are_not_read(backend, path, device="cpu"):
    """With positions and a window the kernels read only tokens some query of a work item sees (a sliding-window
    engine may reuse the pages behind every window): K/V of every other token inside the segments' lengths are NaN
    here, and the outputs still equal float64."""
    page_size, hq, hkv, d, window = 4, 4, 2, 16, 6
    # a 30-token prompt read by 4 rows whose windows start at 29-30 (rows 1 and 2 see its last token, rows 0 and 3
    # none of it), a 6-token tail of rows 0 and 1 (a chunk: row 1 one token behind row 0), own tails of rows 2 and 3
    # (row 3's holds 2 tokens after its position)
    segments = [(list(range(8)), 30, [0, 1, 2, 3], 0), ([8, 9], 6, [0, 1], 30), ([10, 11], 5, [2], 30),
                ([12, 13], 8, [3], 30)]
    positions = [35, 34, 34, 35]
    plan = TreeAttentionPlan(segments, 4, page_size, positions=positions, path=path, device=device)
    q = torch.randn(4, hq, d, device=device)
    k = torch.randn(14, page_size, hkv, d, device=device)
    v = random_values((14, page_size, hkv, d), torch.float32, device)
    unseen = 0
    for pages, length, queries, start in segments:
        for t in range(length):
            if not any(0 <= positions[i] - start - t < window for i in queries):
                k[pages[t // page_size], t % page_size] = v[pages[t // page_size], t % page_size] = float("nan")
                unseen += 1
    assert unseen == 29 + 2  # prompt tokens 0-28, row 3's tokens 36-37
    _compare(backend, q, k, v, plan, segments, [s[1] for s in segments], positions, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_and_lengths_grow_in_place(backend, device="cpu"):
    """A decode step with positions: set_lengths + set_positions (ints and tensors) move it on, no re-plan."""
    page_size, hq, hkv, d = 4, 4, 2, 16
    segments = [([0, 1, 2], 10, [0, 1, 2], 0), ([3, 4], 1, [0], 10), ([5, 6], 2, [1], 10), ([7, 8], 0, [2], 10)]
    positions = [10, 11, 9]
    plan = TreeAttentionPlan(segments, 3, page_size, positions=positions, capacity=PlanCapacity(8, 16, 16, 16, 32, 16),
                             device=device)
    q = torch.randn(3, hq, d, device=device)
    k = torch.randn(9, page_size, hkv, d, device=device)
    v = random_values((9, page_size, hkv, d), torch.float32, device)
    _compare(backend, q, k, v, plan, segments, [10, 1, 2, 0], positions, window=6)
    plan.set_lengths([10, 3, 4, 1])
    plan.set_positions(torch.tensor([12, 13, 10], device=device))
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


# ---- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variants_cuda(dtype):
    """Every case above on the GPU for each CUDA backend (triton on all its paths; cuda: mma.sync for fp16/bf16 at
    head_dim 64, SIMT for fp32 and head_dims 16/24/32)."""
    for backend in backends_on("cuda"):
        for path in ("auto", "cascade", "decode") if backend == "triton" else ("auto",):
            for case in CASES:
                for variant in VARIANTS:
                    test_positioned_tree_matches_float64(case, variant, backend, path, dtype, device="cuda")
            test_arbitrary_positions_mask_inside_segments(backend, path, device="cuda")
            test_tokens_no_query_sees_are_not_read(backend, path, device="cuda")
        test_positions_and_lengths_grow_in_place(backend, device="cuda")


@pytest.mark.cuda
def test_cuda_graph_replays_variants_after_set_positions():
    """tree_attention with a window, softcap and sinks captured once per CUDA backend; positions and lengths moved on
    with device tensors (no sync) and the sinks changed in place between replays: each replay equals float64."""
    page_size, hq, hkv, d, window, softcap = 16, 8, 2, 64, 20, 30.0
    # a 40-token prompt; rows 0 and 1 a 2-token chunk of one branch (causal inside), rows 2 and 3 one token each
    segments = [([0, 1, 2], 40, [0, 1, 2, 3], 0), ([3, 4], 5, [0, 1], 40), ([5, 6], 7, [2], 40), ([7, 8], 2, [3], 40)]
    steps = [([40, 5, 7, 2], [43, 44, 46, 41]), ([40, 6, 8, 3], [44, 45, 47, 42]), ([40, 9, 20, 4], [47, 48, 59, 43])]
    k = torch.randn(9, page_size, hkv, d, device="cuda").to(torch.bfloat16)
    v = random_values((9, page_size, hkv, d), torch.bfloat16, "cuda")
    for backend in backends_on("cuda"):
        plan = TreeAttentionPlan(segments, 4, page_size, positions=steps[0][1], device="cuda")
        q = torch.randn(4, hq, d, device="cuda").to(torch.bfloat16)
        sinks = torch.randn(hq, device="cuda").to(torch.bfloat16)
        kw = dict(window=window, softcap=softcap, sinks=sinks, return_lse=True, backend=backend)
        tree_attention(q, k, v, plan, **kw)  # lays out, compiles, allocates outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, lse = tree_attention(q, k, v, plan, **kw)
        for lengths, positions in steps:
            plan.set_lengths(torch.tensor(lengths, dtype=torch.int32, device="cuda"))
            plan.set_positions(torch.tensor(positions, dtype=torch.int32, device="cuda"))
            q.copy_(torch.randn_like(q))
            sinks.copy_(torch.randn_like(sinks))
            graph.replay()
            torch.cuda.synchronize()
            o_ref, lse_ref = positioned_attention_f64(q.cpu(), k.cpu(), v.cpu(), segments, page_size, lengths, positions,
                                                      d ** -0.5, window=window, softcap=softcap, sinks=sinks.cpu())
            report_mismatch(f"o ({backend}, graph)", o, o_ref, *TOLERANCES[torch.bfloat16])
            report_mismatch(f"lse ({backend}, graph)", lse, lse_ref, *LSE_TOLERANCES[torch.bfloat16])
