"""Helpers shared by the benchmark scripts: argument parsing, timing, device facts, console tables, result files.

Result files: by default every run writes NEW files benchmarks/results/<stem>_<tag>_<YYYYmmdd-HHMMSS>.json/.md
(tag: gpu or cpu; ignored by git), so a run never changes the shipped results <stem>_<tag>.* that the README
quotes. `--out DIR_OR_PREFIX` chooses the location, `--update-shipped` overwrites the shipped files
(add_output_args / output_prefix).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from o1kernels._cli import positive_int, positive_ints  # noqa: F401  (argparse types of the scripts; the scripts
# put the repository root on sys.path before importing this module)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, "<prog>: error: <message>", exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--out DIR_OR_PREFIX and --update-shipped (exclusive); read them back with output_prefix."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", default=None, metavar="DIR_OR_PREFIX",
                       help="write the results there: into a directory (an existing one, or a path ending in /) as "
                            "<stem>_<tag>_<timestamp>.*, or as PREFIX.json/.md (default: a new timestamped file "
                            "under benchmarks/results/)")
    group.add_argument("--update-shipped", action="store_true",
                       help="overwrite the shipped results benchmarks/results/<stem>_<tag>.* (the README's numbers)")


def output_prefix(parser: argparse.ArgumentParser, args, stem: str, device: torch.device) -> Path:
    """Path prefix (no suffix) of this run's result files, from --out / --update-shipped (see the module doc).

    A prefix naming the shipped files without --update-shipped is a parser error; an existing timestamped name
    gets a -1, -2, ... suffix, so nothing is overwritten unless asked.
    """
    shipped = RESULTS_DIR / f"{stem}_{'gpu' if device.type == 'cuda' else 'cpu'}"
    if args.update_shipped:
        return shipped
    out = args.out
    if out is None or Path(out).is_dir() or out.endswith(("/", os.sep)):
        return _new_prefix(Path(out or RESULTS_DIR), shipped.name)
    prefix = Path(out)
    if prefix.resolve() == shipped.resolve():
        parser.error(f"--out {out}: those are the shipped results; pass --update-shipped to overwrite them")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return prefix


def _new_prefix(directory: Path, name: str) -> Path:
    """directory/<name>_<YYYYmmdd-HHMMSS>, with -1, -2, ... appended while a .json or .md of that name exists."""
    directory.mkdir(parents=True, exist_ok=True)
    base = prefix = directory / f"{name}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while any(Path(f"{prefix}{ext}").exists() for ext in (".json", ".md")):
        n += 1
        prefix = Path(f"{base}-{n}")
    return prefix

# Datasheet HBM bandwidth in GB/s (1e9 B/s), matched against the device name.
# A measured device-to-device copy is reported next to it (see measured_copy_gbps).
PEAK_GBPS = {
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its logical CPU count (not the torch threads a run uses)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"


def peak_gbps(device: torch.device) -> float | None:
    """Datasheet peak memory bandwidth of `device` in GB/s, or None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, val in PEAK_GBPS.items():
        if key in name:
            return val
    return None


