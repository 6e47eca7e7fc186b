"""TreeDecoder's device decode loop (o1kernels/decoder/runner.py): eagerly on the CPU and, marked cuda, as CUDA-graph
replays. The same tokens, finished flags and step scores as NaiveDecoder's per-token host loop for any batch padding
and any number of tokens between host checks; host syncs per step counted; the plan updated in place across forks and
rebuilt only when a tree outgrows it; padding's scratch page kept out of kv_bytes; bad arguments."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_decoder_equivalence import EOS, STOP, VOCAB, assert_close, make_model, run_search

from o1kernels._backend import backend_unavailable_reason
from o1kernels.decoder import NaiveDecoder, TreeDecoder
from o1kernels.decoder import runner as runner_module
from o1kernels.decoder.runner import DEFAULT_BUCKETS, pad_rows


def assert_same_search(fast, naive):
    """Two run_search results: equal beams, tokens, finished flags and paths at every step; scores close (fp32)."""
    (fast_trace, fast_tokens), (naive_trace, naive_tokens) = fast, naive
    assert fast_tokens == naive_tokens
    for (fb, fo, fp), (nb, no, np_) in zip(fast_trace, naive_trace, strict=True):
        assert fb == nb and fo.new_tokens == no.new_tokens and fo.finished == no.finished and fp == np_
        assert_close(torch.tensor(fo.step_scores), torch.tensor(no.step_scores), torch.float32, "step scores")


@pytest.mark.parametrize("buckets,tokens_per_check,temperature,top_p", [
    (None, 1, 0.0, 1.0),  # the CPU default: no padding, a check after every token
    ((8,), 3, 0.9, 0.8),  # 4 branches padded to 8 rows, nucleus sampling
    ((2, 3, 16), 8, 1.0, 1.0),  # padded to 16, checks rarer than the 6-token steps: rows run on after stopping
])
def test_device_loop_matches_the_naive_host_loop(buckets, tokens_per_check, temperature, top_p):
    model = make_model()
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    dec = TreeDecoder(model, backend="torch", page_size=4, batch_buckets=buckets, tokens_per_check=tokens_per_check)
    fast = run_search(dec, prompt, temperature=temperature, top_p=top_p, steps=2)
    naive = run_search(NaiveDecoder(model), prompt, temperature=temperature, top_p=top_p, steps=2)
    assert_same_search(fast, naive)
    assert dec.stats["graph_captures"] == 0 and dec.stats["steps"] == 2


def test_graph_mode_control_flow_with_a_stand_in_graph(monkeypatch):
    """The graph path on the CPU: capture_graph replaced by a stand-in that runs the iteration twice (the warm-up and
    the capture run: a real capture runs nothing, so this is the stricter case) and replays by running it again.
    Every row is done and writes to the scratch page during those runs, so they change nothing anyone reads: tokens
    and scores equal the naive decoder's. A graph is captured once per (bucket, mode), kept across steps whose trees
    differ, and captured again after the pool grew (new tensors)."""
    def stand_in(fn, device, pool):
        fn()
        fn()
        return SimpleNamespace(replay=fn)

    monkeypatch.setattr(runner_module, "capture_graph", stand_in)
    model = make_model()
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    dec = TreeDecoder(model, backend="torch", page_size=4, batch_buckets=(4, 8), tokens_per_check=2)
    dec.runner.cuda_graphs = True
    naive = NaiveDecoder(model)
    plans = set()
    for temperature, top_p in ((0.0, 1.0), (0.9, 0.8)):
        assert_same_search(run_search(dec, prompt, temperature=temperature, top_p=top_p, steps=2),
                           run_search(naive, prompt, temperature=temperature, top_p=top_p, steps=2))
        plans.add(id(dec.runner._buckets[4].attn.plan_obj))
    assert len(plans) == 1 and list(dec.runner._buckets) == [4] and dec.stats["decode_plans"] == 1
    assert dec.stats["graph_captures"] == 2  # bucket 4: greedy and top_p, over 4 steps with different trees
    dec.pool.release(dec.pool.alloc(dec.pool.free_pages + 1))  # the pool grows: new K/V tensors
    assert_same_search(run_search(dec, prompt, temperature=0.9, top_p=0.8, steps=1),
                       run_search(naive, prompt, temperature=0.9, top_p=0.8, steps=1))
    assert dec.stats["graph_captures"] == 3


def expected_syncs(longest: int, max_new_tokens: int, every: int) -> int:
    """Host reads of one step whose longest branch emitted `longest` tokens: a flag after every `every` tokens
    (short of max_new_tokens) until one finds all rows done, then the final read."""
    checks = 0
    for done_tokens in range(every, max_new_tokens, every):
        checks += 1
        if done_tokens >= longest:
            break
    return checks + 1


@pytest.mark.parametrize("every", [1, 4])
def test_host_syncs_per_step(every, monkeypatch):
    """Counted two ways: the decoder's own count of its reads, and every read of a tensor's value by any code
    (Tensor.tolist/item/__bool__/... patched): per step, one per `every` tokens + one, against one per token before."""
    model = make_model(num_hidden_layers=1)
    reads = [0]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads[0] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for dec in (TreeDecoder(model, backend="torch", page_size=4, tokens_per_check=every), NaiveDecoder(model)):
        kids = dec.fork(dec.add_prompt([1, 2, 3, 4, 5]), 4)
        for stop, max_new in ((STOP, 10), (set(), 7)):
            before, reads[0] = dec.stats["host_syncs"], 0
            out = dec.generate_step(kids, max_new_tokens=max_new, stop_ids=stop, eos_id=EOS if stop else None,
                                    temperature=1.0, generator=torch.Generator().manual_seed(5))
            syncs = dec.stats["host_syncs"] - before
            longest = max(len(t) for t in out.new_tokens)
            if isinstance(dec, TreeDecoder):
                assert syncs == expected_syncs(longest, max_new, every) if stop else syncs == 1
            else:
                assert syncs == longest + 1  # a read per token, one for the step scores
            assert reads[0] == syncs, f"{type(dec).__name__}: {reads[0]} tensor reads, {syncs} counted host syncs"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_plan_updated_in_place_until_the_tree_outgrows_it(backend):
    """Beam-like steps on 4 branches in a bucket of 4 rows, two lineages kept: each step's tree (deeper each time)
    is laid out into the same plan tensors until it no longer fits, then into a new plan twice the size; tokens
    match the naive decoder. (The torch reference reads no layout: only its segment count can overflow.)"""
    if backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(backend_unavailable_reason(backend, torch.device("cpu")))
    model = make_model(head=False, num_hidden_layers=1)
    dec = TreeDecoder(model, backend=backend, page_size=4, batch_buckets=(4,))
    naive = NaiveDecoder(model)
    beams = {d: d.fork(d.add_prompt([1, 2, 3]), 4) for d in (dec, naive)}
    plans, buffers = [], []
    for _ in range(9):
        outs = {}
        for d, bs in beams.items():
            outs[d] = d.generate_step(bs, max_new_tokens=2, stop_ids=set(), temperature=0.0)
            keep = [bs[0], bs[2]]
            for b in (bs[1], bs[3]):
                d.release(b)
            beams[d] = [c for b in keep for c in d.fork(b, 2)]
            for b in keep:
                d.release(b)
        assert outs[dec].new_tokens == outs[naive].new_tokens
        plan = dec.runner._buckets[4].attn.plan_obj
        plans.append(plan)
        buffers.append(plan.seg_lens.data_ptr())
    rebuilt = [i for i in range(1, len(plans)) if plans[i] is not plans[i - 1]]
    assert dec.stats["decode_plans"] == 1 + len(rebuilt) and len(rebuilt) == 1
    assert all(buffers[i] == buffers[i - 1] for i in range(1, len(plans)) if i not in rebuilt)
    assert all(len(plans[i]._layouts) <= 1 for i in range(len(plans)))  # only the backend's own layout is built


def test_padding_scratch_page_is_not_kv():
    model = make_model(head=False)
    dec = TreeDecoder(model, backend="torch", page_size=4, batch_buckets=(8,))
    root = dec.add_prompt([1, 2, 3, 4, 5])
    kids = dec.fork(root, 3)
    dec.generate_step(kids, max_new_tokens=4, stop_ids=set())
    # scratch; the prompt's full page (shared) and the root's partial one; per child its copy of that partial page
    # and one more for its 4 new tokens (positions 5-8)
    assert dec.pool.pages_in_use == 1 + 2 + 3 * 2
    assert dec.kv_bytes() == (2 + 3 * 2) * dec.pool.bytes_per_page
    for b in [root, *kids]:
        dec.release(b)
    assert dec.kv_bytes() == 0 and dec.pool.pages_in_use == 1


def test_warm_up_leaves_nothing_behind_and_prepares_the_bucket():
    """warm_up releases everything, leaves the decode statistics as they were, and lays out the bucket's plan with
    the step's reservation: the first real step of that size updates it in place (no new plan)."""
    model = make_model()
    dec = TreeDecoder(model, backend="torch", page_size=4, batch_buckets=(2, 4))
    prompt = [1, 2, 3, 4, 5, 6, 7]
    before = dict(dec.stats)
    seconds = dec.warm_up(prompt, [3], max_new_tokens=6, temperature=0.9, top_p=0.8)
    assert seconds > 0 and dec.kv_bytes() == 0 and not dec.tree.branches and not dec._last_hidden
    plans = ("plans_built", "decode_plans")
    assert {k: v for k, v in dec.stats.items() if k not in plans} == {k: v for k, v in before.items() if k not in plans}
    assert dec.stats["decode_plans"] == 1
    kids = dec.fork(dec.add_prompt(prompt), 3)
    dec.generate_step(kids, max_new_tokens=6, stop_ids=STOP, temperature=0.9, top_p=0.8)
    assert dec.stats["decode_plans"] == 1 and dec.stats["steps"] == 1


