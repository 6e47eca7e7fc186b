"""Compiled backends "cpu" and "cuda": wrappers over the ops of the extension o1kernels._C.

The extension registers these torch ops (schemas in csrc/torch_bindings/registration.cpp),
all in destination-passing style (outputs allocated here, written in place, nothing returned):
  torch.ops.o1kernels.tree_attention_partial(q, k_cache, v_cache, <plan int32 tensors>,
      max_work_queries, sm_scale, part_o, part_lse)
  torch.ops.o1kernels.merge_partials(part_o, part_lse, query_slot_indptr, query_slots, o, lse)
  torch.ops.o1kernels.merge_states(o_a, lse_a, o_b, lse_b, o, lse)
  torch.ops.o1kernels.step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight,
      norm_eps, mlp_weight, mlp_bias, activation, positive_index, aggregate, step_scores, chain_scores)
Their fake implementations below let torch.compile(fullgraph=True) trace through them; the ops
never synchronise with the host, so a decode step built from them can be captured in a CUDA graph.

The public wrappers take exactly the arguments the op modules pass to their torch backends
after validation (see o1kernels/tree_attention.py, shared_prefix_attention.py,
merge_states.py, step_rewards.py) and return the same outputs.
"""
from __future__ import annotations

import torch

from . import _ext
from .tree_attention import DEFAULT_QUERIES_PER_TILE, TreeAttentionPlan, default_kv_chunk

if _ext._C is None:  # resolve_backend reports the backends unavailable before we get here
    raise ImportError(_ext._IMPORT_ERROR)

_ops = torch.ops.o1kernels


@torch.library.register_fake("o1kernels::tree_attention_partial")
def _tree_attention_partial_fake(q, k_cache, v_cache, page_table, seg_page_start, seg_capacity, seg_lens,
                                 seg_queries, work_seg, work_kv_start, work_kv_end, work_q_start, work_q_end,
                                 work_out, max_work_queries, sm_scale, part_o, part_lse):
    return None


@torch.library.register_fake("o1kernels::merge_partials")
def _merge_partials_fake(part_o, part_lse, query_slot_indptr, query_slots, o, lse):
    return None


@torch.library.register_fake("o1kernels::merge_states")
def _merge_states_fake(o_a, lse_a, o_b, lse_b, o, lse):
    return None


@torch.library.register_fake("o1kernels::step_rewards")
def _step_rewards_fake(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                       activation, positive_index, aggregate, step_scores, chain_scores):
    return None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride in the last (head/hidden) dimension; other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _attend_and_merge(q, partial_calls, num_partials, query_slot_indptr, query_slots):
    """Run tree_attention_partial once per (k, v, plan fields) in `partial_calls` into one partial
    buffer, then merge each query's slots. Returns (o [NQ, Hq, D] q.dtype, lse [NQ, Hq] fp32)."""
    num_q, hq, d = q.shape
    part_o = torch.empty(num_partials, hq, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_partials, hq, dtype=torch.float32, device=q.device)
    for k, v, fields, max_work_queries, sm_scale in partial_calls:
        _ops.tree_attention_partial(q, k, v, *fields, max_work_queries, sm_scale, part_o, part_lse)
    o = torch.empty(num_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_q, hq, dtype=torch.float32, device=q.device)
    _ops.merge_partials(part_o, part_lse, query_slot_indptr, query_slots, o, lse)
    return o, lse


