"""Benchmark the reference decoder against its peers and its floor, decoding N branches of one prompt.

Per (prompt length P, branches N): prefill P tokens once, fork N branches, decode S new tokens on every branch in one
generate_step (greedy, no stop tokens, so all N branches stay in the batch). Providers, in the same run on the same
random-weight model:
  graph  TreeDecoder (one paged KV pool shared by all branches, tree_attention), each decode iteration the replay
         of a CUDA graph (GPU only)
  eager  the same decoder and iteration, run op by op from Python
  compiled  (--compile) graph replays with each layer's halves around attention and the logits compiled by
         torch.compile (TreeDecoder(compile_layers=True): fused norms/RoPE/MLP, attention still our kernel)
  naive  NaiveDecoder: a dense KV copy per branch, per-branch SDPA, a host sync per token (skipped where its
         copies would not fit in 80% of the free memory)
  hf     Hugging Face transformers `generate` on the same weights (LlamaForCausalLM from the model's config,
         transformers' default attention), do_sample=True, num_return_sequences=N, max_new_tokens=S; its time
         includes its prefill of the N expanded copies of the prompt, as a user of generate pays it
Ours is warmed up on the row's own tree first (decoder.warm_up: Triton compilation and graph capture with the
step's pages reserved), naive and hf by a short run, so no provider compiles inside its timing.
Floor of one decode iteration (N tokens): max(bytes / measured copy bandwidth, FLOPs / measured matmul rate), bytes
= the weights read (all but the embedding table, whose N rows are gathered) + the unique KV read, averaged over
the step ((P + N(S+1)/2) tokens); FLOPs = 2 x those weights x N + attention 4 x N x (P + (S+1)/2) x Hq x D per
layer. floor tok/s = N / that time; efficiency = ours / floor, where ours is the fastest of graph and compiled
(else eager); speedup and vs_hf use the same ours.
Agreement with the naive decoder: the first position at which ours' greedy tokens differ from naive's (over all
branches; "-": identical), how many branches differ, and the largest |logit difference| of the two decoders when
naive's tokens of branch 0 are teacher-forced through both.

GPU (default when CUDA is available): a ~1.27B-parameter random-weight Llama (hidden 2048, 16 layers, Hq=32,
Hkv=8, D=128, intermediate 8192, vocab 32000) in bf16 (--dtype float32 to check exact agreement), P in
{1K, 4K, 16K}, N in {16, 64, 256}, S = 256, peers naive and hf. --quick (a few minutes, compilation included):
(P, N) in {(1K, 16), (1K, 256), (16K, 16)}, S = 64, naive only at N = 16, and the issue-11 acceptance lines.
CPU (--device cpu): a small fp32 model, P in {1K, 4K}, N in {16, 64}, S = 32, one thread, peer naive.

  python benchmarks/bench_decode.py [--device cpu|cuda] [--quick] [--compile] [--dtype bfloat16|float32]
                                    [--backend auto|torch|triton|cpu|cuda] [--page-size 16] [--prompt-lens 1024,4096]
                                    [--branches 16,64] [--new-tokens S] [--peers naive,hf] [--reps N] [--threads N]
                                    [--out DIR_OR_PREFIX] [--update-shipped]
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (ArgumentParser, add_output_args, device_name, floor_ms, measured_copy_gbps,  # noqa: E402
                    measured_matmul_tflops, output_prefix, positive_int, positive_ints, print_legend, table_header,
                    table_row, write_results)

from o1kernels._backend import resolve_backend  # noqa: E402
from o1kernels.decoder import ModelConfig, NaiveDecoder, Transformer, TreeDecoder  # noqa: E402
from o1kernels.tree_attention import SUPPORTED_BACKENDS  # noqa: E402

MODELS = {
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "cpu": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=32),
}
SIZES = {  # (prompt lengths, branch counts, new tokens)
    "cuda": ((1024, 4096, 16384), (16, 64, 256), 256),
    "cpu": ((1024, 4096), (16, 64), 32),
}
QUICK = {  # ((P, N) pairs, new tokens, largest N the naive decoder runs at)
    "cuda": (((1024, 16), (1024, 256), (16384, 16)), 64, 16),
    "cpu": (((256, 4), (256, 16)), 16, 16),
}
# Issue 11's acceptance on one H100/H200: graph tok/s at (P, N), S = 64, and >= 10x hf on every row.
ACCEPTANCE = {(1024, 16): 13000, (1024, 256): 100000, (16384, 16): 10000}
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}
PEERS = ("naive", "hf")
COLUMNS = ["P", "N", "S", "graph_tok/s", "compiled_tok/s", "eager_tok/s", "naive_tok/s", "hf_tok/s", "floor_tok/s", "efficiency",
           "speedup", "vs_hf", "ours_kv_MB", "naive_kv_MB", "kv_ratio", "ideal_kv_ratio", "ours_mem_MB",
           "naive_mem_MB", "syncs/step", "first_divergence", "diverged", "max_logit_diff"]
LEGEND = {
    "P, N, S": "prompt tokens, branches, new tokens per branch",
    "graph_tok/s, eager_tok/s": "decode tokens/s of TreeDecoder with CUDA-graph replays (GPU) and run eagerly",
    "compiled_tok/s": "graph replays with torch.compile'd layers (--compile)",
    "naive_tok/s": "decode tokens/s of NaiveDecoder (dense KV copies, a host sync per token)",
    "hf_tok/s": "transformers generate, N*S / its time (prefill of the N expanded prompts included)",
    "floor_tok/s": "N / the floor of one decode iteration (weights + unique KV bytes vs FLOPs, measured ceilings)",
    "efficiency": "ours (the fastest of graph and compiled, else eager) / floor_tok/s",
    "speedup": "ours / naive_tok/s",
    "vs_hf": "ours / hf_tok/s",
    "ours_kv_MB, naive_kv_MB": "peak KV bytes held (ours: pages referenced; naive: dense copies)",
    "kv_ratio, ideal_kv_ratio": "naive_kv_MB / ours_kv_MB, and its ideal N(P+S)/(P+N*S)",
    "ours_mem_MB, naive_mem_MB": "peak GPU memory allocated during decode (GPU only)",
    "syncs/step": "host reads of device values in ours' decode step (a step without stop tokens: 1)",
    "first_divergence": "first token position where ours' greedy tokens differ from naive's ('-': identical)",
    "diverged": "branches whose tokens differ from naive's",
    "max_logit_diff": "max |logit difference| ours vs naive with naive's branch-0 tokens teacher-forced through both",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> int:
    """Bytes free on the GPU, or physical memory available on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_decoder(make_decoder, model, prompt: list[int], n: int, new_tokens: int, *, warm: bool) -> dict:
    """Prefill, fork n, decode new_tokens on all n (after dec.warm_up on the same tree when `warm`); return tokens/s,
    KV bytes, peak memory, host syncs per step and the generated tokens."""
    device = model.device
    dec = make_decoder()
    if warm:
        dec.warm_up(prompt, [n], max_new_tokens=new_tokens)
    root = dec.add_prompt(prompt)
    kids = dec.fork(root, n)
    dec.release(root)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    syncs = dec.stats["host_syncs"]
    out = dec.generate_step(kids, max_new_tokens=new_tokens, stop_ids=set(), temperature=0.0)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"tok_s": dec.tokens_per_second(), "kv_MB": dec.stats["peak_kv_bytes"] / 2**20, "mem_MB": mem,
            "syncs": dec.stats["host_syncs"] - syncs, "tokens": out.new_tokens}


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode tokens/s."""
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


def hf_model(model: Transformer):
    """transformers' LlamaForCausalLM with `model`'s config and weights, or None when transformers is missing."""
    try:
        import transformers
    except ImportError:
        return None
    cfg = {k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "model_type")}
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(model.dtype)
    hf.load_state_dict(model.state_dict())
    return hf.eval()


def run_hf(hf, prompt: list[int], n: int, new_tokens: int) -> float:
    """tokens/s of hf.generate sampling n sequences of new_tokens tokens from the prompt."""
    device = hf.device
    ids = torch.tensor([prompt], device=device)
    torch.manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens, pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - t0
    assert out.shape == (n, len(prompt) + new_tokens), out.shape  # no eos in the config: every row runs S tokens
    return n * new_tokens / seconds


def agreement(model, make_ours, prompt: list[int], ours_tokens, naive_tokens) -> dict:
    """First diverging position and diverged branch count (ours vs naive greedy tokens), and the max |logit
    difference| of the two decoders with naive's branch-0 tokens teacher-forced through both."""
    firsts = [next((i for i, (a, b) in enumerate(zip(o, v)) if a != b), None)
              for o, v in zip(ours_tokens, naive_tokens)]
    diverged = [f for f in firsts if f is not None]
    logits = []
    for dec in (make_ours(), NaiveDecoder(model)):
        logits.append(dec.teacher_force(dec.add_prompt(prompt), naive_tokens[0]))
    return {"first_divergence": min(diverged) if diverged else "-", "diverged": len(diverged),
            "max_logit_diff": (logits[0] - logits[1]).abs().max().item()}


