// CUDA implementations of the o1kernels ops: check arguments, fill the framework-agnostic
// parameter structs (csrc/include/o1kernels/api.h) and launch on the current torch stream.
// No host-device synchronisation: index values are trusted (the Python plan validated them on
// the host; segment lengths and cu_seqlens are clamped by the kernels).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "o1kernels/api.h"
#include "ops.h"

namespace o1k {
namespace bindings {
namespace {

DType to_dtype(at::ScalarType t) {
  if (t == at::kHalf) return DType::kFloat16;
  if (t == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(t == at::kFloat, "o1kernels: unsupported dtype ", t);
  return DType::kFloat32;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "o1kernels: ", op, " CUDA launch failed: ", cudaGetErrorString(err));
}

const int32_t* i32(const at::Tensor& t) { return t.data_ptr<int32_t>(); }

const float* f32_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor float_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

}  // namespace

void tree_attention_partial_cuda(O1K_TREE_ATTENTION_PARTIAL_ARGS) {
  const TreeAttentionSizes s = check_tree_attention_partial(
      q, k_cache, v_cache, page_table, seg_page_start, seg_capacity, seg_lens, seg_queries, work_seg, work_kv_start,
      work_kv_end, work_q_start, work_q_end, work_out, max_work_queries, sm_scale, part_o, part_lse);
  const c10::cuda::CUDAGuard guard(q.device());
  TreeAttentionParams p{};
  p.q = q.data_ptr();
  p.q_stride_n = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_token = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_token = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.page_table = i32(page_table);
  p.seg_page_start = i32(seg_page_start);
  p.seg_capacity = i32(seg_capacity);
  p.seg_lens = i32(seg_lens);
  p.seg_queries = i32(seg_queries);
  p.work_seg = i32(work_seg);
  p.work_kv_start = i32(work_kv_start);
  p.work_kv_end = i32(work_kv_end);
  p.work_q_start = i32(work_q_start);
  p.work_q_end = i32(work_q_end);
  p.work_out = i32(work_out);
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.num_work = static_cast<int>(s.num_work);
  p.max_work_queries = static_cast<int>(max_work_queries);
  p.num_q_heads = static_cast<int>(s.num_q_heads);
  p.num_kv_heads = static_cast<int>(s.num_kv_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.page_size = static_cast<int>(s.page_size);
  p.sm_scale = static_cast<float>(sm_scale);
  check_launch(o1k::tree_attention_partial(to_dtype(q.scalar_type()), p, c10::cuda::getCurrentCUDAStream()),
               "tree_attention_partial");
}

void merge_partials_cuda(O1K_MERGE_PARTIALS_ARGS) {
  const MergePartialsSizes s = check_merge_partials(part_o, part_lse, query_slot_indptr, query_slots, o, lse);
  const c10::cuda::CUDAGuard guard(part_o.device());
  MergePartialsParams p{};
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.query_slot_indptr = i32(query_slot_indptr);
  p.query_slots = i32(query_slots);
  p.o = o.data_ptr();
  p.o_stride_n = o.stride(0);
  p.o_stride_h = o.stride(1);
  p.lse = lse.data_ptr<float>();
  p.lse_stride_n = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.num_queries = static_cast<int>(s.num_queries);
  p.num_heads = static_cast<int>(s.num_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  check_launch(o1k::merge_partials(to_dtype(o.scalar_type()), p, c10::cuda::getCurrentCUDAStream()), "merge_partials");
}

void merge_states_cuda(O1K_MERGE_STATES_ARGS) {
  const MergeStatesSizes s = check_merge_states(o_a, lse_a, o_b, lse_b, o, lse);
  const c10::cuda::CUDAGuard guard(o_a.device());
  MergeStatesParams p{};
  p.o_a = o_a.data_ptr();
  p.o_b = o_b.data_ptr();
  p.o = o.data_ptr();
  p.o_a_stride_n = o_a.stride(0);
  p.o_a_stride_h = o_a.stride(1);
  p.o_b_stride_n = o_b.stride(0);
  p.o_b_stride_h = o_b.stride(1);
  p.o_stride_n = o.stride(0);
  p.o_stride_h = o.stride(1);
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.lse_a_stride_n = lse_a.stride(0);
  p.lse_a_stride_h = lse_a.stride(1);
  p.lse_b_stride_n = lse_b.stride(0);
  p.lse_b_stride_h = lse_b.stride(1);
  p.lse_stride_n = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.num_rows = static_cast<int>(s.num_rows);
  p.num_heads = static_cast<int>(s.num_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  check_launch(o1k::merge_states(to_dtype(o_a.scalar_type()), p, c10::cuda::getCurrentCUDAStream()), "merge_states");
}

void step_rewards_cuda(O1K_STEP_REWARDS_ARGS) {
  const StepRewardsSizes s =
      check_step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                         activation, positive_index, aggregate, step_scores, chain_scores);
  const c10::cuda::CUDAGuard guard(hidden.device());
  // Small parameters as fp32 copies (a few KiB); the hidden-layer weight is used as is when it
  // has the hidden dtype (tensor cores), else as fp32.
  const at::Tensor mask = step_mask.contiguous();
  const at::Tensor cu = cu_seqlens.has_value() ? cu_seqlens->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b_head = float_or_empty(bias), nw = float_or_empty(norm_weight), mlp_b = float_or_empty(mlp_bias);
  at::Tensor mlp_w;
  if (mlp_weight.has_value()) {
    mlp_w = mlp_weight->scalar_type() == hidden.scalar_type() ? mlp_weight->contiguous()
                                                              : mlp_weight->to(at::kFloat).contiguous();
  }
  StepRewardsParams p{};
  p.hidden = hidden.data_ptr();
  p.hidden_stride_b = s.packed ? 0 : hidden.stride(0);
  p.hidden_stride_l = hidden.stride(s.packed ? 0 : 1);
  p.step_mask = mask.data_ptr<bool>();
  p.cu_seqlens = cu.defined() ? cu.data_ptr<int32_t>() : nullptr;
  p.weight = w.data_ptr<float>();
  p.bias = f32_or_null(b_head);
  p.norm_weight = f32_or_null(nw);
  p.mlp_weight = mlp_w.defined() ? mlp_w.data_ptr() : nullptr;
  p.mlp_bias = f32_or_null(mlp_b);
  p.mlp_weight_fp32 = mlp_w.defined() && mlp_w.scalar_type() != hidden.scalar_type();
  p.norm_eps = static_cast<float>(norm_eps);
  p.num_seqs = static_cast<int>(s.num_seqs);
  p.seq_len = static_cast<int>(s.seq_len);
  p.num_tokens = static_cast<int>(s.num_tokens);
  p.hidden_dim = static_cast<int>(s.hidden_dim);
  p.mlp_dim = static_cast<int>(s.mlp_dim);
  p.num_classes = static_cast<int>(s.num_classes);
  p.positive_index = static_cast<int>(positive_index);
  p.activation = static_cast<Activation>(s.activation);
  p.aggregate = static_cast<Aggregate>(s.aggregate);
  p.step_scores = step_scores.data_ptr<float>();
  p.chain_scores = chain_scores.data_ptr<float>();
  check_launch(cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, hidden.get_device()),
               "step_rewards (SM count query)");
  const StepRewardsWorkspace ws = step_rewards_workspace_sizes(p);
  const auto int_opts = hidden.options().dtype(at::kInt);
  const auto float_opts = hidden.options().dtype(at::kFloat);
  const at::Tensor seq_step_start = at::empty({ws.int32_elems_seq_start}, int_opts);
  const at::Tensor step_token = at::empty({ws.int32_elems_step_token}, int_opts);
  const at::Tensor row_scale = at::empty({ws.float_elems_row_scale}, float_opts);
  const at::Tensor logits = at::empty({ws.float_elems_logits}, float_opts);
  p.seq_step_start = seq_step_start.data_ptr<int32_t>();
  p.step_token = step_token.data_ptr<int32_t>();
  p.step_row_scale = row_scale.data_ptr<float>();
  p.step_logits = logits.data_ptr<float>();
  check_launch(o1k::step_rewards(to_dtype(hidden.scalar_type()), p, c10::cuda::getCurrentCUDAStream()),
               "step_rewards");
}

}  // namespace bindings
}  // namespace o1k

TORCH_LIBRARY_IMPL(o1kernels, CUDA, m) {
  m.impl("tree_attention_partial", &o1k::bindings::tree_attention_partial_cuda);
  m.impl("merge_partials", &o1k::bindings::merge_partials_cuda);
  m.impl("merge_states", &o1k::bindings::merge_states_cuda);
  m.impl("step_rewards", &o1k::bindings::step_rewards_cuda);
}
