"""Llama/Qwen2-family decoder in plain torch, with Hugging Face parameter names.

The layer stack is written once (`Transformer.run_layers`) and takes the attention as a
callback, so the plain causal forward (training, tests), the tree decoder (paged KV, our
attention kernels) and the naive decoder (dense KV per branch) all share the same data path
and differ only in how a layer's queries attend to its keys.

Shapes: N tokens flattened, H = hidden_size, Hq/Hkv = query/key-value heads, D = head_dim.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
REWARD_ACTIVATIONS = ("sigmoid", "softmax")
# Key of our reward-head extension inside config.json. Its fields: activation, num_classes, hidden (an MLP layer before
# the output layer), positive_index, step_token_id, likelihood_weight (w >= 0, default 0: a step's reward is the head's
# times the model's own LM probability of the step's tokens given the prefix, to the power w; a PRMScorer computes it).
REWARD_HEAD_KEY = "o1kernels_reward_head"
# The public PRM families' model classes, read as a Transformer with a reward head and no LM head (checkpoint.py maps
# their parameter names; an LM head stored beside is not loaded), with the reward head each implies:
#   Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM): score.0 Linear(H, H) -> ReLU -> score.2 Linear(H, 2), softmax,
#   class 1
#   Qwen2ForPrmModel (Skywork-o1-Open-PRM): v_head.summary Linear(H, 1), sigmoid
PRM_ARCHITECTURES = {
    "Qwen2ForProcessRewardModel": {"activation": "softmax", "num_classes": 2, "hidden": "hidden_size",
                                   "positive_index": 1},
    "Qwen2ForPrmModel": {"activation": "sigmoid", "num_classes": 1},
}


def _positive_int(cfg: dict, key: str) -> int:
    val = cfg.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise ValueError(f"config field {key!r} must be a positive integer, got {val!r}")
    return val


def _number(cfg: dict, key: str, default: float) -> float:
    val = cfg.get(key, default)
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
        raise ValueError(f"config field {key!r} must be a finite positive number, got {val!r}")
    return float(val)


def _parse_rope_scaling(scaling) -> dict | None:
    """Normalise HF rope_scaling ({"type"|"rope_type": ..., ...}) to None or a dict with "rope_type"."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"config field 'rope_scaling' must be null or an object, got {scaling!r}")
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return None
    _number(scaling, "factor", None)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _number(scaling, key, None)
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")
    return {"rope_type": rope_type, **scaling}


