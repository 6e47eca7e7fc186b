"""The Hugging Face drop-in across model families: random-weight fp32 models built from configs, generate_branches
against stock `generate` on the same weights and seed (greedy, sampling N = 4 and 16, beam search 4, a left-padded
batch): identical tokens, logits within 1e-4. Families whose attention needs a feature the capability table marks
unsupported are asserted refused, naming it. Also: the capability rule's refusals, the run-time checks of each
attention call, and the model's stock attention without a TreeCache."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from o1kernels.capabilities import FEATURES  # noqa: E402
from o1kernels.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION, TokenPairHead, TreeCache, attention_specs, cache_argument, check_model, generate_branches,
    score_steps, stock_attention)
from test_integrations_transformers import VOCAB, assert_no_leak, prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGIT_ATOL = 1e-4
PROMPT = 20  # longer than every window below (8), so windows cut into the prompt
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=PROMPT - 1,
                short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.0 + 0.5 * i for i in range(8)])
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, initializer_range=0.2)  # peaked attention and logits: greedy ties do not flip

# family: (config class, model class, config overrides, the FEATURES its attention needs)
WINDOWED = ("positions", "sliding_window")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, ()),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8)), ()),
    # prompt longer than max_position_embeddings: the frequencies follow the forward's length
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)), ()),
    # prompt one longer than original_max_position_embeddings: all but its last token alone would take short factors
    "llama-longrope": ("LlamaConfig", "LlamaForCausalLM", dict(max_position_embeddings=4 * (PROMPT - 1),
                                                               rope_parameters=LONGROPE), ()),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)), ()),
    "llama-no-use-cache": ("LlamaConfig", "LlamaForCausalLM", dict(use_cache=False), ()),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1), ()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, ()),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8), WINDOWED),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=8, query_pre_attn_scalar=20,
                                                          attn_logit_softcapping=5.0), (*WINDOWED, "softcap")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=8, query_pre_attn_scalar=20, layer_types=["sliding_attention", "full_attention"]), WINDOWED),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             beta_fast=32.0, beta_slow=1.0, truncate=False)), (*WINDOWED, "sinks")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, ()),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=8), WINDOWED),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, ()),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.1, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, logits_scaling=2.0), ()),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.5), ()),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), ()),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=32), ()),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_key_value_heads=None, head_dim=None), ()),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_positions=512, num_key_value_heads=None, head_dim=None), ()),
}


def family_model(family: str, **overrides):
    """A random 2-layer fp32 model of the family, in eval mode, with transformers' default attention."""
    config_cls, model_cls, family_overrides, _ = FAMILIES[family]
    kwargs = {key: value for key, value in {**COMMON, **family_overrides, **overrides}.items() if value is not None}
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


def stock_and_ours(family: str, **overrides):
    """(the family's model with transformers' default attention, an identical copy set to "o1kernels")."""
    stock = family_model(family, **overrides)
    ours = copy.deepcopy(stock)
    ours.set_attn_implementation(ATTN_IMPLEMENTATION)
    return stock, ours


def unsupported(family: str) -> list[str]:
    """Descriptions of the features the family needs that the capability table marks unsupported."""
    return [FEATURES[name][1] for name in FAMILIES[family][3] if not FEATURES[name][0]]


