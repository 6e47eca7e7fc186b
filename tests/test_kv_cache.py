"""Paged KV pool and branch tree (o1kernels.paged): refcounts, sharing, dense rows (a fork copies the partial last
page), release without leaks, exhaustion, byte accounting, atomicity."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from o1kernels.decoder import KVPoolExhausted, ModelConfig, NaiveDecoder, PagedKVPool, Transformer, TreeDecoder
from o1kernels.paged import KVTree


def small_pool(**kw) -> PagedKVPool:
    return PagedKVPool(2, 2, 4, **{"page_size": 4, **kw})


def expected_refcounts(tree: KVTree) -> np.ndarray:
    """Independent count: for each page, the number of live branches whose row holds it."""
    counts = np.zeros(tree.pool.num_pages, dtype=np.int64)
    for br in tree.branches.values():
        assert len(br.pages) == len(set(br.pages)), "a branch holds a page twice"
        counts[br.pages] += 1
    return counts


def test_pool_alloc_retain_release():
    pool = small_pool(num_pages=6)
    a = pool.alloc(3)
    assert a == [0, 1, 2] and pool.pages_in_use == 3 and pool.kv_bytes() == 3 * pool.bytes_per_page
    assert pool.bytes_per_page == 2 * 2 * 4 * 2 * 4 * 4  # K and V, layers, page_size, Hkv, D, fp32
    pool.retain(a[:2], times=2)
    pool.release(a)
    assert pool.refcount[:3].tolist() == [2, 2, 0] and pool.pages_in_use == 2
    pool.release(a[:2])
    pool.release(a[:2])
    assert pool.pages_in_use == 0 and not pool.refcount.any()
    with pytest.raises(RuntimeError, match="refcount"):
        pool.release([0])
    assert pool.peak_pages == 3


def test_pool_exhausted_fixed_size():
    pool = small_pool(num_pages=4)
    pool.alloc(3)
    with pytest.raises(KVPoolExhausted, match="needs 2 free pages, has 1 of 4.*larger num_pages"):
        pool.alloc(2)


def test_pool_grows_and_keeps_data():
    pool = small_pool(initial_pages=2)
    pages = pool.alloc(2)
    k = torch.randn(8, 2, 4)
    v = torch.randn(8, 2, 4)
    slots = torch.tensor([p * 4 + s for p in pages for s in range(4)])
    pool.write(1, slots, k, v)
    more = pool.alloc(5)
    assert pool.num_pages >= 7 and pool.k[1].shape[0] == pool.num_pages and len(set(pages + more)) == 7
    torch.testing.assert_close(pool.k[1][pages].reshape(8, 2, 4), k, rtol=0, atol=0)
    torch.testing.assert_close(pool.v[1][pages].reshape(8, 2, 4), v, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_forks_and_releases_do_not_leak(seed):
    rng = random.Random(seed)
    tree = KVTree(small_pool(initial_pages=4))

    def append(branch, tokens):  # store each token id as its K vector, to read the branches back from the pages
        slots = tree.append(branch, tokens)
        k = torch.tensor(tokens, dtype=torch.float32)[:, None, None].expand(-1, 2, 4)
        tree.pool.write(0, torch.tensor(slots), k, -k)

    live = [tree.new_branch()]
    append(live[0], list(range(rng.randint(1, 13))))
    for _ in range(300):
        op = rng.random()
        if op < 0.3 and len(live) < 40:
            live += tree.fork(rng.choice(live), rng.randint(1, 4))
        elif op < 0.55 and len(live) > 1:
            b = live.pop(rng.randrange(len(live)))
            tree.release(b)
        elif op < 0.8:
            append(rng.choice(live), [rng.randrange(50) for _ in range(rng.randint(1, 9))])
        elif op < 0.9:
            b = rng.choice(live)
            tree.reserve(b, rng.randint(1, 9))
        else:
            tree.trim(rng.choice(live))
        np.testing.assert_array_equal(tree.pool.refcount, expected_refcounts(tree))
        used = int((tree.pool.refcount > 0).sum())
        assert tree.pool.pages_in_use == used
    # every live branch reads exactly its own tokens from its row's pages (no branch overwrote a shared page; the
    # forks' copies of partial pages hold the parent's tokens)
    for b in live:
        br = tree.branches[b]
        stored = [tree.pool.k[0][br.pages[t // 4], t % 4, 0, 0].item() for t in range(br.length)]
        assert stored == tree.tokens(b) and len(stored) == br.length
    for b in live:
        tree.release(b)
    assert tree.pool.pages_in_use == 0 and not tree.pool.refcount.any()
    assert sorted(tree.pool._free) == list(range(tree.pool.num_pages))


def test_fork_shares_full_pages_and_copies_the_partial_one():
    tree = KVTree(small_pool(num_pages=32))
    root = tree.new_branch()
    slots = tree.append(root, list(range(10)))  # 3 pages, the last one half full
    k = torch.arange(10, dtype=torch.float32)[:, None, None].expand(-1, 2, 4)
    for layer in (0, 1):
        tree.pool.write(layer, torch.tensor(slots), k + layer, -k)
    full, partial = tree.branches[root].pages[:2], tree.branches[root].pages[2]
    kids = tree.fork(root, 3)
    assert tree.pool.refcount[full].tolist() == [4, 4] and tree.pool.refcount[partial] == 1
    written = set()
    for i, c in enumerate(kids):
        br = tree.branches[c]
        assert tree.tokens(c) == list(range(10)) and br.pages[:2] == full and br.pages[2] != partial
        for layer in (0, 1):  # the copy holds the parent's 2 tokens of the partial page, every layer, K and V
            torch.testing.assert_close(tree.pool.k[layer][br.pages[2], :2], k[8:] + layer, rtol=0, atol=0)
            torch.testing.assert_close(tree.pool.v[layer][br.pages[2], :2], -k[8:], rtol=0, atol=0)
        pages = {s // 4 for s in tree.append(c, [100 + i] * 3)}
        assert not pages & set(full), "a child wrote into a shared page"
        assert not pages & written
        written |= pages
        assert tree.tokens(c) == list(range(10)) + [100 + i] * 3
    # the parent continues in its own partial page; a fork of a branch on a page boundary copies nothing
    assert {s // 4 for s in tree.append(root, [7, 8])} == {partial}
    assert tree.branches[tree.fork(root, 1)[0]].pages == tree.branches[root].pages
    tree.release(root)
    assert tree.pool.refcount[full].tolist() == [4, 4]


def tiny_model() -> Transformer:
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Transformer(cfg, init_std=0.2)


def test_decoder_kv_bytes_sharing_and_release():
    model = tiny_model()
    fast = TreeDecoder(model, backend="torch", page_size=8)
    naive = NaiveDecoder(model)
    prompt = torch.randint(0, 40, (37,)).tolist()
    per_token = 2 * 2 * 2 * 4 * 4  # K and V, layers, Hkv, D, fp32 bytes
    for dec in (fast, naive):
        root = dec.add_prompt(prompt)
        kids = dec.fork(root, 6)
        dec.generate_step(kids, max_new_tokens=10, stop_ids=set(), temperature=1.0,
                          generator=torch.Generator().manual_seed(1))
        assert dec.kv_bytes_naive() == (37 + 6 * 47) * per_token
        dec.release(root)
        assert dec.kv_bytes_naive() == 6 * 47 * per_token
    # prompt: 4 full pages shared by all (the root's partial fifth released with it); each child: a copy of that
    # partial page (5 prompt tokens) and its 10 tokens in it and one more page
    assert fast.kv_bytes() == (4 + 6 * 2) * 8 * per_token
    assert naive.kv_bytes() == 6 * 47 * per_token
    assert fast.stats["peak_kv_bytes"] == fast.kv_bytes() + 8 * per_token  # the root's partial page, at the peak
    for b in list(fast.tree.branches):
        fast.release(b)
    assert fast.kv_bytes() == 0 and fast.pool.pages_in_use == 0


def test_decoder_beam_like_forks_release_everything():
    model = tiny_model()
    dec = TreeDecoder(model, backend="torch", page_size=4)
    gen = torch.Generator().manual_seed(0)
    beams = dec.fork(dec.add_prompt([1, 2, 3, 4, 5]), 4)
    for _ in range(4):
        out = dec.generate_step(beams, max_new_tokens=3, stop_ids={7}, temperature=1.0, generator=gen)
        keep = beams[:2]
        for b in beams[2:]:
            dec.release(b)
        beams = [c for b in keep for c in dec.fork(b, 2)]
        for b in keep:
            dec.release(b)
        np.testing.assert_array_equal(dec.pool.refcount, expected_refcounts(dec.tree))
        assert len(out.new_tokens) == 4
    dec.release(0)
    for b in beams:
        dec.release(b)
    assert dec.pool.pages_in_use == 0 and not dec.pool.refcount.any() and dec.kv_bytes() == 0


def test_bad_branch_and_pool_arguments():
    dec = TreeDecoder(tiny_model(), backend="torch", page_size=4, num_pages=3)
    root = dec.add_prompt([1, 2, 3])
    for call in (lambda: dec.fork(99, 2), lambda: dec.release(99), lambda: dec.tokens(99),
                 lambda: dec.teacher_force(99, [1]), lambda: dec.generate_step([root, 99], max_new_tokens=2)):
        with pytest.raises(ValueError, match="unknown branch id 99"):
            call()
    with pytest.raises(ValueError, match="n must be a positive integer"):
        dec.fork(root, 0)
    dec.release(root)
    with pytest.raises(ValueError, match="unknown branch id 0"):
        dec.release(root)
    with pytest.raises(KVPoolExhausted, match="num_pages"):
        dec.add_prompt(list(range(13)))
    with pytest.raises(ValueError, match="page_size must be a positive integer"):
        TreeDecoder(tiny_model(), page_size=0)
    with pytest.raises(ValueError, match="num_pages must be a positive integer or None"):
        small_pool(num_pages=0)


# ---------------------------------------------------------------- atomicity and size limits (issue 13)

def branch_rows(tree: KVTree) -> dict:
    """Each branch's row: (identity, pages, length, tokens)."""
    return {b: (id(br), list(br.pages), br.length, br.tokens()) for b, br in tree.branches.items()}


