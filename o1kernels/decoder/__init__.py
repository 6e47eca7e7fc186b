"""Reference decoder: a Llama/Qwen2 model on our kernels, a paged KV cache shared across search branches,
and PRM-guided search over candidate branches.

  model.py       ModelConfig, Transformer (HF parameter names, optional PRM reward head)
  checkpoint.py  save_checkpoint / load_checkpoint (HF directory: config.json + safetensors, sharded or not)
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .model import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "load_checkpoint", "save_checkpoint"]
