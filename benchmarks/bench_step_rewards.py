"""Benchmark step_rewards (fused PRM step scoring) against the ways PRMs are scored today.

Providers, per shape (~10 steps per sequence, bf16 on GPU, fp32 on CPU):
  fused    o1kernels.step_rewards: Triton on GPU; on CPU the torch backend (it gathers step rows
           first), the compiled "cpu"/"cuda" backends when built, and Triton only when
           TRITON_INTERPRET=1 is set (the interpreter is not a speed measurement).
  unfused  (a) plain torch: norm over all tokens -> head (and hidden layer) over all tokens ->
           softmax/sigmoid -> mask -> aggregate.
  vocab    (b) Math-Shepherd: norm and full-vocabulary (32K) LM-head logits at every token, then
           softmax over the "+"/"-" columns (only for C = 2 without the hidden layer).
Reported: median time, speedups of the fused kernel, the bytes the fused op must read (step mask,
step rows, weights), its achieved GB/s and % of datasheet peak, and its TFLOP/s.

  python benchmarks/bench_step_rewards.py [--device cpu|cuda] [--reps N] [--threads N] [--out DIR_OR_PREFIX]
                                          [--update-shipped]
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (ArgumentParser, add_output_args, bench, device_name, output_prefix, peak_gbps,  # noqa: E402
                    print_legend, table_header, table_row, write_results)

from o1kernels import step_rewards  # noqa: E402
from o1kernels._backend import backend_unavailable_reason  # noqa: E402

STEPS_PER_SEQ = 10
VOCAB = 32000
NORM_EPS = 1e-6
SHAPES = {  # (batch sizes, sequence lengths, hidden sizes)
    "cuda": ((16, 64, 256), (512, 2048), (1536, 3584, 4096)),
    "cpu": ((4, 16), (128, 512), (256,)),
}
COLUMNS = ["Bs", "L", "Hd", "C", "mlp", "fused", "fused_ms", "unfused_ms", "vocab_ms", "x_unfused", "x_vocab",
           "must_read_MB", "GB/s", "%peak", "TFLOP/s", "torch_ms", "triton_ms", "compiled_ms", "max_diff"]
LEGEND = {
    "Bs, L, Hd": "sequences, tokens per sequence, hidden size",
    "C": "classes of the head (1: sigmoid value head, 2: softmax)",
    "mlp": "with the Hd x Hd hidden layer (Qwen2.5-Math-PRM style)",
    "fused": "backend timed as the fused op",
    "fused_ms": "median time of the fused step_rewards",
    "unfused_ms": "(a) norm, head, softmax over every token, then mask and aggregate",
    "vocab_ms": "(b) full 32K-vocabulary logits at every token (Math-Shepherd)",
    "x_unfused, x_vocab": "speedup of fused over (a), (b)",
    "must_read_MB": "bytes the fused op must read: step mask, step rows, weights",
    "GB/s, %peak": "must_read_MB / fused_ms, and that over the datasheet bandwidth",
    "TFLOP/s": "head (and hidden layer) matmul work at step rows / fused_ms",
    "torch_ms, triton_ms, compiled_ms": "each backend of step_rewards",
    "max_diff": "largest |chain score| difference between fused and (a)",
}


def make_problem(bs, seq_len, hd, num_classes, mlp, dtype, device):
    hidden = torch.randn(bs, seq_len, hd, device=device, dtype=dtype)
    # Exactly STEPS_PER_SEQ step tags per sequence at random positions.
    positions = torch.rand(bs, seq_len, device=device).argsort(dim=1)[:, :STEPS_PER_SEQ]
    mask = torch.zeros(bs, seq_len, dtype=torch.bool, device=device).scatter_(1, positions, True)
    params = dict(  # the hidden layer, when present, is Hd x Hd as in Qwen2.5-Math-PRM
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


def must_read_bytes(hidden, mask, p):
    """Bytes the fused op cannot avoid reading: the step mask, the step rows and the weights."""
    steps = mask.shape[0] * STEPS_PER_SEQ
    tensors = [p[k] for k in ("weight", "bias", "norm_weight", "mlp_weight", "mlp_bias") if p[k] is not None]
    return mask.numel() + steps * hidden.shape[-1] * hidden.element_size() + sum(t.numel() * t.element_size() for t in tensors)


def flops(hidden, mask, p):
    steps = mask.shape[0] * STEPS_PER_SEQ
    hd, c = hidden.shape[-1], p["weight"].shape[0]
    hm = p["mlp_weight"].shape[0] if p["mlp_weight"] is not None else 0
    return 2 * steps * (hd * hm + (hm or hd) * c)


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on GPU, 10 on CPU)")
    parser.add_argument("--threads", type=int, default=1,
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
    peak = peak_gbps(device)
    compiled = "cuda" if on_gpu else "cpu"
    has_compiled = backend_unavailable_reason(compiled, device) is None
    has_triton = backend_unavailable_reason("triton", device) is None

    notes = [f"{STEPS_PER_SEQ} steps per sequence at random positions; {str(dtype).replace('torch.', '')}; aggregate min; "
             "RMSNorm on; head with bias; the hidden layer (mlp) is Hd x Hd with bias (Qwen2.5-Math-PRM style).",
             "fused = the Triton kernel on GPU; on CPU the faster of the torch and compiled 'cpu' backends per row. "
             "x_unfused / x_vocab = speedup of fused over (a) / (b).",
             "unfused (a): norm -> [hidden layer] -> head over all tokens -> softmax/sigmoid -> mask -> aggregate, plain torch.",
             f"vocab (b): Math-Shepherd style, full {VOCAB}-vocabulary LM-head logits at every token (C = 2, no hidden layer only; "
             "'-' where the logits would not fit in memory).",
             "must_read_MB: step mask + step rows + weights (the fused op also writes step_scores, 4 B/token); "
             "GB/s and %peak are of that floor; TFLOP/s counts the fused op's matmul work at step rows only.",
             f"max_diff: largest |chain score| difference between fused and unfused (a); reported, not asserted."]
    if not on_gpu:
        notes.append(f"CPU: median wall time with {torch.get_num_threads()} torch thread(s); no datasheet peak for CPUs.")
        if has_triton:
            notes.append("triton_ms on CPU is Triton's interpreter (TRITON_INTERPRET=1): a correctness path, not a speed measurement.")
    if not has_compiled:
        notes.append(f"compiled backend '{compiled}' not measured: {backend_unavailable_reason(compiled, device)}")

    batch_sizes, seq_lens, hidden_sizes = SHAPES[device.type]
    rows = []
    threads = "" if on_gpu else f", {torch.get_num_threads()} torch thread(s)"
    print(f"step_rewards on {device_name(device)}{threads}")
    print(table_header(COLUMNS), flush=True)
    for bs, seq_len, hd, num_classes, mlp in itertools.product(batch_sizes, seq_lens, hidden_sizes, (1, 2), (False, True)):
        torch.manual_seed(0)
        hidden, mask, p = make_problem(bs, seq_len, hd, num_classes, mlp, dtype, device)
        times = {"torch": bench(lambda: fused(hidden, mask, p, "torch"), device, warmup=warmup, reps=reps)}
        if has_triton:  # on CPU the interpreter: a couple of runs show it works, they measure nothing
            times["triton"] = bench(lambda: fused(hidden, mask, p, "triton"), device,
                                    **(dict(warmup=warmup, reps=reps) if on_gpu else dict(warmup=0, reps=2)))
        if has_compiled:
            times[compiled] = bench(lambda: fused(hidden, mask, p, compiled), device, warmup=warmup, reps=reps)
        unfused_ms = bench(lambda: unfused(hidden, mask, p), device, warmup=warmup, reps=reps)
        vocab_ms = None
        if num_classes == 2 and not mlp:
            logits_bytes = bs * seq_len * VOCAB * hidden.element_size()
            fits = not on_gpu or 3 * logits_bytes < torch.cuda.mem_get_info(device)[0]
            if fits:
                lm_head = torch.randn(VOCAB, hd, device=device, dtype=dtype) / hd ** 0.5
                vocab_ms = bench(lambda: full_vocab(hidden, mask, p["norm_weight"], lm_head, 10, 20), device,
                                 warmup=warmup if on_gpu else 1, reps=reps if on_gpu else 3)
                del lm_head
        primary = "triton" if on_gpu else min((b for b in ("torch", compiled) if b in times), key=times.get)
        fused_ms = times[primary]
        nbytes = must_read_bytes(hidden, mask, p)
        gbps = nbytes / (fused_ms * 1e-3) / 1e9
        diff = (fused(hidden, mask, p, primary)[1] - unfused(hidden, mask, p)[1]).abs().max().item()
        row = {"Bs": bs, "L": seq_len, "Hd": hd, "C": num_classes, "mlp": "yes" if mlp else "no", "fused": primary,
               "fused_ms": fused_ms, "unfused_ms": unfused_ms, "vocab_ms": vocab_ms,
               "x_unfused": unfused_ms / fused_ms, "x_vocab": vocab_ms / fused_ms if vocab_ms else None,
               "must_read_MB": nbytes / 1e6, "GB/s": gbps, "%peak": 100 * gbps / peak if peak else None,
               "TFLOP/s": flops(hidden, mask, p) / (fused_ms * 1e-3) / 1e12,
               "torch_ms": times["torch"], "triton_ms": times.get("triton"), "compiled_ms": times.get(compiled),
               "max_diff": diff}
        rows.append(row)
        print(table_row(COLUMNS, row), flush=True)
        del hidden, mask, p
        if on_gpu:
            torch.cuda.empty_cache()

    print_legend(LEGEND)
    for path in write_results("bench_step_rewards", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND):
        print("wrote", path)


if __name__ == "__main__":
    main()
