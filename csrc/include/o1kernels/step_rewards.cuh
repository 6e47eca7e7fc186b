// Fused PRM step-reward kernels. Only the hidden rows at step positions are read; no per-token
// logits are formed. Two pipelines (see api.h for the layout):
//   no hidden layer: step_rewards_finalize_kernel<T, false> alone. One program per sequence
//     walks its mask in position order, a warp per step computes RMSNorm factor and the C
//     logits in one pass over the row (the norm factor is a per-row scalar, so
//     sum_d x_d w_d r_d * rsqrt(...) needs only sum x^2 besides the dots), then the
//     activation, the step score and the running aggregate.
//   hidden layer: count steps per sequence -> scan into seq_step_start -> gather step tokens
//     and RMSNorm factors (zeroing their logits) -> hidden layer + head on tiles of 64 step
//     rows x 64 hidden units (tensor cores for fp16/bf16, SIMT otherwise), accumulated into
//     fp32 logits with atomics over the hidden-unit tiles -> finalize<T, true> (activation,
//     scores, aggregate). The atomics make the last bits of the logits order-dependent.
#pragma once

#include <cmath>

#include "o1kernels/device_utils.cuh"

namespace o1k {
namespace detail {

constexpr int kStepThreads = 256;  // per-sequence kernels: positions per chunk
constexpr int kStepWarps = kStepThreads / 32;
constexpr int kClassesPerPass = 4;  // dot products per pass over a hidden row

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

// sum of squares of a hidden row (one warp).
template <typename T>
__device__ __forceinline__ float row_sum_squares(const T* row, int hidden_dim, int lane) {
  float ss = 0.f;
  for (int d = lane; d < hidden_dim; d += 32) {
    const float x = to_float(row[d]);
    ss += x * x;
  }
  return warp_sum(ss);
}

__device__ __forceinline__ float rms_scale(const StepRewardsParams& p, float sum_squares) {
  return p.norm_weight != nullptr ? rsqrtf(sum_squares / p.hidden_dim + p.norm_eps) : 1.f;
}

// Head logits of one step row without a hidden layer (one warp); lane 0 gets them in `out`.
template <typename T>
__device__ void head_logits_direct(const StepRewardsParams& p, int token, float* out, int lane) {
  const T* row = hidden_row<T>(p, token);
  const int hd = p.hidden_dim, num_classes = p.num_classes;
  float ss = 0.f;
  for (int c0 = 0; c0 < num_classes; c0 += kClassesPerPass) {
    float dot[kClassesPerPass] = {0.f, 0.f, 0.f, 0.f};
    for (int d = lane; d < hd; d += 32) {
      float x = to_float(row[d]);
      if (c0 == 0) ss += x * x;
      if (p.norm_weight != nullptr) x *= p.norm_weight[d];
#pragma unroll
      for (int cc = 0; cc < kClassesPerPass; ++cc) {
        if (c0 + cc < num_classes) dot[cc] += x * p.weight[static_cast<int64_t>(c0 + cc) * hd + d];
      }
    }
#pragma unroll
    for (int cc = 0; cc < kClassesPerPass; ++cc) {
      const float total = warp_sum(dot[cc]);
      if (lane == 0 && c0 + cc < num_classes) out[c0 + cc] = total;
    }
  }
  const float scale = rms_scale(p, warp_sum(ss));
  if (lane == 0) {
    for (int c = 0; c < num_classes; ++c) out[c] = out[c] * scale + (p.bias != nullptr ? p.bias[c] : 0.f);
  }
}

__device__ __forceinline__ float activation_reward(const StepRewardsParams& p, const float* logits) {
  if (p.activation == Activation::kSigmoid) return 1.f / (1.f + expf(-logits[0]));
  float m = -INFINITY;
  for (int c = 0; c < p.num_classes; ++c) m = fmaxf(m, logits[c]);
  float denom = 0.f;
  for (int c = 0; c < p.num_classes; ++c) denom += expf(logits[c] - m);
  return expf(logits[p.positive_index] - m) / denom;
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

// One program per sequence: walks the mask in position order, writes NaN at non-step tokens,
// computes each step's logits (kHasMlp: reads them from p.step_logits), reward and aggregate.
template <typename T, bool kHasMlp>
__global__ void __launch_bounds__(kStepThreads) step_rewards_finalize_kernel(const StepRewardsParams p) {
  __shared__ int s_counts[kStepWarps];
  __shared__ int s_step_token[kStepThreads];
  __shared__ float s_reward[kStepThreads];
  __shared__ float s_logits[kStepWarps][kMaxClasses];
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const SeqRange range = seq_range(p, b);
  int step_index = kHasMlp ? p.seq_step_start[b] : 0;  // global index of the chunk's first step
  Aggregator agg;
  agg.init(p.aggregate);
  for (int chunk = range.begin; chunk < range.end; chunk += kStepThreads) {
    const int pos = chunk + tid;
    const bool in_range = pos < range.end;
    const bool is_step = in_range && p.step_mask[pos];
    int num_steps;
    const int rank = block_rank(is_step, s_counts, num_steps);
    if (is_step) s_step_token[rank] = pos;
    else if (in_range) p.step_scores[pos] = NAN;
    __syncthreads();
    for (int i = warp; i < num_steps; i += kStepWarps) {
      float* logits = s_logits[warp];
      if constexpr (kHasMlp) {
        const int64_t global = static_cast<int64_t>(step_index) + i;
        if (lane == 0) {
          for (int c = 0; c < p.num_classes; ++c) {
            // global >= num_tokens only with overlapping (invalid) cu_seqlens: stay in bounds.
            logits[c] = global < p.num_tokens ? p.step_logits[global * p.num_classes + c] +
                                                    (p.bias != nullptr ? p.bias[c] : 0.f)
                                              : NAN;
          }
        }
      } else {
        head_logits_direct<T>(p, s_step_token[i], logits, lane);
      }
      if (lane == 0) {
        const float reward = activation_reward(p, logits);
        s_reward[i] = reward;
        p.step_scores[s_step_token[i]] = reward;
      }
    }
    __syncthreads();
    if (tid == 0) {
      for (int i = 0; i < num_steps; ++i) agg.add(p.aggregate, s_reward[i]);
    }
    step_index += num_steps;
    __syncthreads();  // s_step_token / s_reward are rewritten by the next chunk
  }
  if (tid == 0) p.chain_scores[b] = agg.result(p.aggregate);
}

// seq_step_start[b + 1] = number of steps of sequence b.
__global__ void __launch_bounds__(kStepThreads) step_count_kernel(const StepRewardsParams p) {
  const int b = blockIdx.x;
  const SeqRange range = seq_range(p, b);
  int count = 0;
  for (int chunk = range.begin; chunk < range.end; chunk += kStepThreads) {
    const int pos = chunk + threadIdx.x;
    count += __syncthreads_count(pos < range.end && p.step_mask[pos]);
  }
  if (threadIdx.x == 0) p.seq_step_start[b + 1] = count;
}

// In-place inclusive scan of seq_step_start[1..num_seqs] (one program of 1024 threads).
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads) step_scan_kernel(const StepRewardsParams p) {
  __shared__ int s_warp_total[kScanThreads / 32];
  __shared__ int s_carry;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid == 0) {
    s_carry = 0;
    p.seq_step_start[0] = 0;
  }
  for (int base = 0; base < p.num_seqs; base += kScanThreads) {
    const int idx = base + tid;
    int v = idx < p.num_seqs ? p.seq_step_start[idx + 1] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += up;
    }
    if (lane == 31) s_warp_total[warp] = v;
    __syncthreads();  // also publishes s_carry
    if (warp == 0) {
      int t = s_warp_total[lane];
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, t, off);
        if (lane >= off) t += up;
      }
      s_warp_total[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    const int carry = s_carry;
    const int inclusive = carry + v + (warp > 0 ? s_warp_total[warp - 1] : 0);
    if (idx < p.num_seqs) p.seq_step_start[idx + 1] = inclusive;
    __syncthreads();  // everyone has read s_carry and s_warp_total
    if (tid == kScanThreads - 1) s_carry = inclusive;
  }
}

