"""Fused process-reward-model (PRM) step scoring: `step_rewards`.

A PRM turns the hidden state at every step-separator token into a reward and a
chain's score aggregates its step rewards. `step_rewards` reads only the hidden
rows at step positions, applies the optional RMSNorm, the optional hidden layer
(Qwen2.5-Math-PRM style), the final head, softmax/sigmoid, and aggregates per
sequence. No per-token or full-vocabulary logits are ever formed.

Two input layouts give the same results:
  padded: hidden [Bs, L, Hd], step_mask [Bs, L]   -> step_scores [Bs, L], chain_scores [Bs]
  packed: hidden [T, Hd], step_mask [T], cu_seqlens [Bs+1] (int32/int64, cu_seqlens[0] = 0,
          non-decreasing, cu_seqlens[-1] = T; sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1])
          -> step_scores [T], chain_scores [Bs]
cu_seqlens values are checked only for CPU tensors: checking them on a GPU would need a
host sync. On a GPU, bad values give wrong chain scores but never an out-of-bounds access
(the kernels clamp every index they derive from cu_seqlens).

Backend functions (torch here, triton in o1kernels.triton_ops.step_rewards, and the
compiled o1kernels._compiled.step_rewards for "cpu"/"cuda") are all called, after
validation, with the same positional arguments:
  (hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
   activation, positive_index, aggregate) -> (step_scores, chain_scores)
where hidden/step_mask are in the caller's layout (padded, cu_seqlens None; or packed),
bias/norm_weight/mlp_weight/mlp_bias may be None, norm_eps is a float, activation is
"softmax"|"sigmoid", positive_index an int (0 for sigmoid), aggregate one of AGGREGATES.
Outputs are float32 and newly allocated.
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_fits_int32, check_shape, check_tensor

ACTIVATIONS = ("softmax", "sigmoid")
AGGREGATES = ("min", "prod", "last", "mean", "max")
MAX_CLASSES = 64  # C limit of the head (real PRMs use 1 or 2; the Triton kernel holds C in registers)
SUPPORTED_BACKENDS = ("torch", "triton", "cpu", "cuda")


def step_rewards(
    hidden: torch.Tensor,
    step_mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    mlp_weight: torch.Tensor | None = None,
    mlp_bias: torch.Tensor | None = None,
    activation: str = "softmax",
    positive_index: int = 1,
    aggregate: str = "min",
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every step of every sequence with a PRM head and aggregate per sequence.

    hidden:       [Bs, L, Hd] (or packed [T, Hd]) fp16/bf16/fp32, the PRM's last hidden
                  states (before its final norm when norm_weight is given, after it otherwise).
    step_mask:    [Bs, L] (or [T]) bool, True at step-separator tokens.
    weight:       [C, Hd] (or [C, Hm] with the hidden layer), bias: [C] or None.
    norm_weight:  [Hd] or None: RMSNorm h * rsqrt(mean(h^2) + norm_eps) * norm_weight, in fp32.
    mlp_weight:   [Hm, Hd] or None, mlp_bias: [Hm] or None: x = relu(x @ mlp_weight.T + mlp_bias).
    activation:   "softmax" (C >= 2, reward = softmax(logits)[positive_index]) or
                  "sigmoid" (C == 1, reward = sigmoid(logit); positive_index is ignored).
    aggregate:    "min" | "prod" | "last" | "mean" | "max" over a sequence's steps in position order.
    cu_seqlens:   [Bs+1] int32/int64 for the packed layout, None for the padded one.
    backend:      "auto" | "torch" | "triton" | "cpu" | "cuda".

    Returns (step_scores, chain_scores), float32: step_scores has step_mask's shape with the
    reward at step positions and NaN elsewhere; chain_scores [Bs] is NaN for a sequence
    without steps. All tensors must be on one device; weights may be any float dtype
    (fp32 math throughout; see the Triton module for the hidden layer's dot precision).
    The triton and cuda backends convert no weight per call: what they convert (e.g. the RMSNorm
    weight folded into the next matrix) is cached per weight tensor and refreshed after an in-place
    change; a captured CUDA graph reads that cache, so after changing a weight call once eagerly
    (or recapture) before replaying.
    """
    args = _validate(hidden, step_mask, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                     activation, positive_index, aggregate, cu_seqlens)
    resolved = resolve_backend(backend, hidden.device, SUPPORTED_BACKENDS)
    if resolved == "torch":
        return step_rewards_torch(*args)
    if resolved == "triton":
        from .triton_ops.step_rewards import step_rewards_triton

        return step_rewards_triton(*args)
    _check_int32_sizes(hidden, step_mask, cu_seqlens, mlp_weight, resolved)
    from . import _compiled

    return _compiled.step_rewards(*args)


