"""Incremental, batched PRM scoring (o1kernels.decoder.prm.PRMScorer, o1kernels.prm_formats): on random search trees
(forks, prunes, finished branches, uneven steps) every step score equals a full fp32 re-encode of the branch's PRM
text, for Qwen2.5-Math-PRM, Math-Shepherd, Skywork-PRM and the reward-head form; one PRM forward per search step and
only the new PRM tokens processed (counted at the embedding); a policy and a PRM with different tokenizers; a
real-layout Qwen2.5-Math-PRM checkpoint loads."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from o1kernels.decode import DEFAULT_MODEL
from o1kernels.decoder import TreeDecoder, load_checkpoint
from o1kernels.decoder.model import ModelConfig, Transformer
from o1kernels.decoder.prm import PRMScoredDecoder, PRMScorer
from o1kernels.decoder.search import SearchConfig, search
from o1kernels.decoder.task import CharTokenizer, generate_problems
from o1kernels.decoder.tokenizers import load_raw_tokenizer
from o1kernels.prm_formats import MathShepherd, QwenMathPRM, RewardHeadFormat, SkyworkPRM

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<s>", "<|im_start|>", "<|im_end|>", "<extra_0>", "ки"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prm_tokenizer():
    """A PRM tokenizer unlike the policy's CharTokenizer: two-digit numbers are one token, other characters one
    each, ids in another order, the PRM families' special tokens."""
    chars = sorted({chr(c) for c in range(32, 127)} | {"\n", "\\", "{", "}"}, reverse=True)
    words = SPECIALS + [f"{i:02d}" for i in range(100)] + chars
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="?"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\d\d|[\s\S]"), behavior="isolated")
    core.add_special_tokens(SPECIALS)
    return core


def random_prm(vocab: int, head: dict | None, seed: int, model_type: str = "qwen2") -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, model_type=model_type,
                      attention_bias=model_type == "qwen2", reward_head=head)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # weights large enough that step scores spread over (0, 1)
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


QWEN_HEAD = {"activation": "softmax", "num_classes": 2, "hidden": 32, "positive_index": 1}
VALUE_HEAD = {"activation": "sigmoid", "num_classes": 1}
# A head times the step's likelihood: the power small enough that scores of random weights' likelihoods spread in (0, 1).
LIKELIHOOD = 0.05


def family(name: str):
    """(format, PRM model) of a PRM family on the test tokenizer (random weights)."""
    tok = prm_tokenizer()
    vocab = tok.get_vocab_size()
    if name == "qwen":
        return QwenMathPRM(tok), random_prm(vocab, QWEN_HEAD, 1)
    if name == "shepherd":
        return MathShepherd(tok), random_prm(vocab, None, 2, "llama")
    if name == "skywork":
        return SkyworkPRM(tok, bos_id=0), random_prm(vocab, VALUE_HEAD, 3)
    if name == "qwen_likelihood":
        return QwenMathPRM(tok), random_prm(vocab, {**QWEN_HEAD, "likelihood_weight": LIKELIHOOD}, 5)
    if name == "reward_head_likelihood":
        return RewardHeadFormat(), random_prm(len(CharTokenizer()), {**VALUE_HEAD, "likelihood_weight": LIKELIHOOD}, 6)
    return RewardHeadFormat(separator=[CharTokenizer().step_id]), random_prm(len(CharTokenizer()), QWEN_HEAD, 4)


@torch.no_grad()
def reencode_scores(model: Transformer, fmt, question, steps) -> list[float]:
    """Full fp32 re-encode of the branch's PRM text: one causal forward, the head applied in plain torch (times each
    step's likelihood from the same forward's LM head, to the power likelihood_weight, when the head has one)."""
    ids, positions = fmt.encode(question, steps)
    t = len(ids)

    def causal(_, q, k, v):
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1)

    hidden = model.run_layers(torch.tensor(ids), torch.arange(t), causal)
    x = model.model.norm(hidden[positions]).float()
    if fmt.token_pair is not None:
        pair = model.lm_head(x)[:, list(fmt.token_pair)]
        return torch.softmax(pair, -1)[:, 0].tolist()
    head, spec = model.reward_head, model.config.reward_head
    if head.mlp is not None:
        x = torch.relu(head.mlp(x))
    z = head.out(x)
    p = torch.sigmoid(z[:, 0]) if spec["activation"] == "sigmoid" else torch.softmax(z, -1)[:, spec["positive_index"]]
    if spec["likelihood_weight"]:
        logp = torch.log_softmax(model.lm_head(model.model.norm(hidden)).double(), -1)
        starts = [len(fmt.encode(question, [])[0])] + [q + 1 for q in positions]
        for k in range(len(positions)):  # step k's tokens: ids[starts[k]:starts[k + 1]], each predicted one before
            step_logp = sum(logp[t - 1, ids[t]] for t in range(starts[k], starts[k + 1]))
            p[k] *= torch.exp(step_logp * spec["likelihood_weight"]).float()
    return p.tolist()


