"""Hugging Face transformers integration: many branches of a prompt over one paged KV pool, and PRM step scores.

Decoding (any decoder-only model whose attention o1kernels supports; see attention_specs / check_model):

    from o1kernels.integrations.transformers import TreeCache, generate_branches
    model.set_attn_implementation("o1kernels")     # registered with transformers' AttentionInterface on import
    cache = TreeCache(model)
    out = generate_branches(model, input_ids, cache=cache, do_sample=True, num_return_sequences=16, max_new_tokens=64)

Which models: accepted by capability, not by name. attention_specs derives each layer's AttentionSpec
(o1kernels.capabilities) from the config and the attention modules: heads, head_dim, sliding window per layer,
logit soft-cap, attention sinks, causality, cross-attention, ALiBi, MLA; the scaling a layer passes is used as
sm_scale. TreeCache refuses (ValueError, one line) what capabilities.unsupported_features names, layers whose attention
does not go through transformers' AttentionInterface and layer types other than full/sliding attention; at run time
each attention call is checked against its layer's spec (the window its mask carries, softcap, sinks, is_causal,
position_bias).

TreeCache is a transformers `Cache`. Each batch row of a forward is a branch of a KVTree (o1kernels.paged: a dense
block-table row) over a PagedKVPool: per layer, K/V pages [num_pages, page_size, Hkv, D] with one reference count per
page. `update` writes the rows' new K/V into their own pages and returns the layer's page pools; the "o1kernels"
attention function then runs o1kernels.paged.PagedAttention over the rows' block tables, which finds the pages rows
share (a prompt shared by N rows is read once per kv chunk for all of them):
  one new token per row (decode):  planned when the rows or their pages change, moved on with set_lengths otherwise;
  several new tokens per row:      one call, causal by query position over each row's tokens, the new ones included;
  a prefill (the rows held nothing, or TreeCache.prefill): the model's stock attention over the new tokens.
The layer's window, soft-cap, sinks and scaling go to PagedAttention.run as run-time arguments. A forward of a model set to
"o1kernels" without a TreeCache (no cache, or a DynamicCache) runs the attention transformers would run for the model
by default (stock_attention: SDPA, or the modeling file's eager attention where the model does not support SDPA, as
GPT-OSS's sinks and Gemma2's soft-cap need), so such a model still works everywhere else.

Rows are branches. transformers moves them itself: `batch_repeat_interleave(n)` forks every row into n rows (no copy),
`reorder_cache(beam_idx)` (beam search) and `batch_select_indices` fork the rows chosen several times and release the
rows not chosen. Callers can also `fork`, `release`, `new_branch` and `set_rows` directly. A fork shares the row's full
pages and gives each child a copy of its partial last page (at most page_size - 1 tokens per child, KVTree's rule), so
reordering beams at every token copies up to a page per beam and step: use a small page_size for transformers' beam
search (the reference decoder's step-level search forks once per step).

A row's cache length, as transformers sees it (`get_seq_length`), counts the left padding its prompt had; the padding
itself is never stored (`prefill` strips it) and a forward whose new tokens include padding is refused.

generate_branches(model, input_ids, ...) prefills each prompt but its last token once (one row per prompt; the prefill
forward runs the whole prompt, as stock generate's first forward does, so RoPE whose frequencies depend on the
forward's length, dynamic and longrope, sees the same length), forks it into the rows generate expands the batch to
(max(num_beams, num_return_sequences)) and calls model.generate (with use_cache=True), which feeds every row's last
prompt token and decodes. A forward whose position_ids do not continue its rows (tokens fed twice, as generate with
use_cache=False would) is refused. KV held: the prompt once (all but its last token) + per row its last
prompt token and the generated tokens but the last (transformers never runs the last sampled token), each rounded
up to whole pages.

Incremental PRM scoring at search scale: IncrementalPRMScorer(prm_model, fmt, head) keeps the PRM's branches in a
TreeCache mirrored from the search (add_prompt, fork, release) and scores each search step's new steps of every branch
in one backbone forward (rows right-padded: TreeCache.set_rows(new_tokens=) stores and attends only the real tokens),
in the PRM's own input format (o1kernels.prm_formats), the scores read by step_rewards at each step's last token.

PRM scoring: score_steps(prm_model, input_ids, step_token_id, head) runs the PRM's backbone once (no LM head), takes
the hidden states at the input of its final RMSNorm (checked to compute one: transformers' last_hidden_state is
already normed) and calls o1kernels.step_rewards with that norm fused, for the three PRM styles: TokenPairHead
(Math-Shepherd, two rows of the LM head; a model's logits_scaling / logit_scale folded in, a final logit soft-cap
refused), a classifier Linear(H, 2) or Sequential(Linear(H, Hm), ReLU, Linear(Hm, 2)) (Qwen2.5-Math-PRM), and a
value head Linear(H, 1) (sigmoid).

Checked with transformers 5.0, 5.17 and 5.24 (the `cache` / `past_key_values` argument name is taken from the
model's signature).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, PreTrainedModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("o1kernels.integrations.transformers needs transformers >= 5.0 "
                      f"(pip install 'o1kernels[hf]'): {exc}") from exc

from o1kernels._backend import resolve_backend
from o1kernels._checks import check_tensor
from o1kernels.capabilities import AttentionSpec, backend_unsupported_reason, unsupported_features
from o1kernels.paged import KVBudget, KVTree, PagedAttention, PagedKVPool
from o1kernels.step_rewards import step_rewards
from o1kernels.tree_attention import SUPPORTED_BACKENDS

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the environment
    raise ImportError("o1kernels.integrations.transformers needs transformers >= 5.0, found "
                      f"{transformers.__version__}")

ATTN_IMPLEMENTATION = "o1kernels"
UNKNOWN_TOKEN = -1  # the cache sees K/V, not token ids: KVTree's per-segment token lists hold this placeholder

# TreeCache.update hands (cache, layer, new keys, new values) to the attention call that follows it in the same layer.
_handoff = threading.local()


# ---- what a model's attention needs ---------------------------------------------------------------------------
def _calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward looks its attention function up in transformers' AttentionInterface (the only
    attention o1kernels can replace)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _layer_list(layers: list[int], num_layers: int) -> str:
    if len(layers) == num_layers:
        return "every layer"
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def attention_specs(model) -> list[AttentionSpec]:
    """The AttentionSpec of each decoder layer of a transformers model, derived from its config and attention modules
    (no model names): heads and head_dim from the config; sliding_window per layer from config.layer_types
    ("sliding_attention" layers take config.sliding_window; without layer_types a set sliding_window applies to every
    layer, as transformers' masks do); softcap from attn_logit_softcapping; sinks from a `sinks` tensor on the
    attention module; non-causal from is_causal (config or module); cross-attention from is_encoder_decoder /
    add_cross_attention / is_cross_attention modules; ALiBi from alibi / position_embedding_type; MLA from
    kv_lora_rank. The scaling a layer passes to its attention function (Gemma's query_pre_attn_scalar, Granite's
    attention_multiplier) is taken at run time: every backend takes any sm_scale."""
    return _analyse(model)[0]


def _analyse(model) -> tuple[list[AttentionSpec], dict[str, list[int]]]:
    """(attention_specs, {what no AttentionSpec describes: the layers it concerns}): layers whose attention does not
    go through transformers' AttentionInterface, layer types other than full and sliding attention."""
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (an nn.Module with a config), got {type(model).__name__}")
    num_layers = config.num_hidden_layers
    modules: dict[int, list[nn.Module]] = defaultdict(list)
    for m in model.modules():
        if _calls_attention_interface(m) and _is_int(getattr(m, "layer_idx", None)):
            modules[m.layer_idx].append(m)
    problems: dict[str, list[int]] = defaultdict(list)
    for i in range(num_layers):
        if not modules[i]:
            problems["attention computed outside transformers' AttentionInterface (which o1kernels cannot see or "
                     "replace)"].append(i)
    window = getattr(config, "sliding_window", None) or None  # 0 means none (Qwen2-MoE without sliding layers)
    layer_types = getattr(config, "layer_types", None) or ["full_attention" if window is None else
                                                           "sliding_attention"] * num_layers
    for i, kind in enumerate(layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            problems[f"{kind} layers"].append(i)
    heads = config.num_attention_heads
    common = dict(
        num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        dtype=next(model.parameters()).dtype, softcap=getattr(config, "attn_logit_softcapping", None),
        alibi=bool(getattr(config, "alibi", False)) or getattr(config, "position_embedding_type", None) == "alibi",
        latent=getattr(config, "kv_lora_rank", None) is not None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False)
                           or getattr(config, "add_cross_attention", False))
    specs = []
    for i in range(num_layers):
        cross = [m for m in modules[i] if getattr(m, "is_cross_attention", False)]
        own = [m for m in modules[i] if m not in cross]
        specs.append(AttentionSpec(
            **common, sliding_window=window if layer_types[i] == "sliding_attention" else None,
            sinks=any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in own),
            non_causal=not getattr(config, "is_causal", True) or not all(getattr(m, "is_causal", True) for m in own),
            cross_attention=encoder_decoder or bool(cross)))
    return specs, problems


