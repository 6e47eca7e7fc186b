"""Triton kernels of tree_attention and shared_prefix_attention: the two primitives of a plan layout.

`_partial_attention_kernel`, grid (num_work * M_TILES, Hkv): a program takes one shared work item (one
kv chunk of one segment and a tile of its queries) and one kv head. Its M rows are (query, GQA head)
pairs, so the chunk is loaded block by block once (BLOCK_N tokens gathered through the page table)
and multiplied with all of them by tl.dot (tensor cores on GPU: M tiles of 64-128 rows, pipelined
loads with num_stages); online softmax in fp32; it writes one fp32 partial (o, lse) per row. The
m-tile index varies fastest so programs reading one chunk run side by side and share it through L2.

`_decode_merge_kernel`, grid (num_queries, Hkv * HEAD_SPLITS): per query and kv head, attends the
query's GQA heads over its direct segments (a plain paged decode, up to two KV sources), then folds in
its partial slots by log-sum-exp and writes o (q's dtype) and lse. A plan without shared work runs
this kernel alone: one launch, no partials (the plain per-branch decode).

Both read token blocks through `_attend_tokens`. Segment lengths come from a device tensor, clamped
into [0, capacity], so nothing reads out of bounds and nothing syncs with the host.

Variants, each a constexpr switch (off: the kernels are the plain ones, no extra loads):
  CAUSAL   the layout masks by position (a plan with positions): key t of segment s is visible to query i iff
           seg_start[s] + t <= positions[i]; WINDOW also needs positions[i] - (seg_start[s] + t) < window.
           A direct segment is read over its query's visible range only; a shared work item over the part of its
           chunk that some row of the tile sees, masked per row (rows of one tile have different positions).
  SOFTCAP  scores -> softcap * tanh(scores / softcap) before the softmax.
  SINKS    (decode-merge kernel) a per-head logit joins each softmax denominator, folded in at the final merge.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._target import Target, device_guard, gpu_target
from .merge_states import block_d, lse_merge_finish, lse_merge_step

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log2 units -> natural log, inside kernels


@triton.jit
def _tanh(x):
    """tanh through exp2 (Triton's interpreter has no libdevice); exact limits +-1 for any |x|."""
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))  # exp(-2|x|) in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _visible_range(pos, seg_start, length, window, WINDOW: tl.constexpr):
    """[lo, hi) of the tokens of a segment (first token at position seg_start, `length` tokens) that a query at
    position `pos` (a scalar or a vector of rows) sees: t <= pos - seg_start and, WINDOW, t > pos - seg_start -
    window. Both clamped into [0, length] (int64 arithmetic: positions reach 2**31 - 1)."""
    rel = pos.to(tl.int64) - seg_start
    hi = tl.maximum(tl.minimum(rel + 1, length), 0)
    if WINDOW:
        lo = tl.minimum(tl.maximum(rel - window + 1, 0), length)
    else:
        lo = hi * 0
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _attend_tokens(q, m_i, l_i, acc, kv_lo, kv_hi, row_lo, row_hi, page_base, page_table_ptr, page_size, k_ptr, v_ptr,
                   kv_head, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                   sm_scale_log2, softcap_log2, dims, dim_ok,
                   BLOCK_N: tl.constexpr, ROW_MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] over tokens [kv_lo, kv_hi) of a segment whose pages start at
    page_table[page_base] (K/V contiguous in head_dim). State (m_i in log2 units, l_i, acc unnormalised)
    in and out. ROW_MASK: row r sees only tokens [row_lo[r], row_hi[r]) (within [kv_lo, kv_hi)); a row may see
    none of a block, or none at all (its m stays -inf, l 0). SOFTCAP: scores (log2 units) -> softcap_log2 *
    tanh(scores / softcap_log2), i.e. softcap * tanh(s / softcap) of the natural scores s."""
    for start in range(kv_lo, kv_hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < kv_hi
        # int64 offsets: a shared-prefix plan makes a whole prompt one page, so slot * stride reaches
        # P * Hkv * D, past 2**31 at P = 1M, Hkv = 8, D = 256.
        page = tl.load(page_table_ptr + page_base + tokens // page_size, mask=tok_ok, other=0).to(tl.int64)
        slot = (tokens % page_size).to(tl.int64)
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        head = kv_head.to(tl.int64)
        k = tl.load(k_ptr + page[:, None] * stride_kp + slot[:, None] * stride_ks + head * stride_kh + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vs + head * stride_vh + dims[None, :],
                    mask=kv_mask, other=0.0)
        # DOT_FP32: set on the CPU, where Triton's interpreter returns garbage from tl.dot on two
        # bfloat16 operands (numpy has no bf16); on CUDA the dots run in the input dtype (tensor cores).
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        if SOFTCAP:
            scores = softcap_log2 * _tanh(scores * (1.0 / softcap_log2))
        if ROW_MASK:
            visible = (tokens[None, :] >= row_lo[:, None]) & (tokens[None, :] < row_hi[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no token yet: no NaN
        else:
            scores = tl.where(tok_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every block has a valid token
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _segment_bounds(seg, seg_lens_ptr, seg_capacity_ptr, seg_page_start_ptr):
    """(length clamped into [0, capacity], first page-table entry) of a segment."""
    length = tl.minimum(tl.maximum(tl.load(seg_lens_ptr + seg), 0), tl.load(seg_capacity_ptr + seg))
    return length, tl.load(seg_page_start_ptr + seg)


@triton.jit
def _attend_direct(q, m_i, l_i, acc, query, pos, indptr_ptr, segs_ptr, seg_lens_ptr, seg_capacity_ptr,
                   seg_page_start_ptr, seg_start_ptr, page_table_ptr, page_size, k_ptr, v_ptr, kv_head,
                   stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, sm_scale_log2, softcap_log2,
                   window, dims, dim_ok, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of one query's rows over its direct segments of one KV source (CSR): all tokens, or (CAUSAL)
    the range the query at position `pos` sees (every row of the program is that query: no per-row mask)."""
    for i in range(tl.load(indptr_ptr + query), tl.load(indptr_ptr + query + 1)):
        seg = tl.load(segs_ptr + i)
        length, page_base = _segment_bounds(seg, seg_lens_ptr, seg_capacity_ptr, seg_page_start_ptr)
        kv_lo = 0
        kv_hi = length
        if CAUSAL:
            kv_lo, kv_hi = _visible_range(pos, tl.load(seg_start_ptr + seg), length, window, WINDOW)
        m_i, l_i, acc = _attend_tokens(q, m_i, l_i, acc, kv_lo, kv_hi, kv_lo, kv_hi, page_base, page_table_ptr,
                                       page_size, k_ptr, v_ptr, kv_head, stride_kp, stride_ks, stride_kh, stride_vp,
                                       stride_vs, stride_vh, sm_scale_log2, softcap_log2, dims, dim_ok, BLOCK_N, False,
                                       SOFTCAP, DOT_FP32, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr,
    page_table_ptr, seg_page_start_ptr, seg_capacity_ptr, seg_lens_ptr, seg_queries_ptr,
    work_seg_ptr, work_kv_start_ptr, work_kv_end_ptr, work_q_start_ptr, work_q_end_ptr, work_out_ptr,
    seg_start_ptr, positions_ptr,
    page_size, head_dim, num_q_heads, sm_scale_log2, softcap_log2, window,
    stride_qn, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    GROUP: tl.constexpr, M_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """part_o [num_partials, Hq, BLOCK_D] and part_lse [num_partials, Hq] are contiguous fp32; q, K, V have
    unit stride in head_dim. CAUSAL: seg_start [segments of the source], positions [num_queries] int32."""
    item = tl.program_id(0) // M_TILES
    tile = tl.program_id(0) % M_TILES
    kv_head = tl.program_id(1)

    seg = tl.load(work_seg_ptr + item)
    q_lo = tl.load(work_q_start_ptr + item)
    num_rows = (tl.load(work_q_end_ptr + item) - q_lo) * GROUP
    length, page_base = _segment_bounds(seg, seg_lens_ptr, seg_capacity_ptr, seg_page_start_ptr)
    kv_lo = tl.load(work_kv_start_ptr + item)
    kv_hi = tl.minimum(tl.load(work_kv_end_ptr + item), length)
    if tile * BLOCK_M >= num_rows:  # a spare m-tile of a small item: no kv work, nothing stored
        kv_hi = kv_lo

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    query = tl.load(seg_queries_ptr + q_lo + rows // GROUP, mask=row_ok, other=0).to(tl.int64)
    heads = kv_head * GROUP + rows % GROUP
    row_lo = kv_lo
    row_hi = kv_hi
    if CAUSAL:  # each row's visible tokens within the chunk; the loop covers their union only
        row_lo, row_hi = _visible_range(tl.load(positions_ptr + query, mask=row_ok, other=0),
                                        tl.load(seg_start_ptr + seg), length, window, WINDOW)
        row_lo = tl.maximum(row_lo, kv_lo)
        row_hi = tl.minimum(row_hi, kv_hi)
        seen = row_ok & (row_lo < row_hi)
        kv_lo = tl.min(tl.where(seen, row_lo, kv_hi), 0)
        kv_hi = tl.max(tl.where(seen, row_hi, 0), 0)  # no row sees the chunk: kv_hi <= kv_lo, no kv work
    q = tl.load(q_ptr + query[:, None] * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_tokens(q, m_i, l_i, acc, kv_lo, kv_hi, row_lo, row_hi, page_base, page_table_ptr,
                                   page_size, k_ptr, v_ptr, kv_head, stride_kp, stride_ks, stride_kh, stride_vp,
                                   stride_vs, stride_vh, sm_scale_log2, softcap_log2, dims, dim_ok, BLOCK_N, CAUSAL,
                                   SOFTCAP, DOT_FP32, DOT_PRECISION)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    part = (tl.load(work_out_ptr + item) + rows // GROUP).to(tl.int64) * num_q_heads + heads
    tl.store(part_o_ptr + part[:, None] * BLOCK_D + dims[None, :], o, mask=row_ok[:, None])
    tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    q_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, slot_indptr_ptr, slots_ptr,
    seg_page_start_ptr, seg_capacity_ptr, seg_lens_ptr, seg_start_ptr, positions_ptr, sinks_ptr,
    k0_ptr, v0_ptr, page_table0_ptr, direct0_indptr_ptr, direct0_segs_ptr, page_size0,
    k1_ptr, v1_ptr, page_table1_ptr, direct1_indptr_ptr, direct1_segs_ptr, page_size1,
    head_dim, num_q_heads, sm_scale_log2, softcap_log2, window, stride_qn, stride_qh,
    stride_k0p, stride_k0s, stride_k0h, stride_v0p, stride_v0s, stride_v0h,
    stride_k1p, stride_k1s, stride_k1h, stride_v1p, stride_v1s, stride_v1h,
    GROUP: tl.constexpr, HEAD_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PART_D: tl.constexpr, DIRECT0: tl.constexpr, DIRECT1: tl.constexpr,
    PARTIALS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o, lse of one query's GQA heads of one kv head: its direct segments of sources 0 and 1, then its partials,
    then (SINKS) the heads' sink logits sinks [Hq] (any float dtype) as keys with value 0.
    o [NQ, Hq, head_dim] and lse [NQ, Hq] contiguous; q, K, V unit stride in head_dim."""
    query = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // HEAD_SPLITS
    rows = (tl.program_id(1) % HEAD_SPLITS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DIRECT0 or DIRECT1:
        q = tl.load(q_ptr + query * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        pos = 0
        if CAUSAL:
            pos = tl.load(positions_ptr + query)
        if DIRECT0:
            m_i, l_i, acc = _attend_direct(q, m_i, l_i, acc, query, pos, direct0_indptr_ptr, direct0_segs_ptr,
                                           seg_lens_ptr, seg_capacity_ptr, seg_page_start_ptr, seg_start_ptr,
                                           page_table0_ptr, page_size0, k0_ptr, v0_ptr, kv_head, stride_k0p, stride_k0s,
                                           stride_k0h, stride_v0p, stride_v0s, stride_v0h, sm_scale_log2, softcap_log2,
                                           window, dims, dim_ok, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_FP32,
                                           DOT_PRECISION)
        if DIRECT1:
            m_i, l_i, acc = _attend_direct(q, m_i, l_i, acc, query, pos, direct1_indptr_ptr, direct1_segs_ptr,
                                           seg_lens_ptr, seg_capacity_ptr, seg_page_start_ptr, seg_start_ptr,
                                           page_table1_ptr, page_size1, k1_ptr, v1_ptr, kv_head, stride_k1p, stride_k1s,
                                           stride_k1h, stride_v1p, stride_v1s, stride_v1h, sm_scale_log2, softcap_log2,
                                           window, dims, dim_ok, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_FP32,
                                           DOT_PRECISION)
    # The direct state in natural-log units is a merge state (m, s = l_i, acc) of lse_merge_step.
    m = m_i * LN2
    if PARTIALS:
        for i in range(tl.load(slot_indptr_ptr + query), tl.load(slot_indptr_ptr + query + 1)):
            part = tl.load(slots_ptr + i).to(tl.int64) * num_q_heads + heads
            lse_i = tl.load(part_lse_ptr + part, mask=row_ok, other=float("-inf"))
            o_i = tl.load(part_o_ptr + part[:, None] * PART_D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                          other=0.0)
            m, l_i, acc = lse_merge_step(m, l_i, acc, lse_i, o_i)
    if SINKS:  # a key with logit sinks[h] and value 0
        sink = tl.load(sinks_ptr + heads, mask=row_ok, other=float("-inf")).to(tl.float32)
        m, l_i, acc = lse_merge_step(m, l_i, acc, sink, tl.zeros([BLOCK_M, BLOCK_D], tl.float32))
    o, lse = lse_merge_finish(m, l_i, acc)
    tl.store(o_ptr + (query * num_q_heads + heads[:, None]) * head_dim + dims[None, :],
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + query * num_q_heads + heads, lse, mask=row_ok)


# ---- launch configuration ----------------------------------------------------------------------------------------
# Tiles per dtype class: "16bit" (fp16/bf16 dots on tensor cores), "fp32" (exact IEEE fp32 dots on the FMA units,
# the default for fp32 inputs), "tf32" (fp32 inputs on tensor cores in TF32, ~1e-3 relative error: only where the
# caller set plan.fp32_precision = "tf32"). 16-bit partial tiles: M rows 64-128 (wgmma on Hopper needs M >= 64 and
# num_warps >= 4), BLOCK_N 64 (32 at head_dim 256), 8 warps from 128 x 128 accumulators, num_stages 3 on sm_90
# (pipelined loads; 2 on older parts): starting points from the Triton fused-attention tutorial's Hopper settings.
# Exact fp32 dots hold their operands in registers: bf16-sized tiles spilled 1.6-79 KB per thread (ptxas, sm_90a,
# Triton 3.9), so fp32 gets 32 x 32 tiles on 8 warps, which compile without spills at head_dim 64-256. Every default
# and candidate below is compiled by the offline sweep (python tools/triton_sweep.py, CI): no spills in the
# default tables, shared memory within the limit. Speed is unmeasured (no GPU yet): plan.tune() times the candidates.
PARTIAL_CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) per dtype class
    "16bit": ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3)),
    "fp32": ((32, 32, 8, 3), (16, 32, 8, 3), (32, 64, 8, 3), (16, 64, 8, 3), (32, 16, 8, 3)),
    "tf32": ((64, 32, 8, 3), (64, 16, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)),
}
FP32_PRECISIONS = ("ieee", "tf32")


def dtype_class(dtype: torch.dtype, fp32_precision: str = "ieee") -> str:
    """The tile table of inputs of `dtype` ("16bit", "fp32" or "tf32", see above)."""
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"plan.fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if fp32_precision == "tf32" else "fp32"


def _fit_head_dim(block_n: int, num_warps: int, bd: int) -> tuple[int, int]:
    """BLOCK_N and num_warps of a tile at padded head_dim bd: at 256, BLOCK_N <= 32 and 8 warps (4 warps spilled
    2.7 KB per thread in bf16, Triton 3.9, sm_90a)."""
    return (block_n, num_warps) if bd <= 128 else (min(block_n, 32), 8)


def partial_config(target: Target | None, kind: str, rows: int, head_dim: int, override=None) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the partial kernel for items of up to `rows` rows (GPU `target`;
    None: the interpreter) of dtype class `kind`; override: a (BLOCK_M, BLOCK_N, num_warps, num_stages) candidate."""
    bd = block_d(head_dim)
    rows = max(16, triton.next_power_of_2(rows))
    if target is None:  # interpreter: small tiles keep the emulated loops short
        return dict(BLOCK_M=min(64, rows), BLOCK_N=64 if bd <= 128 else 32, num_warps=4, num_stages=1)
    if override is not None:
        block_m, block_n, warps, stages = override
    elif kind == "16bit":
        block_m, block_n, stages = min(128, rows), 64, 3
        warps = 8 if block_m * bd >= 128 * 128 else 4
    elif kind == "fp32":
        block_m, block_n, warps, stages = min(32, rows), 32, 8, 3
    else:  # tf32: 64 rows for wgmma; at head_dim 256 BLOCK_N 32 spilled 72-140 B (fp32 K/V tiles), 16 does not
        block_m, block_n, warps, stages = 64, 32 if bd <= 128 else 16, 8, 3
    block_n, warps = _fit_head_dim(block_n, warps, bd)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages if target.arch >= 9 else 2)


def partial_shared_bytes(config: dict, head_dim: int, elem_bytes: int) -> int:
    """Upper bound of the partial kernel's shared memory: num_stages - 1 buffers of the K and V blocks (Triton's
    pipeliner keeps one load fewer than num_stages in flight), the q tile and an fp32 score tile. The offline sweep
    checks it against every compiled default and candidate (Triton 3.9, sm_90a: within 4% at the tightest)."""
    bd, bm, bn = block_d(head_dim), config["BLOCK_M"], config["BLOCK_N"]
    return (max(1, config["num_stages"] - 1) * 2 * bn * bd + bm * bd) * elem_bytes + 4 * bm * bn


def partial_candidates(target: Target, kind: str, head_dim: int) -> list[tuple]:
    """The candidates plan.tune() times for this dtype class and head_dim: PARTIAL_CANDIDATES[kind] as they run at
    this head_dim, without duplicates and without those whose shared memory could exceed the target's."""
    elem = 2 if kind == "16bit" else 4
    out = []
    for candidate in PARTIAL_CANDIDATES[kind]:
        cfg = partial_config(target, kind, 128, head_dim, candidate)
        fitted = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
        if fitted not in out and partial_shared_bytes(cfg, head_dim, elem) <= target.smem:
            out.append(fitted)
    return out


def decode_config(target: Target | None, kind: str, group: int, head_dim: int) -> dict:
    """Tiles of the decode-merge kernel: a program holds at most 64 x 128 fp32 accumulators (the GQA group's heads
    split over programs beyond that). GPU: 16-bit BLOCK_N 64 at head_dim 128, else 32 (16 rows x 64 tokens at
    head_dim 64 spilled 4-8 B); fp32 dots on 8 warps with BLOCK_N 32 and at most 16 rows from head_dim 128 on
    (32 rows spilled 0.3-9.8 KB per thread there). All: the offline sweep, Triton 3.9, sm_90a."""
    bd = block_d(head_dim)
    rows = max(16, triton.next_power_of_2(group))
    budget = 64 * 128 if target is None or kind == "16bit" else 64 * 64 if bd < 128 else 16 * bd
    block_m = max(16, min(rows, budget // bd))
    splits = triton.cdiv(rows, block_m)
    if target is None:
        return dict(BLOCK_M=block_m, HEAD_SPLITS=splits, BLOCK_N=64 if bd <= 128 else 32, num_warps=4, num_stages=1)
    block_n, warps = (64 if bd == 128 else 32, 4) if kind == "16bit" else (32, 8)
    return dict(BLOCK_M=block_m, HEAD_SPLITS=splits, BLOCK_N=block_n, num_warps=warps, num_stages=2)


def check_triton_shapes(head_dim: int) -> None:
    if not 1 <= head_dim <= 256:
        raise ValueError(f"backend 'triton' supports head_dim up to 256, got {head_dim}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels read head_dim with unit stride; other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


class _Launch:
    """Everything of a plan's Triton run that does not change between calls (grids, index views,
    constexprs, scalars), built on the first run for a (layout, heads, dtype, tiles, variant) and kept in the
    layout (a windowed layout is its own layout: the window is part of the layout's key)."""

    def __init__(self, plan, layout, q, pools, sm_scale, config, softcap, with_sinks):
        num_q, hq, d = q.shape
        hkv = pools[0][0].shape[2]
        group = hq // hkv
        bd = block_d(d)
        target = gpu_target(q.device)
        kind = dtype_class(q.dtype, plan.fp32_precision)
        dot_fp32 = target is None  # the interpreter's bf16 x bf16 tl.dot is wrong: fp32 dots there
        common = dict(DOT_FP32=dot_fp32, DOT_PRECISION="tf32" if kind == "tf32" and not dot_fp32 else "ieee",
                      CAUSAL=bool(layout.causal), WINDOW=layout.window is not None, SOFTCAP=softcap is not None)
        self.num_q, self.hq, self.d = num_q, hq, d
        # the kernels' run-time scalars sm_scale_log2, softcap_log2, window (unused ones are placeholders)
        self.scalars = (sm_scale * LOG2E, (softcap or 1.0) * LOG2E, int(layout.window or 0))
        self.workspace = plan.workspace("triton", layout.num_partials, hq, bd) if layout.num_partials else None
        dummy = layout.slot_indptr
        positions = layout.q_pos if layout.causal else dummy
        self.partials = []  # (source index, grid, index args, page_size, constexprs)
        for src, source in enumerate(layout.sources):
            if not source.num_work:
                continue
            rows = int(source.max_work_queries) * group  # plain ints in grids and constexprs, not numpy scalars
            cfg = partial_config(target, kind, rows, d, config)
            m_tiles = triton.cdiv(rows, cfg["BLOCK_M"])
            seg_start = layout.seg_start[source.seg_lo:source.seg_hi] if layout.causal else dummy
            self.partials.append((src, (int(source.num_work) * m_tiles, hkv),
                                  (*layout.source_views(source), layout.seg_queries, *source.work, seg_start,
                                   positions),
                                  max(pools[src][0].shape[1], 1),
                                  dict(GROUP=group, M_TILES=m_tiles, BLOCK_D=bd, **cfg, **common)))
        cfg = decode_config(target, kind, group, d)
        direct = [layout.direct[i] if i < len(layout.direct) else None for i in (0, 1)]
        tables = [layout.source_views(source)[0] for source in layout.sources]
        self.decode_grid = (num_q, hkv * cfg["HEAD_SPLITS"])
        self.decode_index = (layout.slot_indptr, layout.slots, layout.seg_page_start, layout.seg_capacity,
                             layout.seg_lens, layout.seg_start if layout.causal else dummy, positions)
        self.decode_source = [(tables[min(i, len(tables) - 1)], *(direct[i] if direct[i] is not None else (dummy, dummy)))
                              for i in (0, 1)]
        self.decode_consts = dict(GROUP=group, BLOCK_D=bd, PART_D=bd, DIRECT0=direct[0] is not None,
                                  DIRECT1=direct[1] is not None, PARTIALS=bool(layout.num_partials > 0),
                                  SINKS=with_sinks, **cfg, **common)


def run_plan(plan, q, pools, sm_scale: float, *, window: int | None = None, softcap: float | None = None,
             sinks: torch.Tensor | None = None):
    """Triton run of a plan's fused layout. pools: ((k, v) of source 0[, (k, v) of source 1]), each
    [pages, page_size, Hkv, D]. Partial tiles: plan.tuned["config"] when plan.tune() chose one.
    Variants (validated by tree_attention): window (plans with positions), softcap, sinks [Hq] on q's device.
    Returns (o [NQ, Hq, D] in q's dtype, lse [NQ, Hq] fp32)."""
    num_q, hq, d = q.shape
    check_triton_shapes(d)
    q = _unit_last(q)
    pools = [(_unit_last(k), _unit_last(v)) for k, v in pools]
    layout = plan.layout("fused", hq, pools[0][0].shape[2], d, q.element_size(), window)
    config = plan.tuned.get("config")
    key = (hq, q.dtype, sm_scale, config, softcap, sinks is not None, plan.fp32_precision)
    launch = layout.launches.get(key)
    if launch is None:
        launch = layout.launches[key] = _Launch(plan, layout, q, pools, sm_scale, config, softcap, sinks is not None)
    o = torch.empty(num_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_q, hq, dtype=torch.float32, device=q.device)
    if num_q == 0 or hq == 0:
        return o, lse
    part_o, part_lse = launch.workspace or (o, lse)
    with device_guard(q.device):
        for src, grid, index, page_size, consts in launch.partials:
            k, v = pools[src]
            _partial_attention_kernel[grid](
                q, k, v, part_o, part_lse, *index, page_size, d, hq, *launch.scalars,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                **consts)
        (k0, v0), (k1, v1) = pools[0], pools[-1]
        _decode_merge_kernel[launch.decode_grid](
            q, o, lse, part_o, part_lse, *launch.decode_index, lse if sinks is None else sinks,
            k0, v0, *launch.decode_source[0], max(k0.shape[1], 1), k1, v1, *launch.decode_source[1],
            max(k1.shape[1], 1), d, hq, *launch.scalars, q.stride(0), q.stride(1),
            k0.stride(0), k0.stride(1), k0.stride(2), v0.stride(0), v0.stride(1), v0.stride(2),
            k1.stride(0), k1.stride(1), k1.stride(2), v1.stride(0), v1.stride(1), v1.stride(2),
            **launch.decode_consts)
    return o, lse
