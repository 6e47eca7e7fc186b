"""PagedAttention: random forests given as plain block tables (the sharing found from page ids) against a float64
per-row reference; the sharing planner (compiled and numpy) against a brute-force one; lifecycle and bad input."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from o1kernels.capabilities import backend_unsupported_reason, spec_of
from o1kernels.paged import PagedAttention, find_runs
from o1kernels.paged.sharing import find_runs_numpy
from attention_reference import LSE_TOLERANCES, TOLERANCES, backends_on, random_values, report_mismatch

BACKENDS = backends_on("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_forest(rng: random.Random, page_size: int, prompts: int, branches: int, levels: int, max_new: int):
    """Block tables of a search forest: `prompts` prompts, each forked into up to `branches` rows through `levels`
    step levels; forks share full pages and copy a partial last page (dense rows); pages numbered in a random order.
    Returns (table [R, W], seq_lens [R], query_lens [R], num_pool_pages)."""
    next_page = [0]

    def new_pages(n):
        out = list(range(next_page[0], next_page[0] + n))
        next_page[0] += n
        return out

    def grow(row, length, extra):
        """Append `extra` tokens to a row of `length` tokens (new pages as needed)."""
        need = -(-(length + extra) // page_size) - len(row)
        return row + new_pages(need), length + extra

    rows = []
    for _ in range(prompts):
        frontier = [grow([], 0, rng.randint(1, 70))]
        for _ in range(levels):
            nxt = []
            for pages, length in frontier:
                for _ in range(rng.randint(1, 3)):
                    full = length // page_size
                    child = pages[:full] + (new_pages(1) if length % page_size else [])
                    nxt.append(grow(child, length, rng.randint(1, 40)))
            frontier = nxt[:branches]
        while len(frontier) < branches and rng.random() < 0.7:  # more leaves forked from the last level's nodes
            pages, length = rng.choice(frontier)
            full = length // page_size
            frontier.append(grow(pages[:full] + (new_pages(1) if length % page_size else []), length,
                                 rng.randint(1, 30)))
        rows += frontier
    rng.shuffle(rows)
    perm = list(range(next_page[0] + 3))
    rng.shuffle(perm)
    width = max(len(p) for p, _ in rows) + rng.randint(0, 2)
    table = np.full((len(rows), width), 7_777_777, dtype=np.int64)  # entries past a row's pages: never read
    for i, (pages, _) in enumerate(rows):
        table[i, :len(pages)] = [perm[p] for p in pages]
    seq = np.array([length for _, length in rows])
    qlen = np.array([rng.randint(1, min(max_new, length)) for length in seq])
    return table, seq, qlen, len(perm)


def paged_reference_f64(q, k_cache, v_cache, table, seq, qlen, page_size, sm_scale, window=None, softcap=None,
                        sinks=None):
    """float64: each row's queries over its own tokens read from its pages, causal by position."""
    outs, lses = [], []
    start = 0
    hq, d = q.shape[1:]
    group = hq // k_cache.shape[2]
    for r in range(len(seq)):
        tokens = np.arange(seq[r])
        pages = torch.as_tensor(table[r, tokens // page_size])
        slots = torch.as_tensor(tokens % page_size)
        k = k_cache[pages, slots].double().repeat_interleave(group, dim=1)
        v = v_cache[pages, slots].double().repeat_interleave(group, dim=1)
        qr = q[start:start + qlen[r]].double()
        scores = torch.einsum("qhd,thd->qht", qr, k) * sm_scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        pos = torch.arange(seq[r] - qlen[r], seq[r])[:, None]
        dist = pos - torch.as_tensor(tokens)[None, :]
        visible = (dist >= 0) & ((dist < window) if window is not None else True)
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks.double()[None, :, None].expand(len(qr), -1, 1)], dim=2)
            v = torch.cat([v, torch.zeros(1, hq, d, dtype=torch.float64)])
        lses.append(torch.logsumexp(scores, dim=2))
        outs.append(torch.einsum("qht,thd->qhd", torch.softmax(scores, dim=2), v))
        start += qlen[r]
    return torch.cat(outs), torch.cat(lses)


