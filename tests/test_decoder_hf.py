"""The reference decoder on other models: Hugging Face tokenizers in search() and the CLI (HFTokenizer), a PRM in
its own checkpoint (PRMScoredDecoder over a PRMScorer: reward head or LM-head token pair), and the CLI options for
both."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from o1kernels.decode import DEFAULT_MODEL, main  # noqa: E402
from o1kernels.decoder import NaiveDecoder, TreeDecoder, load_checkpoint, save_checkpoint  # noqa: E402
from o1kernels.decoder.model import ModelConfig, Transformer  # noqa: E402
from o1kernels.decoder.prm import PRMScoredDecoder, PRMScorer  # noqa: E402
from o1kernels.decoder.search import SearchConfig, search  # noqa: E402
from o1kernels.decoder.task import CharTokenizer, generate_problems  # noqa: E402
from o1kernels.decoder.tokenizers import HFTokenizer, as_search_tokenizer, load_tokenizer  # noqa: E402
from o1kernels.prm_formats import RewardHeadFormat  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def char_vocab_tokenizer(as_transformers: bool = True):
    """The task's character vocabulary (same ids as CharTokenizer) as a Hugging Face tokenizer."""
    vocab = {w: i for i, w in enumerate(CharTokenizer().vocab)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    core.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    if not as_transformers:
        return core
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


def test_hf_tokenizer_interface():
    char = CharTokenizer()
    for raw in (char_vocab_tokenizer(), char_vocab_tokenizer(as_transformers=False)):
        tok = HFTokenizer(raw, "\n", eos_id=None if hasattr(raw, "get_vocab") and hasattr(raw, "eos_token_id") else 2)
        assert (tok.step_id, tok.eos_id, len(tok)) == (char.step_id, char.eos_id, len(char))
        text = "Q:17+25\n17+25=42\n"
        assert tok.encode(text) == char.encode(text)
        assert tok.decode(char.encode(text) + [char.eos_id]) == text  # special tokens dropped
        assert HFTokenizer(raw, char.step_id).step_id == char.step_id
        assert HFTokenizer(raw, "<eos>").step_id == 2  # a vocabulary entry
    hf = HFTokenizer(char_vocab_tokenizer(), "\n")
    assert hf.encode("1+2", bos=False) == char.encode("1+2")
    with pytest.raises(ValueError, match=r"step_separator '12' encodes to 2 tokens \[4, 5\], not one"):
        HFTokenizer(char_vocab_tokenizer(), "12")
    with pytest.raises(ValueError, match=r"step_separator must be a token id in \[0, 20\), got 20"):
        HFTokenizer(char_vocab_tokenizer(), 20)
    with pytest.raises(TypeError, match="transformers tokenizer or a tokenizers.Tokenizer"):
        HFTokenizer(object(), "\n")
    assert as_search_tokenizer(char) is char
    with pytest.raises(ValueError, match="step_separator is only for Hugging Face tokenizers"):
        as_search_tokenizer(char, "\n")
    with pytest.raises(ValueError, match="has no step_id: pass step_separator"):
        as_search_tokenizer(char_vocab_tokenizer())


def test_load_tokenizer(tmp_path):
    char_vocab_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path, "\n")
    assert tok.step_id == CharTokenizer().step_id and tok.eos_id == 2
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "missing", "\n")


@pytest.fixture(scope="module")
def arith_model():
    return load_checkpoint(DEFAULT_MODEL)


def _prompts():
    tok = CharTokenizer()
    return [tok.encode(p.prompt, bos=True) for p in generate_problems(2, 7)]


def _summary(results):
    return [[(c.text, c.step_scores, c.answer) for c in r.candidates] + [r.chosen] for r in results]