def random_step(rng: random.Random, text: bool):
    """A step of 1-14 characters (or ids), sometimes ending in the step separator."""
    chars = "0123456789+-=A:"
    s = "".join(rng.choice(chars) for _ in range(rng.randint(1, 14))) + ("\n" if rng.random() < 0.5 else "")
    return s if text else CharTokenizer().encode(s)


class Counter:
    """Forward hook on the PRM's embedding: forwards run and tokens embedded (padded: rows are right-padded)."""

    def __init__(self, embedding, padded: bool = False):
        self.forwards = self.tokens = 0
        self.padded = padded
        embedding.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.forwards += 1
        self.tokens += args[0].numel()


def run_random_tree(scorer, fmt, reference, count, seed: int) -> None:
    """Drive `scorer` through a random search tree (forks with the parent released, prunes, finished branches left
    unscored, uneven steps); after every search step check one forward was run, only the new PRM tokens were
    processed, and every live branch's step scores equal reference(question, steps) (the full re-encode)."""
    rng = random.Random(seed)
    text = fmt.reads_text
    questions = ["Q:17+25-9", "Q:3+48+61-7="] if text else [CharTokenizer().encode("Q:17+25-9\n", bos=True)]
    chains = {}  # branch -> (question, steps)
    for q in questions:
        chains[scorer.add_prompt(q)] = (q, [])
    finished = set()
    all_scores = []
    for _ in range(6):
        for b in list(chains):
            if b in finished:
                continue
            r = rng.random()
            if r < 0.3 and len(chains) < 12:
                for kid in scorer.fork(b, rng.randint(2, 3)):
                    chains[kid] = (chains[b][0], list(chains[b][1]))
                scorer.release(b)
                del chains[b]
            elif r < 0.45 and len(chains) > 2:
                scorer.release(b)
                del chains[b]
        active = [b for b in chains if b not in finished]
        if not active:
            break
        steps = [random_step(rng, text) for _ in active]
        forwards, tokens, counted = count.forwards, count.tokens, scorer.stats["tokens"]
        new, chain = scorer.score(active, steps)
        assert count.forwards == forwards + 1  # one PRM forward whatever the number of branches
        lens = []
        for b, s in zip(active, steps):
            q, old = chains[b]
            lens.append(len(fmt.encode(q, old + [s])[0]) - len(fmt.encode(q, old)[0]))
            chains[b] = (q, old + [s])
        assert scorer.stats["tokens"] - counted == sum(lens)  # the new PRM tokens only
        assert count.tokens - tokens == (len(lens) * max(lens) if count.padded else sum(lens))
        for b, score, c in zip(active, new.tolist(), chain.tolist()):
            expected = reference(*chains[b])
            got = scorer.step_scores(b)
            assert len(got) == len(expected)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
            assert score == got[-1] and c == got[-1]  # aggregate "last"
            all_scores.append(score)
        finished.update(b for b in active if rng.random() < 0.2)
    assert torch.tensor(all_scores).std() > 1e-3  # scores spread 100x the tolerance: a wrong row would show
    for b in list(chains):
        scorer.release(b)


@pytest.mark.parametrize("name", ["qwen", "shepherd", "skywork", "reward_head", "qwen_likelihood",
                                  "reward_head_likelihood"])
@pytest.mark.parametrize("seed,backend", [(0, "torch"), (1, "torch"), (2, "auto")])  # auto: the compiled CPU kernels
def test_random_trees_equal_reencoding(name, seed, backend):
    fmt, model = family(name)
    scorer = PRMScorer(model, fmt, page_size=4, backend=backend)
    count = Counter(model.model.embed_tokens)
    run_random_tree(scorer, fmt, lambda q, steps: reencode_scores(model, fmt, q, steps), count, seed)
    assert scorer.pool.pages_in_use == 0


