"""Hugging Face transformers integration: many branches of a prompt over one paged KV pool, and PRM step scores.

Decoding (model_type llama / qwen2, full attention):

    from o1kernels.integrations.transformers import TreeCache, generate_branches
    model.set_attn_implementation("o1kernels")     # registered with transformers' AttentionInterface on import
    cache = TreeCache(model)
    out = generate_branches(model, input_ids, cache=cache, do_sample=True, num_return_sequences=16, max_new_tokens=64)

TreeCache is a transformers `Cache`. Each batch row of a forward is a branch of a KVTree (o1kernels.decoder.kv_cache)
over a PagedKVPool: per layer, K/V pages [num_pages, page_size, Hkv, D] with one reference count per page. `update`
writes the rows' new K/V into their own pages and returns the layer's page pools; the "o1kernels" attention function
then runs, per layer:
  one new token per row (decode):  tree_attention over the rows' segments (a prompt shared by N rows is one segment,
                                   read once per kv chunk for all of them); the plan is rebuilt only when pages or
                                   rows change and grown with plan.set_lengths otherwise;
  several new tokens per row:      causal attention inside the chunk merged (merge_states) with tree_attention over
                                   what each row held before, as TreeDecoder.teacher_force does; plain causal SDPA
                                   when no row held anything (a prefill).
A forward of a model set to "o1kernels" without a TreeCache (no cache, or a DynamicCache) runs transformers' own SDPA
attention, so such a model still works everywhere else.

Rows are branches. transformers moves them itself: `batch_repeat_interleave(n)` forks every row into n rows (no copy),
`reorder_cache(beam_idx)` (beam search) and `batch_select_indices` fork the rows chosen several times and release the
rows not chosen. Callers can also `fork`, `release`, `new_branch` and `set_rows` directly. A fork starts every child on
a fresh page (KVTree's rule), so reordering beams at every token costs up to one page per beam and step: use a small
page_size for transformers' beam search (the reference decoder's step-level search forks once per step).

A row's cache length, as transformers sees it (`get_seq_length`), counts the left padding its prompt had; the padding
itself is never stored (`prefill` strips it) and a forward whose new tokens include padding is refused.

generate_branches(model, input_ids, ...) prefills each prompt but its last token once (one row per prompt), forks it
into the rows generate expands the batch to (max(num_beams, num_return_sequences)) and calls model.generate, which
feeds every row's last prompt token and decodes. KV held: the prompt once (all but its last token) + per row its last
prompt token and the generated tokens but the last (transformers never runs the last sampled token), each rounded
up to whole pages.

PRM scoring: score_steps(prm_model, input_ids, step_token_id, head) runs the PRM's backbone once (no LM head), takes
the hidden states at the input of its final RMSNorm (transformers' last_hidden_state is already normed) and calls
o1kernels.step_rewards with that norm fused, for the three PRM styles: TokenPairHead (Math-Shepherd, two rows of the
LM head), a classifier Linear(H, 2) or Sequential(Linear(H, Hm), ReLU, Linear(Hm, 2)) (Qwen2.5-Math-PRM), and a
value head Linear(H, 1) (sigmoid).

Checked with transformers 5.0, 5.17 and 5.24 (the `cache` / `past_key_values` argument name is taken from the
model's signature).
"""
from __future__ import annotations

import inspect
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("o1kernels.integrations.transformers needs transformers >= 5.0 "
                      f"(pip install 'o1kernels[hf]'): {exc}") from exc

from o1kernels._backend import resolve_backend
from o1kernels._checks import check_tensor
from o1kernels.decoder.engine import causal_attention_with_lse, plan_segments
from o1kernels.decoder.kv_cache import KVTree, PagedKVPool
from o1kernels.merge_states import merge_states
from o1kernels.step_rewards import step_rewards
from o1kernels.tree_attention import SUPPORTED_BACKENDS, TreeAttentionPlan, tree_attention

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the environment
    raise ImportError("o1kernels.integrations.transformers needs transformers >= 5.0, found "
                      f"{transformers.__version__}")

ATTN_IMPLEMENTATION = "o1kernels"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
UNKNOWN_TOKEN = -1  # the cache sees K/V, not token ids: KVTree's per-segment token lists hold this placeholder

