"""Command line for the reference decoder: PRM-guided search on the shipped tiny arithmetic model.

    python -m o1kernels.decode                                   # 3 task problems, defaults below
    python -m o1kernels.decode --strategy beam_search --n 16 --beam-width 4 --json
    python -m o1kernels.decode --prompt "Q:17+25-9+38"
    python -m o1kernels.decode --model DIR --step-separator '\\n\\n' --prm PRM_DIR --prompt "..."   # any HF model

Other models: --model is any Llama/Qwen2 HF checkpoint directory; its tokenizer files (or --tokenizer DIR) give the
Hugging Face tokenizer, --step-separator (one token; backslash escapes) or --step-token-id the token that ends a step,
--answer-regex how to read an answer. The PRM is the policy's reward head, or a separate checkpoint --prm DIR that
shares the policy's tokenizer: with its own reward head, or a plain causal LM scored on two of its LM-head rows
(--prm-token-pair "+,-", Math-Shepherd style).

Prints, per problem, every candidate's steps with their PRM step scores, the chosen answer and whether
it is correct; then tokens/s and the KV-cache bytes used versus what the naive decoder would hold.
--json prints one JSON object instead: the first problem's prompt/answer/correct/candidates at the top
level, every problem under "problems", plus the run's strategy, n, tokens_generated, tokens_per_s,
kv_bytes (peak of the shared paged cache) and kv_bytes_naive (peak of one dense KV copy per branch).
The accuracy-vs-compute demo is benchmarks/scaling.py (--scaling runs it from a repository checkout).
Bad arguments end with a one-line error on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "decoder" / "weights" / "tiny-arith"
DEFAULT_STEP_SEPARATOR = "\\n\\n"  # search-and-learn's step delimiter, as typed on the command line
DTYPES = ("float32", "float16", "bfloat16")
PROBLEM_SEED = 1234  # the CLI's problems: disjoint from the training streams of decoder/train.py


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error over two lines; we want one line
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from .decoder.search import AGGREGATES, STRATEGIES

    p = _Parser(prog="python -m o1kernels.decode",
                                description="PRM-guided test-time search with the o1kernels reference decoder.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="HF checkpoint directory with the task's character vocabulary (default: shipped tiny model)")
    p.add_argument("--strategy", default="beam_search", help=f"one of {', '.join(STRATEGIES)} (default beam_search)")
    p.add_argument("--n", type=int, default=8, help="candidates / beams per problem (default 8)")
    p.add_argument("--beam-width", type=int, default=4, help="beam_search/dvts: children per kept beam (default 4)")
    p.add_argument("--max-steps", type=int, default=8, help="steps per candidate at most (default 8)")
    p.add_argument("--max-step-tokens", type=int, default=12, help="tokens per step at most (default 12)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--aggregate", default="prod",
                   help=f"step-score aggregation: {', '.join(AGGREGATES)} (default prod: best for the shipped PRM on "
                        "held-out problems; search-and-learn's default is last)")
    p.add_argument("--keep-duplicate-beams", action="store_true",
                   help="beam_search: keep beams whose text repeats a better one (default: filter them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator and of the problems")
    p.add_argument("--decoder", choices=("tree", "naive"), default="tree",
                   help="tree: shared paged KV on our kernels; naive: dense KV copy per branch (baseline)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, torch, triton, cuda, cpu")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help=f"model dtype: {', '.join(DTYPES)}")
    p.add_argument("--problems", type=int, default=None, help="task problems to solve (default 3, 1 with --json)")
    p.add_argument("--prompt", default=None, help='solve this prompt instead, e.g. "Q:17+25-9+38"')
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="Hugging Face tokenizer directory (default: --model's, when it has tokenizer files; else the "
                        "task's character vocabulary)")
    p.add_argument("--step-separator", default=None,
                   help=f"with a Hugging Face tokenizer: the one-token text that ends a step, backslash escapes "
                        f"allowed (default {DEFAULT_STEP_SEPARATOR!r})")
    p.add_argument("--step-token-id", type=int, default=None, help="the step separator as a token id instead")
    p.add_argument("--answer-regex", default=None,
                   help="an answer is the first group (or the whole) of the regex's last match in a candidate's text "
                        "(default: the task's 'A:<number>')")
    p.add_argument("--prm", type=Path, default=None,
                   help="separate PRM checkpoint directory (the policy's tokenizer; default: the policy's reward head)")
    p.add_argument("--prm-token-pair", default=None,
                   help='score with two rows of the --prm model\'s LM head: "POSITIVE,NEGATIVE" tokens (ids or '
                        "one-token strings), reward = P(positive) of the pair")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--scaling", action="store_true",
                   help="run the accuracy-vs-N demo benchmarks/scaling.py (repository checkout only)")
    return p


def _check_args(args) -> None:
    from .decoder.search import SearchConfig, check_strategy

    try:
        config = SearchConfig(n=args.n, beam_width=args.beam_width, max_steps=args.max_steps,
                              max_step_tokens=args.max_step_tokens, temperature=args.temperature, top_p=args.top_p,
                              aggregate=args.aggregate, seed=args.seed,
                              filter_duplicates=not args.keep_duplicate_beams)
        check_strategy(args.strategy, config, has_prm=True)
    except ValueError as exc:
        raise UsageError(str(exc).replace("beam_width", "--beam-width").replace("n=", "--n=")) from None
    if args.problems is not None and args.problems < 1:
        raise UsageError(f"--problems must be >= 1, got {args.problems}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    args.config = config


def _load(args):
    import torch

    from .decoder import NaiveDecoder, TreeDecoder, load_checkpoint
    from .decoder.task import CharTokenizer

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        model = load_checkpoint(args.model, device=device, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    tok = _tokenizer(args, model)
    if isinstance(tok, CharTokenizer) and model.config.vocab_size < len(tok):
        raise UsageError(f"--model {args.model}: vocab_size {model.config.vocab_size} is smaller than the task "
                         f"vocabulary ({len(tok)} tokens); the CLI needs a model trained on the arithmetic task, or "
                         "a Hugging Face tokenizer (--tokenizer)")
    prm = _load_prm(args, model, tok)
    if args.strategy != "majority" and model.reward_head is None and prm is None:
        raise UsageError(f"--strategy {args.strategy} needs a PRM, but {args.model} has no reward head (give --prm)")
    if args.decoder == "tree":
        from ._backend import resolve_backend

        try:
            resolve_backend(args.backend, device, supported=("torch", "triton", "cpu", "cuda"))
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"--backend: {exc}") from None
        decoder = TreeDecoder(model, backend=args.backend)
    else:
        decoder = NaiveDecoder(model)
    if prm is not None:
        from .decoder.prm import PRMScoredDecoder

        prm_model, pair = prm
        prm_decoder = (TreeDecoder(prm_model, backend=args.backend) if args.decoder == "tree"
                       else NaiveDecoder(prm_model))
        decoder = PRMScoredDecoder(decoder, prm_decoder, token_pair=pair)
    return model, tok, decoder


def _tokenizer(args, model):
    """The task's CharTokenizer, or an HFTokenizer from --tokenizer / the --model directory."""
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
        tok.eos_id = model.config.eos_token_id
    if len(tok) > model.config.vocab_size:
        raise UsageError(f"tokenizer {source} has {len(tok)} tokens, more than the model's vocab_size "
                         f"{model.config.vocab_size}")
    return tok


