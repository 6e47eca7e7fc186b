"""The Triton launch tables and tuning candidates, without a GPU: candidates that could not fit a GPU's shared memory
are never timed, fp32 has tiles of its own (TF32 only where a caller opts in), and the offline sweep's checks
(python tools/triton_sweep.py, run by CI) flag what they should."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ of this checkout

from o1kernels import TreeAttentionPlan, tree_attention  # noqa: E402
from o1kernels.triton_ops import _target  # noqa: E402
from o1kernels.triton_ops import step_rewards as sr  # noqa: E402
from o1kernels.triton_ops import tree_attention as ta  # noqa: E402
from attention_reference import backends_on  # noqa: E402
from tools import triton_sweep as sweep  # noqa: E402

SM90 = _target.SM90


def test_step_reward_tuning_candidates_fit_shared_memory():
    """O1KERNELS_AUTOTUNE=1 on an fp32 hidden layer used to launch 64x256x64 with 4 stages: 245,760 B of shared
    memory where sm_90 allows 232,448, a crash. The candidates timed now are those whose bound fits the GPU."""
    crashed = {**sr.LAUNCH_TABLE["mlp"][9], "BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 4,
               "num_stages": 4}
    assert sr.mlp_shared_bytes(crashed, 4) > SM90.smem
    for path, elem in (("mlp", 2), ("mlp_fp32", 4)):
        candidates = sr.tuning_candidates(path, SM90, elem)
        assert candidates and all(sr.mlp_shared_bytes(c, elem) <= SM90.smem for c in candidates)
    # a GPU with less shared memory gets fewer candidates, never one over its limit
    small = _target.Target(arch=9, smem=100 * 1024, sms=132)
    kept = sr.tuning_candidates("mlp", small, 2)
    assert 0 < len(kept) < len(sr.AUTOTUNE_CANDIDATES["mlp"])
    assert all(sr.mlp_shared_bytes(c, 2) <= small.smem for c in kept)


@pytest.mark.parametrize("kind", ("16bit", "fp32", "tf32"))
@pytest.mark.parametrize("head_dim", (64, 128, 256))
def test_attention_tuning_candidates_fit_shared_memory(kind, head_dim):
    elem = 2 if kind == "16bit" else 4
    candidates = ta.partial_candidates(SM90, kind, head_dim)
    assert candidates and len(set(candidates)) == len(candidates)
    for bm, bn, warps, stages in candidates:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        assert ta.partial_shared_bytes(cfg, head_dim, elem) <= SM90.smem
    if kind == "tf32" and head_dim == 256:  # 128 x 32 fp32 tiles need 262,272 B (sweep, sm_90a): not a candidate
        assert (128, 32, 8, 3) not in candidates


def test_fp32_has_its_own_tiles_and_tf32_is_opt_in():
    """fp32 inputs get small tiles for exact (IEEE) dots; TF32 tensor-core tiles only with plan.fp32_precision."""
    assert ta.dtype_class(torch.float32) == "fp32" and ta.dtype_class(torch.bfloat16, "tf32") == "16bit"
    assert ta.dtype_class(torch.float32, "tf32") == "tf32"
    fp32 = ta.partial_config(SM90, "fp32", 128, 128)
    bf16 = ta.partial_config(SM90, "16bit", 128, 128)
    assert fp32["BLOCK_M"] * fp32["BLOCK_N"] < bf16["BLOCK_M"] * bf16["BLOCK_N"]
    assert TreeAttentionPlan([([0], 1, [0])], 1, 4).fp32_precision == "ieee"
    with pytest.raises(ValueError, match="plan.fp32_precision must be one of"):
        ta.dtype_class(torch.float32, "fast")


@pytest.mark.skipif("triton" not in backends_on("cpu"), reason="needs Triton's interpreter")
def test_bad_fp32_precision_is_a_clear_error_before_any_launch():
    plan = TreeAttentionPlan([([0], 3, [0])], 1, 4)
    plan.fp32_precision = "bf16x3"
    q, k = torch.randn(1, 2, 16), torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="plan.fp32_precision must be one of"):
        tree_attention(q, k, k, plan, backend="triton")


def _launch(kernel, roles, report, constexprs, dtype="*bf16", num_stages=3):
    names = list(constexprs) + ["q_ptr"]
    signature = {n: "constexpr" for n in constexprs} | {"q_ptr": dtype}
    launch = sweep.Launch("m", kernel, signature, {names.index(n): v for n, v in constexprs.items()}, {},
                          {"num_warps": 4, "num_stages": num_stages, "num_ctas": 1, "enable_fp_fusion": True}, "test",
                          set(roles))
    launch.report = {"smem": 0, "regs": 100, "stack": 0, "spill_stores": 0, "spill_loads": 0, "wgmma": True,
                     "cp_async": True, "ld_v4": True, "seconds": 1.0, **report}
    return launch


def test_sweep_checks():
    """What fails the sweep: shared memory over the limit (any launch), spills in a default table (not in a
    candidate), a shared-memory bound below what the compiler allocated, a 16-bit tile of >= 64 rows off wgmma."""
    tile = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128)
    assert sweep.problems(_launch("_partial_attention_kernel", ["default"], {"smem": 65536}, tile), SM90.smem) == []
    assert sweep.problems(_launch("_partial_attention_kernel", ["candidate"], {"spill_stores": 36}, tile),
                          SM90.smem) == []
    assert "spills" in sweep.problems(_launch("_partial_attention_kernel", ["default", "candidate"],
                                              {"spill_stores": 4}, tile), SM90.smem)[0]
    assert "shared memory 245760 B > 232448 B" in sweep.problems(
        _launch("_step_mlp_kernel", ["candidate"], {"smem": 245760},
                dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, DOT_FP32=True), dtype="*fp32", num_stages=4), SM90.smem)[0]
    bound = ta.partial_shared_bytes(dict(tile, num_stages=3), 128, 2)
    assert "partial_shared_bytes" in sweep.problems(_launch("_partial_attention_kernel", ["candidate"],
                                                            {"smem": bound + 1}, tile), 10 ** 9)[0]
    assert "without wgmma" in sweep.problems(_launch("_partial_attention_kernel", ["default"], {"wgmma": False},
                                                     tile), SM90.smem)[0]
