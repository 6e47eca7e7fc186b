// Argument checks of the o1kernels ops, shared by the CPU and CUDA implementations.
// Every failure is a TORCH_CHECK (RuntimeError in Python) naming the argument, what was
// expected and what was given.
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "ops.h"

namespace o1k {
namespace bindings {
namespace {

constexpr int64_t kMaxClasses = 64;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "o1kernels: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "o1kernels: ", name,
              " must be float16, bfloat16 or float32, got ", t.scalar_type());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "o1kernels: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "o1kernels: ", name, " must be on ", ref_name, "'s device (",
              ref.device(), "), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "o1kernels: ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "o1kernels: ", name,
              " must be contiguous in its last dimension, got strides ", t.strides());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "o1kernels: ", name, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

// 1-D contiguous int32 index tensor on ref's device; returns its length.
int64_t check_index(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_dim(t, name, 1);
  check_dtype(t, name, at::kInt);
  check_device(t, name, ref, ref_name);
  check_contiguous(t, name);
  return t.size(0);
}

void check_fits_int32(int64_t value, const char* what) {
  TORCH_CHECK(value <= kInt32Max, "o1kernels: ", what, " must be below 2^31, got ", value);
}

void check_f32_output(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                      at::IntArrayRef shape) {
  check_dtype(t, name, at::kFloat);
  check_device(t, name, ref, ref_name);
  check_shape(t, name, shape);
  check_contiguous(t, name);
}

}  // namespace

