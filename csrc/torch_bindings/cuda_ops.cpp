// CUDA implementations of the o1kernels ops: check arguments, fill the framework-agnostic
// parameter structs (csrc/include/o1kernels/api.h) and launch on the current torch stream.
// No host-device synchronisation: index values are trusted (the Python plan validated them on
// the host; segment lengths and cu_seqlens are clamped by the kernels). step_rewards converts its
// weights once per weight tensor (PreparedWeights below), not per call.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <vector>

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

}  // namespace

void tree_attention_partial_cuda(O1K_TREE_ATTENTION_PARTIAL_ARGS) {
  const TreeAttentionSizes s = check_tree_attention_partial(
      q, k_cache, v_cache, page_table, seg_page_start, seg_capacity, seg_lens, seg_queries, work_seg, work_kv_start,
      work_kv_end, work_q_start, work_q_end, work_out, seg_start, q_pos, max_work_queries, sm_scale, window, softcap,
      part_o, part_lse);
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
  p.seg_start = s.positions ? i32(*seg_start) : nullptr;
  p.q_pos = s.positions ? i32(*q_pos) : nullptr;
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.num_work = static_cast<int>(s.num_work);
  p.max_work_queries = static_cast<int>(max_work_queries);
  p.num_q_heads = static_cast<int>(s.num_q_heads);
  p.num_kv_heads = static_cast<int>(s.num_kv_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.page_size = static_cast<int>(s.page_size);
  p.window = static_cast<int>(window.value_or(0));
  p.sm_scale = static_cast<float>(sm_scale);
  p.softcap = static_cast<float>(softcap.value_or(0.0));
  check_launch(o1k::tree_attention_partial(to_dtype(q.scalar_type()), p, c10::cuda::getCurrentCUDAStream()),
               "tree_attention_partial");
}

void merge_partials_cuda(O1K_MERGE_PARTIALS_ARGS) {
  const MergePartialsSizes s = check_merge_partials(part_o, part_lse, query_slot_indptr, query_slots, sinks, o, lse);
  const c10::cuda::CUDAGuard guard(part_o.device());
  MergePartialsParams p{};
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.query_slot_indptr = i32(query_slot_indptr);
  p.query_slots = i32(query_slots);
  p.sinks = sinks.has_value() ? sinks->data_ptr<float>() : nullptr;
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

namespace {

// ---- step_rewards: weights prepared once per weight tensor ----

// A tensor's identity and state when a prepared weight was made from it: the TensorImpl (held weakly,
// so a freed tensor is seen as expired and its address cannot be reused while the entry lives), its
// version counter (bumped by every in-place op) and its data pointer (a .data / set_ swap).
struct WeightStamp {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  int64_t version;
  const void* data;

  static std::optional<WeightStamp> of(const at::Tensor& t) {
    if (t.is_inference()) return std::nullopt;  // no version counter: in-place changes would go unseen
    return WeightStamp{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
                       t._version(), t.data_ptr()};
  }
  bool same_tensor(const at::Tensor& t) const {
    return !impl.expired() && impl._unsafe_get_target() == t.unsafeGetTensorImpl();
  }
  bool current(const at::Tensor& t) const {
    return same_tensor(t) && !t.is_inference() && version == t._version() && data == t.data_ptr();
  }
};

// Cache of prepared (converted, norm-folded) step-reward weights: one entry per (purpose, source
// tensors, dtype), dropped once a source is freed. When a source changed in place or moved, the entry's
// tensor is refreshed in place, so a CUDA graph captured with it reads the new values after that eager
// call (or recapture). Inference tensors are never cached (no version counter); during a CUDA-graph
// capture a missing or stale entry is not filled (the conversion is captured into the graph and rerun
// at every replay; its values exist only after a replay).
class PreparedWeights {
 public:
  using Make = at::Tensor (*)(const at::Tensor&, const std::optional<at::Tensor>&, at::ScalarType);

  at::Tensor get(int purpose, const at::Tensor& source, const std::optional<at::Tensor>& norm, at::ScalarType dtype,
                 Make make) {
    const std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) {
                     return e.source.impl.expired() || (e.norm.has_value() && e.norm->impl.expired());
                   }),
                   entries_.end());
    const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
    std::optional<WeightStamp> source_stamp = WeightStamp::of(source), norm_stamp;
    if (norm.has_value()) norm_stamp = WeightStamp::of(*norm);
    const bool cacheable = source_stamp.has_value() && (!norm.has_value() || norm_stamp.has_value());
    for (Entry& e : entries_) {
      if (e.purpose != purpose || e.dtype != dtype || !e.source.same_tensor(source) ||
          e.norm.has_value() != norm.has_value() || (norm.has_value() && !e.norm->same_tensor(*norm))) {
        continue;
      }
      if (e.source.current(source) && (!norm.has_value() || e.norm->current(*norm))) return e.value;
      at::Tensor value = make(source, norm, dtype);
      if (capturing || !cacheable) return value;
      if (value.sizes() == e.value.sizes()) {
        e.value.copy_(value);  // in place: graphs captured with e.value read the new values
      } else {
        e.value = value;
      }
      e.source = std::move(*source_stamp);
      e.norm = std::move(norm_stamp);
      return e.value;
    }
    at::Tensor value = make(source, norm, dtype);
    if (cacheable && !capturing) {
      entries_.push_back(Entry{purpose, dtype, std::move(*source_stamp), std::move(norm_stamp), value});
    }
    return value;
  }

 private:
  struct Entry {
    int purpose;
    at::ScalarType dtype;
    WeightStamp source;
    std::optional<WeightStamp> norm;
    at::Tensor value;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

PreparedWeights& prepared_weights() {
  static PreparedWeights cache;
  return cache;
}

// w * norm[None, :] (product in fp32), as a contiguous tensor of `dtype`; w alone without norm.
at::Tensor fold_norm(const at::Tensor& w, const std::optional<at::Tensor>& norm, at::ScalarType dtype) {
  const at::NoGradGuard no_grad;
  at::Tensor folded = norm.has_value() ? w.to(at::kFloat) * norm->to(at::kFloat).unsqueeze(0) : w.to(at::kFloat);
  return folded.to(dtype).contiguous();
}

// Multiprocessor count of a device, queried once per device.
int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::vector<int> counts;  // 0: not queried yet
  const std::lock_guard<std::mutex> lock(mutex);
  if (counts.size() <= static_cast<size_t>(device)) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    check_launch(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device),
                 "step_rewards (SM count query)");
  }
  return counts[device];
}