def check_model(model, what: str = "model", backend: str = "auto") -> list[AttentionSpec]:
    """attention_specs(model), or ValueError (one line) naming everything o1kernels cannot run and in which layers
    (capabilities.unsupported_features of each layer's spec, and what no spec describes), or what `backend`, when not
    "auto", does not implement."""
    specs, problems = _analyse(model)
    by_position = _attends_by_position(specs)
    calls = [dataclasses.replace(spec, positions=by_position) for spec in specs]
    for i, spec in enumerate(calls):
        for problem in unsupported_features(spec):
            problems[problem].append(i)
    if problems:
        raise ValueError(f"{what}: o1kernels does not support " + "; ".join(
            f"{p} ({_layer_list(layers, len(specs))})" for p, layers in problems.items()))
    if backend != "auto":
        for i, spec in enumerate(calls):
            reason = backend_unsupported_reason(backend, spec)
            if reason:
                raise ValueError(f"{what}: {reason} (needed by {_layer_list([i], len(specs))}); use backend='auto'")
    return specs


def _attends_by_position(specs: list[AttentionSpec]) -> bool:
    """Whether TreeCache's decode plans carry query positions for this model: yes when a layer has a sliding window
    (measured from each query's position); full attention over whole segments needs none."""
    return any(spec.sliding_window is not None for spec in specs)