// step_token / step_row_scale of every step; zeroes its logits (accumulated with atomics later).
template <typename T>
__global__ void __launch_bounds__(kStepThreads) step_gather_kernel(const StepRewardsParams p) {
  __shared__ int s_counts[kStepWarps];
  __shared__ int s_step_token[kStepThreads];
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const SeqRange range = seq_range(p, b);
  int step_index = p.seq_step_start[b];
  for (int chunk = range.begin; chunk < range.end; chunk += kStepThreads) {
    const int pos = chunk + tid;
    const bool is_step = pos < range.end && p.step_mask[pos];
    int num_steps;
    const int rank = block_rank(is_step, s_counts, num_steps);
    if (is_step) s_step_token[rank] = pos;
    __syncthreads();
    for (int i = warp; i < num_steps; i += kStepWarps) {
      const int64_t global = static_cast<int64_t>(step_index) + i;
      if (global >= p.num_tokens) break;  // only with overlapping (invalid) cu_seqlens
      const int token = s_step_token[i];
      const float scale =
          p.norm_weight != nullptr ? rms_scale(p, row_sum_squares(hidden_row<T>(p, token), p.hidden_dim, lane)) : 1.f;
      if (lane == 0) {
        p.step_token[global] = token;
        p.step_row_scale[global] = scale;
      }
      for (int c = lane; c < p.num_classes; c += 32) p.step_logits[global * p.num_classes + c] = 0.f;
    }
    step_index += num_steps;
    __syncthreads();
  }
}