# TreeCache.update hands (cache, layer, new keys, new values) to the attention call that follows it in the same layer.
_handoff = threading.local()


def check_model_config(config, what: str = "model") -> None:
    """ValueError unless `config` is a model family and attention layout the integration supports."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{what}: model_type {model_type!r} is not supported by o1kernels' transformers integration "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}: full causal attention with RoPE applied "
                         "before the cache update)")
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other or getattr(config, "use_sliding_window", False):
        raise ValueError(f"{what}: only full attention is supported, the config has layer types "
                         f"{other or ['sliding_attention']} (use_sliding_window="
                         f"{getattr(config, 'use_sliding_window', False)})")


def cache_argument(model) -> str:
    """The keyword under which `model`'s forward (and generate) takes a cache in the installed transformers: "cache"
    (newer releases; "past_key_values" is deprecated there) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class _Forward:
    """The forward pass in progress: its rows, new tokens per row, their pool slots and attention plan."""

    rows: list[int]
    num_tokens: int  # T, new tokens per row
    slots: torch.Tensor  # [R * T] flat pool slots, row-major
    plan: TreeAttentionPlan | None  # T == 1: over the rows' chains including the new token; T > 1: the context
    next_layer: int = 0


@dataclass(frozen=True)
class _Masks:
    """What the "o1kernels" mask function hands to the attention function: the 2-D padding mask [B, kv] (bool,
    False at padding; None without one) and transformers' own SDPA mask for forwards without a TreeCache."""

    padding: torch.Tensor | None
    sdpa: object


