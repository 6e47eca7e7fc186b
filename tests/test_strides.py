"""Every tensor argument of every public op, passed as a non-contiguous view, gives what the contiguous tensor gives,
on every backend that runs on the CPU (torch, triton under the interpreter, the compiled cpu kernels).

Two kinds of view: "strided" (every stride doubled, the elements in between NaN, or -1 / True for index and mask
tensors, so a kernel that assumes unit strides reads them and fails loudly) and "transposed" (the memory order of
the dimensions reversed, so the last dimension is not the unit-stride one; tensors of 2+ dimensions).
fp32 throughout; the outputs must agree to 1e-6 (the same math on the same values; only a BLAS call's blocking
may differ with the layout).
"""
from __future__ import annotations

import pytest
import torch

import o1kernels as ok
from attention_reference import backends_on, random_values

BACKENDS = backends_on("cpu")


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with every stride doubled; the elements skipped hold NaN / -1 / True."""
    if t.dtype.is_floating_point:
        filler = torch.full_like(t, float("nan"))
    elif t.dtype == torch.bool:
        filler = torch.ones_like(t)
    else:
        filler = torch.full_like(t, -1)
    return torch.stack([t, filler], dim=-1)[..., 0]


def transposed(t: torch.Tensor) -> torch.Tensor:
    """t's values with the memory order of its dimensions reversed."""
    order = list(range(t.dim()))[::-1]
    return t.permute(order).contiguous().permute(order)


VIEWS = {"strided": strided, "transposed": transposed}


def merge_states_case():
    n, h, d = 5, 3, 16
    inputs = {"o_a": random_values((n, h, d), torch.float32), "lse_a": torch.randn(n, h) * 3,
              "o_b": random_values((n, h, d), torch.float32), "lse_b": torch.randn(n, h) * 3}
    inputs["lse_a"][0, 0] = float("-inf")
    return inputs, lambda backend, a: ok.merge_states(a["o_a"], a["lse_a"], a["o_b"], a["lse_b"], backend=backend)


def shared_prefix_case():
    b, g, p, s, hq, hkv, d = 5, 2, 37, 9, 4, 2, 16
    inputs = {"q": random_values((b, hq, d), torch.float32),
              "prefix_k": random_values((g, p, hkv, d), torch.float32),
              "prefix_v": random_values((g, p, hkv, d), torch.float32),
              "suffix_k": random_values((b, s, hkv, d), torch.float32),
              "suffix_v": random_values((b, s, hkv, d), torch.float32),
              "prefix_lens": torch.tensor([37, 20], dtype=torch.int32),
              "suffix_lens": torch.tensor([9, 1, 0, 5, 7], dtype=torch.int32),
              "branch_group": torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)}

    def call(backend, a):
        return ok.shared_prefix_attention(a["q"], a["prefix_k"], a["prefix_v"], a["suffix_k"], a["suffix_v"],
                                          prefix_lens=a["prefix_lens"], suffix_lens=a["suffix_lens"],
                                          branch_group=a["branch_group"], return_lse=True, backend=backend)
    return inputs, call


def tree_attention_case():
    page, hq, hkv, d = 4, 4, 2, 16
    # a 10-token prompt shared by rows 0-2, a 5-token segment shared by rows 1-2, one tail per row (row 2's empty)
    segments = [([3, 0, 5], 10, [0, 1, 2]), ([1, 6], 5, [1, 2]), ([2], 3, [0]), ([7], 4, [1]), ([4], 0, [2])]
    plan = ok.TreeAttentionPlan(segments, num_queries=3, page_size=page)
    inputs = {"q": random_values((3, hq, d), torch.float32),
              "k_cache": random_values((8, page, hkv, d), torch.float32),
              "v_cache": random_values((8, page, hkv, d), torch.float32)}
    return inputs, lambda backend, a: ok.tree_attention(a["q"], a["k_cache"], a["v_cache"], plan, return_lse=True,
                                                        backend=backend)


def step_rewards_inputs(hidden_shape):
    hd, hm = hidden_shape[-1], 24
    mask = torch.rand(hidden_shape[:-1]) < 0.4
    mask.view(-1)[-1] = True
    return {"hidden": torch.randn(hidden_shape), "step_mask": mask, "weight": torch.randn(2, hm) / 5,
            "bias": torch.randn(2), "norm_weight": torch.rand(hd) + 0.5, "mlp_weight": torch.randn(hm, hd) / 4,
            "mlp_bias": torch.randn(hm) / 4}


def step_rewards_call(backend, a):
    return ok.step_rewards(a["hidden"], a["step_mask"], a["weight"], a["bias"], norm_weight=a["norm_weight"],
                           mlp_weight=a["mlp_weight"], mlp_bias=a["mlp_bias"], cu_seqlens=a.get("cu_seqlens"),
                           aggregate="mean", backend=backend)


def step_rewards_padded_case():
    return step_rewards_inputs((3, 11, 16)), step_rewards_call


def step_rewards_packed_case():
    inputs = step_rewards_inputs((20, 16))
    inputs["cu_seqlens"] = torch.tensor([0, 7, 7, 15, 20], dtype=torch.int64)
    return inputs, step_rewards_call


CASES = {"merge_states": merge_states_case, "shared_prefix_attention": shared_prefix_case,
         "tree_attention": tree_attention_case, "step_rewards": step_rewards_padded_case,
         "step_rewards_packed": step_rewards_packed_case}


def _params():
    for op, make in CASES.items():
        torch.manual_seed(0)
        inputs, _ = make()
        for arg, t in inputs.items():
            for view in VIEWS:
                if view == "transposed" and sum(s > 1 for s in t.shape) < 2:
                    continue  # reversing the dimensions of a vector changes nothing
                for backend in BACKENDS:
                    yield pytest.param(op, arg, view, backend, id=f"{op}-{arg}-{view}-{backend}")


@pytest.mark.parametrize("op,arg,view,backend", list(_params()))
def test_non_contiguous_argument_matches_contiguous(op, arg, view, backend):
    inputs, call = CASES[op]()
    expected = call(backend, inputs)
    inputs[arg] = VIEWS[view](inputs[arg])
    assert not inputs[arg].is_contiguous()
    got = call(backend, inputs)
    for name, g, e in zip(("first output", "second output"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")
