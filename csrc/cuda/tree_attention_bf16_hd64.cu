// Tensor-core tree attention partials for __nv_bfloat16, head_dim 64 (one instantiation per file so
// builds parallelise).
#include "o1kernels/tree_attention.cuh"

namespace o1k {
namespace detail {
template cudaError_t launch_tree_attention_mma_dispatch<__nv_bfloat16, 64>(const TreeAttentionParams&, cudaStream_t);
}  // namespace detail
}  // namespace o1k
