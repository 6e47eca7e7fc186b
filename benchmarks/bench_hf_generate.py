"""Hugging Face generate on o1kernels' TreeCache vs stock generate: N sampled branches of one prompt.

Per (prompt length P, branches N), S new tokens per branch, same seed for both:
  stock: model.generate(prompt, do_sample=True, num_return_sequences=N, max_new_tokens=S), transformers' SDPA
         attention and DynamicCache (the prompt's KV copied into every row);
  ours:  generate_branches(model, prompt, cache=TreeCache(model), ...) on an identical model set to the "o1kernels"
         attention: the prompt prefilled once, forked into N rows, decode by tree_attention.
Reported: tokens/s = N*S / wall time of the whole call (prefill included); KV bytes held when generate returns (ours:
pool pages referenced x page bytes, K and V of all layers; stock: its DynamicCache tensors) next to the exact sharing
figure (P + N*S) tokens, i.e. the prompt once and S tokens per branch; peak GPU memory; same_tokens (every row
identical; expected in fp32, bf16 rounding may diverge a sampled row).

What TreeCache holds, exactly: the prompt but its last token once ((P-1) tokens) plus per branch its last prompt token
and the S-1 generated tokens that were fed back (transformers never runs the last sampled token): (P-1) + N*S tokens,
each part rounded up to whole pages. With page_size 16, P = 1024 and S = 64 that is 64 + N*4 pages = exactly
(P + N*S) tokens.

GPU (default when CUDA is available): a ~1.2B-parameter random Llama (hidden 2048, 16 layers, Hq 32, Hkv 8, D 128,
intermediate 8192, vocab 32000) in bf16, P = 1024, N in {16, 256}, S = 128, backend auto (Triton).
CPU (--device cpu): a small fp32 model, P = 1024, N = 16, S = 64, one thread (the KV-bytes figure of issue 12).

  python benchmarks/bench_hf_generate.py [--device cpu|cuda] [--prompt-lens 1024] [--branches 16,256]
                                         [--new-tokens S] [--page-size 16] [--backend auto] [--dtype ...]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import device_name, markdown_table, positive_int, positive_ints, write_results  # noqa: E402

import transformers  # noqa: E402

from o1kernels.integrations.transformers import ATTN_IMPLEMENTATION, TreeCache, generate_branches  # noqa: E402

MODELS = {
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "cpu": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=32),
}
SIZES = {"cuda": ((1024,), (16, 256), 128), "cpu": ((1024,), (16,), 64)}  # (prompt lengths, branch counts, S)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ["P", "N", "S", "ours_tok/s", "stock_tok/s", "speedup", "ours_kv_MB", "stock_kv_MB", "exact_kv_MB",
           "ours_pages", "ours_mem_MB", "stock_mem_MB", "same_tokens"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), wall seconds, peak GPU MB or None)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return out, seconds, mem


def run(stock, ours, prompt: torch.Tensor, n: int, new_tokens: int, page_size: int, backend: str, seed: int = 0):
    """One stock and one TreeCache generate of n branches; returns the row's measurements."""
    device = prompt.device
    kwargs = dict(do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=0, return_dict_in_generate=True)
    torch.manual_seed(seed)
    stock_out, stock_s, stock_mem = timed(lambda: stock.generate(prompt, **kwargs), device)
    stock_cache = getattr(stock_out, "cache", None) or stock_out.past_key_values  # renamed in newer transformers
    stock_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in stock_cache.layers)
    stock_sequences = stock_out.sequences
    del stock_out, stock_cache
    cache = TreeCache(ours, page_size=page_size, backend=backend)
    torch.manual_seed(seed)
    our_out, our_s, our_mem = timed(lambda: generate_branches(ours, prompt, cache=cache, **kwargs), device)
    bytes_per_token = cache.pool.bytes_per_token
    p = prompt.shape[1]
    row = {"P": p, "N": n, "S": new_tokens, "ours_tok/s": n * new_tokens / our_s,
           "stock_tok/s": n * new_tokens / stock_s, "speedup": stock_s / our_s,
           "ours_kv_MB": cache.kv_bytes() / 2**20, "stock_kv_MB": stock_bytes / 2**20,
           "exact_kv_MB": (p + n * new_tokens) * bytes_per_token / 2**20, "ours_pages": cache.pool.pages_in_use,
           "ours_mem_MB": our_mem, "stock_mem_MB": stock_mem,
           "same_tokens": bool(torch.equal(stock_sequences, our_out.sequences)),
           "ours_kv_bytes": cache.kv_bytes(), "exact_kv_bytes": (p + n * new_tokens) * bytes_per_token,
           "ours_tokens_stored": sum(cache.branch_length(b) for b in cache.rows) - (n - 1) * (p - 1),
           "stock_kv_bytes": stock_bytes, "bytes_per_token": bytes_per_token}
    cache.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--backend", default="auto", help="TreeCache backend (tree_attention / merge_states)")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--page-size", type=positive_int, default=16)
    ap.add_argument("--prompt-lens", type=positive_ints, default=None, help="comma-separated P values")
    ap.add_argument("--branches", type=positive_ints, default=None, help="comma-separated N values")
    ap.add_argument("--new-tokens", type=positive_int, default=None, help="S (default 128 on GPU, 64 on CPU)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default 1 on CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available (use --device cpu)")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    prompts, branch_counts, new_tokens = SIZES[device.type]
    prompts, branch_counts = args.prompt_lens or prompts, args.branches or branch_counts
    new_tokens = args.new_tokens or new_tokens

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODELS[device.type], max_position_embeddings=max(prompts) + new_tokens + 16,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):  # random init on the device: minutes faster than on the host for the 1.2B model
        stock = transformers.LlamaForCausalLM(config).to(dtype).eval()
    stock.set_attn_implementation("sdpa")
    stock.generation_config.eos_token_id = None  # every branch generates S tokens
    ours = copy.deepcopy(stock)
    ours.set_attn_implementation(ATTN_IMPLEMENTATION)
    params = sum(p.numel() for p in stock.parameters())

    warm = torch.randint(3, config.vocab_size, (1, 40), device=device)  # compile kernels, warm the allocator
    run(stock, ours, warm, 4, 4, args.page_size, args.backend)
    rows = []
    for p_len in prompts:
        prompt = torch.randint(3, config.vocab_size, (1, p_len), device=device)
        for n in branch_counts:
            rows.append(run(stock, ours, prompt, n, new_tokens, args.page_size, args.backend))
            print(markdown_table(COLUMNS, rows[-1:]).splitlines()[-1], flush=True)

    notes = [
        f"model: random-weight transformers LlamaForCausalLM, {params / 1e6:.1f}M parameters, hidden "
        f"{config.hidden_size}, {config.num_hidden_layers} layers, Hq={config.num_attention_heads}, "
        f"Hkv={config.num_key_value_heads}, D={config.head_dim}, {str(dtype).replace('torch.', '')}, transformers "
        f"{transformers.__version__}, on {device_name(device)}",
        f"ours: generate_branches + TreeCache (page_size {args.page_size}, backend {args.backend!r}); stock: "
        "model.generate with SDPA and DynamicCache; sampling, same seed, one run each after a warm-up",
        "tok/s = N*S / wall time of the whole generate call (prefill included); kv_MB = KV bytes held when generate "
        "returns (ours: pool pages referenced x page bytes, K+V, all layers; stock: its DynamicCache tensors); "
        "exact_kv_MB = (P + N*S) tokens x bytes per token (the prompt once + S tokens per branch)",
        "ours holds (P-1) prompt tokens once + per branch its last prompt token and S-1 generated tokens (the last "
        "sampled token is never fed back), each part in whole pages",
    ]
    if device.type == "cpu":
        notes.append(f"torch CPU threads: {torch.get_num_threads()}; CPU timings say nothing about the GPU")
    json_path, md_path = write_results("bench_hf_generate", device, COLUMNS, rows, notes)
    print(markdown_table(COLUMNS, rows))
    for r in rows:
        print(f"P={r['P']} N={r['N']} S={r['S']}: TreeCache holds {r['ours_pages']} pages x {args.page_size} tokens "
              f"x {r['bytes_per_token']} B = {r['ours_kv_bytes']} B; prompt once + N x S = {r['P'] + r['N'] * r['S']} "
              f"tokens = {r['exact_kv_bytes']} B ({'equal' if r['ours_kv_bytes'] == r['exact_kv_bytes'] else 'differs'}"
              f"; {r['ours_tokens_stored']} tokens stored); stock DynamicCache {r['stock_kv_bytes']} B")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