def _validate(hidden, step_mask, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
              activation, positive_index, aggregate, cu_seqlens) -> tuple:
    """Check every argument (TypeError/ValueError naming it); return the backend arguments."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    device = hidden.device
    packed = cu_seqlens is not None
    if packed:
        check_tensor("hidden", hidden, ndim=2)
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must have shape [Bs+1] with Bs >= 0, got shape [0]")
    else:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden must have shape [Bs, L, Hd] (or [T, Hd] with cu_seqlens), got shape {list(hidden.shape)}")
    hd = hidden.shape[-1]
    check_tensor("step_mask", step_mask, dtypes=(torch.bool,), device=device)
    check_shape("step_mask", step_mask, hidden.shape[:-1])
    if packed and device.type == "cpu":
        _check_cu_seqlens_values(cu_seqlens, hidden.shape[0])

    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(aggregate, str) or aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)):
        raise TypeError(f"norm_eps must be a float, got {type(norm_eps).__name__}")
    if not 0 <= norm_eps < float("inf"):
        raise ValueError(f"norm_eps must be a finite non-negative float, got {norm_eps!r}")

    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        check_shape("norm_weight", norm_weight, [hd])
    head_in = hd
    if mlp_weight is not None:
        check_tensor("mlp_weight", mlp_weight, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        if mlp_weight.shape[1] != hd:
            raise ValueError(f"mlp_weight must have shape [Hm, Hd] with Hd = hidden.shape[-1] = {hd}, "
                             f"got {list(mlp_weight.shape)}")
        head_in = mlp_weight.shape[0]
        if mlp_bias is not None:
            check_tensor("mlp_bias", mlp_bias, ndim=1, dtypes=FLOAT_DTYPES, device=device)
            check_shape("mlp_bias", mlp_bias, [head_in])
    elif mlp_bias is not None:
        raise ValueError("mlp_bias was given without mlp_weight")

    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if weight.shape[1] != head_in:
        what = f"[C, Hm] with Hm = mlp_weight.shape[0] = {head_in}" if mlp_weight is not None else \
            f"[C, Hd] with Hd = hidden.shape[-1] = {hd}"
        raise ValueError(f"weight must have shape {what}, got {list(weight.shape)}")
    num_classes = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        check_shape("bias", bias, [num_classes])
    if num_classes > MAX_CLASSES:
        raise ValueError(f"weight must have at most {MAX_CLASSES} rows (classes), got {num_classes}")
    if activation == "softmax":
        if num_classes < 2:
            raise ValueError(f"activation='softmax' needs weight with C >= 2 rows, got C = {num_classes}")
        if isinstance(positive_index, bool) or not isinstance(positive_index, int):
            raise TypeError(f"positive_index must be an int, got {type(positive_index).__name__}")
        if not 0 <= positive_index < num_classes:
            raise ValueError(f"positive_index must be in [0, {num_classes}) for C = {num_classes}, got {positive_index}")
    else:
        if num_classes != 1:
            raise ValueError(f"activation='sigmoid' needs weight with C == 1 row, got C = {num_classes}")
        positive_index = 0
    return (hidden, step_mask, cu_seqlens, weight, bias, norm_weight, float(norm_eps), mlp_weight, mlp_bias,
            activation, positive_index, aggregate)


def _check_int32_sizes(hidden, step_mask, cu_seqlens, mlp_weight, backend: str) -> None:
    """The compiled kernels index tokens, sequences and feature columns with int32."""
    why = f" for backend {backend!r} (int32 indexing; the torch and triton backends take more)"
    check_fits_int32("hidden", step_mask.numel(), "the number of tokens", why)
    num_seqs = step_mask.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    check_fits_int32("cu_seqlens" if cu_seqlens is not None else "hidden", num_seqs, "the number of sequences", why)
    check_fits_int32("hidden", hidden.shape[-1], "Hd (hidden.shape[-1])", why)
    if mlp_weight is not None:
        check_fits_int32("mlp_weight", mlp_weight.shape[0], "Hm (mlp_weight.shape[0])", why)


def _check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int) -> None:
    """Value checks of a CPU cu_seqlens (skipped on GPUs: they would need a host sync)."""
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = hidden.shape[0] = {total}, "
                         f"got first {first}, last {last}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def step_rewards_torch(hidden, step_mask, cu_seqlens, weight, bias, norm_weight, norm_eps, mlp_weight, mlp_bias,
                       activation, positive_index, aggregate):
    """Readable reference: gather the step rows, score them in fp32, reduce per sequence.

    Gathering with a boolean mask synchronises with the host on GPUs; the Triton backend does not.
    """
    hd = hidden.shape[-1]
    flat_mask = step_mask.reshape(-1)
    token_index = flat_mask.nonzero().squeeze(1)  # [S] step tokens in position order
    x = hidden.reshape(flat_mask.numel(), hd)[token_index].float()  # [S, Hd] (Hd may be 0: logits = bias)
    if norm_weight is not None:
        x = x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + norm_eps) * norm_weight.float()
    if mlp_weight is not None:
        x = x @ mlp_weight.float().T
        if mlp_bias is not None:
            x = x + mlp_bias.float()
        x = torch.relu(x)
    logits = x @ weight.float().T  # [S, C]
    if bias is not None:
        logits = logits + bias.float()
    if activation == "softmax":
        rewards = torch.softmax(logits, dim=1)[:, positive_index]
    else:
        rewards = torch.sigmoid(logits[:, 0])

    step_scores = torch.full((flat_mask.numel(),), float("nan"), dtype=torch.float32, device=hidden.device)
    step_scores[token_index] = rewards
    if cu_seqlens is None:
        num_seqs, seq_len = step_mask.shape
        seq_of_step = torch.div(token_index, seq_len, rounding_mode="floor")
    else:
        num_seqs = cu_seqlens.numel() - 1
        seq_of_step = torch.searchsorted(cu_seqlens.to(torch.int64).contiguous(), token_index, right=True) - 1

    chain = torch.full((num_seqs,), float("nan"), dtype=torch.float32, device=hidden.device)
    if aggregate == "last":
        ordinal = torch.arange(token_index.numel(), device=hidden.device)
        last = torch.full((num_seqs,), -1, dtype=torch.int64, device=hidden.device)
        last.scatter_reduce_(0, seq_of_step, ordinal, reduce="amax")
        if rewards.numel():
            chain = torch.where(last >= 0, rewards[last.clamp(min=0)], chain)
    else:
        reduce = {"min": "amin", "max": "amax", "prod": "prod", "mean": "mean"}[aggregate]
        chain.scatter_reduce_(0, seq_of_step, rewards, reduce=reduce, include_self=False)
    return step_scores.reshape(step_mask.shape), chain