def cache_argument(model) -> str:
    """The keyword under which `model`'s forward (and generate) takes a cache in the installed transformers: "cache"
    (newer releases; "past_key_values" is deprecated there) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class _Forward:
    """The forward pass in progress: its rows, new tokens per row, their pool slots and whether the cache attends."""

    rows: list[int]
    num_tokens: int  # T, new tokens per row
    slots: torch.Tensor  # pool slots of the stored tokens, row-major
    planned: bool  # the cache's PagedAttention is laid out over the rows (new tokens included); False: the rows held
    #                nothing before (a prefill: the model's own attention over the new tokens)
    stored: torch.Tensor | None = None  # flat indices into the [R * T] new tokens of those stored (None: all)
    positions: list[int] | None = None  # first new token's position in each row (= tokens the row held before)
    next_layer: int = 0


class _Masks:
    """What the "o1kernels" mask function hands to the attention function: the arguments of transformers' mask call
    (the mask a stock attention implementation needs is built from them on first use), the 2-D padding mask
    (bool [B, kv], False at padding; None without one), the window the mask carries (`local_size`: sliding window or
    chunk) and whether it adds a custom pattern (or/and mask functions)."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        padding = kwargs.get("attention_mask")
        self.padding = padding if isinstance(padding, torch.Tensor) and padding.dim() == 2 else None
        self.local_size = kwargs.get("local_size")
        self.custom = bool(kwargs.get("use_vmap", False))
        self._built: dict = {}

    def build(self, implementation: str):
        if implementation not in self._built:
            self._built[implementation] = ALL_MASK_ATTENTION_FUNCTIONS[implementation](**self.kwargs)
        return self._built[implementation]


_stock_attention_of: dict[type, tuple] = {}


