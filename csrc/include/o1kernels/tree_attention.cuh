// Tree attention partial kernels (one program per work item x kv head x tile of query rows).
//
// A program loads its work item's KV chunk block by block into shared memory once (tokens
// gathered through the page table) and multiplies each block against every query row of the
// item times every query head of the kv head's GQA group: rows r = j * group + hh stack query j
// of the item with head kv_head * group + hh into the M dimension. Online softmax in fp32.
//   - mma path (fp16/bf16, head_dim 64/128/256): mma.sync m16n8k16 tensor cores, operands
//     through ldmatrix from XOR-swizzled shared memory, K/V double-buffered with cp.async.
//     4 warps; kWarpsM of them split the rows (16 each), the other kWarpsN = 4 / kWarpsM split
//     each KV block's tokens, and their states are merged in shared memory at the end. Decode
//     items (<= 16 rows) use kWarpsM = 1 so all four warps stream KV.
//   - SIMT path (fp32, or head dims the mma path lacks): scalar fp32 math, one token per lane.
// Both write normalised fp32 partials and their natural-log LSE (see api.h). With positions
// (p.q_pos) each row has its own visible token range (visible_rows): the program reads the union of
// its rows' ranges within the chunk and masks each row to its own; softcap caps the scores before
// the softmax. Both kernels are instantiated twice, kVariant = positions or softcap in use (see
// has_variant), so the plain instance compiles to the kernel without them.
#pragma once

#include <cmath>

#include "o1kernels/device_utils.cuh"

