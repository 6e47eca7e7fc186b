// Host-side API of the o1kernels CUDA kernels: parameter structs and launchers.
//
// Framework-agnostic: raw pointers, element strides, sizes, a cudaStream_t; every launcher
// returns the cudaError_t of its launches and never synchronises with the host, so calls can
// be captured in a CUDA graph. No torch header here or in any kernel header; the torch
// binding layer (csrc/torch_bindings) fills these structs from tensors after checking them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace o1k {

enum class DType { kFloat16, kBFloat16, kFloat32 };

// ---------------------------------------------------------------------------------------------
// tree_attention partials: one work item = (segment, kv token range, query range) of a plan;
// the layout of every int32 array is the TreeAttentionPlan's (o1kernels/tree_attention.py).
// For work item w, query j in [0, work_q_end[w] - work_q_start[w]) is query row
// seg_queries[work_q_start[w] + j] and writes partial slot work_out[w] + j:
//   part_o[slot, h, :] = softmax-weighted V over the item's tokens (fp32, normalised),
//   part_lse[slot, h]  = natural-log LSE of sm_scale * q.k over them (-inf when there are none).
// Tokens [work_kv_start, min(work_kv_end, clamp(seg_lens[seg], 0, seg_capacity[seg]))) are read;
// token t of segment s lives at page page_table[seg_page_start[s] + t / page_size], slot
// t % page_size. Index arrays are trusted (the plan validated them on the host).
// Variants: with q_pos (and seg_start) query row i sees token t of segment s only when
// seg_start[s] + t <= q_pos[i] and, window > 0, q_pos[i] - (seg_start[s] + t) < window (a work item
// reads only the tokens some of its rows see); softcap > 0: scores s = sm_scale * q.k become
// softcap * tanh(s / softcap) (the LSE is of the capped scores).
struct TreeAttentionParams {
  const void* q;  // [num_queries, Hq, D], D contiguous
  int64_t q_stride_n, q_stride_h;
  const void* k_cache;  // [num_pages, page_size, Hkv, D], D contiguous
  const void* v_cache;
  int64_t k_stride_page, k_stride_token, k_stride_head;
  int64_t v_stride_page, v_stride_token, v_stride_head;
  const int32_t* page_table;
  const int32_t* seg_page_start;
  const int32_t* seg_capacity;
  const int32_t* seg_lens;
  const int32_t* seg_queries;
  const int32_t* work_seg;
  const int32_t* work_kv_start;
  const int32_t* work_kv_end;
  const int32_t* work_q_start;
  const int32_t* work_q_end;
  const int32_t* work_out;
  const int32_t* seg_start;  // [num_segments] position of each segment's first token, or nullptr
  const int32_t* q_pos;      // [num_queries] position of each query row, or nullptr: no masking by position
  float* part_o;    // [num_partials, Hq, D] contiguous
  float* part_lse;  // [num_partials, Hq] contiguous
  int num_work;
  int max_work_queries;  // largest work_q_end - work_q_start (sizes the grid)
  int num_q_heads, num_kv_heads, head_dim, page_size;
  int window;  // sliding window in positions (needs q_pos), 0: none
  float sm_scale;
  float softcap;  // 0: none
};

// Tensor-core path (mma.sync m16n8k16, sm_80+) for fp16/bf16 with head_dim 64/128/256 and
// 16-byte aligned rows; a SIMT path otherwise (fp32, other head dims up to 256).
cudaError_t tree_attention_partial(DType dtype, const TreeAttentionParams& p, cudaStream_t stream);

// True when tree_attention_partial takes the tensor-core path for these arguments.
bool tree_attention_uses_tensor_cores(DType dtype, const TreeAttentionParams& p);

// Largest head_dim any path supports.
constexpr int kMaxHeadDim = 256;

// ---------------------------------------------------------------------------------------------
// merge of each query's partial slots (CSR) by log-sum-exp:
//   o[n, h, :] = sum_s exp(lse_s - lse) * part_o[s, h, :],  lse[n, h] = log sum_s exp(lse_s)
// over s in query_slots[query_slot_indptr[n] : query_slot_indptr[n + 1]]; o = 0, lse = -inf
// when the range is empty or every lse_s is -inf. With sinks, each (n, h) has one more slot with
// lse = sinks[h] and o = 0 (attention sinks: the returned lse includes them).
struct MergePartialsParams {
  const float* part_o;    // [num_partials, H, D] contiguous
  const float* part_lse;  // [num_partials, H] contiguous
  const int32_t* query_slot_indptr;  // [num_queries + 1]
  const int32_t* query_slots;        // [num_partials]
  const float* sinks;                // [H] or nullptr
  void* o;                           // [num_queries, H, D], D contiguous, dtype of the call
  int64_t o_stride_n, o_stride_h;
  float* lse;  // [num_queries, H]
  int64_t lse_stride_n, lse_stride_h;
  int num_queries, num_heads, head_dim;
};
cudaError_t merge_partials(DType out_dtype, const MergePartialsParams& p, cudaStream_t stream);