def test_compiled_layers_match_eager(monkeypatch):
    """compile_layers=True (torch.compile of each layer's halves and the logits) traces each into one graph for
    both layers and both batch sizes and gives the naive decoder's tokens. Traced with the "eager" backend here:
    Inductor's kernels are the GPU run's to check (test_cuda_compiled_layers_match_eager)."""
    monkeypatch.setattr(runner_module, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(runner_module, "compile_rows_dynamic", runner_module.compile_rows_dynamic.__wrapped__)
    model = make_model(num_hidden_layers=2, num_attention_heads=8)  # 8 heads: no batch size equals a head count
    prompt = torch.randint(0, VOCAB, (11,)).tolist()                  # (dynamic shapes' duck sizing would specialize)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # other tests' compilations counted before
    compiled = TreeDecoder(model, backend="torch", page_size=4, compile_layers=True)
    assert_same_search(run_search(compiled, prompt, temperature=0.9, top_p=0.8, steps=2),
                       run_search(NaiveDecoder(model), prompt, temperature=0.9, top_p=0.8, steps=2))
    compiled.generate_step(compiled.fork(compiled.add_prompt(prompt), 3), max_new_tokens=2)  # another batch size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3  # layer_input, layer_output, logits


def test_pad_rows():
    assert [pad_rows(n, DEFAULT_BUCKETS) for n in (1, 3, 17, 512, 513, 1100)] == [1, 4, 24, 512, 1024, 1536]
    assert pad_rows(7, None) == 7 and pad_rows(5, (2, 4)) == 8


def test_bad_runner_arguments():
    model = make_model(head=False)
    cases = [
        (dict(cuda_graphs=True), ValueError, "cuda_graphs=True needs a CUDA model"),
        (dict(cuda_graphs="yes"), TypeError, "cuda_graphs must be a bool or None"),
        (dict(tokens_per_check=0), ValueError, "tokens_per_check must be a positive integer"),
        (dict(batch_buckets=(4, 2)), ValueError, "batch_buckets must be increasing positive integers"),
        (dict(batch_buckets=(0,)), ValueError, "batch_buckets must be increasing positive integers"),
        (dict(batch_buckets=4), TypeError, "batch_buckets must be a sequence"),
        (dict(compile_layers=1), TypeError, "compile_layers must be a bool"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            TreeDecoder(model, backend="torch", **kwargs)


# ---- GPU: CUDA-graph replays ----------------------------------------------------------------------------------

def _cuda_model(dtype=torch.float32):
    return make_model(dtype).cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 0.8)])