class _TreeCacheLayer(CacheLayerMixin):
    """Per-layer face of a TreeCache for transformers' generic code (a full-attention layer: not sliding, linear,
    compileable or croppable). The storage is the owning cache's pool."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: "TreeCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the pool is allocated by TreeCache

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query, *args):
        return self.cache.get_mask_sizes(query, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 names get_max_length so
        return -1

    def reset(self) -> None:
        pass  # TreeCache.reset releases the branches of every layer at once


class TreeCache(Cache):
    """transformers Cache holding every row (branch) of a batch in one paged, reference-counted KV pool.

    model: a transformers Llama/Qwen2 model set to attn_implementation "o1kernels". page_size: tokens per page;
    num_pages: fixed pool size (None: grow on demand, KVPoolExhausted when fixed and full); backend: of
    tree_attention / merge_states ("auto", "torch", "triton", "cpu", "cuda"); dtype, device: of the pool (default:
    the model's).
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None, backend: str = "auto",
                 dtype: torch.dtype | None = None, device=None):
        config = getattr(model, "config", None)
        if config is None or not isinstance(model, nn.Module):
            raise TypeError("model must be a transformers model (an nn.Module with a config), got "
                            f"{type(model).__name__}")
        check_model_config(config)
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"model uses attn_implementation {config._attn_implementation!r}; TreeCache needs "
                             f"{ATTN_IMPLEMENTATION!r}: model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) or "
                             f"from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r})")
        param = next(model.parameters())
        dtype = param.dtype if dtype is None else dtype
        device = param.device if device is None else torch.device(device)
        self.backend = backend
        resolve_backend(backend, device, SUPPORTED_BACKENDS)  # a bad or unavailable backend fails here
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.pool = PagedKVPool(self.num_layers, self.num_kv_heads, self.head_dim, page_size=page_size,
                                num_pages=num_pages, dtype=dtype, device=device)
        self.tree = KVTree(self.pool)
        self._config = config
        self._rows: list[int] = []
        self._offset: dict[int, int] = {}  # branch -> left padding stripped from its prompt (transformers' positions)
        self._forward: _Forward | None = None
        self._plan: TreeAttentionPlan | None = None
        self._plan_key = None
        self._plan_owners: list = []
        super().__init__(layers=[_TreeCacheLayer(self, i) for i in range(self.num_layers)])

    # ---- branches -------------------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        """Branch id of each batch row of the next forward (empty: the next forward creates one root per row)."""
        return list(self._rows)

    def set_rows(self, branches) -> None:
        """Make the next forward's batch rows extend these distinct live branches, in order."""
        if isinstance(branches, (str, bytes)) or not hasattr(branches, "__iter__"):
            raise TypeError(f"branches must be a list of branch ids, got {type(branches).__name__}")
        branches = list(branches)
        for b in branches:
            self.tree.get(b)
        if len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct (two rows cannot extend one branch), got {branches}")
        self._rows = branches

    def new_branch(self) -> int:
        """An empty root branch (not a row until set_rows)."""
        b = self.tree.new_branch()
        self._offset[b] = 0
        return b

    def fork(self, branch: int, n: int) -> list[int]:
        """n new branches sharing `branch`'s tokens read-only (no copy); `branch` stays alive."""
        kids = self.tree.fork(branch, n)
        for k in kids:
            self._offset[k] = self._offset[branch]
        return kids

    def release(self, branch: int) -> None:
        """Drop a branch that is not a row; pages no other branch references return to the free list."""
        self.tree.get(branch)
        if branch in self._rows:
            raise ValueError(f"branch {branch} is row {self._rows.index(branch)} of the batch: change the rows first "
                             "(set_rows, batch_select_indices) or reset() the cache")
        self._drop(branch)

    def _drop(self, branch: int) -> None:
        self.tree.release(branch)
        del self._offset[branch]

    def branch_length(self, branch: int) -> int:
        """Tokens the branch holds (its ancestors' and its own)."""
        return self.tree.get(branch).length

    def kv_bytes(self) -> int:
        """Bytes of the pool pages referenced now (all layers, K and V; whole pages)."""
        return self.pool.kv_bytes()

    def kv_bytes_dense(self) -> int:
        """Bytes one dense K/V copy per live branch would hold (what a DynamicCache holds, without padding)."""
        return self.tree.live_tokens() * self.pool.bytes_per_token

    # ---- the Cache interface --------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store one layer's new keys/values [R, Hkv, T, D] of the batch rows; return that layer's (k, v) page pools
        [num_pages, page_size, Hkv, D], which only the "o1kernels" attention function reads."""
        if getattr(_handoff, "state", None) is not None:
            _handoff.state = None
            raise RuntimeError(f"the attention after the previous TreeCache.update was not {ATTN_IMPLEMENTATION!r} "
                               f"(the model's attn_implementation is {self._config._attn_implementation!r})")
        if layer_idx == 0:
            self._begin_forward(key_states)
        fwd = self._forward
        if fwd is None or layer_idx != fwd.next_layer:
            raise RuntimeError(f"TreeCache.update for layer {layer_idx} out of order (expected layer "
                               f"{0 if fwd is None else fwd.next_layer}); layers must update 0..{self.num_layers - 1}")
        r, t = len(fwd.rows), fwd.num_tokens
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            check_tensor(name, x, ndim=4, dtypes=(self.pool.k[0].dtype,), device=self.pool.k[0].device)
            if tuple(x.shape) != (r, self.num_kv_heads, t, self.head_dim):
                raise ValueError(f"{name} of layer {layer_idx} must have shape "
                                 f"{[r, self.num_kv_heads, t, self.head_dim]} like layer 0's, got {list(x.shape)}")
        flat = (r * t, self.num_kv_heads, self.head_dim)
        self.pool.write(layer_idx, fwd.slots, key_states.transpose(1, 2).reshape(flat),
                        value_states.transpose(1, 2).reshape(flat))
        fwd.next_layer += 1
        _handoff.state = (self, layer_idx, key_states, value_states)
        return self.pool.k[layer_idx], self.pool.v[layer_idx]

    def _begin_forward(self, key_states) -> None:
        """Layer 0 of a forward: append its tokens to the rows' branches and plan the attention."""
        pool = self.pool
        check_tensor("key_states", key_states, ndim=4)
        if key_states.dtype != pool.k[0].dtype or key_states.device != pool.k[0].device:
            raise TypeError(f"key_states are {key_states.dtype} on {key_states.device} but the TreeCache pool is "
                            f"{pool.k[0].dtype} on {pool.k[0].device}: create the TreeCache from the model as it runs "
                            "(or pass dtype=/device= matching it)")
        r, hkv, t, d = key_states.shape
        if (hkv, d) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"key_states must have {self.num_kv_heads} kv heads of dim {self.head_dim} "
                             f"([R, Hkv, T, D]), got shape {list(key_states.shape)}")
        if self._config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"the model's attn_implementation changed to {self._config._attn_implementation!r}; "
                             f"TreeCache needs {ATTN_IMPLEMENTATION!r}")
        if self._forward is not None and self._forward.next_layer != self.num_layers:
            raise RuntimeError(f"a previous forward through this TreeCache stopped after layer "
                               f"{self._forward.next_layer - 1} of {self.num_layers}: its tokens are in the branches "
                               "without K/V in the later layers; reset() the cache")
        if not self._rows:
            self._rows = [self.new_branch() for _ in range(r)]
        elif r != len(self._rows):
            raise ValueError(f"the forward has {r} batch rows but the TreeCache has {len(self._rows)} rows; to decode "
                             f"several rows per prompt, fork the prompts' rows first (batch_repeat_interleave, or "
                             "generate_branches, which does it)")
        rows = self._rows
        plan = None
        if t > 1 and any(self.tree.get(b).length for b in rows):
            segs, _ = plan_segments(self.tree, rows, t)  # the context, before this chunk is appended
            plan = TreeAttentionPlan(segs, r * t, pool.page_size, device=pool.k[0].device)
        slots = [s for b in rows for s in self.tree.append(b, [UNKNOWN_TOKEN] * t)]
        if t == 1:
            plan = self._decode_plan(rows)
        self._forward = _Forward(list(rows), t, torch.tensor(slots, device=pool.k[0].device), plan)

    def _decode_plan(self, rows: list[int]) -> TreeAttentionPlan:
        key = (tuple(rows), self.tree.version)
        if key != self._plan_key:
            segs, self._plan_owners = plan_segments(self.tree, rows)
            self._plan = TreeAttentionPlan(segs, len(rows), self.pool.page_size, device=self.pool.k[0].device)
            self._plan_key = key
        else:
            self._plan.set_lengths([seg.length for seg in self._plan_owners])
        return self._plan

    def attend(self, layer_idx: int, query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor,
               padding: torch.Tensor | None, sm_scale: float | None) -> torch.Tensor:
        """Attention of the rows' new queries [R, Hq, T, D] over their branches -> [R, T, Hq, D] (query's dtype).

        key_new/value_new [R, Hkv, T, D]: this forward's keys/values (already in the pool); padding: the 2-D mask
        [R, kv] of the forward (checked at layer 0: new tokens must not be padding)."""
        fwd = self._forward
        r, hq, t, d = query.shape
        if (r, t) != (len(fwd.rows), fwd.num_tokens):
            raise ValueError(f"query must have {len(fwd.rows)} rows of {fwd.num_tokens} tokens like the cache update, "
                             f"got shape {list(query.shape)}")
        if layer_idx == 0 and padding is not None and not bool(padding[:, -t:].all()):
            raise ValueError("the forward's new tokens include padding (attention_mask 0): TreeCache stores only real "
                             "tokens; strip left padding with TreeCache.prefill (generate_branches does it)")
        sm_scale = d ** -0.5 if sm_scale is None else sm_scale
        k_pages, v_pages = self.pool.k[layer_idx], self.pool.v[layer_idx]
        if t == 1:
            o = tree_attention(query[:, :, 0, :].contiguous(), k_pages, v_pages, fwd.plan, sm_scale=sm_scale,
                               backend=self.backend)
            return o.unsqueeze(1)
        if fwd.plan is None:  # nothing before the chunk: a prefill
            o = F.scaled_dot_product_attention(query, key_new, value_new, is_causal=True, scale=sm_scale,
                                               enable_gqa=True)
            return o.transpose(1, 2)
        q = query.transpose(1, 2).reshape(r * t, hq, d)
        o_ctx, lse_ctx = tree_attention(q, k_pages, v_pages, fwd.plan, sm_scale=sm_scale, return_lse=True,
                                        backend=self.backend)
        chunks = [causal_attention_with_lse(q[i * t:(i + 1) * t], key_new[i].transpose(0, 1),
                                            value_new[i].transpose(0, 1), sm_scale) for i in range(r)]
        o, _ = merge_states(o_ctx, lse_ctx, torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]),
                            backend=self.backend)
        return o.view(r, t, hq, d)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Length of the rows as transformers counts it (stored tokens + stripped left padding), max over rows."""
        return max((self.tree.get(b).length + self._offset[b] for b in self._rows), default=0)

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' mask code; `query` is the query length (or, in transformers < 5.2,
        the cache_position tensor)."""
        q = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + q, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Fork every row into `repeats` consecutive rows (row i -> rows i*repeats .. i*repeats+repeats-1); no copy."""
        if not _is_int(repeats) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if repeats > 1:
            self._select_rows([i for i in range(len(self._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices) -> None:
        """Keep the rows at `indices` (in that order, repeats allowed: forked); release the others."""
        self._select_rows(indices)

    def reorder_cache(self, beam_idx) -> None:
        """Beam search: new row i continues old row beam_idx[i]; rows chosen k > 1 times are forked, unchosen ones
        released."""
        n = len(beam_idx)
        if n != len(self._rows):
            raise ValueError(f"beam_idx must have one entry per row ({len(self._rows)}), got {n}")
        self._select_rows(beam_idx)

    def _select_rows(self, indices) -> None:
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        bad = [i for i in idx if not _is_int(i) or not 0 <= i < len(self._rows)]
        if bad:
            raise ValueError(f"row indices must be integers in [0, {len(self._rows)}), got {bad[0]!r}")
        uses = Counter(idx)
        successors = {}
        for i, b in enumerate(self._rows):
            n = uses.get(i, 0)
            if n == 1:
                successors[i] = iter([b])
                continue
            if n > 1:
                successors[i] = iter(self.fork(b, n))
            self._drop(b)
        self._rows = [next(successors[i]) for i in idx]

    def crop(self, max_length: int) -> None:
        """Only crop(0) (a no-op) is supported: removing tokens from shared branches is not."""
        if max_length != 0:
            raise NotImplementedError("TreeCache cannot crop tokens (assisted decoding and deferred stop checks need "
                                      "it; use them with a DynamicCache)")

    def reset(self) -> None:
        """Release every branch: the pool's pages all return to the free list."""
        for b in list(self.tree.branches):
            self._drop(b)
        self._rows = []
        self._forward = None
        self._plan = self._plan_key = None
        self._plan_owners = []

    def __repr__(self) -> str:
        return (f"TreeCache(rows={len(self._rows)}, branches={len(self.tree.branches)}, "
                f"pages_in_use={self.pool.pages_in_use}, page_size={self.pool.page_size})")

    # ---- prompts ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
        """Store the prompts input_ids [B, L] (left padding per attention_mask stripped) in B new root branches,
        which become the rows; return their ids. One forward of the model's backbone per distinct padding length
        (no LM head)."""
        if self._rows:
            raise ValueError(f"prefill needs a cache without rows, this one has {len(self._rows)}: reset() it or use a "
                             "new TreeCache")
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        b, length = input_ids.shape
        pads = [0] * b
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, ndim=2)
            if tuple(attention_mask.shape) != (b, length):
                raise ValueError(f"attention_mask must have input_ids' shape {[b, length]}, got "
                                 f"{list(attention_mask.shape)}")
            mask = attention_mask.to("cpu", torch.bool)
            real = mask.sum(1)
            pads = (length - real).tolist()
            left_padded = (mask == (torch.arange(length)[None, :] >= (length - real)[:, None])).all(1)
            if not bool(left_padded.all()):
                row = int((~left_padded).nonzero()[0])
                raise ValueError(f"attention_mask row {row} is not left padding (zeros, then ones): decoder-only "
                                 "prompts must be padded on the left")
        device = self.pool.k[0].device
        roots = [self.new_branch() for _ in range(b)]
        by_pad: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(pads):
            self._offset[roots[i]] = p
            by_pad[p].append(i)
        base = getattr(model, "base_model", model)
        cache_arg = cache_argument(base)
        try:
            for p, group in by_pad.items():
                if p == length:
                    continue
                self._rows = [roots[i] for i in group]
                ids = input_ids[group, p:].to(device)
                positions = torch.arange(length - p, device=device).expand(len(group), -1)
                base(input_ids=ids, position_ids=positions, use_cache=True, **{cache_arg: self})
        except BaseException:  # leave the cache as it was: no rows, no half-written branches
            self._rows, self._forward, _handoff.state = [], None, None
            for r in roots:
                self._drop(r)
            raise
        self._rows = roots
        return list(roots)


