"""Command line for the reference decoder: PRM-guided search on the shipped tiny arithmetic model.

    python -m o1kernels.decode                                   # 3 task problems, defaults below
    python -m o1kernels.decode --strategy beam_search --n 16 --beam-width 4 --json
    python -m o1kernels.decode --prompt "Q:17+25-9+38"
    python -m o1kernels.decode --model DIR --step-separator '\\n\\n' --prm PRM_DIR --prompt "..."   # any HF model

Other models: --model is any Llama/Qwen2 HF checkpoint directory; its tokenizer files (or --tokenizer DIR) give the
Hugging Face tokenizer, --step-separator (one token; backslash escapes) or --step-token-id the token that ends a step,
--answer-regex how to read an answer. The PRM is the policy's reward head, or a separate checkpoint --prm DIR scored
incrementally (o1kernels.decoder.prm.PRMScorer: every search step's new steps of all branches in one PRM forward) in
its own input format (--prm-format): reward_head (default: the policy's token ids, the PRM's reward head, or two of
its LM-head rows with --prm-token-pair "+,-"), qwen_math_prm, math_shepherd or skywork_prm (the PRM's template and
step separators, with its own tokenizer: --prm-tokenizer DIR or the --prm directory's tokenizer files). The shipped
model's steps are scored by the shipped verifier, a separate PRM (weights/tiny-arith-verifier) on that path, unless
--scorer head picks its own reward head.

Prints what the lines show (settings, the chain score's aggregate, merged duplicate beams), then per problem
every candidate's steps with their PRM step scores, the chosen answer and whether it is correct; then tokens/s
and the KV-cache bytes used versus what the naive decoder would hold.
--json prints one JSON object instead: the first problem's prompt/answer/correct/candidates at the top
level, every problem under "problems", plus the run's strategy, n, threads, omp_wait_policy,
tokens_generated, tokens_per_s, kv_bytes (peak of the shared paged cache) and kv_bytes_naive (peak of
one dense KV copy per branch).
The accuracy-vs-compute demo is benchmarks/scaling.py: `--scaling [its options]` runs it from a repository
checkout. Bad arguments end with a one-line error naming the option on stderr and exit status 2, before the
model is loaded (sizes are checked against the model's positions and the memory available).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "decoder" / "weights" / "tiny-arith"
VERIFIER_MODEL = Path(__file__).parent / "decoder" / "weights" / "tiny-arith-verifier"
# The chain-score aggregate `python -m o1kernels.decoder.train` chose for the shipped reward head on its eval problems
# (the training log's "chosen aggregate").
DEFAULT_AGGREGATE = "min"
# What scores the shipped model's steps by default, and the verifier's aggregate: the choice of
# `python -m o1kernels.decoder.train --verifier` on its eval problems (its log's "chosen scorer").
DEFAULT_SCORER = "verifier"
DEFAULT_VERIFIER_AGGREGATE = "min"
SCORERS = ("head", "verifier")
DTYPES = ("float32", "float16", "bfloat16")
PROBLEM_SEED = 1234  # the CLI's problems: disjoint from the training streams of decoder/train.py


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error over two lines; we want one line
        raise UsageError(message)


AGGREGATE_WORDS = {"prod": "the product", "min": "the minimum", "mean": "the mean", "last": "the last"}
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to 2**64 - 1
TREE_PAGE_SIZE = 16  # TreeDecoder's default page size
DEFAULT_STEP_SEPARATOR = "\\n\\n"  # search-and-learn's step delimiter, as typed on the command line


def build_parser() -> argparse.ArgumentParser:
    from ._backend import BACKENDS
    from ._cli import float_in, int_in, physical_cores_available, positive_int
    from .decoder.search import AGGREGATES, STRATEGIES, TREE_SELECTIONS
    from .prm_formats import FORMATS

    p = _Parser(prog="python -m o1kernels.decode",
                description="PRM-guided test-time search with the o1kernels reference decoder.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="HF checkpoint directory (default: the shipped tiny model; other models: see --tokenizer)")
    p.add_argument("--strategy", choices=STRATEGIES, default="beam_search",
                   help="search strategy (default beam_search)")
    p.add_argument("--n", type=positive_int, default=8, help="candidates / beams per problem (default 8)")
    p.add_argument("--beam-width", type=positive_int, default=4,
                   help="beam_search/dvts: children per kept beam (default 4; at most --n)")
    p.add_argument("--max-steps", type=positive_int, default=8, help="steps per candidate at most (default 8)")
    p.add_argument("--max-step-tokens", type=positive_int, default=12, help="tokens per step at most (default 12)")
    p.add_argument("--temperature", type=float_in(0, 1e6), default=1.0,
                   help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0,
                   help="nucleus sampling mass (default 1.0)")
    p.add_argument("--aggregate", choices=AGGREGATES, default=None,
                   help=f"step-score aggregation into a chain's score (default {DEFAULT_AGGREGATE} with a reward head, "
                        f"{DEFAULT_VERIFIER_AGGREGATE} with the shipped verifier: chosen for each by the training "
                        "script on problems of its own; search-and-learn's default is last)")
    p.add_argument("--select", choices=TREE_SELECTIONS, default="argmax",
                   help="beam_search/dvts: final answer among the finished chains: argmax (the best-scored chain, "
                        "default) or weighted (the answer with the largest sum of chain scores)")
    p.add_argument("--keep-duplicate-beams", action="store_true",
                   help="beam_search: keep beams whose text repeats a better one (default: filter them)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                   help="seed of the sampling generator and of the problems")
    p.add_argument("--decoder", choices=("tree", "naive"), default="tree",
                   help="tree: shared paged KV on our kernels; naive: dense KV copy per branch (baseline)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernel backend of the tree decoder (default auto)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"CPU threads for torch (default: the physical cores available, here "
                        f"{physical_cores_available()})")
    p.add_argument("--problems", type=positive_int, default=None,
                   help="task problems to solve (default 3, 1 with --json)")
    p.add_argument("--prompt", default=None, help='solve this prompt instead, e.g. "Q:17+25-9+38"')
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="Hugging Face tokenizer directory (default: --model's, when it has tokenizer files; else the "
                        "task's character vocabulary)")
    p.add_argument("--step-separator", default=None,
                   help=f"with a Hugging Face tokenizer: the one-token text that ends a step, backslash escapes "
                        f"allowed (default {DEFAULT_STEP_SEPARATOR!r})")
    p.add_argument("--step-token-id", type=int_in(0, 2**31 - 1), default=None,
                   help="the step separator as a token id instead")
    p.add_argument("--answer-regex", default=None,
                   help="an answer is the first group (or the whole) of the regex's last match in a candidate's text "
                        "(default: the task's 'A:<number>')")
    p.add_argument("--scorer", choices=SCORERS, default=None,
                   help="what scores the steps: head (the policy's reward head) or verifier (the shipped verifier "
                        "checkpoint beside the policy, a separate PRM); default: " + DEFAULT_SCORER + " with the "
                        "shipped model (its training script's choice), head with another --model; not with --prm")
    p.add_argument("--prm", type=Path, default=None,
                   help="separate PRM checkpoint directory, scored incrementally in one forward per search step "
                        "(default: the policy's reward head)")
    p.add_argument("--prm-format", choices=tuple(FORMATS), default=None,
                   help="the --prm model's input format (default reward_head: the policy's token ids)")
    p.add_argument("--prm-tokenizer", type=Path, default=None,
                   help="the --prm model's own Hugging Face tokenizer directory (default: the --prm directory's, for "
                        "the formats other than reward_head); each step's text is re-tokenized with it")
    p.add_argument("--prm-token-pair", default=None,
                   help='score with two rows of the --prm model\'s LM head: "POSITIVE,NEGATIVE" tokens (ids or '
                        "one-token strings), reward = P(positive) of the pair")
    p.add_argument("--kv-budget", type=byte_size, default=None,
                   help="one KV memory budget for the policy's and the --prm model's pages together (tree decoder), "
                        "e.g. 512MiB (suffixes KiB, MiB, GiB; plain: bytes); default: none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--scaling", action="store_true",
                   help="run the accuracy-vs-N demo benchmarks/scaling.py instead (repository checkout only); the "
                        "options after it are scaling.py's (--scaling --help lists them)")
    return p


def byte_size(text: str) -> int:
    """argparse type: "512MiB" / "2GiB" / "1000" -> bytes (>= 1)."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}
    unit = next(u for u in units if text.endswith(u))
    try:
        value = int(float(text[:len(text) - len(unit)]) * units[unit])
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size in bytes (suffix KiB, MiB or GiB allowed), got {text!r}")
    return value


