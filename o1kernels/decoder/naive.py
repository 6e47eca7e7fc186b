"""NaiveDecoder: the baseline the tree decoder is measured against.

Each branch holds its own full dense KV copy (a fork copies the parent's KV), attention runs branch by branch with
torch SDPA over that copy, and step rewards are scored with unfused torch ops (final norm -> head -> activation).
generate_step is a per-token host loop: sample, read the tokens back (one host sync per token), stop finished
branches on the host, run the still-active ones. Same interface and sampling as TreeDecoder.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from o1kernels._checks import check_fits_memory

from .engine import SearchDecoder, StepOutput
from .model import Transformer
from .sampling import draw_step_seed, row_uniforms, sample_tokens


@dataclass(eq=False)
class DenseBranch:
    """k[layer], v[layer]: [Hkv, capacity, D]; the first `length` positions are filled."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0
    tokens: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


class NaiveDecoder(SearchDecoder):
    """Search branches with a dense per-branch KV copy and per-branch attention (see module docstring)."""

    def __init__(self, model: Transformer, *, device=None):
        super().__init__(model)
        if device is not None and torch.device(device) != model.device:
            raise ValueError(f"device {device} differs from the model's device {model.device}; move the model first")
        cfg = model.config
        element = torch.empty((), dtype=model.dtype).element_size()
        self.bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element
        self.branches: dict[int, DenseBranch] = {}
        self._next_id = 0

    def _branch(self, branch) -> DenseBranch:
        if isinstance(branch, bool) or not isinstance(branch, int) or branch not in self.branches:
            live = sorted(self.branches)
            raise ValueError(f"unknown branch id {branch!r} (live branches: {live[:16]}{' ...' if len(live) > 16 else ''})")
        return self.branches[branch]

    def _branch_table(self):
        return self.branches

    @contextmanager
    def _store_atomic(self, branches):
        """If the block raises: drop the branches it created and restore the listed branches' KV tensors
        (_ensure_capacity replaces them), lengths and tokens."""
        saved = [(br, list(br.k), list(br.v), br.length, len(br.tokens)) for br in map(self._branch, branches)]
        next_id = self._next_id
        try:
            yield
        except BaseException:
            for bid in range(next_id, self._next_id):
                self.branches.pop(bid, None)
            self._next_id = next_id
            for br, k, v, length, num_tokens in saved:
                br.k[:], br.v[:], br.length = k, v, length
                del br.tokens[num_tokens:]
            raise

    def _check_step_fits(self, branches, max_new_tokens):
        """Branches whose dense KV must grow get a new tensor of the full length (the old one is copied, then
        freed): that much memory must be available."""
        grown = [br.length + max_new_tokens for br in map(self._branch, branches)
                 if br.capacity < br.length + max_new_tokens]
        check_fits_memory("max_new_tokens", sum(grown) * self.bytes_per_token, self.model.device,
                          f"dense KV for {max_new_tokens} new tokens on {len(grown)} branches")

    def _new_branch(self, k, v, length, tokens) -> int:
        bid = self._next_id
        self._next_id += 1
        self.branches[bid] = DenseBranch(k, v, length, tokens)
        return bid

    def _ensure_capacity(self, br: DenseBranch, capacity: int) -> None:
        if br.capacity >= capacity:
            return
        cfg = self.model.config
        shape = (cfg.num_key_value_heads, capacity, cfg.head_dim)
        for cache in (br.k, br.v):
            for i, t in enumerate(cache):
                grown = torch.empty(shape, dtype=t.dtype, device=t.device)
                grown[:, :br.length] = t[:, :br.length]
                cache[i] = grown

    def _write(self, br: DenseBranch, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, Hkv, D] at positions br.length .. br.length + T."""
        br.k[layer][:, br.length:br.length + k.shape[0]] = k.transpose(0, 1)
        br.v[layer][:, br.length:br.length + v.shape[0]] = v.transpose(0, 1)

    def _attend_chunk(self, br: DenseBranch, layer: int, q, k, v) -> torch.Tensor:
        """Write the chunk's k/v after br.length, attend q [T, Hq, D] causally over the branch -> [T, Hq, D]."""
        self._write(br, layer, k, v)
        t = q.shape[0]
        total = br.length + t
        keys, values = br.k[layer][:, :total], br.v[layer][:, :total]
        mask = None
        if t > 1:
            mask = torch.arange(total, device=q.device)[None, :] <= torch.arange(br.length, total, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True)
        return o.transpose(0, 1)

    def _run(self, branches: list[DenseBranch], ids: list[int], rows_per_branch: int) -> torch.Tensor:
        """Feed rows_per_branch tokens per branch (ids laid out branch by branch) -> hidden [len(ids), H]."""
        dev = self.model.device
        for br in branches:
            self._ensure_capacity(br, br.length + rows_per_branch)
        positions = torch.cat([torch.arange(br.length, br.length + rows_per_branch) for br in branches]).to(dev)

        def attend(layer, q, k, v):
            outs = []
            for j, br in enumerate(branches):
                rows = slice(j * rows_per_branch, (j + 1) * rows_per_branch)
                outs.append(self._attend_chunk(br, layer, q[rows], k[rows], v[rows]))
            return torch.cat(outs)

        hidden = self.model.run_layers(torch.tensor(ids, device=dev), positions, attend)
        for j, br in enumerate(branches):
            br.length += rows_per_branch
            br.tokens += ids[j * rows_per_branch:(j + 1) * rows_per_branch]
        return hidden

    def _prefill(self, ids: list[int]):
        cfg, dev = self.model.config, self.model.device
        shape = (cfg.num_key_value_heads, 0, cfg.head_dim)
        k = [torch.empty(shape, dtype=self.model.dtype, device=dev) for _ in range(cfg.num_hidden_layers)]
        v = [torch.empty(shape, dtype=self.model.dtype, device=dev) for _ in range(cfg.num_hidden_layers)]
        bid = self._new_branch(k, v, 0, [])
        return bid, self._run([self.branches[bid]], ids, len(ids))[-1]

    def _generate_step(self, branches, max_new_tokens, stop, eos_id, temperature, top_p, generator) -> StepOutput:
        """Per token: sample the active branches' tokens (row i's t-th token from the uniform of (seed, i, t), as
        TreeDecoder does), read them back, feed them through the model, and drop branches that stopped."""
        t0 = time.perf_counter()
        dev = self.model.device
        for b in branches:
            br = self.branches[b]
            self._ensure_capacity(br, br.length + max_new_tokens)
        self._note_kv()
        seed = draw_step_seed(generator, dev) if temperature > 0 else None
        params = torch.tensor([temperature, top_p], dtype=torch.float32, device=dev)
        new_tokens: list[list[int]] = [[] for _ in branches]
        active = list(range(len(branches)))
        while active:
            logits = self.model.logits(torch.stack([self._last_hidden[branches[i]] for i in active]))
            uniforms = None
            if seed is not None:
                rows = torch.tensor(active, device=dev)
                index = torch.tensor([len(new_tokens[i]) for i in active], device=dev)
                uniforms = row_uniforms(seed, rows, index)
            toks = sample_tokens(logits, uniforms, params[:1], params[1:] if top_p < 1 else None).tolist()
            self.stats["host_syncs"] += 1
            hidden = self._run([self.branches[branches[i]] for i in active], toks, 1)
            self.stats["decode_iterations"] += 1
            still = []
            for j, i in enumerate(active):
                self._last_hidden[branches[i]] = hidden[j]
                new_tokens[i].append(toks[j])
                if toks[j] not in stop and len(new_tokens[i]) < max_new_tokens:
                    still.append(i)
            active = still
        scores = None
        if self.model.reward_head is not None and branches:
            scores = self._score(torch.stack([self._last_hidden[b] for b in branches])).tolist()
            self.stats["host_syncs"] += 1
        self._sync()
        return self._step_output(t0, new_tokens, scores, eos_id)

    def _teacher_force(self, branch: int, ids: list[int]) -> torch.Tensor:
        return self._run([self.branches[branch]], ids, len(ids))

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unfused torch scoring: final norm -> [mlp -> relu ->] head -> activation. hidden [B, H] -> [B] f32."""
        head, spec = self.model.reward_head, self.model.config.reward_head
        x = self.model.model.norm(hidden)
        if head.mlp is not None:
            x = torch.relu(head.mlp(x))
        logits = head.out(x).float()
        if spec["activation"] == "sigmoid":
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1)[:, spec["positive_index"]]

    def fork(self, branch: int, n: int) -> list[int]:
        """n children, each with its own copy of the parent's KV."""
        parent = self._branch(branch)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        check_fits_memory("n", n * parent.length * self.bytes_per_token, self.model.device,
                          f"{n} dense copies of a {parent.length}-token KV cache")
        children = []
        with self._atomic([branch]):
            for _ in range(n):
                k = [t[:, :parent.length].clone() for t in parent.k]
                v = [t[:, :parent.length].clone() for t in parent.v]
                c = self._new_branch(k, v, parent.length, list(parent.tokens))
                self._last_hidden[c] = self._last_hidden[branch]
                children.append(c)
        self._note_kv()
        return children

    def release(self, branch: int) -> None:
        self._branch(branch)
        del self.branches[branch]
        del self._last_hidden[branch]

    def tokens(self, branch: int) -> list[int]:
        return list(self._branch(branch).tokens)

    def kv_bytes(self) -> int:
        """Bytes of the dense KV tensors held now (allocated capacity)."""
        return sum(br.capacity for br in self.branches.values()) * self.bytes_per_token

    def kv_bytes_naive(self) -> int:
        return sum(br.length for br in self.branches.values()) * self.bytes_per_token