def test_one_forward_per_step_in_search_with_different_tokenizers():
    """The shipped policy (character tokenizer) beside a Qwen-format PRM with its own tokenizer: beam search's steps
    are each scored in one PRM forward, and every candidate's step scores equal re-encoding its decoded text."""
    policy_model = load_checkpoint(DEFAULT_MODEL)
    fmt, prm = family("qwen")
    char = CharTokenizer()
    scorer = PRMScorer(prm, fmt, backend="torch")
    count = Counter(prm.model.embed_tokens)
    joined = PRMScoredDecoder(TreeDecoder(policy_model, backend="torch"), scorer, tokenizer=char)
    problems = generate_problems(2, 11)
    config = SearchConfig(n=4, beam_width=2, max_steps=5, max_step_tokens=12, temperature=1.0, seed=2)
    results, _ = search(joined, char, [char.encode(p.prompt, bos=True) for p in problems], "beam_search", config)
    assert count.forwards == len(problems) + joined.policy.stats["steps"]  # prompts + one per search step
    for p, r in zip(problems, results):
        for c in r.candidates:
            expected = reencode_scores(prm, fmt, char.decode(char.encode(p.prompt, bos=True)),
                                       [char.decode(t) for t in c.step_tokens])
            torch.testing.assert_close(torch.tensor(c.step_scores), torch.tensor(expected), atol=1e-5, rtol=0)
    assert joined.kv_bytes() == joined.policy.kv_bytes() + scorer.kv_bytes() == 0