def _parse_reward_head(head, vocab_size: int) -> dict | None:
    if head is None:
        return None
    if not isinstance(head, dict):
        raise ValueError(f"config field {REWARD_HEAD_KEY!r} must be null or an object, got {head!r}")
    act = head.get("activation")
    if act not in REWARD_ACTIVATIONS:
        raise ValueError(f"{REWARD_HEAD_KEY}.activation must be one of {REWARD_ACTIVATIONS}, got {act!r}")
    num_classes = _positive_int(head, "num_classes")
    if act == "sigmoid" and num_classes != 1:
        raise ValueError(f"{REWARD_HEAD_KEY}: sigmoid needs num_classes == 1, got {num_classes}")
    if act == "softmax" and num_classes < 2:
        raise ValueError(f"{REWARD_HEAD_KEY}: softmax needs num_classes >= 2, got {num_classes}")
    hidden = head.get("hidden")
    if hidden is not None:
        hidden = _positive_int(head, "hidden")
    pos = head.get("positive_index", 0 if act == "sigmoid" else 1)
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < num_classes:
        raise ValueError(f"{REWARD_HEAD_KEY}.positive_index must be in [0, {num_classes}), got {pos!r}")
    step = head.get("step_token_id")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < vocab_size):
        raise ValueError(f"{REWARD_HEAD_KEY}.step_token_id must be a token id in [0, {vocab_size}) or null, got {step!r}")
    weight = head.get("likelihood_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"{REWARD_HEAD_KEY}.likelihood_weight must be a finite number >= 0, got {weight!r}")
    return {"activation": act, "num_classes": num_classes, "hidden": hidden, "positive_index": pos,
            "step_token_id": step, "likelihood_weight": float(weight)}


@dataclass
class ModelConfig:
    """Architecture of a Llama/Qwen2 decoder (the fields of a HF config.json we use)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    reward_head: dict | None = None
    prm_architecture: str | None = None  # one of PRM_ARCHITECTURES (no LM head), or None (a causal LM)

    @property
    def has_lm_head(self) -> bool:
        return self.prm_architecture is None

    def __post_init__(self):
        # Re-validate through the HF path so direct construction gets the same checks.
        checked = ModelConfig._validated(dataclasses.asdict(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, checked[f.name])

    @staticmethod
    def _validated(cfg: dict) -> dict:
        model_type = cfg.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config field 'model_type' must be one of {tuple(MODEL_TYPES)}, got {model_type!r}")
        out = {"model_type": model_type}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            out[key] = _positive_int(cfg, key)
        hq = out["num_attention_heads"]
        hkv = cfg.get("num_key_value_heads")
        out["num_key_value_heads"] = hq if hkv is None else _positive_int(cfg, "num_key_value_heads")
        if hq % out["num_key_value_heads"]:
            raise ValueError(f"num_attention_heads ({hq}) must be a multiple of num_key_value_heads "
                             f"({out['num_key_value_heads']})")
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if out["hidden_size"] % hq:
                raise ValueError(f"hidden_size ({out['hidden_size']}) must be a multiple of num_attention_heads ({hq}) "
                                 "when head_dim is not given")
            head_dim = out["hidden_size"] // hq
        else:
            head_dim = _positive_int(cfg, "head_dim")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        out["head_dim"] = head_dim
        out["rms_norm_eps"] = _number(cfg, "rms_norm_eps", 1e-6)
        out["rope_theta"] = _number(cfg, "rope_theta", 10000.0)
        out["rope_scaling"] = _parse_rope_scaling(cfg.get("rope_scaling"))
        out["max_position_embeddings"] = _positive_int({"max_position_embeddings": 2048, **cfg},
                                                       "max_position_embeddings")
        for key, default in (("tie_word_embeddings", False), ("attention_bias", model_type == "qwen2")):
            val = cfg.get(key, default)
            if not isinstance(val, bool):
                raise ValueError(f"config field {key!r} must be a boolean, got {val!r}")
            out[key] = val
        if model_type == "qwen2" and not out["attention_bias"]:
            raise ValueError("qwen2 models always have q/k/v biases; attention_bias=false is not a qwen2 model")
        for key in ("bos_token_id", "eos_token_id"):
            val = cfg.get(key)
            if isinstance(val, list) and val and all(isinstance(v, int) for v in val):
                val = val[0]
            if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
                raise ValueError(f"config field {key!r} must be an integer or null, got {val!r}")
            out[key] = val
        out["reward_head"] = _parse_reward_head(cfg.get("reward_head"), out["vocab_size"])
        arch = cfg.get("prm_architecture")
        if arch is not None and (arch not in PRM_ARCHITECTURES or out["reward_head"] is None or model_type != "qwen2"):
            raise ValueError(f"prm_architecture must be one of {tuple(PRM_ARCHITECTURES)} (model_type qwen2, with a "
                             f"reward head) or None, got {arch!r}")
        out["prm_architecture"] = arch
        return out

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from a HF config.json dict (LlamaConfig / Qwen2Config; transformers 4 or 5 rope fields)."""
        if not isinstance(cfg, dict):
            raise ValueError(f"config must be a JSON object, got {type(cfg).__name__}")
        cfg = dict(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only hidden_act 'silu' (SwiGLU) is supported, got {cfg.get('hidden_act')!r}")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported (Llama/Qwen2 MLPs have no bias)")
        if cfg.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 puts theta and scaling here
        if isinstance(rope_params, dict):
            cfg.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
            if cfg.get("rope_scaling") is None:
                cfg["rope_scaling"] = rope_params
        cfg["reward_head"] = cfg.get(REWARD_HEAD_KEY)
        arch = next((a for a in cfg.get("architectures") or () if a in PRM_ARCHITECTURES), None)
        cfg["prm_architecture"] = arch
        if arch is not None and cfg["reward_head"] is None:
            cfg["reward_head"] = {k: cfg.get(v) if v == "hidden_size" else v
                                  for k, v in PRM_ARCHITECTURES[arch].items()}
        return cls(**cls._validated(cfg))

    def to_hf(self) -> dict:
        """The HF config.json dict (loadable by transformers' LlamaConfig/Qwen2Config)."""
        cfg = {
            "architectures": [self.prm_architecture or MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "llama":
            cfg.update(attention_bias=self.attention_bias, mlp_bias=False)
        else:
            cfg.update(use_sliding_window=False)
        if self.reward_head is not None:
            cfg[REWARD_HEAD_KEY] = dict(self.reward_head)
        return cfg


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [D/2] float32 with the config's theta and scaling."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).float()
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_ctx = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    # smooth = 0 above old_ctx/low (divided), 1 below old_ctx/high (kept), linear in old_ctx/wavelen between.
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return ((1 - smooth) * inv_freq / factor + smooth * inv_freq).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D] float32 for integer positions [N] (halves repeated, HF rotate_half convention)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by cos/sin [N, D] (computed in at least float32, returned in x's dtype)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Projections of one attention layer; the attention itself is the caller's callback."""

    def __init__(self, config: ModelConfig, **factory):
        super().__init__()
        hq, hkv, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, hq * d, bias=bias, **factory)
        self.k_proj = nn.Linear(h, hkv * d, bias=bias, **factory)
        self.v_proj = nn.Linear(h, hkv * d, bias=bias, **factory)
        # Llama's attention_bias covers o_proj too; Qwen2 has biases on q/k/v only.
        self.o_proj = nn.Linear(hq * d, h, bias=bias and config.model_type == "llama", **factory)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [N, H] -> q [N, Hq, D], k [N, Hkv, D] (both rotated), v [N, Hkv, D]."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, **factory):
        super().__init__()
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=False, **factory)
        self.up_proj = nn.Linear(h, m, bias=False, **factory)
        self.down_proj = nn.Linear(m, h, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, **factory):
        super().__init__()
        self.self_attn = Attention(config, **factory)
        self.mlp = MLP(config, **factory)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)

    def attention_input(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The layer up to its attention: x [N, H] -> q [N, Hq, D], k [N, Hkv, D] (normed, projected, rotated), v."""
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def attention_output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The layer after its attention: x + o_proj(o), then + mlp(norm(.)). x [N, H], o [N, Hq, D] -> [N, H]."""
        x = x + self.self_attn.o_proj(o.reshape(o.shape[0], -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Holds the `model.*` parameters (HF naming)."""

    def __init__(self, config: ModelConfig, **factory):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, **factory) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)


class RewardHead(nn.Module):
    """PRM head on the final-normed hidden state: [Linear(H, Hm) -> ReLU ->] Linear(., C)."""

    def __init__(self, config: ModelConfig, **factory):
        super().__init__()
        spec = config.reward_head
        width = spec["hidden"] or config.hidden_size
        self.mlp = nn.Linear(config.hidden_size, spec["hidden"], **factory) if spec["hidden"] else None
        self.out = nn.Linear(width, spec["num_classes"], **factory)


# attend(layer_index, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> o [N, Hq, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Transformer(nn.Module):
    """Llama/Qwen2 causal LM (+ optional PRM reward head) with HF parameter names."""

    def __init__(self, config: ModelConfig, *, device=None, dtype=None, init_std: float = 0.02):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.model = Backbone(config, **factory)
        self.lm_head = (nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory) if config.has_lm_head
                        else None)
        self.reward_head = RewardHead(config, **factory) if config.reward_head else None
        # RoPE inverse frequencies: not a parameter or buffer (never saved, never cast by .to(dtype)), float32,
        # copied once per device it is used on.
        self._inv_freq = {torch.device("cpu"): rope_inv_freq(config)}
        if self.model.embed_tokens.weight.device.type != "meta":
            self.init_weights(init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Random init: normal(0, std) matrices, zero biases, unit norms."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.normal_(0.0, std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn, *,
                   layer_input=DecoderLayer.attention_input, layer_output=DecoderLayer.attention_output) -> torch.Tensor:
        """input_ids, positions [N] -> last layer's hidden states [N, H] BEFORE the final norm.

        layer_input(layer, x, cos, sin), layer_output(layer, x, o): the two halves of a layer around its attention
        (default: DecoderLayer's own; the decode runner can pass compiled ones)."""
        if positions.device not in self._inv_freq:
            self._inv_freq[positions.device] = self._inv_freq[torch.device("cpu")].to(positions.device)
        cos, sin = rope_cos_sin(self._inv_freq[positions.device], positions)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            q, k, v = layer_input(layer, x, cos, sin)
            x = layer_output(layer, x, attend(i, q, k, v))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [..., H] -> logits [..., V] float32."""
        if self.lm_head is None:
            raise ValueError("this model has no LM head (a process reward model checkpoint): it scores, it does not "
                             "generate")
        return self.lm_head(self.model.norm(hidden)).float()

    def forward(self, input_ids: torch.Tensor, *, return_hidden: bool = False):
        """Full causal forward. input_ids [B, T] long -> logits [B, T, V] float32 (, hidden [B, T, H] pre-norm)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a [B, T] int64 tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).repeat(b)

        def causal(_, q, k, v):
            q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(b * t, o.shape[1], o.shape[3])

        hidden = self.run_layers(input_ids.reshape(-1), positions, causal).view(b, t, -1)
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def step_rewards(self, hidden: torch.Tensor, step_mask: torch.Tensor, *, aggregate: str = "last",
                     backend: str = "auto"):
        """Reward head at step positions through o1kernels.step_rewards (final norm fused in).

        hidden [Bs, L, H] pre-norm, step_mask [Bs, L] bool -> (step_scores [Bs, L] float32, NaN off steps;
        chain_scores [Bs] float32).
        """
        if self.reward_head is None:
            raise ValueError("this model has no reward head (config has no 'o1kernels_reward_head')")
        if self.config.reward_head["likelihood_weight"]:
            raise ValueError("this model's step scores include the step's likelihood (likelihood_weight "
                             f"{self.config.reward_head['likelihood_weight']}), which needs each step's tokens: "
                             "score with o1kernels.decoder.PRMScorer")
        from o1kernels import step_rewards

        head, spec = self.reward_head, self.config.reward_head
        return step_rewards(
            hidden, step_mask, head.out.weight, head.out.bias,
            norm_weight=self.model.norm.weight, norm_eps=self.config.rms_norm_eps,
            mlp_weight=None if head.mlp is None else head.mlp.weight,
            mlp_bias=None if head.mlp is None else head.mlp.bias,
            activation=spec["activation"], positive_index=spec["positive_index"],
            aggregate=aggregate, backend=backend,
        )