def _device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a device (expected cpu or cuda[:index])") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UsageError(f"--device {text}: the CPU has no device index {device.index} (use cpu)")
        return torch.device("cpu")
    if device.type != "cuda":
        raise UsageError(f"--device {text}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_args(args) -> None:
    """Every check that needs no model weights (config.json is read): UsageError naming the option."""
    from ._backend import resolve_backend
    from ._checks import INT32_MAX, available_memory, format_bytes
    from .decoder.checkpoint import load_config
    from .decoder.search import TREE_STRATEGIES, SearchConfig
    from .decoder.task import CharTokenizer, TaskConfig

    args.device = _device(args.device)
    if args.decoder == "naive" and args.kv_budget is not None:
        raise UsageError("--kv-budget: the naive decoder keeps dense per-branch copies, not pages; use --decoder tree")
    if args.decoder == "naive" and args.backend is not None:
        raise UsageError(f"--backend {args.backend}: only the tree decoder runs our kernels (--decoder naive uses "
                         "torch SDPA); drop --backend or use --decoder tree")
    args.backend = args.backend or "auto"
    if args.decoder == "tree":
        try:
            resolve_backend(args.backend, args.device, supported=("torch", "triton", "cpu", "cuda"))
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"--backend {args.backend}: {exc}") from None
    width = min(args.beam_width, args.n)  # as the scaling script: N=1 beam search is one beam
    if args.strategy in TREE_STRATEGIES and args.n % width:
        raise UsageError(f"--n {args.n} must be divisible by --beam-width {width} for {args.strategy}")
    if args.prompt is not None and args.problems is not None:
        raise UsageError("--problems: not with --prompt (that solves the one prompt given)")

    try:
        config = load_config(args.model)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    args.answer_fn = _answer_fn(args)
    tok = args.tok = _tokenizer(args, config)
    if isinstance(tok, CharTokenizer) and config.vocab_size < len(tok):
        raise UsageError(f"--model {args.model}: vocab_size {config.vocab_size} is smaller than the task "
                         f"vocabulary ({len(tok)} tokens); the CLI needs a model trained on the arithmetic task, or "
                         "a Hugging Face tokenizer (--tokenizer)")
    if config.reward_head is not None and config.reward_head["likelihood_weight"]:
        raise UsageError(f"--model {args.model}: its reward head multiplies by the step's likelihood "
                         f"(likelihood_weight {config.reward_head['likelihood_weight']:g}), which only a separate PRM "
                         "computes: give it as --prm, beside a policy")
    if args.scorer is not None and args.prm is not None:
        raise UsageError(f"--scorer {args.scorer}: not with --prm (which gives the PRM)")
    if args.prm is None and (args.scorer or (DEFAULT_SCORER if Path(args.model).resolve() == DEFAULT_MODEL.resolve()
                                             else "head")) == "verifier":
        args.prm = VERIFIER_MODEL
    verifier = args.prm is not None and Path(args.prm).resolve() == VERIFIER_MODEL.resolve()
    args.aggregate = args.aggregate or (DEFAULT_VERIFIER_AGGREGATE if verifier else DEFAULT_AGGREGATE)
    args.prm_format_obj = _check_prm(args, config, tok)
    if args.strategy != "majority" and config.reward_head is None and args.prm is None:
        raise UsageError(f"--strategy {args.strategy} needs a PRM, but {args.model} has no reward head (give --prm)")
    positions = config.max_position_embeddings
    if args.prompt is not None:
        args.prompt_text = _prompt_text(args.prompt)
        try:
            prompt_tokens = len(tok.encode(args.prompt_text, bos=True))
        except ValueError as exc:
            raise UsageError(f"--prompt: {exc}") from None
        if prompt_tokens >= positions:
            raise UsageError(f"--prompt: {prompt_tokens} tokens (with <bos>) leave no room to generate in the "
                             f"model's {positions} positions (max_position_embeddings)")
    else:
        task = TaskConfig()  # the longest task prompt: <bos> Q: then operands with their operators, newline
        prompt_tokens = 1 + 2 + task.max_operands * (len(str(task.max_operand)) + 1)
    if args.max_step_tokens >= positions:
        raise UsageError(f"--max-step-tokens {args.max_step_tokens}: a step cannot be longer than the model's "
                         f"{positions} positions")

    problems = 1 if args.prompt is not None else args.problems or (1 if args.json else 3)
    branches = args.n * problems
    if branches > INT32_MAX:
        raise UsageError(f"--n {args.n} x --problems {problems} = {branches} branches: at most 2**31 - 1")
    # Worst case: every branch holds its own copy of the prompt and of every step, each step in fresh pages.
    tokens = prompt_tokens + args.max_steps * (args.max_step_tokens + TREE_PAGE_SIZE)
    element = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
    kv_bytes = branches * tokens * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
    avail = available_memory(args.device)
    if kv_bytes > avail:
        raise UsageError(f"--n {args.n} x --problems {problems} branches of up to {tokens} tokens (prompt, --max-steps "
                         f"{args.max_steps} x --max-step-tokens {args.max_step_tokens}) may need "
                         f"{format_bytes(kv_bytes)} of KV cache, more than the {format_bytes(avail)} available on "
                         f"{args.device}")
    try:
        args.config = SearchConfig(n=args.n, beam_width=width, max_steps=args.max_steps,
                                   max_step_tokens=args.max_step_tokens, temperature=args.temperature,
                                   top_p=args.top_p, aggregate=args.aggregate, seed=args.seed,
                                   filter_duplicates=not args.keep_duplicate_beams, select=args.select)
    except ValueError as exc:  # every field was checked above; this would be a bug
        raise UsageError(str(exc)) from None
    args.num_problems = problems


