// Fused PRM step-reward kernels. Only the hidden rows at step positions are read; no per-token
// logits are formed. The caller passes the weights prepared (api.h): the RMSNorm weight folded into
// the first matrix, so the norm costs one sum of squares per row and a per-row scale.
//
// No hidden layer (2 launches, no workspace):
//   step_head_kernel   grid (tokens / kHeadBlockTokens): a CTA owns a block of flat tokens, writes NaN at
//                      its non-step tokens, lists its steps in shared memory (ballot ranks) and scores
//                      them a warp per row: one vectorised pass over the row gives sum(x^2) and the C dots.
//                      Parallel over tokens, whatever the batch size.
//   step_chain_kernel<false>  grid (Bs): each sequence's rewards in position order -> chain_scores.
// Hidden layer (4 launches, one workspace):
//   step_count_kernel   steps per block of scan_block_tokens tokens;
//   step_compact_kernel block b's first rank = sum of the lower blocks' counts; writes token_of_rank,
//                       rank_of_token, zeroes the steps' logits, NaN at non-step tokens; the last block
//                       stores the step count S;
//   step_mlp_mma_kernel / step_mlp_simt_kernel: persistent tiled GEMM over the S gathered step rows
//                       (tensor cores: 128 x 128 tiles, 3-stage cp.async pipeline, 8 warps), sum of squares
//                       from the same A tiles, epilogue rstd * acc + mlp_bias -> relu -> x head slice ->
//                       atomicAdd into fp32 logits (so their last bits depend on the summation order);
//   step_chain_kernel<true>   logits + bias -> reward -> step_scores at the steps, and chain_scores.
#pragma once

#include <cmath>

#include "o1kernels/device_utils.cuh"

namespace o1k {
namespace detail {

constexpr int kStepThreads = 256;  // head / chain / scan kernels: positions per chunk
constexpr int kStepWarps = kStepThreads / 32;
constexpr int kHeadBlockTokens = 1024;  // tokens per CTA of step_head_kernel
constexpr int kMinScanBlockTokens = 1024;
constexpr int kMaxScanBlocks = 2048;  // step_compact_kernel reads every block count: keep them few
constexpr int kClassesPerPass = 4;    // dot products per pass over a hidden row

// Tokens per block of the count/compact kernels: at least kMinScanBlockTokens, a power of two, and
// at most kMaxScanBlocks blocks.
inline int scan_block_tokens(int num_tokens) {
  int block = kMinScanBlockTokens;
  while (static_cast<int64_t>(block) * kMaxScanBlocks < num_tokens) block *= 2;
  return block;
}

struct SeqRange {
  int begin, end;
};

__device__ __forceinline__ SeqRange seq_range(const StepRewardsParams& p, int b) {
  if (p.cu_seqlens == nullptr) return {b * p.seq_len, (b + 1) * p.seq_len};
  const int begin = min(max(p.cu_seqlens[b], 0), p.num_tokens);
  const int end = min(max(p.cu_seqlens[b + 1], begin), p.num_tokens);
  return {begin, end};
}

template <typename T>
__device__ __forceinline__ const T* hidden_row(const StepRewardsParams& p, int token) {
  return static_cast<const T*>(p.hidden) + static_cast<int64_t>(token / p.seq_len) * p.hidden_stride_b +
         static_cast<int64_t>(token % p.seq_len) * p.hidden_stride_l;
}

// Exclusive rank of this thread's flag among the block's flags (block of kStepThreads) and,
// in `total`, the block's count. Ends with a barrier, so s_counts may be reused right away.
__device__ __forceinline__ int block_rank(bool flag, int* s_counts, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) s_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kStepWarps; ++w) {
    before += w < warp ? s_counts[w] : 0;
    total += s_counts[w];
  }
  __syncthreads();
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// Sum of `x` over the block (kStepThreads threads); ends with a barrier.
__device__ __forceinline__ int block_sum(int x, int* s_counts) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if (threadIdx.x % 32 == 0) s_counts[threadIdx.x / 32] = x;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kStepWarps; ++w) total += s_counts[w];
  __syncthreads();
  return total;
}

