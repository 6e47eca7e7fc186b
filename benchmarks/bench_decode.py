"""Benchmark the reference decoder: TreeDecoder (one paged KV pool shared by all branches, o1kernels.tree_attention)
against NaiveDecoder (a dense KV copy per branch, per-branch torch SDPA), decoding N branches of one prompt.

Per (prompt length P, branches N): prefill P tokens once, fork N branches, decode S new tokens on every branch in one
generate_step (greedy, no stop tokens, so all N branches stay in the batch). Reported per decoder: decode tokens/s
(N*S / the decoder's measured decode seconds, sampling and Python overhead included), peak KV bytes it held (ours:
pages referenced; naive: its dense copies), fork time (naive copies the prompt KV N times), and on GPU the peak
memory allocated during decode; plus the speedup, the KV ratio next to its ideal N(P+S)/(P+N*S), and whether the
greedy tokens of the two decoders agree.

GPU (default when CUDA is available): a ~1.2B-parameter random-weight Llama-shaped model (hidden 2048, 16 layers,
Hq=32, Hkv=8, D=128, intermediate 8192, vocab 32000) in bf16, P in {1K, 4K, 16K}, N in {16, 64, 256}, S = 256; the
naive decoder is skipped where its KV copies would not fit in 80% of free GPU (CPU: available) memory.
CPU (--device cpu): a small fp32 model, P in {1K, 4K}, N in {16, 64}, S = 32, one thread (about two
minutes).

  python benchmarks/bench_decode.py [--device cpu|cuda] [--backend auto|torch|triton|cpu|cuda] [--page-size 16]
                                    [--prompt-lens 1024,4096] [--branches 16,64] [--new-tokens S] [--reps N]
                                    [--threads N] [--out DIR_OR_PREFIX] [--update-shipped]
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (ArgumentParser, add_output_args, device_name, output_prefix, positive_int,  # noqa: E402
                    positive_ints, print_legend, table_header, table_row, write_results)

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
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}
COLUMNS = ["P", "N", "S", "ours_tok/s", "naive_tok/s", "speedup", "ours_kv_MB", "naive_kv_MB", "kv_ratio",
           "ideal_kv_ratio", "ours_fork_ms", "naive_fork_ms", "ours_mem_MB", "naive_mem_MB", "same_tokens"]
LEGEND = {
    "P, N, S": "prompt tokens, branches, new tokens per branch",
    "ours_tok/s, naive_tok/s": "decode tokens/s of TreeDecoder (ours) and NaiveDecoder",
    "speedup": "ours_tok/s / naive_tok/s",
    "ours_kv_MB, naive_kv_MB": "peak KV bytes held (ours: pages referenced; naive: dense copies)",
    "kv_ratio, ideal_kv_ratio": "naive_kv_MB / ours_kv_MB, and its ideal N(P+S)/(P+N*S)",
    "ours_fork_ms, naive_fork_ms": "time to fork N branches off the prompt",
    "ours_mem_MB, naive_mem_MB": "peak GPU memory allocated during decode (GPU only)",
    "same_tokens": "the two decoders' greedy tokens agree in every run",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_decoder(make_decoder, model, prompt: list[int], n: int, new_tokens: int) -> dict:
    """Prefill, fork n, decode new_tokens on all n; return timings, KV bytes and the generated tokens."""
    device = model.device
    dec = make_decoder()
    root = dec.add_prompt(prompt)
    sync(device)
    t0 = time.perf_counter()
    kids = dec.fork(root, n)
    dec.release(root)
    sync(device)
    fork_ms = (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = dec.generate_step(kids, max_new_tokens=new_tokens, stop_ids=set(), temperature=0.0)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"tok_s": dec.tokens_per_second(), "kv_MB": dec.stats["peak_kv_bytes"] / 2**20, "fork_ms": fork_ms,
            "mem_MB": mem, "tokens": out.new_tokens}


def free_memory(device: torch.device) -> int:
    """Bytes free on the GPU, or physical memory available on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode tokens/s (fork time: median too)."""
    mid = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    return {**mid, "fork_ms": statistics.median(r["fork_ms"] for r in runs)}


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
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
    ap.add_argument("--reps", type=int, default=None, help="runs per decoder and size, median reported "
                    "(default 1 on GPU, 3 on CPU)")
    add_output_args(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available (use --device cpu)")
    prefix = output_prefix(ap, args, "bench_decode", device)
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps is None:
        args.reps = 1 if device.type == "cuda" else 3
    backend = resolve_backend(args.backend, device, SUPPORTED_BACKENDS)
    torch.manual_seed(0)
    cfg = ModelConfig(**MODELS[device.type])
    model = Transformer(cfg, device=device, dtype=DTYPES[device.type]).eval()
    params = sum(p.numel() for p in model.parameters())
    prompts, branch_counts, new_tokens = SIZES[device.type]
    prompts, branch_counts = args.prompt_lens or prompts, args.branches or branch_counts
    new_tokens = args.new_tokens or new_tokens  # None when not given; the types reject 0
    ps = args.page_size

    def ours(prompt_len, n, s):
        pages = -(-prompt_len // ps) + n * -(-s // ps) + 1
        return lambda: TreeDecoder(model, backend=backend, page_size=ps, num_pages=pages)

    def naive():
        return NaiveDecoder(model)

    # warm-up (kernel compilation, allocator) on a small problem
    for make in (ours(64, 2, 4), naive):
        run_decoder(make, model, list(range(64)), 2, 4)

    bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    rows = []
    print(f"decode on {device_name(device)}" + (f", {torch.get_num_threads()} torch thread(s)"
                                                 if device.type == "cpu" else ""))
    print(table_header(COLUMNS), flush=True)
    for p_len in prompts:
        prompt = torch.randint(0, cfg.vocab_size, (p_len,)).tolist()
        for n in branch_counts:
            row = {"P": p_len, "N": n, "S": new_tokens,
                   "ideal_kv_ratio": n * (p_len + new_tokens) / (p_len + n * new_tokens)}
            naive_bytes = n * (p_len + new_tokens) * bytes_per_token
            naive_fits = naive_bytes <= 0.8 * free_memory(device)
            fast_runs, slow_runs = [], []
            for _ in range(args.reps):  # interleaved, so load changes hit both decoders alike
                fast_runs.append(run_decoder(ours(p_len, n, new_tokens), model, prompt, n, new_tokens))
                if naive_fits:
                    slow_runs.append(run_decoder(naive, model, prompt, n, new_tokens))
            fast = median_run(fast_runs)
            row.update({"ours_tok/s": fast["tok_s"], "ours_kv_MB": fast["kv_MB"], "ours_fork_ms": fast["fork_ms"],
                        "ours_mem_MB": fast["mem_MB"]})
            if not naive_fits:
                row["naive_tok/s"] = f"skipped: needs {naive_bytes / 2**30:.1f} GiB"
            else:
                slow = median_run(slow_runs)
                row.update({"naive_tok/s": slow["tok_s"], "naive_kv_MB": slow["kv_MB"],
                            "naive_fork_ms": slow["fork_ms"], "naive_mem_MB": slow["mem_MB"],
                            "speedup": fast["tok_s"] / slow["tok_s"], "kv_ratio": slow["kv_MB"] / fast["kv_MB"],
                            "same_tokens": all(f["tokens"] == s["tokens"] for f in fast_runs for s in slow_runs)})
            rows.append(row)
            print(table_row(COLUMNS, row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    notes = [
        f"model: random-weight Llama, {params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, Hq={cfg.num_attention_heads}, Hkv={cfg.num_key_value_heads}, "
        f"D={cfg.head_dim}, vocab {cfg.vocab_size}, {str(model.dtype).replace('torch.', '')}, on {device_name(device)}",
        f"ours: TreeDecoder, tree_attention backend {backend!r}, page_size {ps}; naive: NaiveDecoder (dense KV copy "
        "per branch, per-branch SDPA, batched MLPs)",
        "decode tok/s = N*S / decode seconds of one generate_step (greedy, no stop tokens; sampling and Python "
        "overhead included, prefill excluded); kv_MB = peak KV bytes held by the decoder (naive: its dense copies)",
        f"median of {args.reps} interleaved run(s) per decoder and size; ideal_kv_ratio = N(P+S)/(P+N*S); "
        "same_tokens: greedy tokens of the two decoders identical in every run",
    ]
    if device.type == "cpu":
        notes.append(f"torch CPU threads: {torch.get_num_threads()}")
        notes.append("CPU run: small model and sizes; ours on CPU uses the torch/compiled reference attention, not a "
                     "GPU kernel, so its speed here says little about the GPU")
    json_path, md_path = write_results("bench_decode", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND)
    print_legend(LEGEND)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