def test_cuda_graph_decoder_matches_eager_and_naive(temperature, top_p):
    """fp32 on the GPU: graph replays (default buckets: 4 rows), the same loop eagerly, and the naive decoder give
    the same tokens and finished flags and close scores over forks and releases; graphs are captured once per mode
    (the tree changes every step: plan.update in place) and rebuilt only with a new plan."""
    model = _cuda_model()
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    graph = TreeDecoder(model, backend="triton", page_size=4, num_pages=256)  # a fixed pool: no recapture on growth
    assert graph.runner.cuda_graphs
    eager = TreeDecoder(model, backend="triton", page_size=4, cuda_graphs=False)
    runs = [run_search(d, prompt, temperature=temperature, top_p=top_p, steps=4)
            for d in (graph, eager, NaiveDecoder(model))]
    assert_same_search(runs[0], runs[1])
    assert_same_search(runs[0], runs[2])
    assert graph.stats["graph_captures"] == graph.stats["decode_plans"]  # one mode, one bucket: a capture per plan
    assert eager.stats["graph_captures"] == 0


@pytest.mark.cuda
def test_cuda_compiled_layers_match_eager():
    """fp32 on the GPU: graph replays of Inductor-compiled layers give the naive decoder's tokens, close scores."""
    model = _cuda_model()
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    compiled = TreeDecoder(model, backend="triton", page_size=4, num_pages=256, compile_layers=True)
    assert_same_search(run_search(compiled, prompt, temperature=0.9, top_p=0.8, steps=3),
                       run_search(NaiveDecoder(model), prompt, temperature=0.9, top_p=0.8, steps=3))