def _unescape(text: str) -> str:
    r"""Command-line text with backslash escapes decoded ('

' -> two newlines); other characters kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _load_prm(args, model, tok):
    """(PRM Transformer, token pair or None) from --prm / --prm-token-pair, or None without --prm."""
    import torch

    from .decoder import load_checkpoint

    if args.prm is None:
        if args.prm_token_pair is not None:
            raise UsageError("--prm-token-pair needs --prm")
        return None
    try:
        prm = load_checkpoint(args.prm, device=model.device, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--prm {args.prm}: {exc}") from None
    if prm.config.vocab_size < model.config.vocab_size:
        raise UsageError(f"--prm {args.prm}: vocab_size {prm.config.vocab_size} is smaller than the policy's "
                         f"{model.config.vocab_size}; the PRM must share the policy's tokenizer")
    if args.prm_token_pair is None:
        if prm.reward_head is None:
            raise UsageError(f"--prm {args.prm} has no reward head: give --prm-token-pair POSITIVE,NEGATIVE to score "
                             "with two rows of its LM head")
        return prm, None
    parts = args.prm_token_pair.split(",")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"--prm-token-pair must be two tokens separated by a comma, got {args.prm_token_pair!r}")
    return prm, tuple(_token(tok, _unescape(p), "--prm-token-pair", prm.config.vocab_size) for p in parts)


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


def _problems(args, tok):
    """[(prompt text, Problem or None)]."""
    from .decoder.task import generate_problems, parse_problem

    if args.prompt is not None:
        problem = parse_problem(args.prompt)
        text = problem.prompt if problem else args.prompt if args.prompt.endswith("\n") else args.prompt + "\n"
        try:
            tok.encode(text)
        except ValueError as exc:
            raise UsageError(f"--prompt: {exc}") from None
        return [(text, problem)]
    count = args.problems or (1 if args.json else 3)
    return [(p.prompt, p) for p in generate_problems(count, PROBLEM_SEED + args.seed)]


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
    from tqdm import tqdm

    from .decoder.search import search

    answer_fn = _answer_fn(args)
    model, tok, decoder = _load(args)
    problems = _problems(args, tok)
    bar = tqdm(total=args.config.max_steps, desc=f"{args.strategy} steps", unit="step", file=sys.stderr,
               disable=args.no_progress, leave=False)
    t0 = time.perf_counter()
    results, stats = search(decoder, tok, [tok.encode(text, bos=True) for text, _ in problems], args.strategy,
                            args.config, has_prm=model.reward_head is not None or args.prm is not None,
                            answer_fn=answer_fn, progress=bar)
    seconds = time.perf_counter() - t0
    bar.close()
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
        "decoder": args.decoder, "model": str(args.model), "prm": None if args.prm is None else str(args.prm),
        "accuracy": sum(graded) / len(graded) if graded else None,
        "tokens_generated": stats["tokens_generated"], "seconds": seconds,
        "tokens_per_s": stats["tokens_generated"] / seconds if seconds > 0 else None,
        "kv_bytes": stats["peak_kv_bytes"], "kv_bytes_naive": stats["peak_kv_bytes_naive"],
        "problems": per_problem, "_results": results, "_problems": problems,
    }


def _print_report(report: dict, out) -> None:
    problems, results = report.pop("_problems"), report.pop("_results")
    for i, ((text, problem), r) in enumerate(zip(problems, results)):
        _print_problem(i, len(problems), text, problem, r, out)
    if report["accuracy"] is not None:
        graded = sum(p["correct"] is not None for p in report["problems"])
        print(f"accuracy: {report['accuracy']:.3f} on {graded} problem(s)", file=out)
    print(f"strategy {report['strategy']}, n={report['n']}"
          + (f", beam width {report['beam_width']}" if report["strategy"] in ("beam_search", "dvts") else "")
          + f"; {report['tokens_generated']} tokens in {report['seconds']:.2f} s = {report['tokens_per_s']:.0f} tokens/s",
          file=out)
    kv, naive = report["kv_bytes"], report["kv_bytes_naive"]
    ratio = f" ({naive / kv:.1f}x less)" if kv else ""
    print(f"KV cache: peak {kv / 1024:.1f} KiB with shared pages vs {naive / 1024:.1f} KiB for the naive "
          f"per-branch copies{ratio}", file=out)


def _run_scaling(argv) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scaling.py"
    if not script.is_file():
        raise UsageError(f"--scaling needs the repository checkout: {script} not found")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv=None) -> int:
    """Entry point of `python -m o1kernels.decode` (and of the console script); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.scaling:
            return _run_scaling([a for a in argv if a != "--scaling"])
        _check_args(args)
        report = run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        report.pop("_problems")
        report.pop("_results")
        print(json.dumps(report))
    else:
        _print_report(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