def decoder_state(dec) -> dict:
    """Everything a failed call must leave unchanged: pool refcounts and free list (in order), the branch table with
    each branch's row (identity, pages, length, tokens), and each branch's last hidden state."""
    if isinstance(dec, TreeDecoder):
        branches = branch_rows(dec.tree)
        store = (dec.pool.refcount.tolist(), list(dec.pool._free), dec.pool.num_pages)
    else:
        branches = {b: (br.length, list(br.tokens), [t.data_ptr() for t in br.k + br.v])
                    for b, br in dec.branches.items()}
        store = None
    return {"store": store, "branches": branches,
            "hidden": {b: (h.data_ptr(), h.clone()) for b, h in dec._last_hidden.items()}}


def assert_same_state(before: dict, after: dict) -> None:
    assert after["store"] == before["store"] and after["branches"] == before["branches"]
    assert after["hidden"].keys() == before["hidden"].keys()
    for b, (ptr, h) in before["hidden"].items():
        assert after["hidden"][b][0] == ptr and torch.equal(after["hidden"][b][1], h)


def test_failed_add_prompt_registers_no_branch():
    """The issue's reproducer: add_prompt raised KVPoolExhausted but left branch 0 registered (release(0) then
    raised KeyError)."""
    dec = TreeDecoder(tiny_model(), backend="torch", page_size=4, num_pages=2)
    before = decoder_state(dec)
    with pytest.raises(KVPoolExhausted, match="needs 6 free pages, has 2 of 2"):
        dec.add_prompt([1] + [5] * 20)
    assert_same_state(before, decoder_state(dec))
    with pytest.raises(ValueError, match="unknown branch id 0"):
        dec.release(0)
    assert dec.add_prompt([1, 5, 5]) == 0  # the id was not used up