def compare_generate(stock, ours, ids, mask, seed: int, **kwargs) -> float:
    """Stock generate vs generate_branches (a fresh TreeCache, page_size 4) with the same seed: identical tokens;
    each step's logits (without beam search) or the beams' scores within LOGIT_ATOL. Returns the largest difference."""
    kwargs = dict(output_logits=True, output_scores=True, return_dict_in_generate=True, **kwargs)
    torch.manual_seed(seed)
    expected = stock.generate(ids, attention_mask=mask, **kwargs)
    cache = TreeCache(ours, page_size=4)
    torch.manual_seed(seed)
    got = generate_branches(ours, ids, mask, cache=cache, **kwargs)
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    if kwargs.get("num_beams", 1) > 1:
        diff = float((got.sequences_scores - expected.sequences_scores).abs().max())
    else:
        diff = max(float((a - b).abs().max()) for a, b in zip(got.logits, expected.logits))
    assert diff <= LOGIT_ATOL, diff
    assert_no_leak(cache)
    return diff


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_stock_generate(family):
    """Refused naming each missing feature while the capability table marks it unsupported; otherwise stock
    generate's tokens and logits in every mode."""
    stock, ours = stock_and_ours(family)
    missing = unsupported(family)
    if missing:
        with pytest.raises(ValueError) as refusal:
            TreeCache(ours)
        assert all(m in str(refusal.value) for m in missing) and "\n" not in str(refusal.value), refusal.value
        return
    ids, mask = prompts([PROMPT])
    diffs = {
        "greedy": compare_generate(stock, ours, ids, mask, 0, do_sample=False, max_new_tokens=8),
        "sample4": compare_generate(stock, ours, ids, mask, 1, do_sample=True, num_return_sequences=4,
                                    max_new_tokens=8),
        "sample16": compare_generate(stock, ours, ids, mask, 2, do_sample=True, num_return_sequences=16,
                                     max_new_tokens=8),
        "beam4": compare_generate(stock, ours, ids, mask, 3, num_beams=4, num_return_sequences=2, max_new_tokens=8,
                                  do_sample=False),
    }
    ids, mask = prompts([PROMPT, 9])
    diffs["padded"] = compare_generate(stock, ours, ids, mask, 4, do_sample=False, max_new_tokens=8)
    print(f"{family}: tokens equal; max |logit diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "mistral"])
def test_chunks_and_forks_with_windows(family):
    """Teacher-forced chunks and single tokens on forked branches of a shared prompt, windows starting inside the
    shared prompt for some branches and not others: each row's logits equal a stock forward over its tokens."""
    if unsupported(family):
        pytest.skip(f"{family} needs {unsupported(family)}")
    stock, ours = stock_and_ours(family)
    cache = TreeCache(ours, page_size=4)
    prompt = torch.randint(3, VOCAB, (1, 6))
    cache.prefill(ours, prompt)
    cache.batch_repeat_interleave(3)
    seqs = [prompt[0].tolist()] * 3
    for step, width in enumerate([3, 1, 4, 1, 1, 2]):
        if step == 2:  # rows move apart: row 1 continues twice, row 2 ends
            cache.batch_select_indices([0, 1, 1])
            seqs = [seqs[0], seqs[1], seqs[1]]
        tokens = torch.randint(3, VOCAB, (3, width))
        with torch.no_grad():
            logits = ours(tokens, use_cache=True, **{cache_argument(ours): cache}).logits
            for i in range(3):
                seqs[i] = seqs[i] + tokens[i].tolist()
                expected = stock(torch.tensor([seqs[i]])).logits[0, -width:]
                torch.testing.assert_close(logits[i], expected, atol=LOGIT_ATOL, rtol=0)
    assert max(len(s) for s in seqs) > 2 * 8  # past the window
    assert_no_leak(cache)


@pytest.mark.parametrize("family", ["gpt_oss", "gemma2", "mistral", "llama"])
def test_without_tree_cache_runs_the_stock_attention(family):
    """A model set to "o1kernels" without a TreeCache runs the attention transformers picks for it (eager for
    GPT-OSS's sinks and Gemma2's soft-cap, which SDPA drops or refuses; SDPA otherwise): same logits and tokens as
    the stock model, with no cache and with generate's DynamicCache."""
    stock, ours = stock_and_ours(family)
    expected_name = "sdpa" if stock.config._attn_implementation == "sdpa" else "eager"
    module = next(m for m in ours.modules() if getattr(m, "layer_idx", None) == 0 and hasattr(m, "scaling"))
    assert stock_attention(module)[0] == expected_name
    ids, mask = prompts([PROMPT, 9])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   stock(ids, attention_mask=mask).logits[mask.bool()], atol=1e-6, rtol=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_sinks_are_not_dropped_without_tree_cache():
    """The regression: GPT-OSS's sinks change the logits (scaled up here), and the "o1kernels" attention without a
    TreeCache keeps them (SDPA would drop them)."""
    stock, ours = stock_and_ours("gpt_oss")
    with torch.no_grad():
        for model in (stock, ours):
            for m in model.modules():
                if isinstance(getattr(m, "sinks", None), torch.Tensor):
                    m.sinks.fill_(3.0)
    ids, _ = prompts([PROMPT])
    sdpa = copy.deepcopy(stock)
    sdpa.config._attn_implementation = "sdpa"  # what the previous fallback ran: sinks silently dropped
    with torch.no_grad():
        expected = stock(ids).logits
        assert (sdpa(ids).logits - expected).abs().max() > 1e-2
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("build,message", [
    (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True)),
     "ALiBi positional biases (every layer)"),
    (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)),
     "attention computed outside transformers' AttentionInterface"),
    (lambda: family_model("gemma3", use_bidirectional_attention=True),
     "non-causal (bidirectional) self-attention (every layer)"),
    (lambda: family_model("llama", is_causal=False), "non-causal (bidirectional) self-attention"),
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, add_cross_attention=True)),
     "cross-attention / encoder-decoder attention"),
    (lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16)),
     "multi-head latent attention (MLA) (every layer)"),
    (lambda: family_model("qwen2", layer_types=["chunked_attention", "full_attention"]),
     "chunked_attention layers (layer 0)"),
    (lambda: family_model("llama").double(), "dtype torch.float64"),
])
def test_refusals_name_what_is_missing(build, message):
    model = build().eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="o1kernels does not support ") as refusal:
        TreeCache(model)
    assert message in str(refusal.value) and "\n" not in str(refusal.value), refusal.value