def _load(args):
    import torch

    from .decoder import NaiveDecoder, TreeDecoder, load_checkpoint
    from .paged import KVBudget

    note = None if args.no_progress else (lambda message: print(f"{message} ...", file=sys.stderr, flush=True))

    budget = None if args.kv_budget is None else KVBudget(args.kv_budget)

    def decoder_of(model):
        if args.decoder == "tree":
            return TreeDecoder(model, backend=args.backend, on_capture=note, kv_budget=budget)
        return NaiveDecoder(model)

    def load(option, path):
        try:
            return load_checkpoint(path, device=args.device, dtype=getattr(torch, args.dtype))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{option} {path}: {exc}") from None

    model = load("--model", args.model)
    decoder = decoder_of(model)
    if args.prm is not None:
        from .decoder.prm import PRMScoredDecoder, PRMScorer

        scorer = PRMScorer(load("--prm", args.prm), args.prm_format_obj,
                           backend=args.backend if args.decoder == "tree" else "torch", kv_budget=budget)
        decoder = PRMScoredDecoder(decoder, scorer, tokenizer=args.tok)
    return model, args.tok, decoder


def _tokenizer(args, config):
    """The task's CharTokenizer, or an HFTokenizer from --tokenizer / the --model directory (config: the model's)."""
    from .decoder.task import CharTokenizer
    from .decoder.tokenizers import has_tokenizer_files, load_tokenizer

    source = args.tokenizer
    if source is None and Path(args.model).resolve() != DEFAULT_MODEL.resolve() and has_tokenizer_files(args.model):
        source = args.model
    if args.step_separator is not None and args.step_token_id is not None:
        raise UsageError("give --step-separator or --step-token-id, not both")
    if source is None:
        if args.step_separator is not None or args.step_token_id is not None:
            raise UsageError("--step-separator/--step-token-id need a Hugging Face tokenizer (--tokenizer DIR, or "
                             "tokenizer files in --model)")
        return CharTokenizer()
    separator = args.step_token_id if args.step_token_id is not None else _unescape(
        args.step_separator if args.step_separator is not None else DEFAULT_STEP_SEPARATOR)
    try:
        tok = load_tokenizer(source, separator)
    except (OSError, ImportError) as exc:
        raise UsageError(f"{'--tokenizer' if args.tokenizer is not None else '--model'} {source}: {exc}") from None
    except (ValueError, TypeError) as exc:
        option = "--step-token-id" if args.step_token_id is not None else "--step-separator"
        raise UsageError(f"{option}: {exc}") from None
    if tok.eos_id is None:
        tok.eos_id = config.eos_token_id
    if len(tok) > config.vocab_size:
        raise UsageError(f"tokenizer {source} has {len(tok)} tokens, more than the model's vocab_size "
                         f"{config.vocab_size}")
    return tok