def test_failed_generate_step_frees_its_reservation():
    """generate_step that runs out of pages used to keep the pages it had reserved for the first branches."""
    dec = TreeDecoder(tiny_model(), backend="torch", page_size=4, num_pages=5)
    kids = dec.fork(dec.add_prompt([1, 5, 5]), 2)  # the prompt's partial page, and a copy of it per child
    before = decoder_state(dec)
    with pytest.raises(KVPoolExhausted, match="needs 4 free pages, has 2 of 5"):
        dec.generate_step(kids, max_new_tokens=8)
    assert_same_state(before, decoder_state(dec))
    out = dec.generate_step(kids, max_new_tokens=4, stop_ids=set())  # fits: one page each
    assert [len(t) for t in out.new_tokens] == [4, 4]


class ModelFailure(RuntimeError):
    pass


def fail_on_call(model, call: int, monkeypatch):
    """Make the model's `call`-th run_layers (counted from now) raise after its first layer's attention ran."""
    calls = [0]
    real = model.run_layers

    def run_layers(ids, positions, attend):
        calls[0] += 1
        if calls[0] != call:
            return real(ids, positions, attend)

        def attend_then_fail(layer, q, k, v):
            attend(layer, q, k, v)  # the KV store has been written to
            raise ModelFailure("injected")

        return real(ids, positions, attend_then_fail)

    monkeypatch.setattr(model, "run_layers", run_layers)
    return lambda: monkeypatch.setattr(model, "run_layers", real)


