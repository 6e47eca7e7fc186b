// Host planner of o1kernels.paged (PagedAttention.plan): which leading pages the rows of a block table share.
//
// A block table lists each row's pages in token order; rows that share a prefix (a prompt, a reasoning step)
// hold the same page ids in the same columns. The rows form a forest whose nodes are pages: a page's parent is
// the page before it in any row holding it. A *run* is a maximal stretch of a row's pages read by the same set
// of rows; in a forest that set changes along a row exactly where the number of rows reading a page changes, so
// one pass counts readers per page and a second cuts each row into runs. Each run is a segment of the attention
// plan, read once for all its rows. A table whose pages do not form a forest (a page after different pages in
// different rows) is still planned exactly, with one segment per page.
//
// Cost: one pass over the valid entries (count, column and parent per page: O(1) each) plus, per row, one step
// per run (a run already cut by an earlier row is skipped whole). Per-page scratch is kept between calls and
// only the entries touched are reset.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace o1k {
namespace bindings {
namespace {

struct PageScratch {  // per page of the pool: readers, column, parent page, segment (-1: none yet)
  std::vector<int32_t> count, column, parent, segment;
  void ensure(int64_t page) {  // room for page ids up to `page`
    if (static_cast<int64_t>(count.size()) <= page) {
      const size_t n = std::max<size_t>(static_cast<size_t>(page) + 1, 2 * count.size());
      count.resize(n, 0);
      column.resize(n, -1);
      parent.resize(n, -1);
      segment.resize(n, -1);
    }
  }
  void reset(const std::vector<int32_t>& touched) {
    for (int32_t p : touched) {
      count[p] = 0;
      column[p] = -1;
      parent[p] = -1;
      segment[p] = -1;
    }
  }
};

thread_local PageScratch scratch;

// Writes segments int32 [>= S, 4] (representative row, first column, pages, rows reading it), row_runs int32
// [>= runs] (each row's segments in order) and row_run_ptr int64 [R + 1] (CSR into row_runs); the caller sizes them
// for the worst case, sum(num_pages) segments and runs. Returns (S, runs, the largest page id read or -1).
std::tuple<int64_t, int64_t, int64_t> paged_runs_cpu(const at::Tensor& block_table, const at::Tensor& num_pages,
                                                     at::Tensor& seg_out, at::Tensor& run_out, at::Tensor& run_ptr) {
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt && num_pages.scalar_type() == at::kInt,
                   "o1kernels: paged_runs takes int32 block_table and num_pages");
  TORCH_CHECK_VALUE(block_table.dim() == 2 && num_pages.dim() == 1 && num_pages.size(0) == block_table.size(0),
                    "o1kernels: paged_runs needs block_table [R, W] and num_pages [R]");
  const at::Tensor table = block_table.contiguous();
  const at::Tensor npages = num_pages.contiguous();
  const int64_t rows = table.size(0), width = table.size(1);
  const int32_t* tbl = table.data_ptr<int32_t>();
  const int32_t* np_ = npages.data_ptr<int32_t>();
  int64_t entries = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(np_[r] >= 0 && np_[r] <= width, "o1kernels: num_pages[", r, "] = ", np_[r],
                      " must be in [0, ", width, "] (the block table's width)");
    entries += np_[r];
  }
  TORCH_CHECK_VALUE(seg_out.scalar_type() == at::kInt && seg_out.is_contiguous() && seg_out.dim() == 2 &&
                        seg_out.size(1) == 4 && seg_out.size(0) >= entries && run_out.scalar_type() == at::kInt &&
                        run_out.is_contiguous() && run_out.numel() >= entries && run_ptr.scalar_type() == at::kLong &&
                        run_ptr.is_contiguous() && run_ptr.numel() == rows + 1,
                    "o1kernels: paged_runs needs int32 segments [>= sum(num_pages), 4], int32 row_runs "
                    "[>= sum(num_pages)] and int64 row_run_ptr [R + 1]");
  // Pass 0: page ids are >= 0; the largest sizes the page-indexed scratch (kept between calls).
  int32_t max_page = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = tbl + r * width;
    for (int32_t j = 0; j < np_[r]; ++j) {
      TORCH_CHECK_VALUE(row[j] >= 0, "o1kernels: block_table[", r, ", ", j, "] = ", row[j], " is not a page id (>= 0)");
      max_page = std::max(max_page, row[j]);
    }
  }
  PageScratch& s = scratch;
  s.ensure(max_page);
  int32_t* count = s.count.data();
  int32_t* column = s.column.data();
  int32_t* parent = s.parent.data();
  std::vector<int32_t> touched;
  bool forest = true;
  // Pass 1: readers, column and parent of every page; the table's consistency.
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = tbl + r * width;
    int32_t prev = -1;
    for (int32_t j = 0; j < np_[r]; ++j) {
      const int32_t p = row[j];
      if (count[p]++ == 0) {
        touched.push_back(p);
        column[p] = j;
        parent[p] = prev;
      } else if (column[p] != j) {
        const int32_t first = column[p];
        s.reset(touched);
        TORCH_CHECK_VALUE(false, "o1kernels: page ", p, " is at column ", j, " of block_table row ", r,
                          " but at column ", first, " where it first appears: a page holds the same positions in "
                          "every row that reads it");
      } else if (parent[p] != prev) {
        forest = false;
      }
      prev = p;
    }
  }
  // Pass 2: cut each row into runs; the first row to reach a run records it as a segment.
  int32_t* segs = seg_out.data_ptr<int32_t>();  // 4 per segment
  int32_t* runs = run_out.data_ptr<int32_t>();
  int64_t* ptr = run_ptr.data_ptr<int64_t>();
  int32_t num_segs = 0;
  int64_t num_runs = 0;
  ptr[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = tbl + r * width;
    int32_t j = 0;
    while (j < np_[r]) {
      const int32_t key = row[j];
      int32_t seg = s.segment[key];
      if (seg < 0) {
        int32_t end = j + 1;
        if (forest) {
          while (end < np_[r] && count[row[end]] == count[key]) ++end;
        }
        seg = num_segs++;
        s.segment[key] = seg;
        int32_t* out = segs + 4 * static_cast<int64_t>(seg);
        out[0] = static_cast<int32_t>(r);
        out[1] = j;
        out[2] = end - j;
        out[3] = count[key];
      }
      runs[num_runs++] = seg;
      j += segs[4 * static_cast<int64_t>(seg) + 2];
    }
    ptr[r + 1] = num_runs;
  }
  s.reset(touched);
  return {num_segs, num_runs, max_page};
}

}  // namespace
}  // namespace bindings
}  // namespace o1k

TORCH_LIBRARY_FRAGMENT(o1kernels, m) {
  // Host planning of o1kernels.paged (CPU tensors in, new CPU tensors out; not for traced or captured code).
  m.def("paged_runs(Tensor block_table, Tensor num_pages, Tensor(a!) segments, Tensor(b!) row_runs, "
        "Tensor(c!) row_run_ptr) -> (int, int, int)");
}

TORCH_LIBRARY_IMPL(o1kernels, CPU, m) { m.impl("paged_runs", &o1k::bindings::paged_runs_cpu); }
