// Host planner of o1kernels.paged (PagedAttention.plan): which leading pages the rows of a block table share.
//
// A block table lists each row's pages in token order; rows that share a prefix (a prompt, a reasoning step) hold
// the same page ids in the same columns. The rows form a forest whose nodes are pages: a page's parent is the page
// before it in any row holding it. A *run* is a maximal stretch of a row's pages read by the same set of rows; in a
// forest that set changes along a row exactly where the number of rows reading a page changes, so one pass counts
// readers per page and a second cuts each row into runs. Each run is a segment of the attention plan, read once for
// all its rows. A table whose pages do not form a forest (a page after different pages in different rows) is still
// planned exactly, with one segment per page.
//
// Rows live in *slots* of a table the caller keeps (the kernels' copy of the block table; 0 past each row's pages)
// and the per-page state (readers, column, parent) persists between calls, so a plan can be incremental: a row that
// continues a row of the previous plan (the same sequence: its tokens kept, so the pages holding them unchanged;
// pages past them appended or trimmed since) keeps its slot and only the pages past those is read and counted; the
// previous plan's rows nobody continues give their pages' readers back. A full plan (a new epoch: every stored
// state is unset) reads every row.
//
// A row may begin past column 0 (first [R]: a sliding-window decoder frees the pages wholly behind every window and
// reuses them, so the entries before a row's first page may be anything): its earlier entries are neither read nor
// counted, and its first page has no parent. Rows that share a page but begin at different columns do not form a
// forest (one segment per page).
//
// Cost: one pass over the pages written (count, column and parent per page: O(1) each, prefetched ahead since pool
// page ids are scattered), plus, per row, one step per run (a run already cut by an earlier row is skipped whole; a
// new one is found by bisection: readers never increase along a row of a forest).
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace o1k {
namespace bindings {
namespace {

// Per page id, int32 x 6 (the caller's state tensor [pages, 6]): the epoch the state belongs to (an older one is
// unset), rows reading the page, its column, its parent page, the call that numbered its segment, that segment.
enum StateField { kEpoch, kCount, kColumn, kParent, kStamp, kSegment, kStateFields };
enum Status { kDone = 0, kStateTooSmall = 1, kNotAForest = 2 };
constexpr int64_t kPrefetch = 16;  // table entries ahead whose page states are prefetched

}  // namespace

// table [R, W] int32: the caller's block table; num_pages [R] int32; slot [R] int64: each row's slot in
// slot_table [slots, WC] (in/out); kept [R] int64: the leading pages already in the row's slot (0: write them all);
// first [R] int64: the row's first column read (0 unless the row is planned in full: kept 0);
// released [K] int64: slots of the previous plan's rows nobody continues; slot_pages [slots] int32 (in/out): pages
// in each slot; state [P, 6] int32 (in/out); epoch: the state's current epoch (a full plan passes a new one and
// kept = 0, released = []); stamp: this call's id. Writes segments int32 [>= S, 4] (slot of a row reading it, first
// column, pages, rows reading it), row_runs int32 [>= runs] and row_run_ptr int64 [R + 1] (each row's segments in
// order). Returns (S, runs, the largest page id written or -1, status, forest): status kStateTooSmall (nothing
// changed: grow state past that page id and call again), kNotAForest (an incremental call met a page after a
// different page than where it is stored: plan in full), kDone; forest: whether the pages form a forest (else one
// segment per page).
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> paged_plan_rows_cpu(
    const at::Tensor& table, const at::Tensor& num_pages, const at::Tensor& slot, const at::Tensor& kept,
    const at::Tensor& first, const at::Tensor& released, at::Tensor& slot_table, at::Tensor& slot_pages, at::Tensor& state, int64_t epoch,
    int64_t stamp, at::Tensor& seg_out, at::Tensor& run_out, at::Tensor& run_ptr) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&table, &num_pages, &slot_table, &slot_pages,
                                                                     &state, &seg_out, &run_out}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt && t->is_contiguous(), "o1kernels: paged_plan_rows takes "
                     "contiguous int32 tables, page counts, state and outputs");
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&slot, &kept, &first, &released, &run_ptr}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong && t->is_contiguous(), "o1kernels: paged_plan_rows takes "
                     "contiguous int64 slots, kept counts, first columns, released slots and row_run_ptr");
  }
  const int64_t rows = table.size(0), width = table.size(1), slots = slot_table.size(0), wc = slot_table.size(1);
  const int64_t state_pages = state.size(0);
  TORCH_CHECK_VALUE(state.dim() == 2 && state.size(1) == kStateFields && num_pages.numel() == rows &&
                        slot.numel() == rows && kept.numel() == rows && first.numel() == rows &&
                        slot_pages.numel() == slots &&
                        run_ptr.numel() == rows + 1 && seg_out.dim() == 2 && seg_out.size(1) == 4,
                    "o1kernels: paged_plan_rows: inconsistent shapes");
  const int32_t* tbl = table.data_ptr<int32_t>();
  const int32_t* np_ = num_pages.data_ptr<int32_t>();
  const int64_t* slot_of = slot.data_ptr<int64_t>();
  const int64_t* kept_of = kept.data_ptr<int64_t>();
  const int64_t* first_of = first.data_ptr<int64_t>();
  const int64_t* rel = released.data_ptr<int64_t>();
  int32_t* st = slot_table.data_ptr<int32_t>();
  int32_t* sp = slot_pages.data_ptr<int32_t>();
  int32_t* S = state.data_ptr<int32_t>();
  const int32_t e = static_cast<int32_t>(epoch), call = static_cast<int32_t>(stamp);
  const bool full = released.numel() == 0 && std::all_of(kept_of, kept_of + rows, [](int64_t k) { return k == 0; });

  // Check the rows and what they write before changing anything; the largest page id sizes the state.
  int64_t entries = 0;
  int32_t max_page = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = slot_of[r], n = np_[r], k = kept_of[r], f = first_of[r];
    TORCH_CHECK_VALUE(n >= 0 && n <= width && n <= wc, "o1kernels: num_pages[", r, "] = ", n, " must be in [0, ",
                      std::min(width, wc), "] (the block table's width)");
    TORCH_CHECK_VALUE(s >= 0 && s < slots, "o1kernels: slot ", s, " of row ", r, " is outside [0, ", slots, ")");
    TORCH_CHECK_VALUE(k >= 0 && k <= n && k <= sp[s], "o1kernels: row ", r, " continues ", k, " pages of a row that "
                      "held ", sp[s], " (its num_pages is ", n, ")");
    TORCH_CHECK_VALUE(k == 0 || tbl[r * width + k - 1] == st[s * wc + k - 1], "o1kernels: row ", r,
                      " continues a row of the previous plan but its page at column ", k - 1, " is ",
                      tbl[r * width + k - 1], ", not ", st[s * wc + k - 1], ": a continued row keeps the pages holding "
                      "its tokens (pass continues=-1 for a new row)");
    TORCH_CHECK_VALUE(f >= 0 && f <= n && (f == 0 || k == 0), "o1kernels: row ", r, " begins at column ", f,
                      ": must be in [0, ", n, "], and 0 for a continued row");
    for (int64_t j = std::max(k, f); j < n; ++j) {
      const int32_t p = tbl[r * width + j];
      TORCH_CHECK_VALUE(p >= 0, "o1kernels: block_table[", r, ", ", j, "] = ", p, " is not a page id (>= 0)");
      max_page = std::max(max_page, p);
    }
    entries += n;
  }
  TORCH_CHECK_VALUE(seg_out.size(0) >= entries && run_out.numel() >= entries,
                    "o1kernels: paged_plan_rows needs outputs of sum(num_pages) = ", entries, " entries");
  if (max_page >= state_pages) return {0, 0, max_page, kStateTooSmall, 0};

  // Pass 1: readers, column and parent of every page written (and readers given back by what rows drop).
  auto drop = [&](const int32_t* row, int64_t from, int64_t to) {
    for (int64_t j = from; j < to; ++j) --S[row[j] * kStateFields + kCount];
  };
  for (int64_t i = 0; i < released.numel(); ++i) {
    drop(st + rel[i] * wc, 0, sp[rel[i]]);
    sp[rel[i]] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {  // what continued rows no longer hold, before any row takes those pages
    const int64_t s = slot_of[r];
    if (kept_of[r] > 0) drop(st + s * wc, kept_of[r], sp[s]);
  }
  bool forest = true;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = slot_of[r], n = np_[r], k = kept_of[r], f = first_of[r];
    int32_t* dst = st + s * wc;
    const int32_t* src = tbl + r * width;
    std::fill(dst, dst + f, 0);  // not read: 0 in the kernels' table
    std::fill(dst + n, dst + std::max<int64_t>(n, sp[s]), 0);
    int32_t prev = k > 0 ? dst[k - 1] : -1;
    for (int64_t j = std::max(k, f); j < n; ++j) {  // 64-bit indices: the extension builds with -fwrapv (30% slower int32 loops)
      const int32_t p = src[j];
      dst[j] = p;
      if (j + kPrefetch < n) __builtin_prefetch(S + src[j + kPrefetch] * kStateFields, 1);
      int32_t* ps = S + p * kStateFields;
      if (ps[kEpoch] != e || ps[kCount] == 0) {
        ps[kEpoch] = e;
        ps[kCount] = 1;
        ps[kColumn] = static_cast<int32_t>(j);
        ps[kParent] = prev;
      } else if (++ps[kCount], ps[kColumn] != j) {
        TORCH_CHECK_VALUE(false, "o1kernels: page ", p, " is at column ", j, " of block_table row ", r,
                          " but at column ", ps[kColumn], " where it first appears: a page holds the same positions "
                          "in every row that reads it");
      } else if (ps[kParent] != prev) {
        if (!full) return {0, 0, max_page, kNotAForest, 0};
        forest = false;
      }
      prev = p;
    }
    sp[s] = static_cast<int32_t>(n);
  }

  // Pass 2: cut each row into runs; the first row to reach a run records it as a segment.
  int32_t* segs = seg_out.data_ptr<int32_t>();
  int32_t* runs = run_out.data_ptr<int32_t>();
  int64_t* ptr = run_ptr.data_ptr<int64_t>();
  int32_t num_segs = 0;
  int64_t num_runs = 0;
  ptr[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row = st + slot_of[r] * wc;
    const int32_t n = np_[r];
    int32_t j = static_cast<int32_t>(first_of[r]);
    while (j < n) {
      int32_t* key = S + row[j] * kStateFields;
      if (key[kStamp] != call) {
        const int32_t readers = key[kCount];
        int32_t end = j + 1;
        if (forest) {
          // In a forest a page's readers are a subset of its parent's, so readers never increase along a row: the
          // run ends at the first page with fewer, found by bisection (a few state reads, not one per page).
          int32_t lo = j + 1, hi = n;  // the run ends in [lo, hi]
          while (lo < hi) {
            const int32_t mid = lo + (hi - lo) / 2;
            if (S[row[mid] * kStateFields + kCount] == readers) {
              lo = mid + 1;
            } else {
              hi = mid;
            }
          }
          end = lo;
        }
        key[kStamp] = call;
        key[kSegment] = num_segs;
        int32_t* out = segs + 4 * static_cast<int64_t>(num_segs++);
        out[0] = static_cast<int32_t>(slot_of[r]);
        out[1] = j;
        out[2] = end - j;
        out[3] = readers;
      }
      const int32_t seg = key[kSegment];
      runs[num_runs++] = seg;
      j += segs[4 * static_cast<int64_t>(seg) + 2];
    }
    ptr[r + 1] = num_runs;
  }
  return {num_segs, num_runs, max_page, kDone, forest};
}

}  // namespace bindings
}  // namespace o1k

