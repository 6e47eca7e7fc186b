"""TreeDecoder (shared paged KV, our kernels) == NaiveDecoder (dense KV per branch) == the plain full forward:
teacher-forced logits, step rewards, greedy and seeded sampled tokens across forks; plan reuse; bad arguments."""
from __future__ import annotations

import pytest
import torch

from o1kernels._backend import backend_unavailable_reason
from o1kernels.decoder import ModelConfig, NaiveDecoder, Transformer, TreeDecoder

# (dtype, atol, rtol) between two decoders / the full forward on the same weights. fp32: only summation orders
# differ (worst seen 5e-7 on |logits| <= 1.4 over 4 seeds). bf16: activations are rounded to 8 mantissa bits in
# different places (paged vs dense attention, merged chunk attention); worst seen 0.009 on |logits| <= 1.3.
TOL = {torch.float32: (5e-6, 5e-6), torch.bfloat16: (0.04, 0.02)}
VOCAB = 48
STOP = set(range(1, VOCAB, 7))  # with these weights greedy steps end both at stops and at the 6-token cap
EOS = 3


def make_model(dtype=torch.float32, head=True, **kw) -> Transformer:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, attention_bias=True, model_type="qwen2",
               reward_head={"activation": "softmax", "num_classes": 2, "hidden": 12} if head else None)
    cfg.update(kw)
    model = Transformer(ModelConfig(**cfg), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    return model.eval()


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = err.flatten().topk(min(5, err.numel())).indices
        worst = [(i.item(), actual.flatten()[i].item(), expected.flatten()[i].item()) for i in idx]
        pytest.fail(f"{what}: {bad.sum().item()}/{err.numel()} mismatch ({dtype}, atol={atol}, rtol={rtol}); "
                    f"worst (index, actual, expected): {worst}")


def full_forward(model, tokens):
    """Logits [T, V] and pre-norm hidden [T, H] of the plain causal forward over one sequence."""
    with torch.no_grad():
        logits, hidden = model(torch.tensor([tokens]), return_hidden=True)
    return logits[0], hidden[0]


def reference_reward(model, hidden_row):
    """Reward head in float64 from the weights (softmax head with hidden layer)."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    h = hidden_row.double()
    x = h / torch.sqrt((h * h).mean() + model.config.rms_norm_eps) * w["model.norm.weight"]
    x = torch.relu(w["reward_head.mlp.weight"] @ x + w["reward_head.mlp.bias"])
    return torch.softmax(w["reward_head.out.weight"] @ x + w["reward_head.out.bias"], 0)[1].item()


def teacher_force_tree(dec, prompt):
    """prompt -> 3 children with chunks of 5, 1, 9 tokens -> child 0 forks twice, chunks of 6 and 2.
    Returns {branch: (logits of its last chunk, chunk)}."""
    root = dec.add_prompt(prompt)
    kids = dec.fork(root, 3)
    out = {}
    for k, n in zip(kids, (5, 1, 9)):
        chunk = torch.randint(0, VOCAB, (n,)).tolist()
        out[k] = (dec.teacher_force(k, chunk), chunk)
    for g, n in zip(dec.fork(kids[0], 2), (6, 2)):
        chunk = torch.randint(0, VOCAB, (n,)).tolist()
        out[g] = (dec.teacher_force(g, chunk), chunk)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_forced_logits(dtype):
    model = make_model(dtype)
    prompt = torch.randint(0, VOCAB, (13,)).tolist()
    state = torch.get_rng_state()
    fast = teacher_force_tree(TreeDecoder(model, backend="torch", page_size=4), prompt)
    torch.set_rng_state(state)
    naive_dec = NaiveDecoder(model)
    naive = teacher_force_tree(naive_dec, prompt)
    assert fast.keys() == naive.keys()
    for b, (logits, chunk) in fast.items():
        assert logits.shape == (len(chunk), VOCAB) and logits.dtype == torch.float32
        assert chunk == naive[b][1]
        assert_close(logits, naive[b][0], dtype, f"branch {b} fast vs naive")
        full_logits, _ = full_forward(model, naive_dec.tokens(b))
        assert_close(logits, full_logits[-len(chunk):], dtype, f"branch {b} fast vs full forward")


def run_search(dec, prompt, *, temperature, top_p=1.0, seed=0, steps=3):
    """Beam-like: 4 children, `steps` steps, keep the 2 best-scored and fork each into 2 between steps; each child starts
    its step with a forced token of its own. Returns ([(beams, StepOutput, their token paths)] per step, final paths)."""
    gen = torch.Generator().manual_seed(seed) if temperature else None
    root = dec.add_prompt(prompt)
    beams = dec.fork(root, 4)
    dec.release(root)
    trace = []
    for _ in range(steps):
        for i, b in enumerate(beams):
            dec.teacher_force(b, [10 + i])  # a distinct forced token per child, so greedy children differ
        out = dec.generate_step(beams, max_new_tokens=6, stop_ids=STOP, eos_id=EOS, temperature=temperature,
                                top_p=top_p, generator=gen)
        trace.append((list(beams), out, [dec.tokens(b) for b in beams]))
        ranked = sorted(range(len(beams)), key=lambda i: -out.step_scores[i])
        keep = [beams[i] for i in ranked[:2]]
        for i in ranked[2:]:
            dec.release(beams[i])
        beams = [c for b in keep for c in dec.fork(b, 2)]
        for b in keep:
            dec.release(b)
    return trace, {b: dec.tokens(b) for b in beams}


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 0.8)])
def test_search_tokens_and_scores_match(temperature, top_p):
    model = make_model()
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    fast_trace, fast_tokens = run_search(TreeDecoder(model, backend="torch", page_size=4), prompt,
                                         temperature=temperature, top_p=top_p)
    naive_trace, naive_tokens = run_search(NaiveDecoder(model), prompt, temperature=temperature, top_p=top_p)
    assert fast_tokens == naive_tokens
    for (fb, fo, fp), (nb, no, np_) in zip(fast_trace, naive_trace):
        assert fb == nb and fo.new_tokens == no.new_tokens and fo.finished == no.finished and fp == np_
        assert_close(torch.tensor(fo.step_scores), torch.tensor(no.step_scores), torch.float32, "step scores")
    # independent checks against the full forward: each step ends at its first stop token or after 6 tokens, the
    # step reward is the head at the step's last token, and greedy tokens are the argmax of the previous position
    for _, out, paths in fast_trace:
        for toks, score, path, finished in zip(out.new_tokens, out.step_scores, paths, out.finished):
            assert 1 <= len(toks) <= 6 and (toks[-1] in STOP | {EOS} or len(toks) == 6)
            assert not set(toks[:-1]) & (STOP | {EOS}) and path[-len(toks):] == toks and finished == (toks[-1] == EOS)
            logits, hidden = full_forward(model, path)
            assert score == pytest.approx(reference_reward(model, hidden[-1]), abs=2e-5)
            if temperature == 0:
                generated = range(len(path) - len(toks), len(path))
                assert all(path[t] == logits[t - 1].argmax().item() for t in generated), "not greedy"


def test_plan_built_once_per_step_and_reused():
    model = make_model(head=False)
    dec = TreeDecoder(model, backend="torch", page_size=4)
    beams = dec.fork(dec.add_prompt([1, 2, 6, 7, 8]), 3)
    built = dec.stats["plans_built"]
    out = dec.generate_step(beams, max_new_tokens=9, stop_ids=set(), temperature=0.0)
    assert [len(t) for t in out.new_tokens] == [9, 9, 9] and out.step_scores == [None] * 3
    assert dec.stats["plans_built"] == built + 1  # 9 decode iterations, one plan (tails grown with set_lengths)
    assert dec.stats["tokens_generated"] == 27 and dec.stats["decode_iterations"] == 9


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_kernel_backends_match_naive(backend):
    """Triton (through the interpreter) and the compiled C++ backend, when built."""
    reason = backend_unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    model = make_model(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, num_hidden_layers=1)
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    state = torch.get_rng_state()
    fast = teacher_force_tree(TreeDecoder(model, backend=backend, page_size=4), prompt)
    torch.set_rng_state(state)
    naive = teacher_force_tree(NaiveDecoder(model), prompt)
    for b, (logits, _) in fast.items():
        assert_close(logits, naive[b][0], torch.float32, f"{backend} branch {b}")
    fast_trace, fast_tokens = run_search(TreeDecoder(model, backend=backend, page_size=4), prompt, temperature=0.0,
                                         steps=2)
    naive_trace, naive_tokens = run_search(NaiveDecoder(model), prompt, temperature=0.0, steps=2)
    assert fast_tokens == naive_tokens
    for (_, fo, _), (_, no, _) in zip(fast_trace, naive_trace):
        assert_close(torch.tensor(fo.step_scores), torch.tensor(no.step_scores), torch.float32, "step scores")


def test_bad_arguments():
    model = make_model(head=False)
    for dec in (TreeDecoder(model, backend="torch"), NaiveDecoder(model)):
        b = dec.add_prompt([1, 2])
        cases = [
            (lambda: dec.add_prompt([]), ValueError, "prompt_ids must not be empty"),
            (lambda: dec.add_prompt([1, VOCAB]), ValueError, r"prompt_ids\[1\] must be a token id in \[0, 48\)"),
            (lambda: dec.add_prompt("hello"), TypeError, "prompt_ids must be a list"),
            (lambda: dec.teacher_force(b, [-1]), ValueError, r"tokens\[0\] must be a token id"),
            (lambda: dec.generate_step([b], max_new_tokens=0), ValueError, "max_new_tokens must be a positive"),
            (lambda: dec.generate_step([b], max_new_tokens=2, temperature=-1.0), ValueError, "temperature"),
            (lambda: dec.generate_step([b], max_new_tokens=2, top_p=0.0), ValueError, "top_p"),
            (lambda: dec.generate_step([b, b], max_new_tokens=2), ValueError, "branches must be distinct"),
            (lambda: dec.generate_step([b], max_new_tokens=2, generator=3), TypeError, "generator"),
            (lambda: dec.generate_step([b], max_new_tokens=2, stop_ids=5), TypeError, "stop_ids must be a set"),
            (lambda: dec.generate_step([b], max_new_tokens=2, stop_ids={1}, eos_id=VOCAB), ValueError,
             r"stop_ids \(with eos_id\)\[1\] must be a token id"),
        ]
        for call, exc, match in cases:
            with pytest.raises(exc, match=match):
                call()
        assert dec.tokens(b) == [1, 2]  # nothing was appended by the rejected calls
    with pytest.raises(ValueError, match="backend must be one of"):
        TreeDecoder(model, backend="fast")
    with pytest.raises(TypeError, match="model must be an o1kernels.decoder.Transformer"):
        TreeDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="differs from the model's device"):
        NaiveDecoder(model, device="meta")