def decode_floor(model: Transformer, p: int, n: int, s: int, gbps: float, tflops: float) -> float:
    """Floor tokens/s of decoding n branches of a p-token prompt for s tokens (see the module docstring)."""
    cfg = model.config
    params = sum(t.numel() for t in model.parameters())
    read = params if cfg.tie_word_embeddings else params - cfg.vocab_size * cfg.hidden_size
    elem = model.dtype.itemsize
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    context = p + (s + 1) / 2
    nbytes = read * elem + (p + n * (s + 1) / 2) * kv_per_token
    flops = 2 * read * n + 4 * n * context * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return n / (floor_ms(nbytes, flops, gbps, tflops) * 1e-3)


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="a few sizes only (GPU: the issue-11 acceptance rows)")
    ap.add_argument("--compile", action="store_true",
                    help="also time ours with torch.compile'd layers (compiles once, about a minute on a GPU)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="model dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--backend", default="auto", help="backend of tree_attention/merge_states/step_rewards")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: on our shared 2-core machine two threads made decode "
                         "40x slower, 23 vs 950 tok/s at P=1024 N=16, from threads spinning against other processes)")
    ap.add_argument("--prompt-lens", type=positive_ints, default=None,
                    help="comma-separated P values (default: the device's set)")
    ap.add_argument("--branches", type=positive_ints, default=None,
                    help="comma-separated N values (default: the device's set)")
    ap.add_argument("--new-tokens", type=positive_int, default=None, help="S (default 256 on GPU, 32 on CPU)")
    ap.add_argument("--peers", default=None,
                    help=f"comma-separated peers from {', '.join(PEERS)}, or 'none' (default: both on GPU, naive on "
                         "CPU, where hf's prefill of N prompt copies takes minutes)")
    ap.add_argument("--reps", type=int, default=None, help="runs per decoder and size, median reported "
                    "(default 1 on GPU, 3 on CPU)")
    add_output_args(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available (use --device cpu)")
    peers = set(PEERS if device.type == "cuda" else ("naive",)) if args.peers is None else \
        set() if args.peers == "none" else set(args.peers.split(","))
    if not peers <= set(PEERS):
        ap.error(f"argument --peers: expected names from {', '.join(PEERS)} or 'none', got {args.peers!r}")
    prefix = output_prefix(ap, args, "bench_decode", device)
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps is None:
        args.reps = 1 if device.type == "cuda" or args.quick else 3
    backend = resolve_backend(args.backend, device, SUPPORTED_BACKENDS)
    dtype = getattr(torch, args.dtype) if args.dtype else DTYPES[device.type]
    if args.quick:
        pairs, new_tokens, naive_max_n = QUICK[device.type]
    else:
        prompts, branch_counts, new_tokens = SIZES[device.type]
        pairs = [(p, n) for p in (args.prompt_lens or prompts) for n in (args.branches or branch_counts)]
        naive_max_n = None
    new_tokens = args.new_tokens or new_tokens
    ps = args.page_size

    torch.manual_seed(0)
    max_positions = max(p for p, _ in pairs) + new_tokens + 16
    cfg = ModelConfig(**MODELS[device.type], max_position_embeddings=max_positions)
    model = Transformer(cfg, device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    hf = hf_model(model) if "hf" in peers else None
    on_gpu = device.type == "cuda"
    gbps = measured_copy_gbps(device, 1 << 30 if on_gpu else 1 << 26)
    tflops = measured_matmul_tflops(device, 8192 if on_gpu else 512, dtype if on_gpu else torch.float32)

    def ours(prompt_len, n, s, **options):
        # the warm-up's tree: prompt + n tails of s tokens, one of them a token longer; + the padding's scratch page
        pages = -(-prompt_len // ps) + n * -(-s // ps) + 3
        # args.backend, not the resolved name: with "auto" each call picks a backend that implements it (the
        # prompt's causal chunk needs position masks, which only the torch reference implements so far)
        return lambda: TreeDecoder(model, backend=args.backend, page_size=ps, num_pages=pages, **options)

    # allocator and library warm-up on a small problem (ours compiles per row in its own warm_up)
    run_decoder(lambda: NaiveDecoder(model), model, list(range(64)), 2, 4, warm=False)
    if hf is not None:
        run_hf(hf, list(range(64)), 2, 4)

    bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    modes = {"eager": dict(cuda_graphs=False)}  # column prefix -> TreeDecoder options
    if on_gpu and backend != "torch":
        modes = {"graph": dict(cuda_graphs=True), **({"compiled": dict(cuda_graphs=True, compile_layers=True)}
                                                     if args.compile else {}), **modes}
    elif args.compile:
        modes["compiled"] = dict(cuda_graphs=False, compile_layers=True)
    rows = []
    print(f"decode on {device_name(device)}" + (f", {torch.get_num_threads()} torch thread(s)" if not on_gpu else ""))
    print(f"floor ceilings measured now: copy {gbps:.0f} GB/s, matmul {tflops:.3g} TFLOP/s", flush=True)
    print(table_header(COLUMNS), flush=True)
    for p_len, n in pairs:
        prompt = torch.randint(0, cfg.vocab_size, (p_len,)).tolist()
        row = {"P": p_len, "N": n, "S": new_tokens,
               "ideal_kv_ratio": n * (p_len + new_tokens) / (p_len + n * new_tokens),
               "floor_tok/s": decode_floor(model, p_len, n, new_tokens, gbps, tflops)}
        naive_bytes = n * (p_len + new_tokens) * bytes_per_token
        run_naive = "naive" in peers and (naive_max_n is None or n <= naive_max_n)
        naive_fits = naive_bytes <= 0.8 * free_memory(device)
        ours_runs = {mode: [] for mode in modes}
        naive_runs, hf_runs = [], []
        for _ in range(args.reps):  # interleaved, so load changes hit every provider alike
            for mode, options in modes.items():
                ours_runs[mode].append(run_decoder(ours(p_len, n, new_tokens, **options), model, prompt, n, new_tokens,
                                                   warm=True))
            if run_naive and naive_fits:
                naive_runs.append(run_decoder(lambda: NaiveDecoder(model), model, prompt, n, new_tokens, warm=False))
            hf_bytes = naive_bytes + n * p_len * 3 * cfg.intermediate_size * model.dtype.itemsize
            if hf is not None and hf_bytes <= 0.8 * free_memory(device):
                hf_runs.append(run_hf(hf, prompt, n, new_tokens))
        medians = {mode: median_run(runs) for mode, runs in ours_runs.items()}
        for mode, run in medians.items():
            row[f"{mode}_tok/s"] = run["tok_s"]
        fastest = [m for m in ("graph", "compiled") if m in medians] or list(medians)
        best = max((medians[m] for m in fastest), key=lambda r: r["tok_s"])
        row.update({"ours_kv_MB": best["kv_MB"], "ours_mem_MB": best["mem_MB"], "syncs/step": best["syncs"],
                    "efficiency": best["tok_s"] / row["floor_tok/s"]})
        if hf_runs:
            row["hf_tok/s"] = statistics.median(hf_runs)
            row["vs_hf"] = best["tok_s"] / row["hf_tok/s"]
        elif hf is not None:
            row["hf_tok/s"] = "skipped: memory"
        if "naive" in peers and not run_naive:
            row["naive_tok/s"] = "skipped: --quick"
        elif run_naive and not naive_fits:
            row["naive_tok/s"] = f"skipped: needs {naive_bytes / 2**30:.1f} GiB"
        elif naive_runs:
            slow = median_run(naive_runs)
            row.update({"naive_tok/s": slow["tok_s"], "naive_kv_MB": slow["kv_MB"], "naive_mem_MB": slow["mem_MB"],
                        "speedup": best["tok_s"] / slow["tok_s"], "kv_ratio": slow["kv_MB"] / best["kv_MB"]})
            row.update(agreement(model, ours(p_len, 1, new_tokens + 1, cuda_graphs=False), prompt, best["tokens"],
                                 slow["tokens"]))
        rows.append(row)
        print(table_row(COLUMNS, row), flush=True)
        write_results("bench_decode", device, COLUMNS, rows, [], prefix=prefix, legend=LEGEND, complete=False)
        if on_gpu:
            torch.cuda.empty_cache()

    notes = [
        f"model: random-weight Llama, {params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, Hq={cfg.num_attention_heads}, Hkv={cfg.num_key_value_heads}, "
        f"D={cfg.head_dim}, vocab {cfg.vocab_size}, {str(model.dtype).replace('torch.', '')}, on {device_name(device)}",
        f"ours: TreeDecoder, backend {args.backend!r} ({backend} on this device where it implements the call), "
        f"page_size {ps}, warmed up on each row's tree; "
        "graph: CUDA-graph replay per token, compiled: the same with torch.compile'd layers, eager: the same "
        "iteration op by op",
        "decode tok/s = N*S / decode seconds of one generate_step (greedy, no stop tokens; sampling and Python "
        "overhead included, prefill excluded); hf: N*S / generate's seconds (sampling, its prefill included)",
        f"floor: measured copy bandwidth {gbps:.0f} GB/s and {str(dtype if on_gpu else torch.float32)[6:]} matmul "
        f"rate {tflops:.3g} TFLOP/s in this run; weights read = parameters but the embedding table",
        f"median of {args.reps} interleaved run(s) per provider and size; ideal_kv_ratio = N(P+S)/(P+N*S)",
        "no L2 flush needed: a decode iteration reads every weight (GBs on the GPU model), far more than the L2",
    ]
    if not on_gpu:
        notes.append(f"torch CPU threads: {torch.get_num_threads()}; CPU run: small model and sizes, ours uses the "
                     "compiled/torch CPU attention, so its speed here says little about the GPU")
    print_legend(LEGEND)
    lines = acceptance(rows) if on_gpu else [f"acceptance (decoder on GPU, {len(rows)} rows): not measured (a CPU run)"]
    print("\n".join(lines))
    json_path, md_path = write_results("bench_decode", device, COLUMNS, rows, notes + lines, prefix=prefix,
                                       legend=LEGEND)
    print(f"wrote {json_path} and {md_path}")


def acceptance(rows: list[dict]) -> list[str]:
    """Issue 11's acceptance lines (graph tok/s at each ACCEPTANCE size, >= 10x hf generate on every row), per GPU
    provider of ours; sizes this run has no row for are reported as not measured."""
    out = []
    for (p, n), target in ACCEPTANCE.items():
        row = next((r for r in rows if (r["P"], r["N"]) == (p, n)), None)
        measured = [(m, row[f"{m}_tok/s"]) for m in ("graph", "compiled")
                    if row is not None and isinstance(row.get(f"{m}_tok/s"), float)]
        if not measured:
            out.append(f"acceptance decode P={p} N={n} >= {target:,} tok/s: not measured (no graph row in this run)")
        for mode, ours in measured:
            out.append(f"acceptance decode P={p} N={n} {mode} >= {target:,} tok/s: {ours:,.0f} tok/s "
                       f"({ours / row['floor_tok/s']:.0%} of the floor) -> {'met' if ours >= target else 'NOT met'}")
    for row in rows:
        hf = row.get("hf_tok/s")
        ours = max((row[f"{m}_tok/s"] for m in ("graph", "compiled") if isinstance(row.get(f"{m}_tok/s"), float)),
                   default=None)
        if isinstance(hf, float) and ours is not None:
            out.append(f"acceptance decode P={row['P']} N={row['N']} >= 10x hf generate: {ours / hf:.1f}x -> "
                       f"{'met' if ours >= 10 * hf else 'NOT met'}")
    if not any("hf generate" in line for line in out):
        out.append("acceptance decode >= 10x hf generate: not measured (no row with both times in this run)")
    return out


if __name__ == "__main__":
    main()
