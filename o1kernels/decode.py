"""Command line for the reference decoder: PRM-guided search on the shipped tiny arithmetic model.

    python -m o1kernels.decode                                   # 3 task problems, defaults below
    python -m o1kernels.decode --strategy beam_search --n 16 --beam-width 4 --json
    python -m o1kernels.decode --prompt "Q:17+25-9+38"

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
    tok = CharTokenizer()
    if model.config.vocab_size < len(tok):
        raise UsageError(f"--model {args.model}: vocab_size {model.config.vocab_size} is smaller than the task "
                         f"vocabulary ({len(tok)} tokens); the CLI needs a model trained on the arithmetic task")
    if args.strategy != "majority" and model.reward_head is None:
        raise UsageError(f"--strategy {args.strategy} needs a PRM, but {args.model} has no reward head")
    if args.decoder == "tree":
        from ._backend import resolve_backend

        try:
            resolve_backend(args.backend, device, supported=("torch", "triton", "cpu", "cuda"))
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"--backend: {exc}") from None
        decoder = TreeDecoder(model, backend=args.backend)
    else:
        decoder = NaiveDecoder(model)
    return model, tok, decoder


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

    model, tok, decoder = _load(args)
    problems = _problems(args, tok)
    bar = tqdm(total=args.config.max_steps, desc=f"{args.strategy} steps", unit="step", file=sys.stderr,
               disable=args.no_progress, leave=False)
    t0 = time.perf_counter()
    results, stats = search(decoder, tok, [tok.encode(text, bos=True) for text, _ in problems], args.strategy,
                            args.config, has_prm=model.reward_head is not None, progress=bar)
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
        "decoder": args.decoder, "model": str(args.model),
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
