// Binding layer of the o1kernels ops: argument checks shared by the CPU and CUDA
// implementations, and the implementations' declarations. Schemas (destination-passing:
// outputs are preallocated by o1kernels/_compiled.py and written in place) are in
// registration.cpp; see o1kernels/_compiled.py for the Python side.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string>

namespace o1k {
namespace bindings {

// Largest head_dim the checks accept (the CPU kernels size stack buffers by it); the value of o1k::kMaxHeadDim in
// include/o1kernels/api.h, which CPU-only builds cannot include.
constexpr int64_t kMaxHeadDim = 256;

// ---- sizes the checks return ----
struct TreeAttentionSizes {
  int64_t num_queries, num_q_heads, head_dim, num_pages, page_size, num_kv_heads, num_work, num_partials,
      num_segments;
  bool positions;  // seg_start and q_pos given: keys masked by query position
};

struct MergePartialsSizes {
  int64_t num_queries, num_heads, head_dim, num_partials;
};

struct MergeStatesSizes {
  int64_t num_rows, num_heads, head_dim;
};

// Sequence layout of step_rewards: padded [Bs, L, Hd] or packed [T, Hd] + cu_seqlens [Bs + 1].
struct StepRewardsSizes {
  bool packed;
  int64_t num_seqs, seq_len, num_tokens, hidden_dim, mlp_dim, num_classes;
  int activation;  // o1k::Activation
  int aggregate;   // o1k::Aggregate
};

// ---- argument checks (TORCH_CHECK -> RuntimeError naming the argument) ----
// Shapes, dtypes, devices, layouts. Index values are checked by the CPU implementations
// (reading CUDA values would need a host sync; the Python plan validated them).
TreeAttentionSizes check_tree_attention_partial(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& page_table,
    const at::Tensor& seg_page_start, const at::Tensor& seg_capacity, const at::Tensor& seg_lens,
    const at::Tensor& seg_queries, const at::Tensor& work_seg, const at::Tensor& work_kv_start,
    const at::Tensor& work_kv_end, const at::Tensor& work_q_start, const at::Tensor& work_q_end,
    const at::Tensor& work_out, const std::optional<at::Tensor>& seg_start, const std::optional<at::Tensor>& q_pos,
    int64_t max_work_queries, double sm_scale, std::optional<int64_t> window, std::optional<double> softcap,
    const at::Tensor& part_o, const at::Tensor& part_lse);

MergePartialsSizes check_merge_partials(const at::Tensor& part_o, const at::Tensor& part_lse,
                                        const at::Tensor& query_slot_indptr, const at::Tensor& query_slots,
                                        const std::optional<at::Tensor>& sinks, const at::Tensor& o,
                                        const at::Tensor& lse);

MergeStatesSizes check_merge_states(const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
                                    const at::Tensor& lse_b, const at::Tensor& o, const at::Tensor& lse);

StepRewardsSizes check_step_rewards(const at::Tensor& hidden, const at::Tensor& step_mask,
                                    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& norm_weight, double norm_eps,
                                    const std::optional<at::Tensor>& mlp_weight,
                                    const std::optional<at::Tensor>& mlp_bias, const std::string& activation,
                                    int64_t positive_index, const std::string& aggregate,
                                    const at::Tensor& step_scores, const at::Tensor& chain_scores);

// Dtype dispatch over the float dtypes the ops accept (scalar_t inside __VA_ARGS__).
#define O1K_DISPATCH_FLOAT(TYPE, NAME, ...)                                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---- implementations (CPU: csrc/cpu/*.cpp; CUDA: cuda_ops.cpp) ----
#define O1K_TREE_ATTENTION_PARTIAL_ARGS                                                                       \
  const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache, const at::Tensor &page_table,    \
      const at::Tensor &seg_page_start, const at::Tensor &seg_capacity, const at::Tensor &seg_lens,           \
      const at::Tensor &seg_queries, const at::Tensor &work_seg, const at::Tensor &work_kv_start,             \
      const at::Tensor &work_kv_end, const at::Tensor &work_q_start, const at::Tensor &work_q_end,            \
      const at::Tensor &work_out, const std::optional<at::Tensor>&seg_start,                                 \
      const std::optional<at::Tensor>&q_pos, int64_t max_work_queries, double sm_scale,                      \
      std::optional<int64_t> window, std::optional<double> softcap, const at::Tensor &part_o,                 \
      const at::Tensor &part_lse
#define O1K_MERGE_PARTIALS_ARGS                                                                  \
  const at::Tensor &part_o, const at::Tensor &part_lse, const at::Tensor &query_slot_indptr,     \
      const at::Tensor &query_slots, const std::optional<at::Tensor>&sinks, const at::Tensor &o, \
      const at::Tensor &lse
#define O1K_MERGE_STATES_ARGS                                                                            \
  const at::Tensor &o_a, const at::Tensor &lse_a, const at::Tensor &o_b, const at::Tensor &lse_b,       \
      const at::Tensor &o, const at::Tensor &lse
#define O1K_STEP_REWARDS_ARGS                                                                                 \
  const at::Tensor &hidden, const at::Tensor &step_mask, const std::optional<at::Tensor>&cu_seqlens,         \
      const at::Tensor &weight, const std::optional<at::Tensor>&bias,                                       \
      const std::optional<at::Tensor>&norm_weight, double norm_eps, const std::optional<at::Tensor>&mlp_weight, \
      const std::optional<at::Tensor>&mlp_bias, const std::string &activation, int64_t positive_index,       \
      const std::string &aggregate, const at::Tensor &step_scores, const at::Tensor &chain_scores

void tree_attention_partial_cpu(O1K_TREE_ATTENTION_PARTIAL_ARGS);
void merge_partials_cpu(O1K_MERGE_PARTIALS_ARGS);
void merge_states_cpu(O1K_MERGE_STATES_ARGS);
void step_rewards_cpu(O1K_STEP_REWARDS_ARGS);

void tree_attention_partial_cuda(O1K_TREE_ATTENTION_PARTIAL_ARGS);
void merge_partials_cuda(O1K_MERGE_PARTIALS_ARGS);
void merge_states_cuda(O1K_MERGE_STATES_ARGS);
void step_rewards_cuda(O1K_STEP_REWARDS_ARGS);

}  // namespace bindings
}  // namespace o1k
