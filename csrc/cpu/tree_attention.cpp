// CPU tree attention partials: same contract as the CUDA kernel (csrc/include/o1kernels/api.h),
// at::parallel_for over work items, fp32 math. Unlike the CUDA op, every index of
// the plan is checked here against the tensors it addresses (reading CPU values is free).
// With positions a work item reads only the tokens some of its queries see (the union of their
// visible ranges) and each query's scores are limited to its own range.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "torch_bindings/ops.h"

namespace o1k {
namespace bindings {
namespace {

struct PlanView {
  const int32_t *page_table, *seg_page_start, *seg_capacity, *seg_lens, *seg_queries;
  const int32_t *work_seg, *work_kv_start, *work_kv_end, *work_q_start, *work_q_end, *work_out;
  const int32_t *seg_start, *q_pos;  // nullptr: no masking by position
  int64_t window;                    // 0: no window
};

// Tokens [lo, hi) of an item's range [kv_lo, kv_hi) of segment `seg` that query row `query` sees: all of them
// without positions; else t <= q_pos - seg_start and (window W) t > q_pos - seg_start - W. Empty: hi <= lo.
struct TokenRange {
  int64_t lo, hi;
};

TokenRange visible_range(const PlanView& v, int64_t seg, int64_t query, int64_t kv_lo, int64_t kv_hi) {
  if (v.q_pos == nullptr) return {kv_lo, kv_hi};
  const int64_t rel = static_cast<int64_t>(v.q_pos[query]) - v.seg_start[seg];
  return {v.window > 0 ? std::max(kv_lo, rel - v.window + 1) : kv_lo, std::min(kv_hi, rel + 1)};
}

void check_plan_values(const TreeAttentionSizes& s, const PlanView& v, int64_t num_page_refs,
                       int64_t num_query_refs, int64_t max_work_queries) {
  for (int64_t i = 0; i < num_page_refs; ++i) {
    TORCH_CHECK(v.page_table[i] >= 0 && v.page_table[i] < s.num_pages, "o1kernels: page_table[", i, "] = ",
                v.page_table[i], " is outside [0, ", s.num_pages, ") (k_cache.shape[0])");
  }
  for (int64_t i = 0; i < num_query_refs; ++i) {
    TORCH_CHECK(v.seg_queries[i] >= 0 && v.seg_queries[i] < s.num_queries, "o1kernels: seg_queries[", i, "] = ",
                v.seg_queries[i], " is outside [0, ", s.num_queries, ") (q.shape[0])");
  }
  for (int64_t g = 0; g < s.num_segments; ++g) {
    const int64_t start = v.seg_page_start[g], capacity = v.seg_capacity[g];
    const int64_t pages = (capacity + s.page_size - 1) / s.page_size;
    TORCH_CHECK(start >= 0 && capacity >= 0 && start + pages <= num_page_refs, "o1kernels: segment ", g,
                " (seg_page_start ", start, ", seg_capacity ", capacity, ") needs pages beyond page_table (",
                num_page_refs, " entries)");
  }
  for (int64_t w = 0; w < s.num_work; ++w) {
    const int64_t seg = v.work_seg[w];
    TORCH_CHECK(seg >= 0 && seg < s.num_segments, "o1kernels: work_seg[", w, "] = ", seg, " is outside [0, ",
                s.num_segments, ")");
    const int64_t kv0 = v.work_kv_start[w], kv1 = v.work_kv_end[w], q0 = v.work_q_start[w], q1 = v.work_q_end[w];
    TORCH_CHECK(0 <= kv0 && kv0 <= kv1 && kv1 <= v.seg_capacity[seg], "o1kernels: work item ", w,
                " has token range [", kv0, ", ", kv1, ") outside segment ", seg, "'s capacity ",
                v.seg_capacity[seg]);
    TORCH_CHECK(0 <= q0 && q0 <= q1 && q1 <= num_query_refs, "o1kernels: work item ", w, " has query range [", q0,
                ", ", q1, ") outside seg_queries (", num_query_refs, " entries)");
    TORCH_CHECK(q1 - q0 <= max_work_queries, "o1kernels: work item ", w, " has ", q1 - q0,
                " queries, more than max_work_queries = ", max_work_queries);
    TORCH_CHECK(v.work_out[w] >= 0 && v.work_out[w] + (q1 - q0) <= s.num_partials, "o1kernels: work item ", w,
                " writes partial slots [", v.work_out[w], ", ", v.work_out[w] + (q1 - q0), ") outside part_o (",
                s.num_partials, " slots)");
  }
}

// A work item at most this many kv tokens long, read by at most kSmallRows query heads per kv
// head, runs as plain loops (small_item); larger ones as batched matrix products. The ~10 ATen
// calls of the batched path cost ~10 us per item, more than a small item's arithmetic: decoding,
// most items are a branch's own few-token tail read by one query.
constexpr int64_t kSmallTokens = 64;
constexpr int64_t kSmallRows = 16;

// q . k over D elements in fp32, with independent partial sums so the compiler can vectorise it.
template <typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t D) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int i = 0; i < 8; ++i) acc[i] += q[d + i] * static_cast<float>(k[d + i]);
  }
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < D; ++d) total += q[d] * static_cast<float>(k[d]);
  return total;
}

