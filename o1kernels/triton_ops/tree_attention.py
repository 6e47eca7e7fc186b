"""Triton tree attention: a segment-batched partial kernel and a per-query LSE merge kernel.

Partial kernel, grid (num_work * m_tiles, Hkv): a program takes one work item (one kv chunk of one
segment and a tile of that segment's queries) and one kv head. Its M rows are (query, GQA head)
pairs, so the chunk is loaded block by block once (BLOCK_N tokens gathered through the page
table) and multiplied with all of them by tl.dot; online softmax in fp32; it writes one partial
(o, lse) per row. The m-tile index varies fastest so the programs reading one chunk run side by
side and share it through L2. Merge kernel, grid (num_queries, cdiv(Hq, BLOCK_H)): folds each
query's partials by log-sum-exp and writes o (q's dtype) and lse.

Segment lengths are read from a device tensor and clamped into [0, capacity], so items past the
current length write empty partials (lse = -inf) and nothing reads out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge_states import block_d, lse_merge_finish, lse_merge_step, merge_block_heads

LOG2E = 1.4426950408889634


@triton.jit
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr,
    page_table_ptr, seg_page_start_ptr, seg_capacity_ptr, seg_lens_ptr, seg_queries_ptr,
    work_seg_ptr, work_kv_start_ptr, work_kv_end_ptr, work_q_start_ptr, work_q_end_ptr, work_out_ptr,
    page_size, head_dim, num_q_heads, sm_scale_log2,
    stride_qn, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    GROUP: tl.constexpr, M_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """part_o [num_partials, Hq, BLOCK_D-padded to head_dim] and part_lse [num_partials, Hq] are contiguous fp32."""
    item = tl.program_id(0) // M_TILES
    tile = tl.program_id(0) % M_TILES
    kv_head = tl.program_id(1)

    seg = tl.load(work_seg_ptr + item)
    q_lo = tl.load(work_q_start_ptr + item)
    num_rows = (tl.load(work_q_end_ptr + item) - q_lo) * GROUP
    length = tl.minimum(tl.maximum(tl.load(seg_lens_ptr + seg), 0), tl.load(seg_capacity_ptr + seg))
    kv_lo = tl.load(work_kv_start_ptr + item)
    kv_hi = tl.minimum(tl.load(work_kv_end_ptr + item), length)
    if tile * BLOCK_M >= num_rows:  # a spare m-tile of a small item: no kv work, nothing stored
        kv_hi = kv_lo
    page_base = tl.load(seg_page_start_ptr + seg)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    query = tl.load(seg_queries_ptr + q_lo + rows // GROUP, mask=row_ok, other=0).to(tl.int64)
    heads = kv_head * GROUP + rows % GROUP
    q = tl.load(q_ptr + query[:, None] * stride_qn + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # DOT_FP32: set on the CPU, where Triton's interpreter returns garbage from tl.dot on two
    # bfloat16 operands (numpy has no bf16); on CUDA the dots run in the input dtype (tensor cores).
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < kv_hi
        page = tl.load(page_table_ptr + page_base + tokens // page_size, mask=tok_ok, other=0).to(tl.int64)
        slot = tokens % page_size
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + page[:, None] * stride_kp + slot[:, None] * stride_ks + kv_head * stride_kh
                    + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        scores = tl.where(tok_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    part = (tl.load(work_out_ptr + item) + rows // GROUP).to(tl.int64) * num_q_heads + heads
    tl.store(part_o_ptr + part[:, None] * BLOCK_D + dims[None, :], o, mask=row_ok[:, None])
    tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_partials_kernel(
    part_o_ptr, part_lse_ptr, query_slot_indptr_ptr, query_slots_ptr, o_ptr, lse_ptr,
    num_q_heads, head_dim, stride_on, stride_oh, stride_od,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (num_queries, cdiv(Hq, BLOCK_H)): o, lse of one query from its partial slots."""
    query = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    h_ok = heads < num_q_heads
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(tl.load(query_slot_indptr_ptr + query), tl.load(query_slot_indptr_ptr + query + 1)):
        part = tl.load(query_slots_ptr + i).to(tl.int64) * num_q_heads + heads
        lse_i = tl.load(part_lse_ptr + part, mask=h_ok, other=float("-inf"))
        o_i = tl.load(part_o_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=h_ok[:, None], other=0.0)
        m, s, acc = lse_merge_step(m, s, acc, lse_i, o_i)
    o, lse = lse_merge_finish(m, s, acc)
    row = query.to(tl.int64)
    tl.store(o_ptr + row * stride_on + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             o.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & (dims[None, :] < head_dim))
    tl.store(lse_ptr + row * num_q_heads + heads, lse, mask=h_ok)