def test_search_with_a_hf_tokenizer_equals_char_tokenizer(arith_model):
    """Same ids through a transformers tokenizer (step separator given as a string): identical search results."""
    config = SearchConfig(n=4, beam_width=2, max_steps=6, max_step_tokens=12, temperature=1.0, seed=3)
    ours, _ = search(TreeDecoder(arith_model, backend="torch"), CharTokenizer(), _prompts(), "beam_search", config)
    hf, _ = search(TreeDecoder(arith_model, backend="torch"), char_vocab_tokenizer(), _prompts(), "beam_search",
                   config, step_separator="\n")
    assert _summary(hf) == _summary(ours)


@pytest.mark.parametrize("decoder_cls", [TreeDecoder, NaiveDecoder])
def test_separate_prm_checkpoint_with_reward_head(tmp_path, arith_model, decoder_cls):
    """The shipped model split in two: its policy without the reward head, and the whole model loaded again as a
    separate PRM. The PRM twin (each search step's steps in one forward) gives the scores the reward head gives
    while decoding, and both KV pools are empty when the search ends."""
    save_checkpoint(arith_model, tmp_path)
    prm_model = load_checkpoint(tmp_path)
    headless = Transformer(ModelConfig.from_hf({**arith_model.config.to_hf(), "o1kernels_reward_head": None}))
    headless.load_state_dict({k: v for k, v in arith_model.state_dict().items() if not k.startswith("reward_head")})
    make = (lambda m: TreeDecoder(m, backend="torch")) if decoder_cls is TreeDecoder else NaiveDecoder
    config = SearchConfig(n=4, beam_width=2, max_steps=6, max_step_tokens=12, temperature=1.0, seed=5)
    plain, _ = search(make(arith_model), CharTokenizer(), _prompts(), "beam_search", config)
    joined = PRMScoredDecoder(make(headless.eval()), prm_model)
    scored, stats = search(joined, CharTokenizer(), _prompts(), "beam_search", config)
    for a, b in zip(plain, scored):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates] and a.chosen == b.chosen
        for ca, cb in zip(a.candidates, b.candidates):
            torch.testing.assert_close(torch.tensor(cb.step_scores), torch.tensor(ca.step_scores),
                                       atol=1e-5, rtol=1e-5)
    assert joined.policy.kv_bytes() + joined.scorer.kv_bytes() == joined.kv_bytes()
    assert joined.scorer.pool.pages_in_use == 0
    if decoder_cls is TreeDecoder:
        assert joined.policy.pool.pages_in_use == 0
        assert stats["peak_kv_bytes"] > 0


