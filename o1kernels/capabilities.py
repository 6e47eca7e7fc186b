"""What o1kernels' attention can run, in one table that every route asks: the attention ops (backend="auto" picks a
backend that supports the call), the paged attention wrapper, the Hugging Face drop-in (which models it accepts) and
the vLLM backend (its supports_* declarations).

An `AttentionSpec` describes what one attention layer needs; `unsupported_features(spec)` names what no backend of
ours does (a route refuses the model with those names); `backend_unsupported_reason(backend, spec)` says why one
backend cannot run it (None: it can), which is how "auto" falls back instead of raising.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Largest head_dim per backend: the compiled kernels size their registers / shared memory by it (csrc: kMaxHeadDim),
# Triton's tiles by its next power of two (one tile of head_dim per program); the torch reference takes any size.
MAX_HEAD_DIM = {"torch": 1024, "triton": 256, "cpu": 256, "cuda": 256}

# Attention features (AttentionSpec fields): the backends that implement each, and its description. A feature no
# backend implements is refused by every route with this description; "auto" picks among the backends that
# implement all a call needs.
FEATURES = {
    "positions": ({"torch", "triton", "cpu", "cuda"}, "keys masked by query position (causal chunks, prefill rows in a paged call)"),
    "sliding_window": ({"torch", "triton", "cpu", "cuda"}, "sliding-window attention"),
    "softcap": ({"torch", "triton", "cpu", "cuda"}, "attention logit soft-capping"),
    "sinks": ({"torch", "triton", "cpu", "cuda"}, "attention sinks (a learned per-head logit in the softmax denominator)"),
    "alibi": (set(), "ALiBi positional biases"),
    "non_causal": (set(), "non-causal (bidirectional) self-attention"),
    "cross_attention": (set(), "cross-attention / encoder-decoder attention"),
    "latent": (set(), "multi-head latent attention (MLA)"),
    "quantized_kv": (set(), "a quantized KV cache (fp8/int8 pages)"),
}


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer of a model needs. Defaults describe plain causal decoder self-attention."""

    head_dim: int
    num_heads: int = 1
    num_kv_heads: int = 1
    dtype: torch.dtype | None = None
    positions: bool = False  # the call masks keys by query position (always true of a model's causal attention
    #                          over chunks; a decode step over whole segments needs no mask)
    sliding_window: int | None = None  # keys at query position - key position < window only
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap) before the softmax
    sinks: bool = False  # a learned per-head logit joins the softmax denominator
    alibi: bool = False
    non_causal: bool = False
    cross_attention: bool = False
    latent: bool = False
    quantized_kv: bool = False


def spec_of(q: torch.Tensor, k_cache: torch.Tensor, **features) -> AttentionSpec:
    """The AttentionSpec of an attention call on q [..., Hq, D] over a pool k_cache [..., Hkv, D]."""
    return AttentionSpec(head_dim=q.shape[-1], num_heads=q.shape[-2], num_kv_heads=k_cache.shape[-2], dtype=q.dtype,
                         **features)


def _needs(spec: AttentionSpec) -> list[str]:
    """Names of the FEATURES the spec uses."""
    used = {"positions": spec.positions, "sliding_window": spec.sliding_window is not None, "softcap": spec.softcap is not None,
            "sinks": spec.sinks, "alibi": spec.alibi, "non_causal": spec.non_causal,
            "cross_attention": spec.cross_attention, "latent": spec.latent, "quantized_kv": spec.quantized_kv}
    return [name for name, on in used.items() if on]


def unsupported_features(spec: AttentionSpec) -> list[str]:
    """Descriptions of what `spec` needs that no backend supports (empty: some backend can run it), including head
    counts and dtypes outside what the kernels take."""
    missing = [FEATURES[name][1] for name in _needs(spec) if not FEATURES[name][0]]
    if spec.num_kv_heads < 1 or spec.num_heads % spec.num_kv_heads:
        missing.append(f"{spec.num_heads} query heads over {spec.num_kv_heads} kv heads (query heads must be a "
                       "multiple of kv heads)")
    if not 1 <= spec.head_dim <= max(MAX_HEAD_DIM.values()):
        missing.append(f"head_dim {spec.head_dim} (supported: 1-{max(MAX_HEAD_DIM.values())})")
    if spec.dtype is not None and spec.dtype not in FLOAT_DTYPES:
        missing.append(f"dtype {spec.dtype} (supported: float16, bfloat16, float32)")
    return missing


def backend_unsupported_reason(backend: str, spec: AttentionSpec) -> str | None:
    """None when `backend` ("torch", "triton", "cpu", "cuda") implements everything `spec` needs, else why not.
    (Whether the backend is installed and runs on a device is _backend.backend_unavailable_reason.)"""
    missing = unsupported_features(spec)
    if missing:
        return "not supported by o1kernels: " + "; ".join(missing)
    lacking = [FEATURES[name][1] for name in _needs(spec) if backend not in FEATURES[name][0]]
    if lacking:
        return f"backend {backend!r} does not implement " + "; ".join(lacking)
    limit = MAX_HEAD_DIM[backend]
    if spec.head_dim > limit:
        return f"backend {backend!r} supports head_dim up to {limit}, got {spec.head_dim}"
    return None