// ---- hidden layer: tiles of kMlpRows step rows x kMlpUnits hidden units ----
constexpr int kMlpRows = 64;
constexpr int kMlpUnits = 64;
constexpr int kMlpThreads = 128;

// Shared state of a tile: the relu'd hidden-layer block, the rows' tokens and norm factors.
struct MlpTileSmem {
  float h[kMlpRows][kMlpUnits + 1];
  float scale[kMlpRows];
  int token[kMlpRows];  // -1 past the last step
};

__device__ __forceinline__ int num_steps_total(const StepRewardsParams& p) {
  return min(p.seq_step_start[p.num_seqs], p.num_tokens);
}

__device__ __forceinline__ void mlp_tile_rows(const StepRewardsParams& p, MlpTileSmem& s, int row_tile,
                                              int num_steps) {
  for (int r = threadIdx.x; r < kMlpRows; r += kMlpThreads) {
    const int i = row_tile * kMlpRows + r;
    s.token[r] = i < num_steps ? p.step_token[i] : -1;
    s.scale[r] = i < num_steps ? p.step_row_scale[i] : 0.f;
  }
}

// h = relu(scale * acc + mlp_bias) is in s.h; add this tile's contribution to the logits.
__device__ __forceinline__ void mlp_tile_head(const StepRewardsParams& p, const MlpTileSmem& s, int row_tile,
                                              int unit_tile) {
  const int num_classes = p.num_classes;
  for (int pair = threadIdx.x; pair < kMlpRows * num_classes; pair += kMlpThreads) {
    const int r = pair / num_classes, c = pair % num_classes;
    if (s.token[r] < 0) continue;
    const float* w = p.weight + static_cast<int64_t>(c) * p.mlp_dim + unit_tile * kMlpUnits;
    const int units = min(kMlpUnits, p.mlp_dim - unit_tile * kMlpUnits);
    float sum = 0.f;
    for (int j = 0; j < units; ++j) sum += s.h[r][j] * w[j];
    atomicAdd(p.step_logits + (static_cast<int64_t>(row_tile) * kMlpRows + r) * num_classes + c, sum);
  }
}

__device__ __forceinline__ float mlp_unit(const StepRewardsParams& p, const MlpTileSmem& s, int r, int unit_tile,
                                          int j, float acc) {
  const int unit = unit_tile * kMlpUnits + j;
  if (unit >= p.mlp_dim) return 0.f;
  return fmaxf(acc * s.scale[r] + (p.mlp_bias != nullptr ? p.mlp_bias[unit] : 0.f), 0.f);
}

