"""Benchmark step_rewards (fused PRM step scoring) against its floor and the ways PRMs are scored today.

Per shape (exactly STEPS_PER_SEQ steps per sequence at random positions; bf16 on GPU, fp32 on CPU;
RMSNorm on, head with bias, aggregate min; the hidden layer, when on, is Hd x Hd with bias, as in
Qwen2.5-Math-PRM):
  fused providers  o1kernels.step_rewards with backend "triton", "cuda" (GPU, when built), "cpu" (CPU,
                   when built) and "torch" (gathers the step rows with a host sync: eager only). On the
                   CPU, Triton runs only under TRITON_INTERPRET=1 and is then a correctness path, not a
                   speed measurement.
  unfused (a)      plain torch: norm over all tokens -> [hidden layer] -> head over all tokens ->
                   softmax/sigmoid -> mask -> aggregate.
  vocab (b)        Math-Shepherd: full-vocabulary (32K) LM-head logits at every token, then softmax over
                   the "+"/"-" columns (C = 2 without the hidden layer, where the logits fit in memory).
Each provider is timed eagerly (median of --reps calls) and, on a GPU, inside a CUDA graph
(common.bench_cuda_graph: 10 calls captured in one graph; eager - graph = host overhead per call).

Floor = max(bytes / measured copy bandwidth, FLOPs / measured matmul rate), both ceilings measured at the
start of the same run (common.measured_copy_gbps, common.measured_matmul_tflops). Bytes that must move:
the step mask (1 B/token), the step rows, the weights, step_scores (4 B/token, written) and chain_scores;
FLOPs: 2 * steps * (Hd * Hm + Hm * C) with the hidden layer, 2 * steps * Hd * C without.
eff_% = floor / the best fused provider's time (graph time where there is one).

  python benchmarks/bench_step_rewards.py [--device cpu|cuda] [--quick] [--reps N] [--threads N]

--quick: the acceptance shapes (Bs=256, L=2048, Hd=4096, C=2, with and without the hidden layer) and a
few others; under a minute on an H100/H200. With O1KERNELS_AUTOTUNE=1 the Triton launch parameters are
tuned per shape class at first use and the winners are printed and written to the notes (candidates for
LAUNCH_TABLE in o1kernels/triton_ops/step_rewards.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (ArgumentParser, add_output_args, bench, bench_cuda_graph, device_name, floor_ms,  # noqa: E402
                    measured_copy_gbps, measured_matmul_tflops, output_prefix, positive_int, print_legend,
                    rotating_sets, table_header, table_row, write_results)

from o1kernels import step_rewards  # noqa: E402
from o1kernels._backend import backend_unavailable_reason  # noqa: E402

STEPS_PER_SEQ = 10
VOCAB = 32000
NORM_EPS = 1e-6
# (Bs, L, Hd, C, hidden layer)
SHAPES = {
    "cuda": [(bs, seq_len, hd, 2, mlp) for bs in (16, 64, 256) for seq_len in (512, 2048) for hd in (1536, 3584, 4096)
             for mlp in (False, True)] + [(256, 2048, 4096, 1, False), (256, 2048, 4096, 1, True)],
    "cpu": [(bs, seq_len, 256, c, mlp) for bs in (4, 16) for seq_len in (128, 512) for c in (1, 2)
            for mlp in (False, True)],
}
QUICK_SHAPES = {
    "cuda": [(256, 2048, 4096, 2, False), (256, 2048, 4096, 2, True), (64, 512, 1536, 2, False),
             (16, 512, 3584, 2, True), (256, 2048, 4096, 1, False)],
    "cpu": [(4, 128, 256, 2, False), (4, 128, 256, 2, True)],
}
# Acceptance of issue 10 (on one H100/H200, graph times): Bs=256, L=2048, Hd=4096, C=2.
ACCEPT_MLP_US, ACCEPT_HEAD_US, ACCEPT_HOST_US, ACCEPT_X_UNFUSED = 180.0, 15.0, 20.0, 5.0

COLUMNS = ["Bs", "L", "Hd", "C", "mlp", "sets", "floor_us", "bound", "triton_us", "triton_graph_us", "compiled_us",
           "compiled_graph_us", "torch_us", "unfused_us", "unfused_graph_us", "vocab_us", "best", "best_us", "eff_%",
           "host_us", "x_unfused", "max_diff"]
LEGEND = {
    "Bs, L, Hd, C, mlp": "sequences, tokens per sequence, hidden size, head classes, Hd x Hd hidden layer or not",
    "sets": "input sets the timed calls rotate through (other step rows and weights), so that on a GPU they read "
            "HBM, not L2 (1 on the CPU)",
    "floor_us, bound": "max(bytes / measured copy bandwidth, FLOPs / measured matmul rate), and which term",
    "*_us / *_graph_us": "median eager time per call / per call inside a replayed CUDA graph (GPU)",
    "triton, compiled, torch": "the fused step_rewards per backend (compiled: cuda on GPU, cpu on CPU)",
    "unfused": "(a) norm, [hidden layer,] head, softmax over every token, then mask and aggregate",
    "vocab_us": "(b) full 32K-vocabulary logits at every token (Math-Shepherd)",
    "best, best_us, eff_%": "fastest fused provider, its time (graph where there is one), floor / that time",
    "host_us": "best's eager - graph time: host work per call",
    "x_unfused": "speedup of best over (a)",
    "max_diff": "largest |chain score| difference between best and (a)",
}


def make_problem(bs, seq_len, hd, num_classes, mlp, dtype, device):
    hidden = torch.randn(bs, seq_len, hd, device=device, dtype=dtype)
    positions = torch.rand(bs, seq_len, device=device).argsort(dim=1)[:, :STEPS_PER_SEQ]
    mask = torch.zeros(bs, seq_len, dtype=torch.bool, device=device).scatter_(1, positions, True)
    params = dict(
        weight=torch.randn(num_classes, hd, device=device, dtype=dtype) / hd ** 0.5,
        bias=torch.randn(num_classes, device=device, dtype=dtype),
        norm_weight=torch.rand(hd, device=device, dtype=dtype) + 0.5,
        mlp_weight=torch.randn(hd, hd, device=device, dtype=dtype) / hd ** 0.5 if mlp else None,
        mlp_bias=torch.randn(hd, device=device, dtype=dtype) * 0.1 if mlp else None,
        activation="softmax" if num_classes == 2 else "sigmoid",
        positive_index=1 if num_classes == 2 else 0,
        aggregate="min",
    )
    return hidden, mask, params


def fused(hidden, mask, p, backend):
    return step_rewards(hidden, mask, p["weight"], p["bias"], norm_weight=p["norm_weight"], norm_eps=NORM_EPS,
                        mlp_weight=p["mlp_weight"], mlp_bias=p["mlp_bias"], activation=p["activation"],
                        positive_index=p["positive_index"], aggregate=p["aggregate"], backend=backend)


def rms_norm_all_tokens(hidden, norm_weight):
    x = hidden.float()
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS) * norm_weight.float()).to(hidden.dtype)


def masked_min(rewards, mask):
    """Chain scores of the 'min' aggregate from per-token rewards [Bs, L] (NaN without steps)."""
    chain = torch.where(mask, rewards, torch.inf).amin(dim=1)
    return torch.where(mask.any(dim=1), chain, torch.nan)


def unfused(hidden, mask, p):
    """(a) The plain pipeline: every op over every token, in the model's dtype like a PRM forward."""
    x = rms_norm_all_tokens(hidden, p["norm_weight"])
    if p["mlp_weight"] is not None:
        x = F.relu(F.linear(x, p["mlp_weight"], p["mlp_bias"]))
    logits = F.linear(x, p["weight"], p["bias"]).float()  # [Bs, L, C] at every token
    if p["activation"] == "softmax":
        rewards = logits.softmax(-1)[..., p["positive_index"]]
    else:
        rewards = logits[..., 0].sigmoid()
    return torch.where(mask, rewards, torch.nan), masked_min(rewards, mask)


