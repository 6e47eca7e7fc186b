// tree_attention_partial: picks the tensor-core or SIMT path and the dtype/head_dim instance.
#include <cstdint>

#include "o1kernels/tree_attention.cuh"

namespace o1k {
namespace detail {

// Defined in tree_attention_<dtype>_hd<D>.cu.
#define O1K_DECLARE_MMA(T, D) \
  extern template cudaError_t launch_tree_attention_mma_dispatch<T, D>(const TreeAttentionParams&, cudaStream_t);
O1K_DECLARE_MMA(__half, 64)
O1K_DECLARE_MMA(__half, 128)
O1K_DECLARE_MMA(__half, 256)
O1K_DECLARE_MMA(__nv_bfloat16, 64)
O1K_DECLARE_MMA(__nv_bfloat16, 128)
O1K_DECLARE_MMA(__nv_bfloat16, 256)
#undef O1K_DECLARE_MMA

template <typename T>
cudaError_t launch_mma_for_head_dim(const TreeAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_tree_attention_mma_dispatch<T, 64>(p, stream);
    case 128: return launch_tree_attention_mma_dispatch<T, 128>(p, stream);
    case 256: return launch_tree_attention_mma_dispatch<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace detail

bool tree_attention_uses_tensor_cores(DType dtype, const TreeAttentionParams& p) {
  if (dtype == DType::kFloat32) return false;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return false;
  const int64_t strides[] = {p.q_stride_n,     p.q_stride_h,      p.k_stride_page,   p.k_stride_token,
                             p.k_stride_head,  p.v_stride_page,   p.v_stride_token,  p.v_stride_head};
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;  // cp.async moves 16-byte (8-element) chunks
  }
  return detail::aligned16(p.q) && detail::aligned16(p.k_cache) && detail::aligned16(p.v_cache) &&
         detail::aligned16(p.part_o);
}

cudaError_t tree_attention_partial(DType dtype, const TreeAttentionParams& p, cudaStream_t stream) {
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.head_dim <= 0 || p.head_dim > kMaxHeadDim ||
      p.page_size <= 0) {
    return cudaErrorInvalidValue;
  }
  if (tree_attention_uses_tensor_cores(dtype, p)) {
    return dtype == DType::kFloat16 ? detail::launch_mma_for_head_dim<__half>(p, stream)
                                    : detail::launch_mma_for_head_dim<__nv_bfloat16>(p, stream);
  }
  switch (dtype) {
    case DType::kFloat16: return detail::launch_tree_attention_simt<__half>(p, stream);
    case DType::kBFloat16: return detail::launch_tree_attention_simt<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return detail::launch_tree_attention_simt<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace o1k