TreeAttentionSizes check_tree_attention_partial(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& page_table,
    const at::Tensor& seg_page_start, const at::Tensor& seg_capacity, const at::Tensor& seg_lens,
    const at::Tensor& seg_queries, const at::Tensor& work_seg, const at::Tensor& work_kv_start,
    const at::Tensor& work_kv_end, const at::Tensor& work_q_start, const at::Tensor& work_q_end,
    const at::Tensor& work_out, const std::optional<at::Tensor>& seg_start, const std::optional<at::Tensor>& q_pos,
    int64_t max_work_queries, double sm_scale, std::optional<int64_t> window, std::optional<double> softcap,
    const at::Tensor& part_o, const at::Tensor& part_lse) {
  TreeAttentionSizes s{};
  check_dim(q, "q", 3);
  check_float(q, "q");
  check_last_dim_contiguous(q, "q");
  check_dim(k_cache, "k_cache", 4);
  check_dtype(k_cache, "k_cache", q.scalar_type());
  check_device(k_cache, "k_cache", q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_dtype(v_cache, "v_cache", q.scalar_type());
  check_device(v_cache, "v_cache", q, "q");
  check_shape(v_cache, "v_cache", k_cache.sizes());
  check_last_dim_contiguous(v_cache, "v_cache");
  s.num_queries = q.size(0);
  s.num_q_heads = q.size(1);
  s.head_dim = q.size(2);
  s.num_pages = k_cache.size(0);
  s.page_size = k_cache.size(1);
  s.num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "o1kernels: k_cache must have head_dim ", s.head_dim,
              " (q.shape[2]) in its last dimension, got shape ", k_cache.sizes());
  TORCH_CHECK(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, "o1kernels: head_dim must be in [1, ", kMaxHeadDim,
              "], got ", s.head_dim);
  TORCH_CHECK(s.num_kv_heads >= 1 && s.num_q_heads % s.num_kv_heads == 0, "o1kernels: q heads (", s.num_q_heads,
              ") must be a positive multiple of k_cache heads (", s.num_kv_heads, ")");
  TORCH_CHECK(s.page_size >= 1, "o1kernels: k_cache must have page_size >= 1, got shape ", k_cache.sizes());
  TORCH_CHECK(std::isfinite(sm_scale) && sm_scale > 0, "o1kernels: sm_scale must be finite and positive, got ",
              sm_scale);
  TORCH_CHECK(max_work_queries >= 0, "o1kernels: max_work_queries must be >= 0, got ", max_work_queries);

  check_index(page_table, "page_table", q, "q");
  s.num_segments = check_index(seg_page_start, "seg_page_start", q, "q");
  const std::pair<const at::Tensor*, const char*> per_segment[] = {
      {&seg_capacity, "seg_capacity"}, {&seg_lens, "seg_lens"}};
  for (const auto& [t, name] : per_segment) {
    TORCH_CHECK(check_index(*t, name, q, "q") == s.num_segments, "o1kernels: ", name, " must have ",
                s.num_segments, " entries (one per segment, like seg_page_start), got ", t->size(0));
  }
  check_index(seg_queries, "seg_queries", q, "q");
  s.num_work = check_index(work_seg, "work_seg", q, "q");
  const std::pair<const at::Tensor*, const char*> per_work[] = {{&work_kv_start, "work_kv_start"},
                                                                {&work_kv_end, "work_kv_end"},
                                                                {&work_q_start, "work_q_start"},
                                                                {&work_q_end, "work_q_end"},
                                                                {&work_out, "work_out"}};
  for (const auto& [t, name] : per_work) {
    TORCH_CHECK(check_index(*t, name, q, "q") == s.num_work, "o1kernels: ", name, " must have ", s.num_work,
                " entries (one per work item, like work_seg), got ", t->size(0));
  }

  TORCH_CHECK(seg_start.has_value() == q_pos.has_value(), "o1kernels: seg_start and q_pos must be given together "
              "(masking by position), got ", seg_start.has_value() ? "seg_start" : "q_pos", " alone");
  s.positions = q_pos.has_value();
  if (s.positions) {
    TORCH_CHECK(check_index(*seg_start, "seg_start", q, "q") == s.num_segments, "o1kernels: seg_start must have ",
                s.num_segments, " entries (one per segment, like seg_page_start), got ", seg_start->size(0));
    TORCH_CHECK(check_index(*q_pos, "q_pos", q, "q") == s.num_queries, "o1kernels: q_pos must have ",
                s.num_queries, " entries (q.shape[0]), got ", q_pos->size(0));
  }
  if (window.has_value()) {
    TORCH_CHECK(s.positions, "o1kernels: window needs seg_start and q_pos (a window is measured from positions)");
    TORCH_CHECK(*window >= 1 && *window <= kInt32Max, "o1kernels: window must be in [1, 2^31 - 1], got ", *window);
  }
  TORCH_CHECK(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0),
              "o1kernels: softcap must be finite and positive, got ", softcap.value_or(0.0));

  check_dim(part_o, "part_o", 3);
  s.num_partials = part_o.size(0);
  check_f32_output(part_o, "part_o", q, "q", {s.num_partials, s.num_q_heads, s.head_dim});
  check_f32_output(part_lse, "part_lse", q, "q", {s.num_partials, s.num_q_heads});
  check_fits_int32(s.num_work, "the number of work items");
  check_fits_int32(s.num_partials, "the number of partials");
  check_fits_int32(s.num_queries, "num_queries");
  check_fits_int32(max_work_queries * (s.num_q_heads / s.num_kv_heads), "max_work_queries * GQA group");
  return s;
}

MergePartialsSizes check_merge_partials(const at::Tensor& part_o, const at::Tensor& part_lse,
                                        const at::Tensor& query_slot_indptr, const at::Tensor& query_slots,
                                        const std::optional<at::Tensor>& sinks, const at::Tensor& o,
                                        const at::Tensor& lse) {
  MergePartialsSizes s{};
  check_dim(part_o, "part_o", 3);
  check_dtype(part_o, "part_o", at::kFloat);
  check_contiguous(part_o, "part_o");
  s.num_partials = part_o.size(0);
  s.num_heads = part_o.size(1);
  s.head_dim = part_o.size(2);
  TORCH_CHECK(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, "o1kernels: head_dim must be in [1, ", kMaxHeadDim,
              "], got ", s.head_dim);
  check_f32_output(part_lse, "part_lse", part_o, "part_o", {s.num_partials, s.num_heads});
  const int64_t indptr_len = check_index(query_slot_indptr, "query_slot_indptr", part_o, "part_o");
  TORCH_CHECK(indptr_len >= 1, "o1kernels: query_slot_indptr must have num_queries + 1 >= 1 entries, got 0");
  s.num_queries = indptr_len - 1;
  check_index(query_slots, "query_slots", part_o, "part_o");
  if (sinks.has_value()) check_f32_output(*sinks, "sinks", part_o, "part_o", {s.num_heads});
  check_dim(o, "o", 3);
  check_float(o, "o");
  check_device(o, "o", part_o, "part_o");
  check_shape(o, "o", {s.num_queries, s.num_heads, s.head_dim});
  check_last_dim_contiguous(o, "o");
  check_dim(lse, "lse", 2);
  check_dtype(lse, "lse", at::kFloat);
  check_device(lse, "lse", part_o, "part_o");
  check_shape(lse, "lse", {s.num_queries, s.num_heads});
  check_fits_int32(s.num_queries, "num_queries");
  check_fits_int32(s.num_partials, "the number of partials");
  return s;
}