def full_vocab(hidden, mask, norm_weight, lm_head, plus_id, minus_id):
    """(b) Math-Shepherd's scoring: full-vocabulary logits at every token, then P('+') of the '+'/'-' pair."""
    logits = F.linear(rms_norm_all_tokens(hidden, norm_weight), lm_head)  # [Bs, L, VOCAB]
    rewards = logits[..., [plus_id, minus_id]].float().softmax(-1)[..., 0]
    return torch.where(mask, rewards, torch.nan), masked_min(rewards, mask)


def must_move_bytes(hidden, mask, p):
    """Bytes the fused op cannot avoid: read the step mask, the step rows and the weights; write the scores."""
    steps = mask.shape[0] * STEPS_PER_SEQ
    weights = sum(p[k].numel() * p[k].element_size()
                  for k in ("weight", "bias", "norm_weight", "mlp_weight", "mlp_bias") if p[k] is not None)
    rows = steps * hidden.shape[-1] * hidden.element_size()
    return mask.numel() + rows + weights + 4 * mask.numel() + 4 * mask.shape[0]


def flops(hidden, mask, p):
    steps = mask.shape[0] * STEPS_PER_SEQ
    hd, c = hidden.shape[-1], p["weight"].shape[0]
    hm = p["mlp_weight"].shape[0] if p["mlp_weight"] is not None else 0
    return 2 * steps * (hd * hm + (hm or hd) * c)


