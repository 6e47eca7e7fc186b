"""Paged KV pool and branch tree: refcounts, sharing, release without leaks, exhaustion, byte accounting."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from o1kernels.decoder import KVPoolExhausted, ModelConfig, NaiveDecoder, PagedKVPool, Transformer, TreeDecoder
from o1kernels.decoder.kv_cache import KVTree


def small_pool(**kw) -> PagedKVPool:
    return PagedKVPool(2, 2, 4, **{"page_size": 4, **kw})


def expected_refcounts(tree: KVTree) -> np.ndarray:
    """Independent count: for each page, the number of live branches whose chain holds it."""
    counts = np.zeros(tree.pool.num_pages, dtype=np.int64)
    for br in tree.branches.values():
        pages = [p for seg in br.chain() for p in seg.pages]
        assert len(pages) == len(set(pages)), "a branch holds a page twice"
        counts[pages] += 1
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
    # every live branch reads exactly its own tokens from its chain's pages (no branch overwrote a shared page)
    for b in live:
        stored = [tree.pool.k[0][seg.pages[t // 4], t % 4, 0, 0].item() for seg in tree.branches[b].chain()
                  for t in range(seg.length)]
        assert stored == tree.tokens(b) and len(stored) == tree.branches[b].length
    for b in live:
        tree.release(b)
    assert tree.pool.pages_in_use == 0 and not tree.pool.refcount.any()
    assert sorted(tree.pool._free) == list(range(tree.pool.num_pages))


def test_fork_shares_pages_and_children_write_fresh_pages():
    tree = KVTree(small_pool(num_pages=32))
    root = tree.new_branch()
    tree.append(root, list(range(10)))  # 3 pages, last one half full
    prompt_pages = list(tree.branches[root].tail.pages)
    kids = tree.fork(root, 3)
    assert tree.pool.refcount[prompt_pages].tolist() == [4, 4, 4]
    written = set()
    for i, c in enumerate(kids):
        assert tree.tokens(c) == list(range(10))
        slots = tree.append(c, [100 + i] * 3)
        pages = {s // 4 for s in slots}
        assert not pages & set(prompt_pages), "a child wrote into a shared page"
        assert not pages & written
        written |= pages
        assert tree.tokens(c) == list(range(10)) + [100 + i] * 3
    # the parent also continues in a fresh tail
    assert not {s // 4 for s in tree.append(root, [7])} & set(prompt_pages)
    tree.release(root)
    assert tree.pool.refcount[prompt_pages].tolist() == [3, 3, 3]


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
    # prompt: 5 pages shared by all; each child: 10 tokens in 2 pages of its own
    assert fast.kv_bytes() == (5 + 6 * 2) * 8 * per_token
    assert naive.kv_bytes() == 6 * 47 * per_token
    assert fast.stats["peak_kv_bytes"] == fast.kv_bytes()
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
