// Launcher of the fused step-reward pipeline (see step_rewards.cuh).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "o1kernels/step_rewards.cuh"

namespace o1k {
namespace detail {

bool step_mlp_uses_tensor_cores(DType dtype, const StepRewardsParams& p) {
  if (dtype == DType::kFloat32 || p.mlp_weight_fp32 || p.hidden_dim % 8 != 0) return false;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return p.hidden_stride_b % 8 == 0 && p.hidden_stride_l % 8 == 0 && aligned(p.hidden) && aligned(p.mlp_weight);
}

template <typename T>
cudaError_t launch_step_rewards(DType dtype, const StepRewardsParams& p, cudaStream_t stream) {
  if (p.mlp_weight == nullptr) {
    step_rewards_finalize_kernel<T, false><<<p.num_seqs, kStepThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  step_count_kernel<<<p.num_seqs, kStepThreads, 0, stream>>>(p);
  step_scan_kernel<<<1, kScanThreads, 0, stream>>>(p);
  step_gather_kernel<T><<<p.num_seqs, kStepThreads, 0, stream>>>(p);
  // Persistent grid: the step count is only known on the device.
  const int64_t max_tiles = static_cast<int64_t>(ceil_div(std::max(p.num_tokens, 1), kMlpRows)) *
                            ceil_div(p.mlp_dim, kMlpUnits);
  const int grid = static_cast<int>(std::min<int64_t>(max_tiles, 4 * static_cast<int64_t>(std::max(p.num_sms, 1))));
  if (grid > 0) {
    if constexpr (!std::is_same<T, float>::value) {
      if (step_mlp_uses_tensor_cores(dtype, p)) {
        step_mlp_mma_kernel<T><<<grid, kMlpThreads, 0, stream>>>(p);
      } else if (p.mlp_weight_fp32) {
        step_mlp_simt_kernel<T, float><<<grid, kMlpThreads, 0, stream>>>(p);
      } else {
        step_mlp_simt_kernel<T, T><<<grid, kMlpThreads, 0, stream>>>(p);
      }
    } else {
      step_mlp_simt_kernel<float, float><<<grid, kMlpThreads, 0, stream>>>(p);
    }
  }
  step_rewards_finalize_kernel<T, true><<<p.num_seqs, kStepThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

StepRewardsWorkspace step_rewards_workspace_sizes(const StepRewardsParams& p) {
  if (p.mlp_weight == nullptr) return {0, 0, 0, 0};
  const int64_t tokens = p.num_tokens;
  return {static_cast<int64_t>(p.num_seqs) + 1, tokens, tokens, tokens * p.num_classes};
}

cudaError_t step_rewards(DType hidden_dtype, const StepRewardsParams& p, cudaStream_t stream) {
  if (p.num_classes < 1 || p.num_classes > kMaxClasses || p.positive_index < 0 ||
      p.positive_index >= p.num_classes || p.seq_len < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0) return cudaSuccess;
  switch (hidden_dtype) {
    case DType::kFloat16: return detail::launch_step_rewards<__half>(hidden_dtype, p, stream);
    case DType::kBFloat16: return detail::launch_step_rewards<__nv_bfloat16>(hidden_dtype, p, stream);
    case DType::kFloat32: return detail::launch_step_rewards<float>(hidden_dtype, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace o1k
