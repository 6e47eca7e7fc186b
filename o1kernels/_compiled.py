"""Compiled backends "cpu" and "cuda": wrappers over the ops of the extension o1kernels._C.

The extension registers these torch ops (schemas in csrc/torch_bindings/registration.cpp),
all in destination-passing style (outputs allocated here, written in place, nothing returned):
  torch.ops.o1kernels.tree_attention_partial(q, k_cache, v_cache, <plan int32 tensors>, seg_start?, q_pos?,
      max_work_queries, sm_scale, window?, softcap?, part_o, part_lse)
  torch.ops.o1kernels.merge_partials(part_o, part_lse, query_slot_indptr, query_slots, sinks?, o, lse)
  torch.ops.o1kernels.merge_states(o_a, lse_a, o_b, lse_b, o, lse)
  torch.ops.o1kernels.step_rewards(hidden, step_mask, cu_seqlens, weight, bias, norm_weight,
      norm_eps, mlp_weight, mlp_bias, activation, positive_index, aggregate, step_scores, chain_scores)
Their fake implementations below let torch.compile(fullgraph=True) trace through them; the ops
never synchronise with the host, so a decode step built from them can be captured in a CUDA graph.

run_plan runs the split layout of any attention plan (o1kernels/plan.py) through the first two ops;
merge_states and step_rewards take exactly the arguments their op modules pass to the torch
backends after validation, and return the same outputs.
"""
from __future__ import annotations

import torch

from . import _ext

if _ext._C is None:  # resolve_backend reports the backends unavailable before we get here
    raise ImportError(_ext._IMPORT_ERROR)

_ops = torch.ops.o1kernels


@torch.library.register_fake("o1kernels::tree_attention_partial")
def _tree_attention_partial_fake(q, k_cache, v_cache, page_table, seg_page_start, seg_capacity, seg_lens,
                                 seg_queries, work_seg, work_kv_start, work_kv_end, work_q_start, work_q_end,
                                 work_out, seg_start, q_pos, max_work_queries, sm_scale, window, softcap, part_o,
                                 part_lse):
    return None


@torch.library.register_fake("o1kernels::merge_partials")
def _merge_partials_fake(part_o, part_lse, query_slot_indptr, query_slots, sinks, o, lse):
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


def run_plan(plan, q, pools, sm_scale: float, *, window: int | None = None, softcap: float | None = None,
             sinks: torch.Tensor | None = None):
    """Compiled run of a plan's split layout (every segment through tree_attention_partial, then
    merge_partials). pools: ((k, v) of source 0[, (k, v) of source 1]), each [pages, page_size, Hkv, D].
    Variants (validated by tree_attention): window (plans with positions: the windowed layout), softcap, sinks [Hq]
    (folded in by the merge, in fp32). A layout with positions masks by plan.q_pos / its seg_start.
    Returns (o [NQ, Hq, D] in q's dtype, lse [NQ, Hq] fp32)."""
    q = _last_dim_contiguous(q)
    num_q, hq, d = q.shape
    layout = plan.layout("split", window=window)
    part_o, part_lse = plan.workspace("compiled", layout.num_partials, hq, d)
    for (k, v), source in zip(pools, layout.sources):
        if source.num_work:
            seg_start = layout.seg_start[source.seg_lo:source.seg_hi] if layout.causal else None
            _ops.tree_attention_partial(q, _last_dim_contiguous(k), _last_dim_contiguous(v),
                                        *layout.source_views(source), layout.seg_queries, *source.work, seg_start,
                                        layout.q_pos if layout.causal else None, source.max_work_queries, sm_scale,
                                        layout.window, softcap, part_o, part_lse)
    o = torch.empty(num_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_q, hq, dtype=torch.float32, device=q.device)
    # slots[:num_slots]: the same storage (a captured graph stays valid) without a capacity's padding
    _ops.merge_partials(part_o, part_lse, layout.slot_indptr, layout.slots[:layout.num_slots],
                        None if sinks is None else sinks.float(), o, lse)
    return o, lse


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