namespace o1k {
namespace detail {

// Per-work-item values every thread of a program reads.
struct WorkItem {
  int rows;     // (work_q_end - work_q_start) * group
  int q_begin;  // into seg_queries
  int seg;
  int kv_lo, kv_hi;  // token range actually read (kv_hi clamped to the current segment length)
  const int32_t* pages;
  int out_base;
};

__device__ __forceinline__ WorkItem load_work_item(const TreeAttentionParams& p, int w, int group) {
  WorkItem it;
  it.q_begin = p.work_q_start[w];
  it.rows = (p.work_q_end[w] - it.q_begin) * group;
  it.seg = p.work_seg[w];
  const int capacity = p.seg_capacity[it.seg];
  const int length = min(max(p.seg_lens[it.seg], 0), capacity);
  it.kv_lo = p.work_kv_start[w];
  it.kv_hi = min(p.work_kv_end[w], length);
  it.pages = p.page_table + p.seg_page_start[it.seg];
  it.out_base = p.work_out[w];
  return it;
}

// Element offset of token t of the segment, kv head h, in a cache with the given strides.
__device__ __forceinline__ int64_t token_offset(const WorkItem& it, int t, int page_size, int64_t stride_page,
                                                int64_t stride_token, int64_t stride_head, int h) {
  return static_cast<int64_t>(it.pages[t / page_size]) * stride_page +
         static_cast<int64_t>(t % page_size) * stride_token + static_cast<int64_t>(h) * stride_head;
}

// Query row r of the item: element offset of (query, head) in q.
__device__ __forceinline__ int64_t query_offset(const TreeAttentionParams& p, const WorkItem& it, int row, int group,
                                                int kv_head) {
  const int64_t qi = p.seg_queries[it.q_begin + row / group];
  return qi * p.q_stride_n + static_cast<int64_t>(kv_head * group + row % group) * p.q_stride_h;
}

// Tokens [lo, hi) of the item's range [kv_lo, kv_hi) that query row `row` sees (p.q_pos given):
// t <= q_pos - seg_start and, with a window, t > q_pos - seg_start - window; empty when hi <= lo.
// int64 arithmetic: positions reach 2^31 - 1.
__device__ __forceinline__ int2 visible_tokens(const TreeAttentionParams& p, const WorkItem& it, int row, int group) {
  const int64_t rel = static_cast<int64_t>(p.q_pos[p.seg_queries[it.q_begin + row / group]]) - p.seg_start[it.seg];
  int64_t lo = it.kv_lo;
  if (p.window > 0 && rel - p.window + 1 > lo) lo = rel - p.window + 1;
  if (lo > it.kv_hi) lo = it.kv_hi;
  const int64_t hi = rel + 1 < it.kv_hi ? rel + 1 : it.kv_hi;
  return make_int2(static_cast<int>(lo), static_cast<int>(hi));
}

// Masking by position (p.q_pos given): the visible range of rows [row0, row0 + kRows) of the item into
// s_lo/s_hi (empty for rows past the item), then it.kv_lo/kv_hi narrowed to their union (empty when no
// row sees a token of the chunk). Called by every thread of the program (one __syncthreads).
template <int kRows>
__device__ __forceinline__ void visible_rows(const TreeAttentionParams& p, WorkItem& it, int row0, int group,
                                             int* s_lo, int* s_hi) {
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
    const int2 range = row0 + r < it.rows ? visible_tokens(p, it, row0 + r, group) : make_int2(0, 0);
    s_lo[r] = range.x;
    s_hi[r] = range.y;
  }
  __syncthreads();
  int lo = it.kv_hi, hi = it.kv_lo;
  bool seen = false;
  for (int r = 0; r < kRows; ++r) {
    if (s_lo[r] < s_hi[r]) {
      lo = min(lo, s_lo[r]);
      hi = max(hi, s_hi[r]);
      seen = true;
    }
  }
  it.kv_lo = seen ? lo : it.kv_lo;
  it.kv_hi = seen ? hi : it.kv_lo;
}

// Offset of (partial slot, head) of query row r of the item in part_lse (times head_dim: part_o).
__device__ __forceinline__ int64_t partial_index(const TreeAttentionParams& p, const WorkItem& it, int row, int group,
                                                 int kv_head) {
  return (static_cast<int64_t>(it.out_base) + row / group) * p.num_q_heads + kv_head * group + row % group;
}

template <typename T, int kHeadDim, int kWarpsM>
struct MmaConfig {
  static constexpr int kThreads = 128;
  static constexpr int kWarpsN = 4 / kWarpsM;
  static constexpr int kBlockM = 16 * kWarpsM;
  // 64-token KV blocks; 32 at head_dim 256 keeps double-buffered K/V + Q at 96 KiB.
  static constexpr int kBlockN = kHeadDim == 256 ? 32 : 64;
  static constexpr int kWarpTokens = kBlockN / kWarpsN;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kHeadDim * static_cast<int>(sizeof(T));
  static_assert(kWarpsM == 1 || kWarpsM == 2 || kWarpsM == 4, "4 warps split as kWarpsM x kWarpsN");
  static_assert(kWarpTokens % 16 == 0, "each warp's token slice must be a multiple of the mma k (16)");
  // The epilogue stages kWarpsN x kBlockM x kHeadDim fp32 states in the K/V buffers.
  static_assert(kWarpsN * kBlockM * kHeadDim * 4 <= 4 * kBlockN * kHeadDim * static_cast<int>(sizeof(T)),
                "epilogue staging must fit the K/V buffers");
};

template <typename T, int kHeadDim, int kWarpsM, bool kVariant>
__global__ void __launch_bounds__(128) tree_attention_partial_mma_kernel(const TreeAttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async / bf16 mma need sm_80; the launcher never picks this path below it.
#else
  using Cfg = MmaConfig<T, kHeadDim, kWarpsM>;
  constexpr int D = kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, WN = Cfg::kWarpTokens, CH = Cfg::kChunks;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* s_k = s_q + BM * D;                    // [2][BN][D]
  T* s_v = s_k + 2 * BN * D;                // [2][BN][D]
  __shared__ float s_row_max[Cfg::kWarpsN][BM];
  __shared__ float s_row_sum[Cfg::kWarpsN][BM];

  __shared__ int s_row_lo[kVariant ? BM : 1];  // each row's visible tokens (masking by position)
  __shared__ int s_row_hi[kVariant ? BM : 1];

  const int group = p.num_q_heads / p.num_kv_heads;
  const int kv_head = blockIdx.y;
  const int row0 = blockIdx.z * BM;
  WorkItem it = load_work_item(p, blockIdx.x, group);
  if (row0 >= it.rows) return;
  const bool positions = kVariant && p.q_pos != nullptr;
  if (positions) visible_rows<BM>(p, it, row0, group, s_row_lo, s_row_hi);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);