def write_qwen_prm(path, family: str = "qwen"):
    """A PRM checkpoint directory as its repository lays it out, random weights from a config, with the test
    tokenizer: Qwen2.5-Math-PRM (architectures Qwen2ForProcessRewardModel, model.* + score.0 / score.2, no lm_head)
    or Skywork-o1-Open-PRM (Qwen2ForPrmModel, model.* + v_head.summary + an lm_head). Returns the stock modules
    (transformers' Qwen2Model, the head)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    tok = prm_tokenizer()
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, initializer_range=0.3)
    torch.manual_seed(0)
    base = transformers.Qwen2Model(cfg).eval()
    tensors = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    if family == "qwen":
        score = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        tensors.update({f"score.{k}": v.detach().contiguous() for k, v in score.state_dict().items()})
    else:
        score = torch.nn.Linear(32, 1)
        tensors.update({f"v_head.summary.{k}": v.detach().contiguous() for k, v in score.state_dict().items()})
        tensors["lm_head.weight"] = torch.randn(cfg.vocab_size, 32)
    arch = "Qwen2ForProcessRewardModel" if family == "qwen" else "Qwen2ForPrmModel"
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": [arch]}))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(path)
    return base, score


@pytest.mark.parametrize("family", ["qwen", "skywork"])
def test_prm_checkpoint_layouts_load(tmp_path, family):
    """Our loader reads real-layout Qwen2.5-Math-PRM and Skywork-o1-Open-PRM checkpoints, and their incremental
    scores equal the stock computation (transformers' Qwen2Model + the head) over the whole text."""
    base, score = write_qwen_prm(tmp_path, family)
    model = load_checkpoint(tmp_path)
    assert model.lm_head is None
    assert model.config.reward_head["hidden"] == (32 if family == "qwen" else None)
    fmt = QwenMathPRM(prm_tokenizer()) if family == "qwen" else SkyworkPRM(prm_tokenizer(), bos_id=0)
    question, steps = "Q:12+34", ["12+34=46\n\n", "A:46"]
    ids, positions = fmt.encode(question, steps)
    with torch.no_grad():
        hidden = base(input_ids=torch.tensor([ids])).last_hidden_state[0, positions]
        z = score(hidden)
        stock = torch.softmax(z, -1)[:, 1] if family == "qwen" else torch.sigmoid(z[:, 0])
    scorer = PRMScorer(model, fmt, backend="torch")
    root = scorer.add_prompt(question)
    got = [float(scorer.score([root], [s])[0]) for s in steps]
    torch.testing.assert_close(torch.tensor(got), stock, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no LM head"):
        model.logits(torch.zeros(32))


def test_cli_separate_prm_search_uses_the_incremental_path(tmp_path, capsys, monkeypatch):
    """python -m o1kernels.decode --prm QWEN_PRM_DIR --prm-format qwen_math_prm: the shipped policy (character
    tokenizer) and the Qwen-layout PRM with its own tokenizer; one PRM forward per search step, and the printed step
    scores equal re-encoding each candidate's text in the PRM's format."""
    from o1kernels.decode import main

    write_qwen_prm(tmp_path / "prm")
    calls = {"score": 0, "forward": 0}
    score, forward = PRMScorer.score, PRMScorer._forward

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(PRMScorer, "score", counted("score", score))
    monkeypatch.setattr(PRMScorer, "_forward", counted("forward", forward))
    code = main(["--prm", str(tmp_path / "prm"), "--prm-format", "qwen_math_prm", "--prompt", "Q:17+25-9", "--json",
                 "--no-progress", "--backend", "torch", "--n", "4", "--beam-width", "2", "--max-steps", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert calls["score"] >= 1 and calls["forward"] == 1 + calls["score"]  # the prompt, then one per search step
    model = load_checkpoint(tmp_path / "prm")
    fmt = QwenMathPRM(load_raw_tokenizer(tmp_path / "prm"))  # the PRM's tokenizer as the CLI loads it
    for c in report["candidates"]:
        expected = reencode_scores(model, fmt, "Q:17+25-9\n", c["steps"])
        torch.testing.assert_close(torch.tensor(c["step_scores"]), torch.tensor(expected), atol=1e-5, rtol=0)


def test_formats_and_scorer_errors():
    tok = prm_tokenizer()
    model = random_prm(tok.get_vocab_size(), QWEN_HEAD, 0)
    with pytest.raises(ValueError, match="tokenizer: QwenMathPRM needs"):
        QwenMathPRM(None)
    with pytest.raises(ValueError, match=r"separator '1\+' is 2 tokens"):
        QwenMathPRM(tok, separator="1+")
    with pytest.raises(TypeError, match="question must be text"):
        QwenMathPRM(tok).prompt_ids([1, 2])
    with pytest.raises(TypeError, match="step must be a list of token ids"):
        RewardHeadFormat().step_ids("text", 0)
    with pytest.raises(ValueError, match="token_pair must be two token ids"):
        RewardHeadFormat(token_pair=(1,))
    with pytest.raises(ValueError, match="model has no reward head"):
        PRMScorer(random_prm(tok.get_vocab_size(), None, 0), QwenMathPRM(tok))
    with pytest.raises(TypeError, match="fmt must be an o1kernels.prm_formats.PRMFormat"):
        PRMScorer(model, "qwen")
    scorer = PRMScorer(model, QwenMathPRM(tok), backend="torch")
    root = scorer.add_prompt("Q:1+2")
    with pytest.raises(ValueError, match="steps must hold one step per branch"):
        scorer.score([root], ["a", "b"])
    with pytest.raises(ValueError, match="unknown branch id 7"):
        scorer.score([7], ["a"])
    policy = TreeDecoder(load_checkpoint(DEFAULT_MODEL), backend="torch")
    with pytest.raises(ValueError, match="tokenizer: QwenMathPRM reads text"):
        PRMScoredDecoder(policy, scorer)
    with_likelihood = random_prm(len(CharTokenizer()), {**VALUE_HEAD, "likelihood_weight": 1.0}, 0)
    with pytest.raises(ValueError, match=r"likelihood_weight 1.0\), which only a PRMScorer computes"):
        TreeDecoder(with_likelihood, backend="torch")
    with pytest.raises(ValueError, match="likelihood_weight 1.0\\), which needs each step's tokens"):
        with_likelihood.step_rewards(torch.randn(1, 2, 32), torch.ones(1, 2, dtype=torch.bool))
    with_likelihood.lm_head = None
    with pytest.raises(ValueError, match="which needs an LM head; the model has none"):
        PRMScorer(with_likelihood)
    for bad in (-0.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=f"likelihood_weight must be a finite number >= 0, got {bad!r}"):
            random_prm(10, {**VALUE_HEAD, "likelihood_weight": bad}, 0)


def hf_family(name: str):
    """(format, transformers PRM set to "o1kernels", head for IncrementalPRMScorer, reference(question, steps)) of a
    PRM family: Qwen2.5-Math-PRM and Skywork as a Qwen2 backbone with their heads, Math-Shepherd as a Llama causal
    LM, the reward-head form as a Llama backbone with a Linear(H, 2) head over the policy's ids."""
    transformers = pytest.importorskip("transformers")
    import o1kernels.integrations.transformers  # noqa: F401 (registers the "o1kernels" attention)

    tok = prm_tokenizer()
    vocab = tok.get_vocab_size() if name != "reward_head" else len(CharTokenizer())
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=1024)
    torch.manual_seed(7)
    if name in ("qwen", "skywork"):
        model = transformers.Qwen2Model(transformers.Qwen2Config(**common))
        head = (torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)) if name == "qwen"
                else torch.nn.Linear(32, 1))
        fmt = QwenMathPRM(tok) if name == "qwen" else SkyworkPRM(tok, bos_id=0)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
        head = None if name == "shepherd" else torch.nn.Linear(32, 2)
        fmt = MathShepherd(tok) if name == "shepherd" else RewardHeadFormat(separator=[CharTokenizer().step_id])
    model.eval().set_attn_implementation("o1kernels")

    @torch.no_grad()
    def reference(question, steps):  # the whole text, one stock forward (no TreeCache: the model's own attention)
        ids, positions = fmt.encode(question, steps)
        if head is None:
            logits = model(torch.tensor([ids])).logits[0, positions][:, list(fmt.token_pair)]
            return torch.softmax(logits.float(), -1)[:, 0].tolist()
        base = getattr(model, "base_model", model)
        z = head(base(input_ids=torch.tensor([ids])).last_hidden_state[0, positions])
        return (torch.sigmoid(z[:, 0]) if z.shape[1] == 1 else torch.softmax(z, -1)[:, 1]).tolist()

    return fmt, model, head, reference


@pytest.mark.parametrize("name", ["qwen", "shepherd", "skywork", "reward_head"])
def test_hf_route_random_trees_equal_reencoding(name):
    from o1kernels.integrations.transformers import IncrementalPRMScorer

    from o1kernels.paged import KVBudget

    fmt, model, head, reference = hf_family(name)
    budget = KVBudget(1 << 30)
    scorer = IncrementalPRMScorer(model, fmt, head, page_size=4, backend="torch", kv_budget=budget)
    count = Counter(model.get_input_embeddings(), padded=True)
    score = scorer.score

    def checked(*args):
        out = score(*args)
        assert budget.used == scorer.cache.kv_bytes() > 0
        return out

    scorer.score = checked
    run_random_tree(scorer, fmt, reference, count, seed=3)
    assert scorer.cache.pool.pages_in_use == 0 and budget.used == 0


def test_one_memory_budget_for_policy_and_prm(capsys, tmp_path):
    """A KVBudget shared by the policy's pool and the PRM's: it counts the pages both reference at every search
    step; when it runs out the operation is undone (the budget still equals what the pools hold) and the CLI says so
    in one line (exit status 1)."""
    from o1kernels.decode import main
    from o1kernels.paged import KVBudget, KVPoolExhausted

    fmt, prm = family("qwen")
    char = CharTokenizer()
    budget = KVBudget(1 << 30)
    policy = TreeDecoder(load_checkpoint(DEFAULT_MODEL), backend="torch", kv_budget=budget)
    scorer = PRMScorer(prm, fmt, backend="torch", kv_budget=budget)
    joined = PRMScoredDecoder(policy, scorer, tokenizer=char)
    seen = []
    step = joined.generate_step

    def checked(*args, **kwargs):
        out = step(*args, **kwargs)
        assert budget.used == policy.pool.kv_bytes() + scorer.pool.kv_bytes() == joined.kv_bytes()
        seen.append(budget.used)
        return out

    joined.generate_step = checked
    prompts = [char.encode(p.prompt, bos=True) for p in generate_problems(2, 5)]
    config = SearchConfig(n=4, beam_width=2, max_steps=4, max_step_tokens=12, temperature=1.0, seed=1)
    search(joined, char, prompts, "beam_search", config)
    assert seen and max(seen) > 0 and budget.used == 0
    tight = KVBudget(max(seen) // 2)
    joined = PRMScoredDecoder(TreeDecoder(policy.model, backend="torch", kv_budget=tight),
                              PRMScorer(prm, fmt, backend="torch", kv_budget=tight), tokenizer=char)
    with pytest.raises(KVPoolExhausted, match="KV budget exhausted"):
        search(joined, char, prompts, "beam_search", config)
    assert tight.used == joined.policy.pool.kv_bytes() + joined.scorer.pool.kv_bytes() <= tight.max_bytes
    write_qwen_prm(tmp_path / "prm")
    code = main(["--prm", str(tmp_path / "prm"), "--prm-format", "qwen_math_prm", "--prompt", "Q:17+25-9",
                 "--no-progress", "--backend", "torch", "--n", "4", "--beam-width", "2", "--kv-budget", "4KiB"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: KV budget exhausted") and err.count("\n") == 1
