"""Property-based fuzzing (hypothesis), bounded and deterministic for CI (derandomize, small example counts, no
example database written to the checkout):

- random trees: tree_attention on every CPU backend against float64 attention over each query's explicit keys;
- random invalid arguments to every public function: a TypeError/ValueError whose message names the argument;
- random add_prompt / fork / release / generate_step / teacher_force sequences on a tiny fixed KV pool: refcounts
  always equal an independent count, a failed call leaves everything exactly as before, every branch keeps its
  tokens, and releasing everything empties the pool.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")  # without it this module is skipped: a collection error would stop every other test

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

import o1kernels as ok  # noqa: E402
from attention_reference import (LSE_TOLERANCES, TOLERANCES, backends_on, random_tree, random_values,  # noqa: E402
                                 report_mismatch, tree_attention_f64, tree_segments)
from o1kernels.decoder import KVPoolExhausted, ModelConfig, NaiveDecoder, Transformer, TreeDecoder  # noqa: E402
from test_kv_cache import assert_same_state, decoder_state, expected_refcounts  # noqa: E402

BACKENDS = backends_on("cpu")
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
# Examples per backend: Triton runs under its interpreter on the CPU (~0.1-0.5 s a call here), the others in
# milliseconds.
TREE_EXAMPLES = {"torch": 100, "cpu": 100, "triton": 30}


# ---------------------------------------------------------------- random trees vs float64

@pytest.mark.parametrize("backend", BACKENDS)
def test_random_trees_match_float64(backend):
    @settings(FUZZ, max_examples=TREE_EXAMPLES.get(backend, 10))
    @given(rng=st.randoms(use_true_random=False), depth=st.integers(1, 4), leaves=st.integers(1, 8),
           seg_len_max=st.integers(0, 40), page_size=st.sampled_from([1, 3, 4, 16]), hkv=st.sampled_from([1, 2]),
           group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 24, 32]),
           dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), unlisted=st.integers(0, 2),
           sm_scale=st.none() | st.floats(0.05, 2.0))
    def check(rng, depth, leaves, seg_len_max, page_size, hkv, group, head_dim, dtype, unlisted, sm_scale):
        nodes, leaf_nodes = random_tree(leaves, depth, seg_len_max, rng)
        segments, num_pages = tree_segments(nodes, leaf_nodes, page_size, rng.randint(0, 3), rng)
        num_queries = len(leaf_nodes) + unlisted  # rows listed by no segment: o = 0, lse = -inf
        plan = ok.TreeAttentionPlan(segments, num_queries, page_size)
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        q = (torch.randn(num_queries, hkv * group, head_dim, generator=gen) * 2).to(dtype)
        k = torch.randn(max(num_pages, 1), page_size, hkv, head_dim, generator=gen).to(dtype)
        v = (torch.rand(k.shape, generator=gen) * 2 - 1).to(dtype)
        o, lse = ok.tree_attention(q, k, v, plan, sm_scale=sm_scale, return_lse=True, backend=backend)
        scale = head_dim ** -0.5 if sm_scale is None else sm_scale
        o_ref, lse_ref = tree_attention_f64(q, k, v, segments, page_size, [s[1] for s in segments], scale)
        report_mismatch(f"o ({backend})", o, o_ref, *TOLERANCES[dtype])
        report_mismatch(f"lse ({backend})", lse, lse_ref, *LSE_TOLERANCES[dtype])

    check()


# ---------------------------------------------------------------- invalid arguments name the argument

def _valid_calls():
    """name -> (function, kwargs of a valid call). Small fp32 inputs on the CPU."""
    torch.manual_seed(0)
    n, h, d = 3, 2, 8
    tree_segs = [([0, 1], 6, [0, 1]), ([2], 2, [1])]
    plan = ok.TreeAttentionPlan(tree_segs, 2, 4)
    hidden = torch.randn(2, 5, d)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, -1] = True
    return {
        "merge_states": (ok.merge_states, dict(o_a=random_values((n, h, d), torch.float32), lse_a=torch.randn(n, h),
                                               o_b=random_values((n, h, d), torch.float32), lse_b=torch.randn(n, h))),
        "shared_prefix_attention": (ok.shared_prefix_attention, dict(
            q=torch.randn(3, 4, d), prefix_k=torch.randn(1, 6, 2, d), prefix_v=torch.randn(1, 6, 2, d),
            suffix_k=torch.randn(3, 2, 2, d), suffix_v=torch.randn(3, 2, 2, d),
            prefix_lens=torch.tensor([6], dtype=torch.int32), suffix_lens=torch.tensor([2, 1, 0], dtype=torch.int32),
            sm_scale=0.3)),
        "TreeAttentionPlan": (ok.TreeAttentionPlan, dict(segments=tree_segs, num_queries=2, page_size=4)),
        "tree_attention": (ok.tree_attention, dict(q=torch.randn(2, 4, d), k_cache=torch.randn(3, 4, 2, d),
                                                   v_cache=torch.randn(3, 4, 2, d), plan=plan, sm_scale=0.3)),
        "step_rewards": (ok.step_rewards, dict(hidden=hidden, step_mask=mask, weight=torch.randn(2, d),
                                               bias=torch.randn(2), norm_weight=torch.rand(d) + 0.5, norm_eps=1e-6,
                                               activation="softmax", positive_index=1, aggregate="min")),
    }


VALID_CALLS = _valid_calls()


def _bad_tensor(t: torch.Tensor):
    """Strategy: a value that cannot replace tensor t: not a tensor, another dtype, one dimension more or less,
    one dimension longer, or on the meta device."""
    if t.dtype.is_floating_point:
        wrong_dtypes = [torch.int64, torch.bool, torch.float64]
    elif t.dtype == torch.bool:
        wrong_dtypes = [torch.uint8, torch.int64, torch.float32]
    else:  # int32/int64 index tensors
        wrong_dtypes = [torch.float32, torch.bool, torch.uint8]

    def longer(dim):
        extra = t.narrow(dim, 0, 1) if t.shape[dim] else torch.zeros_like(t).narrow(dim, 0, 0)
        return torch.cat([t, extra], dim=dim)

    options = [st.sampled_from([t.tolist(), 1.5, "tensor"]),
               st.sampled_from(wrong_dtypes).map(t.to),
               st.just(t.unsqueeze(0)),
               st.just(t.to("meta"))]
    if t.dim() >= 1:
        options += [st.just(t[0]), st.integers(0, t.dim() - 1).map(longer)]
    return st.one_of(options)


BAD_SCALARS = {
    "sm_scale": st.sampled_from([0.0, -1.0, math.nan, math.inf, "0.1", True]),
    "norm_eps": st.sampled_from([-1e-6, math.nan, math.inf, "1e-6", None]),
    "activation": st.text(max_size=8).filter(lambda s: s not in ("softmax", "sigmoid")) | st.just(1),
    "aggregate": st.text(max_size=8).filter(lambda s: s not in ("min", "prod", "last", "mean", "max")),
    "positive_index": st.sampled_from([2, -1, 1.0, True, "1"]),
    "num_queries": st.sampled_from([-1, 1.5, "2", True, None]),
    "page_size": st.sampled_from([0, -4, 4.0, "4", True, None]),
    "segments": st.sampled_from([
        None, "segments", 7, [([0, 1], 6)], [([0, 1], 6, [0, 1], 9)], [([0, 1], -1, [0])], [([0, 1], 9, [0])],
        [([0, 1], 6.0, [0])], [([0, "1"], 6, [0])], [([0, 1], 6, [2])], [([0, 1], 6, [-1])], [([-1], 2, [0])],
        [([0, 1], 6, [0, 0])], [([0.5], 2, [0])], [([0], 2, [0.0])], [[0]]]),
    "plan": st.sampled_from([None, "plan", [([0], 2, [0])]]),
    "backend": st.text(max_size=8).filter(lambda s: s not in ok.BACKENDS),
}


def _names_it(name: str, message: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


def _invalid_argument_cases():
    for fn_name, (_, kwargs) in VALID_CALLS.items():
        args = [a for a, v in kwargs.items() if isinstance(v, torch.Tensor) or a in BAD_SCALARS]
        args += [] if fn_name == "TreeAttentionPlan" else ["backend"]
        for arg in args:
            yield pytest.param(fn_name, arg, id=f"{fn_name}-{arg}")


@pytest.mark.parametrize("fn_name,arg", list(_invalid_argument_cases()))
def test_invalid_argument_names_it(fn_name, arg):
    fn, kwargs = VALID_CALLS[fn_name]
    fn(**kwargs)  # the unmodified call is valid
    value = kwargs.get(arg)
    tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    @settings(FUZZ, max_examples=12)
    @given(bad=_bad_tensor(value) if isinstance(value, torch.Tensor) else BAD_SCALARS[arg])
    def check(bad):
        with pytest.raises((TypeError, ValueError)) as exc:
            fn(**{**kwargs, arg: bad})
        message = str(exc.value)
        # A size that no longer matches another tensor may be reported under that tensor's name.
        names = tensors if isinstance(value, torch.Tensor) else [arg]
        assert any(_names_it(name, message) for name in names), f"{fn_name}({arg}={bad!r:.60}): {message}"

    check()


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=24, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      reward_head={"activation": "sigmoid", "num_classes": 1, "hidden": 8, "positive_index": 0,
                                   "step_token_id": 7})
    return Transformer(cfg, init_std=0.3)


MODEL = _tiny_model()


DECODER_BAD_ARGUMENTS = {  # method -> (valid kwargs given the root branch 0, {argument: bad values})
    "add_prompt": (dict(prompt_ids=[1, 2, 3]), {"prompt_ids": [[], "123", [1, 24], [-1], [1.0], None, [True]]}),
    "fork": (dict(branch=0, n=2), {"branch": [99, -1, "0", None, 0.0], "n": [0, -2, 1.5, "2", None, True]}),
    "teacher_force": (dict(branch=0, tokens=[4, 5]), {"branch": [99, "0"], "tokens": [[], [24], "45", [4.0]]}),
    "generate_step": (dict(branches=[0], max_new_tokens=3), {
        "branches": [[99], [0, 0], 0, "0", [None]], "max_new_tokens": [0, -1, 2.5, "3", None, True],
        "temperature": [-1.0, math.nan, "1", None], "top_p": [0.0, 1.5, math.nan, "1"],
        "stop_ids": [[24], "7", 7, [-1]], "eos_id": [24, -1, "2"], "generator": ["seed", 0]}),
}


@pytest.mark.parametrize("kind", ["tree", "naive"])
@pytest.mark.parametrize("method", list(DECODER_BAD_ARGUMENTS))
def test_decoder_invalid_argument_names_it(kind, method):
    valid, bad_values = DECODER_BAD_ARGUMENTS[method]
    dec = TreeDecoder(MODEL, backend="torch", page_size=4) if kind == "tree" else NaiveDecoder(MODEL)
    dec.add_prompt([1, 2, 3])
    before = decoder_state(dec)

    @settings(FUZZ, max_examples=20)
    @given(data=st.data())
    def check(data):
        arg = data.draw(st.sampled_from(sorted(bad_values)))
        bad = data.draw(st.sampled_from(bad_values[arg]))
        with pytest.raises((TypeError, ValueError)) as exc:
            getattr(dec, method)(**{**valid, arg: bad})
        name = {"branch": "branch id", "branches": "branch"}.get(arg, arg)
        assert _names_it(name.split()[0], str(exc.value)), f"{method}({arg}={bad!r}): {exc.value}"
        assert_same_state(before, decoder_state(dec))

    check()


# ---------------------------------------------------------------- random decoder operations on a tiny pool



class DecoderOperations(RuleBasedStateMachine):
    """Random operations on a TreeDecoder with a 12-page pool of 4-token pages. The model of the state is each live
    branch's token list: a call either succeeds (the tokens extend as returned) or runs out of pages
    (KVPoolExhausted), leaving the decoder exactly as before."""

    def __init__(self):
        super().__init__()
        self.dec = TreeDecoder(MODEL, backend="torch", page_size=4, num_pages=12)
        self.tokens: dict[int, list[int]] = {}

    def _atomic(self, call):
        """call(); None when it ran out of pages, after checking that it changed nothing."""
        before = decoder_state(self.dec)
        try:
            return call()
        except KVPoolExhausted:
            assert_same_state(before, decoder_state(self.dec))
            return None

    def _branch(self, data):
        return data.draw(st.sampled_from(sorted(self.tokens)))

    @rule(prompt=st.lists(st.integers(0, 23), min_size=1, max_size=30))
    def add_prompt(self, prompt):
        branch = self._atomic(lambda: self.dec.add_prompt(prompt))
        if branch is not None:
            assert branch not in self.tokens
            self.tokens[branch] = list(prompt)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 4))
    def fork(self, data, n):
        parent = self._branch(data)
        children = self._atomic(lambda: self.dec.fork(parent, n))  # a copy of a partial last page per child
        for child in children or ():
            self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data):
        branch = self._branch(data)
        self.dec.release(branch)
        del self.tokens[branch]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), max_new_tokens=st.integers(1, 9), seed=st.integers(0, 3))
    def generate_step(self, data, max_new_tokens, seed):
        branches = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=6, unique=True))
        out = self._atomic(lambda: self.dec.generate_step(
            branches, max_new_tokens=max_new_tokens, stop_ids={7}, temperature=1.0,
            generator=torch.Generator().manual_seed(seed)))
        if out is not None:
            for b, toks, score in zip(branches, out.new_tokens, out.step_scores):
                assert 1 <= len(toks) <= max_new_tokens and (toks[-1] == 7 or len(toks) == max_new_tokens)
                assert 0 <= score <= 1
                self.tokens[b] += toks

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), chunk=st.lists(st.integers(0, 23), min_size=1, max_size=6))
    def teacher_force(self, data, chunk):
        branch = self._branch(data)
        logits = self._atomic(lambda: self.dec.teacher_force(branch, chunk))
        if logits is not None:
            assert logits.shape == (len(chunk), 24) and torch.isfinite(logits).all()
            self.tokens[branch] += chunk

    @invariant()
    def refcounts_and_tokens_match(self):
        np.testing.assert_array_equal(self.dec.pool.refcount, expected_refcounts(self.dec.tree))
        assert self.dec.pool.pages_in_use == int((self.dec.pool.refcount > 0).sum())
        assert sorted(self.dec.tree.branches) == sorted(self.tokens) == sorted(self.dec._last_hidden)
        for b, toks in self.tokens.items():
            assert self.dec.tokens(b) == toks

    def teardown(self):
        for b in list(self.tokens):
            self.dec.release(b)
        assert self.dec.pool.pages_in_use == 0 and self.dec.kv_bytes() == 0
        assert sorted(self.dec.pool._free) == list(range(12))


TestDecoderOperations = DecoderOperations.TestCase
TestDecoderOperations.settings = settings(FUZZ, max_examples=30, stateful_step_count=25)
