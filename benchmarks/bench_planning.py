"""Host cost of planning PagedAttention (o1kernels.paged): block tables in, the sharing found, the plan laid out.

    python benchmarks/bench_planning.py [--rows 256] [--pages 2048] [--reps 50]

Per block-table shape (B rows x W pages of 16 tokens) and sharing pattern it times, in host microseconds (median of
--reps, the plan's tensors on the CPU), on a warm capture-stable wrapper:
  full      plan() of a batch structure it has not seen (two different tables alternate);
  replan    plan() after a fork or a release of a few rows (4 rows of the table replaced);
  lengths   set_lengths(device tensor): a decode step on unchanged pages.
Targets (issue 19): lengths <= 30 us, replan <= 200 us, full <= 2 ms at B = 256 x 2,048 pages. bench_attention.py
prints this table too.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (ArgumentParser, add_output_args, output_prefix, print_legend, table_header,  # noqa: E402
                               table_row, write_results)
from o1kernels.paged import PagedAttention  # noqa: E402

PAGE = 16
TARGETS_US = {"lengths": 30.0, "replan": 200.0, "full": 2000.0}  # at B = 256 x 2,048 pages
COLUMNS = ["case", "rows x pages", "segments", "full", "replan", "lengths", "full wall", "replan wall",
           "lengths wall"]
LEGEND = {"segments": "segments the plan found (runs of pages read by the same rows)",
          "full": "us of host CPU time (the planning thread's): plan() of a batch structure not seen before (a warm "
                  "wrapper)",
          "replan": "us: plan() after 4 rows were released and as many forked from others, the rest continuing "
                    "(plan(..., continues=): only the changed rows' pages are read)",
          "lengths": "us: set_lengths(device tensor) on unchanged pages (a decode step)",
          "... wall": "the same in wall-clock us (includes waiting for a core on a loaded machine)"}


def forest_table(rows: int, pages: int, prompts: int, seed: int) -> np.ndarray:
    """Block table of `prompts` prompts (85% of the width), each forked over 3 step levels (fan-out 4, 4, 4 within
    its rows; 5% of the width each) into rows with pages of their own; page ids in a random order."""
    rng = np.random.default_rng(seed)
    table = np.empty((rows, pages), dtype=np.int64)
    nxt = 0

    def fresh(n):
        nonlocal nxt
        nxt += n
        return np.arange(nxt - n, nxt)

    per_prompt = rows // prompts
    prompt_w, level_w = int(0.85 * pages), max(1, pages // 20)
    for p in range(prompts):
        block = slice(p * per_prompt, (p + 1) * per_prompt if p < prompts - 1 else rows)
        table[block, :prompt_w] = fresh(prompt_w)
        col, groups = prompt_w, 1
        for _ in range(3):
            groups = min(groups * 4, block.stop - block.start)
            for g in np.array_split(np.arange(block.start, block.stop), groups):
                table[g, col:col + level_w] = fresh(level_w)
            col += level_w
        for r in range(block.start, block.stop):
            table[r, col:] = fresh(pages - col)
    return rng.permutation(nxt)[table].astype(np.int32)


def unique_table(rows: int, pages: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(rows * pages).reshape(rows, pages).astype(np.int32)


def replaced_rows(table: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The table after `count` rows were released and as many forked from others (each a copy of a random row's
    first pages, then fresh pages), and the rows replaced."""
    rng = np.random.default_rng(seed)
    out = table.copy()
    nxt = int(table.max()) + 1
    replaced = rng.choice(len(table), count, replace=False)
    for r in replaced:
        src = int(rng.integers(len(table)))
        keep = int(rng.integers(1, table.shape[1]))
        out[r, :keep] = table[src, :keep]
        out[r, keep:] = np.arange(nxt, nxt + table.shape[1] - keep)
        nxt += table.shape[1] - keep
    return out, replaced


def median_us(fn, reps: int) -> tuple[float, float]:
    """(median thread CPU time, median wall time) of fn in microseconds. The CPU time is the host work itself; on
    our shared 2-core machines the wall time also holds the waits for a core other processes take."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(cpu) * 1e6, statistics.median(wall) * 1e6


def measure(table_a: np.ndarray, table_b: np.ndarray, reps: int) -> dict:
    rows, pages = table_a.shape
    seq = np.full(rows, pages * PAGE - 5, dtype=np.int64)
    attn = PagedAttention(PAGE, (32, 8), 128, capture_stable=True, dtype=torch.bfloat16)
    attn.plan(table_a, seq)
    flip = [table_a, table_b]

    def full():
        flip.reverse()
        attn.plan(flip[0], seq)

    out = {}
    out["full"], out["full wall"] = median_us(full, reps)
    changed, replaced = replaced_rows(table_a, 4, 1)
    tables = [table_a, changed]
    continues = np.arange(rows)
    continues[replaced] = -1  # the other rows continue themselves (the same pages)
    attn.plan(table_a, seq)

    def replan():
        tables.reverse()
        attn.plan(tables[0], seq, continues=continues)

    out["replan"], out["replan wall"] = median_us(replan, reps)
    lengths = torch.from_numpy(seq - 1)
    out["lengths"], out["lengths wall"] = median_us(lambda: attn.set_lengths(lengths), 10 * reps)
    out["segments"] = int(attn.plan_obj.num_segments)
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="bench_planning.py", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--pages", type=int, default=2048, help="pages of 16 tokens per row")
    ap.add_argument("--reps", type=int, default=50)
    add_output_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, pages = args.rows, args.pages
    cases = [("beam forest, 1 prompt", forest_table(rows, pages, 1, 0), forest_table(rows, pages, 1, 1)),
             ("forest of 8 prompts", forest_table(rows, pages, 8, 0), forest_table(rows, pages, 8, 1)),
             ("no sharing", unique_table(rows, pages, 0), unique_table(rows, pages, 1)),
             ("beam forest, 1/8 the width", forest_table(rows, pages // 8, 1, 0),
              forest_table(rows, pages // 8, 1, 1))]
    cpu = torch.device("cpu")
    prefix = output_prefix(ap, args, "bench_planning", cpu)
    print(f"planning host time (PagedAttention, CPU tensors, 1 torch thread, median of {args.reps}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(table_header(COLUMNS))
    results = []
    for name, a, b in cases:
        row = {"case": name, "rows x pages": f"{a.shape[0]} x {a.shape[1]}", **measure(a, b, args.reps)}
        results.append(row)
        print(table_row(COLUMNS, row), flush=True)
    main_case = results[0]
    notes = [f"{k} {main_case[k]:.0f} us <= {v:.0f} us at {main_case['rows x pages']} (beam forest): "
             f"{'met' if main_case[k] <= v else 'NOT met'}" for k, v in TARGETS_US.items()]
    print("\n".join(notes))
    print_legend(LEGEND)
    write_results("bench_planning", cpu, COLUMNS, results, notes, prefix=prefix, legend=LEGEND)
    return 0


if __name__ == "__main__":
    sys.exit(main())
