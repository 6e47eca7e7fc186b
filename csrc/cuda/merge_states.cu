// Launchers of the LSE merge kernels (merge of a plan's partials, two-state merge_states).
#include "o1kernels/merge_states.cuh"

namespace o1k {
namespace detail {

template <typename T>
cudaError_t launch_merge_partials(const MergePartialsParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_queries, ceil_div(p.num_heads, kMergeWarps));
  merge_partials_kernel<T><<<grid, 32 * kMergeWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_merge_states(const MergeStatesParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_rows, ceil_div(p.num_heads, kMergeWarps));
  merge_states_kernel<T><<<grid, 32 * kMergeWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

cudaError_t merge_partials(DType out_dtype, const MergePartialsParams& p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  if (p.num_queries == 0 || p.num_heads == 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kFloat16: return detail::launch_merge_partials<__half>(p, stream);
    case DType::kBFloat16: return detail::launch_merge_partials<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return detail::launch_merge_partials<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t merge_states(DType dtype, const MergeStatesParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.num_heads == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16: return detail::launch_merge_states<__half>(p, stream);
    case DType::kBFloat16: return detail::launch_merge_states<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return detail::launch_merge_states<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace o1k
