"""Triton backend of `o1kernels.step_rewards`: gather-free step scoring in two kernels.

1. `_step_logits_kernel`, grid (m programs, Hm chunks): the step rows are found on the
   device from `rank = cumsum(step_mask)` (one torch.cumsum): the token of step r is the
   first t with rank[t] > r, found by a vectorised binary search, so no index list is
   built on the host and nothing syncs. Each program walks tiles of BLOCK_M steps
   (persistent loop up to the device-side step count), loads their hidden rows straight
   from `hidden`, applies RMSNorm in fp32 and either
   - the head [C, Hd] (one K loop, fp32 dot), storing the tile's logits, or
   - the hidden layer: a [BLOCK_M, BLOCK_N] slice of relu(x @ mlp_weight.T + mlp_bias) by a
     K loop of tl.dot (tensor cores on GPU), immediately multiplied by the matching
     [C, BLOCK_N] slice of the head and atomically added to the tile's logits.
   Neither the gathered rows nor the hidden activations are written to memory; logits
   exist only for step rows ([T, C] fp32 workspace indexed by step rank, because the step
   count is known only on the device; only the hidden-layer path zero-fills it).
2. `_step_aggregate_kernel`, grid (Bs,): per sequence, over its steps in position order,
   adds the head bias, applies softmax/sigmoid, scatters the reward into step_scores
   (pre-filled with NaN) and reduces min/prod/last/mean/max into chain_scores.

All math is fp32 except the hidden layer's dot on GPU when hidden and mlp_weight are both
fp16 or both bf16: then its operands are rounded to that dtype (as the PRM itself computes)
and it runs on tensor cores with fp32 accumulation. Every other dot is IEEE fp32.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_acc(acc, a, b, DOT_FP32: tl.constexpr):
    """acc + a @ b for fp32 `a` and `b` in mlp_weight's dtype."""
    if DOT_FP32:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        # fp16/bf16 operands (hidden and mlp_weight share that dtype): tensor cores.
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _step_logits_kernel(
    hidden_ptr, rank_ptr, norm_w_ptr, mlp_w_ptr, mlp_b_ptr, w_ptr, logits_ptr, token_ptr,
    num_tokens, seq_len, n_search, num_pid_m, hd, hm, num_classes, norm_eps,
    stride_hb, stride_hl, stride_hk, stride_mn, stride_mk, stride_wc, stride_wk,
    HAS_NORM: tl.constexpr, HAS_MLP: tl.constexpr, HAS_MLP_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Logits [S, C] (workspace rows = step ranks) and token of each step rank."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    num_steps = tl.load(rank_ptr + num_tokens - 1).to(tl.int64)
    for tile in range(pid_m, tl.cdiv(num_steps, BLOCK_M), num_pid_m):
        ranks = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        valid = ranks < num_steps
        # Token of step r: the first t with rank[t] > r (rank is the inclusive cumsum of the mask).
        lo = tl.zeros([BLOCK_M], tl.int64)
        hi = tl.zeros([BLOCK_M], tl.int64) + (num_tokens - 1)
        for _ in range(n_search):
            mid = lo + (hi - lo) // 2
            above = tl.load(rank_ptr + mid) > ranks
            hi = tl.where(above, mid, hi)
            lo = tl.where(above, lo, mid + 1)
        token = lo
        row_ptr = hidden_ptr + (token // seq_len) * stride_hb + (token % seq_len) * stride_hl

        rstd = tl.full([BLOCK_M], 1.0, tl.float32)
        if HAS_NORM:
            sum_sq = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, hd, BLOCK_K):
                kk = k0 + offs_k
                h = tl.load(row_ptr[:, None] + kk[None, :] * stride_hk,
                            mask=valid[:, None] & (kk[None, :] < hd), other=0.0).to(tl.float32)
                sum_sq += tl.sum(h * h, axis=1)
            rstd = tl.rsqrt(sum_sq / hd + norm_eps)

        if HAS_MLP:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for k0 in range(0, hd, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < hd
            x = tl.load(row_ptr[:, None] + kk[None, :] * stride_hk,
                        mask=valid[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if HAS_NORM:
                nw = tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                x = x * rstd[:, None] * nw[None, :]
            if HAS_MLP:
                w1_t = tl.load(mlp_w_ptr + offs_n[None, :] * stride_mn + kk[:, None] * stride_mk,
                               mask=(offs_n[None, :] < hm) & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
                acc = _dot_acc(acc, x, w1_t, DOT_FP32)
            else:
                w_t = tl.load(w_ptr + offs_c[None, :] * stride_wc + kk[:, None] * stride_wk,
                              mask=(offs_c[None, :] < num_classes) & k_ok[:, None], other=0.0)
                acc = tl.dot(x, w_t.to(tl.float32), acc, input_precision="ieee")

        out_ptr = logits_ptr + ranks[:, None] * num_classes + offs_c[None, :]
        out_mask = valid[:, None] & (offs_c[None, :] < num_classes)
        if HAS_MLP:
            if HAS_MLP_BIAS:
                acc += tl.load(mlp_b_ptr + offs_n, mask=offs_n < hm, other=0.0).to(tl.float32)[None, :]
            act = tl.maximum(acc, 0.0)
            w2_t = tl.load(w_ptr + offs_c[None, :] * stride_wc + offs_n[:, None] * stride_wk,
                           mask=(offs_c[None, :] < num_classes) & (offs_n[:, None] < hm), other=0.0)
            part = tl.dot(act, w2_t.to(tl.float32), input_precision="ieee")  # [BLOCK_M, BLOCK_C]
            tl.atomic_add(out_ptr, part, mask=out_mask)
        else:
            tl.store(out_ptr, acc, mask=out_mask)
        if pid_n == 0:
            tl.store(token_ptr + ranks, token, mask=valid)


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _step_aggregate_kernel(
    logits_ptr, bias_ptr, rank_ptr, token_ptr, cu_seqlens_ptr, scores_ptr, chain_ptr,
    num_tokens, seq_len, num_classes, positive_index,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, AGGREGATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rewards of sequence b's steps -> step_scores (scattered) and chain_scores[b]."""
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        # Clamped so that bad cu_seqlens values (not checked on GPU) never read out of bounds.
        start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b).to(tl.int64), 0), num_tokens)
        end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b + 1).to(tl.int64), start), num_tokens)
    else:
        start = b * seq_len
        end = start + seq_len
    # Steps before token t: rank[t - 1] (0 for t = 0).
    r0 = tl.load(rank_ptr + tl.maximum(start - 1, 0), mask=start > 0, other=0).to(tl.int64)
    r1 = tl.load(rank_ptr + tl.maximum(end - 1, 0), mask=end > 0, other=0).to(tl.int64)
    r1 = tl.maximum(r1, r0)

    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_classes
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if AGGREGATE == "min":
        agg = float("inf")
    elif AGGREGATE == "max":
        agg = float("-inf")
    elif AGGREGATE == "prod":
        agg = 1.0
    else:
        agg = 0.0
    for r_start in range(r0, r1, BLOCK_R):
        ranks = r_start + tl.arange(0, BLOCK_R)
        valid = ranks < r1
        logits = tl.load(logits_ptr + ranks[:, None] * num_classes + offs_c[None, :],
                         mask=valid[:, None] & c_ok[None, :], other=0.0)
        if HAS_BIAS:
            logits += bias[None, :]
        if ACTIVATION == "softmax":
            logits = tl.where(c_ok[None, :], logits, float("-inf"))
            e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            reward = tl.sum(tl.where(offs_c[None, :] == positive_index, e, 0.0), axis=1) / tl.sum(e, axis=1)
        else:
            reward = 1.0 / (1.0 + tl.exp(-tl.sum(tl.where(offs_c[None, :] == 0, logits, 0.0), axis=1)))
        token = tl.load(token_ptr + ranks, mask=valid, other=0)
        tl.store(scores_ptr + token, reward, mask=valid)
        if AGGREGATE == "min":
            agg = tl.minimum(agg, tl.min(tl.where(valid, reward, float("inf")), axis=0))
        elif AGGREGATE == "max":
            agg = tl.maximum(agg, tl.max(tl.where(valid, reward, float("-inf")), axis=0))
        elif AGGREGATE == "prod":
            agg = agg * tl.reduce(tl.where(valid, reward, 1.0), 0, _mul)
        elif AGGREGATE == "mean":
            agg = agg + tl.sum(tl.where(valid, reward, 0.0), axis=0)
        else:  # last
            agg = agg + tl.sum(tl.where(ranks == r1 - 1, reward, 0.0), axis=0)
    count = r1 - r0
    if AGGREGATE == "mean":
        agg = agg / tl.maximum(count, 1).to(tl.float32)
    tl.store(chain_ptr + b, tl.where(count > 0, agg, float("nan")))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(device: torch.device, has_mlp: bool) -> dict:
    """Block sizes and program-count cap. GPU values are untuned starting points (no GPU
    was available when this was written); CPU values keep the interpreter's loops short."""
    if device.type == "cuda":
        blocks = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3) if has_mlp else \
            dict(BLOCK_M=32, BLOCK_K=128, BLOCK_N=16, num_warps=4, num_stages=2)
        return dict(blocks, programs=4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()),
                    BLOCK_R=128)
    return dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=32, num_warps=1, num_stages=1, programs=4, BLOCK_R=16)