// Tensor-core hidden layer (fp16/bf16 hidden and mlp_weight of that dtype, hidden_dim % 8 == 0,
// 16-byte aligned rows). Persistent: programs loop over (row tile, unit tile) pairs, row tile
// fastest, so programs running together share mlp_weight tiles in L2.
template <typename T>
__global__ void __launch_bounds__(kMlpThreads) step_mlp_mma_kernel(const StepRewardsParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int BK = 64, CH = BK / 8;
  __shared__ __align__(16) T s_x[kMlpRows * BK];
  __shared__ __align__(16) T s_w[kMlpUnits * BK];
  __shared__ MlpTileSmem s;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int num_steps = num_steps_total(p);
  const int row_tiles = (num_steps + kMlpRows - 1) / kMlpRows;
  const int unit_tiles = (p.mlp_dim + kMlpUnits - 1) / kMlpUnits;
  const T* mlp_w = static_cast<const T*>(p.mlp_weight);
  const int hd = p.hidden_dim;

  for (int work = blockIdx.x; work < row_tiles * unit_tiles; work += gridDim.x) {
    const int row_tile = work % row_tiles, unit_tile = work / row_tiles;
    __syncthreads();  // the previous tile's readers of s are done
    mlp_tile_rows(p, s, row_tile, num_steps);
    __syncthreads();
    float acc[kMlpUnits / 8][4];
#pragma unroll
    for (int i = 0; i < kMlpUnits / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    for (int k0 = 0; k0 < hd; k0 += BK) {
      for (int i = tid; i < kMlpUnits * CH; i += kMlpThreads) {
        const int r = i / CH, c = i % CH, unit = unit_tile * kMlpUnits + r, d = k0 + c * 8;
        const bool valid = unit < p.mlp_dim && d < hd;
        cp_async_16(s_w + swizzled_offset<CH>(r, c), valid ? mlp_w + static_cast<int64_t>(unit) * hd + d : mlp_w,
                    valid);
      }
      cp_async_commit();
      // Step rows go through registers: the RMSNorm weight is applied before the mma
      // (the per-row rsqrt factor is applied to the accumulators).
      for (int i = tid; i < kMlpRows * CH; i += kMlpThreads) {
        const int r = i / CH, c = i % CH, d = k0 + c * 8;
        uint4 packed = make_uint4(0u, 0u, 0u, 0u);
        if (s.token[r] >= 0 && d < hd) {
          packed = *reinterpret_cast<const uint4*>(hidden_row<T>(p, s.token[r]) + d);
          if (p.norm_weight != nullptr) {
            T* e = reinterpret_cast<T*>(&packed);
#pragma unroll
            for (int j = 0; j < 8; ++j) e[j] = from_float<T>(to_float(e[j]) * p.norm_weight[d + j]);
          }
        }
        *reinterpret_cast<uint4*>(s_x + swizzled_offset<CH>(r, c)) = packed;
      }
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t a[4];
        const int x_row = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
        ldmatrix_x4(a, s_x + swizzled_offset<CH>(x_row, 2 * kk + lane / 16));
#pragma unroll
        for (int nn = 0; nn < kMlpUnits / 16; ++nn) {
          uint32_t b[4];
          const int w_row = nn * 16 + (lane % 8) + 8 * (lane / 16);
          ldmatrix_x4(b, s_w + swizzled_offset<CH>(w_row, 2 * kk + (lane / 8) % 2));
          mma_16816<T>(acc[2 * nn], a, b[0], b[1]);
          mma_16816<T>(acc[2 * nn + 1], a, b[2], b[3]);
        }
      }
      __syncthreads();
    }
    const int g = lane / 4, t4 = lane % 4;
#pragma unroll
    for (int nt = 0; nt < kMlpUnits / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + g + 8 * (e / 2), j = nt * 8 + 2 * t4 + (e % 2);
        s.h[r][j] = mlp_unit(p, s, r, unit_tile, j, acc[nt][e]);
      }
    }
    __syncthreads();
    mlp_tile_head(p, s, row_tile, unit_tile);
  }
#endif
}

// SIMT hidden layer for every other case; mlp_weight of type TW (the hidden dtype or fp32).
// Thread (ty, tx) computes rows 4 ty .. 4 ty + 3 x units tx + 8 j.
template <typename T, typename TW>
__global__ void __launch_bounds__(kMlpThreads) step_mlp_simt_kernel(const StepRewardsParams p) {
  constexpr int BK = 32;
  __shared__ float s_xt[BK][kMlpRows];   // step rows, transposed, norm weight applied
  __shared__ float s_wt[BK][kMlpUnits];  // mlp_weight tile, transposed
  __shared__ MlpTileSmem s;
  const int tid = threadIdx.x, ty = tid / 8, tx = tid % 8;
  const int num_steps = num_steps_total(p);
  const int row_tiles = (num_steps + kMlpRows - 1) / kMlpRows;
  const int unit_tiles = (p.mlp_dim + kMlpUnits - 1) / kMlpUnits;
  const TW* mlp_w = static_cast<const TW*>(p.mlp_weight);
  const int hd = p.hidden_dim;

  for (int work = blockIdx.x; work < row_tiles * unit_tiles; work += gridDim.x) {
    const int row_tile = work % row_tiles, unit_tile = work / row_tiles;
    __syncthreads();
    mlp_tile_rows(p, s, row_tile, num_steps);
    __syncthreads();
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    for (int k0 = 0; k0 < hd; k0 += BK) {
      for (int i = tid; i < kMlpRows * BK; i += kMlpThreads) {
        const int r = i / BK, k = i % BK, d = k0 + k;
        float x = 0.f;
        if (s.token[r] >= 0 && d < hd) {
          x = to_float(hidden_row<T>(p, s.token[r])[d]);
          if (p.norm_weight != nullptr) x *= p.norm_weight[d];
        }
        s_xt[k][r] = x;
      }
      for (int i = tid; i < kMlpUnits * BK; i += kMlpThreads) {
        const int r = i / BK, k = i % BK, unit = unit_tile * kMlpUnits + r, d = k0 + k;
        s_wt[k][r] = unit < p.mlp_dim && d < hd ? to_float(mlp_w[static_cast<int64_t>(unit) * hd + d]) : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        float a[4], w[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = s_xt[k][4 * ty + i];
#pragma unroll
        for (int j = 0; j < 8; ++j) w[j] = s_wt[k][tx + 8 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * w[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s.h[4 * ty + i][tx + 8 * j] = mlp_unit(p, s, 4 * ty + i, unit_tile, tx + 8 * j, acc[i][j]);
    }
    __syncthreads();
    mlp_tile_head(p, s, row_tile, unit_tile);
  }
}

}  // namespace detail
}  // namespace o1k
