"""Reference decoder: a Llama/Qwen2 model on our kernels, a paged KV cache shared across search branches
(o1kernels.paged), and PRM-guided search over candidate branches.

  model.py       ModelConfig, Transformer (HF parameter names, optional PRM reward head)
  checkpoint.py  save_checkpoint / load_checkpoint (HF directory: config.json + safetensors, sharded or not)
  engine.py      TreeDecoder: batched branch decoding on PagedAttention / step_rewards
  runner.py      DecodeRunner: TreeDecoder's decode step on the device (batch buckets, static buffers, CUDA graphs)
  sampling.py    greedy / seeded sampling shared by both decoders (uniforms hashed from seed, row, token index)
  naive.py       NaiveDecoder: dense KV copy per branch, per-branch attention, unfused scoring (the baseline)
  tokenizers.py  HFTokenizer: a Hugging Face tokenizer with the step_id / eos_id / decode that search() reads
  prm.py         PRMScorer: a PRM in its own checkpoint scoring every search step's new steps in one batched
                 forward, in its own input format; PRMScoredDecoder: a policy decoder + a PRMScorer for search()
"""
from o1kernels.paged import KVPoolExhausted, PagedKVPool

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import StepOutput, TreeDecoder
from .model import ModelConfig, Transformer
from .naive import NaiveDecoder
from .prm import PRMScoredDecoder, PRMScorer

__all__ = ["KVPoolExhausted", "ModelConfig", "NaiveDecoder", "PRMScoredDecoder", "PRMScorer", "PagedKVPool",
           "StepOutput", "Transformer", "TreeDecoder", "load_checkpoint", "save_checkpoint"]
