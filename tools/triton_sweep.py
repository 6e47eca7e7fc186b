"""Offline resource sweep of the Triton kernels: every launch the launchers can make, compiled for a GPU that is
not here (sm_90a: H100/H200) with Triton's bundled ptxas, and what the compiler reports about it.

    python tools/triton_sweep.py [--jobs N] [--out PREFIX]

How the launches are found: the launchers themselves run (tree_attention.run_plan for tree and shared-prefix
plans, merge_states_triton, step_rewards_triton) on small CPU tensors inside `_target.compile_for(SM90)`, which
makes them choose sm_90's launch tables, with a stand-in Triton driver whose cache hook records each launch's exact
specialization (signature, constexprs, alignment, num_warps, num_stages) instead of compiling and launching it.
The calls cover dtypes (bf16, fp16, fp32, and fp32 with plan.fp32_precision = "tf32") x head dims 64/128/256 x GQA
groups x tile row classes x paths (cascade / decode, one- and two-source layouts; the variants positions + window +
softcap + sinks all on) x every tuning candidate
(partial_candidates, tuning_candidates), and for step rewards every table row and candidate of both paths. A new
constexpr or argument of a kernel comes in through its launcher with whatever value these calls give it; a new
launch-time feature needs a call below that turns it on.

Each distinct launch is compiled once (worker processes; Triton's cache, so an unchanged kernel is not compiled
again) and ptxas's report read (registers, spill stores and loads, stack frame; kept beside Triton's cache), with
the shared memory Triton allocates. Checks, exit status 1 when any fails:
  - shared memory of every launch within the target's limit;
  - launches of the default tables (role "default") without spills in fp16/bf16, and with at most
    FP32_SPILL_BOUND bytes of spill stores in fp32 (exact or TF32); tuning candidates are reported, not bounded;
  - the shared-memory estimates that filter tuning candidates (partial_shared_bytes, mlp_shared_bytes) at least what
    the compiler allocates, for every launch they describe;
  - tensor cores where they are meant to be: 16-bit partial-attention tiles of >= 64 rows and the 16-bit
    hidden-layer GEMM issue wgmma (the GEMM's loads through cp.async), and the 16-bit step head reads 16 bytes
    per load.
It prints one line per launch and a summary, and writes PREFIX.json and PREFIX.md (default build/triton_sweep).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's o1kernels, installed or not

FP32_SPILL_BOUND = 0  # bytes of spill stores allowed in the fp32 default tables (the 16-bit ones: none)
_DTYPE_OF = {"*bf16": "bf16", "*fp16": "fp16", "*fp32": "fp32"}


@dataclass
class Launch:
    """One distinct launch: what the compiler needs, where it came from, and what it reported."""

    module: str
    kernel: str
    signature: dict
    constants: dict  # argument index -> value (constexprs and arguments Triton specialised, e.g. strides of 1)
    attrs: dict  # argument index -> [[attribute, value]] (16-byte alignment)
    options: dict  # num_warps, num_stages, num_ctas, enable_fp_fusion
    label: str  # the first call that made it: dtype, shapes, path
    roles: set = field(default_factory=set)  # "default" (launch tables) and/or "candidate" (tuning)
    report: dict = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, sorted(self.signature.items()), sorted(self.constants.items()),
                           sorted(self.attrs.items()), sorted(self.options.items())], default=str)

    def constexprs(self) -> dict:
        """Constexpr values by name."""
        names = list(self.signature)
        return {names[i]: v for i, v in self.constants.items() if self.signature[names[i]] == "constexpr"}


# ---------------------------------------------------------------- recording the launchers' launches

class _RecordingDriver:
    """What JITFunction.run asks of Triton's active driver, for a GPU that is not here."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class _Recorder:
    def __init__(self):
        self.launches: dict[str, Launch] = {}
        self.label, self.role = "", "default"

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        sig = compile["signature"]
        launch = Launch(fn.module, fn.name, dict(sig),
                        {path[0]: value for path, value in compile["constants"].items()},
                        {path[0]: value for path, value in compile["configs"][0].items() if value},
                        {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")},
                        self.label)
        launch = self.launches.setdefault(launch.key(), launch)
        launch.roles.add(self.role)
        return True  # handled: Triton neither compiles nor launches

    @contextlib.contextmanager
    def calls(self, label: str, role: str):
        self.label, self.role = label, role
        yield


def record(target_arch: int = 9) -> list[Launch]:
    """Every launch of the calls below, recorded for sm_{target_arch}0a (this process keeps the stand-in driver)."""
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from o1kernels.triton_ops import _target

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the sweep compiles the kernels: run it without TRITON_INTERPRET")
    recorder = _Recorder()
    driver.set_active(_RecordingDriver(GPUTarget("cuda", target_arch * 10, 32)))
    knobs.runtime.jit_cache_hook = recorder.hook
    torch.manual_seed(0)
    with _target.compile_for(_target.SM90):
        for label, role, call in [*_attention_calls(), *_merge_calls(), *_step_reward_calls()]:
            with recorder.calls(label, role):
                call()
    return list(recorder.launches.values())


DTYPES = (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32"))
HEAD_DIMS = (64, 128, 256)


def _attention_calls():
    """(label, role, call) over the attention launcher: tree plans (a shared prompt + a tail per query) forced to
    cascade (partials + direct tails) and decode (direct only), also with every variant switch on (positions,
    window, softcap, sinks), two-source shared-prefix plans (direct prompt and suffixes; shared prompt + direct
    suffixes), GQA groups 4 / 32 / 64 (the decode kernel's row classes), queries per tile giving 16-128 partial
    rows, every tuning candidate. fp16 compiles as bf16 does (same tiles, same resources
    in every pair compiled here), so it is swept with the default tables only; candidates at head_dim 64 neither spill
    more nor need more shared memory than at 128, so they are swept at 128 and 256."""
    import torch

    from o1kernels.plan import SharedPrefixPlan, TreeAttentionPlan
    from o1kernels.triton_ops import _target
    from o1kernels.triton_ops import tree_attention as ta

    def tree_call(dtype, precision, d, hq, hkv, num_q, tile, path, config=None, variants=False):
        """A 64-token prompt read by num_q queries, a 16-token tail each; variants: the plan masks by query position
        (causal), run with a sliding window, a logit soft-cap and attention sinks (every variant switch on)."""
        segments = [(list(range(4)), 64, list(range(num_q)), 0)] + [([4 + i], 16, [i], 64) for i in range(num_q)]
        if not variants:
            segments = [seg[:3] for seg in segments]
        plan = TreeAttentionPlan(segments, num_q, 16, queries_per_tile=tile, path=path,
                                 positions=[79] * num_q if variants else None)
        plan.fp32_precision, plan.tuned = precision, {"config": config}
        q = torch.randn(num_q, hq, d, dtype=dtype)
        k, v = (torch.randn(4 + num_q, 16, hkv, d, dtype=dtype) for _ in range(2))
        extra = dict(window=32, softcap=30.0, sinks=torch.randn(hq, dtype=dtype)) if variants else {}
        return lambda: ta.run_plan(plan, q, ((k, v),), d ** -0.5, **extra)

    def prefix_call(dtype, precision, d, hq, hkv, path):
        plan = SharedPrefixPlan(4, 64, 16, path=path)
        plan.fp32_precision = precision
        q = torch.randn(4, hq, d, dtype=dtype)
        pools = [tuple(torch.randn(n, length, hkv, d, dtype=dtype) for _ in range(2)) for n, length in ((1, 64), (4, 16))]
        return lambda: ta.run_plan(plan, q, pools, d ** -0.5)

    for name, precision in DTYPES:
        dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[name])
        kind = ta.dtype_class(dtype, precision)
        for d in HEAD_DIMS:
            tag = f"{name}{'/tf32' if precision == 'tf32' else ''} D={d}"
            for tile in (4, 8, 16, 32):  # GQA 4: 16, 32, 64, 128 rows per partial work item
                yield (f"tree {tag} G=4 rows={4 * tile} cascade", "default",
                       tree_call(dtype, precision, d, 8, 2, tile, tile, "cascade"))
            yield f"tree {tag} G=4 decode", "default", tree_call(dtype, precision, d, 8, 2, 4, 4, "decode")
            for tile, path in ((4, "cascade"), (32, "cascade"), (4, "decode")):  # positions, window, softcap, sinks
                yield (f"tree {tag} G=4 rows={4 * tile} {path} causal+window+softcap+sinks", "default",
                       tree_call(dtype, precision, d, 8, 2, tile, tile, path, variants=True))
            for group in (4, 32, 64):
                if group != 4:
                    yield (f"tree {tag} G={group} cascade", "default",
                           tree_call(dtype, precision, d, group, 1, 4, 4, "cascade"))
                for path in ("decode", "cascade") if group == 4 else ("decode",):
                    yield (f"shared-prefix {tag} G={group} {path}", "default",
                           prefix_call(dtype, precision, d, group * (2 if group == 4 else 1), 2 if group == 4 else 1,
                                       path))
            if name == "fp16" or d == 64:
                continue
            for config in ta.partial_candidates(_target.SM90, kind, d):
                yield (f"tree {tag} G=4 candidate {config}", "candidate",
                       tree_call(dtype, precision, d, 8, 2, 32, 32, "cascade", config))


def _merge_calls():
    import torch

    from o1kernels.triton_ops.merge_states import merge_states_triton

    def call(dtype, h, d):
        o, lse = torch.randn(3, h, d, dtype=dtype), torch.randn(3, h)
        return lambda: merge_states_triton(o, lse, o, lse)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in HEAD_DIMS:
            for h in (8, 32):
                yield f"merge {str(dtype)[6:]} H={h} D={d}", "default", call(dtype, h, d)


def _step_reward_calls():
    """The head path (C = 2 softmax, C = 1 sigmoid, C = 16) and the hidden-layer path (16-bit on tensor cores,
    fp32 and mixed dtypes exact) with every table row and tuning candidate, aggregates and packed input."""
    import torch

    from o1kernels.triton_ops import _target
    from o1kernels.triton_ops import step_rewards as sr

    def call(dtype, hd, hm, classes, config=None, aggregate="min", packed=False, weight_dtype=None):
        bs, seq_len = 2, 64
        hidden = torch.randn(bs * seq_len, hd, dtype=dtype) if packed else torch.randn(bs, seq_len, hd, dtype=dtype)
        mask = torch.rand(hidden.shape[:-1]) < 0.1
        cu_seqlens = torch.tensor([0, seq_len, bs * seq_len], dtype=torch.int32) if packed else None
        bias, norm_w = torch.randn(classes, dtype=dtype), torch.rand(hd, dtype=dtype)
        mlp_w = torch.randn(hm, hd, dtype=weight_dtype or dtype) if hm else None
        mlp_b = torch.randn(hm, dtype=dtype) if hm else None
        weight = torch.randn(classes, hm or hd, dtype=dtype)
        activation = "sigmoid" if classes == 1 else "softmax"
        return lambda: sr.step_rewards_triton(hidden, mask, cu_seqlens, weight, bias, norm_w, 1e-6, mlp_w, mlp_b,
                                              activation, 0, aggregate, config=config)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype)[6:]
        elem = dtype.itemsize
        yield f"step head {name} C=2", "default", call(dtype, 4096, 0, 2)
        yield f"step head {name} C=1 last", "default", call(dtype, 4096, 0, 1, aggregate="last")
        yield f"step head {name} C=16 packed prod", "default", call(dtype, 4096, 0, 16, aggregate="prod", packed=True)
        yield f"step mlp {name} Hd=4096 C=2", "default", call(dtype, 4096, 4096, 2)
        # Hd % BLOCK_K != 0 (the masked K loop) with rows still 16-byte aligned; rows that are not (Hd % 8 != 0 in
        # 16-bit) lose cp.async and spilled 484 B at Hd = 4100: no PRM we target has such a hidden size.
        yield f"step mlp {name} Hd=4128 C=2 mean", "default", call(dtype, 4128, 4128, 2, aggregate="mean")
        if dtype == torch.float16:  # compiles as bf16 does: default tables only (see _attention_calls)
            continue
        for cfg in sr.tuning_candidates("head", _target.SM90, elem):
            yield f"step head {name} C=2 candidate", "candidate", call(dtype, 4096, 0, 2, cfg)
        path = "mlp_fp32" if dtype == torch.float32 else "mlp"
        for cfg in sr.tuning_candidates(path, _target.SM90, 4 if path == "mlp_fp32" else elem):
            yield f"step {path} {name} Hd=4096 candidate", "candidate", call(dtype, 4096, 4096, 2, cfg)
    yield "step mlp bf16 hidden, fp32 weight", "default", call(torch.bfloat16, 4096, 4096, 2,
                                                                weight_dtype=torch.float32)


