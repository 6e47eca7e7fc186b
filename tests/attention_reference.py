"""Independent float64 references and helpers for the attention tests.

Everything here works on explicit per-query key lists (no paging, no LSE merging), so it
shares no code path with the implementations under test.
"""
from __future__ import annotations

import math
import random

import torch

# (dtype, atol, rtol) of an attention output against the float64 reference. Outputs are convex
# combinations of V rows in [-1, 1]; fp16/bf16 errors come from rounding q/k/v products and
# the final store (bf16 has 8 mantissa bits: ~4e-3 relative per rounding).
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# lse is float32 for every dtype, but computed from rounded inputs.
LSE_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def attention_f64(q_row: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, softcap=None):
    """One query row q_row [Hq, D] over keys k, v [T, Hkv, D] in float64 (softcap: scores -> softcap *
    tanh(scores / softcap)).

    Returns (o [Hq, D], lse [Hq]); T == 0 gives o = 0, lse = -inf.
    """
    hq, d = q_row.shape
    hkv = k.shape[1]
    o = torch.zeros(hq, d, dtype=torch.float64)
    lse = torch.full((hq,), -math.inf, dtype=torch.float64)
    if k.shape[0] == 0:
        return o, lse
    group = hq // hkv
    kd = k.double().cpu().repeat_interleave(group, dim=1)
    vd = v.double().cpu().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,thd->ht", q_row.double().cpu(), kd) * sm_scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    lse = torch.logsumexp(scores, dim=1)
    o = torch.einsum("ht,thd->hd", torch.softmax(scores, dim=1), vd)
    return o, lse


