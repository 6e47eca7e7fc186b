"""Inference scaling on the tiny arithmetic task: accuracy vs number of candidates N.

    python benchmarks/scaling.py [--problems 200] [--ns 1,4,16,64] [--temperature 1.0] [--device cpu]

For each of `--problems` held-out task problems (a seeded stream disjoint from the training data):
- Sampling strategies: the largest N independent samples are drawn once per problem. For N' < N, the
  N/N' disjoint groups of N' samples are each scored as an independent run and averaged (the samples
  are i.i.d., so each group is an N'-sample run; averaging lowers the variance). From each group:
  majority (most frequent answer, no PRM), best-of-N (highest PRM score) and weighted best-of-N
  (largest sum of PRM scores per answer).
- beam_search and dvts are run separately for every N (beam width 4; N=1 uses width 1, which is plain
  sampling with one beam); beam search filters duplicate beams (SearchConfig.filter_duplicates).
PRM selection (best-of-N, beam search, DVTS) takes the best-scored candidate among those that reached an
answer.
Greedy decoding (temperature 0, one sample) is reported as a reference row.
Writes a new benchmarks/results/scaling_<cpu|gpu>_<timestamp>.json/.md and, when matplotlib is importable, .png
(--out DIR_OR_PREFIX elsewhere; --update-shipped overwrites the shipped scaling_<tag>.* the README shows).
A progress bar on stderr counts problems solved over all runs (--no-progress hides it).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before torch loads OpenMP (see o1kernels/decode.py); not when imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (ArgumentParser, add_output_args, output_prefix, positive_int,  # noqa: E402
                               positive_ints, print_legend, table_header, table_row, write_results)
from o1kernels._cli import physical_cores_available  # noqa: E402
from o1kernels.decoder import NaiveDecoder, TreeDecoder, load_checkpoint  # noqa: E402
from o1kernels.decoder.search import SearchConfig, choose, search  # noqa: E402
from o1kernels.decoder.task import CharTokenizer, generate_problems  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "o1kernels" / "decoder" / "weights" / "tiny-arith"
PROBLEM_SEED = 777  # disjoint from the training streams (seeds 1-3) and the CLI's problems
SAMPLE_METHODS = {"majority": "majority", "best_of_n": "argmax", "weighted_best_of_n": "weighted"}
COLUMNS = ["strategy", "n", "accuracy", "tokens_per_problem", "seconds"]
LEGEND = {"strategy": "search strategy (greedy: temperature 0, one sample)",
          "n": "candidates / beams per problem",
          "accuracy": "fraction of problems whose chosen answer is right",
          "tokens_per_problem": "tokens generated per problem",
          "seconds": "wall time for all problems"}


def make_decoder(model, kind: str, backend: str):
    return TreeDecoder(model, backend=backend) if kind == "tree" else NaiveDecoder(model)


def run_batched(model, tok, problems, strategy, config, args, bar):
    """search() over problems in chunks of at most args.max_branches live branches -> (results, tokens, seconds)."""
    per_chunk = max(1, args.max_branches // config.n)
    results, tokens, t0 = [], 0, time.perf_counter()
    bar.set_description(f"{strategy} N={config.n}")
    for start in range(0, len(problems), per_chunk):
        chunk = problems[start:start + per_chunk]
        res, stats = search(make_decoder(model, args.decoder, args.backend), tok,
                            [tok.encode(p.prompt, bos=True) for p in chunk], strategy, config,
                            has_prm=model.reward_head is not None)
        results += res
        tokens += stats["tokens_generated"]
        bar.update(len(chunk))
    return results, tokens, time.perf_counter() - t0


def accuracy(problems, answers) -> float:
    return sum(a == p.answer for p, a in zip(problems, answers)) / len(problems)


def main(argv=None, prog=None) -> None:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--problems", type=positive_int, default=200)
    parser.add_argument("--ns", type=positive_ints, default="1,4,16,64", help="comma-separated N values")
    parser.add_argument("--beam-width", type=positive_int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--aggregate", default="prod", help="step-score aggregation (see o1kernels.decode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-branches", type=positive_int, default=512, help="live branches per decoder (batching)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="kernel backend of the tree decoder")
    parser.add_argument("--decoder", choices=("tree", "naive"), default="tree",
                        help="tree (shared paged KV, our kernels) or naive (dense KV per branch); same results")
    parser.add_argument("--strategies", default="beam_search,dvts", help="tree strategies to run per N")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: the physical cores available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_output_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or physical_cores_available())
    prefix = output_prefix(parser, args, "scaling", device)
    ns = sorted(args.ns)
    model = load_checkpoint(args.model, device=device, dtype=torch.float32)
    tok = CharTokenizer()
    problems = generate_problems(args.problems, PROBLEM_SEED)
    base = dict(max_steps=8, max_step_tokens=12, temperature=args.temperature, aggregate=args.aggregate,
                seed=args.seed)
    rows = []
    strategies = [s for s in args.strategies.split(",") if s]
    bar = tqdm(total=len(problems) * (2 + len(strategies) * len(ns)), unit="problem", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    print(table_header(COLUMNS), flush=True)

    def add(strategy, n, acc, tokens, seconds):
        rows.append({"strategy": strategy, "n": n, "accuracy": acc, "tokens_per_problem": tokens / len(problems),
                     "seconds": seconds})
        bar.write(table_row(COLUMNS, rows[-1]), file=sys.stdout)

    res, tokens, sec = run_batched(model, tok, problems, "majority", SearchConfig(n=1, **{**base, "temperature": 0.0}),
                                   args, bar)
    add("greedy", 1, accuracy(problems, [r.answer for r in res]), tokens, sec)

    n_max = ns[-1]
    res, tokens, sec = run_batched(model, tok, problems, "best_of_n", SearchConfig(n=n_max, **base),
                                   args, bar)
    for n in ns:
        for strategy, method in SAMPLE_METHODS.items():
            groups = [[r.candidates[g * n:(g + 1) * n] for r in res] for g in range(n_max // n)]
            accs = [accuracy(problems, [None if (i := choose(c, method)) is None else c[i].answer for c in group])
                    for group in groups]
            add(strategy, n, sum(accs) / len(accs), tokens * n / n_max, sec * n / n_max)

    for strategy in strategies:
        for n in ns:
            width = min(args.beam_width, n)
            res, tokens, sec = run_batched(model, tok, problems, strategy,
                                           SearchConfig(n=n, beam_width=width, **base), args, bar)
            add(strategy, n, accuracy(problems, [r.answer for r in res]), tokens, sec)
    bar.close()

    notes = [f"model {args.model.name}, {len(problems)} problems (seed {PROBLEM_SEED}), temperature "
             f"{args.temperature}, aggregate {args.aggregate}, beam width {args.beam_width}, sampling seed {args.seed}, "
             f"{args.decoder} decoder, beam search filters duplicate beams",
             "sampling strategies: N' < N scored on the N/N' disjoint groups of the N samples and averaged; "
             "tokens_per_problem/seconds of those rows are the N-sample run's, scaled by N'/N"]
    if device.type == "cpu":
        notes.append(f"torch CPU threads: {torch.get_num_threads()}")
    json_path, md_path = write_results("scaling", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND)
    print_legend(LEGEND)
    print(f"wrote {json_path} and {md_path}")
    plot(rows, ns, Path(f"{prefix}.png"))


def plot(rows, ns, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "greedy"):
        pts = [(r["n"], r["accuracy"]) for r in rows if r["strategy"] == strategy]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
    greedy = [r["accuracy"] for r in rows if r["strategy"] == "greedy"]
    if greedy:
        ax.axhline(greedy[0], color="gray", linestyle="--", label="greedy (1 sample)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (candidates / beams per problem)")
    ax.set_ylabel("accuracy")
    ax.set_title("Tiny arithmetic task: accuracy vs test-time compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
