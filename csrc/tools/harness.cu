// Standalone harness of the framework-agnostic kernels (no torch). csrc/tools/compile_check.sh
// builds it for sm_80 + sm_90a (linking proves every launcher and template instance exists)
// and runs it only where a GPU is visible. On a GPU it cross-checks the two independent code
// paths of each kernel on small random problems:
//   tree attention: tensor-core path vs SIMT path (fp16/bf16 x head_dim 64/128/256 x 1/2/4 row warps),
//   plain and with positions + a sliding window + softcap (rows that see part of a chunk, none of
//   it, or nothing at all), then merge_partials of both (with sinks in the variant);
//   step rewards:   head-only and hidden-layer paths (tensor cores, SIMT) vs a float64 host reference.
// Exit status 0 when every comparison is within tolerance, 1 otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "o1kernels/api.h"
#include "o1kernels/tree_attention.cuh"

namespace {

int g_failures = 0;

#define HARNESS_CUDA(call)                                                                      \
  do {                                                                                          \
    const cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__);    \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  HARNESS_CUDA(cudaMalloc(&ptr, std::max<size_t>(1, host.size()) * sizeof(T)));
  HARNESS_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

template <typename T>
std::vector<T> to_host(const T* ptr, size_t n) {
  std::vector<T> host(n);
  HARNESS_CUDA(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <typename T>
T from_float_host(float x);
template <>
float from_float_host<float>(float x) { return x; }
template <>
__half from_float_host<__half>(float x) { return __float2half(x); }
template <>
__nv_bfloat16 from_float_host<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<T> out(n);
  for (auto& x : out) x = from_float_host<T>(normal(rng));
  return out;
}

// Max |a - b| where both are finite, and whether their -inf patterns agree.
void compare(const char* what, const std::vector<float>& a, const std::vector<float>& b, float tol) {
  float worst = 0.f;
  bool pattern_ok = true;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) || std::isinf(b[i]) || std::isnan(a[i]) || std::isnan(b[i])) {
      pattern_ok &= (std::isinf(a[i]) && std::isinf(b[i])) || (std::isnan(a[i]) && std::isnan(b[i]));
      continue;
    }
    worst = std::max(worst, std::fabs(a[i] - b[i]));
  }
  const bool ok = pattern_ok && worst <= tol;
  g_failures += ok ? 0 : 1;
  std::printf("%-58s max diff %.3g (tol %.3g)%s %s\n", what, worst, tol, pattern_ok ? "" : " inf/nan pattern differs",
              ok ? "ok" : "FAIL");
}