def time_provider(fn, device, reps, warmup, graph):
    """(eager ms, graph ms or None)."""
    eager = bench(fn, device, warmup=warmup, reps=reps)
    return eager, (bench_cuda_graph(fn, device, reps=reps) if graph and device.type == "cuda" else None)


def us(ms):
    return None if ms is None else ms * 1e3


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="a handful of shapes (the acceptance ones first)")
    parser.add_argument("--reps", type=positive_int, default=None, help="timed repetitions (default 20 GPU, 10 CPU)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch (default 1: on a shared machine more threads made timings erratic)")
    add_output_args(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    prefix = output_prefix(parser, args, "bench_step_rewards", device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps, warmup = (args.reps or 20, 3) if on_gpu else (args.reps or 10, 2)
    compiled = "cuda" if on_gpu else "cpu"
    has_compiled = backend_unavailable_reason(compiled, device) is None
    has_triton = backend_unavailable_reason("triton", device) is None

    # Ceilings of the floor, measured now on this device (smaller problems on a CPU).
    gbps = measured_copy_gbps(device) if on_gpu else measured_copy_gbps(device, nbytes=1 << 26)
    tflops = measured_matmul_tflops(device, n=8192 if on_gpu else 1024, dtype=dtype)
    print(f"step_rewards on {device_name(device)}: measured copy {gbps:.0f} GB/s, {str(dtype)[6:]} matmul "
          f"{tflops:.3g} TFLOP/s")

    notes = [
        f"{STEPS_PER_SEQ} steps per sequence at random positions; {str(dtype).replace('torch.', '')}; aggregate min; "
        "RMSNorm on; head with bias; the hidden layer (mlp) is Hd x Hd with bias (Qwen2.5-Math-PRM style).",
        f"Ceilings measured in this run: device copy {gbps:.0f} GB/s, {str(dtype)[6:]} matmul {tflops:.3g} TFLOP/s. "
        "floor_us = max(must-move bytes / copy rate, FLOPs / matmul rate); bound says which term decides.",
        "Must-move bytes: step mask 1 B/token + step rows + weights + step_scores 4 B/token + chain_scores.",
        "*_us: median eager time per call; *_graph_us: per call inside a replayed CUDA graph of 10 calls "
        "(common.bench_cuda_graph). best = the fused provider with the lowest graph time (eager on CPU); "
        "eff_% = floor / best_us; host_us = best's eager - graph time.",
        f"compiled = backend '{compiled}'. torch_us = the fused torch backend (its row gather syncs: no graph time).",
        "x_unfused = unfused (a) / best, graph times where both have them. vocab (b): full "
        f"{VOCAB}-vocabulary logits at every token (C = 2, no hidden layer; '-' where they would not fit).",
        "max_diff: largest |chain score| difference between best and unfused (a) (reported, not asserted).",
        "backend='auto' on CUDA stays 'triton'. Rule for choosing per shape once GPU numbers exist: the backend with "
        "the lower graph time at the acceptance shapes of each path (head only / hidden layer), provided its GPU "
        "tests pass; 'cuda' joins auto only then.",
    ]
    if not on_gpu:
        notes.append(f"CPU: median wall time with {torch.get_num_threads()} torch thread(s). The CPU ceilings are rough "
                     "(a shared machine; the compiled backend's BLAS may use more threads than the ceiling's "
                     "matmul): eff_% above 100 means the matmul ceiling is too low, not a result above the floor.")
        if has_triton:
            notes.append("triton_us on CPU is Triton's interpreter (TRITON_INTERPRET=1): a correctness path, "
                         "not a speed measurement.")
    if not has_compiled:
        notes.append(f"compiled backend '{compiled}' not measured: {backend_unavailable_reason(compiled, device)}")

    shapes = (QUICK_SHAPES if args.quick else SHAPES)[device.type]
    print(table_header(COLUMNS), flush=True)
    rows = []
    for bs, seq_len, hd, num_classes, mlp in shapes:
        torch.manual_seed(0)
        hidden, mask, p = make_problem(bs, seq_len, hd, num_classes, mlp, dtype, device)
        # Input sets to rotate through (different step rows and weights), so that a timed call does not find what it
        # reads in L2 from the call before: the fused op reads only the step rows and the weights.
        sets = [(hidden, mask, p)] + [make_problem(bs, seq_len, hd, num_classes, mlp, dtype, device)
                                      for _ in range(rotating_sets(must_move_bytes(hidden, mask, p), device) - 1)]

        def each(fn):
            return [lambda h=h, m=m, q=q: fn(h, m, q) for h, m, q in sets]

        times = {}  # provider -> (eager ms, graph ms | None)
        if has_triton:
            times["triton"] = time_provider(each(lambda h, m, q: fused(h, m, q, "triton")), device, reps, warmup, True) \
                if on_gpu else (bench(lambda: fused(hidden, mask, p, "triton"), device, warmup=0, reps=2), None)
        if has_compiled:
            times["compiled"] = time_provider(each(lambda h, m, q: fused(h, m, q, compiled)), device, reps, warmup,
                                              True)
        times["torch"] = time_provider(each(lambda h, m, q: fused(h, m, q, "torch")), device, reps, warmup, False)
        times["unfused"] = time_provider(each(unfused), device, reps, warmup, True)
        vocab_ms = None
        if num_classes == 2 and not mlp:
            logits_bytes = bs * seq_len * VOCAB * hidden.element_size()
            if not on_gpu or 3 * logits_bytes < torch.cuda.mem_get_info(device)[0]:
                lm_head = torch.randn(VOCAB, hd, device=device, dtype=dtype) / hd ** 0.5
                vocab_ms = bench(lambda: full_vocab(hidden, mask, p["norm_weight"], lm_head, 10, 20), device,
                                 warmup=warmup if on_gpu else 1, reps=reps if on_gpu else 3)
                del lm_head

        candidates = [b for b in ("triton", "compiled") if b in times] if on_gpu else \
            [b for b in ("compiled", "torch") if b in times]
        best = min(candidates, key=lambda b: times[b][1] if times[b][1] is not None else times[b][0])
        best_eager, best_graph = times[best]
        best_ms = best_graph if best_graph is not None else best_eager
        unfused_ms = times["unfused"][1] if best_graph is not None and times["unfused"][1] is not None \
            else times["unfused"][0]
        nbytes, nflops = must_move_bytes(hidden, mask, p), flops(hidden, mask, p)
        floor = floor_ms(nbytes, nflops, gbps, tflops)
        backend = {"compiled": compiled}.get(best, best)
        diff = (fused(hidden, mask, p, backend)[1] - unfused(hidden, mask, p)[1]).abs().max().item()
        memory_bound = nbytes / (gbps * 1e9) >= nflops / (tflops * 1e12)
        triton_t, compiled_t = times.get("triton", (None, None)), times.get("compiled", (None, None))
        row = {"Bs": bs, "L": seq_len, "Hd": hd, "C": num_classes, "mlp": "yes" if mlp else "no", "sets": len(sets),
               "floor_us": us(floor), "bound": "memory" if memory_bound else "compute",
               "triton_us": us(triton_t[0]), "triton_graph_us": us(triton_t[1]),
               "compiled_us": us(compiled_t[0]), "compiled_graph_us": us(compiled_t[1]),
               "torch_us": us(times["torch"][0]), "unfused_us": us(times["unfused"][0]),
               "unfused_graph_us": us(times["unfused"][1]), "vocab_us": us(vocab_ms), "best": backend,
               "best_us": us(best_ms), "eff_%": 100 * floor / best_ms,
               "host_us": us(best_eager - best_graph) if best_graph is not None else None,
               "x_unfused": unfused_ms / best_ms, "max_diff": diff}
        rows.append(row)
        print(table_row(COLUMNS, row), flush=True)
        write_results("bench_step_rewards", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND, complete=False)
        del hidden, mask, p, sets
        if on_gpu:
            torch.cuda.empty_cache()

    print_legend(LEGEND)
    if has_triton and on_gpu:
        from o1kernels.triton_ops import step_rewards as triton_step_rewards

        for key, config in triton_step_rewards._TUNED.items():  # filled only with O1KERNELS_AUTOTUNE=1
            line = f"autotuned triton {key}: {config}"
            print(line)
            notes.append(line)
    for line in acceptance(rows, on_gpu):
        print(line)
        notes.append(line)
    for path in write_results("bench_step_rewards", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND):
        print("wrote", path)


def acceptance(rows, on_gpu: bool = True):
    """Issue 10's acceptance criteria, read off this run's rows (reported, not asserted; GPU rows only)."""
    if not on_gpu:
        return [f"acceptance (step-reward speed, {len(rows)} rows): not measured (a CPU run)"]
    out = []
    for mlp in ("no", "yes"):
        if not any((r["Bs"], r["L"], r["Hd"], r["C"], r["mlp"]) == (256, 2048, 4096, 2, mlp) for r in rows):
            out.append(f"acceptance Bs=256 L=2048 Hd=4096 C=2 mlp={mlp}: not measured (no such row in this run)")
    for row in rows:
        if (row["Bs"], row["L"], row["Hd"], row["C"]) != (256, 2048, 4096, 2):
            continue
        limit = ACCEPT_MLP_US if row["mlp"] == "yes" else ACCEPT_HEAD_US
        ok = row["best_us"] <= limit and (row["mlp"] == "yes" or (row["host_us"] or 0) <= ACCEPT_HOST_US)
        out.append(f"acceptance Bs=256 L=2048 Hd=4096 C=2 mlp={row['mlp']}: {row['best']} {row['best_us']:.1f} us in a "
                   f"graph (limit {limit:g} us), host {row['host_us'] or float('nan'):.1f} us, eff {row['eff_%']:.0f}% "
                   f"of the floor -> {'met' if ok else 'NOT met'}")
    slow = [f"Bs={r['Bs']} L={r['L']} Hd={r['Hd']} C={r['C']} mlp={r['mlp']} ({r['x_unfused']:.2f}x)"
            for r in rows if r["x_unfused"] < ACCEPT_X_UNFUSED]
    out.append(f"acceptance fused >= {ACCEPT_X_UNFUSED:g}x unfused on every shape: "
               + ("met" if not slow else "NOT met at " + ", ".join(slow)))
    return out


if __name__ == "__main__":
    main()
