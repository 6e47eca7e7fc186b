"""shared_prefix_attention: two-level cascade attention for decoding many branches of shared prompts.

Public op: ``shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, *, prefix_lens=None,
suffix_lens=None, branch_group=None, sm_scale=None, return_lse=False, validate=False, backend="auto")``.

Internal signature shared by every backend (the compiled ``o1kernels._compiled.shared_prefix_attention``
receives exactly these arguments, already validated, defaults filled in):
    shared_prefix_attention_<backend>(q, prefix_k, prefix_v, suffix_k, suffix_v,
                                      prefix_lens, suffix_lens, branch_group, sm_scale) -> (o, lse)
    q: [B, Hq, D]; prefix_k/v: [G, P, Hkv, D]; suffix_k/v: [B, S, Hkv, D] (one dtype, one device);
    prefix_lens: [G] int32, suffix_lens: [B] int32, branch_group: [B] int32 on that device;
    sm_scale: python float; returns o [B, Hq, D] in q's dtype and lse [B, Hq] float32 (natural log).

Index values (lengths, groups) are checked on the host only when the tensors are on the CPU or
validate=True (a check of CUDA values would need a host sync). Unchecked values are clamped by
every backend: lengths into [0, P] / [0, S], groups into [0, G - 1], so nothing reads out of bounds.
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_shape, check_tensor, default_sm_scale
from .merge_states import merge_states_torch
from .tree_attention import attend_segment_torch

SUPPORTED_BACKENDS = ("torch", "triton", "cpu", "cuda")


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
    o_suf = torch.einsum("bht,bthd->bhd", probs, v)

    o, lse = merge_states_torch(o_pre, lse_pre, o_suf, lse_suf)
    return o.to(q.dtype), lse


def _index_tensor(name, value, length, device, default_value, upper, validate):
    """Check an index tensor [length] and return it as int32 (default filled with default_value)."""
    if value is None:
        return torch.full((length,), default_value, dtype=torch.int32, device=device)
    check_tensor(name, value, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape(name, value, (length,))
    if (validate or value.device.type == "cpu") and value.numel():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi > upper:
            raise ValueError(f"{name} values must be in [0, {upper}], got values in [{lo}, {hi}]")
    return value.to(torch.int32)


def _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, validate):
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
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"num q heads ({hq}) must be a positive multiple of num kv heads ({hkv}); q {list(q.shape)}, prefix_k {list(prefix_k.shape)}")
    if branch_group is None and g != 1:
        raise ValueError(f"branch_group is required when there are several prefixes (G = {g})")
    prefix_lens = _index_tensor("prefix_lens", prefix_lens, g, device, p, p, validate)
    suffix_lens = _index_tensor("suffix_lens", suffix_lens, b, device, suffix_k.shape[1], suffix_k.shape[1], validate)
    branch_group = _index_tensor("branch_group", branch_group, b, device, 0, g - 1, validate)
    return prefix_lens, suffix_lens, branch_group


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, *, prefix_lens=None, suffix_lens=None,
                            branch_group=None, sm_scale=None, return_lse: bool = False, validate: bool = False,
                            backend: str = "auto"):
    """Decode attention of B branches, each over its group's shared prefix then its own suffix.

    q: [B, Hq, D] (one new token per branch, its K/V already in its suffix); prefix_k/v: [G, P, Hkv, D];
    suffix_k/v: [B, S, Hkv, D]; all one dtype (fp16/bf16/fp32), Hq % Hkv == 0.
    prefix_lens [G], suffix_lens [B]: int32/int64 (default P / S; 0 allowed); branch_group [B] in [0, G)
    (may be omitted when G == 1). Values are checked when on the CPU or validate=True, else clamped.
    Returns o [B, Hq, D] in q's dtype, or (o, lse [B, Hq] float32 natural-log LSE) with return_lse=True.
    Each prefix is read once per group (its branches' queries stacked into one matrix product).
    """
    lens = _validate(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens, branch_group, validate)
    scale = default_sm_scale(sm_scale, q.shape[-1])
    name = resolve_backend(backend, q.device, SUPPORTED_BACKENDS)
    args = (q, prefix_k, prefix_v, suffix_k, suffix_v, *lens, scale)
    if name == "torch":
        o, lse = shared_prefix_attention_torch(*args)
    elif name == "triton":
        from .triton_ops.shared_prefix_attention import shared_prefix_attention_triton

        o, lse = shared_prefix_attention_triton(*args)
    else:
        from . import _compiled

        o, lse = _compiled.shared_prefix_attention(*args)
    return (o, lse) if return_lse else o