MergeStatesSizes check_merge_states(const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
                                    const at::Tensor& lse_b, const at::Tensor& o, const at::Tensor& lse) {
  MergeStatesSizes s{};
  check_dim(o_a, "o_a", 3);
  check_float(o_a, "o_a");
  check_last_dim_contiguous(o_a, "o_a");
  s.num_rows = o_a.size(0);
  s.num_heads = o_a.size(1);
  s.head_dim = o_a.size(2);
  const std::pair<const at::Tensor*, const char*> states[] = {{&o_b, "o_b"}, {&o, "o"}};
  for (const auto& [t, name] : states) {
    check_dtype(*t, name, o_a.scalar_type());
    check_device(*t, name, o_a, "o_a");
    check_shape(*t, name, o_a.sizes());
    check_last_dim_contiguous(*t, name);
  }
  const std::pair<const at::Tensor*, const char*> lses[] = {{&lse_a, "lse_a"}, {&lse_b, "lse_b"}, {&lse, "lse"}};
  for (const auto& [t, name] : lses) {
    check_dtype(*t, name, at::kFloat);
    check_device(*t, name, o_a, "o_a");
    check_shape(*t, name, {s.num_rows, s.num_heads});
  }
  check_fits_int32(s.num_rows, "N (o_a.shape[0])");
  return s;
}