def _unescape(text: str) -> str:
    r"""Command-line text with backslash escapes decoded ('

' -> two newlines); other characters kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _check_prm(args, config, tok):
    """--prm / --prm-format / --prm-tokenizer / --prm-token-pair from the PRM's config.json and tokenizer (no
    weights): the PRMFormat to score with, or None without --prm."""
    from .decoder.checkpoint import load_config
    from .decoder.tokenizers import has_tokenizer_files, load_raw_tokenizer
    from .prm_formats import FORMATS, RewardHeadFormat

    if args.prm is None:
        for option, value in (("--prm-token-pair", args.prm_token_pair), ("--prm-format", args.prm_format),
                              ("--prm-tokenizer", args.prm_tokenizer)):
            if value is not None:
                raise UsageError(f"{option} needs --prm")
        return None
    try:
        prm = load_config(args.prm)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--prm {args.prm}: {exc}") from None
    name = args.prm_format or "reward_head"
    source = args.prm_tokenizer
    if source is None and name != "reward_head":
        if not has_tokenizer_files(args.prm):
            raise UsageError(f"--prm-format {name} reads text with the PRM's own tokenizer: give --prm-tokenizer DIR "
                             f"({args.prm} has no tokenizer files)")
        source = args.prm
    prm_tok = None
    if source is not None:
        try:
            prm_tok = load_raw_tokenizer(source)
        except (OSError, ImportError) as exc:
            raise UsageError(f"--prm-tokenizer {source}: {exc}") from None
    if name != "reward_head":
        if args.prm_token_pair is not None:
            raise UsageError(f"--prm-token-pair is for --prm-format reward_head; {name} names its own scores")
        if name == "math_shepherd" and not prm.has_lm_head or name != "math_shepherd" and prm.reward_head is None:
            what = "an LM head" if name == "math_shepherd" else "a reward head"
            raise UsageError(f"--prm-format {name} scores with {what}, which --prm {args.prm} does not have")
        try:
            return FORMATS[name](prm_tok)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--prm-format {name}: {exc}") from None
    if prm_tok is None and prm.vocab_size < config.vocab_size:
        raise UsageError(f"--prm {args.prm}: vocab_size {prm.vocab_size} is smaller than the policy's "
                         f"{config.vocab_size}; a PRM reading the policy's ids must share its tokenizer (or give "
                         "--prm-tokenizer)")
    if args.prm_token_pair is None:
        if prm.reward_head is None:
            raise UsageError(f"--prm {args.prm} has no reward head: give --prm-token-pair POSITIVE,NEGATIVE to score "
                             "with two rows of its LM head")
        return RewardHeadFormat(prm_tok)
    parts = args.prm_token_pair.split(",")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"--prm-token-pair must be two tokens separated by a comma, got {args.prm_token_pair!r}")
    if prm_tok is None:
        pair = tuple(_token(tok, _unescape(p), "--prm-token-pair", prm.vocab_size) for p in parts)
    else:
        pair = tuple(int(p) if p.isdigit() else _unescape(p) for p in parts)
    try:
        return RewardHeadFormat(prm_tok, token_pair=pair)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--prm-token-pair: {exc}") from None


def _token(tok, text: str, option: str, vocab_size: int) -> int:
    """Token id of `text`: a decimal id, or a string that is one token of `tok`."""
    if text.isdigit():
        token = int(text)
    else:
        try:
            ids = [tok.token_id(text, option)] if hasattr(tok, "token_id") else tok.encode(text)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        if len(ids) != 1:
            raise UsageError(f"{option}: {text!r} is {len(ids)} tokens, not one")
        token = ids[0]
    if not 0 <= token < vocab_size:
        raise UsageError(f"{option}: token id {token} is outside the PRM's vocabulary [0, {vocab_size})")
    return token


def _answer_fn(args):
    """How answers are read from a candidate's text: the task's extract_answer, or --answer-regex."""
    import re

    from .decoder.task import extract_answer

    if args.answer_regex is None:
        return extract_answer
    try:
        pattern = re.compile(args.answer_regex)
    except re.error as exc:
        raise UsageError(f"--answer-regex {args.answer_regex!r}: {exc}") from None

    def answer(text: str):
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if pattern.groups else last.group(0)).strip()

    return answer


def _warm_up(args, decoder, tok, prompts: list[str]) -> None:
    """On a GPU, compile the kernels and capture the decode graphs of every batch bucket the search can use
    before the timed search (saying so on stderr: a first run compiles for a while and would look hung)."""
    from .decoder import TreeDecoder
    from .decoder.runner import pad_rows

    decoder = getattr(decoder, "policy", decoder)  # with --prm: the policy's decoder runs the decode steps
    if args.device.type != "cuda" or not isinstance(decoder, TreeDecoder):
        return
    buckets = decoder.runner.buckets
    rows = args.config.n * len(prompts)  # every strategy decodes n branches per problem, all problems batched
    sizes = [1] if buckets is None else sorted({pad_rows(n, buckets) for n in range(1, rows + 1)})
    if not args.no_progress:
        print(f"warming up on {args.device}: compiling the kernels and capturing decode graphs for batch sizes "
              f"{sizes} (a first run on this machine compiles for a while) ...", file=sys.stderr, flush=True)
    seconds = decoder.warm_up(tok.encode(prompts[0], bos=True), sizes, max_new_tokens=args.config.max_step_tokens,
                              temperature=args.config.temperature, top_p=args.config.top_p)
    if not args.no_progress:
        print(f"warm-up done in {seconds:.1f} s", file=sys.stderr, flush=True)


def _prompt_text(prompt: str) -> str:
    """The prompt as the model sees it: a task problem in its canonical form, else the text with a newline."""
    from .decoder.task import parse_problem

    problem = parse_problem(prompt)
    return problem.prompt if problem else prompt if prompt.endswith("\n") else prompt + "\n"


def _problems(args):
    """[(prompt text, Problem or None)]."""
    from .decoder.task import generate_problems, parse_problem

    if args.prompt is not None:
        return [(args.prompt_text, parse_problem(args.prompt))]
    return [(p.prompt, p) for p in generate_problems(args.num_problems, PROBLEM_SEED + args.seed)]


def _candidate_json(c) -> dict:
    return {"text": c.text, "steps": c.steps, "step_scores": c.step_scores, "score": c.score,
            "answer": c.answer, "finished": c.finished}


def _print_problem(i: int, total: int, prompt: str, problem, result, out) -> None:
    expected = f"   (expected {problem.answer})" if problem else ""
    print(f"[{i + 1}/{total}] {prompt.strip()}{expected}", file=out)
    for j, c in enumerate(result.candidates):
        steps = " | ".join(f"{s.strip() or '<eos>'} ({'-' if v is None else f'{v:.2f}'})"
                           for s, v in zip(c.steps, c.step_scores))
        mark = "  <- chosen" if j == result.chosen else ""
        score = "  -  " if c.score is None else f"{c.score:.3f}"
        print(f"  #{j + 1:<3} score {score}  {steps}{mark}", file=out)
    verdict = "" if problem is None else f"  correct: {'yes' if result.answer == problem.answer else 'no'}"
    print(f"  answer: {result.answer}{verdict}", file=out)


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from ._cli import physical_cores_available
    from .decoder.search import search

    if args.decoder == "tree" and args.backend == "auto" and args.device.type == "cpu":
        from ._backend import backend_unavailable_reason

        reason = backend_unavailable_reason("cpu", args.device)
        if reason:
            print(f"note: the compiled CPU kernels are unavailable ({reason}), so the torch backend runs; "
                  "`python -m o1kernels` shows why", file=sys.stderr)
    threads = torch.get_num_threads()
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or physical_cores_available())
    try:
        model, tok, decoder = _load(args)
        problems = _problems(args)
        _warm_up(args, decoder, tok, [text for text, _ in problems])
        bar = tqdm(total=args.config.max_steps, desc=f"{args.strategy} steps", unit="step", file=sys.stderr,
                   disable=args.no_progress, leave=False)
        t0 = time.perf_counter()
        results, stats = search(decoder, tok, [tok.encode(text, bos=True) for text, _ in problems], args.strategy,
                                args.config, has_prm=model.reward_head is not None or args.prm is not None,
                                answer_fn=args.answer_fn, progress=bar)
        seconds = time.perf_counter() - t0
        bar.close()
        run_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process
    per_problem = []
    for (text, problem), r in zip(problems, results):
        per_problem.append({"prompt": text, "expected": None if problem is None else problem.answer,
                            "answer": r.answer, "correct": None if problem is None else r.answer == problem.answer,
                            "chosen": r.chosen, "candidates": [_candidate_json(c) for c in r.candidates]})
    graded = [p["correct"] for p in per_problem if p["correct"] is not None]
    return {
        **{k: per_problem[0][k] for k in ("prompt", "answer", "correct", "candidates")},
        "strategy": args.strategy, "n": args.config.n, "beam_width": args.config.beam_width,
        "aggregate": args.config.aggregate, "temperature": args.config.temperature, "seed": args.config.seed,
        "filter_duplicates": args.config.filter_duplicates, "select": args.config.select, "decoder": args.decoder, "model": str(args.model),
        "prm": None if args.prm is None else str(args.prm),
        "prm_format": None if args.prm is None else args.prm_format or "reward_head",
        **({"prm_forwards": decoder.scorer.stats["forwards"], "prm_tokens": decoder.scorer.stats["tokens"],
            "prm_kv_bytes": decoder.scorer.stats["peak_kv_bytes"]} if args.prm is not None else {}),
        "kv_budget": args.kv_budget,
        "device": str(args.device), "threads": run_threads if args.device.type == "cpu" else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "accuracy": sum(graded) / len(graded) if graded else None,
        "tokens_generated": stats["tokens_generated"], "seconds": seconds,
        "tokens_per_s": stats["tokens_generated"] / seconds if seconds > 0 else None,
        "kv_bytes": stats["peak_kv_bytes"], "kv_bytes_naive": stats["peak_kv_bytes_naive"],
        "problems": per_problem, "_results": results, "_problems": problems,
    }


def _print_legend(report: dict, out) -> None:
    """What the candidate lines show: settings, step scores, the chain score's aggregate, merged duplicates."""
    strategy, n, width = report["strategy"], report["n"], report["beam_width"]
    tree = strategy in ("beam_search", "dvts")
    print(f"{strategy}, n={n}" + (f", beam width {width}" if tree else "")
          + f", temperature {report['temperature']:g}, {report['decoder']} decoder on {report['device']}"
          + (f", {report['threads']} CPU thread{'s' * (report['threads'] != 1)}" if report["threads"] else ""),
          file=out)
    prm = report["prm"]
    scorer = ("the policy's reward head (--scorer head)" if prm is None else "the shipped verifier (--scorer verifier)"
              if Path(prm).resolve() == VERIFIER_MODEL.resolve() else f"the PRM {prm}")
    print(f"step scores from {scorer}", file=out)
    print(f"each candidate: its steps with their PRM step scores in parentheses; score = "
          f"{AGGREGATE_WORDS[report['aggregate']]} of its step scores (--aggregate {report['aggregate']})", file=out)
    if strategy == "beam_search" and report["filter_duplicates"]:
        print("beam search merges duplicates: each distinct finished chain is listed once, so a problem can show "
              f"fewer than n={n} candidates (--keep-duplicate-beams keeps them)", file=out)
    elif strategy == "dvts":
        print(f"dvts: one candidate per subtree, n / beam width = {n // width}", file=out)
    if tree:
        print("the answer: " + ("the best-scored chain's" if report["select"] == "argmax" else
                                "the one with the largest sum of chain scores") + f" (--select {report['select']})",
              file=out)


