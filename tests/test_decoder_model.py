"""Decoder model and HF checkpoints: logits against an independent float64 computation read straight from the
saved safetensors files, against transformers' Llama/Qwen2 (when installed), and bad checkpoints / configs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from o1kernels.decoder import ModelConfig, Transformer, load_checkpoint, save_checkpoint
from o1kernels.decoder.checkpoint import INDEX_NAME

# (dtype, atol, rtol) of logits against the float64 reference (fp32: worst seen 4e-7 on |logits| ~ 1). fp32: the
# model keeps HF's float32 RoPE tables
# (angles pos * inv_freq rounded to fp32) and fp32 matmuls over a few tiny layers.
# bf16: weights and activations rounded to 8 mantissa bits through two layers; worst seen 0.019 on |logits| <= 1.9.
LOGIT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (0.05, 0.02)}

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # head_dim 6: wavelengths 6.3 (kept), 50 (smoothed), 395 (divided)
CASES = {
    # name: config overrides
    "llama_gqa_llama3rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                                 rope_scaling=LLAMA3, rope_theta=500.0),
    "llama_mha_bias_linear": dict(model_type="llama", num_attention_heads=2, num_key_value_heads=2, attention_bias=True,
                                  rope_scaling={"type": "linear", "factor": 2.0}, head_dim=12),
    "qwen2_mqa_tied": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                           attention_bias=True),
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5)
    return ModelConfig(**{**base, **overrides})


def random_model(cfg: ModelConfig, dtype=torch.float32) -> Transformer:
    """A model with every parameter random (norm weights and biases too), so no term is trivially zero or one."""
    model = Transformer(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# ---------------------------------------------------------------- independent float64 reference
def reference_inv_freq(cfg: dict) -> torch.Tensor:
    d = cfg["head_dim"]
    freqs = [cfg["rope_theta"] ** (-2.0 * i / d) for i in range(d // 2)]
    sc = cfg.get("rope_scaling")
    kind = None if sc is None else sc.get("rope_type", sc.get("type"))
    out = []
    for f in freqs:
        if kind == "linear":
            f = f / sc["factor"]
        elif kind == "llama3":
            wavelen = 2 * math.pi / f
            low_wl = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
            high_wl = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
            if wavelen > low_wl:
                f = f / sc["factor"]
            elif wavelen >= high_wl:
                s = (sc["original_max_position_embeddings"] / wavelen - sc["low_freq_factor"]) / (
                    sc["high_freq_factor"] - sc["low_freq_factor"])
                f = (1 - s) * f / sc["factor"] + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def reference_logits(w: dict, cfg: dict, ids: list[int], *, return_hidden: bool = False):
    """Float64 Llama/Qwen2 forward from a raw tensor dict and a HF config dict, token by token (no batching)."""
    w = {k: v.double() for k, v in w.items()}
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    inv = reference_inv_freq(cfg)

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean() + eps) * weight

    def rotate(x, pos):  # x [heads, D]: pairs (i, i + D/2) as complex numbers
        z = torch.complex(x[:, : d // 2], x[:, d // 2:]) * torch.polar(torch.ones_like(inv), pos * inv)
        return torch.cat((z.real, z.imag), dim=1)

    def lin(x, name, bias_ok=True):
        y = w[name + ".weight"] @ x
        return y + w[name + ".bias"] if bias_ok and name + ".bias" in w else y

    xs = [w["model.embed_tokens.weight"][t] for t in ids]
    keys = [[] for _ in range(cfg["num_hidden_layers"])]
    vals = [[] for _ in range(cfg["num_hidden_layers"])]
    hidden = []
    for pos, x in enumerate(xs):
        for li in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{li}."
            h = norm(x, w[p + "input_layernorm.weight"])
            q = rotate(lin(h, p + "self_attn.q_proj").view(hq, d), pos)
            keys[li].append(rotate(lin(h, p + "self_attn.k_proj").view(hkv, d), pos))
            vals[li].append(lin(h, p + "self_attn.v_proj").view(hkv, d))
            k, v = torch.stack(keys[li]), torch.stack(vals[li])  # [pos+1, Hkv, D]
            heads = []
            for head in range(hq):
                kv_head = head // (hq // hkv)
                probs = torch.softmax(k[:, kv_head] @ q[head] / math.sqrt(d), dim=0)
                heads.append(probs @ v[:, kv_head])
            x = x + lin(torch.cat(heads), p + "self_attn.o_proj")
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            gate, up = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
            x = x + lin(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
        hidden.append(x)
    hidden = torch.stack(hidden)
    head_w = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = torch.stack([norm(h, w["model.norm.weight"]) for h in hidden]) @ head_w.T
    return (logits, hidden) if return_hidden else logits


def saved_tensors(path) -> dict:
    """Every tensor of a checkpoint directory, read with safetensors directly (not through load_checkpoint)."""
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def assert_close(actual, expected, dtype, what):
    atol, rtol = LOGIT_TOL[dtype]
    err = (actual.double() - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = err.flatten().topk(min(5, err.numel())).indices
        worst = [(i.item(), actual.flatten()[i].item(), expected.flatten()[i].item()) for i in idx]
        pytest.fail(f"{what}: {bad.sum().item()} of {err.numel()} mismatch ({dtype}, atol={atol}, rtol={rtol}); "
                    f"worst (index, actual, expected): {worst}")


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shard", [False, True])
def test_checkpoint_logits_match_reference(tmp_path, case, shard):
    cfg = tiny_config(**CASES[case])
    model = random_model(cfg)
    save_checkpoint(model, tmp_path, max_shard_bytes=4000 if shard else None)
    assert (tmp_path / INDEX_NAME).exists() == shard
    if shard:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    loaded = load_checkpoint(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    logits, hidden = loaded(ids, return_hidden=True)
    assert logits.dtype == torch.float32 and logits.shape == (2, 19, cfg.vocab_size)
    raw_cfg = json.loads((tmp_path / "config.json").read_text())
    tensors = saved_tensors(tmp_path)
    assert ("lm_head.weight" in tensors) == (not cfg.tie_word_embeddings)
    for b in range(2):
        ref_logits, ref_hidden = reference_logits(tensors, raw_cfg, ids[b].tolist(), return_hidden=True)
        assert_close(logits[b], ref_logits, torch.float32, f"{case} logits, sequence {b}")
        assert_close(hidden[b], ref_hidden, torch.float32, f"{case} pre-norm hidden, sequence {b}")


def test_bf16_load_and_forward(tmp_path):
    cfg = tiny_config(**CASES["llama_gqa_llama3rope"])
    save_checkpoint(random_model(cfg), tmp_path)
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, cfg.vocab_size, (1, 11))
    ref = reference_logits(saved_tensors(tmp_path), json.loads((tmp_path / "config.json").read_text()), ids[0].tolist())
    assert_close(model(ids)[0], ref, torch.bfloat16, "bf16 logits")


@pytest.mark.parametrize("arch,case", [("LlamaForCausalLM", "llama_gqa_llama3rope"),
                                       ("LlamaForCausalLM", "llama_mha_bias_linear"),
                                       ("Qwen2ForCausalLM", "qwen2_mqa_tied")])
def test_matches_transformers(tmp_path, arch, case):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(**CASES[case])
    model = random_model(cfg)
    save_checkpoint(model, tmp_path)
    hf = getattr(transformers, arch).from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        expected = hf(ids).logits.double()
    assert_close(load_checkpoint(tmp_path)(ids), expected, torch.float32, f"{arch} logits")


def test_config_roundtrip_and_hf_variants():
    cfg = tiny_config(**CASES["llama_gqa_llama3rope"], reward_head={"activation": "sigmoid", "num_classes": 1,
                                                                     "hidden": None, "step_token_id": 7})
    again = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert again == cfg
    assert again.reward_head == {"activation": "sigmoid", "num_classes": 1, "hidden": None, "positive_index": 0,
                                 "step_token_id": 7, "likelihood_weight": 0.0}
    # transformers >= 5 writes theta and scaling under rope_parameters
    hf5 = {k: v for k, v in cfg.to_hf().items() if k not in ("rope_theta", "rope_scaling")}
    hf5["rope_parameters"] = {"rope_theta": 500.0, **LLAMA3}
    assert ModelConfig.from_hf(hf5) == cfg
    # default head_dim and num_key_value_heads; eos list
    plain = ModelConfig.from_hf({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "eos_token_id": [3, 4]})
    assert (plain.head_dim, plain.num_key_value_heads, plain.eos_token_id) == (4, 2, 3)


@pytest.mark.parametrize("head", [
    {"activation": "softmax", "num_classes": 2, "hidden": 16, "positive_index": 1},
    {"activation": "sigmoid", "num_classes": 1, "hidden": None},
])
def test_reward_head_step_rewards(tmp_path, head):
    cfg = tiny_config(reward_head=head)
    model = random_model(cfg)
    save_checkpoint(model, tmp_path)
    model = load_checkpoint(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    _, hidden = model(ids, return_hidden=True)
    mask = torch.rand(2, 9) < 0.5
    mask[0, 8] = True
    scores, chain = model.step_rewards(hidden, mask, aggregate="min", backend="torch")
    w = {k: v.double() for k, v in saved_tensors(tmp_path).items()}
    h = hidden.double()
    x = h / torch.sqrt((h * h).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w["model.norm.weight"]
    if head["hidden"]:
        x = torch.relu(x @ w["reward_head.mlp.weight"].T + w["reward_head.mlp.bias"])
    logits = x @ w["reward_head.out.weight"].T + w["reward_head.out.bias"]
    ref = torch.sigmoid(logits[..., 0]) if head["activation"] == "sigmoid" else torch.softmax(logits, -1)[..., 1]
    assert torch.isnan(scores[~mask]).all()
    torch.testing.assert_close(scores[mask].double(), ref[mask], atol=1e-5, rtol=1e-5)
    for b in range(2):
        torch.testing.assert_close(chain[b].double(), ref[b][mask[b]].min(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no reward head"):
        random_model(tiny_config()).step_rewards(hidden, mask)


# ---------------------------------------------------------------- bad input
def write_checkpoint(path, **cfg_overrides):
    save_checkpoint(random_model(tiny_config(**cfg_overrides)), path)
    return path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    write_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_checkpoint(tmp_path / "a")
    save_checkpoint(random_model(tiny_config()), tmp_path / "b", max_shard_bytes=4000)
    next((tmp_path / "b").glob("model-00002-*")).unlink()
    with pytest.raises(FileNotFoundError, match="shard .*model-00002"):
        load_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": 3}, "multiple of num_key_value_heads"),
    ({"vocab_size": "big"}, "'vocab_size' must be a positive integer"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'factor'"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"o1kernels_reward_head": {"activation": "sigmoid", "num_classes": 2}}, "num_classes == 1"),
])
def test_malformed_config(tmp_path, changes, match):
    write_checkpoint(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path)


def test_malformed_json_and_tensors(tmp_path):
    write_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        load_checkpoint(tmp_path / "a")
    # config says more layers than stored: missing tensors named
    write_checkpoint(tmp_path / "b")
    edit_config(tmp_path / "b", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2"):
        load_checkpoint(tmp_path / "b")
    # wider hidden size than stored: shape mismatch named
    write_checkpoint(tmp_path / "c")
    edit_config(tmp_path / "c", intermediate_size=41)
    with pytest.raises(ValueError, match=r"has shape \[40, 24\], the config needs \[41, 24\]"):
        load_checkpoint(tmp_path / "c")
    # untied config over a tied checkpoint: lm_head missing
    write_checkpoint(tmp_path / "d", tie_word_embeddings=True)
    edit_config(tmp_path / "d", tie_word_embeddings=False)
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_checkpoint(tmp_path / "d")


def test_bad_forward_input_and_shard_size():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="input_ids must be a"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_checkpoint(model, "/tmp/unused", max_shard_bytes=0)
