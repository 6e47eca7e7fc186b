"""Triton shared_prefix_attention on the tree-attention kernels.

prefix_k [G, P, Hkv, D] is viewed as a pool of G pages of page_size P (prefix g = page g) and
suffix_k [B, S, Hkv, D] as a pool of B pages of page_size S. The work lists are built on the device
from the length / group tensors with sizes bounded on the host (no host-device sync):
  prefix: branches sorted by group; each group's branches cut into tiles of QUERIES_PER_TILE;
          one item per (kv chunk, tile), at most cdiv(B, QUERIES_PER_TILE) + G tiles, spare
          tiles are empty. A prefix chunk is read once per tile of its group, never per branch.
  suffix: one item per (branch, kv chunk).
Partial slots: prefix chunk c of the branch at sorted position i -> c * B + i;
suffix chunk c of branch b -> num_prefix_chunks * B + c * B + b. Every branch has the same
number of slots, so the merge CSR is a fixed stride.
"""
from __future__ import annotations

import torch
import triton

from ..tree_attention import DEFAULT_QUERIES_PER_TILE, default_kv_chunk
from .tree_attention import check_triton_shapes, launch_merge, launch_partial, partial_buffers


def _chunk_starts(capacity: int, chunk: int, device):
    starts = torch.arange(0, capacity, chunk, dtype=torch.int32, device=device)
    return starts, torch.clamp(starts + chunk, max=capacity)


def _prefix_work(branch_group, num_groups: int, prefix_cap: int, tile: int, chunk: int):
    """(seg_queries [B], work tuple, num_work, sorted position of each branch [B]) for the prefix pass."""
    device = branch_group.device
    num_branches = branch_group.shape[0]
    group = branch_group.long().clamp(0, num_groups - 1)
    order = torch.sort(group, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(num_branches, device=device)
    counts = torch.zeros(num_groups, dtype=torch.long, device=device).scatter_add_(0, group, torch.ones_like(group))
    first_query = torch.cumsum(counts, 0) - counts
    tiles = (counts + tile - 1) // tile
    tiles_end = torch.cumsum(tiles, 0)
    num_tiles = min(num_branches, triton.cdiv(num_branches, tile) + num_groups)
    t = torch.arange(num_tiles, device=device)
    tile_group = torch.searchsorted(tiles_end, t, right=True).clamp(max=num_groups - 1)
    valid = t < tiles_end[-1]
    q_lo = first_query[tile_group] + (t - (tiles_end - tiles)[tile_group]) * tile
    q_hi = torch.minimum(q_lo + tile, first_query[tile_group] + counts[tile_group])
    q_lo, q_hi = torch.where(valid, q_lo, 0), torch.where(valid, q_hi, 0)

    kv_lo, kv_hi = _chunk_starts(prefix_cap, chunk, device)
    n_chunks = kv_lo.shape[0]
    work = (
        tile_group.repeat(n_chunks),
        kv_lo.repeat_interleave(num_tiles),
        kv_hi.repeat_interleave(num_tiles),
        q_lo.repeat(n_chunks),
        q_hi.repeat(n_chunks),
        (torch.arange(n_chunks, device=device).repeat_interleave(num_tiles) * num_branches + q_lo.repeat(n_chunks)),
    )
    work = tuple(w.to(torch.int32) for w in work)
    return order.to(torch.int32), work, n_chunks * num_tiles, position


def _suffix_work(num_branches: int, suffix_cap: int, chunk: int, first_slot: int, device):
    """(work tuple, num_work) for the suffix pass: one item per (kv chunk, branch)."""
    kv_lo, kv_hi = _chunk_starts(suffix_cap, chunk, device)
    n_chunks = kv_lo.shape[0]
    branch = torch.arange(num_branches, dtype=torch.int32, device=device).repeat(n_chunks)
    chunk_idx = torch.arange(n_chunks, dtype=torch.int32, device=device).repeat_interleave(num_branches)
    work = (branch, kv_lo.repeat_interleave(num_branches), kv_hi.repeat_interleave(num_branches),
            branch, branch + 1, first_slot + chunk_idx * num_branches + branch)
    return work, n_chunks * num_branches


def shared_prefix_attention_triton(q, prefix_k, prefix_v, suffix_k, suffix_v, prefix_lens, suffix_lens,
                                   branch_group, sm_scale: float):
    """Triton shared_prefix_attention (arguments validated by o1kernels.shared_prefix_attention)."""
    num_branches, hq, d = q.shape
    num_groups, prefix_cap = prefix_k.shape[:2]
    suffix_cap = suffix_k.shape[1]
    check_triton_shapes(d)
    device = q.device
    o = torch.empty(num_branches, hq, d, dtype=q.dtype, device=device)
    lse = torch.empty(num_branches, hq, dtype=torch.float32, device=device)
    if num_branches == 0:
        return o, lse
    tile = DEFAULT_QUERIES_PER_TILE
    prefix_chunk = default_kv_chunk(triton.cdiv(num_branches, num_groups))
    suffix_chunk = default_kv_chunk(1)
    n_prefix_chunks = triton.cdiv(prefix_cap, prefix_chunk)
    n_suffix_chunks = triton.cdiv(suffix_cap, suffix_chunk)
    slots_per_branch = n_prefix_chunks + n_suffix_chunks
    part_o, part_lse = partial_buffers(slots_per_branch * num_branches, hq, d, device)

    seg_queries, work, num_work, position = _prefix_work(branch_group, num_groups, prefix_cap, tile, prefix_chunk)
    group_ids = torch.arange(num_groups, dtype=torch.int32, device=device)
    launch_partial(q, prefix_k, prefix_v, part_o, part_lse, group_ids, group_ids,
                   torch.full((num_groups,), prefix_cap, dtype=torch.int32, device=device), prefix_lens,
                   seg_queries, work, num_work, min(tile, num_branches), max(prefix_cap, 1), sm_scale)

    branch_ids = torch.arange(num_branches, dtype=torch.int32, device=device)
    work, num_work = _suffix_work(num_branches, suffix_cap, suffix_chunk, n_prefix_chunks * num_branches, device)
    launch_partial(q, suffix_k, suffix_v, part_o, part_lse, branch_ids, branch_ids,
                   torch.full((num_branches,), suffix_cap, dtype=torch.int32, device=device), suffix_lens,
                   branch_ids, work, num_work, 1, max(suffix_cap, 1), sm_scale)

    prefix_slots = torch.arange(n_prefix_chunks, device=device) * num_branches + position.unsqueeze(1)
    suffix_slots = (n_prefix_chunks * num_branches + torch.arange(n_suffix_chunks, device=device) * num_branches
                    + branch_ids.unsqueeze(1))
    query_slots = torch.cat([prefix_slots, suffix_slots], dim=1).to(torch.int32).flatten()
    indptr = torch.arange(num_branches + 1, dtype=torch.int32, device=device) * slots_per_branch
    launch_merge(part_o, part_lse, indptr, query_slots, o, lse)
    return o, lse