StepRewardsSizes check_step_rewards(const at::Tensor& hidden, const at::Tensor& step_mask,
                                    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& norm_weight, double norm_eps,
                                    const std::optional<at::Tensor>& mlp_weight,
                                    const std::optional<at::Tensor>& mlp_bias, const std::string& activation,
                                    int64_t positive_index, const std::string& aggregate,
                                    const at::Tensor& step_scores, const at::Tensor& chain_scores) {
  StepRewardsSizes s{};
  s.packed = cu_seqlens.has_value();
  check_float(hidden, "hidden");
  if (s.packed) {
    check_dim(hidden, "hidden (packed layout, with cu_seqlens)", 2);
    const at::Tensor& cu = *cu_seqlens;
    check_dim(cu, "cu_seqlens", 1);
    TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong,
                "o1kernels: cu_seqlens must be int32 or int64, got ", cu.scalar_type());
    check_device(cu, "cu_seqlens", hidden, "hidden");
    TORCH_CHECK(cu.size(0) >= 1, "o1kernels: cu_seqlens must have Bs + 1 >= 1 entries, got 0");
    s.num_seqs = cu.size(0) - 1;
    s.num_tokens = hidden.size(0);
    s.seq_len = s.num_tokens;
  } else {
    check_dim(hidden, "hidden (padded layout, without cu_seqlens)", 3);
    s.num_seqs = hidden.size(0);
    s.seq_len = hidden.size(1);
    s.num_tokens = s.num_seqs * s.seq_len;
  }
  check_last_dim_contiguous(hidden, "hidden");
  s.hidden_dim = hidden.size(-1);
  const at::IntArrayRef token_shape = hidden.sizes().slice(0, hidden.dim() - 1);
  check_dtype(step_mask, "step_mask", at::kBool);
  check_device(step_mask, "step_mask", hidden, "hidden");
  check_shape(step_mask, "step_mask", token_shape);

  TORCH_CHECK(activation == "softmax" || activation == "sigmoid",
              "o1kernels: activation must be 'softmax' or 'sigmoid', got '", activation, "'");
  s.activation = activation == "softmax" ? 0 : 1;
  const char* aggregates[] = {"min", "prod", "last", "mean", "max"};  // order of o1k::Aggregate
  s.aggregate = -1;
  for (int i = 0; i < 5; ++i) {
    if (aggregate == aggregates[i]) s.aggregate = i;
  }
  TORCH_CHECK(s.aggregate >= 0, "o1kernels: aggregate must be one of min, prod, last, mean, max, got '", aggregate,
              "'");
  TORCH_CHECK(std::isfinite(norm_eps) && norm_eps >= 0, "o1kernels: norm_eps must be finite and >= 0, got ",
              norm_eps);

  if (norm_weight.has_value()) {
    check_float(*norm_weight, "norm_weight");
    check_device(*norm_weight, "norm_weight", hidden, "hidden");
    check_shape(*norm_weight, "norm_weight", {s.hidden_dim});
  }
  int64_t head_in = s.hidden_dim;
  if (mlp_weight.has_value()) {
    check_dim(*mlp_weight, "mlp_weight", 2);
    check_float(*mlp_weight, "mlp_weight");
    check_device(*mlp_weight, "mlp_weight", hidden, "hidden");
    TORCH_CHECK(mlp_weight->size(1) == s.hidden_dim, "o1kernels: mlp_weight must have shape [Hm, Hd] with Hd = ",
                s.hidden_dim, " (hidden.shape[-1]), got ", mlp_weight->sizes());
    s.mlp_dim = mlp_weight->size(0);
    head_in = s.mlp_dim;
    if (mlp_bias.has_value()) {
      check_float(*mlp_bias, "mlp_bias");
      check_device(*mlp_bias, "mlp_bias", hidden, "hidden");
      check_shape(*mlp_bias, "mlp_bias", {s.mlp_dim});
    }
  } else {
    TORCH_CHECK(!mlp_bias.has_value(), "o1kernels: mlp_bias was given without mlp_weight");
  }
  check_dim(weight, "weight", 2);
  check_float(weight, "weight");
  check_device(weight, "weight", hidden, "hidden");
  TORCH_CHECK(weight.size(1) == head_in, "o1kernels: weight must have shape [C, ", head_in, "] (",
              mlp_weight.has_value() ? "Hm = mlp_weight.shape[0]" : "Hd = hidden.shape[-1]", "), got ",
              weight.sizes());
  s.num_classes = weight.size(0);
  TORCH_CHECK(s.num_classes >= 1 && s.num_classes <= kMaxClasses, "o1kernels: weight must have 1 to ", kMaxClasses,
              " rows (classes), got ", s.num_classes);
  if (bias.has_value()) {
    check_float(*bias, "bias");
    check_device(*bias, "bias", hidden, "hidden");
    check_shape(*bias, "bias", {s.num_classes});
  }
  if (s.activation == 0) {
    TORCH_CHECK(s.num_classes >= 2, "o1kernels: activation 'softmax' needs weight with C >= 2 rows, got C = ",
                s.num_classes);
    TORCH_CHECK(positive_index >= 0 && positive_index < s.num_classes, "o1kernels: positive_index must be in [0, ",
                s.num_classes, "), got ", positive_index);
  } else {
    TORCH_CHECK(s.num_classes == 1, "o1kernels: activation 'sigmoid' needs weight with C == 1 row, got C = ",
                s.num_classes);
    TORCH_CHECK(positive_index == 0, "o1kernels: positive_index must be 0 with activation 'sigmoid', got ",
                positive_index);
  }
  check_f32_output(step_scores, "step_scores", hidden, "hidden", token_shape);
  check_f32_output(chain_scores, "chain_scores", hidden, "hidden", {s.num_seqs});
  check_fits_int32(s.num_tokens, "the number of tokens");
  check_fits_int32(s.num_seqs, "the number of sequences");
  check_fits_int32(s.hidden_dim, "Hd");
  check_fits_int32(s.mlp_dim, "Hm");
  return s;
}

}  // namespace bindings
}  // namespace o1k
