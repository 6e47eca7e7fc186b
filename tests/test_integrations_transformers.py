"""Hugging Face transformers integration: TreeCache + the "o1kernels" attention inside model.generate give stock
generate's tokens and logits (sampling, greedy, beam search; Llama GQA and Qwen2 MQA; N branches; padded batches),
hold each prompt's KV once, leak no pages through fork / release / reorder; score_steps equals the stock PRM
computation for the three PRM styles; bad input gives clear errors."""
from __future__ import annotations

import copy
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from o1kernels.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION, TokenPairHead, TreeCache, cache_argument, generate_branches, score_steps)
from test_kv_cache import expected_refcounts  # noqa: E402

VOCAB = 101


# a stock generate here took 0.04 s on one thread and 4 s on two on the loaded 2-core test machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(arch: str, **overrides):
    """A random 2-layer model: Llama with GQA (4 query heads, 2 kv heads) or Qwen2 with MQA (1 kv head, q/k/v bias)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2)  # peaked attention and logits: transformers' default 0.02 makes both flat
    if arch == "llama":
        config = transformers.LlamaConfig(**{**common, "num_key_value_heads": 2, **overrides})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**{**common, "num_key_value_heads": 1, **overrides})
        model = transformers.Qwen2ForCausalLM(config)
    return model.eval()


def stock_and_ours(arch: str, **overrides):
    """(the model with transformers' SDPA attention, an identical copy set to o1kernels' attention)."""
    stock = tiny_model(arch, **overrides)
    stock.set_attn_implementation("sdpa")
    ours = copy.deepcopy(stock)
    ours.set_attn_implementation(ATTN_IMPLEMENTATION)
    return stock, ours


def prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths: (input_ids [B, max], attention_mask [B, max])."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,))
        mask[i, width - n:] = 1
    return ids, mask


def float64_logits(stock, sequences: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits [steps, rows, V] of each generate step, recomputed in float64 by a full forward over the final
    sequences (rows repeat their prompt's mask; positions follow the mask, as generate sets them)."""
    rows, width = sequences.shape
    prompt_mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)
    full = torch.cat([prompt_mask, prompt_mask.new_ones(rows, width - mask.shape[1])], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    model64 = copy.deepcopy(stock).double()
    with torch.no_grad():
        logits = model64(sequences, attention_mask=full, position_ids=positions).logits
    first = mask.shape[1] - 1
    return logits[:, first:first + steps].transpose(0, 1)


def check_generate(stock, ours, ids, mask, seed: int, cache: TreeCache, **kwargs):
    """Stock generate and generate_branches with the same seed: identical tokens, and (without beam search, whose
    logits belong to beams, not to the returned rows) our logits no further from a float64 recomputation than twice
    the distance of stock's (both fp32: only the summation order differs)."""
    kwargs = dict(output_logits=True, return_dict_in_generate=True, **kwargs)
    torch.manual_seed(seed)
    stock_out = stock.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(seed)
    our_out = generate_branches(ours, ids, mask, cache=cache, **kwargs)
    assert torch.equal(stock_out.sequences, our_out.sequences), (stock_out.sequences, our_out.sequences)
    if kwargs.get("num_beams", 1) > 1:
        return stock_out, our_out
    reference = float64_logits(stock, stock_out.sequences, mask, len(stock_out.logits))
    stock_err = max((a.double() - r).abs().max() for a, r in zip(stock_out.logits, reference))
    ours_err = max((b.double() - r).abs().max() for b, r in zip(our_out.logits, reference))
    assert ours_err <= 2 * stock_err, (float(ours_err), float(stock_err))
    return stock_out, our_out


def assert_no_leak(cache: TreeCache) -> None:
    np.testing.assert_array_equal(cache.pool.refcount, expected_refcounts(cache.tree))
    cache.reset()
    assert cache.pool.pages_in_use == 0 and not cache.pool.refcount.any()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("prompt_len", [1, 16, 37])
def test_sampling_matches_stock_generate(arch, n, prompt_len):
    stock, ours = stock_and_ours(arch)
    ids, mask = prompts([prompt_len])
    cache = TreeCache(ours, backend="torch", page_size=8)
    check_generate(stock, ours, ids, mask, seed=n + prompt_len, cache=cache, do_sample=True, num_return_sequences=n,
                   max_new_tokens=9)
    assert cache.rows and len(cache.rows) == n
    assert_no_leak(cache)


@pytest.mark.parametrize("arch,lengths", [("llama", [23, 9]), ("qwen2", [23, 9]), ("llama", [6, 1])])
def test_batch_of_two_padded_prompts(arch, lengths):
    """Two prompts of different lengths, left-padded: greedy (one row each) and sampling (4 rows each)."""
    stock, ours = stock_and_ours(arch)
    ids, mask = prompts(lengths)
    cache = TreeCache(ours, backend="cpu" if "cpu" in _usable_backends() else "torch", page_size=8)
    check_generate(stock, ours, ids, mask, seed=0, cache=cache, do_sample=False, max_new_tokens=8)
    assert [cache.branch_length(b) for b in cache.rows] == [n + 7 for n in lengths]  # padding not stored
    assert cache.get_seq_length() == max(lengths) + 7  # transformers' view counts it
    cache.reset()
    check_generate(stock, ours, ids, mask, seed=1, cache=cache, do_sample=True, num_return_sequences=4,
                   max_new_tokens=8)
    assert_no_leak(cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_beam_search_reorders_without_leaks(arch):
    """transformers' beam search moves rows every step through reorder_cache (forks + releases)."""
    stock, ours = stock_and_ours(arch)
    ids, mask = prompts([13, 20])
    cache = TreeCache(ours, backend="torch", page_size=4)
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=10, output_scores=True)
    stock_out, our_out = check_generate(stock, ours, ids, mask, seed=0, cache=cache, **kwargs)
    # normalised sums of 10 fp32 log-probabilities: 1e-5 is ~100x the difference seen (4.8e-7)
    torch.testing.assert_close(our_out.sequences_scores, stock_out.sequences_scores, atol=1e-5, rtol=1e-5)
    assert len(cache.rows) == 2 * 4
    assert_no_leak(cache)


def test_triton_backend_matches_stock():
    stock, ours = stock_and_ours("llama")
    ids, mask = prompts([21])
    cache = TreeCache(ours, backend="triton", page_size=8)
    check_generate(stock, ours, ids, mask, seed=3, cache=cache, do_sample=True, num_return_sequences=4,
                   max_new_tokens=6)


def test_prompt_held_once():
    """N rows of one prompt: the prompt's full pages (all but its last token) once + per row a copy of its partial last
    page, its last prompt token and the generated tokens but the last, in whole pages: within one page per row of
    the ideal; transformers' DynamicCache holds N full copies."""
    stock, ours = stock_and_ours("llama")
    p, n, new, page = 45, 16, 12, 8
    ids, mask = prompts([p])
    cache = TreeCache(ours, backend="torch", page_size=page)
    torch.manual_seed(0)
    stock_out = stock.generate(ids, do_sample=True, num_return_sequences=n, max_new_tokens=new,
                               return_dict_in_generate=True)
    torch.manual_seed(0)
    out = generate_branches(ours, ids, cache=cache, do_sample=True, num_return_sequences=n, max_new_tokens=new)
    assert torch.equal(out, stock_out.sequences)
    per_row = 1 + (new - 1)
    shared, partial = divmod(p - 1, page)
    pages = shared + n * -(-(partial + per_row) // page)
    assert cache.pool.pages_in_use == pages
    assert cache.kv_bytes() == pages * page * cache.pool.bytes_per_token
    ideal = (p - 1 + n * per_row) * cache.pool.bytes_per_token
    assert ideal <= cache.kv_bytes() <= ideal + n * page * cache.pool.bytes_per_token
    assert all(cache.branch_length(b) == p + new - 1 for b in cache.rows)
    stock_cache = stock_out.past_key_values
    stock_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in stock_cache.layers)
    assert stock_bytes == cache.kv_bytes_dense() == n * (p + new - 1) * cache.pool.bytes_per_token


def test_explicit_forks_releases_and_reorders_stay_exact():
    """Random fork / release / reorder / select between decode forwards: every row's logits equal a full stock
    forward over that row's tokens, and page refcounts equal an independent count."""
    stock, ours = stock_and_ours("qwen2")
    rng = random.Random(0)
    cache = TreeCache(ours, backend="torch", page_size=4)
    ids = torch.randint(3, VOCAB, (2, 11))
    roots = cache.prefill(ours, ids)
    seqs = {b: ids[i].tolist() for i, b in enumerate(roots)}
    spare = cache.fork(roots[0], 1)[0]  # a branch that is not a row
    seqs[spare] = list(seqs[roots[0]])
    for step in range(12):
        op = step % 4
        rows = cache.rows
        if op == 0:
            cache.batch_repeat_interleave(2)
            seqs.update({b: list(seqs[rows[i // 2]]) for i, b in enumerate(cache.rows)})
        elif op == 1:
            beam_idx = torch.tensor([rng.randrange(len(rows)) for _ in rows])
            cache.reorder_cache(beam_idx)
            seqs.update({b: list(seqs[rows[j]]) for b, j in zip(cache.rows, beam_idx.tolist())})
        elif op == 2 and len(rows) > 2:
            keep = sorted(rng.sample(range(len(rows)), 2))
            cache.batch_select_indices(keep)
            assert cache.rows == [rows[i] for i in keep]
        np.testing.assert_array_equal(cache.pool.refcount, expected_refcounts(cache.tree))
        tokens = torch.randint(3, VOCAB, (len(cache.rows), 1 + (step == 5)))  # one two-token chunk on the way
        with torch.no_grad():
            logits = ours(tokens, use_cache=True, **{cache_argument(ours): cache}).logits
            for i, b in enumerate(cache.rows):
                seqs[b] = seqs[b] + tokens[i].tolist()
                expected = stock(torch.tensor([seqs[b]])).logits[0, -tokens.shape[1]:]
                torch.testing.assert_close(logits[i], expected, atol=1e-5, rtol=1e-5)
    assert cache.branch_length(spare) == 11
    cache.set_rows(cache.rows[:1])
    assert_no_leak(cache)


def test_model_without_tree_cache_is_stock_sdpa():
    """A model set to "o1kernels" still runs forwards without a TreeCache (no cache, DynamicCache) as SDPA."""
    stock, ours = stock_and_ours("llama")
    ids, mask = prompts([17, 6])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   stock(ids, attention_mask=mask).logits[mask.bool()], atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    a = stock.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.manual_seed(0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), a)


def _usable_backends():
    from o1kernels import available_backends

    return [b for b, why in available_backends("cpu").items() if why is None]


def test_errors():
    stock, ours = stock_and_ours("llama")
    with pytest.raises(ValueError, match="attn_implementation 'sdpa'.*needs 'o1kernels'"):
        TreeCache(stock)
    with pytest.raises(TypeError, match="model must be a transformers model"):
        TreeCache(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        TreeCache(ours, backend="cuda")

    cache = TreeCache(ours, backend="torch")
    roots = cache.prefill(ours, torch.randint(3, VOCAB, (1, 5)))
    with pytest.raises(ValueError, match="unknown branch id 7"):
        cache.fork(7, 2)
    with pytest.raises(ValueError, match="unknown branch id 7"):
        cache.set_rows([7])
    with pytest.raises(ValueError, match="must be distinct"):
        cache.set_rows([roots[0], roots[0]])
    with pytest.raises(ValueError, match="is row 0 of the batch"):
        cache.release(roots[0])
    with pytest.raises(ValueError, match="forward has 3 batch rows but the TreeCache has 1 rows.*batch_repeat"):
        ours(torch.randint(3, VOCAB, (3, 1)), **{cache_argument(ours): cache})
    with pytest.raises(ValueError, match=r"beam_idx must have one entry per row \(1\)"):
        cache.reorder_cache(torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"row indices must be integers in \[0, 1\), got 4"):
        cache.batch_select_indices([4])
    with pytest.raises(NotImplementedError, match="cannot crop"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="cache must be empty"):
        generate_branches(ours, torch.randint(3, VOCAB, (1, 5)), cache=cache)

    with pytest.raises(TypeError, match="dtype must be one of .*got torch.float64"):
        TreeCache(ours, dtype=torch.float64)
    for bad in (TreeCache(ours, dtype=torch.float16), TreeCache(ours, device="meta")):
        with pytest.raises(TypeError, match="key_states are torch.float32 on cpu but the TreeCache pool is"):
            ours(torch.randint(3, VOCAB, (1, 4)), **{cache_argument(ours): bad})

    ids, mask = prompts([9, 4])
    with pytest.raises(ValueError, match="new tokens include padding"):  # padded prompts without prefill
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, **{cache_argument(ours): TreeCache(ours)})
    right = mask.flip(1)
    with pytest.raises(ValueError, match="attention_mask row 1 is not left padding"):
        TreeCache(ours).prefill(ours, ids, right)
    with pytest.raises(ValueError, match="needs 'o1kernels'"):  # generate_branches builds its cache from the model
        generate_branches(stock, ids, mask, max_new_tokens=2)


# ---- PRM scoring ---------------------------------------------------------------------------------------------
STEP_ID = 7


def step_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded sequences with step tokens scattered in them (never at padding)."""
    ids, mask = prompts(lengths)
    steps = (torch.rand(ids.shape) < 0.2) & mask.bool()
    ids[steps] = STEP_ID
    ids[:, -1] = STEP_ID
    return ids, mask


def stock_prm(style: str, model, head, ids, mask) -> torch.Tensor:
    """Per-token rewards [B, L] computed the stock way: full logits / full head over transformers' normed states."""
    with torch.no_grad():
        if style == "token_pair":
            logits = model(ids, attention_mask=mask).logits
            return torch.softmax(logits[..., [head.positive_id, head.negative_id]], dim=-1)[..., 0]
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        out = head(hidden)
        return torch.sigmoid(out[..., 0]) if out.shape[-1] == 1 else torch.softmax(out, dim=-1)[..., 1]


@pytest.mark.parametrize("style,arch,backend", [
    ("token_pair", "llama", "torch"),      # Math-Shepherd: "+"/"-" rows of the LM head
    ("mlp_classifier", "qwen2", "torch"),  # Qwen2.5-Math-PRM: Linear(H,H) -> ReLU -> Linear(H,2)
    ("value", "llama", "auto"),            # value head + sigmoid
    ("mlp_classifier", "qwen2", "triton"),
])
def test_score_steps_matches_stock_prm(style, arch, backend):
    model = tiny_model(arch)
    model.set_attn_implementation("sdpa")
    h = model.config.hidden_size
    head = {"token_pair": TokenPairHead(positive_id=11, negative_id=12),
            "mlp_classifier": torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2)),
            "value": torch.nn.Linear(h, 1)}[style]
    ids, mask = step_batch([29, 18, 5])
    steps, chain = score_steps(model, ids, STEP_ID, head, attention_mask=mask, aggregate="min", backend=backend)
    expected = stock_prm(style, model, head, ids, mask)
    at_steps = (ids == STEP_ID) & mask.bool()
    assert torch.isnan(steps[~at_steps]).all()
    torch.testing.assert_close(steps[at_steps], expected[at_steps], atol=1e-5, rtol=1e-5)
    for b in range(ids.shape[0]):
        torch.testing.assert_close(chain[b], expected[b][at_steps[b]].min(), atol=1e-5, rtol=1e-5)


def test_score_steps_reads_pre_norm_states():
    """The final norm is applied exactly once: scaling its weight changes the scores as the stock computation does."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    ids, mask = step_batch([12])
    steps, _ = score_steps(model, ids, [STEP_ID, 9], head, backend="torch")
    expected = stock_prm("value", model, head, ids, mask)
    at = torch.isin(ids, torch.tensor([STEP_ID, 9]))
    torch.testing.assert_close(steps[at], expected[at], atol=1e-5, rtol=1e-5)


def test_score_steps_errors():
    model = tiny_model("llama")
    ids, mask = step_batch([6])
    with pytest.raises(TypeError, match="head must be a TokenPairHead, an nn.Linear"):
        score_steps(model, ids, STEP_ID, torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"Sequential head must be \(Linear, ReLU, Linear\)"):
        score_steps(model, ids, STEP_ID, torch.nn.Sequential(torch.nn.Linear(64, 2)))
    with pytest.raises(ValueError, match=r"step_token_id must be a token id \(or ids\) in \[0, 101\), got 500"):
        score_steps(model, ids, 500, torch.nn.Linear(64, 1))
    with pytest.raises(ValueError, match=r"TokenPairHead ids must be token ids in \[0, 101\)"):
        score_steps(model, ids, STEP_ID, TokenPairHead(3, 101))
    with pytest.raises(ValueError, match="TokenPairHead needs a model with an LM head"):
        score_steps(model.model, ids, STEP_ID, TokenPairHead(3, 4))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        score_steps(model, ids, STEP_ID, torch.nn.Linear(64, 1), attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="input_ids must be on meta"):
        score_steps(model.to("meta"), ids, STEP_ID, torch.nn.Linear(64, 1))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="backbone GPT2Model has no final RMSNorm `norm`"):
        score_steps(gpt2, ids, STEP_ID, TokenPairHead(3, 4))
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="final norm CohereLayerNorm does not compute weight \\* x / rms"):
        score_steps(cohere, ids, STEP_ID, torch.nn.Linear(64, 1))  # a LayerNorm: mean-centred
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        head_dim=16, final_logit_softcapping=30.0))
    with torch.no_grad():
        gemma2.model.norm.weight.fill_(0.5)  # Gemma's norm scales by (1 + weight)
    with pytest.raises(ValueError, match="final norm Gemma2RMSNorm does not compute"):
        score_steps(gemma2, ids, STEP_ID, TokenPairHead(3, 4))
    capped = tiny_model("llama", final_logit_softcapping=30.0)  # the field is read, whichever model sets it
    with pytest.raises(ValueError, match="soft-caps its logits"):
        score_steps(capped, ids, STEP_ID, TokenPairHead(3, 4))


# ---- README ---------------------------------------------------------------------------------------------------
def test_readme_use_it_in_your_decoder_examples_run():
    """The README section's Python blocks, run as one fresh script from the repository root, print what the README
    says: the paged wrapper's output shape and the rows reading each segment found from the block table, the
    generate example's shape and exact KV bytes, four step rewards, the CLI report."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Use it in your decoder"):readme.index("## Benchmarks")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:4] == ["torch.Size([8, 8, 64]) [2, 1, 1, 1, 1]", "torch.Size([16, 1088])", "4685824 4194304",
                         "35618816"], proc.stdout
    assert 4685824 - 4194304 <= 16 * 16 * 2048  # within one page (16 tokens of 2048 B) per branch of the ideal
    assert lines[4].startswith("tensor([") and "KV cache: peak" in proc.stdout and "\ufffd" not in proc.stdout


# ---- GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_generate_matches_stock():
    """Triton backend on a GPU, fp32: stock tokens and logits (greedy on a padded batch, sampling N=16), and
    score_steps == the stock PRM computation."""
    stock, ours = (m.to("cuda") for m in stock_and_ours("llama"))
    ids, mask = (t.cuda() for t in prompts([300, 41]))
    cache = TreeCache(ours, backend="triton")
    check_generate(stock, ours, ids, mask, seed=0, cache=cache, do_sample=False, max_new_tokens=16)
    cache.reset()
    check_generate(stock, ours, ids, mask, seed=1, cache=cache, do_sample=True, num_return_sequences=16,
                   max_new_tokens=16)
    assert_no_leak(cache)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).cuda()
    ids, mask = (t.cuda() for t in step_batch([300, 41]))
    steps, _ = score_steps(stock, ids, STEP_ID, head, attention_mask=mask, backend="triton")
    at = (ids == STEP_ID) & mask.bool()
    torch.testing.assert_close(steps[at], stock_prm("mlp_classifier", stock, head, ids, mask)[at], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_error_within_stock(dtype):
    """bf16/fp16 on a GPU: the first generated step's logits are no further from the fp32 logits than twice the
    distance of stock transformers' own logits in that dtype (plus 1e-3)."""
    stock, ours = (m.to("cuda") for m in stock_and_ours("llama"))
    ids, mask = (t.cuda() for t in prompts([300, 41]))
    kwargs = dict(do_sample=False, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    reference = stock.generate(ids, attention_mask=mask, **kwargs).logits[0]
    stock, ours = stock.to(dtype), ours.to(dtype)
    stock_err = (stock.generate(ids, attention_mask=mask, **kwargs).logits[0].float() - reference).abs().max()
    cache = TreeCache(ours, backend="triton")
    ours_err = (generate_branches(ours, ids, mask, cache=cache, **kwargs).logits[0].float() - reference).abs().max()
    assert ours_err <= 2 * stock_err + 1e-3, (float(ours_err), float(stock_err))