@pytest.mark.parametrize("kind", ["tree", "naive"])
def test_error_inside_the_model_rolls_everything_back(kind, monkeypatch):
    """A model error in the middle of generate_step / add_prompt / teacher_force leaves the decoder as before the
    call, generator included: retrying gives what a decoder that never failed gives."""
    model = tiny_model()

    def make():
        return TreeDecoder(model, backend="torch", page_size=4) if kind == "tree" else NaiveDecoder(model)

    def prepared(dec):
        kids = dec.fork(dec.add_prompt([1, 2, 3, 4, 5, 6]), 3)
        dec.generate_step(kids, max_new_tokens=3, stop_ids=set(), temperature=1.0,
                          generator=torch.Generator().manual_seed(3))
        return kids

    clean, failing = make(), make()
    kids = prepared(clean)
    expected = clean.generate_step(kids, max_new_tokens=5, stop_ids={7}, temperature=1.0,
                                   generator=torch.Generator().manual_seed(9))
    assert prepared(failing) == kids
    gen = torch.Generator().manual_seed(9)
    for call in (1, 3):  # first decode iteration, a later one
        before = decoder_state(failing)
        restore = fail_on_call(model, call, monkeypatch)
        with pytest.raises(ModelFailure):
            failing.generate_step(kids, max_new_tokens=5, stop_ids={7}, temperature=1.0, generator=gen)
        restore()
        assert_same_state(before, decoder_state(failing))
    got = failing.generate_step(kids, max_new_tokens=5, stop_ids={7}, temperature=1.0, generator=gen)
    assert got.new_tokens == expected.new_tokens and got.step_scores == expected.step_scores

    before = decoder_state(failing)
    for call in (lambda: failing.add_prompt([1, 9, 9, 9, 9, 9]), lambda: failing.teacher_force(kids[0], [4] * 5)):
        restore = fail_on_call(model, 1, monkeypatch)
        with pytest.raises(ModelFailure):
            call()
        restore()
        assert_same_state(before, decoder_state(failing))