// One 100-token segment over shuffled 16-token pages (+ a 0-length one), split into 64-token
// work items; `num_queries` queries x `group` heads per kv head give the rows per item. variant:
// the segment starts at position 5 and query i sits at position 2 + 11 i (query 0 sees nothing), a
// 40-token window, softcap 20, and sinks in the merge.
template <typename T>
void check_tree_attention(o1k::DType dtype, const char* dtype_name, int head_dim, int num_queries, int group,
                          bool variant, std::mt19937& rng) {
  const int page_size = 16, num_pages = 9, hkv = 2, hq = hkv * group, length = 100, chunk = 64;
  std::vector<int32_t> page_table = {4, 0, 7, 2, 8, 5, 1}, seg_page_start = {0, 7}, seg_capacity = {112, 0},
                       seg_lens = {length, 0}, seg_queries, seg_start = {5, 0}, q_pos;
  for (int i = 0; i < num_queries; ++i) seg_queries.push_back(num_queries - 1 - i);
  for (int i = 0; i < num_queries; ++i) q_pos.push_back(2 + 11 * i);
  std::vector<int32_t> work_seg, work_kv_start, work_kv_end, work_q_start, work_q_end, work_out;
  for (int kv = 0; kv < 112; kv += chunk) {
    work_seg.push_back(0);
    work_kv_start.push_back(kv);
    work_kv_end.push_back(std::min(kv + chunk, 112));
    work_q_start.push_back(0);
    work_q_end.push_back(num_queries);
    work_out.push_back(static_cast<int>(work_out.size()) * num_queries);
  }
  const int num_partials = static_cast<int>(work_out.size()) * num_queries;
  const auto q = random_values<T>(static_cast<size_t>(num_queries) * hq * head_dim, rng);
  const auto k = random_values<T>(static_cast<size_t>(num_pages) * page_size * hkv * head_dim, rng);
  const auto v = random_values<T>(k.size(), rng);

  o1k::TreeAttentionParams p{};
  p.q = to_device(q);
  p.q_stride_h = head_dim;
  p.q_stride_n = static_cast<int64_t>(hq) * head_dim;
  p.k_cache = to_device(k);
  p.v_cache = to_device(v);
  p.k_stride_head = p.v_stride_head = head_dim;
  p.k_stride_token = p.v_stride_token = static_cast<int64_t>(hkv) * head_dim;
  p.k_stride_page = p.v_stride_page = static_cast<int64_t>(page_size) * hkv * head_dim;
  p.page_table = to_device(page_table);
  p.seg_page_start = to_device(seg_page_start);
  p.seg_capacity = to_device(seg_capacity);
  p.seg_lens = to_device(seg_lens);
  p.seg_queries = to_device(seg_queries);
  p.work_seg = to_device(work_seg);
  p.work_kv_start = to_device(work_kv_start);
  p.work_kv_end = to_device(work_kv_end);
  p.work_q_start = to_device(work_q_start);
  p.work_q_end = to_device(work_q_end);
  p.work_out = to_device(work_out);
  p.num_work = static_cast<int>(work_seg.size());
  p.max_work_queries = num_queries;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = head_dim;
  p.page_size = page_size;
  p.sm_scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  if (variant) {
    p.seg_start = to_device(seg_start);
    p.q_pos = to_device(q_pos);
    p.window = 40;
    p.softcap = 20.f;
  }
  const size_t o_elems = static_cast<size_t>(num_partials) * hq * head_dim, lse_elems = static_cast<size_t>(num_partials) * hq;
  float *part_o[2], *part_lse[2];
  for (int i = 0; i < 2; ++i) {
    HARNESS_CUDA(cudaMalloc(&part_o[i], o_elems * sizeof(float)));
    HARNESS_CUDA(cudaMalloc(&part_lse[i], lse_elems * sizeof(float)));
    HARNESS_CUDA(cudaMemset(part_o[i], 0xff, o_elems * sizeof(float)));  // NaN poison
  }
  if (!o1k::tree_attention_uses_tensor_cores(dtype, p)) {
    std::printf("tree attention %s d=%d: tensor-core path not selected FAIL\n", dtype_name, head_dim);
    ++g_failures;
  }
  p.part_o = part_o[0];
  p.part_lse = part_lse[0];
  HARNESS_CUDA(o1k::tree_attention_partial(dtype, p, nullptr));
  p.part_o = part_o[1];
  p.part_lse = part_lse[1];
  HARNESS_CUDA(o1k::detail::launch_tree_attention_simt<T>(p, nullptr));
  HARNESS_CUDA(cudaDeviceSynchronize());
  char what[128];
  const float tol = dtype == o1k::DType::kFloat16 ? 3e-3f : 2.5e-2f;  // P is rounded to T before P.V
  const char* kind = variant ? " pos+window+softcap" : "";
  std::snprintf(what, sizeof(what), "tree attention %s d=%d rows=%d%s: part_o mma vs simt", dtype_name, head_dim,
                num_queries * group, kind);
  compare(what, to_host(part_o[0], o_elems), to_host(part_o[1], o_elems), tol);
  std::snprintf(what, sizeof(what), "tree attention %s d=%d rows=%d%s: part_lse mma vs simt", dtype_name, head_dim,
                num_queries * group, kind);
  compare(what, to_host(part_lse[0], lse_elems), to_host(part_lse[1], lse_elems), tol);

  // Merge both partial sets: query i has one slot per work item.
  std::vector<int32_t> indptr(num_queries + 1), slots;
  for (int i = 0; i < num_queries; ++i) {
    indptr[i] = static_cast<int>(slots.size());
    for (size_t w = 0; w < work_out.size(); ++w) slots.push_back(work_out[w] + (num_queries - 1 - i));
  }
  indptr[num_queries] = static_cast<int>(slots.size());
  const std::vector<float> sinks = random_values<float>(hq, rng);
  std::vector<float> merged[2];
  for (int i = 0; i < 2; ++i) {
    o1k::MergePartialsParams m{};
    m.part_o = part_o[i];
    m.part_lse = part_lse[i];
    m.query_slot_indptr = to_device(indptr);
    m.query_slots = to_device(slots);
    if (variant) m.sinks = to_device(sinks);
    float *o = nullptr, *lse = nullptr;
    HARNESS_CUDA(cudaMalloc(&o, static_cast<size_t>(num_queries) * hq * head_dim * sizeof(float)));
    HARNESS_CUDA(cudaMalloc(&lse, static_cast<size_t>(num_queries) * hq * sizeof(float)));
    m.o = o;
    m.o_stride_h = head_dim;
    m.o_stride_n = static_cast<int64_t>(hq) * head_dim;
    m.lse = lse;
    m.lse_stride_h = 1;
    m.lse_stride_n = hq;
    m.num_queries = num_queries;
    m.num_heads = hq;
    m.head_dim = head_dim;
    HARNESS_CUDA(o1k::merge_partials(o1k::DType::kFloat32, m, nullptr));
    merged[i] = to_host(o, static_cast<size_t>(num_queries) * hq * head_dim);
  }
  std::snprintf(what, sizeof(what), "merge_partials %s d=%d%s: o of mma vs simt partials", dtype_name, head_dim,
                variant ? " (sinks)" : "");
  compare(what, merged[0], merged[1], tol);
}