// Two-state merge (o_a, lse_a) + (o_b, lse_b) -> (o, lse); all o in one dtype.
struct MergeStatesParams {
  const void* o_a;
  const void* o_b;
  void* o;  // [N, H, D] each, D contiguous
  int64_t o_a_stride_n, o_a_stride_h, o_b_stride_n, o_b_stride_h, o_stride_n, o_stride_h;
  const float* lse_a;
  const float* lse_b;
  float* lse;  // [N, H] each
  int64_t lse_a_stride_n, lse_a_stride_h, lse_b_stride_n, lse_b_stride_h, lse_stride_n, lse_stride_h;
  int num_rows, num_heads, head_dim;
};
cudaError_t merge_states(DType dtype, const MergeStatesParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// step_rewards: sequence b covers flat tokens [seq_begin(b), seq_end(b)): b * seq_len ..
// (b + 1) * seq_len in the padded layout (cu_seqlens == nullptr), cu_seqlens[b] ..
// cu_seqlens[b + 1] (clamped into [0, num_tokens]) in the packed one. Flat token i reads the
// hidden row at (i / seq_len) * hidden_stride_b + (i % seq_len) * hidden_stride_l (packed:
// seq_len = num_tokens, hidden_stride_b = 0).
//
// The weights come prepared (the torch binding caches them per weight tensor): the RMSNorm weight
// is folded into the first matrix, w'[n, d] = w[n, d] * norm_weight[d], because
// rmsnorm(x) . w = rsqrt(mean(x^2) + eps) * (x . w'); has_norm says whether to apply that factor.
//   no hidden layer: head_weight = weight [C, Hd] with the norm folded in, fp32;
//   hidden layer:    mlp_weight = mlp_weight [Hm, Hd] with the norm folded in, in the hidden dtype
//                    (tensor cores for fp16/bf16) or fp32 (mlp_weight_fp32); head_weight = weight
//                    [C, Hm] fp32 as given.
enum class Activation { kSoftmax = 0, kSigmoid = 1 };
enum class Aggregate { kMin = 0, kProd = 1, kLast = 2, kMean = 3, kMax = 4 };
constexpr int kMaxClasses = 64;

struct StepRewardsParams {
  const void* hidden;  // hidden dtype, Hd contiguous
  int64_t hidden_stride_b, hidden_stride_l;
  const bool* step_mask;      // [num_tokens] contiguous
  const int32_t* cu_seqlens;  // [num_seqs + 1] or nullptr (padded)
  const float* head_weight;   // [C, K] fp32 contiguous, K = mlp_dim or hidden_dim (see above)
  const float* bias;          // [C] fp32 or nullptr
  bool has_norm;              // scale each row by rsqrt(mean(x^2) + norm_eps) (RMSNorm weight folded in)
  float norm_eps;
  const void* mlp_weight;     // [Hm, Hd] contiguous (see above); nullptr: no hidden layer
  const float* mlp_bias;      // [Hm] fp32 or nullptr
  bool mlp_weight_fp32;
  int num_seqs, seq_len, num_tokens, hidden_dim, mlp_dim, num_classes, positive_index;
  Activation activation;
  Aggregate aggregate;
  float* step_scores;   // [num_tokens]: reward at steps, NaN elsewhere
  float* chain_scores;  // [num_seqs]: aggregate, NaN without steps
  void* workspace;      // step_rewards_workspace_bytes(p) bytes, 16-byte aligned (hidden layer only)
  int num_sms;          // grid size of the persistent hidden-layer kernel (a multiple of it)
};

// Bytes of workspace a call needs (0 without a hidden layer); depends on num_tokens, num_classes.
size_t step_rewards_workspace_bytes(const StepRewardsParams& p);
// Launches 2 kernels without a hidden layer, 4 with one; no host sync, capturable in a CUDA graph
// (the hidden-layer path calls cudaFuncSetAttribute for its dynamic shared memory).
cudaError_t step_rewards(DType hidden_dtype, const StepRewardsParams& p, cudaStream_t stream);

}  // namespace o1k
