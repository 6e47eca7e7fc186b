"""merge_states against float64 attention over the union of two disjoint key sets."""
import math

import pytest
import torch

import o1kernels
from attention_reference import LSE_TOLERANCES, TOLERANCES, attention_f64, backends_on, random_values, report_mismatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _split_states(n, h, d, dtype, device):
    """Per row: keys split into sets a and b (some rows with an empty a, b, or both).

    Returns the states of a and b (o in dtype, lse float32) and the float64 attention over a U b.
    """
    hkv = h
    o_a, lse_a, o_b, lse_b, o_ref, lse_ref = [], [], [], [], [], []
    sizes = [(5, 7), (0, 9), (4, 0), (0, 0), (1, 1), (13, 2), (3, 30)]
    for i in range(n):
        ta, tb = sizes[i % len(sizes)]
        q = torch.randn(h, d, dtype=torch.float64) * 2
        k = torch.randn(ta + tb, hkv, d, dtype=torch.float64)
        v = random_values((ta + tb, hkv, d), torch.float64)
        for (lo, hi), os_, ls_ in (((0, ta), o_a, lse_a), ((ta, ta + tb), o_b, lse_b)):
            o, lse = attention_f64(q, k[lo:hi], v[lo:hi], d ** -0.5)
            if hi == lo:  # an empty state's o must be ignored: give it finite garbage
                o = random_values((h, d), torch.float64)
            os_.append(o)
            ls_.append(lse)
        o, lse = attention_f64(q, k, v, d ** -0.5)
        o_ref.append(o)
        lse_ref.append(lse)

    def state(os_, ls_):
        return torch.stack(os_).to(dtype).to(device), torch.stack(ls_).float().to(device)

    return (*state(o_a, lse_a), *state(o_b, lse_b), torch.stack(o_ref), torch.stack(lse_ref))


def _check_merge(backend, dtype, n, h, d, device="cpu"):
    o_a, lse_a, o_b, lse_b, o_ref, lse_ref = _split_states(n, h, d, dtype, device)
    o, lse = o1kernels.merge_states(o_a, lse_a, o_b, lse_b, backend=backend)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert o.shape == (n, h, d) and lse.shape == (n, h)
    # Inputs are rounded to dtype: allow that rounding on top of the merge's own error.
    atol, rtol = TOLERANCES[dtype]
    report_mismatch("o", o, o_ref, 2 * atol, 2 * rtol)
    report_mismatch("lse", lse, lse_ref, *LSE_TOLERANCES[torch.float32])
    both_empty = torch.isneginf(lse_ref)
    assert both_empty.any() and (o.double().cpu()[both_empty] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends_on("cpu"))
@pytest.mark.parametrize("n,h,d", [(7, 3, 16), (9, 8, 128), (4, 5, 24)])
def test_merge_states_matches_float64(backend, dtype, n, h, d):
    _check_merge(backend, dtype, n, h, d)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_merge_states_mixed_dtypes_and_strides(backend):
    o_a, lse_a, o_b, lse_b, o_ref, lse_ref = _split_states(7, 4, 32, torch.float32, "cpu")
    o_a = o_a.to(torch.bfloat16)
    o_b = o_b.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous, float32
    lse_b = lse_b.t().contiguous().t()
    o, lse = o1kernels.merge_states(o_a, lse_a, o_b, lse_b, backend=backend)
    assert o.dtype == torch.bfloat16
    report_mismatch("o", o, o_ref, *TOLERANCES[torch.bfloat16])
    report_mismatch("lse", lse, lse_ref, *LSE_TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_merge_states_both_empty_stays_finite(backend):
    o_a = random_values((3, 2, 16), torch.float32)
    o_b = random_values((3, 2, 16), torch.float32)
    neg = torch.full((3, 2), -math.inf)
    o, lse = o1kernels.merge_states(o_a, neg, o_b, neg.clone(), backend=backend)
    assert (o == 0).all() and torch.isneginf(lse).all()


def _good_args():
    return [random_values((4, 2, 16), torch.float16), torch.randn(4, 2), random_values((4, 2, 16), torch.float16), torch.randn(4, 2)]


@pytest.mark.parametrize("index,bad,exc,match", [
    (0, [[1.0]], TypeError, "o_a must be a torch.Tensor"),
    (0, torch.zeros(4, 2, 16, dtype=torch.int32), TypeError, "o_a must have dtype"),
    (0, torch.randn(4, 32), ValueError, "o_a must have 3 dimensions"),
    (1, torch.randn(4, 2, dtype=torch.float16), TypeError, "lse_a must have dtype"),
    (1, torch.randn(4, 3), ValueError, r"lse_a must have shape \[4, 2\]"),
    (2, torch.randn(4, 2, 8), ValueError, r"o_b must have shape \[4, 2, 16\]"),
    (3, torch.randn(5, 2), ValueError, r"lse_b must have shape \[4, 2\]"),
    (3, torch.randn(4, 2, device="meta"), ValueError, "lse_b must be on cpu"),
])
def test_merge_states_rejects_bad_input(index, bad, exc, match):
    args = _good_args()
    args[index] = bad
    with pytest.raises(exc, match=match):
        o1kernels.merge_states(*args)


def test_merge_states_rejects_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        o1kernels.merge_states(*_good_args(), backend="numpy")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        o1kernels.merge_states(*_good_args(), backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_states_cuda(dtype):
    for backend in backends_on("cuda"):
        _check_merge(backend, dtype, 9, 8, 128, device="cuda")
