"""Inference scaling on the tiny arithmetic task: accuracy vs test-time compute, and the compute-optimal frontier.

    python benchmarks/scaling.py [--ns 1,4,16,64,256] [--problems 200] [--quick] [--device cpu]
    python -m o1kernels.decode --scaling ...          (the same, from the package's CLI)

For each of `--problems` held-out task problems (a seeded stream disjoint from the training data):
- Sampling strategies: the largest N independent samples are drawn once per problem. For N' < N, the
  N/N' disjoint groups of N' samples are each scored as an independent run and averaged (the samples
  are i.i.d., so each group is an N'-sample run; averaging lowers the variance). From each group:
  majority (most frequent answer, no PRM), best-of-N (highest PRM score) and weighted best-of-N
  (largest sum of PRM scores per answer).
- beam_search and dvts are run separately for every N (beam width 4; N=1 uses width 1, which is plain
  sampling with one beam); beam search filters duplicate beams (SearchConfig.filter_duplicates). Their
  final answer is chosen among the finished chains (DVTS: one per subtree) in both of search-and-learn's
  ways: the best-scored chain (rows beam_search, dvts: its `pred_naive`) and the answer with the largest sum of
  scores (rows beam_search_weighted, dvts_weighted: its `pred_weighted`), from the same run.
PRM selection takes the best-scored candidate among those that reached an answer.
Greedy decoding (temperature 0, one sample) is a reference row.

Every row has a 95% bootstrap interval over problems (percentiles of 2000 resamples, fixed seed) and the
fate of the problems it got wrong:
  chose_wrong     a correct chain was among the candidates, the selection took a wrong one (PRM error);
  pruned_correct  (beam_search, dvts) no correct candidate, but the search had generated a correct
                  partial or finished chain and dropped it in favour of better-scored ones (PRM error);
  no_correct      the policy never produced a correct chain within the search (policy limit).
A strategy's accuracy "drops" from N to the next N when the paired bootstrap interval of the difference
(same resampled problems) lies below zero; the script lists every such drop.

Writes a new benchmarks/results/scaling_<cpu|gpu>_<timestamp>.json/.md and, when matplotlib is importable, two
plots next to it: accuracy vs N (.png) and accuracy vs generated tokens per problem with the best strategy per
budget marked (_frontier.png). --out DIR_OR_PREFIX writes elsewhere; --update-shipped overwrites the shipped
scaling_<tag>.* the README shows. A progress bar on stderr counts problems over all runs (--no-progress hides
it). Rows are written as they come (the files marked partial until the run ends). --scorers picks the step scorers:
the policy's reward head (head) and/or the separate verifier (verifier, through PRMScoredDecoder); --merge joins
runs made side by side. Full run with the head alone: about 12 minutes on 2 CPU threads; the verifier's rows cost
more (its own forward over every generated token, one batched pass per search step; see the README); --quick:
100 problems, N up to 16 (about 70 s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
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
from o1kernels.decode import DEFAULT_AGGREGATE, DEFAULT_VERIFIER_AGGREGATE, VERIFIER_MODEL  # noqa: E402
from o1kernels.decoder.prm import PRMScoredDecoder  # noqa: E402
from o1kernels.decoder.search import AGGREGATES, SearchConfig, choose, search  # noqa: E402
from o1kernels.decoder.task import CharTokenizer, check_steps, generate_problems  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "o1kernels" / "decoder" / "weights" / "tiny-arith"
PROBLEM_SEED = 777  # disjoint from the training streams (seeds 1-5, 104, 2000-2103) and the CLI's problems
SAMPLE_METHODS = {"majority": "majority", "best_of_n": "argmax", "weighted_best_of_n": "weighted"}
TREE_METHODS = {"": "argmax", "_weighted": "weighted"}  # row-name suffix -> selection among the finished chains
FATES = ("chose_wrong", "pruned_correct", "no_correct")
BOOTSTRAP = 2000
SCORERS = ("head", "verifier")
COLUMNS = ["scorer", "strategy", "n", "accuracy", "ci_low", "ci_high", "tokens_per_problem", "seconds", *FATES]
LEGEND = {"scorer": "what scores the steps: head (the reward head on the policy's hidden states) or verifier (the "
                    "separate verifier checkpoint, run beside the policy); - for rows without a PRM",
          "strategy": "search strategy (greedy: temperature 0, one sample; _weighted: the same run, final answer by "
                      "the largest sum of chain scores)",
          "n": "candidates / beams per problem",
          "accuracy": "fraction of problems whose chosen answer is right",
          "ci_low": "95% bootstrap interval of accuracy over problems, low end",
          "ci_high": "95% bootstrap interval, high end",
          "tokens_per_problem": "tokens generated per problem",
          "seconds": "wall time for all problems",
          "chose_wrong": "fraction of problems: a correct chain was among the candidates, a wrong one was chosen",
          "pruned_correct": "fraction: the search generated a correct chain and dropped it (beam_search, dvts)",
          "no_correct": "fraction: the policy produced no correct chain within the search"}


class TracingDecoder:
    """A decoder (TreeDecoder/NaiveDecoder interface) that records every step its branches generate: per prompt
    (in add_prompt order), the set of chains explored, as tuples of step texts, and which of them had finished."""

    def __init__(self, decoder, tokenizer):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.chain: dict[int, tuple[str, ...]] = {}
        self.prompt_of: dict[int, int] = {}
        self.explored: list[dict[tuple[str, ...], bool]] = []

    def add_prompt(self, ids):
        b = self.decoder.add_prompt(ids)
        self.chain[b], self.prompt_of[b] = (), len(self.explored)
        self.explored.append({})
        return b

    def fork(self, branch, n):
        kids = self.decoder.fork(branch, n)
        for k in kids:
            self.chain[k], self.prompt_of[k] = self.chain[branch], self.prompt_of[branch]
        return kids

    def release(self, branch):
        self.decoder.release(branch)
        del self.chain[branch], self.prompt_of[branch]

    def generate_step(self, branches, **kwargs):
        out = self.decoder.generate_step(branches, **kwargs)
        for b, toks, finished in zip(branches, out.new_tokens, out.finished):
            self.chain[b] += (self.tokenizer.decode(toks),)
            self.explored[self.prompt_of[b]][self.chain[b]] = bool(finished)
        return out

    def kv_bytes(self):
        return self.decoder.kv_bytes()

    def kv_bytes_naive(self):
        return self.decoder.kv_bytes_naive()


def dropped_correct(problem, explored: dict[tuple[str, ...], bool], candidates) -> bool:
    """True iff the search generated a correct chain (finished or not) that it neither expanded nor returned."""
    expanded = {chain[:-1] for chain in explored}
    returned = {tuple(c.steps) for c in candidates}
    return any(all(check_steps(problem, list(chain))) and chain not in returned and (finished or chain not in expanded)
               for chain, finished in explored.items())


def fate(problem, candidates, chosen: int | None, explored=None) -> str:
    """"correct" or one of FATES (see the module docstring) for one problem's search outcome."""
    if chosen is not None and candidates[chosen].answer == problem.answer:
        return "correct"
    if any(c.answer == problem.answer for c in candidates):
        return "chose_wrong"
    if explored is not None and dropped_correct(problem, explored, candidates):
        return "pruned_correct"
    return "no_correct"


