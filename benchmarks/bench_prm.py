"""Benchmark incremental, batched PRM scoring (o1kernels.decoder.prm.PRMScorer) against re-encoding every step.

A search with a separate PRM, simulated on the PRM side (the policy's steps are random tokens: what is measured is
the PRM's work). Per search step every active branch gets a new step of 32-96 tokens (uneven); the PRM scores them:
  ours        PRMScorer.score: the new steps of all branches in ONE forward over the PRM's paged branch tree (the
              prompt prefilled once per problem, forks share pages).
  reencode    what search-and-learn does: the PRM re-encodes prompt + every step so far of each branch, in padded
              batches of --prm-batch-size (4, its default) branches, one full causal forward per batch (torch SDPA,
              the backbone and the head only: no LM-head logits).
Both run in the same search (same model, same tree: the beams kept are chosen by our scores, and the re-encoded
scores are checked against them: max_diff). Strategies: beam_search (N beams, beam width M = 4: the top N / M kept,
each forked back to M children) and best_of_n (N independent chains).

PRM: a random Qwen2-style Transformer (--hidden 128, --layers 2 by default: re-encoding at N = 64, depth 20 must
finish on a 2-core CPU; heads of dim 64, at most 2 KV heads) with a Qwen2.5-Math-PRM head
(Linear(H, H) -> ReLU -> Linear(H, 2)), float32 on the CPU, backend auto.

  python benchmarks/bench_prm.py [--quick] [--cases N:depth:prompt,...] [--threads N] [--update-shipped]

Columns: prm tokens processed by each provider (reencode counts real tokens, not padding) and their ratio, seconds
of PRM work per search and their ratio.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (ArgumentParser, add_output_args, output_prefix, positive_int, table_header,  # noqa: E402
                    table_row, write_results)

from o1kernels.decoder.model import ModelConfig, Transformer  # noqa: E402
from o1kernels.decoder.prm import PRMScorer  # noqa: E402

COLUMNS = ["strategy", "N", "depth", "prompt", "ours_tokens", "reencode_tokens", "x_tokens", "ours_s", "reencode_s",
           "x_time", "max_diff"]
LEGEND = {
    "N": "branches scored per search step (beams / samples)",
    "depth": "search steps (every branch gets one step per search step)",
    "prompt": "prompt tokens (one problem)",
    "ours_tokens": "PRM tokens PRMScorer processed (prompt once + every new step once)",
    "reencode_tokens": "PRM tokens re-encoding processed (prompt + all steps of every branch, every search step)",
    "x_tokens": "reencode_tokens / ours_tokens",
    "ours_s": "seconds of PRM work per search, ours (prefill + one forward per search step + forks / releases)",
    "reencode_s": "seconds of PRM work per search, re-encoding in padded batches",
    "x_time": "reencode_s / ours_s",
    "max_diff": "largest |ours - re-encoded| step score of the run",
}
BEAM_WIDTH = 4
CASES = ((16, 8, 400), (16, 20, 400), (16, 20, 1000), (64, 8, 400), (64, 20, 400))  # (N, depth, prompt tokens)
STEP_TOKENS = (32, 96)


def cases(text: str) -> tuple[tuple[int, int, int], ...]:
    """argparse type: "16:20:400,64:8:1000" -> ((16, 20, 400), (64, 8, 1000)); N a multiple of the beam width."""
    try:
        out = tuple(tuple(int(x) for x in c.split(":")) for c in text.split(","))
    except ValueError:
        out = ()
    if not out or any(len(c) != 3 or min(c) < 1 or c[0] % BEAM_WIDTH for c in out):
        raise argparse.ArgumentTypeError(f"expected N:depth:prompt_tokens,... with N a multiple of {BEAM_WIDTH}, "
                                         f"got {text!r}")
    return out


def prm_model(hidden: int, layers: int, vocab: int) -> Transformer:
    heads = hidden // 64
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=min(2, heads), model_type="qwen2",
                      attention_bias=True,
                      max_position_embeddings=4096, reward_head={"activation": "softmax", "num_classes": 2,
                                                                  "hidden": hidden, "positive_index": 1})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights large enough that scores differ between branches
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return model


@torch.no_grad()
def reencode(model: Transformer, chains: list[list[int]], batch_size: int) -> list[float]:
    """search-and-learn's PRM call: each chain's whole token list re-encoded (right-padded batches; causal, so
    padding after a chain's tokens does not change them), the score read at its last token."""
    out = []
    head = model.reward_head
    for i in range(0, len(chains), batch_size):
        batch = chains[i:i + batch_size]
        length = max(map(len, batch))
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        for j, c in enumerate(batch):
            ids[j, :len(c)] = torch.tensor(c)
        b, t = ids.shape

        def causal(_, q, k, v):  # Transformer.forward's attention, without its LM head over every token
            q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(b * t, o.shape[1], o.shape[3])

        hidden = model.run_layers(ids.reshape(-1), torch.arange(t).repeat(b), causal).view(b, t, -1)
        last = hidden[torch.arange(b), torch.tensor([len(c) - 1 for c in batch])]
        x = torch.relu(head.mlp(model.model.norm(last)))
        out += torch.softmax(head.out(x).float(), -1)[:, 1].tolist()
    return out


def run(model, strategy: str, n: int, depth: int, prompt_len: int, batch_size: int, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    scorer = PRMScorer(model, backend="auto")
    t_ours = t_re = 0.0
    re_tokens = 0
    max_diff = 0.0
    t0 = time.perf_counter()
    root = scorer.add_prompt(prompt)
    kids = scorer.fork(root, n)
    scorer.release(root)
    t_ours += time.perf_counter() - t0
    beams = {k: list(prompt) for k in kids}
    for _ in range(depth):
        live = list(beams)
        steps = [[rng.randrange(vocab) for _ in range(rng.randint(*STEP_TOKENS))] for _ in live]
        t0 = time.perf_counter()
        ours, _ = scorer.score(live, steps)
        t_ours += time.perf_counter() - t0
        for b, s in zip(live, steps):
            beams[b] = beams[b] + s
        chains = [beams[b] for b in live]
        t0 = time.perf_counter()
        theirs = reencode(model, chains, batch_size)
        t_re += time.perf_counter() - t0
        re_tokens += sum(map(len, chains))
        max_diff = max(max_diff, float((ours - torch.tensor(theirs)).abs().max()))
        if strategy == "beam_search":
            t0 = time.perf_counter()
            order = sorted(range(len(live)), key=lambda i: -float(ours[i]))[:n // BEAM_WIDTH]
            kept = [live[i] for i in order]
            for b in live:
                if b not in kept:
                    scorer.release(b)
            new = {}
            for b in kept:
                for k in scorer.fork(b, BEAM_WIDTH):
                    new[k] = beams[b]
                scorer.release(b)
            beams = new
            t_ours += time.perf_counter() - t0
    ours_tokens = scorer.stats["prompt_tokens"] + scorer.stats["tokens"]
    return {"strategy": strategy, "N": n, "depth": depth, "prompt": prompt_len, "ours_tokens": ours_tokens,
            "reencode_tokens": re_tokens, "x_tokens": re_tokens / ours_tokens, "ours_s": t_ours, "reencode_s": t_re,
            "x_time": t_re / t_ours, "max_diff": max_diff}


def main(argv=None) -> None:
    p = ArgumentParser(prog="bench_prm.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu",), default="cpu", help="cpu (the GPU run is future work)")
    p.add_argument("--cases", type=cases, default=CASES,
                   help="N:depth:prompt_tokens,... (default " + ",".join(":".join(map(str, c)) for c in CASES) + ")")
    p.add_argument("--hidden", type=positive_int, default=128, help="PRM hidden size (default 128)")
    p.add_argument("--layers", type=positive_int, default=2, help="PRM layers (default 2)")
    p.add_argument("--prm-batch-size", type=positive_int, default=4, help="re-encoding batch (default 4)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="the case 16:8:400 only")
    add_output_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    prefix = output_prefix(p, args, "bench_prm", device)
    if args.quick:
        args.cases = ((16, 8, 400),)
    model = prm_model(args.hidden, args.layers, vocab=32000)
    notes = [f"PRM: random Qwen2-style Transformer, hidden {args.hidden}, {args.layers} layers, vocab 32000, "
             "Qwen2.5-Math-PRM head, float32; "
             f"{args.threads} torch thread(s); steps of {STEP_TOKENS[0]}-{STEP_TOKENS[1]} random tokens; "
             f"beam width {BEAM_WIDTH}; re-encoding in padded batches of {args.prm_batch_size}.",
             "Times are wall seconds of the PRM work only, on a shared 2-core machine (noisy: read ratios, not "
             "absolute times)."]
    print(table_header(COLUMNS))
    rows = []
    for n, depth, prompt in args.cases:
        for strategy in ("beam_search", "best_of_n"):
            row = run(model, strategy, n, depth, prompt, args.prm_batch_size, seed=len(rows))
            rows.append(row)
            print(table_row(COLUMNS, row), flush=True)
            write_results("bench_prm", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND, complete=False)
    paths = write_results("bench_prm", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