enum WeightPurpose { kHeadWeight, kBias, kMlpWeight, kMlpBias };

// `t` as fp32 contiguous (norm folded in when given): itself when it already is, else the cached copy.
const float* prepared_f32(int purpose, const at::Tensor& t, const std::optional<at::Tensor>& norm, at::Tensor& keep) {
  keep = !norm.has_value() && t.scalar_type() == at::kFloat && t.is_contiguous()
             ? t
             : prepared_weights().get(purpose, t, norm, at::kFloat, fold_norm);
  return keep.data_ptr<float>();
}

}  // namespace

void step_rewards_cuda(O1K_STEP_REWARDS_ARGS) {
  const StepRewardsSizes s =
      check_step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                         activation, positive_index, aggregate, step_scores, chain_scores);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor mask = step_mask.contiguous();
  const at::Tensor cu = cu_seqlens.has_value() ? cu_seqlens->to(at::kInt).contiguous() : at::Tensor();
  StepRewardsParams p{};
  at::Tensor head_w, head_b, mlp_w, mlp_b;  // prepared weights, alive until the launch is queued
  if (mlp_weight.has_value()) {
    // The hidden layer runs on tensor cores with the weight in the hidden dtype when it has that dtype.
    const at::ScalarType mlp_dtype =
        mlp_weight->scalar_type() == hidden.scalar_type() ? hidden.scalar_type() : at::kFloat;
    mlp_w = !norm_weight.has_value() && mlp_weight->scalar_type() == mlp_dtype && mlp_weight->is_contiguous()
                ? *mlp_weight
                : prepared_weights().get(kMlpWeight, *mlp_weight, norm_weight, mlp_dtype, fold_norm);
    p.mlp_weight = mlp_w.data_ptr();
    p.mlp_weight_fp32 = mlp_dtype != hidden.scalar_type();
    p.mlp_bias = mlp_bias.has_value() ? prepared_f32(kMlpBias, *mlp_bias, std::nullopt, mlp_b) : nullptr;
    p.head_weight = prepared_f32(kHeadWeight, weight, std::nullopt, head_w);
  } else {
    p.head_weight = prepared_f32(kHeadWeight, weight, norm_weight, head_w);
  }
  p.bias = bias.has_value() ? prepared_f32(kBias, *bias, std::nullopt, head_b) : nullptr;
  p.hidden = hidden.data_ptr();
  p.hidden_stride_b = s.packed ? 0 : hidden.stride(0);
  p.hidden_stride_l = hidden.stride(s.packed ? 0 : 1);
  p.step_mask = mask.data_ptr<bool>();
  p.cu_seqlens = cu.defined() ? cu.data_ptr<int32_t>() : nullptr;
  p.has_norm = norm_weight.has_value();
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
  p.num_sms = multiprocessor_count(hidden.get_device());
  // One workspace allocation (caching allocator; the graph's pool under capture).
  const size_t ws_bytes = step_rewards_workspace_bytes(p);
  const at::Tensor workspace =
      ws_bytes > 0 ? at::empty({static_cast<int64_t>(ws_bytes)}, hidden.options().dtype(at::kByte)) : at::Tensor();
  p.workspace = workspace.defined() ? workspace.data_ptr() : nullptr;
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