@pytest.mark.cuda
def test_cuda_graph_step_has_no_sync_but_its_reads():
    """After a warm-up step (Triton compilation, capture), a step with stop tokens runs with CUDA's sync debug mode
    set to error: nothing synchronises but the counted event waits (one per 4 tokens + the final read)."""
    model = _cuda_model()
    dec = TreeDecoder(model, backend="triton", page_size=4, num_pages=64, tokens_per_check=4)
    kids = dec.fork(dec.add_prompt([1, 2, 3, 4, 5]), 4)
    gen = torch.Generator().manual_seed(1)
    dec.generate_step(kids, max_new_tokens=10, stop_ids=STOP, temperature=1.0, generator=gen)
    captures, syncs = dec.stats["graph_captures"], dec.stats["host_syncs"]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = dec.generate_step(kids, max_new_tokens=10, stop_ids=STOP, temperature=1.0, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    longest = max(len(t) for t in out.new_tokens)
    assert dec.stats["graph_captures"] == captures
    assert dec.stats["host_syncs"] - syncs == expected_syncs(longest, 10, 4)


@pytest.mark.cuda
def test_cuda_graphs_recaptured_after_the_pool_grows():
    """A growable pool that grows between steps gets new tensors: the bucket's graph is captured again and the
    tokens still match the naive decoder."""
    model = _cuda_model()
    dec = TreeDecoder(model, backend="triton", page_size=4)
    naive = NaiveDecoder(model)
    outs = []
    for d in (dec, naive):
        kids = d.fork(d.add_prompt(list(range(1, 40))), 2)
        steps = [d.generate_step(kids, max_new_tokens=64, stop_ids=set()) for _ in range(4)]  # 64 initial pages
        outs.append([s.new_tokens for s in steps])
    assert outs[0] == outs[1]
    assert dec.pool.num_pages > 64 and dec.stats["graph_captures"] >= 2