def test_separate_prm_token_pair(arith_model):
    """A plain causal LM as the PRM: reward = softmax of its LM logits over (positive, negative) at a step's last
    token, as a full forward over the chain computes it."""
    cfg = ModelConfig.from_hf({**arith_model.config.to_hf(), "o1kernels_reward_head": None, "hidden_size": 32,
                               "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 8})
    torch.manual_seed(1)
    prm_model = Transformer(cfg)
    with torch.no_grad():
        for p in prm_model.parameters():
            p.normal_(0, 0.3)
    pair = (5, 6)
    joined = PRMScoredDecoder(TreeDecoder(arith_model, backend="torch"),
                              PRMScorer(prm_model, RewardHeadFormat(token_pair=pair), backend="torch"))
    prompt = _prompts()[0]
    root = joined.add_prompt(prompt)
    kids = joined.fork(root, 3)
    joined.release(root)
    out = joined.generate_step(kids, max_new_tokens=8, stop_ids={CharTokenizer().step_id}, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    for toks, score in zip(out.new_tokens, out.step_scores):
        with torch.no_grad():
            logits = prm_model(torch.tensor([prompt + toks]))[0, -1]
        expected = torch.softmax(logits[list(pair)].double(), dim=0)[0]
        assert score == pytest.approx(float(expected), abs=1e-5)
    for k in kids:
        joined.release(k)
    assert joined.scorer.pool.pages_in_use == 0


VALUE_HEAD = {"activation": "sigmoid", "num_classes": 1}


def test_prm_decoder_errors(arith_model):
    plain = Transformer(ModelConfig.from_hf({**arith_model.config.to_hf(), "o1kernels_reward_head": None}))
    policy = TreeDecoder(arith_model, backend="torch")
    with pytest.raises(ValueError, match="model has no reward head"):
        PRMScoredDecoder(policy, plain)
    with pytest.raises(ValueError, match=r"token pair \(1, 99\) needs a model with an LM head over those ids"):
        PRMScorer(plain, RewardHeadFormat(token_pair=(1, 99)))
    with pytest.raises(TypeError, match="scorer must be a PRMScorer or a Transformer"):
        PRMScoredDecoder(policy, NaiveDecoder(arith_model))
    small = Transformer(ModelConfig.from_hf({**arith_model.config.to_hf(), "vocab_size": 8,
                                             "o1kernels_reward_head": VALUE_HEAD}))
    with pytest.raises(ValueError, match="must share its tokenizer"):
        PRMScoredDecoder(policy, small)


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """A tiny random transformers Llama policy with a word-level tokenizer, and a random Llama PRM (no head)."""
    root = tmp_path_factory.mktemp("hf")
    words = ["<s>", "</s>", "\n", "+", "-", "=", "Q:", "A:", *map(str, range(100))]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\d+|Q:|A:|\n|[+=-]"),
                                                         behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=0, eos_token_id=1, initializer_range=0.2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    transformers.LlamaForCausalLM(config).save_pretrained(root / "prm")
    return root


FAST = ["--no-progress", "--backend", "torch", "--n", "4", "--beam-width", "2", "--max-steps", "3"]


def test_cli_on_a_hf_checkpoint_with_a_separate_prm(capsys, hf_checkpoints):
    root = hf_checkpoints
    code = main(["--model", str(root / "policy"), "--prm", str(root / "prm"), "--prm-token-pair", "+,-",
                 "--step-separator", r"\n", "--prompt", "Q:17+25-9", "--answer-regex", r"A:(\d+)", "--json", *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["prm"] == str(root / "prm") and len(report["candidates"]) == 4
    for c in report["candidates"]:
        assert "\ufffd" not in c["text"] and c["steps"] and all(0 < s < 1 for s in c["step_scores"])
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "policy"))
    assert all(set(tok.encode(c["text"], add_special_tokens=False)) <= set(range(len(tok)))
               for c in report["candidates"])


@pytest.mark.parametrize("argv, message", [
    (["--step-separator", "+-"], "--step-separator: step_separator '+-' encodes to 2 tokens"),
    (["--step-separator", r"\n\n"], r"--step-separator: step_separator '\n\n' encodes to 2 tokens"),
    (["--step-separator", r"\n", "--step-token-id", "2"], "not both"),
    (["--step-token-id", "500"], "--step-token-id: step_separator must be a token id in [0, 108)"),
    (["--tokenizer", "/nonexistent"], "--tokenizer /nonexistent: no tokenizer in"),
    (["--prm-token-pair", "+,-"], "--prm-token-pair needs --prm"),
    (["--prm", "PRM"], "has no reward head: give --prm-token-pair"),
    (["--prm", "PRM", "--prm-token-pair", "+"], "two tokens separated by a comma"),
    (["--prm", "PRM", "--prm-token-pair", "+,Q:17"], "--prm-token-pair 'Q:17' encodes to 2 tokens"),
    (["--prm", "PRM", "--prm-token-pair", "+,999"], "token id 999 is outside the PRM's vocabulary"),
    (["--answer-regex", "(("], "--answer-regex"),
])
def test_cli_hf_errors(capsys, hf_checkpoints, argv, message):
    argv = [str(hf_checkpoints / "prm") if a == "PRM" else a for a in argv]
    if "--step-separator" not in argv and "--step-token-id" not in argv:
        argv += ["--step-separator", r"\n"]
    code = main(["--model", str(hf_checkpoints / "policy"), *argv, *FAST])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_cli_step_separator_needs_a_hf_tokenizer(capsys):
    code = main(["--step-separator", r"\n", *FAST])
    _, err = capsys.readouterr()
    assert code == 2 and "need a Hugging Face tokenizer" in err