def keys_of_query_paged(k_cache, v_cache, segments, query, page_size, lengths):
    """Concatenate the tokens of every segment that lists `query` (gathered token by token)."""
    ks, vs = [], []
    for (pages, _, queries), length in zip(segments, lengths):
        if query in list(queries):
            for t in range(length):
                ks.append(k_cache[pages[t // page_size], t % page_size])
                vs.append(v_cache[pages[t // page_size], t % page_size])
    if not ks:
        shape = (0,) + tuple(k_cache.shape[2:])
        return k_cache.new_zeros(shape), v_cache.new_zeros(shape)
    return torch.stack(ks), torch.stack(vs)


def tree_attention_f64(q, k_cache, v_cache, segments, page_size, lengths, sm_scale):
    """float64 tree attention: returns (o [NQ, Hq, D], lse [NQ, Hq])."""
    outs, lses = [], []
    for i in range(q.shape[0]):
        k, v = keys_of_query_paged(k_cache, v_cache, segments, i, page_size, lengths)
        o, lse = attention_f64(q[i], k, v, sm_scale)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def random_tree(num_leaves_max: int, depth: int, seg_len_max: int, rng: random.Random):
    """Random tree of `depth` levels: returns a list of (length, parent) nodes and the leaves.

    Node 0 is the root (level 1). Every node at level < depth has 1-3 children; lengths are
    random in [0, seg_len_max] (0 gives empty segments).
    """
    nodes = [(rng.randint(0, seg_len_max), -1)]
    frontier = [0]
    for _ in range(depth - 1):
        nxt = []
        for parent in frontier:
            for _ in range(rng.randint(1, 3)):
                if len(nxt) >= num_leaves_max:
                    break
                nodes.append((rng.randint(0, seg_len_max), parent))
                nxt.append(len(nodes) - 1)
        frontier = nxt or frontier
    leaves = frontier
    return nodes, leaves


def tree_segments(nodes, leaves, page_size: int, num_pages_spare: int, rng: random.Random):
    """Lay the tree's nodes out in a randomly permuted page pool.

    Each leaf is one query row; a node's segment lists the leaves below it. Some nodes get
    spare capacity (extra pages beyond their length). Returns (segments, num_pages).
    """
    leaf_row = {leaf: i for i, leaf in enumerate(leaves)}
    below: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for leaf in leaves:
        node = leaf
        while node != -1:
            below[node].append(leaf_row[leaf])
            node = nodes[node][1]
    page_counts = [-(-length // page_size) + rng.randint(0, 1) for length, _ in nodes]
    total = sum(page_counts) + num_pages_spare
    perm = list(range(total))
    rng.shuffle(perm)
    segments, used = [], 0
    for (length, _), count, node in zip(nodes, page_counts, range(len(nodes))):
        segments.append((perm[used:used + count], length, below[node]))
        used += count
    return segments, total


def report_mismatch(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """Assert got ~= ref (both finite where ref is, -inf where ref is); print the worst entries."""
    got64 = got.double().cpu()
    ref64 = ref.double().cpu()
    neg_ref = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(got64), neg_ref), f"{name}: -inf pattern differs ({int((torch.isneginf(got64) != neg_ref).sum())} entries)"
    finite = ~neg_ref
    assert torch.isfinite(got64[finite]).all(), f"{name}: non-finite values where the reference is finite"
    err = (got64 - ref64).abs().masked_fill(neg_ref, 0)
    bound = atol + rtol * ref64.abs().masked_fill(neg_ref, 0)
    bad = err > bound
    if bad.any():
        worst = torch.topk((err - bound).flatten(), min(5, int(bad.sum()))).indices
        lines = [f"  at {tuple(int(i) for i in torch.unravel_index(j, err.shape))}: got {got64.flatten()[j]:.6g} "
                 f"ref {ref64.flatten()[j]:.6g}" for j in worst]
        raise AssertionError(f"{name}: {int(bad.sum())}/{err.numel()} entries beyond atol={atol} rtol={rtol}; "
                             f"max err {err.max():.3g}\n" + "\n".join(lines))


def backends_on(device: str) -> list[str]:
    """Concrete backends usable on `device` (Triton on the CPU through its interpreter)."""
    from o1kernels import available_backends

    return [name for name, reason in available_backends(device).items() if reason is None]


def random_values(shape, dtype, device="cpu"):
    """Uniform values in [-1, 1) in `dtype` (never zeros: every test input is random)."""
    return (torch.rand(shape, device=device) * 2 - 1).to(dtype)


def positioned_attention_f64(q, k_cache, v_cache, segments, page_size, lengths, positions, sm_scale, *, window=None,
                             softcap=None, sinks=None):
    """float64 attention of query rows with positions over segments (pages, length, queries, start): row i sees
    token t of a segment listing it iff start + t <= positions[i] and (window) positions[i] - start - t < window;
    scores capped by softcap * tanh(s / softcap); sinks [Hq] join each softmax denominator.
    Returns (o [NQ, Hq, D], lse [NQ, Hq]) (lse includes the sink)."""
    num_q, hq, d = q.shape
    group = hq // k_cache.shape[2]
    outs, lses = [], []
    for i in range(num_q):
        ks, vs = [], []
        for (pages, _, queries, start), length in zip(segments, lengths):
            if i not in list(queries):
                continue
            for t in range(length):
                dist = positions[i] - (start + t)
                if dist < 0 or (window is not None and dist >= window):
                    continue
                ks.append(k_cache[pages[t // page_size], t % page_size])
                vs.append(v_cache[pages[t // page_size], t % page_size])
        scores = torch.zeros(hq, 0, dtype=torch.float64)
        vd = torch.zeros(0, hq, d, dtype=torch.float64)
        if ks:
            kd = torch.stack(ks).double().repeat_interleave(group, dim=1)
            vd = torch.stack(vs).double().repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,thd->ht", q[i].double(), kd) * sm_scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
        if sinks is not None:
            scores = torch.cat([scores, sinks.double()[:, None]], dim=1)
            vd = torch.cat([vd, torch.zeros(1, hq, d, dtype=torch.float64)])
        if scores.shape[1] == 0:
            outs.append(torch.zeros(hq, d, dtype=torch.float64))
            lses.append(torch.full((hq,), -math.inf, dtype=torch.float64))
            continue
        lses.append(torch.logsumexp(scores, dim=1))
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(scores, dim=1), vd))
    return torch.stack(outs), torch.stack(lses)


def positioned_tree(nodes, leaves, page_size, rng, *, max_new: int = 1):
    """A random tree laid out in pages with positions: each node's segment starts where its parent's tokens end; each
    leaf has 1..max_new query rows, the last ones of its own tokens (a chunk: causal inside the leaf). Returns
    (segments (pages, length, queries, start), positions, num_pages)."""
    start = {}
    for n, (length, parent) in enumerate(nodes):
        start[n] = 0 if parent == -1 else start[parent] + nodes[parent][0]
    rows_of_leaf, positions = {}, []
    for leaf in leaves:
        end = start[leaf] + nodes[leaf][0]
        t = rng.randint(1, max_new)
        rows_of_leaf[leaf] = list(range(len(positions), len(positions) + t))
        positions += [max(0, end - t + j) for j in range(t)]
    below = {i: [] for i in range(len(nodes))}
    for leaf in leaves:
        node = leaf
        while node != -1:
            below[node] += rows_of_leaf[leaf]
            node = nodes[node][1]
    counts = [-(-length // page_size) + rng.randint(0, 1) for length, _ in nodes]
    perm = list(range(sum(counts) + 2))
    rng.shuffle(perm)
    segments, used = [], 0
    for n, ((length, _), count) in enumerate(zip(nodes, counts)):
        segments.append((perm[used:used + count], length, below[n], start[n]))
        used += count
    return segments, positions, len(perm)