def make_decoder(model, kind: str, backend: str, verifier=None):
    """The search decoder over `model`; with a verifier model, the policy's steps scored by it (PRMScoredDecoder)."""
    def one(m):
        return TreeDecoder(m, backend=backend) if kind == "tree" else NaiveDecoder(m)
    return one(model) if verifier is None else PRMScoredDecoder(one(model), verifier)


def run_batched(model, tok, problems, strategy, config, args, bar, trace: bool = False, verifier=None):
    """search() over problems in chunks of at most args.max_branches live branches, steps scored by the policy's
    reward head or by `verifier` -> (results, explored chains per problem or None, tokens, seconds)."""
    per_chunk = max(1, args.max_branches // config.n)
    results, explored, tokens, t0 = [], [], 0, time.perf_counter()
    bar.set_description(f"{strategy} N={config.n}")
    for start in range(0, len(problems), per_chunk):
        chunk = problems[start:start + per_chunk]
        decoder = make_decoder(model, args.decoder, args.backend, verifier)
        if trace:
            decoder = TracingDecoder(decoder, tok)
        res, stats = search(decoder, tok, [tok.encode(p.prompt, bos=True) for p in chunk], strategy, config,
                            has_prm=model.reward_head is not None or verifier is not None)
        results += res
        explored += decoder.explored if trace else []
        tokens += stats["tokens_generated"]
        bar.update(len(chunk))
    return results, explored if trace else None, tokens, time.perf_counter() - t0


def scorer_list(text: str) -> tuple[str, ...]:
    """argparse type: "head,verifier" -> ("head", "verifier"); each one of SCORERS, none twice."""
    names = tuple(text.split(","))
    if not names or any(n not in SCORERS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated names among {','.join(SCORERS)}, "
                                         f"got {text!r}")
    return names


def bootstrap_indices(problems: int, seed: int = 0) -> torch.Tensor:
    """[BOOTSTRAP, problems] resampled problem indices (the same for every row, so differences are paired)."""
    return torch.randint(problems, (BOOTSTRAP, problems), generator=torch.Generator().manual_seed(seed))


def interval(values: torch.Tensor) -> tuple[float, float]:
    """Central 95% interval of bootstrap statistics [BOOTSTRAP]."""
    lo, hi = torch.quantile(values.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return lo.item(), hi.item()


def label(row) -> str:
    """A row's strategy, with its scorer when it has one: "dvts (verifier)"."""
    scorer = row.get("scorer", "-")
    return row["strategy"] if scorer == "-" else f"{row['strategy']} ({scorer})"


def drops(rows, scores: dict, resample: torch.Tensor) -> list[str]:
    """'strategy (scorer) N -> N2: ...' for every strategy and scorer (scores keyed by label(row), n) whose accuracy
    falls from one N to the next beyond the paired bootstrap 95% interval of the difference."""
    out = []
    for name in dict.fromkeys(label(r) for r in rows):
        ns = sorted(r["n"] for r in rows if label(r) == name)
        for a, b in zip(ns, ns[1:]):
            diff = scores[name, b][resample].mean(1) - scores[name, a][resample].mean(1)
            lo, hi = interval(diff)
            if hi < 0:
                out.append(f"{name} N={a} -> {b}: {diff.mean():+.3f} (95% interval [{lo:+.3f}, {hi:+.3f}])")
    return out


def main(argv=None, prog=None) -> None:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--problems", type=positive_int, default=None, help="held-out problems (default 200)")
    parser.add_argument("--ns", type=positive_ints, default=None, help="comma-separated N values (default 1,4,16,64,256)")
    parser.add_argument("--quick", action="store_true",
                        help="100 problems, N 1,4,16 unless given (under 3 minutes on 2 CPU threads)")
    parser.add_argument("--beam-width", type=positive_int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--scorers", type=scorer_list, default=SCORERS,
                        help="comma-separated step scorers to run, head and/or verifier (default head,verifier)")
    parser.add_argument("--verifier", type=Path, default=VERIFIER_MODEL,
                        help="the verifier checkpoint (default: the shipped one)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default=None,
                        help=f"step-score aggregation (default {DEFAULT_AGGREGATE} with the head, "
                             f"{DEFAULT_VERIFIER_AGGREGATE} with the verifier; see o1kernels.decode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-branches", type=positive_int, default=512,
                        help="live branches per decoder (batching)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="kernel backend of the tree decoder")
    parser.add_argument("--decoder", choices=("tree", "naive"), default="tree",
                        help="tree (shared paged KV, our kernels) or naive (dense KV per branch); same results")
    parser.add_argument("--strategies", default="beam_search,dvts", help="tree strategies to run per N")
    parser.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=True,
                        help="run the sampling strategies (majority, best-of-N, weighted best-of-N; default: yes)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: the physical cores available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--merge", default=None, metavar="A.json,B.json",
                        help="run nothing: merge the rows of earlier runs' JSON files (the same problems; e.g. one "
                             "--scorers head run and one --scorers verifier run, run side by side) into one table "
                             "and plots, drops tested again across all rows")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.merge is not None:
        return merge([Path(p) for p in args.merge.split(",")], output_prefix(parser, args, "scaling", torch.device(
            args.device)), parser)
    wall, cpu = time.perf_counter(), time.process_time()
    n_problems = args.problems or (100 if args.quick else 200)
    ns = sorted(args.ns or ((1, 4, 16) if args.quick else (1, 4, 16, 64, 256)))
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or physical_cores_available())
    prefix = output_prefix(parser, args, "scaling", device)
    model = load_checkpoint(args.model, device=device, dtype=torch.float32)
    verifier = (load_checkpoint(args.verifier, device=device, dtype=torch.float32) if "verifier" in args.scorers
                else None)
    aggregates = {"head": args.aggregate or DEFAULT_AGGREGATE, "verifier": args.aggregate or DEFAULT_VERIFIER_AGGREGATE}
    tok = CharTokenizer()
    problems = generate_problems(n_problems, PROBLEM_SEED)
    base = dict(max_steps=8, max_step_tokens=12, temperature=args.temperature, seed=args.seed)
    resample = bootstrap_indices(len(problems))
    rows, scores = [], {}  # scores[strategy, n]: per-problem accuracy [problems] float64
    strategies = [s for s in args.strategies.split(",") if s]
    runs = 1 + len(args.scorers) * (args.sampling + len(strategies) * len(ns))
    bar = tqdm(total=len(problems) * runs, unit="problem", file=sys.stderr, disable=args.no_progress,
               dynamic_ncols=True)
    print(table_header(COLUMNS), flush=True)

    def add(scorer, strategy, n, per_problem: torch.Tensor, fates: Counter, tokens, seconds):
        lo, hi = interval(per_problem[resample].mean(1))
        total = sum(fates.values())
        rows.append({"scorer": scorer, "strategy": strategy, "n": n, "accuracy": per_problem.mean().item(),
                     "ci_low": lo, "ci_high": hi, "tokens_per_problem": tokens / len(problems), "seconds": seconds,
                     **{f: fates[f] / total for f in FATES}, "per_problem": per_problem.tolist()})
        scores[label(rows[-1]), n] = per_problem
        bar.write(table_row(COLUMNS, rows[-1]), file=sys.stdout)
        write_results("scaling", device, COLUMNS, rows, [], prefix=prefix, legend=LEGEND, complete=False)

    def graded(groups) -> tuple[torch.Tensor, Counter]:
        """groups: per group, per problem (candidates, chosen[, explored]) -> (accuracy per problem, fates)."""
        fates = [[fate(p, *outcome) for p, outcome in zip(problems, group)] for group in groups]
        right = torch.tensor([[f == "correct" for f in group] for group in fates], dtype=torch.float64)
        return right.mean(0), Counter(f for group in fates for f in group)

    res, _, tokens, sec = run_batched(model, tok, problems, "majority",
                                      SearchConfig(n=1, **{**base, "temperature": 0.0}), args, bar)
    add("-", "greedy", 1, *graded([[(r.candidates, r.chosen) for r in res]]), tokens, sec)

    n_max = ns[-1]
    for scorer in args.scorers:
        by = {"verifier": verifier if scorer == "verifier" else None}
        cfg = dict(base, aggregate=aggregates[scorer])
        res, _, tokens, sec = (run_batched(model, tok, problems, "best_of_n", SearchConfig(n=n_max, **cfg), args, bar,
                                           **by) if args.sampling else ([], None, 0, 0.0))
        for n in ns if args.sampling else ():
            for strategy, method in SAMPLE_METHODS.items():
                if strategy == "majority" and scorer != args.scorers[0]:
                    continue  # no PRM: the same samples give the same rows
                groups = []
                for g in range(n_max // n):
                    cands = [r.candidates[g * n:(g + 1) * n] for r in res]
                    groups.append([(c, choose(c, method)) for c in cands])
                add("-" if strategy == "majority" else scorer, strategy, n, *graded(groups), tokens * n / n_max,
                    sec * n / n_max)

        for strategy in strategies:
            for n in ns:
                width = min(args.beam_width, n)
                res, explored, tokens, sec = run_batched(model, tok, problems, strategy,
                                                         SearchConfig(n=n, beam_width=width, **cfg), args, bar,
                                                         trace=True, **by)
                for suffix, method in TREE_METHODS.items():
                    outcomes = [(r.candidates, choose(r.candidates, method), e) for r, e in zip(res, explored)]
                    add(scorer, strategy + suffix, n, *graded([outcomes]), tokens, sec)

    dropped = drops(rows, scores, resample)
    scored = ", ".join(f"{s} ({args.model.name if s == 'head' else args.verifier.name}) aggregate {aggregates[s]}"
                       for s in args.scorers)
    notes = [f"model {args.model.name}, scorers: {scored}; {len(problems)} problems (seed {PROBLEM_SEED}), temperature "
             f"{args.temperature}, beam width {args.beam_width}, sampling seed {args.seed}, "
             f"{args.decoder} decoder, beam search filters duplicate beams; the same seed draws the same samples "
             "for every scorer",
             "sampling strategies: N' < N scored on the N/N' disjoint groups of the N samples and averaged; "
             "tokens_per_problem/seconds of those rows are the N-sample run's, scaled by N'/N",
             f"ci_low/ci_high: 95% bootstrap interval over problems ({BOOTSTRAP} resamples); chose_wrong/pruned_correct/"
             "no_correct: fractions of the problems (see benchmarks/scaling.py)",
             "drops beyond the paired 95% interval: " + ("; ".join(dropped) if dropped else "none")]
    took = f"took {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU"
    if device.type == "cpu":
        took += f", {torch.get_num_threads()} torch CPU threads"
    notes.append(took)
    bar.close()
    json_path, md_path = write_results("scaling", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND)
    print_legend(LEGEND)
    print(notes[-2])
    print(took)
    print(f"wrote {json_path} and {md_path}")
    plot(rows, ns, Path(f"{prefix}.png"), Path(f"{prefix}_frontier.png"))


def merge(paths: list[Path], prefix: Path, parser) -> None:
    """Rows of earlier runs' JSON files (the first file's row wins for a strategy, scorer and N they share) ->
    one table and plots at `prefix`, the drops computed again across all of them (see --merge)."""
    rows, notes, seen = [], [], set()
    for path in paths:
        try:
            data = json.loads(path.read_text())
            runs = [r for r in data["rows"] if "per_problem" in r]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--merge: {path}: {exc}")
        if not runs or len({len(r["per_problem"]) for r in rows + runs}) != 1:
            parser.error(f"--merge: {path}: no rows with per-problem results, or not the same problems as the others")
        rows += [r for r in runs if (r.get("scorer", "-"), r["strategy"], r["n"]) not in seen]
        seen |= {(r.get("scorer", "-"), r["strategy"], r["n"]) for r in runs}
        notes += [f"{path.name}: {n}" for n in data["meta"]["notes"] if not n.startswith("drops beyond")]
    scores = {(label(r), r["n"]): torch.tensor(r["per_problem"], dtype=torch.float64) for r in rows}
    dropped = drops(rows, scores, bootstrap_indices(len(rows[0]["per_problem"])))
    notes.append("drops beyond the paired 95% interval: " + ("; ".join(dropped) if dropped else "none"))
    json_path, md_path = write_results("scaling", torch.device("cpu"), COLUMNS, rows, notes, prefix=prefix,
                                       legend=LEGEND)
    print(notes[-1])
    print(f"wrote {json_path} and {md_path}")
    plot(rows, sorted({r["n"] for r in rows}), Path(f"{prefix}.png"), Path(f"{prefix}_frontier.png"))


def frontier(rows) -> list[dict]:
    """The compute-optimal frontier: the rows no other row beats on both budget and accuracy, i.e. the most accurate
    strategy at each budget of generated tokens per problem (rows sorted by tokens, each more accurate than every
    cheaper one; equal budgets: the more accurate)."""
    out = []
    for r in sorted(rows, key=lambda r: (r["tokens_per_problem"], -r["accuracy"])):
        if not out or r["accuracy"] > out[-1]["accuracy"]:
            out.append(r)
    return out


def plot(rows, ns, path: Path, frontier_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "greedy"]
    colors = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(strategies)}
    lines = {"-": "--", "head": ":", "verifier": "-"}  # majority dashed, the head's rows dotted, the verifier's solid
    greedy = [r for r in rows if r["strategy"] == "greedy"]
    for x_key, out in (("n", path), ("tokens_per_problem", frontier_path)):
        fig, ax = plt.subplots(figsize=(9, 5.6))
        for name in dict.fromkeys(label(r) for r in rows if r["strategy"] != "greedy"):
            mine = [r for r in rows if label(r) == name]
            pts = sorted((r[x_key], r["accuracy"], r["ci_low"], r["ci_high"]) for r in mine)
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            s, scorer = mine[0]["strategy"], mine[0].get("scorer", "-")
            ax.plot(x, y, marker="o", markersize=4, color=colors[s], linestyle=lines[scorer],
                    linewidth=2 if scorer != "head" else 1.2, label="majority (no PRM)" if s == "majority" else name)
            if scorer != "head":
                ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=colors[s], alpha=0.08)
        if x_key == "n":
            if greedy:
                ax.axhline(greedy[0]["accuracy"], color="gray", linestyle=":", label="greedy (1 sample)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
            ax.set_xlabel("N (candidates / beams per problem)")
            ax.set_title("Tiny arithmetic task: accuracy vs N (dotted: reward head, solid: verifier; shaded: 95% "
                         "bootstrap intervals)", fontsize=9)
        else:
            best = frontier(rows)
            ax.plot([r[x_key] for r in best], [r["accuracy"] for r in best], color="black", linewidth=1, zorder=3,
                    alpha=0.6, label="compute-optimal frontier")
            ax.scatter([r[x_key] for r in best], [r["accuracy"] for r in best], marker="*", s=220, color="gold",
                       edgecolor="black", zorder=4)
            for r in best:
                ax.annotate(label(r), (r[x_key], r["accuracy"]), textcoords="offset points", xytext=(6, -12),
                            fontsize=7)
            if greedy:
                ax.scatter([greedy[0][x_key]], [greedy[0]["accuracy"]], marker="s", color="gray", label="greedy",
                           zorder=3)
            ax.set_xscale("log")
            ax.set_xlabel("generated tokens per problem (log scale)")
            ax.set_title("Accuracy vs generated tokens; stars: best strategy per budget")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right", ncol=2)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
