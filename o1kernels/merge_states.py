"""merge_states: combine two partial attention results over disjoint key sets.

Public op: ``merge_states(o_a, lse_a, o_b, lse_b, *, backend="auto") -> (o, lse)``.

Internal signature shared by every backend (the compiled ``o1kernels._compiled.merge_states``
receives exactly these arguments, already validated):
    merge_states_<backend>(o_a, lse_a, o_b, lse_b) -> (o, lse)
    o_a, o_b: [N, H, D] float16/bfloat16/float32 (may differ), lse_a, lse_b: [N, H] float32,
    all on one device; returns o [N, H, D] in o_a's dtype and lse [N, H] float32.

LSE convention: natural log of sum(exp(sm_scale * q.k)), -inf for an empty key set (o = 0).
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._checks import FLOAT_DTYPES, check_shape, check_tensor

SUPPORTED_BACKENDS = ("torch", "triton", "cpu", "cuda")


def merge_states_torch(o_a, lse_a, o_b, lse_b):
    """Reference merge in plain torch ops (fp32 math). Both lse -inf -> o = 0, lse = -inf."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w_a = torch.exp(lse_a - m_safe)
    w_b = torch.exp(lse_b - m_safe)
    total = w_a + w_b
    empty = total == 0
    o = (w_a.unsqueeze(-1) * o_a.float() + w_b.unsqueeze(-1) * o_b.float()) / torch.where(empty, 1.0, total).unsqueeze(-1)
    lse = torch.where(empty, float("-inf"), m_safe + torch.log(total))
    return o.to(o_a.dtype), lse


def _validate(o_a, lse_a, o_b, lse_b):
    check_tensor("o_a", o_a, ndim=3, dtypes=FLOAT_DTYPES)
    device = o_a.device
    check_tensor("o_b", o_b, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("lse_a", lse_a, ndim=2, dtypes=(torch.float32,), device=device)
    check_tensor("lse_b", lse_b, ndim=2, dtypes=(torch.float32,), device=device)
    n, h, d = o_a.shape
    check_shape("o_b", o_b, (n, h, d))
    check_shape("lse_a", lse_a, (n, h))
    check_shape("lse_b", lse_b, (n, h))


def merge_states(o_a, lse_a, o_b, lse_b, *, backend: str = "auto"):
    """Merge two attention states computed over disjoint key sets.

    o_a, o_b: [N, H, D] (fp16/bf16/fp32); lse_a, lse_b: [N, H] float32 natural-log LSE.
    Returns (o [N, H, D] in o_a's dtype, lse [N, H] float32) with
    m = max(lse_a, lse_b), w_x = exp(lse_x - m), o = (w_a o_a + w_b o_b) / (w_a + w_b),
    lse = m + log(w_a + w_b). Safe when either or both lse are -inf (both: o = 0, lse = -inf).
    """
    _validate(o_a, lse_a, o_b, lse_b)
    name = resolve_backend(backend, o_a.device, SUPPORTED_BACKENDS)
    if name == "torch":
        return merge_states_torch(o_a, lse_a, o_b, lse_b)
    if name == "triton":
        from .triton_ops.merge_states import merge_states_triton

        return merge_states_triton(o_a, lse_a, o_b, lse_b)
    from . import _compiled

    return _compiled.merge_states(o_a, lse_a, o_b, lse_b)
