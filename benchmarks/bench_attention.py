"""Benchmark: shared-prefix / tree decode attention against per-branch decode and the stock-kernel composition.

One decode step of B branches over one shared prompt of P tokens, each branch with its own suffix of S tokens
(its new token included); plus a beam-search-shaped tree. Providers (same inputs, same run):
  naive_sdpa        every branch attends over its own copy of prefix + suffix (one batched SDPA call)
  torch_flash_comp  the stock composition (Hydragen's decomposition on torch's own flash kernel): the prefix as
                    ONE dense non-causal attention whose query rows are all branches x GQA heads of a kv head
                    (aten._scaled_dot_product_flash_attention, which returns the LSE), each suffix as a batched
                    attention, merged by LSE in torch ops
  naive_flash_attn  the copies through flash_attn_with_kvcache (when flash-attn is installed)
  flashinfer        FlashInfer's two-level cascade (when installed)
  shared_prefix[b]  o1kernels.shared_prefix_attention with a SharedPrefixPlan built once (backend b)
  tree[b]           o1kernels.tree_attention on a paged pool (page_size 16), plan built once (backend b)
  tree[b,path]      the same plan with its path forced ("cascade" / "decode"; --paths)
  tree[b,tuned]     the same plan after plan.tune() on these inputs (GPU, --tune)
Per provider: eager time, time inside a replayed CUDA graph (GPU), host overhead = eager - graph, the floor
= max(unique bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate) and efficiency = floor / time,
speedups over naive_sdpa and torch_flash_comp (graph times on GPU), the path our plan chose, max |o - o_ref|.

    python benchmarks/bench_attention.py                 # GPU grid, bf16
    python benchmarks/bench_attention.py --quick         # GPU: the acceptance shapes only (~1 minute)
    python benchmarks/bench_attention.py --device cpu    # small shapes, fp32
Results go to a new timestamped file under benchmarks/results/ (--out DIR_OR_PREFIX elsewhere; --update-shipped
overwrites the shipped bench_attention_<cpu|gpu>.*).

Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1 set before launching); its CPU times are
then no speed measurement, so the CPU run skips Triton unless that variable is set.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import o1kernels  # noqa: E402
from common import (ArgumentParser, add_output_args, bench, bench_cuda_graph, floor_ms, l2_bytes,  # noqa: E402
                    measured_copy_gbps, measured_matmul_tflops, output_prefix, print_legend, rotating_sets,
                    table_header, table_row, write_results)

PAGE_SIZE = 16


@dataclass(frozen=True)
class Shape:
    """A decode step: B branches over a P-token prompt, each with an S-token suffix; or (tree=True) the beam tree."""

    p: int
    b: int
    s: int
    hq: int = 32
    hkv: int = 8
    d: int = 128
    tree: bool = False

    def __str__(self):
        kind = "beam tree" if self.tree else "prefix"
        return f"{kind} P={self.p} B={self.b} S={self.s} Hq={self.hq} Hkv={self.hkv} D={self.d}"


# The beam-search-shaped tree: a 4096-token prompt, 3 step levels of 128 tokens with fan-out 4 (4, 16, 64 nodes)
# and a 32-token tail per leaf (64 queries).
BEAM_TREE = dict(prompt=4096, levels=3, fanout=4, step=128, tail=32)
GPU_SHAPES = [Shape(32768, 256, 128), Shape(16384, 64, 256), Shape(4096, 64, 128), Shape(1024, 8, 128),
              Shape(256, 16, 32), Shape(256, 64, 32), Shape(128, 8, 16), Shape(32768, 64, 256), Shape(16384, 256, 128),
              Shape(4096, 16, 128), Shape(1024, 64, 128), Shape(4096, 64, 128, hkv=1), Shape(1024, 16, 32, hkv=1),
              Shape(256, 16, 32, hkv=1), Shape(4096, 64, 32, tree=True)]
QUICK_SHAPES = [Shape(32768, 256, 128), Shape(16384, 64, 256), Shape(4096, 64, 128), Shape(1024, 8, 128),
                Shape(256, 16, 32), Shape(4096, 64, 128, hkv=1), Shape(256, 16, 32, hkv=1), Shape(4096, 64, 32, tree=True)]
CPU_SHAPES = [Shape(1024, 32, 32, 8, 2, 64), Shape(256, 8, 32, 8, 2, 64), Shape(1024, 8, 128, 8, 2, 64),
              Shape(256, 16, 32, 8, 1, 64), Shape(512, 16, 16, 8, 2, 64, tree=True)]
# The attention-speed acceptance (on one H100/H200, graph times): P=32K/B=256/S=128 within 0.30 ms, >= 1.5x the
# torch-flash composition at P >= 4K, the auto path never slower than naive SDPA.
ACCEPT_32K_MS, ACCEPT_X_COMP = 0.30, 1.5
COLUMNS = ["shape", "provider", "sets", "eager_ms", "graph_ms", "host_us", "floor_ms", "eff_eager", "eff_graph",
           "x_naive", "x_comp", "path", "max_err"]
LEGEND = {
    "shape": "prefix: B branches over a P-token prompt, S-token suffix each; beam tree: see the notes",
    "provider": "see the module docstring; ours: shared_prefix[backend], tree[backend(,path|tuned)]",
    "sets": "input sets the timed calls rotate through, so that on a GPU they read HBM, not L2 (1 on the CPU)",
    "eager_ms": "median time per call, plain launches",
    "graph_ms": "median time per call replayed inside a CUDA graph (GPU only)",
    "host_us": "eager_ms - graph_ms: host work per call (Python, launches)",
    "floor_ms": "max(unique bytes / measured copy bandwidth, FLOPs / measured matmul rate)",
    "eff_eager": "floor_ms / eager_ms",
    "eff_graph": "floor_ms / graph_ms",
    "x_naive": "speedup over naive_sdpa (graph times on a GPU, eager on the CPU)",
    "x_comp": "speedup over torch_flash_comp (likewise)",
    "path": "ours: the plan's shared work items, partial slots and direct (query, segment) pairs",
    "max_err": "max |o - o_ref|, o_ref = naive_sdpa (else torch_flash_comp)",
}


def rand(shape, dtype, device):
    return torch.randn(*shape, device=device, dtype=dtype)


# ---- the prefix/suffix step -----------------------------------------------------------------------------------------
def prefix_inputs(sh: Shape, dtype, device):
    """q [B, Hq, D], prefix k/v [1, P, Hkv, D], suffix k/v [B, S, Hkv, D] (full lengths)."""
    return (rand((sh.b, sh.hq, sh.d), dtype, device), rand((1, sh.p, sh.hkv, sh.d), dtype, device),
            rand((1, sh.p, sh.hkv, sh.d), dtype, device), rand((sh.b, sh.s, sh.hkv, sh.d), dtype, device),
            rand((sh.b, sh.s, sh.hkv, sh.d), dtype, device))


def paged_pool(chunks, hkv, d):
    """Lay token runs [T_i, Hkv, D] out in pages of PAGE_SIZE: (k_pool, page lists)."""
    pages, pool, n = [], [], 0
    for x in chunks:
        count = -(-x.shape[0] // PAGE_SIZE)
        padded = x.new_zeros(count * PAGE_SIZE, hkv, d)
        padded[: x.shape[0]] = x
        pool.append(padded.view(count, PAGE_SIZE, hkv, d))
        pages.append(list(range(n, n + count)))
        n += count
    return torch.cat(pool), pages


def prefix_tree(pk, pv, sk, sv):
    """The prompt and the suffixes in a paged pool, and the two-level segments."""
    b, s = sk.shape[:2]
    k_cache, pages = paged_pool([pk[0]] + list(sk), pk.shape[2], pk.shape[3])
    v_cache, _ = paged_pool([pv[0]] + list(sv), pk.shape[2], pk.shape[3])
    segments = [(pages[0], pk.shape[1], list(range(b)))] + [(pages[1 + i], s, [i]) for i in range(b)]
    return k_cache, v_cache, segments


def flash_with_lse(q, k, v, scale):
    """Non-causal attention of q [N, H, M, D] over k, v [N, H, T, D] (same H) with torch's flash kernel:
    (o [N, H, M, D], lse [N, H, M] natural log)."""
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out[0], out[1]


def torch_flash_composition(q, pk, pv, sk, sv):
    """The stock peer: prefix as one dense attention of all branches' rows, suffixes batched, LSE merge."""
    b, hq, d = q.shape
    hkv = pk.shape[2]
    g = hq // hkv
    scale = d ** -0.5
    k_pre, v_pre = pk.permute(0, 2, 1, 3), pv.permute(0, 2, 1, 3)  # [1, Hkv, P, D]
    k_suf, v_suf = sk.transpose(1, 2), sv.transpose(1, 2)  # [B, Hkv, S, D]

    def run():
        rows = q.view(b, hkv, g, d).transpose(0, 1).reshape(1, hkv, b * g, d)  # all branches x group of a kv head
        o_pre, lse_pre = flash_with_lse(rows, k_pre, v_pre, scale)
        o_pre = o_pre.view(hkv, b, g, d).transpose(0, 1).reshape(b, hq, d)
        lse_pre = lse_pre.view(hkv, b, g).transpose(0, 1).reshape(b, hq)
        o_suf, lse_suf = flash_with_lse(q.view(b, hkv, g, d), k_suf, v_suf, scale)
        o_suf, lse_suf = o_suf.reshape(b, hq, d), lse_suf.reshape(b, hq)
        m = torch.maximum(lse_pre, lse_suf)
        w_pre, w_suf = torch.exp(lse_pre - m), torch.exp(lse_suf - m)
        o = (w_pre.unsqueeze(-1) * o_pre + w_suf.unsqueeze(-1) * o_suf) / (w_pre + w_suf).unsqueeze(-1)
        return o.to(q.dtype)

    return run