def measured_copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bandwidth of a large device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def measured_matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Rate of a large n x n x n matrix product in `dtype` (TFLOP/s), the compute ceiling of a floor."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def floor_ms(nbytes: float, flops: float, gbps: float, tflops: float) -> float:
    """Floor of an op: max(bytes / bandwidth, FLOPs / matmul rate) in milliseconds."""
    return max(nbytes / (gbps * 1e9), flops / (tflops * 1e12)) * 1e3


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache in bytes (0 on the CPU)."""
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def rotating_sets(footprint_bytes: float, device: torch.device, cap: int = 64) -> int:
    """How many input sets to rotate through so that consecutive timed calls read from HBM, not L2: enough sets of
    `footprint_bytes` (what one call reads) to cover twice the L2, at most `cap`; 1 on the CPU (whose timings are
    no GPU measurement anyway) and when one call already reads more than twice the L2."""
    return max(1, min(cap, -(-2 * l2_bytes(device) // max(1, int(footprint_bytes)))))


def _as_list(fns) -> list:
    return list(fns) if isinstance(fns, (list, tuple)) else [fns]


def bench_cuda_graph(fns, device: torch.device, *, reps: int = 20, calls_per_graph: int = 10) -> float | None:
    """Median time of one call replayed inside a CUDA graph, in ms (None off CUDA or if capture fails).

    fns: a callable, or a list of callables over different input sets (see rotating_sets) called in turn.
    Each is warmed up on a side stream (compilation, autotuning and allocations happen there), then
    max(calls_per_graph, len(fns)) calls, rotating through fns, are captured into one graph; each timed replay is
    divided by that count, so the graph launch itself is amortised. Eager time minus this is the host overhead per
    call.
    """
    if device.type != "cuda":
        return None
    fns = _as_list(fns)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            for fn in fns:
                fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    calls = max(calls_per_graph, len(fns))
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
    except Exception:  # an op that cannot be captured (host sync, CPU tensor): no graph time
        torch.cuda.synchronize(device)
        return None
    return bench(graph.replay, device, warmup=2, reps=reps) / calls


def bench(fns, device: torch.device, *, warmup: int = 5, reps: int = 50) -> float:
    """Median wall time of one call in milliseconds (CUDA events on GPU, perf_counter on CPU).

    fns: a callable, or a list of callables over different input sets (see rotating_sets): each rep calls the next
    one, so on a GPU a call does not find its inputs in L2 from the call before."""
    fns = _as_list(fns)
    cycle = itertools.cycle(fns)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            fn = next(cycle)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            fn = next(cycle)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    for mod in ("flash_attn", "flashinfer"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def write_results(stem: str, device: torch.device, columns: list[str], rows: list[dict], notes: list[str], *,
                  prefix: Path | None = None, legend: dict[str, str] | None = None,
                  complete: bool = True) -> tuple[Path, Path]:
    """Write `rows` as PREFIX.json and a markdown table PREFIX.md; return both paths.

    prefix: from output_prefix(...) (default: a new timestamped file under benchmarks/results/, never the shipped
    one); legend: column -> meaning, written under the table and into the JSON's meta. The scripts call it after
    every row with complete=False (the files say the run had not finished: a run stopped by a time limit keeps every
    row it measured) and once at the end.
    """
    if prefix is None:
        prefix = _new_prefix(RESULTS_DIR, f"{stem}_{'gpu' if device.type == 'cuda' else 'cpu'}")
    date = _dt.date.today().isoformat()
    meta = {"device": device_name(device), "date": date, "versions": versions(), "peak_gbps": peak_gbps(device),
            "complete": complete, "notes": notes, "legend": legend or {}}
    json_path, md_path = Path(f"{prefix}.json"), Path(f"{prefix}.md")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = [f"# {stem} on {meta['device']} ({date})", "", f"versions: {json.dumps(meta['versions'])}", ""]
    if not complete:
        md += [f"**Partial: {len(rows)} row(s) written while the run was still going (or it was stopped).**", ""]
    md += [f"- {n}" for n in notes] + [""]
    md.append(markdown_table(columns, rows))
    if legend:
        md += ["", "Columns:", ""] + [f"- `{c}`: {text}" for c, text in legend.items()]
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_header(columns: list[str]) -> str:
    """The two header lines of a markdown table."""
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def table_row(columns: list[str], row: dict) -> str:
    return "| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |"


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    return "\n".join([table_header(columns)] + [table_row(columns, r) for r in rows])


def print_legend(legend: dict[str, str]) -> None:
    """Console: what each column means, after the table."""
    width = max(len(c) for c in legend)
    print("columns:")
    for column, text in legend.items():
        print(f"  {column:<{width}}  {text}")