def stock_attention(module: nn.Module):
    """(name, function) of the attention transformers runs `module`'s model with by default: "sdpa" where the
    model's modeling file declares SDPA support, else "eager", that file's own eager_attention_forward (which
    implements everything the model needs: GPT-OSS's sinks, Gemma2's soft-cap). RuntimeError when neither exists."""
    cls = type(module)
    if cls not in _stock_attention_of:
        modeling = sys.modules[cls.__module__]
        models = [c for c in vars(modeling).values()
                  if isinstance(c, type) and issubclass(c, PreTrainedModel) and c.__module__ == modeling.__name__]
        eager = getattr(modeling, "eager_attention_forward", None)
        if models and all(c._supports_sdpa for c in models):
            _stock_attention_of[cls] = ("sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"])
        elif callable(eager):
            _stock_attention_of[cls] = ("eager", eager)
        else:
            raise RuntimeError(f"{cls.__name__} (in {modeling.__name__}) needs an attention other than SDPA and its "
                               "modeling file has no eager_attention_forward: o1kernels cannot run it without a "
                               "TreeCache")
    return _stock_attention_of[cls]


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

    model: a transformers model set to attn_implementation "o1kernels" whose attention o1kernels supports
    (check_model: ValueError naming what is missing otherwise). page_size: tokens per page; num_pages: fixed pool size
    (None: grow on demand, KVPoolExhausted when fixed and full); backend: of tree_attention ("auto", "torch",
    "triton", "cpu", "cuda"; "auto" picks per call one that implements what the layer needs; an explicit one is
    checked against the model's decode steps here, and a forward of several tokens per row after context, which
    attends by query position, needs a backend implementing positions); dtype, device: of the pool (default: the
    model's); kv_budget: an o1kernels.paged.KVBudget the pool shares with other pools (a policy's and its PRM's).
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None, backend: str = "auto",
                 dtype: torch.dtype | None = None, device=None, kv_budget: KVBudget | None = None):
        self.specs = check_model(model, backend=backend)
        param = next(model.parameters())
        dtype = param.dtype if dtype is None else dtype
        device = param.device if device is None else torch.device(device)
        resolve_backend(backend, device, SUPPORTED_BACKENDS)  # a bad or unavailable backend fails here
        config = model.config
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"model uses attn_implementation {config._attn_implementation!r}; TreeCache needs "
                             f"{ATTN_IMPLEMENTATION!r}: model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) or "
                             f"from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r})")
        shapes = sorted({(spec.num_kv_heads, spec.head_dim) for spec in self.specs})
        if len(shapes) > 1:
            raise ValueError(f"model: layers differ in (kv heads, head_dim): {shapes}; TreeCache's pool holds one "
                             "shape")
        self.backend = backend
        self.num_kv_heads, self.head_dim = shapes[0]
        self.num_layers = len(self.specs)
        num_heads = sorted({spec.num_heads for spec in self.specs})
        if len(num_heads) > 1:
            raise ValueError(f"model: layers differ in query heads: {num_heads}; TreeCache plans one shape")
        self.pool = PagedKVPool(self.num_layers, self.num_kv_heads, self.head_dim, page_size=page_size,
                                num_pages=num_pages, dtype=dtype, device=device, budget=kv_budget)
        self.attn = PagedAttention(page_size, (num_heads[0], self.num_kv_heads), self.head_dim, device=device,
                                   backend=backend, dtype=dtype)
        self.tree = KVTree(self.pool)
        self._config = config
        self._rows: list[int] = []
        self._offset: dict[int, int] = {}  # branch -> left padding stripped from its prompt (transformers' positions)
        self._forward: _Forward | None = None
        self._prefill_stored: torch.Tensor | None = None  # bool [R, T]: the tokens TreeCache.prefill's forward stores
        self._new_tokens: list[int] | None = None  # set_rows(new_tokens=): the next forward's real tokens per row
        self._plan_key = None  # (rows, tree version) of a one-token plan that set_lengths can move on
        self._planned: dict[int, int] = {}  # branch -> its row in the last plan (the next plan continues them)
        super().__init__(layers=[_TreeCacheLayer(self, i) for i in range(self.num_layers)])

    # ---- branches -------------------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        """Branch id of each batch row of the next forward (empty: the next forward creates one root per row)."""
        return list(self._rows)

    def set_rows(self, branches, *, new_tokens=None) -> None:
        """Make the next forward's batch rows extend these distinct live branches, in order. new_tokens: per row how
        many of the next forward's T tokens are real (the rest right padding: neither stored nor attended; their
        outputs are zeros); the next forward only, which must have T = max(new_tokens)."""
        if isinstance(branches, (str, bytes)) or not hasattr(branches, "__iter__"):
            raise TypeError(f"branches must be a list of branch ids, got {type(branches).__name__}")
        branches = list(branches)
        for b in branches:
            self.tree.get(b)
        if len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct (two rows cannot extend one branch), got {branches}")
        if new_tokens is not None:
            new_tokens = list(new_tokens)
            if len(new_tokens) != len(branches) or not all(_is_int(n) and n >= 1 for n in new_tokens):
                raise ValueError(f"new_tokens must be one count >= 1 per row ({len(branches)}), got {new_tokens}")
        self._rows, self._new_tokens = branches, new_tokens

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
        k, v = key_states.transpose(1, 2).reshape(flat), value_states.transpose(1, 2).reshape(flat)
        if fwd.stored is not None:
            k, v = k[fwd.stored], v[fwd.stored]
        self.pool.write(layer_idx, fwd.slots, k, v)
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
        device = pool.k[0].device
        positions = [self.tree.get(b).length for b in rows]
        stored, planned = None, False
        keep = self._prefill_stored
        counts, self._new_tokens = self._new_tokens, None
        if counts is not None and max(counts) != t:
            raise ValueError(f"set_rows(new_tokens={counts}) needs a forward of {max(counts)} tokens per row, got {t}")
        if keep is not None:  # TreeCache.prefill: store the real tokens it keeps, attend as the model does
            if tuple(keep.shape) != (r, t):
                raise ValueError(f"TreeCache.prefill's forward must have its {list(keep.shape)} tokens, got {[r, t]}")
            counts = keep.sum(1).tolist()
            slots = [s for b, n in zip(rows, counts) for s in self.tree.append(b, [UNKNOWN_TOKEN] * n)]
            stored = keep.reshape(-1).nonzero().squeeze(1).to(device)
        elif counts is not None:
            slots = [s for b, n in zip(rows, counts) for s in self.tree.append(b, [UNKNOWN_TOKEN] * n)]
            stored = (torch.arange(t)[None, :] < torch.tensor(counts)[:, None]).reshape(-1).nonzero().squeeze(1)
            stored = stored.to(device)
            if any(positions):
                self._plan_rows(rows, t, counts)
                planned = True
        else:
            slots = [s for b in rows for s in self.tree.append(b, [UNKNOWN_TOKEN] * t)]
            if any(positions):
                self._plan_rows(rows, t)
                planned = True
        self._forward = _Forward(list(rows), t, torch.tensor(slots, dtype=torch.long, device=device), planned, stored,
                                 positions)

    def _plan_rows(self, rows: list[int], t: int, counts: list[int] | None = None) -> None:
        """Lay the rows' block tables out in the cache's PagedAttention (their new tokens appended: t per row, or
        counts[r]); a one-token step whose rows and pages are those of the last one only moves the lengths on."""
        lengths = self.tree.lengths(rows)
        key = (tuple(rows), self.tree.version) if t == 1 and counts is None else None
        if key is not None and key == self._plan_key:
            self.attn.set_lengths(lengths)
            return
        table, num_pages = self.tree.block_table(rows)
        continues = [self._planned.get(b, -1) for b in rows]  # a branch's pages are only appended or trimmed
        self.attn.plan(table, lengths, query_lens=counts or [t] * len(rows), num_pages=num_pages,
                       continues=continues)
        self._planned = {b: i for i, b in enumerate(rows)}
        self._plan_key = key

    @property
    def prefilling(self) -> bool:
        """Whether the forward in progress runs the model's own attention over its new tokens (the rows held nothing
        before it, or TreeCache.prefill runs it)."""
        return self._forward is not None and not self._forward.planned

    def check_call(self, layer_idx: int, masks: _Masks, dropout: float, kwargs: dict) -> None:
        """ValueError/RuntimeError (one line) when a layer's attention call asks for something its AttentionSpec
        (which TreeCache was checked against) does not say, or, at layer 0, when the forward's position_ids do not
        continue the rows (a forward feeding tokens the rows already hold: generate with use_cache=False)."""
        spec = self.specs[layer_idx]
        where = f"layer {layer_idx}"
        if dropout:
            raise ValueError(f"attention dropout must be 0 with TreeCache (put the model in eval mode), got {dropout}")
        if masks.custom:
            raise ValueError(f"{where}: the model's attention mask adds a custom pattern (or/and mask functions); "
                             "TreeCache attends causally over each row's branch")
        window = kwargs.get("sliding_window")
        if window not in (None, spec.sliding_window) or masks.local_size != spec.sliding_window:
            raise RuntimeError(f"{where}: the model's attention uses a window of {window} (its mask: "
                               f"{masks.local_size}), its config says {spec.sliding_window}")
        if kwargs.get("softcap") is not None and kwargs["softcap"] != spec.softcap:
            raise RuntimeError(f"{where}: the model's attention passes softcap={kwargs['softcap']}, its config says "
                               f"{spec.softcap}")
        if kwargs.get("s_aux") is not None and not spec.sinks:
            raise RuntimeError(f"{where}: the model's attention passes sinks (s_aux) its module does not hold")
        if kwargs.get("is_causal") is False:
            raise ValueError(f"{where}: TreeCache runs causal attention only, the model passes is_causal=False")
        if kwargs.get("position_bias") is not None:
            raise ValueError(f"{where}: TreeCache does not take an additive position_bias (ALiBi / relative bias)")
        fwd = self._forward
        if layer_idx or self._prefill_stored is not None:
            return
        t = fwd.num_tokens
        if masks.padding is not None and not bool(masks.padding[:, -t:].all()):
            raise ValueError("the forward's new tokens include padding (attention_mask 0): TreeCache stores only real "
                             "tokens; strip left padding with TreeCache.prefill (generate_branches does it)")
        position_ids = kwargs.get("position_ids")
        if not isinstance(position_ids, torch.Tensor):
            return
        if position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, len(fwd.rows)):
            raise ValueError(f"position_ids must be [rows, {t}] (one position per new token), got shape "
                             f"{list(position_ids.shape)}")
        expected = torch.tensor(fwd.positions, device=position_ids.device)[:, None] + torch.arange(
            t, device=position_ids.device)
        if not bool((position_ids == expected).all()):
            row = int((position_ids != expected).any(1).nonzero()[0])
            raise ValueError(f"the forward's position_ids {position_ids[row].tolist()[:8]} do not continue row {row}, "
                             f"which holds {fwd.positions[row]} tokens: TreeCache appends every forward's tokens to "
                             "its rows (generate with use_cache=False feeds the whole sequence again: use_cache=True)")

    def attend(self, layer_idx: int, query: torch.Tensor, sm_scale: float | None = None, *, window: int | None = None,
               softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the rows' new queries [R, Hq, T, D] over their branches (which hold this forward's keys and
        values already) -> [R, T, Hq, D] (query's dtype). sm_scale (None: D ** -0.5), window, softcap, sinks [Hq]:
        the layer's attention variant (tree_attention's)."""
        fwd = self._forward
        r, hq, t, d = query.shape
        if (r, t) != (len(fwd.rows), fwd.num_tokens):
            raise ValueError(f"query must have {len(fwd.rows)} rows of {fwd.num_tokens} tokens like the cache update, "
                             f"got shape {list(query.shape)}")
        q = query.transpose(1, 2).reshape(r * t, hq, d)
        real = fwd.stored  # right padding (set_rows(new_tokens=)): only the real queries attend
        o = self.attn.run(q if real is None else q[real], self.pool.k[layer_idx], self.pool.v[layer_idx],
                          sm_scale=sm_scale, window=window, softcap=softcap, sinks=sinks)
        if real is not None:
            o = q.new_zeros(r * t, hq, d).index_copy_(0, real, o.to(q.dtype))
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
        self._new_tokens = None
        self._forward = None
        self._plan_key = None
        self._planned = {}

    def __repr__(self) -> str:
        return (f"TreeCache(rows={len(self._rows)}, branches={len(self.tree.branches)}, "
                f"pages_in_use={self.pool.pages_in_use}, page_size={self.pool.page_size})")

    # ---- prompts ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                drop_last: bool = False) -> list[int]:
        """Store the prompts input_ids [B, L] (left padding per attention_mask stripped) in B new root branches,
        which become the rows; return their ids. drop_last: store all but each prompt's last token (generate feeds
        it: generate_branches).

        One forward of the model's backbone (no LM head) over the whole padded batch, with the positions and mask
        stock generate's first forward has, running the model's own attention: the stored K/V are what stock
        generate computes, also where RoPE depends on the forward's length (dynamic, longrope)."""
        if self._rows:
            raise ValueError(f"prefill needs a cache without rows, this one has {len(self._rows)}: reset() it or use a "
                             "new TreeCache")
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        b, length = input_ids.shape
        mask = torch.ones(b, length, dtype=torch.bool)
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, ndim=2)
            if tuple(attention_mask.shape) != (b, length):
                raise ValueError(f"attention_mask must have input_ids' shape {[b, length]}, got "
                                 f"{list(attention_mask.shape)}")
            mask = attention_mask.to("cpu", torch.bool)
            real = mask.sum(1)
            left_padded = (mask == (torch.arange(length)[None, :] >= (length - real)[:, None])).all(1)
            if not bool(left_padded.all()):
                row = int((~left_padded).nonzero()[0])
                raise ValueError(f"attention_mask row {row} is not left padding (zeros, then ones): decoder-only "
                                 "prompts must be padded on the left")
        keep = mask.clone()
        if drop_last:
            keep[:, -1] = False
        roots = [self.new_branch() for _ in range(b)]
        if keep.any():
            device = self.pool.k[0].device
            base = getattr(model, "base_model", model)
            positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # as generate sets them
            padded = None if bool(mask.all()) else mask.long().to(device)
            self._rows, self._prefill_stored = roots, keep
            try:
                base(input_ids=input_ids.to(device), attention_mask=padded, position_ids=positions.to(device),
                     use_cache=True, **{cache_argument(base): self})
            except BaseException:  # leave the cache as it was: no rows, no half-written branches
                self._rows, self._forward, _handoff.state = [], None, None
                for r in roots:
                    self._drop(r)
                raise
            finally:
                self._prefill_stored = None
        for r, pad in zip(roots, (length - mask.sum(1)).tolist()):
            self._offset[r] = pad
        self._rows = roots
        return list(roots)


