"""Paged, branching KV: the refcounted page pool, the branches over it (dense block-table rows), and the attention
layer that takes block tables and finds the sharing.

  pool.py       PagedKVPool (K/V pages per layer, vLLM layout, refcounts, journaled for atomic operations);
                KVBudget (one byte budget over several pools)
  tree.py       KVTree (branches as block-table rows: fork shares full pages and copies the partial last page)
  sharing.py    find_runs: which leading pages rows share, from the page ids (compiled host planner or numpy)
  attention.py  PagedAttention: plan(block tables, seq_lens, query_lens) / set_lengths / run
"""
from .attention import PagedAttention, table_from_indptr
from .pool import KVBudget, KVPoolExhausted, PagedKVPool
from .sharing import find_runs
from .tree import Branch, KVTree

__all__ = ["Branch", "KVBudget", "KVPoolExhausted", "KVTree", "PagedAttention", "PagedKVPool", "find_runs",
           "table_from_indptr"]
