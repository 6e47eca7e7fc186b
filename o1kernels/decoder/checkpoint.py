"""Hugging Face checkpoint directories: config.json + safetensors (single file or sharded with an index).

Layout written and read:
  config.json                               HF LlamaConfig/Qwen2Config fields (+ "o1kernels_reward_head")
  model.safetensors                         all tensors, or, when sharded:
  model-00001-of-0000N.safetensors ...      shards
  model.safetensors.index.json              {"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}
A tied lm_head.weight is not stored (HF convention); it is re-tied to model.embed_tokens.weight on load.
The public PRM classes (model.PRM_ARCHITECTURES: no LM head) keep their own head names, read into and written from our
reward_head: Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM) score.0 / score.2 -> reward_head.mlp / .out,
Qwen2ForPrmModel (Skywork-o1-Open-PRM) v_head.summary -> reward_head.out; an lm_head they store is not loaded.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import ModelConfig, Transformer

# per PRM class: stored name prefix -> our name prefix
PRM_NAMES = {"Qwen2ForProcessRewardModel": {"score.0.": "reward_head.mlp.", "score.2.": "reward_head.out."},
             "Qwen2ForPrmModel": {"v_head.summary.": "reward_head.out."}}


def _renamed(name: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _stored_names(config: ModelConfig) -> dict[str, str]:
    """stored prefix -> our prefix for this config's checkpoint layout."""
    return PRM_NAMES.get(config.prm_architecture, {})

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers some old HF checkpoints store; recomputed here, so ignored on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _tensors_to_save(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings and model.lm_head is not None:
        state.pop("lm_head.weight")
    ours_to_stored = {new: old for old, new in _stored_names(model.config).items()}
    return {_renamed(k, ours_to_stored): v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(model: Transformer, path, *, max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a HF checkpoint directory at `path`; shard when its tensors exceed max_shard_bytes."""
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive integer or None, got {max_shard_bytes!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).replace("torch.", "")
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_config(path) -> ModelConfig:
    """Read and validate `path`/config.json (ValueError/FileNotFoundError saying what is wrong)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} not found: a checkpoint directory needs a config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed {str(cfg_path)!r}: {exc}") from None
    try:
        return ModelConfig.from_hf(cfg)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed {str(cfg_path)!r}: {exc}") from None


@contextmanager
def _open_safetensors(path: Path):
    """safe_open(path); a corrupt or truncated file is a ValueError naming it (not a SafetensorError)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise ValueError(f"corrupt or truncated safetensors file {str(path)!r}: {exc}") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each stored tensor name to the safetensors file holding it."""
    index_path = path / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed {str(index_path)!r}: {exc!r}") from None
        files = {}
        for name, fname in weight_map.items():
            fpath = path / str(fname)
            if not fpath.is_file():
                raise FileNotFoundError(f"shard {str(fpath)!r} listed in {INDEX_NAME} for {name!r} does not exist")
            files[name] = fpath
        return files
    single = path / WEIGHTS_NAME
    if not single.is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".safetensors", ".pt"))
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {str(path)!r} (found: {found or 'nothing'}); "
                                "only safetensors checkpoints are supported")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def load_checkpoint(path, *, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load a HF-format Llama/Qwen2 checkpoint directory into a Transformer on `device`.

    dtype: None keeps the config's torch_dtype (float32 when absent).
    """
    config = load_config(path)
    path = Path(path)
    if dtype is None:
        raw = json.loads((path / CONFIG_NAME).read_text())
        dtype = DTYPES.get(raw.get("torch_dtype") or raw.get("dtype") or "float32", torch.float32)
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {tuple(DTYPES.values())}, got {dtype}")
    device = torch.device(device)
    layout = _stored_names(config)
    stored_files = _weight_files(path)
    files = {_renamed(n, layout): f for n, f in stored_files.items()}
    stored_name = {_renamed(n, layout): n for n in stored_files}

    model = Transformer(config, device="meta", dtype=dtype)
    expected = {name: p for name, p in model.state_dict().items()}
    if config.tie_word_embeddings and config.has_lm_head:
        expected.pop("lm_head.weight")
    stored = {n for n in files if not n.endswith(IGNORED_SUFFIXES)
              and not (config.prm_architecture and n.startswith("lm_head."))}
    if config.tie_word_embeddings:
        stored.discard("lm_head.weight")  # some tied checkpoints store it anyway; it is the embedding
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")

    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for fpath, names in by_file.items():
        with _open_safetensors(fpath) as f:
            for name in names:
                t = f.get_tensor(stored_name[name])
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"tensor {name!r} in {str(fpath)!r} has shape {list(t.shape)}, "
                                     f"the config needs {list(expected[name].shape)}")
                if not t.is_floating_point():
                    raise TypeError(f"tensor {name!r} in {str(fpath)!r} has non-floating dtype {t.dtype}")
                state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()
