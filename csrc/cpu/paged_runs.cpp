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
// Cost: one pass over the valid entries (count, column and parent per page: O(1) each, the page states prefetched
// ahead since pool page ids are scattered) plus, per row, one step per run (a run already cut by an earlier row is
// skipped whole). The per-page scratch is kept between calls; a state from an earlier call (epoch) counts as unset,
// so nothing is cleared.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace o1k {
namespace bindings {
namespace {

struct PageState {  // what the planner knows of one page in the call `epoch`: rows reading it, its column, parent
                   // page, segment (-1: none yet)
  uint32_t epoch = 0;
  int32_t count = 0, column = -1, parent = -1, segment = -1;
};

struct PageScratch {  // per page id of the pool, kept between calls; a state whose epoch is not the call's is unset,
                      // so nothing is reset between calls. One struct per page: its state is one cache line access
                      // (page ids in pool order are scattered and mostly miss the cache)
  std::vector<PageState> pages;
  uint32_t epoch = 0;
  void ensure(int64_t page) {  // room for page ids up to `page`
    if (static_cast<int64_t>(pages.size()) <= page) {
      pages.resize(std::max<size_t>(static_cast<size_t>(page) + 1, 2 * pages.size()));
    }
  }
  uint32_t next_epoch() {
    if (++epoch == 0) {  // wrapped: every stored epoch could look current
      std::fill(pages.begin(), pages.end(), PageState{});
      epoch = 1;
    }
    return epoch;
  }
};

thread_local PageScratch scratch;
constexpr int64_t kPrefetch = 16;  // table entries ahead whose page states are prefetched

// Writes segments int32 [>= S, 4] (representative row, first column, pages, rows reading it), row_runs int32
// [>= runs] (each row's segments in order) and row_run_ptr int64 [R + 1] (CSR into row_runs); the caller sizes them
// for the worst case, sum(num_pages) segments and runs. table_out int32 [>= R, >= W]: the block table with 0 past
// each row's pages (the copy the attention kernels read, written in the same pass). Returns (S, runs, the largest
// page id read or -1).
std::tuple<int64_t, int64_t, int64_t> paged_runs_cpu(const at::Tensor& block_table, const at::Tensor& num_pages,
                                                     at::Tensor& seg_out, at::Tensor& run_out, at::Tensor& run_ptr,
                                                     at::Tensor& table_out) {
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
                        run_ptr.is_contiguous() && run_ptr.numel() == rows + 1 &&
                        table_out.scalar_type() == at::kInt && table_out.dim() == 2 && table_out.stride(1) == 1 &&
                        table_out.size(0) >= rows && table_out.size(1) >= width,
                    "o1kernels: paged_runs needs int32 segments [>= sum(num_pages), 4], int32 row_runs "
                    "[>= sum(num_pages)], int64 row_run_ptr [R + 1] and an int32 table_out [>= R, >= W] (rows "
                    "contiguous)");
  int32_t* table_dst = table_out.data_ptr<int32_t>();
  const int64_t dst_stride = table_out.stride(0);
  PageScratch& s = scratch;
  const uint32_t epoch = s.next_epoch();
  int32_t max_page = -1;
  int64_t capacity = static_cast<int64_t>(s.pages.size());
  PageState* state = s.pages.data();
  bool forest = true;
  // Pass 1: readers, column and parent of every page; the table's consistency. The page-indexed scratch grows (and
  // its pointers move) only when a page id beyond it appears.
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = tbl + r * width;
    int32_t* dst = table_dst + r * dst_stride;
    std::fill(dst + np_[r], dst + width, 0);
    int32_t prev = -1;
    const int64_t n = np_[r];
    for (int64_t j = 0; j < n; ++j) {  // 64-bit indices: the extension builds with -fwrapv (30% slower int32 loops)
      const int32_t p = row[j];
      dst[j] = p;
      if (j + kPrefetch < n) {  // page ids in pool order are scattered: overlap the misses on their states
        const int32_t ahead = row[j + kPrefetch];
        if (ahead >= 0 && ahead < capacity) __builtin_prefetch(state + ahead, 1);
      }
      if (p < 0 || p >= capacity) {
        if (p < 0) {
          TORCH_CHECK_VALUE(false, "o1kernels: block_table[", r, ", ", j, "] = ", p, " is not a page id (>= 0)");
        }
        s.ensure(p);
        capacity = static_cast<int64_t>(s.pages.size());
        state = s.pages.data();
      }
      max_page = std::max(max_page, p);
      PageState& ps = state[p];
      if (ps.epoch != epoch) {
        ps = PageState{epoch, 1, static_cast<int32_t>(j), prev, -1};
      } else if (++ps.count, ps.column != j) {
        const int32_t first = ps.column;
        TORCH_CHECK_VALUE(false, "o1kernels: page ", p, " is at column ", j, " of block_table row ", r,
                          " but at column ", first, " where it first appears: a page holds the same positions in "
                          "every row that reads it");
      } else if (ps.parent != prev) {
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
      int32_t seg = state[key].segment;
      if (seg < 0) {
        const int32_t readers = state[key].count;
        int32_t end = j + 1;
        if (forest) {
          while (end < np_[r] && state[row[end]].count == readers) {
            if (end + kPrefetch < np_[r]) __builtin_prefetch(state + row[end + kPrefetch]);
            ++end;
          }
        }
        seg = num_segs++;
        state[key].segment = seg;
        int32_t* out = segs + 4 * static_cast<int64_t>(seg);
        out[0] = static_cast<int32_t>(r);
        out[1] = j;
        out[2] = end - j;
        out[3] = readers;
      }
      runs[num_runs++] = seg;
      j += segs[4 * static_cast<int64_t>(seg) + 2];
    }
    ptr[r + 1] = num_runs;
  }
  return {num_segs, num_runs, max_page};
}

}  // namespace
}  // namespace bindings
}  // namespace o1k

TORCH_LIBRARY_FRAGMENT(o1kernels, m) {
  // Host planning of o1kernels.paged (CPU tensors in, new CPU tensors out; not for traced or captured code).
  m.def("paged_runs(Tensor block_table, Tensor num_pages, Tensor(a!) segments, Tensor(b!) row_runs, "
        "Tensor(c!) row_run_ptr, Tensor(d!) table_out) -> (int, int, int)");
}

TORCH_LIBRARY_IMPL(o1kernels, CPU, m) { m.impl("paged_runs", &o1k::bindings::paged_runs_cpu); }
