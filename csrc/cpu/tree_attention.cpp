// CPU tree attention partials: same contract as the CUDA kernel (csrc/include/o1kernels/api.h),
// at::parallel_for over (work item, kv head), fp32 math. Unlike the CUDA op, every index of
// the plan is checked here against the tensors it addresses (reading CPU values is free).
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
};

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

template <typename scalar_t>
void run_partials(const TreeAttentionSizes& s, const PlanView& v, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, float sm_scale, float* part_o, float* part_lse) {
  const int64_t D = s.head_dim, hq = s.num_q_heads, hkv = s.num_kv_heads, group = hq / hkv;
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  at::parallel_for(0, s.num_work * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys, values, scores, q_row(D), out(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t w = item / hkv, kv_head = item % hkv, seg = v.work_seg[w];
      const int64_t capacity = v.seg_capacity[seg];
      const int64_t length = std::min<int64_t>(std::max<int64_t>(v.seg_lens[seg], 0), capacity);
      const int64_t lo = v.work_kv_start[w], hi = std::min<int64_t>(v.work_kv_end[w], length);
      const int64_t n = std::max<int64_t>(hi - lo, 0);
      keys.resize(n * D);
      values.resize(n * D);
      scores.resize(n);
      const int32_t* pages = v.page_table + v.seg_page_start[seg];
      for (int64_t t = 0; t < n; ++t) {
        const int64_t tok = lo + t, page = pages[tok / s.page_size], slot = tok % s.page_size;
        const scalar_t* k_row = k_ptr + page * k_cache.stride(0) + slot * k_cache.stride(1) + kv_head * k_cache.stride(2);
        const scalar_t* v_row = v_ptr + page * v_cache.stride(0) + slot * v_cache.stride(1) + kv_head * v_cache.stride(2);
        for (int64_t d = 0; d < D; ++d) {
          keys[t * D + d] = static_cast<float>(k_row[d]);
          values[t * D + d] = static_cast<float>(v_row[d]);
        }
      }
      for (int64_t j = 0; j < v.work_q_end[w] - v.work_q_start[w]; ++j) {
        const int64_t qi = v.seg_queries[v.work_q_start[w] + j], slot = v.work_out[w] + j;
        for (int64_t hh = 0; hh < group; ++hh) {
          const int64_t head = kv_head * group + hh;
          const scalar_t* q_src = q_ptr + qi * q.stride(0) + head * q.stride(1);
          for (int64_t d = 0; d < D; ++d) q_row[d] = static_cast<float>(q_src[d]);
          float max_score = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < n; ++t) {
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += q_row[d] * keys[t * D + d];
            scores[t] = dot * sm_scale;
            max_score = std::max(max_score, scores[t]);
          }
          std::fill(out.begin(), out.end(), 0.f);
          float sum = 0.f;
          for (int64_t t = 0; t < n; ++t) {
            const float prob = std::exp(scores[t] - max_score);
            sum += prob;
            for (int64_t d = 0; d < D; ++d) out[d] += prob * values[t * D + d];
          }
          const int64_t idx = slot * hq + head;
          const float inv = n > 0 ? 1.f / sum : 0.f;
          for (int64_t d = 0; d < D; ++d) part_o[idx * D + d] = out[d] * inv;
          part_lse[idx] = n > 0 ? max_score + std::log(sum) : -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

}  // namespace

void tree_attention_partial_cpu(O1K_TREE_ATTENTION_PARTIAL_ARGS) {
  const TreeAttentionSizes s = check_tree_attention_partial(
      q, k_cache, v_cache, page_table, seg_page_start, seg_capacity, seg_lens, seg_queries, work_seg, work_kv_start,
      work_kv_end, work_q_start, work_q_end, work_out, max_work_queries, sm_scale, part_o, part_lse);
  const PlanView view{page_table.data_ptr<int32_t>(),    seg_page_start.data_ptr<int32_t>(),
                      seg_capacity.data_ptr<int32_t>(),  seg_lens.data_ptr<int32_t>(),
                      seg_queries.data_ptr<int32_t>(),   work_seg.data_ptr<int32_t>(),
                      work_kv_start.data_ptr<int32_t>(), work_kv_end.data_ptr<int32_t>(),
                      work_q_start.data_ptr<int32_t>(),  work_q_end.data_ptr<int32_t>(),
                      work_out.data_ptr<int32_t>()};
  check_plan_values(s, view, page_table.size(0), seg_queries.size(0), max_work_queries);
  O1K_DISPATCH_FLOAT(q.scalar_type(), "tree_attention_partial_cpu", [&] {
    run_partials<scalar_t>(s, view, q, k_cache, v_cache, static_cast<float>(sm_scale), part_o.data_ptr<float>(),
                           part_lse.data_ptr<float>());
  });
}

}  // namespace bindings
}  // namespace o1k
