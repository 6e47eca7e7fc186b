"""Tree attention over a paged KV pool: TreeAttentionPlan (o1kernels/plan.py, built once) + tree_attention (per step).

Public op: ``tree_attention(q, k_cache, v_cache, plan, *, sm_scale=None, window=None, softcap=None, sinks=None,
return_lse=False, backend="auto")``.

Every backend has the run signature of o1kernels/plan.py: run(plan, q, pools, sm_scale, **variant) -> (o, lse)
with pools = ((k_cache, v_cache),) and variant the non-default ones of window / softcap / sinks (check_variant);
q: [num_queries, Hq, D], k_cache/v_cache: [num_pages, page_size, Hkv, D] (one dtype, one device), already
validated; o [num_queries, Hq, D] in q's dtype, lse [num_queries, Hq] float32 (natural log). triton/cpu/cuda run
the plan's work lists; torch is the readable reference over the plan's segments.

Segment lengths are read at run time from ``plan.seg_lens`` and clamped into [0, capacity],
so no backend needs a host-device sync and a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, INT32_MAX, check_shape, check_tensor, default_sm_scale
from .capabilities import spec_of
from .merge_states import merge_states_torch
from .plan import TreeAttentionPlan, default_kv_chunk  # noqa: F401  (re-exported: the plan is part of this op's API)

SUPPORTED_BACKENDS = ("torch", "triton", "cpu", "cuda")


def attend_segment_torch(q_rows, k, v, length, sm_scale, *, q_pos=None, start=None, window=None, softcap=None):
    """Attention of q_rows [n, Hq, D] over the first `length` tokens of k, v [T, Hkv, D] (fp32 math).

    `length` is a 0-d integer tensor (read on the device, clamped into [0, T]). With q_pos [n] (the rows'
    positions) and start (0-d, the position of token 0) key t is visible to row i only when start + t <= q_pos[i]
    and, with a window W, q_pos[i] - (start + t) < W. softcap: scores -> softcap * tanh(scores / softcap).
    Returns (o [n, Hq, D] float32, lse [n, Hq] float32); an empty key set gives o = 0, lse = -inf.
    """
    group = q_rows.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->nht", q_rows.float(), k) * sm_scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    tokens = torch.arange(k.shape[0], device=k.device)
    valid = (tokens < length.clamp(0, k.shape[0])).expand(q_rows.shape[0], -1)  # [n, T]
    if q_pos is not None:
        distance = q_pos.long()[:, None] - (start.long() + tokens)[None, :]
        valid = valid & (distance >= 0)
        if window is not None:
            valid = valid & (distance < window)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    # Slots past `length` may hold stale or unwritten values (NaN): 0 * NaN would leak.
    probs = torch.where(valid[:, None, :], probs, 0.0)
    v = torch.where(valid.any(0)[:, None, None], v, 0.0)
    return torch.einsum("nht,thd->nhd", probs, v), lse


def fold_sinks_torch(o, lse, sinks):
    """Attention sinks: a per-head logit sinks [Hq] joins each row's softmax denominator (a key with value 0).
    o [N, Hq, D] float32, lse [N, Hq] -> (o rescaled, lse including the sink)."""
    total = torch.logaddexp(lse, sinks.float()[None, :])
    return o * torch.exp(lse - total)[..., None], total


def tree_attention_torch(q, k_cache, v_cache, plan: TreeAttentionPlan, sm_scale: float, *, window=None, softcap=None,
                         sinks=None):
    """Reference: loop over segments, gather their pages, attend (masked by position when the plan has positions),
    merge per query by LSE, fold in the sinks."""
    num_q, hq, d = q.shape
    o = torch.zeros(num_q, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((num_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    for s in range(plan.num_segments):
        queries = plan.queries_of(s)
        if not len(queries) or not plan.segs.capacity[s]:
            continue
        page_idx = plan.page_ids(s)
        k = k_cache[page_idx].reshape(len(page_idx) * page_size, hkv, d)
        v = v_cache[page_idx].reshape(len(page_idx) * page_size, hkv, d)
        rows = torch.from_numpy(queries.astype("int64")).to(q.device)
        masks = {}
        if plan.causal:
            masks = dict(q_pos=plan.q_pos[rows], start=torch.tensor(int(plan.segs.start[s]), device=q.device),
                         window=window)
        o_s, lse_s = attend_segment_torch(q[rows], k, v, plan.seg_lens[s], sm_scale, softcap=softcap, **masks)
        o[rows], lse[rows] = merge_states_torch(o[rows], lse[rows], o_s, lse_s)
    if sinks is not None:
        o, lse = fold_sinks_torch(o, lse, sinks)
    return o.to(q.dtype), lse


def _triton_runner():
    from .triton_ops.tree_attention import run_plan

    return run_plan


def _compiled_runner():
    from ._compiled import run_plan

    return run_plan


def _torch_runner():
    return lambda plan, q, pools, sm_scale, **variant: tree_attention_torch(q, *pools[0], plan, sm_scale, **variant)


RUNNERS = {"torch": _torch_runner, "triton": _triton_runner, "cpu": _compiled_runner, "cuda": _compiled_runner}


def validate_heads(q_name: str, q, kv_name: str, kv) -> None:
    """Hq (q.shape[1]) a positive multiple of Hkv (kv.shape[2]); head_dim >= 1."""
    hq, hkv, d = q.shape[1], kv.shape[2], q.shape[-1]
    if d < 1:
        raise ValueError(f"head_dim ({q_name}.shape[-1]) must be >= 1, got shape {list(q.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"num q heads ({hq}) must be a positive multiple of num kv heads ({hkv}); "
                         f"{q_name} {list(q.shape)}, {kv_name} {list(kv.shape)}")


def check_inputs(q, k_cache, v_cache, plan):
    """tree_attention's argument checks (TypeError/ValueError naming the argument). The full checks run once per
    (plan, input signature); later calls with the same shapes, dtypes and devices pay a tuple comparison. A
    decoder that calls the plan's run function directly (plan.runner) calls this once per plan change."""
    if not isinstance(plan, TreeAttentionPlan):
        raise TypeError(f"plan must be a TreeAttentionPlan, got {type(plan).__name__}")
    if isinstance(q, torch.Tensor) and isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor):
        signature = (q.shape, q.dtype, q.device, k_cache.shape, k_cache.dtype, k_cache.device, v_cache.shape,
                     v_cache.dtype, v_cache.device)
        if signature == plan.checked_signature:
            return
    else:
        signature = None
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype ({q.dtype}), got {k_cache.dtype} and {v_cache.dtype}")
    num_q, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_cache.shape
    check_shape("k_cache", k_cache, (None, None, None, d))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    validate_heads("q", q, "k_cache", k_cache)
    if plan.num_queries != num_q:
        raise ValueError(f"plan.num_queries ({plan.num_queries}) must equal q.shape[0] ({num_q})")
    if plan.page_size != page_size:
        raise ValueError(f"plan.page_size ({plan.page_size}) must equal k_cache.shape[1] ({page_size})")
    if plan.max_page >= num_pages:
        raise ValueError(f"plan uses page {plan.max_page} but k_cache has only {num_pages} pages (shape {list(k_cache.shape)})")
    if plan.device != device:
        raise ValueError(f"plan is on {plan.device} but q is on {device}: build the plan with device=q.device")
    plan.checked_signature = signature