def naive_sdpa(q, per_branch_k, per_branch_v):
    """Each branch over its own dense copy: k, v [B, Hkv, T, D]."""
    return lambda: F.scaled_dot_product_attention(q.unsqueeze(2), per_branch_k, per_branch_v, enable_gqa=True).squeeze(2)


def flashinfer_cascade(q, pk, sk, k_cache, v_cache):
    """FlashInfer's two-level cascade over the same paged pool as tree[*] (when installed)."""
    import flashinfer

    b, hq, d = q.shape
    p, hkv = pk.shape[1:3]
    s = sk.shape[1]
    pp, sp = -(-p // PAGE_SIZE), -(-s // PAGE_SIZE)
    i32 = dict(dtype=torch.int32, device=q.device)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, torch.empty(256 << 20, dtype=torch.uint8,
                                                                          device=q.device), "NHD")
    wrapper.plan([torch.tensor([0, b], **i32), torch.arange(b + 1, **i32)],
                 [torch.tensor([0, pp], **i32), torch.arange(b + 1, **i32) * sp],
                 [torch.arange(pp, **i32), torch.arange(pp, pp + b * sp, **i32)],
                 [torch.tensor([p - (pp - 1) * PAGE_SIZE], **i32), torch.full((b,), s - (sp - 1) * PAGE_SIZE, **i32)],
                 hq, hkv, d, PAGE_SIZE, causal=False, q_data_type=q.dtype)
    return lambda: wrapper.run(q, (k_cache, v_cache))


