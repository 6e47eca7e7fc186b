// Standalone harness of the framework-agnostic kernels (no torch). csrc/tools/compile_check.sh
// builds it for sm_80 + sm_90a (linking proves every launcher and template instance exists)
// and runs it only where a GPU is visible. On a GPU it cross-checks the two independent code
// paths of each kernel on small random problems:
//   tree attention: tensor-core path vs SIMT path (fp16/bf16 x head_dim 64/128/256 x 1/2/4 row warps),
//   then merge_partials of both;
//   step rewards:   hidden layer on tensor cores (bf16 weight) vs SIMT (the same weight in fp32).
// Exit status 0 when every comparison is within tolerance, 1 otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
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
// work items; `num_queries` queries x `group` heads per kv head give the rows per item.
template <typename T>
void check_tree_attention(o1k::DType dtype, const char* dtype_name, int head_dim, int num_queries, int group,
                          std::mt19937& rng) {
  const int page_size = 16, num_pages = 9, hkv = 2, hq = hkv * group, length = 100, chunk = 64;
  std::vector<int32_t> page_table = {4, 0, 7, 2, 8, 5, 1}, seg_page_start = {0, 7}, seg_capacity = {112, 0},
                       seg_lens = {length, 0}, seg_queries;
  for (int i = 0; i < num_queries; ++i) seg_queries.push_back(num_queries - 1 - i);
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
  std::snprintf(what, sizeof(what), "tree attention %s d=%d rows=%d: part_o mma vs simt", dtype_name, head_dim,
                num_queries * group);
  compare(what, to_host(part_o[0], o_elems), to_host(part_o[1], o_elems), tol);
  std::snprintf(what, sizeof(what), "tree attention %s d=%d rows=%d: part_lse mma vs simt", dtype_name, head_dim,
                num_queries * group);
  compare(what, to_host(part_lse[0], lse_elems), to_host(part_lse[1], lse_elems), tol);

  // Merge both partial sets: query i has one slot per work item.
  std::vector<int32_t> indptr(num_queries + 1), slots;
  for (int i = 0; i < num_queries; ++i) {
    indptr[i] = static_cast<int>(slots.size());
    for (size_t w = 0; w < work_out.size(); ++w) slots.push_back(work_out[w] + (num_queries - 1 - i));
  }
  indptr[num_queries] = static_cast<int>(slots.size());
  std::vector<float> merged[2];
  for (int i = 0; i < 2; ++i) {
    o1k::MergePartialsParams m{};
    m.part_o = part_o[i];
    m.part_lse = part_lse[i];
    m.query_slot_indptr = to_device(indptr);
    m.query_slots = to_device(slots);
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
  std::snprintf(what, sizeof(what), "merge_partials %s d=%d: o of mma vs simt partials", dtype_name, head_dim);
  compare(what, merged[0], merged[1], tol);
}

// Hidden-layer step rewards: bf16 weight (tensor cores) vs the same values as fp32 (SIMT).
void check_step_rewards(std::mt19937& rng) {
  const int bs = 5, len = 70, hd = 96, hm = 72, classes = 2;
  const auto hidden = random_values<__nv_bfloat16>(static_cast<size_t>(bs) * len * hd, rng);
  const auto mlp_w = random_values<__nv_bfloat16>(static_cast<size_t>(hm) * hd, rng);
  std::vector<float> mlp_w_f32(mlp_w.size());
  for (size_t i = 0; i < mlp_w.size(); ++i) mlp_w_f32[i] = __bfloat162float(mlp_w[i]);
  const auto weight = random_values<float>(static_cast<size_t>(classes) * hm, rng);
  const auto mlp_b = random_values<float>(hm, rng);
  std::vector<float> norm_w(hd, 1.25f);
  std::vector<char> mask_bytes(static_cast<size_t>(bs) * len, 0);
  std::uniform_int_distribution<int> coin(0, 4);
  for (size_t i = 0; i < mask_bytes.size(); ++i) mask_bytes[i] = i / len != 3 && coin(rng) == 0;  // seq 3: no steps
  bool* mask = nullptr;
  HARNESS_CUDA(cudaMalloc(&mask, mask_bytes.size()));
  HARNESS_CUDA(cudaMemcpy(mask, mask_bytes.data(), mask_bytes.size(), cudaMemcpyHostToDevice));

  std::vector<float> chain[2], scores[2];
  for (int path = 0; path < 2; ++path) {
    o1k::StepRewardsParams p{};
    p.hidden = to_device(hidden);
    p.hidden_stride_l = hd;
    p.hidden_stride_b = static_cast<int64_t>(len) * hd;
    p.step_mask = mask;
    p.weight = to_device(weight);
    p.norm_weight = to_device(norm_w);
    p.mlp_bias = to_device(mlp_b);
    p.mlp_weight = path == 0 ? static_cast<const void*>(to_device(mlp_w)) : to_device(mlp_w_f32);
    p.mlp_weight_fp32 = path == 1;
    p.norm_eps = 1e-6f;
    p.num_seqs = bs;
    p.seq_len = len;
    p.num_tokens = bs * len;
    p.hidden_dim = hd;
    p.mlp_dim = hm;
    p.num_classes = classes;
    p.positive_index = 1;
    p.activation = o1k::Activation::kSoftmax;
    p.aggregate = o1k::Aggregate::kMean;
    p.num_sms = 4;
    const o1k::StepRewardsWorkspace ws = o1k::step_rewards_workspace_sizes(p);
    HARNESS_CUDA(cudaMalloc(&p.seq_step_start, ws.int32_elems_seq_start * sizeof(int32_t)));
    HARNESS_CUDA(cudaMalloc(&p.step_token, ws.int32_elems_step_token * sizeof(int32_t)));
    HARNESS_CUDA(cudaMalloc(&p.step_row_scale, ws.float_elems_row_scale * sizeof(float)));
    HARNESS_CUDA(cudaMalloc(&p.step_logits, ws.float_elems_logits * sizeof(float)));
    HARNESS_CUDA(cudaMalloc(&p.step_scores, static_cast<size_t>(bs) * len * sizeof(float)));
    HARNESS_CUDA(cudaMalloc(&p.chain_scores, bs * sizeof(float)));
    HARNESS_CUDA(o1k::step_rewards(o1k::DType::kBFloat16, p, nullptr));
    scores[path] = to_host(p.step_scores, static_cast<size_t>(bs) * len);
    chain[path] = to_host(p.chain_scores, bs);
  }
  compare("step_rewards bf16 hidden layer: step scores mma vs simt", scores[0], scores[1], 2e-2f);
  compare("step_rewards bf16 hidden layer: chain scores mma vs simt", chain[0], chain[1], 2e-2f);
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
      check_tree_attention<__half>(o1k::DType::kFloat16, "fp16", d, r[0], r[1], rng);
      check_tree_attention<__nv_bfloat16>(o1k::DType::kBFloat16, "bf16", d, r[0], r[1], rng);
    }
  }
  check_step_rewards(rng);
  std::printf("harness: %d failure(s)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