TORCH_LIBRARY_FRAGMENT(o1kernels, m) {
  // Host planning of o1kernels.paged (CPU tensors, written in place; not for traced or captured code).
  m.def("paged_plan_rows(Tensor table, Tensor num_pages, Tensor slot, Tensor kept, Tensor first, Tensor released, "
        "Tensor(a!) slot_table, Tensor(b!) slot_pages, Tensor(c!) state, int epoch, int stamp, Tensor(d!) segments, "
        "Tensor(e!) row_runs, Tensor(f!) row_run_ptr) -> (int, int, int, int, int)");
}

TORCH_LIBRARY_IMPL(o1kernels, CPU, m) { m.impl("paged_plan_rows", &o1k::bindings::paged_plan_rows_cpu); }

namespace o1k {
namespace bindings {

// The plan of a batch from its runs (PagedAttention._lay_out): segments int32 [S, 4] (slot, first column, pages,
// readers), row_runs / row_run_ptr (each row's segments), seq_lens [R], query_lens [R] int64 -> per segment its first
// page-table entry (slot * table_width + column), capacity and first position in tokens, its current length (its
// longest reader's, clamped into the segment) and that reader; query_ptr [S+1] / queries [Q] (each segment's query
// rows: its readers' queries in row order); per query its position, row and offset (position = seq_lens[row] +
// offset). All int64, written in place. Returns whether position masks change what some query sees (a row with
// several queries, or a row ending inside a segment another reader runs past).
bool paged_segments_cpu(const at::Tensor& segments, const at::Tensor& row_runs, const at::Tensor& row_run_ptr,
                        const at::Tensor& seq_lens, const at::Tensor& query_lens, int64_t table_width,
                        int64_t page_size, at::Tensor& page_start, at::Tensor& capacity, at::Tensor& start,
                        at::Tensor& lengths, at::Tensor& longest, at::Tensor& query_ptr, at::Tensor& queries,
                        at::Tensor& positions, at::Tensor& query_row, at::Tensor& query_offset) {
  const int64_t S = segments.size(0), R = seq_lens.numel();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&row_run_ptr, &seq_lens, &query_lens,
                                                                       &page_start, &capacity, &start, &lengths,
                                                                       &longest, &query_ptr, &queries, &positions,
                                                                       &query_row, &query_offset}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong && t->is_contiguous(), "o1kernels: paged_segments takes "
                     "contiguous int64 arrays");
  }
  TORCH_CHECK_TYPE(segments.scalar_type() == at::kInt && row_runs.scalar_type() == at::kInt,
                   "o1kernels: paged_segments takes the int32 segments and row_runs of paged_plan_rows");
  const int32_t* seg = segments.data_ptr<int32_t>();
  const int32_t* runs = row_runs.data_ptr<int32_t>();
  const int64_t* ptr = row_run_ptr.data_ptr<int64_t>();
  const int64_t* seq = seq_lens.data_ptr<int64_t>();
  const int64_t* qlen = query_lens.data_ptr<int64_t>();
  int64_t *ps = page_start.data_ptr<int64_t>(), *cap = capacity.data_ptr<int64_t>(), *st = start.data_ptr<int64_t>();
  int64_t *len = lengths.data_ptr<int64_t>(), *lg = longest.data_ptr<int64_t>(), *qp = query_ptr.data_ptr<int64_t>();
  int64_t *q = queries.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>(), *qr = query_row.data_ptr<int64_t>();
  int64_t* qo = query_offset.data_ptr<int64_t>();
  bool masks = false;
  for (int64_t s = 0; s < S; ++s) {
    ps[s] = static_cast<int64_t>(seg[4 * s]) * table_width + seg[4 * s + 1];
    st[s] = static_cast<int64_t>(seg[4 * s + 1]) * page_size;
    cap[s] = static_cast<int64_t>(seg[4 * s + 2]) * page_size;
    len[s] = -1;
    qp[s + 1] = 0;
  }
  // each row's queries: their positions, and per segment the queries its readers bring
  int64_t nq = 0;
  std::vector<int64_t> q_off(R);
  for (int64_t r = 0; r < R; ++r) {
    q_off[r] = nq;
    masks |= qlen[r] > 1;
    for (int64_t j = 0; j < qlen[r]; ++j, ++nq) {
      qr[nq] = r;
      qo[nq] = j - qlen[r];
      pos[nq] = seq[r] + qo[nq];
    }
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) qp[runs[k] + 1] += qlen[r];
  }
  qp[0] = 0;
  for (int64_t s = 0; s < S; ++s) qp[s + 1] += qp[s];
  std::vector<int64_t> fill(qp, qp + S);
  for (int64_t r = 0; r < R; ++r) {  // rows in order: each segment's queries in row order
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {
      const int32_t s = runs[k];
      for (int64_t j = 0; j < qlen[r]; ++j) q[fill[s]++] = q_off[r] + j;
      const int64_t l = std::min(std::max<int64_t>(seq[r] - st[s], 0), cap[s]);
      if (len[s] >= 0 && l != len[s]) masks = true;  // readers end at different places inside the segment
      if (l > len[s]) {
        len[s] = l;
        lg[s] = r;
      }
    }
  }
  return masks;
}

}  // namespace bindings
}  // namespace o1k

TORCH_LIBRARY_FRAGMENT(o1kernels, m) {
  m.def("paged_segments(Tensor segments, Tensor row_runs, Tensor row_run_ptr, Tensor seq_lens, Tensor query_lens, "
        "int table_width, int page_size, Tensor(a!) page_start, Tensor(b!) capacity, Tensor(c!) start, "
        "Tensor(d!) lengths, Tensor(e!) longest, Tensor(f!) query_ptr, Tensor(g!) queries, Tensor(h!) positions, "
        "Tensor(i!) query_row, Tensor(j!) query_offset) -> bool");
}

TORCH_LIBRARY_IMPL(o1kernels, CPU, m) { m.impl("paged_segments", &o1k::bindings::paged_segments_cpu); }
