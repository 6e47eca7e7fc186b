"""The compiled CUDA kernels (backend="cuda") on a GPU: every kernel path against float64
references, agreement with the C++ CPU backend, no host sync, CUDA-graph capture and replay of a
decode step, and compute-sanitizer (memcheck, racecheck) on small cases.

The op owners' GPU tests (test_tree_attention.py, test_shared_prefix_attention.py,
test_merge_states.py, test_step_rewards.py) also run backend="cuda" over their full case lists;
the cases here target the kernel paths: tensor-core tree attention for fp16/bf16 x head_dim
64/128/256 x 1/2/4 row warps, the SIMT fallback (fp32, other head dims, unaligned strides), and
the step-reward head kernel (16-byte and scalar row loads) and hidden layer on tensor cores and in SIMT,
and the binding's prepared-weight cache.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import o1kernels
from o1kernels import TreeAttentionPlan, _ext
from attention_reference import (LSE_TOLERANCES, TOLERANCES, attention_f64, positioned_attention_f64, positioned_tree,
                                 random_values, report_mismatch, tree_attention_f64)
from step_rewards_reference import reference_step_rewards
import test_step_rewards as step_cases  # Case, make_inputs, assert_matches, tolerance (module import: no re-collection)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_ext._C is None or not getattr(_ext._C, "WITH_CUDA", False),
                       reason="o1kernels._C was built without CUDA kernels"),
]


def three_level_tree(num_queries, page_size, rng, root_len=301, mid_len=97, tail_max=41):
    """Segments of a 3-level tree over a shuffled page pool: a root read by every query, two
    middle segments read by each half, and one tail per query (lengths 0..tail_max, some spare
    capacity). Returns (segments, num_pages)."""
    half = num_queries // 2
    layout = [(root_len, list(range(num_queries))), (mid_len, list(range(half))), (0, list(range(half, num_queries)))]
    layout += [(rng.randint(0, tail_max), [i]) for i in range(num_queries)]
    counts = [-(-length // page_size) + rng.randint(0, 1) for length, _ in layout]
    pool = list(range(sum(counts)))
    rng.shuffle(pool)
    segments, used = [], 0
    for (length, queries), count in zip(layout, counts):
        segments.append((pool[used:used + count], length, queries))
        used += count
    return segments, len(pool)


def tree_inputs(dtype, hq, hkv, d, *, page_size, num_queries, seed, chunk=128, tile=None, k_pad=0):
    """q and a paged K/V pool on the GPU for three_level_tree; k_pad > 0 stores K/V inside a wider
    buffer (head stride d + k_pad), which makes the strides unaligned for the tensor-core path."""
    segments, num_pages = three_level_tree(num_queries, page_size, random.Random(seed))
    plan = TreeAttentionPlan(segments, num_queries, page_size, device="cuda", kv_chunk_size=chunk,
                             queries_per_tile=tile)
    q = (torch.randn(num_queries, hq, d, device="cuda") * 2).to(dtype)
    k_full = torch.randn(num_pages, page_size, hkv, d + k_pad, device="cuda").to(dtype)
    v_full = random_values((num_pages, page_size, hkv, d + k_pad), dtype, "cuda")
    return q, k_full[..., :d], v_full[..., :d], segments, plan


def check_tree(q, k, v, segments, plan):
    """tree_attention against float64; the partial op also runs on NaN-poisoned buffers, which
    every work item must overwrite (empty chunks with o = 0, lse = -inf)."""
    hq, d = q.shape[1:]
    layout = plan.layout("split")
    source = layout.sources[0]
    part_o = torch.full((layout.num_partials, hq, d), math.nan, device="cuda")
    part_lse = torch.full((layout.num_partials, hq), math.nan, device="cuda")
    fields = (*layout.source_views(source), layout.seg_queries, *source.work)
    torch.ops.o1kernels.tree_attention_partial(q, k, v, *fields, None, None, source.max_work_queries, d ** -0.5, None,
                                               None, part_o, part_lse)
    assert not part_o.isnan().any() and not part_lse.isnan().any(), "partial slots left unwritten"
    o, lse = o1kernels.tree_attention(q, k, v, plan, return_lse=True, backend="cuda")
    o_ref, lse_ref = tree_attention_f64(q.cpu(), k.cpu(), v.cpu(), segments, plan.page_size,
                                        [s[1] for s in segments], d ** -0.5)
    report_mismatch("o", o, o_ref, *TOLERANCES[q.dtype])
    report_mismatch("lse", lse, lse_ref, *LSE_TOLERANCES[q.dtype])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", (64, 128, 256))
@pytest.mark.parametrize("tile", (2, 6, 16), ids=lambda t: f"rows{4 * t}")  # x GQA 4: 8 / 24 / 64 rows per item
def test_tree_attention_tensor_core_paths(dtype, d, tile):
    """Odd page size, segments over several 64-token blocks and chunks, lengths not multiples of blocks."""
    q, k, v, segments, plan = tree_inputs(dtype, 8, 2, d, page_size=5, num_queries=20, seed=f"{dtype}{d}{tile}",
                                          tile=tile)
    check_tree(q, k, v, segments, plan)


@pytest.mark.parametrize("dtype,d,k_pad", [(torch.float32, 64, 0), (torch.float32, 256, 0), (torch.float32, 40, 0),
                                           (torch.float16, 96, 0), (torch.bfloat16, 128, 3)],
                         ids=["fp32-d64", "fp32-d256", "fp32-d40", "fp16-d96", "bf16-d128-unaligned"])
def test_tree_attention_simt_paths(dtype, d, k_pad):
    q, k, v, segments, plan = tree_inputs(dtype, 6, 3, d, page_size=16, num_queries=8, seed=f"simt{d}{k_pad}",
                                          chunk=64, k_pad=k_pad)
    check_tree(q, k, v, segments, plan)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("d", (64, 128, 256))
@pytest.mark.parametrize("tile", (2, 6, 16), ids=lambda t: f"rows{4 * t}")
def test_tree_attention_variant_paths(dtype, d, tile):
    """Positions, a window, softcap and sinks on every kernel path (mma.sync with 1/2/4 row warps for fp16/bf16,
    SIMT for fp32): a 301-token prompt, two 97/0-token middles, 10 tails of 0-41 tokens each read by a chunk of 1-4
    rows (causal inside), window 100 (it starts inside the prompt for some rows; rows of one tile see different
    parts of a chunk, or none of it). Partials are first written over NaN, then the op is compared with float64."""
    rng = random.Random(f"variants{dtype}{d}{tile}")
    nodes = [(301, -1), (97, 0), (0, 0)] + [(rng.randint(0, 41), 1 + i % 2) for i in range(10)]
    segments, positions, num_pages = positioned_tree(nodes, list(range(3, 13)), 5, rng, max_new=4)
    plan = TreeAttentionPlan(segments, len(positions), 5, device="cuda", kv_chunk_size=128, queries_per_tile=tile,
                             positions=positions)
    q = (torch.randn(len(positions), 8, d, device="cuda") * 2).to(dtype)
    k = torch.randn(num_pages, 5, 2, d, device="cuda").to(dtype)
    v = random_values((num_pages, 5, 2, d), dtype, "cuda")
    sinks = torch.randn(8, device="cuda")
    window, softcap = 100, 20.0
    layout = plan.layout("split", window=window)
    source = layout.sources[0]
    part_o = torch.full((layout.num_partials, 8, d), math.nan, device="cuda")
    part_lse = torch.full((layout.num_partials, 8), math.nan, device="cuda")
    torch.ops.o1kernels.tree_attention_partial(q, k, v, *layout.source_views(source), layout.seg_queries, *source.work,
                                               layout.seg_start, layout.q_pos, source.max_work_queries, d ** -0.5,
                                               window, softcap, part_o, part_lse)
    assert not part_o.isnan().any() and not part_lse.isnan().any(), "partial slots left unwritten"
    o, lse = o1kernels.tree_attention(q, k, v, plan, window=window, softcap=softcap, sinks=sinks, return_lse=True,
                                      backend="cuda")
    o_ref, lse_ref = positioned_attention_f64(q.cpu(), k.cpu(), v.cpu(), segments, 5, [s[1] for s in segments],
                                              positions, d ** -0.5, window=window, softcap=softcap, sinks=sinks.cpu())
    report_mismatch("o", o, o_ref, *TOLERANCES[dtype])
    report_mismatch("lse", lse, lse_ref, *LSE_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_shared_prefix_unbalanced_groups(dtype):
    """33 of 40 branches on one prompt (three query tiles), one empty group, GQA 4, D 128."""
    b, g, p, s, hq, hkv, d = 40, 3, 700, 90, 16, 4, 128
    q = (torch.randn(b, hq, d, device="cuda") * 2).to(dtype)
    pk, pv = torch.randn(g, p, hkv, d, device="cuda").to(dtype), random_values((g, p, hkv, d), dtype, "cuda")
    sk, sv = torch.randn(b, s, hkv, d, device="cuda").to(dtype), random_values((b, s, hkv, d), dtype, "cuda")
    groups = torch.tensor([0] * 33 + [2] * 7, device="cuda", dtype=torch.int32)[torch.randperm(b, device="cuda")]
    prefix_lens = torch.tensor([700, 5, 333], device="cuda", dtype=torch.int32)
    suffix_lens = torch.randint(0, s + 1, (b,), device="cuda", dtype=torch.int32)
    o, lse = o1kernels.shared_prefix_attention(q, pk, pv, sk, sv, prefix_lens=prefix_lens, suffix_lens=suffix_lens,
                                               branch_group=groups, return_lse=True, backend="cuda")
    outs, lses = [], []
    for i in range(b):
        gi, sl = int(groups[i]), int(suffix_lens[i])
        pl = int(prefix_lens[gi])
        keys, values = torch.cat([pk[gi, :pl], sk[i, :sl]]), torch.cat([pv[gi, :pl], sv[i, :sl]])
        o_i, lse_i = attention_f64(q[i].cpu(), keys.cpu(), values.cpu(), d ** -0.5)
        outs.append(o_i)
        lses.append(lse_i)
    report_mismatch("o", o, torch.stack(outs), *TOLERANCES[dtype])
    report_mismatch("lse", lse, torch.stack(lses), *LSE_TOLERANCES[dtype])


STEP_CASES = [
    step_cases.Case(bs=70, seq_len=600, hd=256, hm=200, dtype=torch.bfloat16, aggregate="min"),  # mma, many row tiles
    step_cases.Case(bs=5, seq_len=300, hd=128, hm=64, dtype=torch.float16, aggregate="prod", mask="all"),
    step_cases.Case(bs=9, seq_len=50, hd=100, hm=72, dtype=torch.bfloat16, aggregate="last"),  # Hd % 8: SIMT
    step_cases.Case(bs=9, seq_len=50, hd=96, hm=40, dtype=torch.float32, aggregate="mean", num_classes=5,
                    positive_index=3),  # fp32: SIMT
    step_cases.Case(bs=33, seq_len=700, hd=160, dtype=torch.bfloat16, aggregate="max"),  # head, 16-byte row loads
    step_cases.Case(bs=7, seq_len=1500, hd=100, dtype=torch.float16, aggregate="prod", num_classes=5,
                    positive_index=2),  # head, scalar row loads (Hd % 8), two passes over the classes
    step_cases.Case(bs=4, seq_len=40, hd=64, num_classes=1, activation="sigmoid", positive_index=0,
                    dtype=torch.float16, hm=0, norm=False),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=str)
def test_step_rewards_kernel_paths(case):
    step_cases.check_case(case, "cuda", device="cuda")


def test_step_rewards_fp32_hidden_layer_weight_with_bf16_hidden():
    """mlp_weight in another dtype than hidden runs the SIMT hidden layer on the fp32 weight."""
    case = step_cases.Case(bs=6, seq_len=40, hd=64, hm=48, dtype=torch.bfloat16)
    hidden, mask, weight, bias, kwargs = step_cases.make_inputs(case, "cuda")
    kwargs["mlp_weight"] = kwargs["mlp_weight"].float()
    scores, chain = o1kernels.step_rewards(hidden, mask, weight, bias, backend="cuda", **kwargs)
    ref_scores, ref_chain = reference_step_rewards(hidden, mask, weight, bias, **kwargs)
    step_cases.assert_matches("step_scores", scores, ref_scores, *step_cases.FP32_MATH_TOL[1:])
    step_cases.assert_matches("chain_scores", chain, ref_chain, *step_cases.FP32_MATH_TOL[1:])


@pytest.mark.parametrize("hm", (0, 32))
def test_step_rewards_inference_tensor_weights(hm):
    """Weights made under torch.inference_mode have no version counter: they are prepared on every call (not
    cached), so an in-place change made under inference mode still reaches the scores."""
    case = step_cases.Case(bs=3, seq_len=20, hd=48, hm=hm)
    with torch.inference_mode():
        hidden, mask, weight, bias, kwargs = step_cases.make_inputs(case, "cuda")
    for change in (lambda: None, lambda: kwargs["norm_weight"].mul_(1.7), lambda: weight.add_(0.2)):
        with torch.inference_mode():
            change()
        scores, chain = o1kernels.step_rewards(hidden, mask, weight, bias, backend="cuda", **kwargs)
        ref_scores, ref_chain = reference_step_rewards(hidden, mask, weight, bias, **kwargs)
        step_cases.assert_matches("step_scores", scores, ref_scores, *step_cases.FP32_MATH_TOL[1:])
        step_cases.assert_matches("chain_scores", chain, ref_chain, *step_cases.FP32_MATH_TOL[1:])


def test_cuda_matches_cpu_backend():
    """Same inputs through both compiled backends (all four ops)."""
    q, k, v, segments, plan = tree_inputs(torch.bfloat16, 8, 2, 128, page_size=16, num_queries=12, seed="x")
    plan_cpu = TreeAttentionPlan(segments, plan.num_queries, 16, kv_chunk_size=128)
    o, lse = o1kernels.tree_attention(q, k, v, plan, return_lse=True, backend="cuda")
    o_cpu, lse_cpu = o1kernels.tree_attention(q.cpu(), k.cpu(), v.cpu(), plan_cpu, return_lse=True, backend="cpu")
    torch.testing.assert_close(o.cpu().float(), o_cpu.float(), atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(lse.cpu(), lse_cpu, atol=1e-3, rtol=1e-3)
    merged = o1kernels.merge_states(o, lse, o.flip(0), lse.flip(0), backend="cuda")
    merged_cpu = o1kernels.merge_states(o.cpu(), lse.cpu(), o.cpu().flip(0), lse.cpu().flip(0), backend="cpu")
    torch.testing.assert_close(merged[0].cpu(), merged_cpu[0], atol=8e-3, rtol=8e-3)
    torch.testing.assert_close(merged[1].cpu(), merged_cpu[1], atol=1e-5, rtol=1e-5)
    hidden, mask, weight, bias, kwargs = step_cases.make_inputs(step_cases.Case(bs=8, seq_len=64, hd=64, hm=32), "cuda")
    got = o1kernels.step_rewards(hidden, mask, weight, bias, backend="cuda", **kwargs)
    expected = o1kernels.step_rewards(hidden.cpu(), mask.cpu(), weight.cpu(), bias.cpu(), backend="cpu",
                                      **{n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()})
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_no_host_sync():
    """torch's sync debug mode turns any synchronising call inside the ops into an error."""
    q, k, v, _, plan = tree_inputs(torch.float16, 8, 2, 64, page_size=16, num_queries=6, seed="sync")
    b, hq, d = q.shape
    pk, sk = torch.randn(2, 50, 2, d, device="cuda").half(), torch.randn(b, 9, 2, d, device="cuda").half()
    lens_p = torch.tensor([50, 7], device="cuda", dtype=torch.int32)
    lens_s = torch.full((b,), 9, device="cuda", dtype=torch.int32)
    groups = torch.arange(b, device="cuda", dtype=torch.int32) % 2
    hidden, mask, weight, bias, kwargs = step_cases.make_inputs(step_cases.Case(bs=4, seq_len=30, hd=64, hm=32), "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, lse = o1kernels.tree_attention(q, k, v, plan, return_lse=True, backend="cuda")
        o1kernels.shared_prefix_attention(q, pk, pk, sk, sk, prefix_lens=lens_p, suffix_lens=lens_s, branch_group=groups,
                                          backend="cuda")
        o1kernels.merge_states(o, lse, o, lse, backend="cuda")
        o1kernels.step_rewards(hidden, mask, weight, bias, backend="cuda", **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay_decode_step():
    """Capture attention (tree + prefix cascade) + merge + step rewards once; replay after in-place
    updates of q, hidden and the plan's segment lengths (set_lengths with a device tensor)."""
    q, k, v, segments, plan = tree_inputs(torch.bfloat16, 8, 2, 128, page_size=16, num_queries=10, seed="graph")
    capacities = plan.seg_capacity_host
    hidden, mask, weight, bias, kwargs = step_cases.make_inputs(step_cases.Case(bs=6, seq_len=50, hd=128, hm=64,
                                                                                dtype=torch.bfloat16), "cuda")

    def step():
        o, lse = o1kernels.tree_attention(q, k, v, plan, return_lse=True, backend="cuda")
        o2, lse2 = o1kernels.merge_states(o, lse, o * 0.5, lse - 1.0, backend="cuda")
        scores, chain = o1kernels.step_rewards(hidden, mask, weight, bias, backend="cuda", **kwargs)
        return o2, lse2, scores, chain

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    rng = random.Random(1)
    for replay in range(3):
        lengths = [rng.randint(0, cap) for cap in capacities]
        plan.set_lengths(torch.tensor(lengths, dtype=torch.int32, device="cuda"))
        q.copy_((torch.randn(q.shape, device="cuda") * 2).to(q.dtype))
        hidden.copy_((torch.randn(hidden.shape, device="cuda") * 2).to(hidden.dtype))
        graph.replay()
        torch.cuda.synchronize()
        # Step rewards add hidden-layer tiles with float atomics: equal up to summation order.
        for got, expected in zip(outputs, step()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
        o_ref, lse_ref = tree_attention_f64(q.cpu(), k.cpu(), v.cpu(), segments, plan.page_size, lengths,
                                            q.shape[-1] ** -0.5)
        # merge with (0.5 o, lse - 1): weights 1 and 1/e.
        o_ref = o_ref * (1 + 0.5 / math.e) / (1 + 1 / math.e)
        report_mismatch(f"o (replay {replay})", outputs[0], o_ref, *TOLERANCES[torch.bfloat16])
        report_mismatch(f"lse (replay {replay})", outputs[1], lse_ref + math.log1p(1 / math.e),
                        *LSE_TOLERANCES[torch.bfloat16])


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, o1kernels
    from o1kernels import TreeAttentionPlan
    torch.manual_seed(0)
    segments = [([3, 0, 5], 37, [0, 1, 2]), ([1], 9, [1]), ([2, 4], 20, [2]), ([], 0, [0])]
    for dtype, d in ((torch.bfloat16, 64), (torch.float16, 256), (torch.float32, 48)):
        plan = TreeAttentionPlan(segments, 3, 16, device="cuda", kv_chunk_size=32)
        q = torch.randn(3, 8, d, device="cuda").to(dtype)
        k, v = torch.randn(6, 16, 2, d, device="cuda").to(dtype), torch.randn(6, 16, 2, d, device="cuda").to(dtype)
        o, lse = o1kernels.tree_attention(q, k, v, plan, return_lse=True, backend="cuda")
        o1kernels.merge_states(o, lse, o, lse, backend="cuda")
        pk, sk = torch.randn(2, 40, 2, d, device="cuda").to(dtype), torch.randn(3, 7, 2, d, device="cuda").to(dtype)
        o1kernels.shared_prefix_attention(q, pk, pk, sk, sk, branch_group=torch.tensor([1, 0, 1], device="cuda"),
                                          backend="cuda")
    for dtype, hd, hm in ((torch.bfloat16, 64, 72), (torch.float32, 40, 24), (torch.float16, 64, 0)):
        hidden = torch.randn(3, 300, hd, device="cuda").to(dtype)
        mask = torch.rand(3, 300, device="cuda") < 0.3
        kw = dict(mlp_weight=torch.randn(hm, hd, device="cuda").to(dtype), mlp_bias=torch.randn(hm, device="cuda")) if hm else {}
        o1kernels.step_rewards(hidden, mask, torch.randn(2, hm or hd, device="cuda"), norm_weight=torch.rand(hd, device="cuda"),
                               backend="cuda", **kw)
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = os.path.join(os.environ["CUDA_HOME"], "bin", "compute-sanitizer")
        found = candidate if os.path.exists(candidate) else None
    return found


@pytest.mark.parametrize("tool", ("memcheck", "racecheck"))
def test_compute_sanitizer_clean(tool):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, CUDA_HOME/bin)")
    result = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, "-c", SANITIZER_SCRIPT],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "sanitizer script done" in result.stdout, (
        f"compute-sanitizer --tool={tool} exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