# ---- the beam tree ---------------------------------------------------------------------------------------------------
def beam_tree_inputs(sh: Shape, dtype, device):
    """q [leaves, Hq, D], a paged pool of every node's tokens, segments, and each leaf's root-to-leaf token runs."""
    cfg = BEAM_TREE
    nodes = [(cfg["prompt"], -1)]  # (length, parent)
    level = [0]
    for _ in range(cfg["levels"]):
        nxt = []
        for parent in level:
            for _ in range(cfg["fanout"]):
                nodes.append((cfg["step"], parent))
                nxt.append(len(nodes) - 1)
        level = nxt
    for parent in list(level):
        nodes.append((cfg["tail"], parent))
    leaves = list(range(len(nodes) - len(level), len(nodes)))
    ks = [rand((n, sh.hkv, sh.d), dtype, device) for n, _ in nodes]
    vs = [rand((n, sh.hkv, sh.d), dtype, device) for n, _ in nodes]
    k_cache, pages = paged_pool(ks, sh.hkv, sh.d)
    v_cache, _ = paged_pool(vs, sh.hkv, sh.d)
    below = {i: [] for i in range(len(nodes))}
    chains = []
    for row, leaf in enumerate(leaves):
        chain, node = [], leaf
        while node != -1:
            below[node].append(row)
            chain.append(node)
            node = nodes[node][1]
        chains.append(chain[::-1])
    segments = [(pages[i], nodes[i][0], below[i]) for i in range(len(nodes))]
    q = rand((len(leaves), sh.hq, sh.d), dtype, device)
    return q, k_cache, v_cache, segments, ks, vs, chains