def tree_attention(q, k_cache, v_cache, plan: TreeAttentionPlan, sm_scale: float):
    """(o [NQ, Hq, D] in q's dtype, lse [NQ, Hq] fp32) over a TreeAttentionPlan; see tree_attention.py."""
    q = _last_dim_contiguous(q)
    fields = (plan.page_table, plan.seg_page_start, plan.seg_capacity, plan.seg_lens, plan.seg_queries,
              plan.work_seg, plan.work_kv_start, plan.work_kv_end, plan.work_q_start, plan.work_q_end,
              plan.work_out)
    call = (_last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache), fields, plan.max_work_queries, sm_scale)
    return _attend_and_merge(q, [call], plan.num_partials, plan.query_slot_indptr, plan.query_slots)


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group,
                            sm_scale: float):
    """Two-level cascade through the tree-attention kernels, planned on the device (no host sync).

    Each of the G prefixes is a one-page segment (page_size = P) read by its group's branches:
    branches are sorted by group on the device and every (group, kv chunk, tile of up to
    DEFAULT_QUERIES_PER_TILE branches) is a work item; tiles past a group's size are empty
    items that exit at once. Each branch's suffix is a one-page segment (page_size = S) of its
    own. Partial slots: prefix chunk c of the branch at sorted position i -> c * B + i; suffix
    chunk c of branch b -> nc_p * B + c * B + b; the merge reads each branch's nc_p + nc_s slots.
    Returns (o [B, Hq, D] in q's dtype, lse [B, Hq] fp32).
    """
    q = _last_dim_contiguous(q)
    device = q.device
    b = q.shape[0]
    num_groups, prefix_cap = prefix_k.shape[:2]
    suffix_cap = suffix_k.shape[1]
    arange_b = torch.arange(b, device=device, dtype=torch.int32)
    calls, slot_lists = [], []

    num_prefix_chunks = 0
    if prefix_cap > 0 and b > 0:
        # Group sizes live on the device, so chunk by the average group size.
        chunk = min(prefix_cap, default_kv_chunk(max(1, b // num_groups)))
        num_prefix_chunks = -(-prefix_cap // chunk)
        tile = min(DEFAULT_QUERIES_PER_TILE, b)
        num_tiles = -(-b // tile)
        group = branch_group.long().clamp(0, num_groups - 1)
        order = torch.argsort(group, stable=True)  # sorted position -> branch
        position = torch.empty_like(order).scatter_(0, order, torch.arange(b, device=device))  # branch -> position
        count = torch.zeros(num_groups, dtype=torch.long, device=device).scatter_add_(0, group, torch.ones_like(group))
        start = torch.cumsum(count, 0) - count
        g = torch.arange(num_groups, device=device).view(-1, 1, 1)
        c = torch.arange(num_prefix_chunks, device=device).view(1, -1, 1)
        t = torch.arange(num_tiles, device=device).view(1, 1, -1)
        shape = (num_groups, num_prefix_chunks, num_tiles)
        group_end = (start + count).view(-1, 1, 1)
        q_start = torch.minimum(start.view(-1, 1, 1) + t * tile, group_end).expand(shape)  # past the end: empty
        q_end = torch.minimum(group_end, q_start + tile)
        kv_start = (c * chunk).expand(shape)
        fields = (
            torch.arange(num_groups, device=device, dtype=torch.int32),  # page_table: prefix g is page g
            torch.arange(num_groups, device=device, dtype=torch.int32),  # seg_page_start
            torch.full((num_groups,), prefix_cap, device=device, dtype=torch.int32),  # seg_capacity
            _i32(prefix_lens),  # seg_lens (clamped by the kernels)
            _i32(order),  # seg_queries: branches sorted by group
            _i32(g.expand(shape).flatten()),  # work_seg
            _i32(kv_start.flatten()),
            _i32(torch.clamp(kv_start + chunk, max=prefix_cap).flatten()),
            _i32(q_start.flatten()),
            _i32(q_end.flatten()),
            _i32((c * b + q_start).flatten()),  # work_out
        )
        calls.append((_last_dim_contiguous(prefix_k), _last_dim_contiguous(prefix_v), fields, tile, sm_scale))
        slot_lists.append(torch.arange(num_prefix_chunks, device=device).view(1, -1) * b + position.view(-1, 1))

    if suffix_cap > 0 and b > 0:
        chunk = min(suffix_cap, default_kv_chunk(1))
        num_chunks = -(-suffix_cap // chunk)
        c = torch.arange(num_chunks, device=device, dtype=torch.int32).view(1, -1)
        kv_start = (c * chunk).expand(b, num_chunks)
        work_q = arange_b.view(-1, 1).expand(b, num_chunks)
        fields = (
            arange_b,  # page_table: suffix b is page b
            arange_b,  # seg_page_start
            torch.full((b,), suffix_cap, device=device, dtype=torch.int32),
            _i32(suffix_lens),
            arange_b,  # seg_queries: branch b reads its own suffix
            _i32(work_q.flatten()),
            _i32(kv_start.flatten()),
            _i32(torch.clamp(kv_start + chunk, max=suffix_cap).flatten()),
            _i32(work_q.flatten()),
            _i32((work_q + 1).flatten()),
            _i32((num_prefix_chunks * b + c * b + work_q).flatten()),
        )
        calls.append((_last_dim_contiguous(suffix_k), _last_dim_contiguous(suffix_v), fields, 1, sm_scale))
        slot_lists.append(num_prefix_chunks * b + c.long() * b + arange_b.long().view(-1, 1))

    slots = torch.cat(slot_lists, dim=1) if slot_lists else torch.empty(b, 0, dtype=torch.long, device=device)
    indptr = torch.arange(b + 1, device=device, dtype=torch.int32) * slots.shape[1]
    return _attend_and_merge(q, calls, b * slots.shape[1], indptr, _i32(slots.flatten()))


def merge_states(o_a, lse_a, o_b, lse_b):
    """(o [N, H, D] in o_a's dtype, lse [N, H] fp32); o_a and o_b may differ in dtype (merged in fp32)."""
    out_dtype = o_a.dtype
    if o_b.dtype != out_dtype:
        o_a, o_b = o_a.float(), o_b.float()
    o_a, o_b = _last_dim_contiguous(o_a), _last_dim_contiguous(o_b)
    o = torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device)
    _ops.merge_states(o_a, lse_a, o_b, lse_b, o, lse)
    return o.to(out_dtype), lse


def step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                 activation, positive_index, aggregate):
    """(step_scores fp32 in step_mask's shape, chain_scores [Bs] fp32); see step_rewards.py."""
    hidden = _last_dim_contiguous(hidden)
    num_seqs = hidden.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    step_scores = torch.empty(step_mask.shape, dtype=torch.float32, device=hidden.device)
    chain_scores = torch.empty(num_seqs, dtype=torch.float32, device=hidden.device)
    _ops.step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, float(norm_eps), mlp_weight, mlp_bias,
                      activation, int(positive_index), aggregate, step_scores, chain_scores)
    return step_scores, chain_scores