def generate_branches(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      cache: TreeCache | None = None, **generate_kwargs):
    """model.generate over a TreeCache that holds each prompt's KV once for all its rows.

    input_ids [B, L] (left-padded per attention_mask). Prefills every prompt but its last token once, forks it into
    the max(num_beams, num_return_sequences) rows generate expands it to, then returns
    model.generate(input_ids, attention_mask=attention_mask, <cache>=cache, **generate_kwargs) (sampling, greedy and
    beam search work as in generate). cache: an empty TreeCache (default: a new TreeCache(model)).
    """
    if cache is None:
        cache = TreeCache(model)
    elif not isinstance(cache, TreeCache):
        raise TypeError(f"cache must be a TreeCache, got {type(cache).__name__}")
    if cache.tree.branches:
        raise ValueError(f"cache must be empty (a new TreeCache, or reset()), it holds {len(cache.tree.branches)} "
                         "branches")
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
    config = generate_kwargs.get("generation_config") or model.generation_config
    expand = max(int(generate_kwargs.get("num_beams", config.num_beams) or 1),
                 int(generate_kwargs.get("num_return_sequences", config.num_return_sequences) or 1))
    if input_ids.shape[1] > 1:
        cache.prefill(model, input_ids[:, :-1], None if attention_mask is None else attention_mask[:, :-1])
        cache.batch_repeat_interleave(expand)
    cache_arg = cache_argument(model)
    return model.generate(input_ids, attention_mask=attention_mask, **{cache_arg: cache}, **generate_kwargs)