# ---- counting ----------------------------------------------------------------------------------------------------
def work_of(sh: Shape, elem: int, segments=None, num_queries=None):
    """(unique bytes that must move, FLOPs) of one step."""
    token_bytes = 2 * sh.hkv * sh.d * elem
    if segments is None:
        unique_tokens, attended = sh.p + sh.b * sh.s, sh.b * (sh.p + sh.s)
        num_queries = sh.b
    else:
        unique_tokens = sum(length for _, length, _ in segments)
        attended = sum(length * len(qs) for _, length, qs in segments)
    qo_bytes = 2 * num_queries * sh.hq * sh.d * elem
    return unique_tokens * token_bytes + qo_bytes, 4 * attended * (sh.hq // sh.hkv) * sh.d


def path_summary(plan, sh: Shape, elem: int) -> str:
    lay = plan.layout("fused", sh.hq, sh.hkv, sh.d, elem)
    return f"{lay.num_work} items, {lay.num_partials} partials, {lay.num_direct} direct"


def providers(sh: Shape, dtype, device, args, notes, tuned: dict):
    """(name -> (callable returning o, path note or None), reference name, bytes, FLOPs) over a fresh input set.
    tuned: backend -> what plan.tune() chose, filled by the first set (--tune) and reused by the others."""
    runs = {}
    elem = torch.empty((), dtype=dtype).element_size()
    backends = [b for b, reason in o1kernels.available_backends(device).items() if reason is None]
    if args.backends:
        backends = [b for b in backends if b in args.backends]
    if sh.tree:
        q, k_cache, v_cache, segments, ks, vs, chains = beam_tree_inputs(sh, dtype, device)
        nbytes, flops = work_of(sh, elem, segments, q.shape[0])
        copies_bytes = sum(sum(ks[n].shape[0] for n in c) for c in chains) * 2 * sh.hkv * sh.d * elem
        if copies_bytes <= args.naive_limit:
            k = torch.stack([torch.cat([ks[n] for n in c]) for c in chains]).transpose(1, 2).contiguous()
            v = torch.stack([torch.cat([vs[n] for n in c]) for c in chains]).transpose(1, 2).contiguous()
            runs["naive_sdpa"] = (naive_sdpa(q, k, v), None)
    else:
        q, pk, pv, sk, sv = prefix_inputs(sh, dtype, device)
        nbytes, flops = work_of(sh, elem)
        if 2 * sh.b * (sh.p + sh.s) * sh.hkv * sh.d * elem <= args.naive_limit:
            k = torch.cat([pk.expand(sh.b, -1, -1, -1), sk], dim=1).transpose(1, 2).contiguous()
            v = torch.cat([pv.expand(sh.b, -1, -1, -1), sv], dim=1).transpose(1, 2).contiguous()
            runs["naive_sdpa"] = (naive_sdpa(q, k, v), None)
            try:
                from flash_attn import flash_attn_with_kvcache

                if device.type == "cuda":
                    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
                    runs["naive_flash_attn"] = (lambda: flash_attn_with_kvcache(q.unsqueeze(1), kt, vt).squeeze(1), None)
            except ImportError:
                pass
        runs["torch_flash_comp"] = (torch_flash_composition(q, pk, pv, sk, sv), None)
        k_cache, v_cache, segments = prefix_tree(pk, pv, sk, sv)
        for backend in backends:
            plan = o1kernels.SharedPrefixPlan(sh.b, sh.p, sh.s, device=device, num_heads=(sh.hq, sh.hkv), head_dim=sh.d)
            runs[f"shared_prefix[{backend}]"] = (
                lambda bk=backend, pl=plan: o1kernels.shared_prefix_attention(q, pk, pv, sk, sv, backend=bk, plan=pl),
                path_summary(plan, sh, elem) if backend == "triton" else "split")
        if device.type == "cuda":
            try:
                runs["flashinfer"] = (flashinfer_cascade(q, pk, sk, k_cache, v_cache), None)
            except ImportError:
                pass
            except Exception as exc:  # report, keep benchmarking the others
                notes.add(f"flashinfer failed: {type(exc).__name__}: {exc}")
    for backend in backends:
        for path in ("auto",) + (("cascade", "decode") if args.paths and backend == "triton" else ()):
            plan = o1kernels.TreeAttentionPlan(segments, q.shape[0], PAGE_SIZE, device=device, path=path,
                                               num_heads=(sh.hq, sh.hkv), head_dim=sh.d)
            name = f"tree[{backend}]" if path == "auto" else f"tree[{backend},{path}]"
            runs[name] = (lambda bk=backend, pl=plan: o1kernels.tree_attention(q, k_cache, v_cache, pl, backend=bk),
                          path_summary(plan, sh, elem) if backend == "triton" else "split")
            if args.tune and path == "auto" and device.type == "cuda" and backend != "torch":  # torch has no tiles
                plan = o1kernels.TreeAttentionPlan(segments, q.shape[0], PAGE_SIZE, device=device,
                                                   num_heads=(sh.hq, sh.hkv), head_dim=sh.d)
                o1kernels.tree_attention(q, k_cache, v_cache, plan, backend=backend)
                if backend not in tuned:
                    tuned[backend] = plan.tune(q, ((k_cache, v_cache),), backend=backend)
                choice = tuned[backend]
                plan.path, plan.tuned = choice["path"], {"config": choice["config"]}
                runs[f"tree[{backend},tuned]"] = (
                    lambda bk=backend, pl=plan: o1kernels.tree_attention(q, k_cache, v_cache, pl, backend=bk),
                    f"{choice['path']} {choice['config']}")
    reference = "naive_sdpa" if "naive_sdpa" in runs else "torch_flash_comp" if "torch_flash_comp" in runs else None
    return runs, reference, nbytes, flops


def main():
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--quick", action="store_true", help="the acceptance shapes only (GPU: about a minute)")
    ap.add_argument("--backends", default=None, help="comma-separated subset of our backends (default: all available)")
    ap.add_argument("--paths", action="store_true", help="also run tree plans with the path forced (cascade / decode)")
    ap.add_argument("--tune", action="store_true", help="also run tree plans tuned by plan.tune() (GPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per provider (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--no-planning", action="store_true",
                    help="skip the host planning table of PagedAttention (bench_planning.py; skipped with --quick)")
    add_output_args(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    prefix = output_prefix(ap, args, "bench_attention", device)
    if not on_gpu:
        torch.set_num_threads(args.threads or 1)
    args.backends = args.backends.split(",") if args.backends else None
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    shapes = (QUICK_SHAPES if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    reps = args.reps or (50 if on_gpu else 10)
    args.naive_limit = int(0.3 * torch.cuda.mem_get_info(device)[0]) if on_gpu else 1 << 30
    torch.manual_seed(0)
    gbps = measured_copy_gbps(device, 1 << 30 if on_gpu else 1 << 26)
    tflops = measured_matmul_tflops(device, 8192 if on_gpu else 512, dtype if on_gpu else torch.float32)
    notes = {f"dtype {str(dtype).replace('torch.', '')}, tree page_size {PAGE_SIZE}, median of {reps} runs; "
             f"measured in this run: copy {gbps:.0f} GB/s, matmul {tflops:.1f} TFLOP/s",
             "unique bytes: KV of every distinct token once (P + B*S, or the tree's nodes) + q + o; FLOPs: "
             "4 * (query, key) pairs * GQA group * D",
             f"naive copies are built only when they fit in {args.naive_limit / 2**30:.1f} GiB",
             f"beam tree: {BEAM_TREE['prompt']}-token prompt, {BEAM_TREE['levels']} levels of {BEAM_TREE['step']} tokens "
             f"with fan-out {BEAM_TREE['fanout']}, {BEAM_TREE['tail']}-token tail per leaf"}
    if not on_gpu:
        reason = o1kernels.available_backends(device)["triton"]
        notes.add("triton skipped on the CPU: " + reason if reason else
                  "triton ran under TRITON_INTERPRET=1: its CPU times are no speed measurement")
        notes.add(f"torch CPU threads: {torch.get_num_threads()}; CPU times say nothing about GPU speed")
    print(f"# bench_attention on {device}: copy {gbps:.0f} GB/s, matmul {tflops:.1f} TFLOP/s, "
          f"{str(dtype).replace('torch.', '')}", flush=True)
    if on_gpu:
        notes.add(f"L2 ({l2_bytes(device) / 2**20:.0f} MiB) kept out of the timings: each provider rotates through "
                  "enough input sets (the sets column) that the calls read more than twice the L2 between two uses of "
                  "one set")
    print(table_header(COLUMNS), flush=True)
    rows = []
    for sh in shapes:
        tuned = {}  # what plan.tune() chose on the first input set, reused on the others
        sets = [providers(sh, dtype, device, args, notes, tuned)]
        count = rotating_sets(sets[0][2], device)
        sets += [providers(sh, dtype, device, args, notes, tuned) for _ in range(count - 1)]
        runs, ref_name, nbytes, flops = sets[0]
        floor = floor_ms(nbytes, flops, gbps, tflops)
        reference = runs[ref_name][0]().float() if ref_name else None
        shape_rows = []
        for name, (fn, path) in runs.items():
            err = (fn().float() - reference).abs().max().item() if reference is not None else None
            fns = [s[0][name][0] for s in sets]
            eager = bench(fns, device, warmup=3 if on_gpu else 1, reps=reps)
            graph = bench_cuda_graph(fns, device, reps=max(10, reps // 2))
            shape_rows.append({"shape": str(sh), "provider": name, "sets": count, "eager_ms": eager, "graph_ms": graph,
                               "host_us": None if graph is None else (eager - graph) * 1e3, "floor_ms": floor,
                               "eff_eager": floor / eager, "eff_graph": None if graph is None else floor / graph,
                               "path": path, "max_err": err})
        best = {r["provider"]: r["graph_ms"] or r["eager_ms"] for r in shape_rows}
        for r in shape_rows:
            t = r["graph_ms"] or r["eager_ms"]
            r["x_naive"] = best["naive_sdpa"] / t if "naive_sdpa" in best else None
            r["x_comp"] = best["torch_flash_comp"] / t if "torch_flash_comp" in best else None
            print(table_row(COLUMNS, r), flush=True)
        rows += shape_rows
        write_results("bench_attention", device, COLUMNS, rows, sorted(notes), prefix=prefix, legend=LEGEND,
                      complete=False)
        del runs, sets
        if on_gpu:
            torch.cuda.empty_cache()
    print_legend(LEGEND)
    lines = acceptance(rows) if on_gpu else [f"acceptance (attention speed, {len(rows)} rows): not measured (a CPU run)"]
    print("\n".join(lines))
    json_path, md_path = write_results("bench_attention", device, COLUMNS, rows, sorted(notes) + lines, prefix=prefix,
                                       legend=LEGEND)
    print(f"wrote {json_path} and {md_path}")
    if not (args.quick or args.no_planning):  # the host side of the same attention: planning from block tables
        from benchmarks.bench_planning import main as planning

        print()
        planning(["--out", str(prefix.parent) + "/"] if args.out else ["--update-shipped"] if args.update_shipped else [])


def _ours(provider: str) -> bool:
    """Our providers with the plan's own paths (what backend="auto" runs on a GPU is the triton one)."""
    return provider.startswith(("shared_prefix[", "tree[")) and "," not in provider


def acceptance(rows: list[dict]) -> list[str]:
    """The attention-speed acceptance lines (graph times; reported, not asserted): P=32K B=256 S=128 within
    ACCEPT_32K_MS; >= ACCEPT_X_COMP x the torch-flash composition at every prefix shape with P >= 4K; the plan's
    auto path (tree[triton], shared_prefix[triton]: backend "auto" on a GPU) never slower than naive SDPA."""
    def best(shape_rows):
        mine = [r for r in shape_rows if _ours(r["provider"]) and r["graph_ms"] is not None]
        return min(mine, key=lambda r: r["graph_ms"]) if mine else None

    shapes = {}
    for r in rows:
        shapes.setdefault(r["shape"], []).append(r)
    out = []
    target = str(Shape(32768, 256, 128))
    r = best(shapes.get(target, []))
    out.append(f"acceptance {target} <= {ACCEPT_32K_MS} ms in a graph: " +
               (f"{r['provider']} {r['graph_ms']:.3f} ms -> {'met' if r['graph_ms'] <= ACCEPT_32K_MS else 'NOT met'}"
                if r else "not measured (no graph time of ours at that shape in this run)"))
    long = {k: v for k, v in shapes.items() if k.startswith("prefix P=") and int(k.split()[1][2:]) >= 4096}
    slow = [f"{k} ({best(v)['x_comp']:.2f}x)" for k, v in long.items() if best(v) and best(v)["x_comp"] is not None
            and best(v)["x_comp"] < ACCEPT_X_COMP]
    measured = [k for k, v in long.items() if best(v) and best(v)["x_comp"] is not None]
    out.append(f"acceptance >= {ACCEPT_X_COMP}x torch_flash_comp at P >= 4K: " +
               ("not measured (no such shape with graph times in this run)" if not measured else
                "met" if not slow else "NOT met at " + ", ".join(slow)) + f" ({len(measured)} shape(s))")
    auto = [r for r in rows if r["provider"] in ("tree[triton]", "shared_prefix[triton]") and r["x_naive"] is not None]
    behind = [f"{r['shape']} {r['provider']} ({r['x_naive']:.2f}x)" for r in auto if r["x_naive"] < 1.0]
    out.append("acceptance auto never slower than naive SDPA: " +
               ("not measured (no triton rows next to naive_sdpa in this run)" if not auto else
                "met" if not behind else "NOT met at " + "; ".join(behind)) + f" ({len(auto)} row(s))")
    return out


if __name__ == "__main__":
    main()
