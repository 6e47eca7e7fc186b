"""Triton log-sum-exp merging of attention states: the shared merge step and merge_states' kernel.

A state is (m, s, acc) per head: running max LSE m, sum of weights s = sum exp(lse_i - m) and
weighted sum of outputs acc = sum exp(lse_i - m) * o_i. Empty states (lse = -inf) contribute
nothing and a state that stays empty finishes as o = 0, lse = -inf, with no NaN on the way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._target import device_guard


@triton.jit
def lse_merge_step(m, s, acc, lse_i, o_i):
    """Fold one partial (lse_i [BLOCK_H], o_i [BLOCK_H, D] fp32) into the state (m, s, acc)."""
    m_new = tl.maximum(m, lse_i)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    w = tl.exp(lse_i - m_safe)
    return m_new, s * alpha + w, acc * alpha[:, None] + w[:, None] * o_i


@triton.jit
def lse_merge_finish(m, s, acc):
    """Final (o [BLOCK_H, D] fp32, lse [BLOCK_H]) of a merge state."""
    empty = s == 0.0
    o = acc / tl.where(empty, 1.0, s)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, s)))
    return o, lse


@triton.jit
def _merge_states_kernel(
    o_a_ptr, lse_a_ptr, o_b_ptr, lse_b_ptr, o_ptr, lse_ptr,
    num_heads, head_dim,
    stride_an, stride_ah, stride_ad, stride_bn, stride_bh, stride_bd, stride_on, stride_oh, stride_od,
    stride_lan, stride_lah, stride_lbn, stride_lbh, stride_ln, stride_lh,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (N, cdiv(H, BLOCK_H)): merge rows n, heads [BLOCK_H] of states a and b."""
    n = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    h_ok = heads < num_heads
    hd_ok = h_ok[:, None] & (dims[None, :] < head_dim)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    lse_a = tl.load(lse_a_ptr + n * stride_lan + heads * stride_lah, mask=h_ok, other=float("-inf"))
    o_a = tl.load(o_a_ptr + n * stride_an + heads[:, None] * stride_ah + dims[None, :] * stride_ad, mask=hd_ok, other=0.0)
    m, s, acc = lse_merge_step(m, s, acc, lse_a, o_a.to(tl.float32))
    lse_b = tl.load(lse_b_ptr + n * stride_lbn + heads * stride_lbh, mask=h_ok, other=float("-inf"))
    o_b = tl.load(o_b_ptr + n * stride_bn + heads[:, None] * stride_bh + dims[None, :] * stride_bd, mask=hd_ok, other=0.0)
    m, s, acc = lse_merge_step(m, s, acc, lse_b, o_b.to(tl.float32))
    o, lse = lse_merge_finish(m, s, acc)
    tl.store(o_ptr + n * stride_on + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             o.to(o_ptr.dtype.element_ty), mask=hd_ok)
    tl.store(lse_ptr + n * stride_ln + heads * stride_lh, lse, mask=h_ok)


def block_d(head_dim: int) -> int:
    """Padded head_dim of the Triton tiles (a power of two >= 16, as tl.dot needs)."""
    return max(16, triton.next_power_of_2(head_dim))


def merge_block_heads(num_heads: int, head_dim: int) -> int:
    """Heads per merge program: the fp32 accumulator holds at most 2048 values."""
    return min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d(head_dim)))


def merge_states_triton(o_a, lse_a, o_b, lse_b):
    """Triton merge_states (arguments validated by o1kernels.merge_states)."""
    n, h, d = o_a.shape
    o = torch.empty_like(o_a)
    lse = torch.empty(n, h, dtype=torch.float32, device=o_a.device)
    if n == 0 or h == 0:
        return o, lse
    block_h = merge_block_heads(h, d)
    with device_guard(o_a.device):
        _merge_states_kernel[(n, triton.cdiv(h, block_h))](
            o_a, lse_a, o_b, lse_b, o, lse, h, d,
            *o_a.stride(), *o_b.stride(), *o.stride(), *lse_a.stride(), *lse_b.stride(), *lse.stride(),
            BLOCK_D=block_d(d), BLOCK_H=block_h,
        )
    return o, lse