def _mask_for_tree_cache(*args, attention_mask=None, **kwargs) -> _Masks:
    """transformers mask function of the "o1kernels" implementation: keeps the 2-D padding mask (TreeCache checks
    that no new token is padding) and builds transformers' SDPA mask for forwards without a TreeCache."""
    padding = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    return _Masks(padding, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, attention_mask=attention_mask, **kwargs))


def tree_cache_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """The "o1kernels" attention function (transformers AttentionInterface): query [R, Hq, T, D] -> ([R, T, Hq, D],
    None). After a TreeCache.update it attends over the cache's branches; otherwise it is transformers' SDPA."""
    state = getattr(_handoff, "state", None)
    _handoff.state = None
    masks = attention_mask if isinstance(attention_mask, _Masks) else _Masks(None, attention_mask)
    if state is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, masks.sdpa, scaling=scaling,
                                               dropout=dropout, **kwargs)
    cache, layer_idx, key_new, value_new = state
    if getattr(module, "layer_idx", layer_idx) != layer_idx or key is not cache.pool.k[layer_idx]:
        raise RuntimeError(f"the {ATTN_IMPLEMENTATION!r} attention of layer {getattr(module, 'layer_idx', '?')} does "
                           f"not follow its TreeCache.update (which was for layer {layer_idx})")
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError("TreeCache does not take a custom 4-D attention mask: which tokens a row sees is its branch")
    if dropout:
        raise ValueError(f"attention dropout must be 0 with TreeCache (put the model in eval mode), got {dropout}")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"TreeCache supports full attention only, got {name}={kwargs[name]!r}")
    return cache.attend(layer_idx, query, key_new, value_new, masks.padding, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, tree_cache_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask_for_tree_cache)