// One small work item (see kSmallTokens): each query head's scores over the chunk's n tokens (read in
// place through the page table), query j's over its tokens [ranges[j].lo, ranges[j].hi) only, then its
// softmax-weighted sum of V rows, in fp32. softcap > 0: scores -> softcap * tanh(scores / softcap).
template <typename scalar_t>
void small_item(const TreeAttentionSizes& s, const int32_t* pages, int64_t lo, int64_t n, const int32_t* queries,
                const TokenRange* ranges, int64_t num_q, int64_t out_slot, const scalar_t* q_ptr, int64_t q_stride_n,
                int64_t q_stride_h, const scalar_t* k_ptr, const int64_t k_strides[3], const scalar_t* v_ptr,
                const int64_t v_strides[3], float sm_scale, float softcap, float* part_o, float* part_lse) {
  const int64_t D = s.head_dim, hq = s.num_q_heads, group = hq / s.num_kv_heads;
  const scalar_t* k_rows[kSmallTokens];
  const scalar_t* v_rows[kSmallTokens];
  float q_row[kMaxHeadDim], scores[kSmallTokens];  // D <= kMaxHeadDim: check_tree_attention_partial
  for (int64_t head = 0; head < hq; ++head) {
    const int64_t kv_head = head / group;
    for (int64_t t = 0; head % group == 0 && t < n; ++t) {  // K/V rows once per kv head, shared by its group
      const int64_t tok = lo + t, page = pages[tok / s.page_size], slot = tok % s.page_size;
      k_rows[t] = k_ptr + page * k_strides[0] + slot * k_strides[1] + kv_head * k_strides[2];
      v_rows[t] = v_ptr + page * v_strides[0] + slot * v_strides[1] + kv_head * v_strides[2];
    }
    for (int64_t j = 0; j < num_q; ++j) {
      const scalar_t* src = q_ptr + queries[j] * q_stride_n + head * q_stride_h;
      for (int64_t d = 0; d < D; ++d) q_row[d] = static_cast<float>(src[d]) * sm_scale;
      const int64_t t0 = ranges[j].lo - lo, t1 = ranges[j].hi - lo;
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t t = t0; t < t1; ++t) {
        scores[t] = dot(q_row, k_rows[t], D);
        if (softcap > 0.f) scores[t] = softcap * std::tanh(scores[t] / softcap);
        max_score = std::max(max_score, scores[t]);
      }
      const int64_t idx = (out_slot + j) * hq + head;
      float* out = part_o + idx * D;
      std::fill(out, out + D, 0.f);
      float sum = 0.f;
      for (int64_t t = t0; t < t1; ++t) {
        const float p = std::exp(scores[t] - max_score);
        sum += p;
        const scalar_t* v_row = v_rows[t];
        for (int64_t d = 0; d < D; ++d) out[d] += p * static_cast<float>(v_row[d]);
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a query that sees none of the item: o = 0, lse = -inf
      for (int64_t d = 0; d < D; ++d) out[d] *= inv;
      part_lse[idx] = sum > 0.f ? max_score + std::log(sum) : -std::numeric_limits<float>::infinity();
    }
  }
}