  for (int i = tid; i < BM * CH; i += Cfg::kThreads) {
    const int r = i / CH, c = i % CH;
    const bool valid = row0 + r < it.rows;
    const T* src = valid ? q + query_offset(p, it, row0 + r, group, kv_head) + c * 8 : q;
    cp_async_16(s_q + swizzled_offset<CH>(r, c), src, valid);
  }
  auto load_kv_block = [&](int block, int stage) {
    const int tok0 = it.kv_lo + block * BN;
    T* dst_k = s_k + stage * BN * D;
    T* dst_v = s_v + stage * BN * D;
    for (int i = tid; i < BN * CH; i += Cfg::kThreads) {
      const int r = i / CH, c = i % CH, t = tok0 + r;
      const bool valid = t < it.kv_hi;
      const T* src_k = k_cache;
      const T* src_v = v_cache;
      if (valid) {
        src_k += token_offset(it, t, p.page_size, p.k_stride_page, p.k_stride_token, p.k_stride_head, kv_head) + c * 8;
        src_v += token_offset(it, t, p.page_size, p.v_stride_page, p.v_stride_token, p.v_stride_head, kv_head) + c * 8;
      }
      cp_async_16(dst_k + swizzled_offset<CH>(r, c), src_k, valid);
      cp_async_16(dst_v + swizzled_offset<CH>(r, c), src_v, valid);
    }
  };

  const int num_tokens = it.kv_hi - it.kv_lo;
  const int num_blocks = num_tokens > 0 ? (num_tokens + BN - 1) / BN : 0;
  if (num_blocks > 0) load_kv_block(0, 0);
  cp_async_commit();  // group 0: Q and KV block 0