# ---------------------------------------------------------------- compiling and reading the compiler's report

def _report_dir() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "o1kernels_sweep"


def _parse_ptxas(log: str) -> dict | None:
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if spill is None or regs is None:
        return None
    return {"regs": int(regs.group(1)), "stack": int(spill.group(1)), "spill_stores": int(spill.group(2)),
            "spill_loads": int(spill.group(3))}


def _ptxas_report(ptx: str, arch: int) -> dict:
    """ptxas -v on `ptx` with Triton's own flags (for a kernel whose compile came from Triton's cache)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    return _parse_ptxas(run.stdout + run.stderr)


def compile_launch(launch: Launch, arch: int = 90) -> dict:
    """Compile one launch for sm_{arch}a: shared memory, registers, spills, stack, PTX facts, seconds."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    src = ASTSource(kernel, launch.signature, {(i,): v for i, v in launch.constants.items()},
                    {(i,): v for i, v in launch.attrs.items()})
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    seconds = time.perf_counter() - start
    path = _report_dir() / f"{compiled.hash}.json"
    ptxas = _parse_ptxas(log.getvalue())
    if ptxas is None:  # from Triton's cache: ptxas did not run now
        ptxas = json.loads(path.read_text()) if path.exists() else _ptxas_report(compiled.asm["ptx"], arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ptxas))
    ptx = compiled.asm["ptx"]
    return {"smem": compiled.metadata.shared, **ptxas, "wgmma": "wgmma.mma_async" in ptx,
            "cp_async": "cp.async" in ptx, "ld_v4": "ld.global.v4" in ptx, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- checks

def launch_dtype(launch: Launch) -> str:
    """The data dtype of a launch: its first 16-bit pointer argument, else fp32."""
    types = [t for t in launch.signature.values() if t in ("*bf16", "*fp16")]
    return _DTYPE_OF[types[0]] if types else "fp32"


def problems(launch: Launch, smem_limit: int) -> list[str]:
    """Why a compiled launch fails the sweep's checks (empty: it passes)."""
    from o1kernels.triton_ops.step_rewards import mlp_shared_bytes
    from o1kernels.triton_ops.tree_attention import partial_shared_bytes

    r, c = launch.report, launch.constexprs()
    out = []
    if r["smem"] > smem_limit:
        out.append(f"shared memory {r['smem']} B > {smem_limit} B")
    bound = 0 if launch_dtype(launch) != "fp32" else FP32_SPILL_BOUND
    if "default" in launch.roles and r["spill_stores"] > bound:
        out.append(f"default table spills {r['spill_stores']} B (bound {bound} B)")
    opts = launch.options
    if launch.kernel == "_partial_attention_kernel":
        elem = 2 if launch_dtype(launch) != "fp32" else 4
        estimate = partial_shared_bytes(dict(c, num_stages=opts["num_stages"]), c["BLOCK_D"], elem)
        if estimate < r["smem"]:
            out.append(f"partial_shared_bytes {estimate} B < compiled {r['smem']} B")
        if elem == 2 and c["BLOCK_M"] >= 64 and not r["wgmma"]:
            out.append("16-bit tile of >= 64 rows without wgmma")
    if launch.kernel == "_step_mlp_kernel":
        elem = 4 if c["DOT_FP32"] else 2
        estimate = mlp_shared_bytes(dict(c, num_stages=opts["num_stages"]), elem)
        if estimate < r["smem"]:
            out.append(f"mlp_shared_bytes {estimate} B < compiled {r['smem']} B")
        if not c["DOT_FP32"] and c["BLOCK_M"] >= 64 and not (r["wgmma"] and r["cp_async"]):
            out.append("16-bit hidden-layer GEMM without wgmma fed by cp.async")
    if launch.kernel == "_step_head_kernel" and launch_dtype(launch) != "fp32" and "default" in launch.roles \
            and not r["ld_v4"]:
        out.append("16-bit step head without 16-byte loads")
    return out


def unlaunched(launches: list[Launch]) -> list[str]:
    """Kernels (`@triton.jit` functions named *_kernel in this package) that no recorded call launched."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    seen = {(launch.module, launch.kernel) for launch in launches}
    missing = []
    import o1kernels.triton_ops as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        missing += [f"{module.__name__}.{name}" for name, obj in vars(module).items()
                    if isinstance(obj, JITFunction) and name.endswith("_kernel") and (module.__name__, name) not in seen]
    return missing


def describe(launch: Launch) -> str:
    keep = ("GROUP", "HEAD_SPLITS", "DOT_PRECISION", "DIRECT0", "DIRECT1", "PARTIALS", "ACTIVATION", "AGGREGATE",
            "DOT_FP32", "EVEN_K", "PACKED", "FROM_LOGITS", "CAUSAL", "WINDOW", "SOFTCAP", "SINKS")
    parts = [f"{k}={v}" for k, v in launch.constexprs().items() if k.startswith("BLOCK") or k in keep]
    return " ".join(parts + [f"w{launch.options['num_warps']} s{launch.options['num_stages']}"])


COLUMNS = ("kernel", "dtype", "role", "config", "smem_B", "regs", "spill_st_B", "spill_ld_B", "stack_B", "secs",
           "check")


def rows(launches: list[Launch], smem_limit: int) -> list[dict]:
    out = []
    for launch in sorted(launches, key=lambda x: (x.kernel, launch_dtype(x), sorted(x.roles), describe(x))):
        r = launch.report
        bad = problems(launch, smem_limit)
        out.append({"kernel": launch.kernel, "dtype": launch_dtype(launch), "role": "+".join(sorted(launch.roles)),
                    "config": describe(launch), "smem_B": r["smem"], "regs": r["regs"],
                    "spill_st_B": r["spill_stores"], "spill_ld_B": r["spill_loads"], "stack_B": r["stack"],
                    "secs": r["seconds"], "check": "; ".join(bad) or "ok", "label": launch.label})
    return out


def summary(table: list[dict]) -> list[str]:
    lines = []
    for kernel in sorted({r["kernel"] for r in table}):
        mine = [r for r in table if r["kernel"] == kernel]
        defaults = [r for r in mine if "default" in r["role"]]
        lines.append(f"{kernel}: {len(mine)} launches ({len(defaults)} of the default tables), shared memory up to "
                     f"{max(r['smem_B'] for r in mine)} B, registers up to {max(r['regs'] for r in mine)}, "
                     f"spill stores in default tables up to {max((r['spill_st_B'] for r in defaults), default=0)} B, "
                     f"candidates that spill: {sum(r['spill_st_B'] > 0 for r in mine if r not in defaults)}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    ap.add_argument("--out", default="build/triton_sweep", help="PREFIX of the .json/.md report")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from o1kernels.triton_ops import _target

    t0 = time.perf_counter()
    launches = record()
    missing = unlaunched(launches)
    print(f"sweep: {len(launches)} distinct launches recorded in {time.perf_counter() - t0:.1f} s; compiling for "
          f"sm_90a with {args.jobs} process(es)", flush=True)
    if missing:
        print(f"sweep: FAILED: no call here launches {', '.join(missing)} (add a call that launches it in tools/triton_sweep.py)")
    failed = len(missing)
    with ProcessPoolExecutor(args.jobs) as pool:
        for launch, report in zip(launches, pool.map(compile_launch, launches)):
            launch.report = report
            bad = problems(launch, _target.SM90.smem)
            failed += bool(bad)
            print(f"  {launch.kernel} {launch_dtype(launch)} {'+'.join(sorted(launch.roles))} {describe(launch)}: "
                  f"smem {report['smem']} B, {report['regs']} regs, spill {report['spill_stores']}/"
                  f"{report['spill_loads']} B, {report['seconds']} s{': ' + '; '.join(bad) if bad else ''}",
                  flush=True)
    table = rows(launches, _target.SM90.smem)
    lines = summary(table)
    print("\n".join(["summary:"] + lines))
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps({"target": asdict(_target.SM90), "rows": table}, indent=1) + "\n")
    md = ["# Triton kernels compiled for sm_90a (offline sweep)", "", *[f"- {line}" for line in lines], "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in table]
    Path(f"{prefix}.md").write_text("\n".join(md) + "\n")
    elapsed = time.perf_counter() - t0
    print(f"sweep: {len(launches)} launches, {failed} failing the checks, {elapsed:.0f} s; wrote {prefix}.json/.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