def _refused(backend, attn, q, k, **features) -> bool:
    """True when `backend` does not implement the planned call with these features (position masks when the plan
    needs them: chunks; a window always)."""
    masks = attn.plan_obj.masks or features.get("sliding_window") is not None
    return backend_unsupported_reason(backend, spec_of(q, k, positions=masks, **features)) is not None


# (prompts, branches, levels, page_size, Hq, Hkv, D, max new tokens per row)
FORESTS = [
    (1, 8, 2, 16, 8, 2, 32, 1),     # one prompt, decode rows, GQA 4
    (3, 6, 3, 4, 4, 1, 16, 5),      # a forest of 3 prompts, short chunks, MQA
    (8, 2, 0, 1, 4, 4, 24, 3),      # 8 prompts of 1-2 rows, page size 1, head_dim not a power of two
    (2, 64, 1, 32, 4, 2, 16, 1),    # 64 branches per prompt, page size 32
    (1, 3, 1, 16, 4, 2, 16, 512),   # rows with hundreds of new tokens (a prefill chunk) next to decode rows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("forest", FORESTS, ids=lambda f: f"p{f[0]}-b{f[1]}-l{f[2]}-ps{f[3]}-hkv{f[5]}-new{f[7]}")
def test_random_forest_block_tables_match_float64(forest, backend, dtype):
    prompts, branches, levels, page_size, hq, hkv, d, max_new = forest
    rng = random.Random(str(forest))
    if max_new > 100:  # long chunks: prompts long enough to hold them
        table, seq, qlen, num_pages = random_forest(rng, page_size, prompts, branches, levels, 1)
        seq = seq + 600
        width = -(-int(seq.max()) // page_size)
        table = np.concatenate([table, np.zeros((len(seq), width), np.int64)], axis=1)
        for r in range(len(seq)):  # each row's extra tokens on fresh pages of its own
            have = int(np.sum(table[r] != 7_777_777) - width)
            need = -(-int(seq[r]) // page_size) - have
            table[r, have:have + need] = np.arange(num_pages, num_pages + need)
            num_pages += need
        qlen = np.array([rng.choice([1, 512, rng.randint(2, 300)]) for _ in seq])
    else:
        table, seq, qlen, num_pages = random_forest(rng, page_size, prompts, branches, levels, max_new)
    k = (torch.randn(num_pages, page_size, hkv, d) * 1.5).to(dtype)
    v = random_values((num_pages, page_size, hkv, d), dtype)
    q = (torch.randn(int(qlen.sum()), hq, d) * 2).to(dtype)
    attn = PagedAttention(page_size, (hq, hkv), d, backend=backend, dtype=dtype)
    attn.plan(table, seq, query_lens=qlen)
    assert attn.plan_obj.masks == bool((qlen > 1).any())  # decode rows over whole segments need no masks
    if _refused(backend, attn, q, k):
        with pytest.raises(ValueError, match="does not implement"):
            attn.run(q, k, v)
        return
    o, lse = attn.run(q, k, v, return_lse=True)
    o_ref, lse_ref = paged_reference_f64(q, k, v, table, seq, qlen, page_size, d ** -0.5)
    report_mismatch(f"o ({backend})", o, o_ref, *TOLERANCES[dtype])
    report_mismatch(f"lse ({backend})", lse, lse_ref, *LSE_TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_through_the_wrapper(backend):
    rng = random.Random(11)
    table, seq, qlen, num_pages = random_forest(rng, 8, 2, 5, 2, 4)
    hq, hkv, d = 4, 2, 16
    k = torch.randn(num_pages, 8, hkv, d)
    v = random_values(k.shape, torch.float32)
    q = torch.randn(int(qlen.sum()), hq, d)
    sinks = torch.randn(hq)
    attn = PagedAttention(8, (hq, hkv), d, backend=backend, dtype=torch.float32)
    attn.plan(table, seq, query_lens=qlen)
    for kw in (dict(window=7), dict(softcap=3.0, sm_scale=0.4), dict(sinks=sinks, window=20)):
        feats = dict(sliding_window=kw.get("window"), softcap=kw.get("softcap"), sinks="sinks" in kw)
        if _refused(backend, attn, q, k, **feats):
            with pytest.raises(ValueError, match="does not implement"):
                attn.run(q, k, v, **kw)
            continue
        o = attn.run(q, k, v, **kw)
        o_ref, _ = paged_reference_f64(q, k, v, table, seq, qlen, 8, kw.get("sm_scale", d ** -0.5),
                                       kw.get("window"), kw.get("softcap"), kw.get("sinks"))
        report_mismatch(f"o ({backend}, {sorted(kw)})", o, o_ref, *TOLERANCES[torch.float32])


def test_shared_pages_are_read_once():
    """With every shared segment on the shared path and one query tile per segment, the layout's programs read
    exactly the distinct pages' tokens: the prompt once for all rows, not once per row."""
    rng = random.Random(2)
    for forest in [(1, 16, 2, 16), (4, 8, 3, 4), (2, 30, 1, 1)]:
        table, seq, qlen, _ = random_forest(rng, forest[3], *forest[:3], 1)
        attn = PagedAttention(forest[3], (4, 2), 16, path="cascade", queries_per_tile=1024)
        attn.plan(table, seq)
        distinct = {(int(table[r, t // forest[3]]), t % forest[3]) for r in range(len(seq)) for t in range(seq[r])}
        assert attn.unique_kv_tokens() == len(distinct)
        assert attn.kv_tokens_read("split") == len(distinct)
        per_row = int(seq.sum())
        assert len(distinct) < per_row  # the forest shares something, so reading it once saves reads
        decode = PagedAttention(forest[3], (4, 2), 16, path="decode")
        decode.plan(table, seq)
        assert decode.kv_tokens_read("fused") == per_row  # plain per-row decode reads each row's tokens


def test_indptr_form_and_set_lengths_equal_a_new_plan():
    rng = random.Random(4)
    table, seq, _, num_pages = random_forest(rng, 4, 2, 4, 2, 1)
    npages = -(-seq // 4)
    k = torch.randn(num_pages, 4, 2, 8)
    v = random_values(k.shape, torch.float32)
    q = torch.randn(len(seq), 4, 8)
    a = PagedAttention(4, (4, 2), 8, backend="torch")
    a.plan(table, seq)
    indptr = np.concatenate([[0], np.cumsum(npages)])
    indices = np.concatenate([table[r, :npages[r]] for r in range(len(seq))])
    b = PagedAttention(4, (4, 2), 8, backend="torch")
    b.plan(kv_indptr=indptr, kv_indices=indices, seq_lens=seq)
    torch.testing.assert_close(a.run(q, k, v), b.run(q, k, v), rtol=0, atol=0)
    # rows shrink by up to 3 tokens within their pages: set_lengths (host and device) == a fresh plan
    shorter = np.maximum(seq - np.array([rng.randint(0, 3) for _ in seq]), 1)
    fresh = PagedAttention(4, (4, 2), 8, backend="torch")
    fresh.plan(table, shorter, num_pages=npages)
    a.set_lengths(torch.from_numpy(shorter))
    torch.testing.assert_close(a.run(q, k, v), fresh.run(q, k, v), rtol=0, atol=0)
    a.set_lengths(shorter.tolist())
    torch.testing.assert_close(a.run(q, k, v), fresh.run(q, k, v), rtol=0, atol=0)


def test_capture_stable_plans_update_in_place():
    rng = random.Random(9)
    table, seq, _, num_pages = random_forest(rng, 4, 2, 4, 2, 1)
    k = torch.randn(num_pages + 50, 4, 2, 8)
    v = random_values(k.shape, torch.float32)
    attn = PagedAttention(4, (4, 2), 8, backend="torch", capture_stable=True)
    assert attn.plan(table, seq) is True
    tensors = (attn.plan_obj.seg_lens.data_ptr(), attn.plan_obj.q_pos.data_ptr(), attn._table.data_ptr())
    # drop a row, fork another (its full pages shared, a fresh page): same row count, laid out in place
    table2, seq2 = table.copy(), seq.copy()
    full = seq[0] // 4
    table2[-1, :full + 1] = np.concatenate([table[0, :full], [num_pages + 1]])
    seq2[-1] = seq[0] + 1
    assert attn.plan(table2, seq2) is False
    assert (attn.plan_obj.seg_lens.data_ptr(), attn.plan_obj.q_pos.data_ptr(), attn._table.data_ptr()) == tensors
    q = torch.randn(len(seq), 4, 8)
    fresh = PagedAttention(4, (4, 2), 8, backend="torch")
    fresh.plan(table2, seq2)
    torch.testing.assert_close(attn.run(q, k, v), fresh.run(q, k, v), rtol=0, atol=0)
    # many more rows than the capacity: new tensors, the caller must capture again
    big = np.concatenate([table2] * 8)
    assert attn.plan(big, np.concatenate([seq2] * 8), query_lens=np.ones(8 * len(seq), int)) is True


def brute_force_runs(table, npages, first=None):
    """Each row's pages (from column first[r], default 0) cut where the set of rows holding the page (same page id)
    changes."""
    first = np.zeros(len(npages), dtype=int) if first is None else first
    readers = {}
    for r in range(len(npages)):
        for j in range(first[r], npages[r]):
            readers.setdefault(int(table[r, j]), set()).add(r)
    out = []
    for r in range(len(npages)):
        runs, j = [], int(first[r])
        while j < npages[r]:
            e = j + 1
            while e < npages[r] and readers[int(table[r, e])] == readers[int(table[r, j])]:
                e += 1
            runs.append((tuple(table[r, j:e]), frozenset(readers[int(table[r, j])])))
            j = e
        out.append(runs)
    return out


def _as_runs(result, table):
    segs = result.segments
    out = []
    for r in range(len(result.row_run_ptr) - 1):
        runs = []
        for s in result.row_runs[result.row_run_ptr[r]:result.row_run_ptr[r + 1]]:
            rep, col, n, _ = segs[s]
            runs.append(tuple(table[rep, col:col + n]))
        out.append(runs)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_planner_matches_brute_force(seed):
    rng = random.Random(seed)
    table, seq, _, _ = random_forest(rng, rng.choice([1, 2, 4]), rng.randint(1, 4), rng.randint(1, 12),
                                     rng.randint(0, 3), 1)
    table = table.astype(np.int32)
    npages = (-(-seq // 4) if False else np.array([int(np.sum(row != 7_777_777)) for row in table])).astype(np.int32)
    expected = brute_force_runs(table, npages)
    for impl in (find_runs, find_runs_numpy):
        got = impl(table, npages)
        runs = _as_runs(got, table)
        assert runs == [[pages for pages, _ in row] for row in expected], impl.__name__
        readers = {}
        for row_runs in expected:
            for pages, rows in row_runs:
                readers[pages] = len(rows)
        assert [int(c) for c in got.segments[:, 3]] == [readers[tuple(table[s[0], s[1]:s[1] + s[2]])]
                                                       for s in got.segments]
    np.testing.assert_array_equal(find_runs(table, npages).segments, find_runs_numpy(table, npages).segments)


def stale_window_table(rng: random.Random, table, seq, qlen, page_size: int, window: int, nan_pages):
    """The block table a sliding-window decoder keeps: the entries before each row's first page in the window hold
    ids of pages freed and reused since (pages live in other rows, at other columns, or `nan_pages`)."""
    first = np.maximum(seq - qlen - window + 1, 0) // page_size
    stale = table.copy()
    live = [int(p) for r in range(len(seq)) for p in table[r, first[r]:-(-seq[r] // page_size)]]
    for r in range(len(seq)):
        for c in range(first[r]):
            stale[r, c] = rng.choice(live) if rng.random() < 0.5 else rng.choice(nan_pages)
    return stale, first


@pytest.mark.parametrize("seed", range(4))
def test_window_plans_skip_pages_behind_the_window(seed):
    """plan(..., window=W) over a table whose entries behind every window are stale (pages reused elsewhere, at
    other columns, or NaN pages): no error, those entries never read, every backend equals float64 in the window;
    runs as a brute force from each row's first page, compiled and numpy planners alike."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 4, 8])
    table, seq, qlen, num_pages = random_forest(rng, page_size, rng.randint(1, 3), rng.randint(2, 10), 2, 4)
    window = rng.choice([3, 9, 30])
    nan_pages = [num_pages, num_pages + 1]
    stale, first = stale_window_table(rng, table, seq, qlen, page_size, window, nan_pages)
    assert first.any()
    hq, hkv, d = 4, 2, 16
    k = torch.randn(num_pages + 2, page_size, hkv, d)
    v = random_values(k.shape, torch.float32)
    k[nan_pages] = float("nan")
    v[nan_pages] = float("nan")
    q = torch.randn(int(qlen.sum()), hq, d)
    o_ref, _ = paged_reference_f64(q, k, v, table, seq, qlen, page_size, d ** -0.5, window)
    for backend in BACKENDS:
        attn = PagedAttention(page_size, (hq, hkv), d, backend=backend, dtype=torch.float32)
        attn.plan(stale, seq, query_lens=qlen, window=window)
        if _refused(backend, attn, q, k, sliding_window=window):
            continue
        report_mismatch(f"o ({backend})", attn.run(q, k, v, window=window), o_ref, *TOLERANCES[torch.float32])
        for wider in (None, window + 1):
            with pytest.raises(ValueError, match=f"window must be at most {window}"):
                attn.run(q, k, v, window=wider)
    # each row's runs cover its pages from its first one, and a run's pages have one set of readers (rows that share
    # a page but begin at different columns are not a forest: exact, one segment per page)
    npages = (-(-seq // page_size)).astype(np.int32)
    expected = brute_force_runs(stale, npages, first)
    readers = {page: rows for row in expected for pages, rows in row for page in pages}
    stale32 = stale.astype(np.int32)
    for impl in (find_runs, find_runs_numpy):
        got = _as_runs(impl(stale32, npages, first), stale32)
        assert [[p for run in row for p in run] for row in got] == [[p for run, _ in row for p in run]
                                                                   for row in expected], impl.__name__
        assert all(len({readers[p] for p in run}) == 1 for row in got for run in row), impl.__name__
    np.testing.assert_array_equal(find_runs(stale32, npages, first).segments,
                                  find_runs_numpy(stale32, npages, first).segments)
    # the next plan, without a window, continuing every row: planned in full (the slots hold 0 behind the window)
    attn = PagedAttention(page_size, (hq, hkv), d, backend="torch", dtype=torch.float32)
    attn.plan(stale, seq, query_lens=qlen, window=window)
    attn.plan(table, seq, query_lens=qlen, continues=np.arange(len(seq)))
    o_full, _ = paged_reference_f64(q, k, v, table, seq, qlen, page_size, d ** -0.5)
    report_mismatch("o (full after window)", attn.run(q, k, v), o_full, *TOLERANCES[torch.float32])


def test_window_plan_refuses_a_window_that_is_not_a_positive_int():
    attn = PagedAttention(4, (4, 2), 8, backend="torch", dtype=torch.float32)
    table = np.array([[0, 1], [0, 2]])
    for bad in (0, -3, 2.5, True):  # check_count's rule: a ValueError naming the argument
        with pytest.raises(ValueError, match=r"window must be an int in \[1, 2\*\*31 - 1\]"):
            attn.plan(table, np.array([6, 7]), window=bad)


def test_window_plan_of_samples_in_step_still_shares():
    """4 samples of one prompt decoding in step, window 20 on pages of 4: columns 0-2 are behind every window (stale
    ids, different per row); the prompt's pages 3-5 are still one segment read once for the 4 rows."""
    table = np.array([[90 + r, 80 + r, 70 + r, 3, 4, 5, 10 + 2 * r, 11 + 2 * r] for r in range(4)])
    table[0, :3] = [4, 4, 10]  # reused ids: live pages at other columns
    attn = PagedAttention(4, (4, 2), 8, backend="torch", dtype=torch.float32)
    attn.plan(table, np.full(4, 32), window=20)
    assert attn.batch.segments[:, 1:].tolist() == [[3, 3, 4], [6, 2, 1], [6, 2, 1], [6, 2, 1], [6, 2, 1]]
    assert attn.unique_kv_tokens() == 3 * 4 + 4 * 8


def test_planner_on_tables_that_are_not_a_forest():
    """A page after different pages in two rows: still exact (one segment per page)."""
    table = np.array([[0, 1, 2], [3, 1, 2], [0, 1, 4]], dtype=np.int32)
    npages = np.array([3, 3, 3], dtype=np.int32)
    expected = brute_force_runs(table, npages)
    for impl in (find_runs, find_runs_numpy):
        assert _as_runs(impl(table, npages), table) == [[p for p, _ in row] for row in expected]


def test_bad_block_tables_and_lengths_raise_before_planning():
    attn = PagedAttention(4, (4, 2), 8)
    table = np.array([[0, 1], [0, 2]])
    for kwargs, match in [
        (dict(block_table=np.array([[0, 1], [1, 0]]), seq_lens=[8, 8]), "page 1 is at column 0"),
        (dict(block_table=np.array([[0, -1]]), seq_lens=[8]), "is not a page id"),
        (dict(block_table=table, seq_lens=[8]), "seq_lens must have 2 entries"),
        (dict(block_table=table, seq_lens=[8, 9]), "num_pages\\[1\\] = 3 is more than the block table's 2 columns"),
        (dict(block_table=table, seq_lens=[8, 8], query_lens=[1, 9]), "query_lens\\[1\\] = 9 exceeds seq_lens"),
        (dict(block_table=table, seq_lens=[8, 8], num_pages=[1, 2]), "num_pages\\[0\\] = 1 pages cannot hold"),
        (dict(block_table=table, seq_lens=[-1, 8]), "seq_lens must be in"),
        (dict(block_table=np.zeros((2, 2, 2), int), seq_lens=[1, 1]), "block_table must be a 2-D integer"),
        (dict(block_table=table.astype(float), seq_lens=[1, 1]), "block_table must be a 2-D integer"),
        (dict(block_table=table, seq_lens=[1.5, 2]), "seq_lens must be a 1-D sequence of ints"),
        (dict(kv_indptr=[0, 3], kv_indices=[0, 1], seq_lens=[8]), "kv_indptr must start at 0"),
        (dict(seq_lens=[8]), "give either block_table or kv_indptr"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            attn.plan(**kwargs)
    with pytest.raises(ValueError, match="num_heads must be"):
        PagedAttention(4, (3, 2), 8)
    with pytest.raises(RuntimeError, match="before plan"):
        attn.run(torch.randn(1, 4, 8), torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8))
    attn.plan(table, [8, 8])
    with pytest.raises(ValueError, match="plan uses page 2 but k_cache has only 2 pages"):
        attn.run(torch.randn(2, 4, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8))
    with pytest.raises(ValueError, match="q must have shape \\[2, 4, 8\\]"):
        attn.run(torch.randn(2, 2, 8), torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8))
    with pytest.raises(ValueError, match="seq_lens\\[0\\] = 9 must be in \\[1, 8\\]"):
        attn.set_lengths([9, 8])


def test_auto_falls_back_for_head_dim_512():
    """head_dim 512: no compiled or Triton kernel takes it; auto runs the torch reference instead of raising, an
    explicit backend names why it cannot."""
    attn = PagedAttention(4, (2, 1), 512, dtype=torch.float32)
    attn.plan(np.array([[0, 1]]), [6])
    q, k = torch.randn(1, 2, 512), torch.randn(2, 4, 1, 512)
    v = random_values(k.shape, torch.float32)
    o = attn.run(q, k, v)
    o_ref, _ = paged_reference_f64(q, k, v, np.array([[0, 1]]), np.array([6]), np.array([1]), 4, 512 ** -0.5)
    report_mismatch("o (auto, D=512)", o, o_ref, *TOLERANCES[torch.float32])
    for backend in ("cpu", "triton"):
        if backend in BACKENDS:
            explicit = PagedAttention(4, (2, 1), 512, backend=backend)
            explicit.plan(np.array([[0, 1]]), [6])
            with pytest.raises(ValueError, match=f"backend '{backend}'"):
                explicit.run(q, k, v)


def _row_runs(attn):
    """Each row's runs as tuples of page ids read from the wrapper's device table (slot-independent)."""
    table, runs = attn._table.cpu().numpy(), attn.batch
    plan = attn.plan_obj
    width = table.shape[1]
    out = []
    for r in range(runs.rows):
        segs = [s for s in range(plan.num_segments) if r in set(plan.queries_of(s).tolist())]
        out.append(sorted(tuple(table.reshape(-1)[plan.segs.page_start[s]:plan.segs.page_start[s]
                                                  + plan.segs.capacity[s] // attn.page_size]) for s in segs))
    del width
    return out


@pytest.mark.parametrize("seed", range(4))
def test_incremental_plans_equal_full_plans(seed):
    """A search's steps (forks sharing full pages + a copied page, releases, rows growing by pages, trims) planned
    with `continues` hints: the same segments per row and the same attention as a plan of each table from scratch."""
    rng = random.Random(seed)
    page = 4
    branches = {0: list(range(6))}  # branch -> its pages
    next_page = [6]

    def fresh(n):
        next_page[0] += n
        return list(range(next_page[0] - n, next_page[0]))

    incremental = PagedAttention(page, (4, 2), 8, backend="torch", capture_stable=True)
    prev_order = None
    k = torch.randn(4096, page, 2, 8)
    v = random_values(k.shape, torch.float32)
    for step in range(12):
        op = rng.random()
        ids = sorted(branches)
        if op < 0.35 and len(branches) < 24:  # fork a branch: children share its full pages, copy its last one
            parent = rng.choice(ids)
            for _ in range(rng.randint(1, 4)):
                branches[max(branches) + 1] = branches[parent][:-1] + fresh(1)
        elif op < 0.55 and len(branches) > 1:
            del branches[rng.choice(ids)]
        else:  # every branch grows by 0-2 pages, some trim one
            for b in ids:
                grow = rng.randint(0, 2)
                branches[b] = (branches[b][:-1] if grow == 0 and len(branches[b]) > 2 else branches[b]) + fresh(grow)
        order = sorted(branches)
        rng.shuffle(order)
        table = np.zeros((len(order), max(len(branches[b]) for b in order)), dtype=np.int64)
        for i, b in enumerate(order):
            table[i, :len(branches[b])] = branches[b]
        npages = np.array([len(branches[b]) for b in order])
        seq = npages * page - np.array([rng.randint(0, page - 1) for _ in order])
        continues = None if prev_order is None else [prev_order.index(b) if b in prev_order else -1 for b in order]
        incremental.plan(table, seq, num_pages=npages, continues=continues)
        full = PagedAttention(page, (4, 2), 8, backend="torch")
        full.plan(table, seq, num_pages=npages)
        assert _row_runs(incremental) == _row_runs(full), step
        q = torch.randn(len(order), 4, 8)
        torch.testing.assert_close(incremental.run(q, k, v), full.run(q, k, v), rtol=0, atol=0)
        prev_order = order


def test_continues_hints_trim_and_regrow_and_bad_hints():
    """A row whose reserved pages (past its tokens) were trimmed and retaken between plans -- even a page back at the
    column it had -- is re-read from its tokens' last page on; a continued row that changed a page holding its
    tokens, and malformed hints, are errors; a failed plan makes the next one start over."""
    attn = PagedAttention(4, (4, 2), 8, backend="torch")
    attn.plan(np.array([[0, 1, 2, 6], [0, 1, 3, 7]]), [5, 9], num_pages=[4, 4])  # pages past the tokens: reserved
    # row 0's reserved pages 2 and 6 were trimmed and pages 7 and 6 taken (7 from row 1, which also let 7 go and took
    # 9): the pages at columns 2-3 changed, one of them to the page it had at column 3
    attn.plan(np.array([[0, 1, 7, 6], [0, 1, 3, 9]]), [5, 9], num_pages=[4, 4], continues=[0, 1])
    assert [tuple(r) for r in _row_runs(attn)] == [((0, 1), (7, 6)), ((0, 1), (3, 9))]
    attn.plan(np.array([[0, 1, 2], [0, 1, 3]]), [12, 12])
    with pytest.raises(ValueError, match="continues a row of the previous plan but its page at column 2 is 5"):
        attn.plan(np.array([[0, 1, 5], [0, 1, 3]]), [12, 12], continues=[0, 1])
    attn.plan(np.array([[0, 1, 2], [0, 1, 3]]), [12, 12])
    with pytest.raises(ValueError, match="page ids? "):
        attn.plan(np.array([[0, 1, -5], [0, 1, 3]]), [12, 12], continues=[0, 1])
    with pytest.raises(ValueError, match="continues values must be -1 or rows of the previous plan"):
        attn.plan(np.array([[0, 1, 2]]), [12], continues=[7])
    with pytest.raises(ValueError, match="continued by at most one row"):
        attn.plan(np.array([[0, 1, 2], [0, 1, 3]]), [12, 12], continues=[0, 0])
    with pytest.raises(ValueError, match="continues must have 2 entries"):
        attn.plan(np.array([[0, 1, 2], [0, 1, 3]]), [12, 12], continues=[0])
    attn.plan(np.array([[0, 1, 5], [0, 1, 3]]), [12, 12], continues=[0, 1])  # after a failure: planned in full
    assert [tuple(r) for r in _row_runs(attn)] == [((0, 1), (5,)), ((0, 1), (3,))]


@pytest.mark.parametrize("seed", range(6))
def test_batch_segments_compiled_equals_numpy(seed):
    from o1kernels.paged.attention import batch_segments
    from o1kernels.paged.sharing import SharingPlanner

    if not SharingPlanner().compiled:
        pytest.skip("o1kernels._C is not built")
    rng = random.Random(seed)
    table, seq, qlen, _ = random_forest(rng, rng.choice([1, 4, 16]), rng.randint(1, 4), rng.randint(1, 9),
                                        rng.randint(0, 3), rng.choice([1, 5]))
    npages = np.array([int(np.sum(row != 7_777_777)) for row in table], dtype=np.int32)
    runs = find_runs(table.astype(np.int32) % 7_777_777, npages)
    for compiled in (True, False):
        got = batch_segments(runs, seq.astype(np.int64), qlen.astype(np.int64), 40, 4, compiled)
        if compiled:
            ref = got
            continue
        segs, ref_segs = got[0], ref[0]
        for name in ("page_start", "capacity", "start", "query_ptr", "queries"):
            np.testing.assert_array_equal(getattr(segs, name), getattr(ref_segs, name), err_msg=name)
        for a, b in zip(got[1:6], ref[1:6]):
            np.testing.assert_array_equal(a, b)
        assert got[6] == ref[6]


def test_plan_and_host_lengths_refused_inside_a_capture(monkeypatch):
    """Inside a CUDA-graph capture plan() and set_lengths with host values would stage through recycled pinned
    buffers: refused, naming the argument (the capture state patched in: no GPU here)."""
    import o1kernels.plan as plan_module

    attn = PagedAttention(4, (4, 2), 8)
    attn.plan(np.array([[0, 1]]), [6])
    monkeypatch.setattr(plan_module, "capturing", lambda device: True)
    monkeypatch.setattr("o1kernels.paged.attention.capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        attn.plan(np.array([[0, 1]]), [7])
    with pytest.raises(RuntimeError, match="seq_lens"):
        attn.set_lengths([7])
    attn.set_lengths(torch.tensor([7]))  # a device tensor: device ops only