  // Lane (g = lane / 4, t4 = lane % 4) owns rows g and g + 8 of the warp's 16 and, per 8-wide
  // n tile, columns 2 * t4 and 2 * t4 + 1 (mma accumulator layout).
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  int row_lo[2], row_hi[2];  // tokens the lane's rows g and g + 8 see
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_m * 16 + lane / 4 + 8 * i;
    row_lo[i] = positions ? s_row_lo[r] : it.kv_lo;
    row_hi[i] = positions ? s_row_hi[r] : it.kv_hi;
  }
  const float scale_log2 = p.sm_scale * kLog2e;
  const bool capped = kVariant && p.softcap > 0.f;
  const float cap_log2 = p.softcap * kLog2e, inv_cap_log2 = capped ? 1.f / cap_log2 : 0.f;

  for (int blk = 0; blk < num_blocks; ++blk) {
    const int stage = blk & 1;
    if (blk + 1 < num_blocks) {
      load_kv_block(blk + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = s_k + stage * BN * D;
    const T* v_tile = s_v + stage * BN * D;

    // S = Q K^T for the warp's 16 rows x WN tokens.
    float s[WN / 8][4];
#pragma unroll
    for (int i = 0; i < WN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      const int q_row = warp_m * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
      ldmatrix_x4(a, s_q + swizzled_offset<CH>(q_row, 2 * kk + lane / 16));
#pragma unroll
      for (int nn = 0; nn < WN / 16; ++nn) {
        uint32_t b[4];
        const int k_row = warp_n * WN + nn * 16 + (lane % 8) + 8 * (lane / 16);
        ldmatrix_x4(b, k_tile + swizzled_offset<CH>(k_row, 2 * kk + (lane / 8) % 2));
        mma_16816<T>(s[2 * nn], a, b[0], b[1]);
        mma_16816<T>(s[2 * nn + 1], a, b[2], b[3]);
      }
    }

    // Online softmax in the log2 domain; tokens a row does not see (past the item's end, outside its
    // visible range) are -inf, and a row may see none of a block (ref below keeps exp2 finite).
    const int tok_base = it.kv_lo + blk * BN + warp_n * WN + 2 * (lane % 4);
    float blk_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < WN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = tok_base + nt * 8 + (e % 2);
        float x = s[nt][e] * scale_log2;
        if (capped) x = cap_log2 * tanhf(x * inv_cap_log2);
        s[nt][e] = tok >= row_lo[e / 2] && tok < row_hi[e / 2] ? x : -INFINITY;
        blk_max[e / 2] = fmaxf(blk_max[e / 2], s[nt][e]);
      }
    }
    float ref[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      blk_max[i] = fmaxf(blk_max[i], __shfl_xor_sync(0xffffffffu, blk_max[i], 1));
      blk_max[i] = fmaxf(blk_max[i], __shfl_xor_sync(0xffffffffu, blk_max[i], 2));
      const float new_max = fmaxf(row_max[i], blk_max[i]);
      ref[i] = new_max == -INFINITY ? 0.f : new_max;  // all masked so far: keep exp2 finite
      const float alpha = exp2f(row_max[i] - ref[i]);
      row_max[i] = new_max;
      row_sum[i] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][2 * i] *= alpha;
        acc[dt][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < WN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - ref[e / 2]);
        row_sum[e / 2] += s[nt][e];
      }
    }

    // O += P V: the S accumulators of two n tiles are exactly the A fragment of one k step.
#pragma unroll
    for (int kk = 0; kk < WN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const int v_row = warp_n * WN + kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + swizzled_offset<CH>(v_row, 2 * dn + lane / 16));
        mma_16816<T>(acc[2 * dn], a, b[0], b[1]);
        mma_16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Merge the kWarpsN token-slice states of each row through shared memory (the K/V
  // buffers are free now) and write normalised partials.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);
  }
  cp_async_wait<0>();
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(s_k);  // [kWarpsN][BM][D]
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp_m * 16 + g + 8 * i;
    if (t4 == 0) {
      s_row_max[warp_n][r] = row_max[i];
      s_row_sum[warp_n][r] = row_sum[i];
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<float2*>(s_o + (warp_n * BM + r) * D + dt * 8 + 2 * t4) =
          make_float2(acc[dt][2 * i], acc[dt][2 * i + 1]);
    }
  }
  __syncthreads();
  for (int i = tid; i < BM * (D / 4); i += Cfg::kThreads) {
    const int r = i / (D / 4), c4 = i % (D / 4);
    if (row0 + r >= it.rows) break;  // rows are contiguous in i
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsN; ++w) m = fmaxf(m, s_row_max[w][r]);
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    float l = 0.f;
    if (m != -INFINITY) {
#pragma unroll
      for (int w = 0; w < Cfg::kWarpsN; ++w) {
        const float f = exp2f(s_row_max[w][r] - m);
        const float4 x = *reinterpret_cast<const float4*>(s_o + (w * BM + r) * D + c4 * 4);
        l += f * s_row_sum[w][r];
        o.x += f * x.x;
        o.y += f * x.y;
        o.z += f * x.z;
        o.w += f * x.w;
      }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t idx = partial_index(p, it, row0 + r, group, kv_head);
    *reinterpret_cast<float4*>(p.part_o + idx * D + c4 * 4) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    if (c4 == 0) p.part_lse[idx] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
#endif
}

// SIMT path: 16 query rows per program (4 per warp), 32-token KV blocks staged as fp32 in
// shared memory; lane i scores token i, then owns head-dim elements lane + 32 j of the output.
constexpr int kSimtRows = 16;
constexpr int kSimtRowsPerWarp = 4;
constexpr int kSimtBlockN = 32;

