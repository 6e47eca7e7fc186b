"""Benchmark: shared-prefix / tree decode attention vs. naive per-branch attention.

One decode step of B branches over one shared prompt of P tokens, each branch with its own suffix of
S tokens (its new token included). Providers:
  naive_sdpa          every branch attends over its own copy of prefix + suffix (one batched SDPA call)
  naive_flash_attn    the same copies through flash_attn_with_kvcache (when flash-attn is installed)
  flashinfer_cascade  FlashInfer's two-level MultiLevelCascadeAttentionWrapper (when installed)
  shared_prefix[b]    o1kernels.shared_prefix_attention, backend b
  tree[b]             o1kernels.tree_attention on a paged pool (page_size 16), backend b
Columns: median time, speedup vs naive_sdpa, GB/s on the bytes that must be read or written
(unique KV + q + o) and % of the device's datasheet peak, max |o - o_naive_sdpa|.

    python benchmarks/bench_attention.py                 # GPU shapes, bf16
    python benchmarks/bench_attention.py --device cpu    # small shapes, fp32, < 3 minutes

Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1 set before launching); its
CPU times are then no speed measurement, so the CPU run skips Triton unless that variable is set.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import o1kernels  # noqa: E402
from common import bench, peak_gbps, write_results  # noqa: E402

GPU_SHAPES = dict(P=(1024, 4096, 16384, 32768), B=(8, 64, 256), S=(128, 1024), Hq=32, Hkv=8, D=128)
CPU_SHAPES = dict(P=(256, 1024), B=(8, 32), S=(32, 128), Hq=8, Hkv=2, D=64)
PAGE_SIZE = 16
COLUMNS = ["P", "B", "S", "provider", "ms", "speedup_vs_naive", "GB/s", "%peak", "max_err"]


def make_inputs(p, b, s, hq, hkv, d, dtype, device):
    """q [B, Hq, D], prefix [1, P, Hkv, D], suffix [B, S, Hkv, D] (full lengths), random."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    return rand(b, hq, d), rand(1, p, hkv, d), rand(1, p, hkv, d), rand(b, s, hkv, d), rand(b, s, hkv, d)