// Host float64 reference of step_rewards (padded layout when cu_seqlens is empty). Each step's
// reward, NaN elsewhere; chain = aggregate "mean" in position order.
struct StepProblem {
  int bs, len, hd, hm, classes;  // hm = 0: no hidden layer
  std::vector<float> hidden, norm_w, mlp_w, mlp_b, head_w, head_b;  // hidden values already rounded to its dtype
  std::vector<char> mask;
  std::vector<int32_t> cu_seqlens;  // empty: padded
};

void reference_step_rewards(const StepProblem& q, std::vector<float>& scores, std::vector<float>& chain) {
  scores.assign(q.mask.size(), NAN);
  chain.assign(q.bs, NAN);
  for (int b = 0; b < q.bs; ++b) {
    const int begin = q.cu_seqlens.empty() ? b * q.len : q.cu_seqlens[b];
    const int end = q.cu_seqlens.empty() ? (b + 1) * q.len : q.cu_seqlens[b + 1];
    double sum = 0;
    int count = 0;
    for (int t = begin; t < end; ++t) {
      if (!q.mask[t]) continue;
      std::vector<double> x(q.hidden.begin() + static_cast<size_t>(t) * q.hd, q.hidden.begin() + static_cast<size_t>(t + 1) * q.hd);
      double ss = 0;
      for (double v : x) ss += v * v;
      const double rstd = 1.0 / std::sqrt(ss / q.hd + 1e-6);
      for (int d = 0; d < q.hd; ++d) x[d] *= rstd * q.norm_w[d];
      if (q.hm > 0) {
        std::vector<double> h(q.hm);
        for (int j = 0; j < q.hm; ++j) {
          double acc = q.mlp_b[j];
          for (int d = 0; d < q.hd; ++d) acc += x[d] * q.mlp_w[static_cast<size_t>(j) * q.hd + d];
          h[j] = std::max(acc, 0.0);
        }
        x = h;
      }
      const int k = static_cast<int>(x.size());
      std::vector<double> z(q.classes);
      double m = -INFINITY;
      for (int c = 0; c < q.classes; ++c) {
        z[c] = q.head_b[c];
        for (int d = 0; d < k; ++d) z[c] += x[d] * q.head_w[static_cast<size_t>(c) * k + d];
        m = std::max(m, z[c]);
      }
      double denom = 0;
      for (int c = 0; c < q.classes; ++c) denom += std::exp(z[c] - m);
      const double reward = std::exp(z[1] - m) / denom;  // softmax, positive class 1
      scores[t] = static_cast<float>(reward);
      sum += reward;
      ++count;
    }
    if (count > 0) chain[b] = static_cast<float>(sum / count);
  }
}