// Eight consecutive elements as floats (16-byte aligned source for fp16/bf16, 32-byte for fp32).
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&x)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) x[j] = to_float(e[j]);
}
template <>
__device__ __forceinline__ void load8<float>(const float* src, float (&x)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

// Head logits of one step row without a hidden layer (one warp): rstd * (x . head_weight[c]), bias
// not added; lane 0 stores them in `out`. kVec8: Hd % 8 == 0 and 16-byte aligned rows, so each lane
// reads 8 elements per load.
template <typename T, bool kVec8>
__device__ void head_logits(const StepRewardsParams& p, int token, float* out, int lane) {
  const T* row = hidden_row<T>(p, token);
  const int hd = p.hidden_dim, num_classes = p.num_classes;
  float ss = 0.f;
  for (int c0 = 0; c0 < num_classes; c0 += kClassesPerPass) {
    float dot[kClassesPerPass] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (kVec8) {
#pragma unroll 4
      for (int d = lane * 8; d < hd; d += 32 * 8) {
        float x[8];
        load8(row + d, x);
        if (c0 == 0) {
#pragma unroll
          for (int j = 0; j < 8; ++j) ss += x[j] * x[j];
        }
#pragma unroll
        for (int cc = 0; cc < kClassesPerPass; ++cc) {
          if (c0 + cc < num_classes) {
            float w[8];
            load8(p.head_weight + static_cast<int64_t>(c0 + cc) * hd + d, w);
#pragma unroll
            for (int j = 0; j < 8; ++j) dot[cc] += x[j] * w[j];
          }
        }
      }
    } else {
      for (int d = lane; d < hd; d += 32) {
        const float x = to_float(row[d]);
        if (c0 == 0) ss += x * x;
#pragma unroll
        for (int cc = 0; cc < kClassesPerPass; ++cc) {
          if (c0 + cc < num_classes) dot[cc] += x * p.head_weight[static_cast<int64_t>(c0 + cc) * hd + d];
        }
      }
    }
#pragma unroll
    for (int cc = 0; cc < kClassesPerPass; ++cc) {
      const float total = warp_sum(dot[cc]);
      if (lane == 0 && c0 + cc < num_classes) out[c0 + cc] = total;
    }
  }
  const float scale = p.has_norm ? rsqrtf(warp_sum(ss) / hd + p.norm_eps) : 1.f;
  if (lane == 0) {
    for (int c = 0; c < num_classes; ++c) out[c] *= scale;
  }
}

// Reward of one step from its logits z[0..C) (bias not yet added).
__device__ __forceinline__ float reward_of_logits(const StepRewardsParams& p, const float* z) {
  const auto logit = [&](int c) { return z[c] + (p.bias != nullptr ? p.bias[c] : 0.f); };
  if (p.activation == Activation::kSigmoid) return 1.f / (1.f + expf(-logit(0)));
  float m = -INFINITY;
  for (int c = 0; c < p.num_classes; ++c) m = fmaxf(m, logit(c));
  float denom = 0.f;
  for (int c = 0; c < p.num_classes; ++c) denom += expf(logit(c) - m);
  return expf(logit(p.positive_index) - m) / denom;
}

// Running aggregate of a sequence's rewards in position order (NaN propagates like torch).
struct Aggregator {
  float value;
  float last;
  int count;

  __device__ void init(Aggregate kind) {
    value = kind == Aggregate::kMin ? INFINITY : kind == Aggregate::kMax ? -INFINITY
                                                   : kind == Aggregate::kProd ? 1.f : 0.f;
    last = NAN;
    count = 0;
  }
  __device__ void add(Aggregate kind, float x) {
    switch (kind) {
      case Aggregate::kMin: value = (x < value || x != x) ? x : value; break;
      case Aggregate::kMax: value = (x > value || x != x) ? x : value; break;
      case Aggregate::kProd: value *= x; break;
      case Aggregate::kMean: value += x; break;
      case Aggregate::kLast: break;
    }
    last = x;
    ++count;
  }
  __device__ float result(Aggregate kind) const {
    if (count == 0) return NAN;
    if (kind == Aggregate::kLast) return last;
    if (kind == Aggregate::kMean) return value / count;
    return value;
  }
};

// Workspace of the hidden-layer pipeline (carved from StepRewardsParams::workspace).
struct StepWorkspace {
  int32_t* block_count;    // [num_blocks]
  int32_t* num_steps;      // [1] S
  int32_t* token_of_rank;  // [num_tokens] (first S used) flat token of the r-th step, position order
  int32_t* rank_of_token;  // [num_tokens] (step tokens only) rank of the step at that token
  float* logits;           // [num_tokens, C] (first S rows used)
  int block_tokens, num_blocks;
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

inline StepWorkspace carve_workspace(const StepRewardsParams& p) {
  StepWorkspace w{};
  w.block_tokens = scan_block_tokens(p.num_tokens);
  w.num_blocks = (p.num_tokens + w.block_tokens - 1) / w.block_tokens;
  char* base = static_cast<char*>(p.workspace);
  const size_t tokens = static_cast<size_t>(p.num_tokens);
  w.block_count = reinterpret_cast<int32_t*>(base);
  w.num_steps = w.block_count + w.num_blocks;
  w.token_of_rank = w.num_steps + 1;
  w.rank_of_token = w.token_of_rank + tokens;
  w.logits = reinterpret_cast<float*>(base + align16((static_cast<size_t>(w.num_blocks) + 1 + 2 * tokens) * 4));
  return w;
}

inline size_t workspace_bytes(const StepRewardsParams& p) {
  const size_t tokens = static_cast<size_t>(p.num_tokens);
  const size_t blocks = (tokens + scan_block_tokens(p.num_tokens) - 1) / scan_block_tokens(p.num_tokens);
  return align16((blocks + 1 + 2 * tokens) * 4) + tokens * p.num_classes * 4;
}

// ---- no hidden layer ----

// Step scores of the tokens [blockIdx.x * kHeadBlockTokens, + kHeadBlockTokens): NaN at non-steps,
// the reward at steps (a warp per step row).
template <typename T, bool kVec8>
__global__ void __launch_bounds__(kStepThreads) step_head_kernel(const StepRewardsParams p) {
  __shared__ int s_counts[kStepWarps];
  __shared__ int s_token[kHeadBlockTokens];
  __shared__ float s_logits[kStepWarps][kMaxClasses];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int begin = blockIdx.x * kHeadBlockTokens;
  const int end = min(begin + kHeadBlockTokens, p.num_tokens);
  int num_steps = 0;
  for (int chunk = begin; chunk < end; chunk += kStepThreads) {
    const int pos = chunk + threadIdx.x;
    const bool in_range = pos < end;
    const bool is_step = in_range && p.step_mask[pos];
    int chunk_steps;
    const int rank = block_rank(is_step, s_counts, chunk_steps);
    if (is_step) s_token[num_steps + rank] = pos;
    else if (in_range) p.step_scores[pos] = NAN;
    num_steps += chunk_steps;
  }
  __syncthreads();
  for (int i = warp; i < num_steps; i += kStepWarps) {
    head_logits<T, kVec8>(p, s_token[i], s_logits[warp], lane);
    __syncwarp();
    if (lane == 0) p.step_scores[s_token[i]] = reward_of_logits(p, s_logits[warp]);
    __syncwarp();
  }
}

// One program per sequence, positions in order. kFromLogits: computes each step's reward from the
// hidden-layer logits (workspace) and writes it to step_scores; otherwise reads the rewards
// step_head_kernel wrote. Then chain_scores[b]. (NaN at non-step tokens comes from the block kernels,
// so every step_scores entry is written whatever cu_seqlens holds.)
template <bool kFromLogits>
__global__ void __launch_bounds__(kStepThreads) step_chain_kernel(const StepRewardsParams p, const StepWorkspace w) {
  __shared__ int s_counts[kStepWarps];
  __shared__ float s_reward[kStepThreads];
  const int b = blockIdx.x, tid = threadIdx.x;
  const SeqRange range = seq_range(p, b);
  Aggregator agg;
  agg.init(p.aggregate);
  for (int chunk = range.begin; chunk < range.end; chunk += kStepThreads) {
    const int pos = chunk + tid;
    const bool in_range = pos < range.end;
    const bool is_step = in_range && p.step_mask[pos];
    int num_steps;
    const int rank = block_rank(is_step, s_counts, num_steps);
    if (is_step) {
      float reward;
      if constexpr (kFromLogits) {
        reward = reward_of_logits(p, w.logits + static_cast<int64_t>(w.rank_of_token[pos]) * p.num_classes);
        p.step_scores[pos] = reward;
      } else {
        reward = p.step_scores[pos];
      }
      s_reward[rank] = reward;
    }
    __syncthreads();
    if (tid == 0) {
      for (int i = 0; i < num_steps; ++i) agg.add(p.aggregate, s_reward[i]);
    }
    __syncthreads();  // s_reward is rewritten by the next chunk
  }
  if (tid == 0) p.chain_scores[b] = agg.result(p.aggregate);
}

// ---- hidden layer: step compaction ----

// block_count[b] = steps among tokens [b * block_tokens, (b + 1) * block_tokens).
__global__ void __launch_bounds__(kStepThreads) step_count_kernel(const StepRewardsParams p, const StepWorkspace w) {
  const int begin = blockIdx.x * w.block_tokens;
  const int end = min(begin + w.block_tokens, p.num_tokens);
  int count = 0;
  for (int chunk = begin; chunk < end; chunk += kStepThreads) {
    const int pos = chunk + threadIdx.x;
    count += __syncthreads_count(pos < end && p.step_mask[pos]);
  }
  if (threadIdx.x == 0) w.block_count[blockIdx.x] = count;
}

// Ranks of block b's steps in position order over the whole batch: token_of_rank, rank_of_token and
// zeroed logits rows; NaN step_scores at its non-step tokens; the last block stores S.
__global__ void __launch_bounds__(kStepThreads) step_compact_kernel(const StepRewardsParams p, const StepWorkspace w) {
  __shared__ int s_counts[kStepWarps];
  const int b = blockIdx.x;
  int before = 0;
  for (int i = threadIdx.x; i < b; i += kStepThreads) before += w.block_count[i];
  int next_rank = block_sum(before, s_counts);
  if (b == w.num_blocks - 1 && threadIdx.x == 0) *w.num_steps = next_rank + w.block_count[b];
  const int begin = b * w.block_tokens;
  const int end = min(begin + w.block_tokens, p.num_tokens);
  for (int chunk = begin; chunk < end; chunk += kStepThreads) {
    const int pos = chunk + threadIdx.x;
    const bool in_range = pos < end;
    const bool is_step = in_range && p.step_mask[pos];
    int chunk_steps;
    const int rank = next_rank + block_rank(is_step, s_counts, chunk_steps);
    if (is_step) {
      w.token_of_rank[rank] = pos;
      w.rank_of_token[pos] = rank;
      for (int c = 0; c < p.num_classes; ++c) w.logits[static_cast<int64_t>(rank) * p.num_classes + c] = 0.f;
    } else if (in_range) {
      p.step_scores[pos] = NAN;
    }
    next_rank += chunk_steps;
  }
}

// ---- hidden layer: GEMM over the step rows with the head in the epilogue ----

__device__ __forceinline__ int num_steps_total(const StepRewardsParams& p, const StepWorkspace& w) {
  return min(max(*w.num_steps, 0), p.num_tokens);
}

// s_h[r][j] = relu(rstd[r] * acc + mlp_bias) of the tile (kRows x kUnits) is complete: add
// sum_j s_h[r][j] * head_weight[c][unit_tile * kUnits + j] to logits[row_tile * kRows + r][c].
template <int kRows, int kUnits, int kPitch>
__device__ __forceinline__ void mlp_tile_head(const StepRewardsParams& p, const StepWorkspace& w, const float* s_h,
                                              const int* s_token, int row_tile, int unit_tile) {
  const int num_classes = p.num_classes;
  const int units = min(kUnits, p.mlp_dim - unit_tile * kUnits);
  for (int pair = threadIdx.x; pair < kRows * num_classes; pair += blockDim.x) {
    const int r = pair / num_classes, c = pair % num_classes;
    if (s_token[r] < 0) continue;
    const float* hw = p.head_weight + static_cast<int64_t>(c) * p.mlp_dim + unit_tile * kUnits;
    float sum = 0.f;
    for (int j = 0; j < units; ++j) sum += s_h[r * kPitch + j] * hw[j];
    atomicAdd(w.logits + (static_cast<int64_t>(row_tile) * kRows + r) * num_classes + c, sum);
  }
}

__device__ __forceinline__ float mlp_unit(const StepRewardsParams& p, float acc, float rstd, int unit) {
  if (unit >= p.mlp_dim) return 0.f;
  return fmaxf(acc * rstd + (p.mlp_bias != nullptr ? p.mlp_bias[unit] : 0.f), 0.f);
}

// Tensor-core GEMM tile shape: 128 step rows x 128 hidden units, K steps of 64, 8 warps as 2 (rows)
// x 4 (units), each warp 64 x 32 (4 x 4 mma.m16n8k16 per 16 of K), kMmaStages-deep cp.async pipeline.
constexpr int kMmaRows = 128, kMmaUnits = 128, kMmaK = 64, kMmaStages = 3, kMmaThreads = 256;
constexpr int kMmaChunks = kMmaK / 8;  // 16-byte chunks per tile row
constexpr int kMmaHPitch = kMmaUnits + 4;

template <typename T>
constexpr size_t mma_smem_bytes() {
  constexpr size_t pipeline = static_cast<size_t>(kMmaStages) * (kMmaRows + kMmaUnits) * kMmaK * sizeof(T);
  constexpr size_t epilogue = static_cast<size_t>(kMmaRows) * kMmaHPitch * sizeof(float);
  return pipeline > epilogue ? pipeline : epilogue;
}

// Tensor-core hidden layer (fp16/bf16 hidden and mlp_weight of that dtype, Hd % 8 == 0, 16-byte
// aligned rows). Persistent: programs loop over (row tile, unit tile) pairs, row tile fastest, so
// programs running together share mlp_weight tiles in L2. Dynamic shared memory: mma_smem_bytes<T>().
template <typename T>
__global__ void __launch_bounds__(kMmaThreads) step_mlp_mma_kernel(const StepRewardsParams p, const StepWorkspace w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(16) unsigned char s_dyn[];
  T* s_a = reinterpret_cast<T*>(s_dyn);                       // [stage][kMmaRows * kMmaK], swizzled
  T* s_b = s_a + kMmaStages * kMmaRows * kMmaK;               // [stage][kMmaUnits * kMmaK], swizzled
  float* s_h = reinterpret_cast<float*>(s_dyn);               // epilogue [kMmaRows][kMmaHPitch], after the K loop
  __shared__ int s_token[kMmaRows];
  __shared__ float s_rstd[kMmaRows];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int num_steps = num_steps_total(p, w);
  const int row_tiles = (num_steps + kMmaRows - 1) / kMmaRows;
  const int unit_tiles = (p.mlp_dim + kMmaUnits - 1) / kMmaUnits;
  const int hd = p.hidden_dim, k_tiles = (hd + kMmaK - 1) / kMmaK;
  const T* mlp_w = static_cast<const T*>(p.mlp_weight);
  // Sum of squares: thread tid covers half (tid % 2) of row tid / 2 of every A tile.
  const int ss_row = tid / 2, ss_half = tid % 2;

  for (int work = blockIdx.x; work < row_tiles * unit_tiles; work += gridDim.x) {
    const int row_tile = work % row_tiles, unit_tile = work / row_tiles;
    __syncthreads();  // the previous tile's readers of s_token / s_h are done
    for (int r = tid; r < kMmaRows; r += kMmaThreads) {
      const int i = row_tile * kMmaRows + r;
      s_token[r] = i < num_steps ? w.token_of_rank[i] : -1;
    }
    __syncthreads();

    const auto load_tile = [&](int stage, int k0) {
      T* a = s_a + stage * kMmaRows * kMmaK;
      T* bt = s_b + stage * kMmaUnits * kMmaK;
      for (int i = tid; i < kMmaRows * kMmaChunks; i += kMmaThreads) {
        const int r = i / kMmaChunks, c = i % kMmaChunks, d = k0 + c * 8;
        const bool valid = s_token[r] >= 0 && d < hd;
        cp_async_16(a + swizzled_offset<kMmaChunks>(r, c), valid ? hidden_row<T>(p, s_token[r]) + d : p.hidden, valid);
      }
      for (int i = tid; i < kMmaUnits * kMmaChunks; i += kMmaThreads) {
        const int r = i / kMmaChunks, c = i % kMmaChunks, unit = unit_tile * kMmaUnits + r, d = k0 + c * 8;
        const bool valid = unit < p.mlp_dim && d < hd;
        cp_async_16(bt + swizzled_offset<kMmaChunks>(r, c), valid ? mlp_w + static_cast<int64_t>(unit) * hd + d : mlp_w,
                    valid);
      }
    };

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int s = 0; s < kMmaStages - 1; ++s) {
      if (s < k_tiles) load_tile(s, s * kMmaK);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<kMmaStages - 2>();
      __syncthreads();  // tile kt is in shared memory; every warp is done with tile kt - 1
      const int next = kt + kMmaStages - 1;
      if (next < k_tiles) load_tile(next % kMmaStages, next * kMmaK);
      cp_async_commit();

      const T* a = s_a + (kt % kMmaStages) * kMmaRows * kMmaK;
      const T* bt = s_b + (kt % kMmaStages) * kMmaUnits * kMmaK;
      if (p.has_norm) {
#pragma unroll
        for (int c = 0; c < kMmaChunks / 2; ++c) {
          float x[8];
          load8(a + swizzled_offset<kMmaChunks>(ss_row, ss_half * (kMmaChunks / 2) + c), x);
#pragma unroll
          for (int j = 0; j < 8; ++j) ss += x[j] * x[j];
        }
      }
#pragma unroll
      for (int kk = 0; kk < kMmaK / 16; ++kk) {
        uint32_t af[4][4];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const int x_row = warp_m * 64 + mi * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
          ldmatrix_x4(af[mi], a + swizzled_offset<kMmaChunks>(x_row, 2 * kk + lane / 16));
        }
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          uint32_t bf[4];
          const int w_row = warp_n * 32 + nj * 16 + (lane % 8) + 8 * (lane / 16);
          ldmatrix_x4(bf, bt + swizzled_offset<kMmaChunks>(w_row, 2 * kk + (lane / 8) % 2));
#pragma unroll
          for (int mi = 0; mi < 4; ++mi) {
            mma_16816<T>(acc[mi][2 * nj], af[mi], bf[0], bf[1]);
            mma_16816<T>(acc[mi][2 * nj + 1], af[mi], bf[2], bf[3]);
          }
        }
      }
    }
    cp_async_wait<0>();
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);  // the two halves of row ss_row (adjacent lanes)
    if (ss_half == 0) s_rstd[ss_row] = p.has_norm ? rsqrtf(ss / hd + p.norm_eps) : 1.f;
    __syncthreads();  // pipeline buffers free for s_h; s_rstd complete

    const int g = lane / 4, t4 = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp_m * 64 + mi * 16 + g + 8 * (e / 2), j = warp_n * 32 + ni * 8 + 2 * t4 + (e % 2);
          s_h[r * kMmaHPitch + j] = mlp_unit(p, acc[mi][ni][e], s_rstd[r], unit_tile * kMmaUnits + j);
        }
      }
    }
    __syncthreads();
    mlp_tile_head<kMmaRows, kMmaUnits, kMmaHPitch>(p, w, s_h, s_token, row_tile, unit_tile);
  }
