"""Token sampling shared by both decoders: greedy argmax, or temperature / nucleus sampling by inverse CDF at
uniforms that are a hash of (step seed, row, token index).

Why a hash and not torch.multinomial: the uniform behind a branch's t-th token of a step depends only on the step's
seed, the branch's row in the step and t -- not on which other rows are still running, how far a batch is padded,
how many tokens run between host checks, or whether the step runs eagerly or as a CUDA-graph replay. So the batched
device loop (TreeDecoder), the per-token host loop (NaiveDecoder) and graph replays sample the same tokens from the
same logits, on any device, and a seeded run is reproducible. A step draws one seed from the caller's generator (or
the device's default generator) on the generator's device: no host sync.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
# Two multiply-xorshift rounds (the shape of Wellons' lowbias32), with odd multipliers below 2**31 so that the
# product of a 32-bit value and a multiplier fits in int64: the same bits on every device, no overflow.
MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit hash of int64 values in [0, 2**32) (elementwise, int64 out)."""
    x = x ^ (x >> 16)
    x = (x * MULTIPLIERS[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * MULTIPLIERS[1]) & MASK32
    return x ^ (x >> 15)


def draw_step_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One 32-bit step seed [1] int64 on `device`, drawn from `generator` on its own device (None: the default
    generator of `device`). Never reads a value back to the host."""
    if generator is None:
        return torch.randint(0, 2**32, (1,), device=device)
    seed = torch.randint(0, 2**32, (1,), generator=generator, device=generator.device)
    return host_to_device(seed, device) if seed.device != device else seed


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without a host sync (through pinned memory on a GPU: the caching host
    allocator keeps the staging buffer until the copy has run)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def row_uniforms(seed: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) float32 [B] for rows [B] at token index [B] of the step (int64, same device as seed [1])."""
    h = mix32(mix32(seed & MASK32) ^ (rows & MASK32))
    h = mix32(h ^ (index & MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                  top_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64.

    uniforms None: greedy (argmax). Otherwise a draw from softmax(logits / temperature) by inverse CDF at uniforms
    [B] (float32 in (0, 1)); with top_p, from the nucleus: the most likely tokens whose mass reaches top_p (the most
    likely token always stays). temperature, top_p: float32 tensors [1] on logits' device (both decoders pass
    tensors, so eager runs and graph replays do the same arithmetic).
    """
    if uniforms is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is None:
        return _inverse_cdf(probs, uniforms)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    picked = _inverse_cdf(sorted_probs.masked_fill(drop, 0.0), uniforms)
    return order.gather(-1, picked[:, None]).squeeze(-1)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i of each row with cdf[i-1] < u * total <= cdf[i] (weights [B, V] >= 0, not all 0) -> [B] int64.
    A zero weight has an empty interval, so it is never picked."""
    cdf = weights.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=weights.shape[-1] - 1)
