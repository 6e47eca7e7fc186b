// Launcher of the fused step-reward pipeline (see step_rewards.cuh).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "o1kernels/step_rewards.cuh"

namespace o1k {
namespace detail {
namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Rows of 8-element (16-byte for 16-bit types) aligned chunks: Hd and both row strides multiples of 8.
bool hidden_rows_vec8(const StepRewardsParams& p) {
  return p.hidden_dim % 8 == 0 && p.hidden_stride_b % 8 == 0 && p.hidden_stride_l % 8 == 0 && aligned16(p.hidden);
}

bool step_mlp_uses_tensor_cores(DType dtype, const StepRewardsParams& p) {
  return dtype != DType::kFloat32 && !p.mlp_weight_fp32 && hidden_rows_vec8(p) && aligned16(p.mlp_weight);
}

template <typename T>
cudaError_t launch_step_rewards(DType dtype, const StepRewardsParams& p, cudaStream_t stream) {
  if (p.mlp_weight == nullptr) {
    if (p.num_tokens > 0) {
      const int grid = ceil_div(p.num_tokens, kHeadBlockTokens);
      if (hidden_rows_vec8(p) && aligned16(p.head_weight)) {
        step_head_kernel<T, true><<<grid, kStepThreads, 0, stream>>>(p);
      } else {
        step_head_kernel<T, false><<<grid, kStepThreads, 0, stream>>>(p);
      }
    }
    step_chain_kernel<false><<<p.num_seqs, kStepThreads, 0, stream>>>(p, StepWorkspace{});
    return cudaGetLastError();
  }
  if (p.num_tokens == 0) {
    step_chain_kernel<true><<<p.num_seqs, kStepThreads, 0, stream>>>(p, StepWorkspace{});
    return cudaGetLastError();
  }
  const StepWorkspace w = carve_workspace(p);
  step_count_kernel<<<w.num_blocks, kStepThreads, 0, stream>>>(p, w);
  step_compact_kernel<<<w.num_blocks, kStepThreads, 0, stream>>>(p, w);
  // Persistent grid: the step count is only known on the device.
  const int sms = std::max(p.num_sms, 1);
  if constexpr (!std::is_same<T, float>::value) {
    if (step_mlp_uses_tensor_cores(dtype, p)) {
      const int64_t max_tiles = static_cast<int64_t>(ceil_div(p.num_tokens, kMmaRows)) * ceil_div(p.mlp_dim, kMmaUnits);
      const int grid = static_cast<int>(std::min<int64_t>(max_tiles, 2 * static_cast<int64_t>(sms)));
      constexpr int smem = static_cast<int>(mma_smem_bytes<T>());
      const cudaError_t err =
          cudaFuncSetAttribute(step_mlp_mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return err;
      step_mlp_mma_kernel<T><<<grid, kMmaThreads, smem, stream>>>(p, w);
      step_chain_kernel<true><<<p.num_seqs, kStepThreads, 0, stream>>>(p, w);
      return cudaGetLastError();
    }
  }
  const int64_t max_tiles = static_cast<int64_t>(ceil_div(p.num_tokens, kSimtRows)) * ceil_div(p.mlp_dim, kSimtUnits);
  const int grid = static_cast<int>(std::min<int64_t>(max_tiles, 4 * static_cast<int64_t>(sms)));
  if (p.mlp_weight_fp32) {
    step_mlp_simt_kernel<T, float><<<grid, kSimtThreads, 0, stream>>>(p, w);
  } else {
    step_mlp_simt_kernel<T, T><<<grid, kSimtThreads, 0, stream>>>(p, w);
  }
  step_chain_kernel<true><<<p.num_seqs, kStepThreads, 0, stream>>>(p, w);
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

size_t step_rewards_workspace_bytes(const StepRewardsParams& p) {
  return p.mlp_weight == nullptr || p.num_tokens == 0 ? 0 : detail::workspace_bytes(p);
}

cudaError_t step_rewards(DType hidden_dtype, const StepRewardsParams& p, cudaStream_t stream) {
  if (p.num_classes < 1 || p.num_classes > kMaxClasses || p.positive_index < 0 ||
      p.positive_index >= p.num_classes || p.seq_len < 0 || p.num_tokens < 0 ||
      (p.mlp_weight != nullptr && p.num_tokens > 0 && p.workspace == nullptr)) {
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