# ---- PRM scoring ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenPairHead:
    """Math-Shepherd-style PRM head: reward = softmax(lm_logits[[positive_id, negative_id]])[0], computed from those
    two LM-head rows only."""

    positive_id: int
    negative_id: int


def _prm_backbone(prm_model):
    """(backbone module, its final RMSNorm) of a transformers Llama/Qwen2 model (causal LM, base model or a wrapper
    whose base_model is one)."""
    if not isinstance(prm_model, nn.Module):
        raise TypeError(f"prm_model must be a transformers model, got {type(prm_model).__name__}")
    check_model_config(getattr(prm_model, "config", None), "prm_model")
    base = getattr(prm_model, "base_model", prm_model)
    norm = getattr(base, "norm", None)
    if not isinstance(getattr(norm, "weight", None), torch.Tensor) or not hasattr(norm, "variance_epsilon"):
        raise ValueError(f"prm_model's backbone {type(base).__name__} has no final RMSNorm `norm` (weight, "
                         "variance_epsilon) to read pre-norm hidden states from")
    return base, norm


def _head_tensors(prm_model, head, positive_index: int) -> dict:
    """step_rewards arguments (weight, bias, mlp_weight, mlp_bias, activation, positive_index) of a PRM head."""
    if isinstance(head, TokenPairHead):
        lm_head = prm_model.get_output_embeddings() if hasattr(prm_model, "get_output_embeddings") else None
        if not isinstance(lm_head, nn.Linear):
            raise ValueError("TokenPairHead needs a model with an LM head (a ...ForCausalLM), got "
                             f"{type(prm_model).__name__}")
        ids = [head.positive_id, head.negative_id]
        vocab = lm_head.weight.shape[0]
        if not all(_is_int(i) and 0 <= i < vocab for i in ids):
            raise ValueError(f"TokenPairHead ids must be token ids in [0, {vocab}), got {ids}")
        return {"weight": lm_head.weight[ids], "bias": None if lm_head.bias is None else lm_head.bias[ids],
                "mlp_weight": None, "mlp_bias": None, "activation": "softmax", "positive_index": 0}
    mlp = None
    out = head
    if isinstance(head, nn.Sequential):
        parts = list(head)
        if len(parts) != 3 or not (isinstance(parts[0], nn.Linear) and isinstance(parts[1], nn.ReLU)
                                   and isinstance(parts[2], nn.Linear)):
            raise ValueError("a Sequential head must be (Linear, ReLU, Linear), got "
                             f"{[type(p).__name__ for p in parts]}")
        mlp, out = parts[0], parts[2]
    if not isinstance(out, nn.Linear):
        raise TypeError("head must be a TokenPairHead, an nn.Linear(H, C) or an nn.Sequential(Linear, ReLU, Linear), "
                        f"got {type(head).__name__}")
    classes = out.out_features
    return {"weight": out.weight, "bias": out.bias, "mlp_weight": None if mlp is None else mlp.weight,
            "mlp_bias": None if mlp is None else mlp.bias, "activation": "sigmoid" if classes == 1 else "softmax",
            "positive_index": 0 if classes == 1 else positive_index}


