"""Independent float64 reference for step_rewards: one step at a time, in position order.

Written from the formulas (not from o1kernels' torch backend): RMSNorm, optional
relu hidden layer, final head, softmax/sigmoid, then a Python reduction per sequence.
"""
from __future__ import annotations

import math

import torch


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def _aggregate(rewards: list[float], aggregate: str) -> float:
    if not rewards:
        return math.nan
    if aggregate == "min":
        return min(rewards)
    if aggregate == "max":
        return max(rewards)
    if aggregate == "prod":
        return math.prod(rewards)
    if aggregate == "last":
        return rewards[-1]
    if aggregate == "mean":
        return math.fsum(rewards) / len(rewards)
    raise ValueError(aggregate)


def reference_step_rewards(hidden, step_mask, weight, bias=None, *, norm_weight=None, norm_eps=1e-6, mlp_weight=None,
                           mlp_bias=None, activation="softmax", positive_index=1, aggregate="min", cu_seqlens=None):
    """(step_scores, chain_scores) as float64 CPU tensors, shaped like step_mask and [Bs]."""
    hd = hidden.shape[-1]
    rows = _f64(hidden).reshape(-1, hd)
    mask = step_mask.detach().cpu().reshape(-1).tolist()
    w, b, nw, w1, b1 = _f64(weight), _f64(bias), _f64(norm_weight), _f64(mlp_weight), _f64(mlp_bias)
    if cu_seqlens is None:
        num_seqs, seq_len = step_mask.shape
        bounds = [(i * seq_len, (i + 1) * seq_len) for i in range(num_seqs)]
    else:
        cu = cu_seqlens.cpu().tolist()
        bounds = list(zip(cu[:-1], cu[1:]))

    scores = torch.full((len(mask),), math.nan, dtype=torch.float64)
    chain = torch.full((len(bounds),), math.nan, dtype=torch.float64)
    for seq, (start, end) in enumerate(bounds):
        rewards = []
        for t in range(start, end):
            if not mask[t]:
                continue
            x = rows[t]
            if nw is not None:
                x = x / math.sqrt(float((x * x).sum()) / hd + norm_eps) * nw
            if w1 is not None:
                x = w1 @ x
                if b1 is not None:
                    x = x + b1
                x = x.clamp(min=0.0)
            z = w @ x
            if b is not None:
                z = z + b
            if activation == "softmax":
                e = torch.exp(z - z.max())
                r = float(e[positive_index] / e.sum())
            else:
                r = 1.0 / (1.0 + math.exp(-float(z[0])))
            scores[t] = r
            rewards.append(r)
        chain[seq] = _aggregate(rewards, aggregate)
    return scores.reshape(step_mask.shape), chain
