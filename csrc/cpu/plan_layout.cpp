// Host layout of an attention plan: the compiled twin of o1kernels/plan.py's TreeAttentionPlan._windowed, _paths
// (the cost model: shared vs direct path, kv chunks, filling the grid) and layout_arrays. Segments (their queries as
// a CSR) in; the int32 arrays every backend reads (PlanLayout) out, one after another in one buffer. plan.py runs
// this when o1kernels._C is built and its numpy functions otherwise; tests/test_plan_layout.py compares the two.
//
// One pass per array over segments, work items and (segment, query) pairs: a few microseconds for the hundreds of
// segments of a 256-row search batch, where the numpy version pays tens of array calls.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace o1k {
namespace bindings {
namespace {

// Integer parameters (layout_params [21], int64), in plan.py's LAYOUT_INT_PARAMS order.
enum IntParam {
  kNumQueries, kSplit, kPath, kGroup, kKvHeads, kHeadDim, kElemBytes, kWindow, kTile, kKvChunk, kNumSms,
  kExternalPages, kCapSegments, kCapPages, kCapQueryRefs, kCapWork, kCapPartials, kCapDirect, kMinKvChunk,
  kMaxKvChunk, kTokensPerQuery, kNumIntParams
};
// Float parameters (layout_fparams [7], float64): the device profile and the cost model's constants.
enum FloatParam { kL2Bytes, kGbps, kL2Fraction, kL2Speedup, kDirectRereadUs, kSplitFactor, kMinSplitTokens, kNumFloat };
enum Path { kAuto = 0, kCascade = 1, kDecode = 2 };
constexpr int kNumArrays = 15;  // page_table, seg_page_start, seg_capacity, seg_start, seg_queries, 6 x work_*,
                                // slot_indptr, slots, direct_indptr, direct_segs

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Stable counting sort of `values` by `keys` in [0, n): (indptr [n + 1], values grouped by key, in given order).
void csr_by_key(const std::vector<int64_t>& keys, const std::vector<int64_t>& values, int64_t n,
                std::vector<int64_t>& indptr, std::vector<int64_t>& grouped) {
  indptr.assign(n + 1, 0);
  for (int64_t k : keys) ++indptr[k + 1];
  for (int64_t i = 0; i < n; ++i) indptr[i + 1] += indptr[i];
  grouped.resize(values.size());
  std::vector<int64_t> fill(indptr.begin(), indptr.end() - 1);
  for (size_t i = 0; i < keys.size(); ++i) grouped[fill[keys[i]]++] = values[i];
}

// Writes the layout's arrays into `out` (int32, one after another: the sizes in array_sizes [15], -1 for an array
// the layout does not have) when it is large enough. Returns (int32 entries needed, num_work, num_partials, max_q,
// num_direct, has_direct, num_slots, needed work, needed partials, needed direct, needed query refs); a layout that
// does not fit its capacity returns needed entries -1 (the caller names what overflowed from the needs).
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>
plan_layout_cpu(const at::Tensor& pages, const at::Tensor& page_start, const at::Tensor& capacity,
                const at::Tensor& start, const at::Tensor& query_ptr, const at::Tensor& queries,
                const at::Tensor& positions, const at::Tensor& int_params, const at::Tensor& float_params,
                at::Tensor& out, at::Tensor& array_sizes) {
  TORCH_CHECK_VALUE(int_params.numel() == kNumIntParams && float_params.numel() == kNumFloat,
                    "o1kernels: plan_layout needs ", kNumIntParams, " int and ", kNumFloat, " float parameters");
  for (const at::Tensor* t : {&page_start, &capacity, &start, &query_ptr, &queries, &positions, &int_params}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong && t->is_contiguous(), "o1kernels: plan_layout takes contiguous "
                     "int64 segment arrays");
  }
  TORCH_CHECK_TYPE(pages.scalar_type() == at::kInt && out.scalar_type() == at::kInt && out.is_contiguous() &&
                       array_sizes.scalar_type() == at::kLong && array_sizes.numel() == kNumArrays,
                   "o1kernels: plan_layout needs int32 pages and out, int64 array_sizes [15]");
  const int64_t* ip = int_params.data_ptr<int64_t>();
  const double* fp = float_params.data_ptr<double>();
  const int64_t S = capacity.numel(), NQ = ip[kNumQueries];
  const int64_t* cap = capacity.data_ptr<int64_t>();
  const int64_t* qptr_in = query_ptr.data_ptr<int64_t>();
  const int64_t* q_in = queries.data_ptr<int64_t>();
  const int64_t* seg_first = start.data_ptr<int64_t>();
  const int64_t tile = ip[kTile], kv_heads = ip[kKvHeads], num_sms = std::max<int64_t>(1, ip[kNumSms]);