def check_variant(window, softcap, sinks, q: torch.Tensor, causal: bool) -> dict:
    """The attention variant's run-time arguments, checked (ValueError/TypeError naming the argument): window (int
    >= 1, needs positions), softcap (finite float > 0), sinks ([Hq] float tensor on q's device). Returns the keyword
    arguments a backend's run function takes (the non-default ones only)."""
    variant = {}
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= INT32_MAX:
            raise ValueError(f"window must be an int in [1, 2**31 - 1] or None, got {window!r}")
        if not causal:
            raise ValueError("window needs a plan with positions (TreeAttentionPlan(..., positions=)): a sliding "
                             "window is measured from each query's position")
        variant["window"] = window
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
            raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
        variant["softcap"] = float(softcap)
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, dtypes=FLOAT_DTYPES, device=q.device)
        check_shape("sinks", sinks, (q.shape[1],))
        variant["sinks"] = sinks
    return variant


def variant_spec(q, k_cache, masks: bool, variant: dict):
    """The AttentionSpec of a call (what the backend must implement); masks: the plan's position masks change what
    some query sees (a window always does)."""
    return spec_of(q, k_cache, positions=masks or "window" in variant, sliding_window=variant.get("window"),
                   softcap=variant.get("softcap"), sinks="sinks" in variant)


def tree_attention(q, k_cache, v_cache, plan: TreeAttentionPlan, *, sm_scale=None, window: int | None = None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None, return_lse: bool = False,
                   backend: str = "auto"):
    """Attention of each query row over the union of its plan segments in a paged KV pool.

    q: [num_queries, Hq, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D] (q's dtype: fp16/bf16/fp32),
    Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)); plan: TreeAttentionPlan on q's device (a plan
    with positions masks keys by query position: causal).
    Variants: window W (plans with positions: keys at query position - key position < W only), softcap (scores
    -> softcap * tanh(scores / softcap), scores = sm_scale * q.k), sinks [Hq] (a per-head logit in each softmax
    denominator, as a key with value 0; the returned lse includes it).
    Returns o [num_queries, Hq, D] (q's dtype), or (o, lse [num_queries, Hq] float32 natural-log LSE of the
    (capped) scores, -inf where a query attends to nothing) with return_lse=True.
    No host-device sync: a call can be captured in a CUDA graph and replayed after plan.set_lengths /
    plan.set_positions (run the plan once before capturing: its layout and workspace are built on the first run).
    backend="auto" runs the first backend that implements the call (o1kernels.capabilities).
    """
    check_inputs(q, k_cache, v_cache, plan)
    scale = default_sm_scale(sm_scale, q.shape[-1])
    variant = check_variant(window, softcap, sinks, q, plan.causal)
    _, run = plan.runner(backend, RUNNERS, variant_spec(q, k_cache, plan.masks, variant))
    o, lse = run(plan, q, ((k_cache, v_cache),), scale, **variant)
    return (o, lse) if return_lse else o