inline int simt_smem_bytes(int head_dim) {
  return (kSimtRows * head_dim + kSimtBlockN * (head_dim + 1) + kSimtBlockN * head_dim) * 4;
}

template <typename T, bool kVariant>
__global__ void __launch_bounds__(128) tree_attention_partial_simt_kernel(const TreeAttentionParams p) {
  constexpr int kPerLane = kMaxHeadDim / 32;
  extern __shared__ float smem_f[];
  const int D = p.head_dim, ld_k = D + 1;  // +1: lanes read different K rows conflict-free
  float* s_q = smem_f;                     // [kSimtRows][D], pre-scaled by sm_scale * log2(e)
  float* s_k = s_q + kSimtRows * D;        // [kSimtBlockN][D + 1]
  float* s_v = s_k + kSimtBlockN * ld_k;   // [kSimtBlockN][D]

  __shared__ int s_row_lo[kVariant ? kSimtRows : 1];  // each row's visible tokens (masking by position)
  __shared__ int s_row_hi[kVariant ? kSimtRows : 1];

  const int group = p.num_q_heads / p.num_kv_heads;
  const int kv_head = blockIdx.y;
  const int row0 = blockIdx.z * kSimtRows;
  WorkItem it = load_work_item(p, blockIdx.x, group);
  if (row0 >= it.rows) return;
  const bool positions = kVariant && p.q_pos != nullptr;
  if (positions) visible_rows<kSimtRows>(p, it, row0, group, s_row_lo, s_row_hi);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const float scale_log2 = p.sm_scale * kLog2e;
  const bool capped = kVariant && p.softcap > 0.f;
  const float cap_log2 = p.softcap * kLog2e, inv_cap_log2 = capped ? 1.f / cap_log2 : 0.f;

  for (int i = tid; i < kSimtRows * D; i += 128) {
    const int r = i / D, d = i % D;
    s_q[i] = row0 + r < it.rows ? to_float(q[query_offset(p, it, row0 + r, group, kv_head) + d]) * scale_log2 : 0.f;
  }
  float acc[kSimtRowsPerWarp][kPerLane];
  float row_max[kSimtRowsPerWarp], row_sum[kSimtRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kSimtRowsPerWarp; ++rr) {
    row_max[rr] = -INFINITY;
    row_sum[rr] = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[rr][j] = 0.f;
  }

  for (int tok0 = it.kv_lo; tok0 < it.kv_hi; tok0 += kSimtBlockN) {
    __syncthreads();  // the previous block's readers are done (and s_q is written)
    for (int i = tid; i < kSimtBlockN * D; i += 128) {
      const int r = i / D, d = i % D, t = tok0 + r;
      float kx = 0.f, vx = 0.f;
      if (t < it.kv_hi) {
        kx = to_float(k_cache[token_offset(it, t, p.page_size, p.k_stride_page, p.k_stride_token, p.k_stride_head,
                                           kv_head) + d]);
        vx = to_float(v_cache[token_offset(it, t, p.page_size, p.v_stride_page, p.v_stride_token, p.v_stride_head,
                                           kv_head) + d]);
      }
      s_k[r * ld_k + d] = kx;
      s_v[r * D + d] = vx;
    }
    __syncthreads();
    const int tok = tok0 + lane;
#pragma unroll
    for (int rr = 0; rr < kSimtRowsPerWarp; ++rr) {
      const int r = warp * kSimtRowsPerWarp + rr;
      if (row0 + r >= it.rows) break;  // warp-uniform
      float score = 0.f;
      for (int d = 0; d < D; ++d) score += s_q[r * D + d] * s_k[lane * ld_k + d];
      if (capped) score = cap_log2 * tanhf(score * inv_cap_log2);
      const bool token_valid = positions ? tok >= s_row_lo[r] && tok < s_row_hi[r] : tok < it.kv_hi;
      score = token_valid ? score : -INFINITY;
      const float new_max = fmaxf(row_max[rr], warp_max(score));
      const float ref = new_max == -INFINITY ? 0.f : new_max;
      const float alpha = exp2f(row_max[rr] - ref);
      const float prob = exp2f(score - ref);
      row_max[rr] = new_max;
      row_sum[rr] = row_sum[rr] * alpha + warp_sum(prob);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) acc[rr][j] *= alpha;
      for (int t = 0; t < kSimtBlockN; ++t) {
        const float pt = __shfl_sync(0xffffffffu, prob, t);
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int d = lane + 32 * j;
          if (d < D) acc[rr][j] += pt * s_v[t * D + d];
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kSimtRowsPerWarp; ++rr) {
    const int r = warp * kSimtRowsPerWarp + rr;
    if (row0 + r >= it.rows) break;
    const float l = row_sum[rr];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t idx = partial_index(p, it, row0 + r, group, kv_head);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int d = lane + 32 * j;
      if (d < D) p.part_o[idx * D + d] = acc[rr][j] * inv;
    }
    if (lane == 0) p.part_lse[idx] = l > 0.f ? (row_max[rr] + log2f(l)) * kLn2 : -INFINITY;
  }
}