def _print_report(report: dict, out) -> None:
    problems, results = report.pop("_problems"), report.pop("_results")
    _print_legend(report, out)
    for i, ((text, problem), r) in enumerate(zip(problems, results)):
        _print_problem(i, len(problems), text, problem, r, out)
    if report["accuracy"] is not None:
        graded = sum(p["correct"] is not None for p in report["problems"])
        print(f"accuracy: {report['accuracy']:.3f} on {graded} problem(s)", file=out)
    print(f"{report['tokens_generated']} tokens in {report['seconds']:.2f} s = {report['tokens_per_s']:.0f} tokens/s",
          file=out)
    kv, naive = report["kv_bytes"], report["kv_bytes_naive"]
    if report["prm"] is not None:
        print(f"PRM ({report['prm_format']} format): {report['prm_forwards']} forwards (one per search step after "
              f"the prompts), {report['prm_tokens']} new-step tokens, KV peak {report['prm_kv_bytes'] / 1024:.1f} KiB "
              "(counted in the KV cache line)", file=out)
    if report["decoder"] == "tree":
        # pages round each branch's own tokens up: with nothing shared (a prompt under one page) paging holds more
        ratio = "" if not kv else f" ({naive / kv:.1f}x less)" if naive >= kv else f" ({kv / naive:.1f}x more)"
        print(f"KV cache: peak {kv / 1024:.1f} KiB with shared pages vs {naive / 1024:.1f} KiB for the naive "
              f"per-branch copies{ratio}", file=out)
    else:
        print(f"KV cache: peak {kv / 1024:.1f} KiB of dense per-branch copies (naive decoder)", file=out)