// Runs o1k::step_rewards on `q` with hidden of type T and the hidden-layer weight prepared as TW
// (norm folded in, rounded to TW, as the torch binding prepares it); returns (scores, chain).
template <typename T, typename TW>
void run_step_rewards(o1k::DType dtype, const StepProblem& q, std::vector<float>& scores, std::vector<float>& chain) {
  const int tokens = static_cast<int>(q.mask.size());
  std::vector<T> hidden(q.hidden.size());
  for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = from_float_host<T>(q.hidden[i]);
  const int k = q.hm > 0 ? q.hm : q.hd;
  std::vector<float> head_w(q.head_w);  // without a hidden layer the norm folds into the head
  if (q.hm == 0) {
    for (int c = 0; c < q.classes; ++c) {
      for (int d = 0; d < q.hd; ++d) head_w[static_cast<size_t>(c) * k + d] *= q.norm_w[d];
    }
  }
  o1k::StepRewardsParams p{};
  p.hidden = to_device(hidden);
  p.hidden_stride_l = q.hd;
  p.hidden_stride_b = q.cu_seqlens.empty() ? static_cast<int64_t>(q.len) * q.hd : 0;
  bool* mask = nullptr;
  HARNESS_CUDA(cudaMalloc(&mask, q.mask.size()));
  HARNESS_CUDA(cudaMemcpy(mask, q.mask.data(), q.mask.size(), cudaMemcpyHostToDevice));
  p.step_mask = mask;
  p.cu_seqlens = q.cu_seqlens.empty() ? nullptr : to_device(q.cu_seqlens);
  p.head_weight = to_device(head_w);
  p.bias = to_device(q.head_b);
  p.has_norm = true;
  p.norm_eps = 1e-6f;
  if (q.hm > 0) {
    std::vector<TW> mlp_w(q.mlp_w.size());
    for (int j = 0; j < q.hm; ++j) {
      for (int d = 0; d < q.hd; ++d) {
        const size_t i = static_cast<size_t>(j) * q.hd + d;
        mlp_w[i] = from_float_host<TW>(q.mlp_w[i] * q.norm_w[d]);
      }
    }
    p.mlp_weight = to_device(mlp_w);
    p.mlp_bias = to_device(q.mlp_b);
    p.mlp_weight_fp32 = !std::is_same<T, TW>::value;
  }
  p.num_seqs = q.bs;
  p.seq_len = q.cu_seqlens.empty() ? q.len : tokens;
  p.num_tokens = tokens;
  p.hidden_dim = q.hd;
  p.mlp_dim = q.hm;
  p.num_classes = q.classes;
  p.positive_index = 1;
  p.activation = o1k::Activation::kSoftmax;
  p.aggregate = o1k::Aggregate::kMean;
  p.num_sms = 2;  // few persistent programs: each loops over several tiles
  const size_t ws = o1k::step_rewards_workspace_bytes(p);
  if (ws > 0) HARNESS_CUDA(cudaMalloc(&p.workspace, ws));
  float *step_scores = nullptr, *chain_scores = nullptr;
  HARNESS_CUDA(cudaMalloc(&step_scores, tokens * sizeof(float)));
  HARNESS_CUDA(cudaMalloc(&chain_scores, q.bs * sizeof(float)));
  HARNESS_CUDA(cudaMemset(step_scores, 0x7f, tokens * sizeof(float)));  // poison: every entry must be written
  HARNESS_CUDA(cudaMemset(chain_scores, 0x7f, q.bs * sizeof(float)));
  if (ws > 0) HARNESS_CUDA(cudaMemset(p.workspace, 0x7f, ws));
  p.step_scores = step_scores;
  p.chain_scores = chain_scores;
  HARNESS_CUDA(o1k::step_rewards(dtype, p, nullptr));
  scores = to_host(step_scores, tokens);
  chain = to_host(chain_scores, q.bs);
}