@pytest.mark.parametrize("kind", ["tree", "naive"])
def test_sizes_beyond_memory_are_value_errors(kind):
    """Reservations and forks larger than the memory available fail before allocating, naming the argument
    (a growable pool used to try a 256 GB allocation for max_new_tokens=1e9)."""
    model = tiny_model()
    dec = TreeDecoder(model, backend="torch", page_size=4) if kind == "tree" else NaiveDecoder(model)
    root = dec.add_prompt([1, 2, 3])
    before = decoder_state(dec)
    with pytest.raises(ValueError, match=r"max_new_tokens: .* needs .*B, more than the .*B available on cpu"):
        dec.generate_step([root], max_new_tokens=10**15)
    with pytest.raises(ValueError, match=r"^n: .* needs .*B, more than the .*B available on cpu"):
        dec.fork(root, 2**31 - 2)  # 1 TiB of host memory for the tree's branches, 768 GiB of dense KV for the naive one
    assert_same_state(before, decoder_state(dec))
    if kind == "tree":
        with pytest.raises(ValueError, match=r"n: at most 2\*\*31 - 1 live branches"):
            dec.fork(root, 2**31)
        with pytest.raises(ValueError, match=r"^num_pages: a KV pool of 1099511627776 pages of 4 tokens needs"):
            TreeDecoder(model, backend="torch", page_size=4, num_pages=2**40)
        with pytest.raises(ValueError, match=r"^num_pages: a KV pool of 4 pages of 2147483648 tokens needs"):
            PagedKVPool(2, 2, 4, page_size=2**31, num_pages=4)


def test_atomic_undoes_growth_forks_and_releases():
    """KVTree.atomic restores a pool that grew, branches forked and released, and rows appended to."""
    tree = KVTree(small_pool(initial_pages=2))
    root = tree.new_branch()
    tree.append(root, [1, 2, 3, 4, 5])
    kids = tree.fork(root, 2)
    tree.append(kids[0], [6])
    pool = tree.pool
    before = (pool.refcount.tolist(), list(pool._free), pool.num_pages, [t.shape for t in pool.k], branch_rows(tree))
    with pytest.raises(ModelFailure):
        with tree.atomic([root, kids[0]]):
            tree.append(kids[0], list(range(30)))  # grows the pool
            tree.fork(root, 3)
            tree.release(kids[1])
            tree.trim(kids[0])
            raise ModelFailure("injected")
    after = (pool.refcount.tolist(), list(pool._free), pool.num_pages, [t.shape for t in pool.k], branch_rows(tree))
    assert after == before
    tree.append(kids[0], list(range(30)))  # the pool grows again from the restored state
    np.testing.assert_array_equal(pool.refcount, expected_refcounts(tree))


def test_beam_search_kv_within_one_page_per_branch_of_the_ideal():
    """Beam-search forks and releases on the reference decoder: the pages held are at most the ideal (every fork
    lineage node's tokens once, in whole pages) plus one page per live branch (its copy of a partial page)."""
    model = tiny_model()
    dec = TreeDecoder(model, backend="torch", page_size=4)
    gen = torch.Generator().manual_seed(0)
    node_len, lineage = {}, {}  # node id -> tokens; branch -> its nodes, root first

    def new_node(branch, parents):
        node_len[len(node_len)] = 0
        lineage[branch] = parents + [len(node_len) - 1]

    root = dec.add_prompt([1, 2, 3, 4, 5, 6, 7])
    new_node(root, [])
    node_len[lineage[root][-1]] = 7
    beams = dec.fork(root, 4)
    for b in beams:
        new_node(b, lineage[root])
    for step in range(5):
        out = dec.generate_step(beams, max_new_tokens=(3, 6, 2, 9, 5)[step], stop_ids={7}, temperature=1.0, generator=gen)
        for b, toks in zip(beams, out.new_tokens):
            node_len[lineage[b][-1]] += len(toks)
        keep = beams[:2]
        for b in beams[2:]:
            dec.release(b)
            del lineage[b]
        beams = []
        for b in keep:
            for c in dec.fork(b, 2):
                new_node(c, lineage[b])
                beams.append(c)
        live_nodes = {n for b in lineage for n in lineage[b]}
        ideal = sum(-(-node_len[n] // 4) for n in live_nodes)
        assert dec.pool.pages_in_use <= ideal + len(lineage), (step, dec.pool.pages_in_use, ideal, len(lineage))
        np.testing.assert_array_equal(dec.pool.refcount, expected_refcounts(dec.tree))