def check_triton_shapes(head_dim: int) -> None:
    if not 1 <= head_dim <= 256:
        raise ValueError(f"backend 'triton' supports head_dim up to 256, got {head_dim}")


def partial_buffers(num_partials: int, num_q_heads: int, head_dim: int, device):
    """Uninitialised fp32 partial outputs [num_partials, Hq, BLOCK_D] and LSEs [num_partials, Hq]."""
    return (torch.empty(num_partials, num_q_heads, block_d(head_dim), dtype=torch.float32, device=device),
            torch.empty(num_partials, num_q_heads, dtype=torch.float32, device=device))


def launch_partial(q, k_pool, v_pool, part_o, part_lse, page_table, seg_page_start, seg_capacity, seg_lens,
                   seg_queries, work, num_work: int, max_work_queries: int, page_size: int, sm_scale: float):
    """Run the partial kernel over `num_work` items; work = (seg, kv_start, kv_end, q_start, q_end, out)."""
    if num_work == 0 or max_work_queries == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = k_pool.shape[2]
    group = hq // hkv
    rows = max_work_queries * group
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    bd = block_d(d)
    block_n = 64 if bd <= 128 else 32
    m_tiles = triton.cdiv(rows, block_m)
    dot_fp32 = q.device.type == "cpu"
    _partial_attention_kernel[(num_work * m_tiles, hkv)](
        q, k_pool, v_pool, part_o, part_lse,
        page_table, seg_page_start, seg_capacity, seg_lens, seg_queries, *work,
        page_size, d, hq, sm_scale * LOG2E,
        *q.stride(), *k_pool.stride(), *v_pool.stride(),
        GROUP=group, M_TILES=m_tiles, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd,
        DOT_FP32=dot_fp32,
        # fp32 operands: exact fp32 products ("ieee"), not TF32; fp16/bf16 ignore the setting.
        DOT_PRECISION="ieee" if dot_fp32 or q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_m * bd <= 64 * 64 else 8,
    )


def launch_merge(part_o, part_lse, query_slot_indptr, query_slots, o, lse):
    """Merge each query's partial slots into o [NQ, Hq, D] (any float dtype) and lse [NQ, Hq] (contiguous)."""
    nq, hq, d = o.shape
    if nq == 0 or hq == 0:
        return
    block_h = merge_block_heads(hq, d)
    _merge_partials_kernel[(nq, triton.cdiv(hq, block_h))](
        part_o, part_lse, query_slot_indptr, query_slots, o, lse, hq, d, *o.stride(),
        BLOCK_D=block_d(d), BLOCK_H=block_h,
    )


def tree_attention_triton(q, k_cache, v_cache, plan, sm_scale: float):
    """Triton tree_attention (arguments validated by o1kernels.tree_attention); returns (o, lse)."""
    num_q, hq, d = q.shape
    check_triton_shapes(d)
    part_o, part_lse = partial_buffers(plan.num_partials, hq, d, q.device)
    work = (plan.work_seg, plan.work_kv_start, plan.work_kv_end, plan.work_q_start, plan.work_q_end, plan.work_out)
    launch_partial(q, k_cache, v_cache, part_o, part_lse, plan.page_table, plan.seg_page_start, plan.seg_capacity,
                   plan.seg_lens, plan.seg_queries, work, plan.num_work, plan.max_work_queries, plan.page_size, sm_scale)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(num_q, hq, dtype=torch.float32, device=q.device)
    launch_merge(part_o, part_lse, plan.query_slot_indptr, plan.query_slots, o, lse)
    return o, lse