def test_specs_follow_the_config():
    """Per-layer windows (layer_types, or one window for every layer), soft-cap, sinks, heads; Qwen2-MoE's
    sliding_window 0 without sliding layers is no window."""
    gemma3 = attention_specs(family_model("gemma3"))
    assert [s.sliding_window for s in gemma3] == [8, None]
    assert (gemma3[0].num_heads, gemma3[0].num_kv_heads, gemma3[0].head_dim) == (4, 2, 16)
    assert [s.sliding_window for s in attention_specs(family_model("mistral"))] == [8, 8]
    assert [s.softcap for s in attention_specs(family_model("gemma2"))] == [5.0, 5.0]
    assert all(s.sinks for s in attention_specs(family_model("gpt_oss")))
    assert [s.sliding_window for s in attention_specs(family_model("qwen2_moe"))] == [None, None]
    neox = attention_specs(family_model("gpt_neox"))[0]
    assert (neox.num_heads, neox.num_kv_heads, neox.head_dim) == (4, 4, 16)


def test_explicit_backend_that_lacks_a_feature_is_refused():
    """TreeCache(backend=X) for a model whose windows X does not implement: refused up front (backend="auto" picks
    one that does)."""
    implementing = FEATURES["sliding_window"][0]
    lacking = [b for b in ("cpu", "triton", "cuda") if b not in implementing]
    if not implementing or not lacking:
        pytest.skip(f"sliding windows are implemented by {sorted(implementing) or 'no backend'}")
    _, ours = stock_and_ours("mistral")
    with pytest.raises(ValueError, match=f"backend '{lacking[0]}' does not implement .*sliding-window attention"):
        check_model(ours, backend=lacking[0])
    check_model(ours)


def test_use_cache_false():
    """generate_branches decodes with the cache whatever the checkpoint says (the family test checks the tokens);
    use_cache=False passed to it, or generate feeding tokens a TreeCache already holds, is refused."""
    stock, ours = stock_and_ours("llama-no-use-cache")
    ids, mask = prompts([PROMPT])
    with pytest.raises(ValueError, match="use_cache=False: generate would feed the whole sequence"):
        generate_branches(ours, ids, mask, use_cache=False, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"position_ids \[0, 1, 2.*do not continue row 0, which holds 20 tokens"):
        ours.generate(ids, max_new_tokens=3, do_sample=False, **{cache_argument(ours): TreeCache(ours)})


def test_attention_call_must_match_its_spec():
    """A window the mask carries that the spec TreeCache was checked against does not have is an error, not a
    silently different attention."""
    _, ours = stock_and_ours("mistral")
    ours.config.sliding_window = None  # full attention when the TreeCache is made ...
    cache = TreeCache(ours)
    ours.config.sliding_window = 6  # ... windows after: Mistral's masks and attention read the config per forward
    with pytest.raises(RuntimeError, match="layer 0: the model's attention uses a window of 6 .*its config says None"):
        generate_branches(ours, *prompts([PROMPT]), cache=cache, max_new_tokens=2)


@pytest.mark.parametrize("family", ["granite", "qwen3", "gpt_oss", "olmo2"])
def test_score_steps_token_pair_matches_stock_logits(family):
    """Math-Shepherd-style rewards from two LM-head rows equal softmax over the stock model's two logits, with
    Granite's logits_scaling folded into the rows."""
    model = family_model(family)
    ids, mask = prompts([PROMPT, 9])
    ids[:, 4::5] = 7
    head = TokenPairHead(positive_id=11, negative_id=12)
    steps, _ = score_steps(model, ids, 7, head, attention_mask=mask, backend="torch")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    expected = torch.softmax(logits[..., [11, 12]], dim=-1)[..., 0]
    at = (ids == 7) & mask.bool()
    torch.testing.assert_close(steps[at], expected[at], atol=1e-5, rtol=1e-5)