  // the (segment, query) pairs a windowed layout keeps: not those whose window lies wholly past the segment
  std::vector<int64_t> qptr(S + 1, 0), q;
  q.reserve(queries.numel());
  const int64_t window = ip[kWindow];
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t i = qptr_in[s]; i < qptr_in[s + 1]; ++i) {
      if (window < 0 || cap[s] == 0 || seg_first[s] + cap[s] > pos[q_in[i]] - window + 1) q.push_back(q_in[i]);
    }
    qptr[s + 1] = static_cast<int64_t>(q.size());
  }

  // paths: shared (work items) or direct (read in the final kernel)
  std::vector<char> direct(S, 0);
  std::vector<int64_t> count(S);
  for (int64_t s = 0; s < S; ++s) count[s] = qptr[s + 1] - qptr[s];
  if (!ip[kSplit]) {
    if (ip[kPath] == kDecode) {
      for (int64_t s = 0; s < S; ++s) direct[s] = count[s] > 0;
    } else if (ip[kPath] == kCascade) {
      for (int64_t s = 0; s < S; ++s) direct[s] = count[s] == 1 && cap[s] <= fp[kMinSplitTokens];
    } else {
      const double token_bytes = 2.0 * kv_heads * ip[kHeadDim] * ip[kElemBytes];
      int64_t direct_tokens = 0;
      for (int64_t s = 0; s < S; ++s) direct_tokens += count[s] == 1 ? cap[s] : 0;
      const double fair_share = static_cast<double>(std::max<int64_t>(direct_tokens, 1)) * kv_heads / num_sms;
      const bool grid_filled = NQ * kv_heads >= 2 * num_sms;
      const double long_seg = std::max(fp[kMinSplitTokens], fp[kSplitFactor] * fair_share);
      for (int64_t s = 0; s < S; ++s) {
        if (count[s] == 1) {
          direct[s] = grid_filled || cap[s] <= long_seg;
        } else if (count[s] > 1) {
          const double seg_bytes = cap[s] * token_bytes;
          const double reread_us = count[s] * seg_bytes / (fp[kL2Speedup] * fp[kGbps] * 1e3);
          direct[s] = seg_bytes <= fp[kL2Fraction] * fp[kL2Bytes] && reread_us <= fp[kDirectRereadUs];
        }
      }
    }
  }
  // kv chunks: per segment by its query count, halved (largest first) while the grid would not fill the device
  std::vector<int64_t> chunk(S);
  for (int64_t s = 0; s < S; ++s) {
    chunk[s] = ip[kKvChunk] > 0 ? ip[kKvChunk]
                                : std::min(ip[kMaxKvChunk], std::max(ip[kMinKvChunk], next_pow2(ip[kTokensPerQuery] *
                                                                                                std::max<int64_t>(count[s], 1))));
  }
  if (!ip[kSplit] && ip[kKvChunk] <= 0) {
    std::vector<int64_t> tiles(S, 0), candidates;
    int64_t programs = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (!direct[s] && count[s] > 0) {
        tiles[s] = cdiv(count[s], tile);
        programs += cdiv(cap[s], chunk[s]) * tiles[s];
        candidates.push_back(s);
      }
    }
    programs *= kv_heads;
    auto by_chunk = [&](int64_t a, int64_t b) { return chunk[a] > chunk[b]; };
    std::stable_sort(candidates.begin(), candidates.end(), by_chunk);
    while (programs < 2 * num_sms && !candidates.empty()) {
      const int64_t i = candidates.front();
      if (chunk[i] <= ip[kMinKvChunk] || cap[i] <= chunk[i] / 2) {
        candidates.erase(candidates.begin());
        continue;
      }
      const int64_t before = cdiv(cap[i], chunk[i]);
      chunk[i] /= 2;
      programs += kv_heads * tiles[i] * (cdiv(cap[i], chunk[i]) - before);
      std::stable_sort(candidates.begin(), candidates.end(), by_chunk);
    }
  }

  // work items (segment, kv chunk, query tile), tiles fastest; partial slots numbered in item order
  std::vector<int64_t> w_seg, w_kv0, w_kv1, w_q0, w_q1, w_out, slot_query;
  int64_t num_partials = 0, max_q = 0;
  for (int64_t s = 0; s < S; ++s) {
    if (direct[s] || count[s] == 0 || cap[s] == 0) continue;
    const int64_t nt = cdiv(count[s], tile);
    for (int64_t kv0 = 0; kv0 < cap[s]; kv0 += chunk[s]) {
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t q0 = qptr[s] + t * tile, q1 = std::min(q0 + tile, qptr[s + 1]);
        w_seg.push_back(s);
        w_kv0.push_back(kv0);
        w_kv1.push_back(std::min(kv0 + chunk[s], cap[s]));
        w_q0.push_back(q0);
        w_q1.push_back(q1);
        w_out.push_back(num_partials);
        for (int64_t j = q0; j < q1; ++j) slot_query.push_back(q[j]);
        num_partials += q1 - q0;
        max_q = std::max(max_q, q1 - q0);
      }
    }
    TORCH_CHECK_VALUE(static_cast<int64_t>(w_seg.size()) <= (int64_t{1} << 24),
                      "o1kernels: the plan would hold more than 16777216 work items: use a larger kv_chunk_size / "
                      "queries_per_tile or fewer, shorter segments");
  }
  std::vector<int64_t> slot_indptr, slots, slot_ids(num_partials);
  for (int64_t k = 0; k < num_partials; ++k) slot_ids[k] = k;
  csr_by_key(slot_query, slot_ids, NQ, slot_indptr, slots);
  std::vector<int64_t> direct_q, direct_seg;
  for (int64_t s = 0; s < S; ++s) {
    if (!direct[s] || count[s] == 0 || cap[s] == 0) continue;
    for (int64_t i = qptr[s]; i < qptr[s + 1]; ++i) {
      direct_q.push_back(q[i]);
      direct_seg.push_back(s);
    }
  }
  const int64_t num_direct = static_cast<int64_t>(direct_q.size());
  const bool capped = ip[kCapSegments] >= 0;
  const bool has_direct = capped || num_direct > 0;
  std::vector<int64_t> direct_indptr, direct_segs;
  if (has_direct) csr_by_key(direct_q, direct_seg, NQ, direct_indptr, direct_segs);
  const int64_t num_work = static_cast<int64_t>(w_seg.size());
  const int64_t refs = static_cast<int64_t>(q.size());
  if (capped && (S > ip[kCapSegments] || refs > ip[kCapQueryRefs] || num_work > ip[kCapWork] ||
                 num_partials > ip[kCapPartials] || num_direct > ip[kCapDirect] ||
                 (!ip[kExternalPages] && pages.numel() > ip[kCapPages]))) {
    return {-1, num_work, num_partials, max_q, num_direct, has_direct, num_partials, num_work, num_partials,
            num_direct, refs};
  }

  // the arrays, in PlanLayout's order, padded to the capacity when there is one
  const int64_t* page_start_p = page_start.data_ptr<int64_t>();
  struct Part {
    const void* data;
    int64_t n;
    bool is32;
    int64_t padded;
  };
  auto sized = [&](int64_t n, int64_t cap_n) { return capped ? cap_n : n; };
  std::vector<Part> parts = {
      {pages.data_ptr<int32_t>(), ip[kExternalPages] ? -1 : pages.numel(), true, sized(pages.numel(), ip[kCapPages])},
      {page_start_p, S, false, sized(S, ip[kCapSegments])},
      {cap, S, false, sized(S, ip[kCapSegments])},
      {seg_first, S, false, sized(S, ip[kCapSegments])},
      {q.data(), refs, false, sized(refs, ip[kCapQueryRefs])},
      {w_seg.data(), num_work, false, sized(num_work, ip[kCapWork])},
      {w_kv0.data(), num_work, false, sized(num_work, ip[kCapWork])},
      {w_kv1.data(), num_work, false, sized(num_work, ip[kCapWork])},
      {w_q0.data(), num_work, false, sized(num_work, ip[kCapWork])},
      {w_q1.data(), num_work, false, sized(num_work, ip[kCapWork])},
      {w_out.data(), num_work, false, sized(num_work, ip[kCapWork])},
      {slot_indptr.data(), NQ + 1, false, NQ + 1},
      {slots.data(), num_partials, false, sized(num_partials, ip[kCapPartials])},
      {direct_indptr.data(), has_direct ? NQ + 1 : -1, false, NQ + 1},
      {direct_segs.data(), has_direct ? num_direct : -1, false, sized(num_direct, ip[kCapDirect])},
  };
  int64_t total = 0;
  int64_t* sizes = array_sizes.data_ptr<int64_t>();
  for (int a = 0; a < kNumArrays; ++a) {
    sizes[a] = parts[a].n < 0 ? -1 : parts[a].padded;
    total += std::max<int64_t>(sizes[a], 0);
  }
  if (out.numel() >= total) {
    int32_t* dst = out.data_ptr<int32_t>();
    for (const Part& part : parts) {
      if (part.n < 0) continue;
      if (part.is32) {
        std::copy_n(static_cast<const int32_t*>(part.data), part.n, dst);
      } else {
        const int64_t* src = static_cast<const int64_t*>(part.data);
        for (int64_t i = 0; i < part.n; ++i) dst[i] = static_cast<int32_t>(src[i]);
      }
      std::fill(dst + part.n, dst + part.padded, 0);
      dst += part.padded;
    }
  }
  return {total, capped ? ip[kCapWork] : num_work, capped ? ip[kCapPartials] : num_partials, capped ? tile : max_q,
          num_direct, has_direct, num_partials, num_work, num_partials, num_direct, refs};
}

}  // namespace
}  // namespace bindings
}  // namespace o1k

TORCH_LIBRARY_FRAGMENT(o1kernels, m) {
  // Host planning (CPU tensors, written in place; not for traced or captured code): see plan.py's layout_arrays.
  m.def("plan_layout(Tensor pages, Tensor page_start, Tensor capacity, Tensor start, Tensor query_ptr, "
        "Tensor queries, Tensor positions, Tensor int_params, Tensor float_params, Tensor(a!) out, "
        "Tensor(b!) array_sizes) -> (int, int, int, int, int, int, int, int, int, int, int)");
}

TORCH_LIBRARY_IMPL(o1kernels, CPU, m) { m.impl("plan_layout", &o1k::bindings::plan_layout_cpu); }
