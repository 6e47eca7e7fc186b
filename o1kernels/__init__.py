"""o1kernels: GPU kernels for o1-style test-time-compute decoding.

Public API:
  merge_states, shared_prefix_attention, SharedPrefixPlan, TreeAttentionPlan, tree_attention,
  step_rewards, available_backends, info (also `python -m o1kernels`);
  PRM input formats (o1kernels.prm_formats): PRMFormat, QwenMathPRM, MathShepherd, SkyworkPRM, RewardHeadFormat.
"""
from ._backend import BACKENDS, available_backends
from ._info import info
from .merge_states import merge_states
from .plan import SharedPrefixPlan, TreeAttentionPlan
from .shared_prefix_attention import shared_prefix_attention
from .tree_attention import tree_attention
from .step_rewards import step_rewards
from .prm_formats import MathShepherd, PRMFormat, QwenMathPRM, RewardHeadFormat, SkyworkPRM

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available_backends", "info", "__version__",
           "merge_states", "shared_prefix_attention", "SharedPrefixPlan", "TreeAttentionPlan", "tree_attention",
           "step_rewards", "PRMFormat", "QwenMathPRM", "MathShepherd", "SkyworkPRM", "RewardHeadFormat"]
