// Log-sum-exp merges of attention states: one warp per (row, head), lanes over head_dim.
//   merge_partials_kernel: all partial slots of a query (the plan's CSR) [+ a sink per head] -> o, lse
//   merge_states_kernel:   two states (o_a, lse_a), (o_b, lse_b) -> o, lse
// Natural-log LSE; a row whose inputs are all -inf gets o = 0, lse = -inf (never NaN).
#pragma once

#include <cmath>

#include "o1kernels/device_utils.cuh"

namespace o1k {
namespace detail {

constexpr int kMergeWarps = 4;  // heads per program
constexpr int kMergePerLane = kMaxHeadDim / 32;

template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_partials_kernel(const MergePartialsParams p) {
  const int n = blockIdx.x;
  const int h = blockIdx.y * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (h >= p.num_heads) return;
  const int begin = p.query_slot_indptr[n], end = p.query_slot_indptr[n + 1];
  const int D = p.head_dim;

  const float sink = p.sinks != nullptr ? p.sinks[h] : -INFINITY;  // a slot with lse = sink and o = 0
  float m = sink;
  for (int s = begin + lane; s < end; s += 32) {
    m = fmaxf(m, p.part_lse[static_cast<int64_t>(p.query_slots[s]) * p.num_heads + h]);
  }
  m = warp_max(m);
  float acc[kMergePerLane];
#pragma unroll
  for (int j = 0; j < kMergePerLane; ++j) acc[j] = 0.f;
  float l = 0.f;
  if (m != -INFINITY) {
    l = expf(sink - m);
    for (int s = begin; s < end; ++s) {
      const int64_t idx = static_cast<int64_t>(p.query_slots[s]) * p.num_heads + h;
      const float w = expf(p.part_lse[idx] - m);
      l += w;
      const float* src = p.part_o + idx * D;
#pragma unroll
      for (int j = 0; j < kMergePerLane; ++j) {
        const int d = lane + 32 * j;
        if (d < D) acc[j] += w * src[d];
      }
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* o = static_cast<T*>(p.o) + n * p.o_stride_n + h * p.o_stride_h;
#pragma unroll
  for (int j = 0; j < kMergePerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < D) o[d] = from_float<T>(acc[j] * inv);
  }
  if (lane == 0) p.lse[n * p.lse_stride_n + h * p.lse_stride_h] = l > 0.f ? m + logf(l) : -INFINITY;
}

template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_states_kernel(const MergeStatesParams p) {
  const int n = blockIdx.x;
  const int h = blockIdx.y * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (h >= p.num_heads) return;
  const float lse_a = p.lse_a[n * p.lse_a_stride_n + h * p.lse_a_stride_h];
  const float lse_b = p.lse_b[n * p.lse_b_stride_n + h * p.lse_b_stride_h];
  const float m = fmaxf(lse_a, lse_b);
  const float ref = m == -INFINITY ? 0.f : m;
  const float w_a = expf(lse_a - ref), w_b = expf(lse_b - ref);
  const float total = w_a + w_b;
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const T* o_a = static_cast<const T*>(p.o_a) + n * p.o_a_stride_n + h * p.o_a_stride_h;
  const T* o_b = static_cast<const T*>(p.o_b) + n * p.o_b_stride_n + h * p.o_b_stride_h;
  T* o = static_cast<T*>(p.o) + n * p.o_stride_n + h * p.o_stride_h;
  for (int d = lane; d < p.head_dim; d += 32) {
    o[d] = from_float<T>((w_a * to_float(o_a[d]) + w_b * to_float(o_b[d])) * inv);
  }
  if (lane == 0) p.lse[n * p.lse_stride_n + h * p.lse_stride_h] = total > 0.f ? ref + logf(total) : -INFINITY;
}

}  // namespace detail
}  // namespace o1k