def paged_tree(prefix_k, prefix_v, suffix_k, suffix_v):
    """The prompt and the suffixes laid out in a paged pool, and the two-level TreeAttentionPlan."""
    _, p, hkv, d = prefix_k.shape
    b, s = suffix_k.shape[:2]
    pp, sp = -(-p // PAGE_SIZE), -(-s // PAGE_SIZE)

    def pages(x, n):
        out = x.new_zeros(x.shape[0], n * PAGE_SIZE, hkv, d)
        out[:, : x.shape[1]] = x
        return out.reshape(-1, PAGE_SIZE, hkv, d)

    k_cache = torch.cat([pages(prefix_k, pp), pages(suffix_k, sp)])
    v_cache = torch.cat([pages(prefix_v, pp), pages(suffix_v, sp)])
    segments = [(list(range(pp)), p, list(range(b)))]
    segments += [(list(range(pp + i * sp, pp + (i + 1) * sp)), s, [i]) for i in range(b)]
    return k_cache, v_cache, o1kernels.TreeAttentionPlan(segments, b, PAGE_SIZE, device=prefix_k.device)


def naive_copies(prefix_k, prefix_v, suffix_k, suffix_v):
    """Every branch's own copy of prefix + suffix: k, v [B, Hkv, P + S, D]."""
    b = suffix_k.shape[0]
    k = torch.cat([prefix_k.expand(b, -1, -1, -1), suffix_k], dim=1).transpose(1, 2).contiguous()
    v = torch.cat([prefix_v.expand(b, -1, -1, -1), suffix_v], dim=1).transpose(1, 2).contiguous()
    return k, v


def flashinfer_cascade(q, prefix_k, prefix_v, suffix_k, suffix_v, k_cache, v_cache):
    """A run() closure of FlashInfer's two-level cascade over the same paged pool as tree[*]."""
    import flashinfer

    b, hq, d = q.shape
    p, hkv = prefix_k.shape[1:3]
    s = suffix_k.shape[1]
    pp, sp = -(-p // PAGE_SIZE), -(-s // PAGE_SIZE)
    i32 = dict(dtype=torch.int32, device=q.device)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    wrapper.plan(
        [torch.tensor([0, b], **i32), torch.arange(b + 1, **i32)],
        [torch.tensor([0, pp], **i32), torch.arange(b + 1, **i32) * sp],
        [torch.arange(pp, **i32), torch.arange(pp, pp + b * sp, **i32)],
        [torch.tensor([p - (pp - 1) * PAGE_SIZE], **i32), torch.full((b,), s - (sp - 1) * PAGE_SIZE, **i32)],
        hq, hkv, d, PAGE_SIZE, causal=False, q_data_type=q.dtype,
    )
    return lambda: wrapper.run(q, (k_cache, v_cache))


def providers(q, prefix_k, prefix_v, suffix_k, suffix_v, device, naive_limit_bytes, notes):
    """name -> zero-argument callable returning o [B, Hq, D]."""
    out = {}
    b, hq, d = q.shape
    naive_bytes = 2 * suffix_k.shape[0] * (prefix_k.shape[1] + suffix_k.shape[1]) * suffix_k[0, 0].numel() * q.element_size()
    if naive_bytes <= naive_limit_bytes:
        k, v = naive_copies(prefix_k, prefix_v, suffix_k, suffix_v)
        out["naive_sdpa"] = lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)
        try:
            from flash_attn import flash_attn_with_kvcache

            kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, T, Hkv, D] views of the same copies
            if device.type == "cuda":
                out["naive_flash_attn"] = lambda: flash_attn_with_kvcache(q.unsqueeze(1), kt, vt).squeeze(1)
        except ImportError:
            pass
    k_cache, v_cache, plan = paged_tree(prefix_k, prefix_v, suffix_k, suffix_v)
    if device.type == "cuda":
        try:
            out["flashinfer_cascade"] = flashinfer_cascade(q, prefix_k, prefix_v, suffix_k, suffix_v, k_cache, v_cache)
        except ImportError:
            pass
        except Exception as exc:  # report, keep benchmarking the others
            notes.add(f"flashinfer_cascade failed: {type(exc).__name__}: {exc}")
    for backend, reason in o1kernels.available_backends(device).items():
        if reason is not None:
            continue
        out[f"shared_prefix[{backend}]"] = (lambda bk=backend: o1kernels.shared_prefix_attention(
            q, prefix_k, prefix_v, suffix_k, suffix_v, backend=bk))
        out[f"tree[{backend}]"] = lambda bk=backend: o1kernels.tree_attention(q, k_cache, v_cache, plan, backend=bk)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per provider (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU, as the other benchmarks: on our shared 2-core machine "
                         "two threads gave time-slice spikes of 100x in single calls)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    reps = args.reps or (50 if on_gpu else 15)
    naive_limit = int(0.3 * torch.cuda.mem_get_info(device)[0]) if on_gpu else 1 << 30
    peak = peak_gbps(device)
    torch.manual_seed(0)

    notes = {f"dtype {str(dtype).replace('torch.', '')}, Hq={shapes['Hq']}, Hkv={shapes['Hkv']}, D={shapes['D']}, "
             f"tree page_size={PAGE_SIZE}, median of {reps} runs",
             "GB/s counts the bytes that must move: unique KV (P + B*S tokens) + q + o",
             f"naive copies are built only when they fit in {naive_limit / 2**30:.1f} GiB"}
    if not on_gpu:
        reason = o1kernels.available_backends(device)["triton"]
        notes.add("triton skipped on the CPU: " + reason if reason else
                  "triton ran under TRITON_INTERPRET=1: its CPU times are no speed measurement")
        notes.add("the torch backends are readable references (a Python loop over segments / groups), not fast "
                  "paths; CPU times of ms-scale calls are noisy when other jobs share the cores")
        notes.add(f"torch CPU threads: {torch.get_num_threads()}")
    rows = []
    for p, b, s in itertools.product(shapes["P"], shapes["B"], shapes["S"]):
        q, pk, pv, sk, sv = make_inputs(p, b, s, shapes["Hq"], shapes["Hkv"], shapes["D"], dtype, device)
        unique_bytes = ((p + b * s) * 2 * shapes["Hkv"] * shapes["D"] + 2 * b * shapes["Hq"] * shapes["D"]) * q.element_size()
        runs = providers(q, pk, pv, sk, sv, device, naive_limit, notes)
        reference = runs["naive_sdpa"]().float() if "naive_sdpa" in runs else None
        naive_ms = None
        for name, fn in runs.items():
            err = (fn().float() - reference).abs().max().item() if reference is not None else None
            ms = bench(fn, device, warmup=3 if on_gpu else 1, reps=reps)
            naive_ms = ms if name == "naive_sdpa" else naive_ms
            gbps = unique_bytes / (ms * 1e-3) / 1e9
            rows.append({"P": p, "B": b, "S": s, "provider": name, "ms": ms,
                         "speedup_vs_naive": naive_ms / ms if naive_ms else None, "GB/s": gbps,
                         "%peak": 100 * gbps / peak if peak else None, "max_err": err})
            print(" | ".join(f"{c}={rows[-1][c]:.4g}" if isinstance(rows[-1][c], float) else f"{c}={rows[-1][c]}"
                             for c in COLUMNS), flush=True)
        del runs
        if on_gpu:
            torch.cuda.empty_cache()
    json_path, md_path = write_results("bench_attention", device, COLUMNS, rows, sorted(notes))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