#endif
}

// SIMT hidden layer for every other case; mlp_weight of type TW (the hidden dtype or fp32).
// 64 rows x 64 units per tile, 128 threads; thread (ty, tx) computes rows 4 ty .. 4 ty + 3 x units
// tx + 8 j. The A loader gives each thread half of one row per K step, so it also sums its squares.
constexpr int kSimtRows = 64, kSimtUnits = 64, kSimtK = 32, kSimtThreads = 128;

template <typename T, typename TW>
__global__ void __launch_bounds__(kSimtThreads) step_mlp_simt_kernel(const StepRewardsParams p, const StepWorkspace w) {
  __shared__ float s_xt[kSimtK][kSimtRows];   // step rows, transposed
  __shared__ float s_wt[kSimtK][kSimtUnits];  // mlp_weight tile, transposed
  __shared__ float s_h[kSimtRows * (kSimtUnits + 1)];
  __shared__ int s_token[kSimtRows];
  __shared__ float s_rstd[kSimtRows];
  const int tid = threadIdx.x, ty = tid / 8, tx = tid % 8;
  const int num_steps = num_steps_total(p, w);
  const int row_tiles = (num_steps + kSimtRows - 1) / kSimtRows;
  const int unit_tiles = (p.mlp_dim + kSimtUnits - 1) / kSimtUnits;
  const TW* mlp_w = static_cast<const TW*>(p.mlp_weight);
  const int hd = p.hidden_dim;
  const int load_row = tid / 2, load_k = (tid % 2) * (kSimtK / 2);

  for (int work = blockIdx.x; work < row_tiles * unit_tiles; work += gridDim.x) {
    const int row_tile = work % row_tiles, unit_tile = work / row_tiles;
    __syncthreads();
    for (int r = tid; r < kSimtRows; r += kSimtThreads) {
      const int i = row_tile * kSimtRows + r;
      s_token[r] = i < num_steps ? w.token_of_rank[i] : -1;
    }
    __syncthreads();
    const T* row = s_token[load_row] >= 0 ? hidden_row<T>(p, s_token[load_row]) : nullptr;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    float ss = 0.f;
    for (int k0 = 0; k0 < hd; k0 += kSimtK) {
#pragma unroll
      for (int k = 0; k < kSimtK / 2; ++k) {
        const int d = k0 + load_k + k;
        const float x = row != nullptr && d < hd ? to_float(row[d]) : 0.f;
        ss += x * x;
        s_xt[load_k + k][load_row] = x;
      }
      for (int i = tid; i < kSimtUnits * kSimtK; i += kSimtThreads) {
        const int r = i / kSimtK, k = i % kSimtK, unit = unit_tile * kSimtUnits + r, d = k0 + k;
        s_wt[k][r] = unit < p.mlp_dim && d < hd ? to_float(mlp_w[static_cast<int64_t>(unit) * hd + d]) : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kSimtK; ++k) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = s_xt[k][4 * ty + i];
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = s_wt[k][tx + 8 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);  // the two halves of row load_row (adjacent lanes)
    if (tid % 2 == 0) s_rstd[load_row] = p.has_norm ? rsqrtf(ss / hd + p.norm_eps) : 1.f;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = 4 * ty + i, u = tx + 8 * j;
        s_h[r * (kSimtUnits + 1) + u] = mlp_unit(p, acc[i][j], s_rstd[r], unit_tile * kSimtUnits + u);
      }
    }
    __syncthreads();
    mlp_tile_head<kSimtRows, kSimtUnits, kSimtUnits + 1>(p, w, s_h, s_token, row_tile, unit_tile);
  }
}

}  // namespace detail
}  // namespace o1k