def step_rewards_triton(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                        activation, positive_index, aggregate):
    """Triton backend; arguments as documented in o1kernels.step_rewards. No host sync."""
    device = hidden.device
    packed = cu_seqlens is not None
    # The kernels index 1-D vectors with unit stride: a strided view (norm_weight[:, 0], cu_seqlens[::2]) would
    # be read wrongly. .contiguous() is free for the usual contiguous tensors.
    norm_weight, bias, mlp_bias, cu_seqlens = (None if t is None else t.contiguous()
                                               for t in (norm_weight, bias, mlp_bias, cu_seqlens))
    num_tokens = step_mask.numel()
    num_seqs = cu_seqlens.numel() - 1 if packed else step_mask.shape[0]
    num_classes = weight.shape[0]
    step_scores = torch.full((num_tokens,), float("nan"), dtype=torch.float32, device=device)
    chain_scores = torch.full((num_seqs,), float("nan"), dtype=torch.float32, device=device)
    if num_tokens == 0 or num_seqs == 0:
        return step_scores.reshape(step_mask.shape), chain_scores

    if packed:
        seq_len, (stride_hl, stride_hk), stride_hb = num_tokens, hidden.stride(), 0
    else:
        seq_len, (stride_hb, stride_hl, stride_hk) = step_mask.shape[1], hidden.stride()
    index_dtype = torch.int32 if num_tokens < 2**31 else torch.int64
    rank = torch.cumsum(step_mask.reshape(-1), 0, dtype=index_dtype)
    token = torch.empty(num_tokens, dtype=index_dtype, device=device)
    has_mlp = mlp_weight is not None
    # The hidden layer's slices are summed atomically, so its workspace starts at zero.
    logits = (torch.zeros if has_mlp else torch.empty)((num_tokens, num_classes), dtype=torch.float32, device=device)

    cfg = _launch_config(device, has_mlp)
    block_c = max(16, triton.next_power_of_2(num_classes))
    hd = hidden.shape[-1]
    hm = mlp_weight.shape[0] if has_mlp else 1
    num_n = triton.cdiv(hm, cfg["BLOCK_N"]) if has_mlp else 1
    num_m = max(1, min(triton.cdiv(num_tokens, cfg["BLOCK_M"]), cfg["programs"] // num_n))
    mlp_w = mlp_weight if has_mlp else weight  # placeholder pointers for absent tensors are never read
    # DOT_FP32: the hidden layer's dot takes fp32 operands (IEEE) unless hidden and mlp_weight
    # share a 16-bit dtype on a GPU. Always on the CPU: Triton's interpreter computes tl.dot on
    # bf16 operands wrongly (numpy has no bf16), fp32 dots are right.
    dot_fp32 = device.type == "cpu" or not has_mlp or hidden.dtype == torch.float32 or mlp_weight.dtype != hidden.dtype
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _step_logits_kernel[(num_m, num_n)](
            hidden, rank, norm_weight if norm_weight is not None else weight, mlp_w,
            mlp_bias if mlp_bias is not None else weight, weight, logits, token,
            num_tokens, seq_len, max(num_tokens - 1, 0).bit_length(), num_m, hd, hm, num_classes, norm_eps,
            stride_hb, stride_hl, stride_hk, mlp_w.stride(0), mlp_w.stride(1), weight.stride(0), weight.stride(1),
            HAS_NORM=norm_weight is not None, HAS_MLP=has_mlp, HAS_MLP_BIAS=mlp_bias is not None,
            DOT_FP32=dot_fp32,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], BLOCK_C=block_c,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _step_aggregate_kernel[(num_seqs,)](
            logits, bias if bias is not None else weight, rank, token, cu_seqlens if packed else rank,
            step_scores, chain_scores, num_tokens, seq_len, num_classes, positive_index,
            PACKED=packed, HAS_BIAS=bias is not None, ACTIVATION=activation, AGGREGATE=aggregate,
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=block_c, num_warps=4 if device.type == "cuda" else 1,
        )
    return step_scores.reshape(step_mask.shape), chain_scores