@torch.no_grad()
def score_steps(prm_model, input_ids: torch.Tensor, step_token_id, head, *, attention_mask: torch.Tensor | None = None,
                positive_index: int = 1, aggregate: str = "min", backend: str = "auto"):
    """PRM step scores of sequences, from one backbone pass and the fused step_rewards kernel.

    prm_model: transformers Llama/Qwen2 model (…ForCausalLM, base model, or a PRM wrapper whose base_model is one).
    input_ids [B, L] int64 (on the model's device); attention_mask [B, L] or None (padding is never a step).
    step_token_id: int or ints, the token(s) ending a step, where the PRM scores.
    head: TokenPairHead(positive_id, negative_id) (Math-Shepherd) | nn.Linear(H, C) | nn.Sequential(nn.Linear(H, Hm),
      nn.ReLU(), nn.Linear(Hm, C)) (Qwen2.5-Math-PRM); C == 1: sigmoid, C >= 2: softmax, reward = class positive_index.
    Returns (step_scores [B, L] float32, NaN off steps; chain_scores [B] float32, `aggregate` over each row's steps).
    The hidden states are taken at the input of the backbone's final RMSNorm, which step_rewards applies (fp32).
    """
    base, norm = _prm_backbone(prm_model)
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32), device=norm.weight.device)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got "
                             f"{list(attention_mask.shape)}")
    step_ids = ([step_token_id] if _is_int(step_token_id)
                else list(step_token_id) if isinstance(step_token_id, Sequence) else None)
    vocab = base.get_input_embeddings().num_embeddings
    if not step_ids or not all(_is_int(i) and 0 <= i < vocab for i in step_ids):
        raise ValueError(f"step_token_id must be a token id (or ids) in [0, {vocab}), got {step_token_id!r}")
    head_args = _head_tensors(prm_model, head, positive_index)

    captured = []
    hook = norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    step_mask = torch.isin(input_ids, torch.tensor(step_ids, device=input_ids.device))
    if attention_mask is not None:
        step_mask &= attention_mask.bool()
    return step_rewards(captured[-1], step_mask, head_args.pop("weight"), head_args.pop("bias"),
                        norm_weight=norm.weight, norm_eps=float(norm.variance_epsilon), aggregate=aggregate,
                        backend=backend, **head_args)