def generate_branches(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      cache: TreeCache | None = None, **generate_kwargs):
    """model.generate over a TreeCache that holds each prompt's KV once for all its rows.

    input_ids [B, L] (left-padded per attention_mask). Prefills every prompt but its last token once
    (TreeCache.prefill(..., drop_last=True)), forks it into the max(num_beams, num_return_sequences) rows generate
    expands it to, then returns model.generate(input_ids, attention_mask=attention_mask, <cache>=cache,
    use_cache=True, **generate_kwargs) (sampling, greedy and beam search work as in generate; a checkpoint saved with
    use_cache false decodes with the cache all the same, as stock generate's tokens do not depend on it). cache: an
    empty TreeCache (default: a new TreeCache(model)).
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
    if generate_kwargs.get("use_cache", True) is False:
        raise ValueError("use_cache=False: generate would feed the whole sequence at every step; generate_branches "
                         "decodes through a TreeCache (leave use_cache unset)")
    if input_ids.shape[1] > 1:
        cache.prefill(model, input_ids, attention_mask, drop_last=True)
        cache.batch_repeat_interleave(expand)
    cache_arg = cache_argument(model)
    return model.generate(input_ids, attention_mask=attention_mask, **{cache_arg: cache},
                          **{**generate_kwargs, "use_cache": True})


def _mask_for_tree_cache(**kwargs) -> _Masks:
    """transformers mask function of the "o1kernels" implementation: hands its arguments on (see _Masks)."""
    return _Masks(kwargs)


def tree_cache_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """The "o1kernels" attention function (transformers AttentionInterface): query [R, Hq, T, D] -> ([R, T, Hq, D],
    weights or None). After a TreeCache.update it attends over the cache's branches (a prefill runs the model's stock
    attention over the new tokens); otherwise it is the model's stock attention (stock_attention: SDPA, or eager
    where the model needs it)."""
    state = getattr(_handoff, "state", None)
    _handoff.state = None
    if state is None:
        name, stock = stock_attention(module)
        mask = attention_mask.build(name) if isinstance(attention_mask, _Masks) else attention_mask
        return stock(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    cache, layer_idx, key_new, value_new = state
    if getattr(module, "layer_idx", layer_idx) != layer_idx or key is not cache.pool.k[layer_idx]:
        raise RuntimeError(f"the {ATTN_IMPLEMENTATION!r} attention of layer {getattr(module, 'layer_idx', '?')} does "
                           f"not follow its TreeCache.update (which was for layer {layer_idx})")
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError("TreeCache does not take a custom 4-D attention mask: which tokens a row sees is its branch")
    masks = attention_mask if isinstance(attention_mask, _Masks) else _Masks({})
    cache.check_call(layer_idx, masks, dropout, kwargs)
    if cache.prefilling:
        name, stock = stock_attention(module)
        return stock(module, query, key_new, value_new, masks.build(name), scaling=scaling, dropout=dropout, **kwargs)
    spec = cache.specs[layer_idx]
    return cache.attend(layer_idx, query, scaling, window=spec.sliding_window,
                        softcap=kwargs.get("softcap"), sinks=module.sinks if spec.sinks else None), None


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
    """(backbone module, its final norm `norm`, the norm's eps) of a transformers causal LM, base model or a wrapper
    whose base_model is one. score_steps then checks that the norm is the RMSNorm step_rewards fuses
    (_check_rms_norm: a LayerNorm or Gemma's (1 + weight) norm is refused)."""
    if not isinstance(prm_model, nn.Module) or getattr(prm_model, "config", None) is None:
        raise TypeError(f"prm_model must be a transformers model, got {type(prm_model).__name__}")
    base = getattr(prm_model, "base_model", prm_model)
    norm = getattr(base, "norm", None)
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        raise ValueError(f"prm_model's backbone {type(base).__name__} has no final RMSNorm `norm` (weight, eps) to "
                         "read pre-norm hidden states from")
    return base, norm, eps


def _check_rms_norm(norm: nn.Module, eps: float) -> None:
    """ValueError unless norm(x) = weight * x / sqrt(mean(x^2) + eps) on a fixed probe."""
    weight = norm.weight
    h = weight.shape[0]
    steps = torch.arange(h, dtype=torch.float32, device=weight.device)
    probe = torch.stack([torch.linspace(-2.0, 3.0, h, device=weight.device), torch.cos(steps) + 0.5])
    expected = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    with torch.no_grad():
        got = norm(probe.to(weight.dtype)).float()
    if not torch.allclose(got, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max())):
        raise ValueError(f"prm_model's final norm {type(norm).__name__} does not compute weight * x / rms(x) (an "
                         "RMSNorm), which step_rewards fuses")


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
        config = prm_model.config
        if getattr(config, "final_logit_softcapping", None) is not None:
            raise ValueError("TokenPairHead: the model soft-caps its logits (final_logit_softcapping), which two "
                             "LM-head rows cannot reproduce")
        # logits = lm_head(h) / logits_scaling (Granite) * logit_scale (Cohere): fold both into the two rows
        factor = getattr(config, "logit_scale", None) or 1.0
        factor /= getattr(config, "logits_scaling", None) or 1.0
        return {"weight": lm_head.weight[ids] * factor,
                "bias": None if lm_head.bias is None else lm_head.bias[ids] * factor,
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

    prm_model: a transformers model with a final RMSNorm `norm` (…ForCausalLM, base model, or a PRM wrapper whose
      base_model is one).
    input_ids [B, L] int64 (on the model's device); attention_mask [B, L] or None (padding is never a step).
    step_token_id: int or ints, the token(s) ending a step, where the PRM scores.
    head: TokenPairHead(positive_id, negative_id) (Math-Shepherd) | nn.Linear(H, C) | nn.Sequential(nn.Linear(H, Hm),
      nn.ReLU(), nn.Linear(Hm, C)) (Qwen2.5-Math-PRM); C == 1: sigmoid, C >= 2: softmax, reward = class positive_index.
    Returns (step_scores [B, L] float32, NaN off steps; chain_scores [B] float32, `aggregate` over each row's steps).
    The hidden states are taken at the input of the backbone's final RMSNorm, which step_rewards applies (fp32).
    """
    base, norm, eps = _prm_backbone(prm_model)
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
    _check_rms_norm(norm, eps)
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
                        norm_weight=norm.weight, norm_eps=eps, aggregate=aggregate,
                        backend=backend, **head_args)


class IncrementalPRMScorer:
    """PRM step scores of a search, incrementally, over a TreeCache: each search step's new steps of every branch in
    ONE backbone forward (right-padded rows, set_rows(new_tokens=)), nothing re-encoded.

    prm_model: a transformers PRM set to attn_implementation "o1kernels" (as score_steps takes it); fmt: its
    o1kernels.prm_formats format (the PRM's template, separators and tokenizer); head: as score_steps (None: the
    format's TokenPairHead, for Math-Shepherd); positive_index: score_steps'; page_size, num_pages, backend,
    kv_budget: the TreeCache's; aggregate: how chain scores combine a branch's step scores.
    add_prompt / fork / release mirror the search's branches; score(branches, steps) -> (step_scores [B],
    chain_scores [B]) float32 on the CPU. stats: forwards, tokens (new PRM tokens processed).
    """

    def __init__(self, prm_model, fmt, head=None, *, positive_index: int = 1, page_size: int = 16,
                 num_pages: int | None = None, backend: str = "auto", aggregate: str = "last",
                 kv_budget: KVBudget | None = None):
        from o1kernels.prm_formats import PRMFormat
        from o1kernels.step_rewards import AGGREGATES

        if not isinstance(fmt, PRMFormat):
            raise TypeError(f"fmt must be an o1kernels.prm_formats.PRMFormat, got {type(fmt).__name__}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.base, self.norm, eps = _prm_backbone(prm_model)
        with torch.no_grad():
            _check_rms_norm(self.norm, eps)
        if head is None:
            if fmt.token_pair is None:
                raise ValueError(f"head: {type(fmt).__name__} scores with the PRM's own head; pass it (an nn.Linear "
                                 "or the Sequential score head)")
            head = TokenPairHead(*fmt.token_pair)
        self._head = _head_tensors(prm_model, head, positive_index)
        self.eps, self.fmt, self.backend, self.aggregate = eps, fmt, backend, aggregate
        self.cache = TreeCache(prm_model, page_size=page_size, num_pages=num_pages, backend=backend,
                               kv_budget=kv_budget)
        self._model = prm_model
        self._steps: dict[int, list[float]] = {}
        self.stats = {"forwards": 0, "tokens": 0}

    @torch.no_grad()
    def add_prompt(self, question) -> int:
        """Prefill the PRM's prompt of `question` (text or ids, per the format); return its branch."""
        ids = torch.tensor([self.fmt.prompt_ids(question)], device=self.norm.weight.device)
        (root,) = self.cache.prefill(self._model, ids)
        self.cache.set_rows([])
        self._steps[root] = []
        return root

    def fork(self, branch: int, n: int) -> list[int]:
        kids = self.cache.fork(branch, n)
        for k in kids:
            self._steps[k] = list(self._steps[branch])
        return kids

    def release(self, branch: int) -> None:
        self.cache.release(branch)
        del self._steps[branch]

    def step_scores(self, branch: int) -> list[float]:
        self.cache.tree.get(branch)
        return list(self._steps[branch])

    @torch.no_grad()
    def score(self, branches, steps):
        """Append one step to each branch (text or ids, per the format) and score it, all in one forward:
        (step_scores [B], chain_scores [B]) float32 on the CPU."""
        from o1kernels.prm_formats import chain_score

        if isinstance(branches, (str, bytes)) or not hasattr(branches, "__iter__"):
            raise TypeError(f"branches must be a list of branch ids, got {type(branches).__name__}")
        branches = list(branches)
        for b in branches:
            self.cache.tree.get(b)
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or len(steps) != len(branches):
            raise ValueError(f"steps must hold one step per branch ({len(branches)})")
        if not branches:
            return torch.zeros(0), torch.zeros(0)
        ids = [self.fmt.step_ids(s, len(self._steps[b])) for b, s in zip(branches, steps)]
        device = self.norm.weight.device
        lens = torch.tensor([len(r) for r in ids])
        t = int(lens.max())
        tokens = torch.zeros(len(ids), t, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = torch.tensor(row)
        starts = torch.tensor([self.cache.branch_length(b) for b in branches])
        positions = starts[:, None] + torch.arange(t)
        self.cache.set_rows(branches, new_tokens=lens.tolist())
        captured = []
        hook = self.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.base(input_ids=tokens.to(device), position_ids=positions.to(device), use_cache=True,
                      **{cache_argument(self.base): self.cache})
        finally:
            hook.remove()
            self.cache.set_rows([])
        mask = torch.zeros(len(ids), t, dtype=torch.bool)
        mask[torch.arange(len(ids)), lens - 1] = True
        head = dict(self._head)
        scores, _ = step_rewards(captured[-1], mask.to(device), head.pop("weight"), head.pop("bias"),
                                 norm_weight=self.norm.weight, norm_eps=self.eps, aggregate="last",
                                 backend=self.backend, **head)
        new = scores[mask.to(device)].cpu()
        for b, x in zip(branches, new.tolist()):
            self._steps[b].append(x)
        self.stats["forwards"] += 1
        self.stats["tokens"] += int(lens.sum())
        chain = torch.tensor([chain_score(self._steps[b], self.aggregate) for b in branches], dtype=torch.float32)
        return new, chain