// Step rewards against the float64 reference: the head-only path (vectorised bf16 rows; fp32 rows with
// Hd % 8 != 0, packed with an empty sequence) and the hidden layer on tensor cores and in SIMT.
void check_step_rewards(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  std::uniform_int_distribution<int> coin(0, 3);
  const auto make = [&](int bs, int len, int hd, int hm, int classes, bool packed, bool round_bf16) {
    StepProblem q{bs, len, hd, hm, classes, {}, {}, {}, {}, {}, {}, {}, {}};
    const int tokens = bs * len, k = hm > 0 ? hm : hd;
    for (int i = 0; i < tokens * hd; ++i) {
      const float v = 2.f * normal(rng);
      q.hidden.push_back(round_bf16 ? __bfloat162float(__float2bfloat16(v)) : v);
    }
    for (int d = 0; d < hd; ++d) q.norm_w.push_back(uniform(rng));
    for (int i = 0; i < hm * hd; ++i) q.mlp_w.push_back(normal(rng) / std::sqrt(static_cast<float>(hd)));
    for (int j = 0; j < hm; ++j) q.mlp_b.push_back(0.2f * normal(rng));
    for (int i = 0; i < classes * k; ++i) q.head_w.push_back(2.f * normal(rng) / std::sqrt(static_cast<float>(k)));
    for (int c = 0; c < classes; ++c) q.head_b.push_back(0.5f * normal(rng));
    for (int t = 0; t < tokens; ++t) {
      const int seq = t / len;
      q.mask.push_back(seq == 1 ? 0 : seq == 2 ? 1 : coin(rng) == 0);  // sequence 1: no steps; 2: all steps
    }
    if (packed) {  // sequence 3 empty: cu_seqlens 0, len, 2 len, 3 len, 3 len, 4 len, ...
      q.cu_seqlens.push_back(0);
      for (int b = 0; b < bs; ++b) q.cu_seqlens.push_back(q.cu_seqlens.back() + (b == 3 ? 0 : len));
      const int total = q.cu_seqlens.back();
      q.mask.resize(total);
      q.hidden.resize(static_cast<size_t>(total) * hd);
    }
    return q;
  };
  std::vector<float> ref_scores, ref_chain, scores, chain;
  const struct {
    const char* name;
    int bs, len, hd, hm;
    bool packed;
    int path;  // 0: bf16 head, 1: fp32 head, 2: bf16 mma, 3: bf16 hidden + fp32 weight (simt)
    float tol;
  } cases[] = {
      {"step_rewards head bf16 (vec8, blocks across sequences)", 5, 1100, 96, 0, false, 0, 1e-4f},
      {"step_rewards head fp32 (Hd % 8 != 0, packed, empty seq)", 6, 300, 50, 0, true, 1, 1e-4f},
      {"step_rewards hidden layer bf16 on tensor cores", 5, 300, 96, 200, false, 2, 2e-2f},
      {"step_rewards hidden layer bf16, fp32 weight (simt)", 5, 300, 96, 200, true, 3, 1e-4f},
  };
  for (const auto& c : cases) {
    const StepProblem q = make(c.bs, c.len, c.hd, c.hm, 2, c.packed, c.path != 1);
    reference_step_rewards(q, ref_scores, ref_chain);
    if (c.path == 0) run_step_rewards<__nv_bfloat16, __nv_bfloat16>(o1k::DType::kBFloat16, q, scores, chain);
    if (c.path == 1) run_step_rewards<float, float>(o1k::DType::kFloat32, q, scores, chain);
    if (c.path == 2) run_step_rewards<__nv_bfloat16, __nv_bfloat16>(o1k::DType::kBFloat16, q, scores, chain);
    if (c.path == 3) run_step_rewards<__nv_bfloat16, float>(o1k::DType::kBFloat16, q, scores, chain);
    char what[160];
    std::snprintf(what, sizeof(what), "%s: scores", c.name);
    compare(what, scores, ref_scores, c.tol);
    std::snprintf(what, sizeof(what), "%s: chain", c.name);
    compare(what, chain, ref_chain, c.tol);
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("harness: no CUDA device, nothing to run\n");
    return 0;
  }
  std::mt19937 rng(0);
  const int head_dims[] = {64, 128, 256};
  const int rows[][2] = {{3, 4}, {5, 6}, {9, 8}};  // (queries, group): 12, 30, 72 rows -> 1, 2, 4 row warps
  for (int d : head_dims) {
    for (const auto& r : rows) {
      for (bool variant : {false, true}) {
        check_tree_attention<__half>(o1k::DType::kFloat16, "fp16", d, r[0], r[1], variant, rng);
        check_tree_attention<__nv_bfloat16>(o1k::DType::kBFloat16, "bf16", d, r[0], r[1], variant, rng);
      }
    }
  }
  check_step_rewards(rng);
  std::printf("harness: %d failure(s)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