def _run_scaling(argv: list[str]) -> int:
    """benchmarks/scaling.py's main with its own options; its argument errors are one line, exit status 2."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scaling.py"
    if not script.is_file():
        raise UsageError(f"--scaling needs the repository checkout: {script} not found")
    scaling = runpy.run_path(str(script), run_name="o1kernels_scaling")
    try:
        scaling["main"](argv, prog="python -m o1kernels.decode --scaling")
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _rerun_with_passive_omp_wait(argv: list[str]) -> None:
    """Replace this process by the same command with OMP_WAIT_POLICY=PASSIVE, unless the variable is set.

    torch's OpenMP threads spin while they wait for each other by default; with a busy neighbour on a core the
    spinning thread holds the core the other one needs. Demo on our 2-core machine, 2 threads (tokens/s, 3 runs):
    default 52/62/40 and, with a busy-loop process beside it, 76/57/63; with PASSIVE 1370/1448/1834 and
    2534/2778/1290 (1 thread: 2243/1943/1505 and 1351/964/1227). OpenMP reads the policy when torch loads it,
    which importing o1kernels already did, hence a new process.
    """
    if "OMP_WAIT_POLICY" in os.environ or os.name != "posix" or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "o1kernels.decode", *argv],
              {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def main(argv=None) -> int:
    """Entry point of `python -m o1kernels.decode` (and of the console script); returns the exit status.

    Run as a program (argv None) on the CPU, it re-executes itself once with OMP_WAIT_POLICY=PASSIVE (see
    _rerun_with_passive_omp_wait); called with argv (tests) it runs in this process."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--scaling" in argv:
            if as_program:
                _rerun_with_passive_omp_wait(argv)
            return _run_scaling([a for a in argv if a != "--scaling"])
        args = build_parser().parse_args(argv)
        _check_args(args)
        if as_program and args.device.type == "cpu":
            _rerun_with_passive_omp_wait(argv)
        report = run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a fixed pool or the --kv-budget ran out of pages: one line, not a traceback
        from .paged import KVPoolExhausted

        if not isinstance(exc, KVPoolExhausted):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.json:
            report.pop("_problems")
            report.pop("_results")
            print(json.dumps(report))
        else:
            _print_report(report, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, and keep the exit-time flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
