// CPU log-sum-exp merges (same contract as csrc/include/o1kernels/merge_states.cuh):
// merge_partials over a plan's CSR of partial slots (plus optional sinks), and the two-state merge_states.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "torch_bindings/ops.h"

namespace o1k {
namespace bindings {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_csr_values(const MergePartialsSizes& s, const int32_t* indptr, const int32_t* slots, int64_t num_slots) {
  TORCH_CHECK(indptr[0] == 0 && indptr[s.num_queries] == num_slots, "o1kernels: query_slot_indptr must start at 0 "
              "and end at len(query_slots) = ", num_slots, ", got ", indptr[0], " and ", indptr[s.num_queries]);
  for (int64_t n = 0; n < s.num_queries; ++n) {
    TORCH_CHECK(indptr[n] <= indptr[n + 1], "o1kernels: query_slot_indptr must be non-decreasing, got ", indptr[n],
                " then ", indptr[n + 1], " at query ", n);
  }
  for (int64_t i = 0; i < num_slots; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < s.num_partials, "o1kernels: query_slots[", i, "] = ", slots[i],
                " is outside [0, ", s.num_partials, ") (part_o.shape[0])");
  }
}

}  // namespace

void merge_partials_cpu(O1K_MERGE_PARTIALS_ARGS) {
  const MergePartialsSizes s = check_merge_partials(part_o, part_lse, query_slot_indptr, query_slots, sinks, o, lse);
  const int32_t* indptr = query_slot_indptr.data_ptr<int32_t>();
  const int32_t* slots = query_slots.data_ptr<int32_t>();
  check_csr_values(s, indptr, slots, query_slots.size(0));
  const float* po = part_o.data_ptr<float>();
  const float* pl = part_lse.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const float* sink_ptr = sinks.has_value() ? sinks->data_ptr<float>() : nullptr;
  const int64_t H = s.num_heads, D = s.head_dim;
  O1K_DISPATCH_FLOAT(o.scalar_type(), "merge_partials_cpu", [&] {
    scalar_t* o_out = o.data_ptr<scalar_t>();
    at::parallel_for(0, s.num_queries * H, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / H, h = item % H;
        const float sink = sink_ptr != nullptr ? sink_ptr[h] : kNegInf;  // a slot with lse = sink and o = 0
        float m = sink;
        for (int32_t i = indptr[n]; i < indptr[n + 1]; ++i) m = std::max(m, pl[slots[i] * H + h]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float sum = 0.f;
        if (m != kNegInf) {
          sum = std::exp(sink - m);
          for (int32_t i = indptr[n]; i < indptr[n + 1]; ++i) {
            const int64_t idx = static_cast<int64_t>(slots[i]) * H + h;
            const float w = std::exp(pl[idx] - m);
            sum += w;
            for (int64_t d = 0; d < D; ++d) acc[d] += w * po[idx * D + d];
          }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        scalar_t* dst = o_out + n * o.stride(0) + h * o.stride(1);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inv);
        lse_out[n * lse.stride(0) + h * lse.stride(1)] = sum > 0.f ? m + std::log(sum) : kNegInf;
      }
    });
  });
}

void merge_states_cpu(O1K_MERGE_STATES_ARGS) {
  const MergeStatesSizes s = check_merge_states(o_a, lse_a, o_b, lse_b, o, lse);
  const int64_t H = s.num_heads, D = s.head_dim;
  const float* la = lse_a.data_ptr<float>();
  const float* lb = lse_b.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  O1K_DISPATCH_FLOAT(o_a.scalar_type(), "merge_states_cpu", [&] {
    const scalar_t* a = o_a.data_ptr<scalar_t>();
    const scalar_t* b = o_b.data_ptr<scalar_t>();
    scalar_t* out = o.data_ptr<scalar_t>();
    at::parallel_for(0, s.num_rows * H, 64, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / H, h = item % H;
        const float lse_x = la[n * lse_a.stride(0) + h * lse_a.stride(1)];
        const float lse_y = lb[n * lse_b.stride(0) + h * lse_b.stride(1)];
        const float m = std::max(lse_x, lse_y);
        const float ref = m == kNegInf ? 0.f : m;
        const float w_a = std::exp(lse_x - ref), w_b = std::exp(lse_y - ref), total = w_a + w_b;
        const float inv = total > 0.f ? 1.f / total : 0.f;
        const scalar_t* src_a = a + n * o_a.stride(0) + h * o_a.stride(1);
        const scalar_t* src_b = b + n * o_b.stride(0) + h * o_b.stride(1);
        scalar_t* dst = out + n * o.stride(0) + h * o.stride(1);
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>((w_a * static_cast<float>(src_a[d]) + w_b * static_cast<float>(src_b[d])) * inv);
        }
        lse_out[n * lse.stride(0) + h * lse.stride(1)] = total > 0.f ? ref + std::log(total) : kNegInf;
      }
    });
  });
}

}  // namespace bindings
}  // namespace o1k