// The kVariant instance of the kernels: masking by position or softcap in use.
inline bool has_variant(const TreeAttentionParams& p) { return p.q_pos != nullptr || p.softcap > 0.f; }

inline int mma_warps_m(int rows_per_item, int head_dim) {
  const int warps = rows_per_item <= 16 ? 1 : rows_per_item <= 32 ? 2 : 4;
  return head_dim == 256 && warps < 2 ? 2 : warps;  // head_dim 256 uses 32-token blocks
}

template <typename T, int kHeadDim, int kWarpsM>
cudaError_t launch_tree_attention_mma(const TreeAttentionParams& p, cudaStream_t stream) {
  using Cfg = MmaConfig<T, kHeadDim, kWarpsM>;
  const int rows = p.max_work_queries * (p.num_q_heads / p.num_kv_heads);
  if (p.num_work == 0 || rows == 0) return cudaSuccess;
  auto kernel = has_variant(p) ? tree_attention_partial_mma_kernel<T, kHeadDim, kWarpsM, true>
                               : tree_attention_partial_mma_kernel<T, kHeadDim, kWarpsM, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_work, p.num_kv_heads, ceil_div(rows, Cfg::kBlockM));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Tensor-core launcher for one (dtype, head_dim): picks kWarpsM from the rows per item.
// Explicitly instantiated in csrc/cuda/tree_attention_<dtype>_hd<D>.cu.
template <typename T, int kHeadDim>
cudaError_t launch_tree_attention_mma_dispatch(const TreeAttentionParams& p, cudaStream_t stream) {
  const int rows = p.max_work_queries * (p.num_q_heads / p.num_kv_heads);
  switch (mma_warps_m(rows, kHeadDim)) {
    case 1:
      if constexpr (kHeadDim != 256) return launch_tree_attention_mma<T, kHeadDim, 1>(p, stream);
      break;
    case 2:
      return launch_tree_attention_mma<T, kHeadDim, 2>(p, stream);
    default:
      return launch_tree_attention_mma<T, kHeadDim, 4>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_tree_attention_simt(const TreeAttentionParams& p, cudaStream_t stream) {
  const int rows = p.max_work_queries * (p.num_q_heads / p.num_kv_heads);
  if (p.num_work == 0 || rows == 0) return cudaSuccess;
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const int smem = simt_smem_bytes(p.head_dim);
  auto kernel = has_variant(p) ? tree_attention_partial_simt_kernel<T, true> : tree_attention_partial_simt_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_work, p.num_kv_heads, ceil_div(rows, kSimtRows));
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace o1k
