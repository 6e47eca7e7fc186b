"""shared_prefix_attention: two-level cascade attention for decoding many branches of shared prompts.

Public op: ``shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, *, prefix_lens=None,
suffix_lens=None, branch_group=None, sm_scale=None, return_lse=False, validate=False, backend="auto",
plan=None)``.

Planned form (for decoders): build a SharedPrefixPlan once (o1kernels/plan.py), update its lengths /
groups per step, and pass it as plan=: a call is then the input checks plus the kernel launches.
Without plan=, a plan for the call's shapes is taken from a small cache and the call's lengths and
groups are written into it (a few device ops per call).

Every backend has the run signature of o1kernels/plan.py: run(plan, q, pools, sm_scale) -> (o, lse)
with pools = ((prefix_k, prefix_v), (suffix_k, suffix_v)); q: [B, Hq, D]; prefix_k/v: [G, P, Hkv, D];
suffix_k/v: [B, S, Hkv, D] (one dtype, one device). triton/cpu/cuda run the plan's work lists; torch is
the readable reference, reading the lengths and groups from the plan.

Index values (lengths, groups) are checked on the host only when the tensors are on the CPU or
validate=True (a check of CUDA values would need a host sync). Unchecked values are clamped by
every backend: lengths into [0, P] / [0, S], groups into [0, G - 1], so nothing reads out of bounds.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, default_sm_scale
from .capabilities import spec_of
from .merge_states import merge_states_torch
from .plan import SharedPrefixPlan, capturing
from .tree_attention import RUNNERS as TREE_RUNNERS
from .tree_attention import attend_segment_torch, validate_heads

SUPPORTED_BACKENDS = ("torch", "triton", "cpu", "cuda")
_PLAN_CACHE_SIZE = 16
_plan_cache: OrderedDict = OrderedDict()


def shared_prefix_attention_torch(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens,
                                  branch_group, sm_scale):
    """Reference: each prefix attended once by all branches (rows of other groups dropped), each
    suffix by its own branch, then merged by LSE. fp32 math."""
    num_groups, prefix_cap = prefix_k.shape[:2]
    suffix_cap = suffix_k.shape[1]
    group = q.shape[1] // prefix_k.shape[2]
    qf = q.float()
    branch_group = branch_group.long().clamp(0, num_groups - 1)
    o_pre = torch.zeros_like(qf)
    lse_pre = torch.full(q.shape[:2], float("-inf"), device=q.device)
    for g in range(num_groups):
        o_g, lse_g = attend_segment_torch(qf, prefix_k[g], prefix_v[g], prefix_lens[g], sm_scale)
        in_group = (branch_group == g).unsqueeze(-1)
        o_pre = torch.where(in_group.unsqueeze(-1), o_g, o_pre)
        lse_pre = torch.where(in_group, lse_g, lse_pre)

    k = suffix_k.float().repeat_interleave(group, dim=2)
    v = suffix_v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bthd->bht", qf, k) * sm_scale
    valid = torch.arange(suffix_cap, device=q.device) < suffix_lens.long().clamp(0, suffix_cap).unsqueeze(-1)
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse_suf = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse_suf), 0.0, lse_suf).unsqueeze(-1))
    o_suf = torch.einsum("bht,bthd->bhd", probs, torch.where(valid[:, :, None, None], v, 0.0))

    o, lse = merge_states_torch(o_pre, lse_pre, o_suf, lse_suf)
    return o.to(q.dtype), lse


def _torch_runner():
    def run(plan, q, pools, sm_scale):
        g = plan.num_prefixes
        return shared_prefix_attention_torch(q, *pools[0], *pools[1], plan.seg_lens[:g], plan.seg_lens[g:],
                                             plan.branch_group, sm_scale)

    return run


RUNNERS = {**TREE_RUNNERS, "torch": _torch_runner}


def _check_index(name, value, length, device, upper, validate):
    """Check an index tensor [length] (its values too when on the CPU or validate=True)."""
    check_tensor(name, value, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape(name, value, (length,))
    if (validate or value.device.type == "cpu") and value.numel():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi > upper:
            raise ValueError(f"{name} values must be in [0, {upper}], got values in [{lo}, {hi}]")


def _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, validate, plan):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    names = ("prefix_k", "prefix_v", "suffix_k", "suffix_v")
    for name, t in zip(names, (prefix_k, prefix_v, suffix_k, suffix_v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, device=device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    b, hq, d = q.shape
    g, p, hkv, _ = prefix_k.shape
    if g < 1:
        raise ValueError(f"prefix_k must hold at least one prefix (G >= 1), got shape {list(prefix_k.shape)}")
    check_shape("prefix_k", prefix_k, (g, p, hkv, d))
    check_shape("prefix_v", prefix_v, (g, p, hkv, d))
    check_shape("suffix_k", suffix_k, (b, None, hkv, d))
    check_shape("suffix_v", suffix_v, tuple(suffix_k.shape))
    validate_heads("q", q, "prefix_k", prefix_k)
    s = suffix_k.shape[1]
    if plan is not None:
        if not isinstance(plan, SharedPrefixPlan):
            raise TypeError(f"plan must be a SharedPrefixPlan, got {type(plan).__name__}")
        expected = (plan.num_branches, plan.num_prefixes, plan.prefix_capacity, plan.suffix_capacity)
        if (b, g, p, s) != expected:
            raise ValueError(f"plan was built for (B, G, P, S) = {expected}, got {(b, g, p, s)} from q "
                             f"{list(q.shape)}, prefix_k {list(prefix_k.shape)}, suffix_k {list(suffix_k.shape)}")
        if plan.device != device:
            raise ValueError(f"plan is on {plan.device} but q is on {device}: build the plan with device=q.device")
    elif branch_group is None and g != 1:
        raise ValueError(f"branch_group is required when there are several prefixes (G = {g})")
    for name, value, n, upper in (("prefix_lens", prefix_lens, g, p), ("suffix_lens", suffix_lens, b, s),
                                  ("branch_group", branch_group, b, g - 1)):
        if value is not None:
            _check_index(name, value, n, device, upper, validate)


def _cached_plan(b, g, p, s, device) -> SharedPrefixPlan:
    key = (b, g, p, s, device)
    plan = _plan_cache.get(key)
    if plan is None:
        plan = SharedPrefixPlan(b, p, s, num_prefixes=g, device=device)
        _plan_cache[key] = plan
        if len(_plan_cache) > _PLAN_CACHE_SIZE:
            _plan_cache.popitem(last=False)
    else:
        _plan_cache.move_to_end(key)
    return plan


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, *, prefix_lens=None, suffix_lens=None,
                            branch_group=None, sm_scale=None, return_lse: bool = False, validate: bool = False,
                            backend: str = "auto", plan: SharedPrefixPlan | None = None):
    """Decode attention of B branches, each over its group's shared prefix then its own suffix.

    q: [B, Hq, D] (one new token per branch, its K/V already in its suffix); prefix_k/v: [G, P, Hkv, D];
    suffix_k/v: [B, S, Hkv, D]; all one dtype (fp16/bf16/fp32), Hq % Hkv == 0.
    prefix_lens [G], suffix_lens [B]: int32/int64 (0 allowed); branch_group [B] in [0, G) (may be omitted
    when G == 1). Without plan: lengths default to P / S. With plan (a SharedPrefixPlan for these shapes):
    given lengths/groups are written into it, omitted ones keep the plan's current values.
    Values are checked when on the CPU or validate=True, else clamped.
    Returns o [B, Hq, D] in q's dtype, or (o, lse [B, Hq] float32 natural-log LSE) with return_lse=True.
    Each prefix is read once per group (its branches' queries stacked into one matrix product), unless the
    plan's cost model reads a small prefix per branch in one kernel (no partials, no merge).
    """
    _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, validate, plan)
    scale = default_sm_scale(sm_scale, q.shape[-1])
    g = prefix_k.shape[0]
    if plan is None:
        if capturing(q.device):
            raise RuntimeError("shared_prefix_attention inside a CUDA-graph capture needs plan= (a SharedPrefixPlan "
                               "kept alive as long as the graph): the plans made for calls without one are cached "
                               f"{_PLAN_CACHE_SIZE} at a time, and an evicted one is freed while the graph reads it")
        plan = _cached_plan(q.shape[0], g, prefix_k.shape[1], suffix_k.shape[1], q.device)
        plan.seg_lens[:g].fill_(prefix_k.shape[1]) if prefix_lens is None else plan.seg_lens[:g].copy_(prefix_lens)
        plan.seg_lens[g:].fill_(suffix_k.shape[1]) if suffix_lens is None else plan.seg_lens[g:].copy_(suffix_lens)
    else:
        if prefix_lens is not None:
            plan.seg_lens[:g].copy_(prefix_lens)
        if suffix_lens is not None:
            plan.seg_lens[g:].copy_(suffix_lens)
    _, run = plan.runner(backend, RUNNERS, spec_of(q, prefix_k))
    if branch_group is not None:
        plan.branch_group.copy_(branch_group)
        plan.refill_groups()
    o, lse = run(plan, q, ((prefix_k, prefix_v), (suffix_k, suffix_v)), scale)
    return (o, lse) if return_lse else o
