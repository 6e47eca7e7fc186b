"""Triton backend of `o1kernels.step_rewards`: step rows found and scored on the device, no host sync.

Without a hidden layer (2 launches, no workspace):
  1. `_step_head_kernel`, grid (cdiv(T, BLOCK_T),): program p owns flat tokens [p*BLOCK_T, (p+1)*BLOCK_T).
     It loads that block of the mask, writes NaN at its non-step tokens, ranks the block's steps in
     registers (tl.cumsum) and scores them BLOCK_M rows at a time. One pass over each row (Hd in BLOCK_K
     chunks) accumulates sum(x^2) and the C dots x . (norm_weight * w_c); the RMSNorm factor is a per-row
     scalar, so logits = rsqrt(mean(x^2) + eps) * dots + bias, then softmax/sigmoid -> step_scores.
     The work is spread over T / BLOCK_T programs whatever the batch size; steps are found without
     a global prefix sum.
  2. `_step_finish_kernel`, grid (Bs,): a sequence's rewards in position order -> chain_scores.
With the hidden layer (4 launches):
  1. `_step_count_kernel`: steps per block of BLOCK_T tokens.
  2. `_step_compact_kernel`: block b's first step rank = the sum of the lower blocks' counts (every
     program reads all counts; blocks widen so that there are at most MAX_SCAN_BLOCKS); writes
     token_of_rank and rank_of_token for its steps, zeroes their logits, writes NaN at its non-step
     tokens; block 0 stores the step count S.
  3. `_step_mlp_kernel`: a persistent tiled GEMM over the gathered step rows (M = the S steps of the
     whole batch, N = Hm, K = Hd) on tensor cores when hidden and mlp_weight share a 16-bit dtype. The
     RMSNorm weight is folded into the weight once per weight tensor (`folded_mlp_weight`, cached):
     x_normed @ W^T = rstd * (x @ (W * norm_weight)^T), so A is the raw row and the sum of squares for
     rstd is accumulated from the same A tiles in the K loop (each row is read once). The epilogue
     applies rstd, the bias and relu, multiplies the [BLOCK_M, BLOCK_N] tile by the head's [C, BLOCK_N]
     slice and adds the partial logits atomically (so their last bits depend on the order).
  4. `_step_finish_kernel`: logits + bias -> softmax/sigmoid -> step_scores at the steps, and the
     chain aggregate in position order.

All math is fp32 except the hidden layer's dot on GPU when hidden and mlp_weight are both fp16 or
both bf16: its operands are then the hidden row as stored and W * norm_weight rounded once to that
dtype (as the PRM itself computes in that dtype), on tensor cores with fp32 accumulation. Every
other dot is IEEE fp32 (always on the CPU: the interpreter computes tl.dot on bf16 wrongly).

Launch parameters come from a small table per path and GPU architecture (`LAUNCH_TABLE`; the exact fp32
hidden layer has rows of its own); with O1KERNELS_AUTOTUNE=1 each shape class is timed over
`AUTOTUNE_CANDIDATES` (less those whose shared memory could exceed the GPU's) at its first call outside a
CUDA-graph capture and the fastest is kept (`_tuned_config`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import weakref

import torch
import triton
import triton.language as tl
import triton.testing

from ._target import Target, device_guard, gpu_target


@triton.jit
def _reward(logits, offs_c, num_classes, positive_index, ACTIVATION: tl.constexpr):
    """Reward of each row of logits [R, BLOCK_C] (columns >= num_classes ignored) -> [R] fp32."""
    if ACTIVATION == "softmax":
        logits = tl.where(offs_c[None, :] < num_classes, logits, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        reward = tl.sum(tl.where(offs_c[None, :] == positive_index, e, 0.0), axis=1) / tl.sum(e, axis=1)
    else:
        reward = 1.0 / (1.0 + tl.exp(-tl.sum(tl.where(offs_c[None, :] == 0, logits, 0.0), axis=1)))
    return reward


@triton.jit
def _step_head_kernel(
    hidden_ptr, mask_ptr, norm_w_ptr, w_ptr, bias_ptr, scores_ptr,
    num_tokens, seq_len, hd, num_classes, positive_index, norm_eps,
    stride_hb, stride_hl, stride_hk, stride_wc, stride_wk,
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """step_scores of tokens [pid*BLOCK_T, (pid+1)*BLOCK_T): the reward at steps, NaN elsewhere."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = offs_t < num_tokens
    is_step = tl.load(mask_ptr + offs_t, mask=in_range, other=0) != 0
    tl.store(scores_ptr + offs_t, tl.full([BLOCK_T], float("nan"), tl.float32), mask=in_range & ~is_step)
    steps = is_step.to(tl.int32)
    local_rank = tl.cumsum(steps, 0) - steps  # exclusive rank of each step in the block
    num_local = tl.sum(steps, 0)
    offs_c = tl.arange(0, BLOCK_C)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=offs_c < num_classes, other=0.0).to(tl.float32)
    for m0 in range(0, num_local, BLOCK_M):
        slot = m0 + tl.arange(0, BLOCK_M)
        valid = slot < num_local
        # Token of the block's step `slot`: the one position whose exclusive rank equals it.
        match = is_step[None, :] & (local_rank[None, :] == slot[:, None])
        token = tl.sum(tl.where(match, offs_t[None, :], 0), axis=1)
        row_ptr = hidden_ptr + (token // seq_len) * stride_hb + (token % seq_len) * stride_hl
        dots = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, hd, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < hd
            x = tl.load(row_ptr[:, None] + kk[None, :] * stride_hk, mask=valid[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            if HAS_NORM:
                sum_sq += tl.sum(x * x, axis=1)
                x = x * tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            for c in range(num_classes):
                w = tl.load(w_ptr + c * stride_wc + kk * stride_wk, mask=k_ok, other=0.0).to(tl.float32)
                dots += tl.where(offs_c[None, :] == c, tl.sum(x * w[None, :], axis=1)[:, None], 0.0)
        logits = dots
        if HAS_NORM:
            logits = logits * tl.rsqrt(sum_sq / hd + norm_eps)[:, None]
        if HAS_BIAS:
            logits += bias[None, :]
        tl.store(scores_ptr + token, _reward(logits, offs_c, num_classes, positive_index, ACTIVATION), mask=valid)


@triton.jit
def _step_count_kernel(mask_ptr, count_ptr, num_tokens, BLOCK_T: tl.constexpr):
    """count[pid] = number of steps among tokens [pid*BLOCK_T, (pid+1)*BLOCK_T)."""
    pid = tl.program_id(0)
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    is_step = tl.load(mask_ptr + offs_t, mask=offs_t < num_tokens, other=0) != 0
    tl.store(count_ptr + pid, tl.sum(is_step.to(tl.int32), 0))


@triton.jit
def _step_compact_kernel(
    mask_ptr, count_ptr, num_steps_ptr, token_ptr, rank_ptr, logits_ptr, scores_ptr,
    num_tokens, num_blocks, num_classes,
    BLOCK_T: tl.constexpr, NUM_BLOCKS_POW2: tl.constexpr,
):
    """Ranks of block pid's steps (position order over the whole batch): token_of_rank, rank_of_token,
    zeroed logits rows, NaN step_scores at its non-step tokens; block 0 also stores the step count."""
    pid = tl.program_id(0)
    blocks = tl.arange(0, NUM_BLOCKS_POW2)
    counts = tl.load(count_ptr + blocks, mask=blocks < num_blocks, other=0)
    first_rank = tl.sum(tl.where(blocks < pid, counts, 0), 0)
    if pid == 0:
        tl.store(num_steps_ptr, tl.sum(counts, 0))
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = offs_t < num_tokens
    is_step = tl.load(mask_ptr + offs_t, mask=in_range, other=0) != 0
    tl.store(scores_ptr + offs_t, tl.full([BLOCK_T], float("nan"), tl.float32), mask=in_range & ~is_step)
    steps = is_step.to(tl.int32)
    rank = first_rank + tl.cumsum(steps, 0) - steps
    tl.store(token_ptr + rank, offs_t.to(token_ptr.dtype.element_ty), mask=is_step)
    tl.store(rank_ptr + offs_t, rank.to(rank_ptr.dtype.element_ty), mask=is_step)
    row_ptr = logits_ptr + rank.to(tl.int64) * num_classes
    for c in range(num_classes):
        tl.store(row_ptr + c, tl.zeros([BLOCK_T], tl.float32), mask=is_step)


@triton.jit
def _step_mlp_kernel(
    hidden_ptr, token_ptr, num_steps_ptr, mlp_w_ptr, mlp_b_ptr, w_ptr, logits_ptr,
    seq_len, hd, hm, num_classes, norm_eps, num_programs,
    stride_hb, stride_hl, stride_hk, stride_mn, stride_mk, stride_wc, stride_wk,
    HAS_NORM: tl.constexpr, HAS_MLP_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """logits[rank] += relu(rstd * (x @ mlp_w^T) + mlp_b)[:, tile] @ w[:, tile]^T over (row tile, unit tile) pairs.

    mlp_w is [Hm, Hd] with the RMSNorm weight folded in; x are the raw step rows; rstd comes from the sum
    of squares of the same A tiles. Persistent: the tile count depends on the device-side step count.
    """
    num_steps = tl.load(num_steps_ptr)
    num_m = tl.cdiv(num_steps, BLOCK_M)
    num_n = tl.cdiv(hm, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    for tile in range(tl.program_id(0), num_m * num_n, num_programs):
        # GROUP_M row tiles run next to each other over the unit tiles: they share mlp_w columns in L2.
        first_m = (tile // tiles_per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_m
        pid_n = (tile % tiles_per_group) // group_m

        ranks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = ranks < num_steps
        token = tl.load(token_ptr + ranks, mask=valid, other=0).to(tl.int64)
        row_ptr = hidden_ptr + (token // seq_len) * stride_hb + (token % seq_len) * stride_hl
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hm
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, hd, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                a = tl.load(row_ptr[:, None] + kk[None, :] * stride_hk, mask=valid[:, None], other=0.0)
                b = tl.load(mlp_w_ptr + offs_n[None, :] * stride_mn + kk[:, None] * stride_mk, mask=n_ok[None, :],
                            other=0.0)
            else:
                k_ok = kk < hd
                a = tl.load(row_ptr[:, None] + kk[None, :] * stride_hk, mask=valid[:, None] & k_ok[None, :],
                            other=0.0)
                b = tl.load(mlp_w_ptr + offs_n[None, :] * stride_mn + kk[:, None] * stride_mk,
                            mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if HAS_NORM:
                a32 = a.to(tl.float32)
                sum_sq += tl.sum(a32 * a32, axis=1)
            # Written out here, not as a jit helper: the interpreter pays milliseconds per helper call.
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)  # both fp16 or both bf16: tensor cores, fp32 accumulation
        if HAS_NORM:
            acc = acc * tl.rsqrt(sum_sq / hd + norm_eps)[:, None]
        if HAS_MLP_BIAS:
            acc += tl.load(mlp_b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        act = tl.maximum(acc, 0.0)
        out_ptr = logits_ptr + ranks.to(tl.int64) * num_classes
        for c in range(num_classes):
            w2 = tl.load(w_ptr + c * stride_wc + offs_n * stride_wk, mask=n_ok, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + c, tl.sum(act * w2[None, :], axis=1), mask=valid, sem="relaxed")


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _step_finish_kernel(
    mask_ptr, cu_seqlens_ptr, logits_ptr, rank_ptr, bias_ptr, scores_ptr, chain_ptr,
    num_tokens, seq_len, num_classes, positive_index,
    PACKED: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    AGGREGATE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """chain_scores[b] from sequence b's rewards in position order. FROM_LOGITS: rewards come from the
    hidden-layer logits (bias + activation here) and are written to step_scores; otherwise the head kernel
    wrote them and they are only read. (NaN at non-step tokens comes from the block kernels, so every
    entry is written whatever cu_seqlens holds.)"""
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        # Clamped so that bad cu_seqlens values (not checked on GPU) never read out of bounds.
        start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b).to(tl.int64), 0), num_tokens)
        end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b + 1).to(tl.int64), start), num_tokens)
    else:
        start = b * seq_len
        end = start + seq_len
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_classes
    if FROM_LOGITS and HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if AGGREGATE == "min":
        agg = float("inf")
    elif AGGREGATE == "max":
        agg = float("-inf")
    elif AGGREGATE == "prod":
        agg = 1.0
    else:
        agg = 0.0
    count = 0
    for p0 in range(start, end, BLOCK_A):
        offs = p0 + tl.arange(0, BLOCK_A)
        in_seq = offs < end
        is_step = tl.load(mask_ptr + offs, mask=in_seq, other=0) != 0
        if FROM_LOGITS:
            rank = tl.load(rank_ptr + offs, mask=is_step, other=0).to(tl.int64)
            logits = tl.load(logits_ptr + rank[:, None] * num_classes + offs_c[None, :],
                             mask=is_step[:, None] & c_ok[None, :], other=0.0)
            if HAS_BIAS:
                logits += bias[None, :]
            reward = _reward(logits, offs_c, num_classes, positive_index, ACTIVATION)
            tl.store(scores_ptr + offs, reward, mask=is_step)
        else:
            reward = tl.load(scores_ptr + offs, mask=is_step, other=0.0)
        count += tl.sum(is_step.to(tl.int32), 0)
        if AGGREGATE == "min":
            agg = tl.minimum(agg, tl.min(tl.where(is_step, reward, float("inf")), axis=0))
        elif AGGREGATE == "max":
            agg = tl.maximum(agg, tl.max(tl.where(is_step, reward, float("-inf")), axis=0))
        elif AGGREGATE == "prod":
            agg = agg * tl.reduce(tl.where(is_step, reward, 1.0), 0, _mul)
        elif AGGREGATE == "mean":
            agg = agg + tl.sum(tl.where(is_step, reward, 0.0), axis=0)
        else:  # last
            last = tl.max(tl.where(is_step, offs, -1), axis=0)
            agg = tl.where(last >= 0, tl.sum(tl.where(offs == last, reward, 0.0), axis=0), agg)
    if AGGREGATE == "mean":
        agg = agg / tl.maximum(count, 1).to(tl.float32)
    tl.store(chain_ptr + b, tl.where(count > 0, agg, float("nan")))


# ---------------------------------------------------------------- folded hidden-layer weights

@dataclasses.dataclass
class _FoldedWeight:
    refs: tuple          # weak references to (mlp_weight, norm_weight)
    stamp: tuple         # (_version, data_ptr) of both when folded
    folded: torch.Tensor


_FOLDED: dict[tuple, _FoldedWeight] = {}


def _stamp(t: torch.Tensor):
    """What changes when t's values may have changed; None for inference tensors (they keep no version)."""
    if t.is_inference():
        return None
    return t._version, t.data_ptr()


def folded_mlp_weight(mlp_weight: torch.Tensor, norm_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(mlp_weight * norm_weight[None, :]) as a contiguous [Hm, Hd] tensor of `dtype` (product in fp32,
    rounded once), cached per (mlp_weight, norm_weight, dtype).

    The cached tensor is refreshed in place when either weight was changed in place (its _version moved)
    or now points at other memory, and dropped when either is freed. A CUDA graph captured while the entry
    existed reads that tensor, so it sees a changed weight once an eager call has refreshed it (or recapture).
    Not cached: inference tensors (no version counter, so an in-place change could not be seen) and calls
    inside a CUDA-graph capture when the entry is missing or stale (the product is captured into the graph
    and recomputed at every replay; its values exist only after a replay). In-place writes that bypass the
    version counter (through .data or raw pointers) are not seen: call clear_weight_cache() after them.
    """
    key = (id(mlp_weight), id(norm_weight), dtype)
    stamp = (_stamp(mlp_weight), _stamp(norm_weight))
    entry = _FOLDED.get(key)
    same_tensors = entry is not None and entry.refs[0]() is mlp_weight and entry.refs[1]() is norm_weight
    if same_tensors and entry.stamp == stamp and None not in stamp:
        return entry.folded
    with torch.no_grad():
        folded = (mlp_weight.float() * norm_weight.float()[None, :]).to(dtype).contiguous()
        if None in stamp or (mlp_weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return folded
        if same_tensors and entry.folded.shape == folded.shape:
            entry.folded.copy_(folded)  # in place: graphs captured with this tensor read the new values
            entry.stamp = stamp
            return entry.folded
    drop = functools.partial(_drop_folded, key)
    _FOLDED[key] = _FoldedWeight((weakref.ref(mlp_weight, drop), weakref.ref(norm_weight, drop)), stamp, folded)
    return folded


def _drop_folded(key, _ref):
    _FOLDED.pop(key, None)


def clear_weight_cache() -> None:
    """Forget every folded hidden-layer weight (see folded_mlp_weight)."""
    _FOLDED.clear()


# ---------------------------------------------------------------- launch parameters

# Per path and GPU architecture (compute capability major; None = any other), every kernel of the path:
#   head: BLOCK_T tokens per program, BLOCK_M rows per group, BLOCK_K per load of a row;
#   mlp:  SCAN_BLOCK tokens per count/compact program (doubled until there are at most MAX_SCAN_BLOCKS
#         programs, whose counts each compact program reads); GEMM tiles BLOCK_M x BLOCK_N x BLOCK_K, GROUP_M row
#         tiles per L2 group, programs_per_sm persistent programs per SM (CPU: `programs` in all);
#         "mlp" runs the GEMM on tensor cores (hidden and mlp_weight both fp16 or both bf16), "mlp_fp32" in exact
#         fp32 on the FMA units (fp32 hidden, or mixed dtypes), whose operands live in registers: the 16-bit
#         tiles spilled 8-22 KB per thread there (ptxas, sm_90a), so it has smaller tiles of its own;
#   all:  FINISH_BLOCK positions per step of the per-sequence finish kernel, FINISH_WARPS.
# GPU values are starting points chosen from the shapes' arithmetic, not measured yet (no GPU was
# available): head BLOCK_T=512 gives ~1000 programs at Bs=256, L=2048 (all SMs busy, ~2.5 steps each at
# 10 steps per 2048 tokens); mlp 128x128x64 tiles, 4 stages, 8 warps are the usual Hopper wgmma shape.
# The offline sweep (python tools/triton_sweep.py, CI) compiles every row and candidate for sm_90a: the
# rows compile without spills and every candidate within the shared-memory limit. The CPU rows keep the
# interpreter's loops short and make the tests cross block, chunk and group boundaries.
LAUNCH_TABLE = {
    "head": {
        9: dict(BLOCK_T=512, BLOCK_M=8, BLOCK_K=1024, num_warps=4, FINISH_BLOCK=1024, FINISH_WARPS=4),
        None: dict(BLOCK_T=512, BLOCK_M=8, BLOCK_K=512, num_warps=4, FINISH_BLOCK=1024, FINISH_WARPS=4),
        "cpu": dict(BLOCK_T=16, BLOCK_M=4, BLOCK_K=32, num_warps=1, FINISH_BLOCK=16, FINISH_WARPS=1),
    },
    "mlp": {
        9: dict(SCAN_BLOCK=1024, MAX_SCAN_BLOCKS=1024, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                num_warps=8, num_stages=4, programs_per_sm=1, FINISH_BLOCK=1024, FINISH_WARPS=4),
        None: dict(SCAN_BLOCK=1024, MAX_SCAN_BLOCKS=1024, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8,
                   num_warps=4, num_stages=3, programs_per_sm=2, FINISH_BLOCK=1024, FINISH_WARPS=4),
        "cpu": dict(SCAN_BLOCK=16, MAX_SCAN_BLOCKS=1024, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2,
                    num_warps=1, num_stages=1, programs=3, FINISH_BLOCK=16, FINISH_WARPS=1),
    },
    "mlp_fp32": {
        9: dict(SCAN_BLOCK=1024, MAX_SCAN_BLOCKS=1024, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8,
                num_warps=4, num_stages=3, programs_per_sm=4, FINISH_BLOCK=1024, FINISH_WARPS=4),
        None: dict(SCAN_BLOCK=1024, MAX_SCAN_BLOCKS=1024, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8,
                   num_warps=4, num_stages=2, programs_per_sm=4, FINISH_BLOCK=1024, FINISH_WARPS=4),
        "cpu": dict(SCAN_BLOCK=16, MAX_SCAN_BLOCKS=1024, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2,
                    num_warps=1, num_stages=1, programs=3, FINISH_BLOCK=16, FINISH_WARPS=1),
    },
}

# O1KERNELS_AUTOTUNE=1: these variations of the table row are timed at the first call of each shape class (those
# whose shared memory could exceed the GPU's are left out: see tuning_candidates).
AUTOTUNE_CANDIDATES = {
    "head": [dict(BLOCK_T=bt, BLOCK_M=bm, BLOCK_K=bk, num_warps=w)
             for bt, bm, bk, w in ((256, 4, 1024, 4), (512, 8, 1024, 4), (512, 8, 512, 4), (1024, 8, 1024, 8),
                                   (1024, 16, 512, 8), (512, 4, 2048, 8), (2048, 16, 512, 8))],
    "mlp": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s, programs_per_sm=p)
            for bm, bn, bk, w, s, p in ((128, 128, 64, 8, 4, 1), (128, 128, 64, 4, 3, 1), (128, 256, 64, 8, 3, 1),
                                        (64, 256, 64, 4, 4, 1), (64, 128, 64, 4, 4, 2), (128, 64, 64, 4, 4, 2),
                                        (128, 128, 32, 4, 4, 2))],
    "mlp_fp32": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s, programs_per_sm=p)
                 for bm, bn, bk, w, s, p in ((32, 32, 32, 4, 3, 4), (32, 64, 32, 8, 3, 2), (64, 32, 32, 8, 3, 2),
                                             (16, 64, 32, 4, 3, 4), (32, 32, 64, 4, 2, 4))],
}
_TUNED: dict[tuple, dict] = {}


def mlp_shared_bytes(cfg: dict, elem_bytes: int) -> int:
    """Upper bound of the hidden-layer GEMM's shared memory: num_stages buffers of its A and B tiles plus a 16-bit
    tile for the epilogue. The offline sweep checks it against every compiled row and candidate (Triton 3.9,
    sm_90a: 64x256x64 with 4 stages in bf16 allocates 155,648 B; this bound says 196,608)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return cfg["num_stages"] * (bm + bn) * bk * elem_bytes + 2 * bm * bn


def _table_config(path: str, target: Target | None) -> dict:
    table = LAUNCH_TABLE[path]
    return table["cpu"] if target is None else table.get(target.arch, table[None])


def tuning_candidates(path: str, target: Target, elem_bytes: int) -> list[dict]:
    """The table's row updated by each AUTOTUNE_CANDIDATES[path] entry, less those whose shared memory could
    exceed the target's (a launch over the limit raises; one such candidate, 64x256x64 with 4 stages in fp32,
    needs 245,760 B where sm_90 allows 232,448). elem_bytes: the GEMM operands' (head: unused)."""
    table = _table_config(path, target)
    out = [{**table, **c} for c in AUTOTUNE_CANDIDATES[path]]
    if path != "head":
        out = [c for c in out if mlp_shared_bytes(c, elem_bytes) <= target.smem]
    return out


def _autotune_enabled() -> bool:
    return os.environ.get("O1KERNELS_AUTOTUNE", "0") not in ("", "0")


def _tuned_config(path: str, device: torch.device, target: Target | None, elem_bytes: int, shape_key: tuple,
                  run) -> dict:
    """The table's row, or with O1KERNELS_AUTOTUNE=1 on a GPU the fastest of tuning_candidates(path, ...) for this
    shape class, timed once by running the whole op (`run(config)` rewrites every output, so the call that tunes
    returns right results). Never tunes inside a CUDA-graph capture (the table's row is used there)."""
    table = _table_config(path, target)
    if target is None or device.type != "cuda" or not _autotune_enabled():
        return table
    key = (path, target.arch) + shape_key
    if key not in _TUNED:
        if torch.cuda.is_current_stream_capturing():
            return table
        candidates = tuning_candidates(path, target, elem_bytes)
        timings = [(triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=25), i) for i, cfg in enumerate(candidates)]
        _TUNED[key] = candidates[min(timings)[1]]
    return _TUNED[key]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The next power of two >= n (>= 1). Plain int math: triton.next_power_of_2 costs microseconds per call."""
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------- launcher

def step_rewards_triton(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                        activation, positive_index, aggregate, *, config=None):
    """Triton backend; arguments as documented in o1kernels.step_rewards. No host sync.

    config: launch parameters for this call, updating the table's row (None: the table's row or autotune).
    """
    device = hidden.device
    packed = cu_seqlens is not None
    num_tokens = step_mask.numel()
    num_seqs = cu_seqlens.numel() - 1 if packed else step_mask.shape[0]
    step_scores = torch.empty(step_mask.shape, dtype=torch.float32, device=device)  # written as a flat [T]
    chain_scores = torch.empty(num_seqs, dtype=torch.float32, device=device)
    if num_tokens == 0 or num_seqs == 0:
        return step_scores, chain_scores.fill_(float("nan"))

    # The kernels index 1-D vectors with unit stride: a strided view (norm_weight[:, 0], cu_seqlens[::2]) would
    # be read wrongly. .contiguous() is free for the usual contiguous tensors.
    norm_weight, bias, mlp_bias, cu_seqlens = (None if t is None else t.contiguous()
                                               for t in (norm_weight, bias, mlp_bias, cu_seqlens))
    if hidden.shape[-1] == 0:  # the norm of an empty row scales nothing (and its mean of squares is 0 / 0)
        norm_weight = None
    mask = step_mask.contiguous()  # bool, read as bytes at flat token offsets
    if packed:
        seq_len, (stride_hl, stride_hk), stride_hb = num_tokens, hidden.stride(), 0
    else:
        seq_len, (stride_hb, stride_hl, stride_hk) = step_mask.shape[1], hidden.stride()
    hidden_args = (seq_len, stride_hb, stride_hl, stride_hk)
    block_c = max(2, _pow2(weight.shape[0]))
    target = gpu_target(device)
    with device_guard(device):
        if mlp_weight is None:
            def run(cfg):
                _launch_head(hidden, mask, weight, bias, norm_weight, norm_eps, positive_index, activation,
                             step_scores, hidden_args, block_c, cfg)
                _launch_finish(mask, cu_seqlens, None, None, bias, step_scores, chain_scores, seq_len, weight.shape[0],
                               positive_index, activation, aggregate, block_c, cfg)

            shape_key = (hidden.dtype, hidden.shape[-1], weight.shape[0], _pow2(num_tokens))
            path, elem_bytes = "head", hidden.element_size()
        else:
            # Tensor cores when hidden and mlp_weight share a 16-bit dtype on a GPU; the folded weight then has
            # that dtype. Otherwise IEEE fp32 dots (the kernel converts mlp_weight as it loads it when unfolded).
            dot_fp32 = target is None or hidden.dtype == torch.float32 or mlp_weight.dtype != hidden.dtype
            mlp_w = mlp_weight if norm_weight is None else \
                folded_mlp_weight(mlp_weight, norm_weight, torch.float32 if dot_fp32 else hidden.dtype)

            def run(cfg):
                _launch_mlp_pipeline(hidden, mask, cu_seqlens, weight, bias, norm_weight is not None, norm_eps, mlp_w,
                                     mlp_bias, activation, positive_index, aggregate, step_scores, chain_scores,
                                     hidden_args, block_c, dot_fp32, cfg)

            shape_key = (hidden.dtype, mlp_w.dtype, hidden.shape[-1], mlp_weight.shape[0], _pow2(num_tokens))
            path = "mlp_fp32" if dot_fp32 and target is not None else "mlp"
            elem_bytes = 4 if dot_fp32 else hidden.element_size()
        run({**_table_config(path, target), **config} if config else
            _tuned_config(path, device, target, elem_bytes, shape_key, run))
    return step_scores, chain_scores


def _launch_head(hidden, mask, weight, bias, norm_weight, norm_eps, positive_index, activation, step_scores,
                 hidden_args, block_c, cfg):
    seq_len, stride_hb, stride_hl, stride_hk = hidden_args
    num_tokens = mask.numel()
    _step_head_kernel[(_cdiv(num_tokens, cfg["BLOCK_T"]),)](
        hidden, mask, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, step_scores,
        num_tokens, seq_len, hidden.shape[-1], weight.shape[0], positive_index, norm_eps,
        stride_hb, stride_hl, stride_hk, weight.stride(0), weight.stride(1),
        HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, ACTIVATION=activation,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_C=block_c,
        num_warps=cfg["num_warps"],
    )


def _launch_finish(mask, cu_seqlens, logits, rank_of_token, bias, step_scores, chain_scores, seq_len, num_classes,
                   positive_index, activation, aggregate, block_c, cfg):
    """_step_finish_kernel over every sequence; logits None: read the rewards the head kernel wrote."""
    _step_finish_kernel[(chain_scores.numel(),)](
        mask, cu_seqlens if cu_seqlens is not None else mask, logits if logits is not None else step_scores,
        rank_of_token if rank_of_token is not None else mask, bias if bias is not None else step_scores,
        step_scores, chain_scores, mask.numel(), seq_len, num_classes, positive_index,
        PACKED=cu_seqlens is not None, FROM_LOGITS=logits is not None, HAS_BIAS=bias is not None,
        ACTIVATION=activation, AGGREGATE=aggregate, BLOCK_A=cfg["FINISH_BLOCK"], BLOCK_C=block_c,
        num_warps=cfg["FINISH_WARPS"],
    )


def _launch_mlp_pipeline(hidden, mask, cu_seqlens, weight, bias, has_norm, norm_eps, mlp_w, mlp_bias, activation,
                         positive_index, aggregate, step_scores, chain_scores, hidden_args, block_c, dot_fp32, cfg):
    """count -> compact -> tiled hidden-layer GEMM with the head in its epilogue -> finish."""
    device = mask.device
    seq_len, stride_hb, stride_hl, stride_hk = hidden_args
    num_tokens, num_classes = mask.numel(), weight.shape[0]
    hd, hm = hidden.shape[-1], mlp_w.shape[0]
    block_t = max(cfg["SCAN_BLOCK"], _pow2(_cdiv(num_tokens, cfg["MAX_SCAN_BLOCKS"])))
    num_blocks = _cdiv(num_tokens, block_t)
    index_dtype = torch.int32 if num_tokens < 2**31 else torch.int64
    # One allocation: block counts | step count | token of each rank | rank of each step token.
    workspace = torch.empty(num_blocks + 1 + 2 * num_tokens, dtype=index_dtype, device=device)
    counts, num_steps = workspace[:num_blocks], workspace[num_blocks:num_blocks + 1]
    token_of_rank = workspace[num_blocks + 1:num_blocks + 1 + num_tokens]
    rank_of_token = workspace[num_blocks + 1 + num_tokens:]
    logits = torch.empty(num_tokens * num_classes, dtype=torch.float32, device=device)

    _step_count_kernel[(num_blocks,)](mask, counts, num_tokens, BLOCK_T=block_t, num_warps=cfg["FINISH_WARPS"])
    _step_compact_kernel[(num_blocks,)](
        mask, counts, num_steps, token_of_rank, rank_of_token, logits, step_scores, num_tokens, num_blocks,
        num_classes,
        BLOCK_T=block_t, NUM_BLOCKS_POW2=_pow2(num_blocks), num_warps=cfg["FINISH_WARPS"])
    max_tiles = _cdiv(num_tokens, cfg["BLOCK_M"]) * _cdiv(hm, cfg["BLOCK_N"])
    target = gpu_target(device)
    programs = cfg["programs"] if target is None else cfg["programs_per_sm"] * target.sms
    num_programs = max(1, min(max_tiles, programs))
    _step_mlp_kernel[(num_programs,)](
        hidden, token_of_rank, num_steps, mlp_w, mlp_bias if mlp_bias is not None else mlp_w, weight, logits,
        seq_len, hd, hm, num_classes, norm_eps, num_programs,
        stride_hb, stride_hl, stride_hk, mlp_w.stride(0), mlp_w.stride(1), weight.stride(0), weight.stride(1),
        HAS_NORM=has_norm, HAS_MLP_BIAS=mlp_bias is not None, DOT_FP32=dot_fp32, EVEN_K=hd % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _launch_finish(mask, cu_seqlens, logits, rank_of_token, bias, step_scores, chain_scores, seq_len, num_classes,
                   positive_index, activation, aggregate, block_c, cfg)
