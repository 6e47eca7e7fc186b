// CPU fused step rewards (same contract as csrc/include/o1kernels/step_rewards.cuh): only the
// hidden rows at step positions are read, gathered into one fp32 matrix and RMSNormed
// (at::parallel_for over steps); the optional hidden layer and the head are fp32 matrix products
// over all step rows (at::addmm, deterministic: no atomics); then the activation per step and
// each sequence's aggregate in position order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "torch_bindings/ops.h"

namespace o1k {
namespace bindings {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// [begin, end) token range of every sequence; packed cu_seqlens values are checked here.
std::vector<int64_t> sequence_bounds(const StepRewardsSizes& s, const std::optional<at::Tensor>& cu_seqlens) {
  std::vector<int64_t> bounds(s.num_seqs + 1);
  if (!s.packed) {
    for (int64_t b = 0; b <= s.num_seqs; ++b) bounds[b] = b * s.seq_len;
    return bounds;
  }
  const at::Tensor cu = cu_seqlens->to(at::kLong).contiguous();
  const int64_t* values = cu.data_ptr<int64_t>();
  TORCH_CHECK(values[0] == 0 && values[s.num_seqs] == s.num_tokens, "o1kernels: cu_seqlens must start at 0 and end "
              "at T = hidden.shape[0] = ", s.num_tokens, ", got ", values[0], " and ", values[s.num_seqs]);
  for (int64_t b = 0; b < s.num_seqs; ++b) {
    TORCH_CHECK(values[b] <= values[b + 1], "o1kernels: cu_seqlens must be non-decreasing, got ", values[b],
                " then ", values[b + 1], " at index ", b);
  }
  std::copy(values, values + s.num_seqs + 1, bounds.begin());
  return bounds;
}

at::Tensor float_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

float activation_reward(const StepRewardsSizes& s, const float* logits, int64_t positive_index) {
  if (s.activation == 1) return 1.f / (1.f + std::exp(-logits[0]));
  const float m = *std::max_element(logits, logits + s.num_classes);
  float denom = 0.f;
  for (int64_t c = 0; c < s.num_classes; ++c) denom += std::exp(logits[c] - m);
  return std::exp(logits[positive_index] - m) / denom;
}

// Aggregate of rewards[first, last) in order; NaN propagates, empty -> NaN.
float aggregate_rewards(int aggregate, const float* first, const float* last) {
  if (first == last) return kNaN;
  float value = *first;
  for (const float* x = first + 1; x != last; ++x) {
    switch (aggregate) {
      case 0: value = (*x < value || std::isnan(*x)) ? *x : value; break;  // min
      case 1: value *= *x; break;                                          // prod
      case 2: value = *x; break;                                           // last
      case 3: value += *x; break;                                          // mean (sum here)
      default: value = (*x > value || std::isnan(*x)) ? *x : value; break;  // max
    }
  }
  return aggregate == 3 ? value / static_cast<float>(last - first) : value;
}

}  // namespace

void step_rewards_cpu(O1K_STEP_REWARDS_ARGS) {
  const StepRewardsSizes s =
      check_step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                         activation, positive_index, aggregate, step_scores, chain_scores);
  const std::vector<int64_t> bounds = sequence_bounds(s, cu_seqlens);
  const at::Tensor mask = step_mask.contiguous();
  const bool* mask_ptr = mask.data_ptr<bool>();
  std::vector<int64_t> step_token;  // flat tokens of all steps, position order
  std::vector<int64_t> seq_first_step(s.num_seqs + 1, 0);
  for (int64_t b = 0; b < s.num_seqs; ++b) {
    seq_first_step[b] = static_cast<int64_t>(step_token.size());
    for (int64_t t = bounds[b]; t < bounds[b + 1]; ++t) {
      if (mask_ptr[t]) step_token.push_back(t);
    }
  }
  seq_first_step[s.num_seqs] = static_cast<int64_t>(step_token.size());
  const int64_t num_steps = static_cast<int64_t>(step_token.size()), hd = s.hidden_dim;

  // x [num_steps, Hd] fp32: the step rows only, RMSNormed.
  at::Tensor x = at::empty({num_steps, hd}, hidden.options().dtype(at::kFloat));
  const at::Tensor nw = float_or_empty(norm_weight);
  const float* nw_ptr = nw.defined() ? nw.data_ptr<float>() : nullptr;
  const int64_t stride_b = s.packed ? 0 : hidden.stride(0), stride_l = hidden.stride(s.packed ? 0 : 1);
  O1K_DISPATCH_FLOAT(hidden.scalar_type(), "step_rewards_cpu", [&] {
    const scalar_t* h_ptr = hidden.data_ptr<scalar_t>();
    float* x_ptr = x.data_ptr<float>();
    at::parallel_for(0, num_steps, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t token = step_token[i];
        const scalar_t* row = h_ptr + (token / s.seq_len) * stride_b + (token % s.seq_len) * stride_l;
        float* xi = x_ptr + i * hd;
        for (int64_t d = 0; d < hd; ++d) xi[d] = static_cast<float>(row[d]);
        if (nw_ptr == nullptr) continue;
        float sum_squares = 0.f;
        for (int64_t d = 0; d < hd; ++d) sum_squares += xi[d] * xi[d];
        const float scale = 1.f / std::sqrt(sum_squares / static_cast<float>(hd) + static_cast<float>(norm_eps));
        for (int64_t d = 0; d < hd; ++d) xi[d] *= scale * nw_ptr[d];
      }
    });
  });

  // Hidden layer and head as blocked fp32 matrix products over all step rows at once
  // (per-step dot loops were 11-41x slower than torch's gather + matmul at Hd = 256).
  if (mlp_weight.has_value()) {
    const at::Tensor mlp_w = float_or_empty(mlp_weight);
    x = mlp_bias.has_value() ? at::addmm(float_or_empty(mlp_bias), x, mlp_w.t()) : at::mm(x, mlp_w.t());
    x.relu_();
  }
  const at::Tensor w = weight.to(at::kFloat);
  const at::Tensor logits = (bias.has_value() ? at::addmm(float_or_empty(bias), x, w.t()) : at::mm(x, w.t()))
                                .contiguous();  // [num_steps, C]
  const float* logits_ptr = logits.data_ptr<float>();
  std::vector<float> rewards(num_steps);
  for (int64_t i = 0; i < num_steps; ++i) {
    rewards[i] = activation_reward(s, logits_ptr + i * s.num_classes, positive_index);
  }

  float* scores = step_scores.data_ptr<float>();
  std::fill(scores, scores + s.num_tokens, kNaN);
  for (int64_t i = 0; i < num_steps; ++i) scores[step_token[i]] = rewards[i];
  float* chain = chain_scores.data_ptr<float>();
  for (int64_t b = 0; b < s.num_seqs; ++b) {
    chain[b] = aggregate_rewards(s.aggregate, rewards.data() + seq_first_step[b], rewards.data() + seq_first_step[b + 1]);
  }
}

}  // namespace bindings
}  // namespace o1k