// One work item = one kv chunk of one segment and the queries reading it. A small one runs as loops
// (small_item); a larger one has its K/V rows gathered once (through the page table) into fp32
// [Hkv, n, D] buffers and its queries into [Hkv, queries x GQA group, D] (pre-scaled by sm_scale),
// so every kv head is two batched fp32 matrix products (scores, then P.V) and an exp over the scores.
template <typename scalar_t>
void run_partials(const TreeAttentionSizes& s, const PlanView& v, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, float sm_scale, float softcap, int64_t max_work_queries, float* part_o,
                  float* part_lse) {
  const int64_t D = s.head_dim, hq = s.num_q_heads, hkv = s.num_kv_heads, group = hq / hkv;
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  const int64_t q_stride_n = q.stride(0), q_stride_h = q.stride(1);
  const int64_t k_stride_page = k_cache.stride(0), k_stride_slot = k_cache.stride(1), k_stride_h = k_cache.stride(2);
  const int64_t v_stride_page = v_cache.stride(0), v_stride_slot = v_cache.stride(1), v_stride_h = v_cache.stride(2);
  const int64_t k_strides[3] = {k_stride_page, k_stride_slot, k_stride_h};
  const int64_t v_strides[3] = {v_stride_page, v_stride_slot, v_stride_h};
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  at::parallel_for(0, s.num_work, 1, [&](int64_t begin, int64_t end) {
    std::vector<TokenRange> ranges(max_work_queries);  // each query's visible tokens of the item
    for (int64_t w = begin; w < end; ++w) {
      const int64_t seg = v.work_seg[w], capacity = v.seg_capacity[seg];
      const int64_t length = std::min<int64_t>(std::max<int64_t>(v.seg_lens[seg], 0), capacity);
      const int64_t num_q = v.work_q_end[w] - v.work_q_start[w];
      const int32_t* queries = v.seg_queries + v.work_q_start[w];
      if (num_q == 0) continue;
      // Read the union of the queries' visible ranges within the chunk (all of it without positions).
      const int64_t kv_lo = v.work_kv_start[w], kv_hi = std::min<int64_t>(v.work_kv_end[w], length);
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
      for (int64_t j = 0; j < num_q; ++j) {
        ranges[j] = visible_range(v, seg, queries[j], kv_lo, kv_hi);
        if (ranges[j].lo < ranges[j].hi) {
          lo = std::min(lo, ranges[j].lo);
          hi = std::max(hi, ranges[j].hi);
        }
      }
      const int64_t n = std::max<int64_t>(hi - lo, 0);  // 0: no query sees the chunk (or it is past the length)
      if (n == 0) {  // empty chunk: o = 0, lse = -inf
        const int64_t first = v.work_out[w] * hq, count = num_q * hq;
        std::fill(part_o + first * D, part_o + (first + count) * D, 0.f);
        std::fill(part_lse + first, part_lse + first + count, -std::numeric_limits<float>::infinity());
        continue;
      }
      const int32_t* pages = v.page_table + v.seg_page_start[seg];
      if (n <= kSmallTokens && num_q * group <= kSmallRows) {
        small_item<scalar_t>(s, pages, lo, n, queries, ranges.data(), num_q, v.work_out[w], q_ptr, q_stride_n,
                             q_stride_h, k_ptr, k_strides, v_ptr, v_strides, sm_scale, softcap, part_o, part_lse);
        continue;
      }
      const int64_t rows = num_q * group;  // row j * group + g of kv head h is query j, head h * group + g
      at::Tensor keys = at::empty({hkv, n, D}, fp32), values = at::empty({hkv, n, D}, fp32);
      at::Tensor scaled_q = at::empty({hkv, rows, D}, fp32);
      float *keys_ptr = keys.data_ptr<float>(), *values_ptr = values.data_ptr<float>();
      float* scaled_q_ptr = scaled_q.data_ptr<float>();
      for (int64_t t = 0; t < n; ++t) {
        const int64_t tok = lo + t, page = pages[tok / s.page_size], slot = tok % s.page_size;
        for (int64_t h = 0; h < hkv; ++h) {
          const scalar_t* k_src = k_ptr + page * k_stride_page + slot * k_stride_slot + h * k_stride_h;
          const scalar_t* v_src = v_ptr + page * v_stride_page + slot * v_stride_slot + h * v_stride_h;
          float* k_dst = keys_ptr + (h * n + t) * D;
          float* v_dst = values_ptr + (h * n + t) * D;
          for (int64_t d = 0; d < D; ++d) k_dst[d] = static_cast<float>(k_src[d]);
          for (int64_t d = 0; d < D; ++d) v_dst[d] = static_cast<float>(v_src[d]);
        }
      }
      for (int64_t j = 0; j < num_q; ++j) {
        for (int64_t head = 0; head < hq; ++head) {
          const scalar_t* src = q_ptr + queries[j] * q_stride_n + head * q_stride_h;
          float* dst = scaled_q_ptr + ((head / group) * rows + j * group + head % group) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * sm_scale;
        }
      }
      at::Tensor probs = at::bmm(scaled_q, keys.transpose(1, 2));  // scores [Hkv, rows, n]
      if (softcap > 0.f) probs.div_(softcap).tanh_().mul_(softcap);
      at::Tensor max_score;
      if (v.q_pos != nullptr) {  // -inf outside each query's range; a row that sees nothing keeps max 0, sum 0
        float* score_ptr = probs.data_ptr<float>();
        for (int64_t r = 0; r < hkv * rows; ++r) {
          const TokenRange range = ranges[(r % rows) / group];
          float* row = score_ptr + r * n;
          std::fill(row, row + std::clamp<int64_t>(range.lo - lo, 0, n), -std::numeric_limits<float>::infinity());
          std::fill(row + std::clamp<int64_t>(range.hi - lo, 0, n), row + n, -std::numeric_limits<float>::infinity());
        }
        max_score = probs.amax(2, /*keepdim=*/true).clamp_min_(std::numeric_limits<float>::lowest());
      } else {
        max_score = probs.amax(2, /*keepdim=*/true);
      }
      probs.sub_(max_score).exp_();
      const at::Tensor sum = probs.sum(2);                    // [Hkv, rows]
      const at::Tensor out = at::bmm(probs, values);          // [Hkv, rows, D], unnormalised
      const float *out_ptr = out.data_ptr<float>(), *max_ptr = max_score.data_ptr<float>();
      const float* sum_ptr = sum.data_ptr<float>();
      for (int64_t j = 0; j < num_q; ++j) {
        for (int64_t head = 0; head < hq; ++head) {
          const int64_t row = (head / group) * rows + j * group + head % group;
          const int64_t idx = (v.work_out[w] + j) * hq + head;
          const float sum = sum_ptr[row], inv = sum > 0.f ? 1.f / sum : 0.f;
          for (int64_t d = 0; d < D; ++d) part_o[idx * D + d] = out_ptr[row * D + d] * inv;
          part_lse[idx] = sum > 0.f ? max_ptr[row] + std::log(sum) : -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

}  // namespace

void tree_attention_partial_cpu(O1K_TREE_ATTENTION_PARTIAL_ARGS) {
  const TreeAttentionSizes s = check_tree_attention_partial(
      q, k_cache, v_cache, page_table, seg_page_start, seg_capacity, seg_lens, seg_queries, work_seg, work_kv_start,
      work_kv_end, work_q_start, work_q_end, work_out, seg_start, q_pos, max_work_queries, sm_scale, window, softcap,
      part_o, part_lse);
  const PlanView view{page_table.data_ptr<int32_t>(),
                      seg_page_start.data_ptr<int32_t>(),
                      seg_capacity.data_ptr<int32_t>(),
                      seg_lens.data_ptr<int32_t>(),
                      seg_queries.data_ptr<int32_t>(),
                      work_seg.data_ptr<int32_t>(),
                      work_kv_start.data_ptr<int32_t>(),
                      work_kv_end.data_ptr<int32_t>(),
                      work_q_start.data_ptr<int32_t>(),
                      work_q_end.data_ptr<int32_t>(),
                      work_out.data_ptr<int32_t>(),
                      s.positions ? seg_start->data_ptr<int32_t>() : nullptr,
                      s.positions ? q_pos->data_ptr<int32_t>() : nullptr,
                      window.value_or(0)};
  check_plan_values(s, view, page_table.size(0), seg_queries.size(0), max_work_queries);
  O1K_DISPATCH_FLOAT(q.scalar_type(), "tree_attention_partial_cpu", [&] {
    run_partials<scalar_t>(s, view, q, k_cache, v_cache, static_cast<float>(sm_scale),
                           static_cast<float>(softcap.value_or(0.0)), max_work_queries, part_o.data_ptr<float>(),
                           part_lse.data_ptr<float>());
  });
}

}  // namespace bindings
}  // namespace o1k
