"""o1kernels.decoder.sampling: the hashed uniforms are uniform and independent across rows, token indices and seeds;
sampled tokens follow softmax(logits / T) (and its nucleus) against a float64 computation; greedy is argmax."""
from __future__ import annotations

import math

import pytest
import torch

from o1kernels.decoder.sampling import MASK32, draw_step_seed, mix32, row_uniforms, sample_tokens


def ks_statistic(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of samples u from Uniform(0, 1)."""
    x = u.double().sort().values
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - x).max().item(), (x - (i - 1) / n).max().item())


def test_mix32_is_a_bijection_on_a_range():
    x = torch.arange(1 << 16, dtype=torch.long) * 40503  # spread over the 32-bit range
    h = mix32(x & MASK32)
    assert h.min() >= 0 and h.max() <= MASK32 and h.unique().numel() == x.numel()


def test_uniforms_are_uniform_and_independent():
    n = 1 << 14
    seed = torch.tensor([123456789])
    rows, index = torch.arange(n), torch.zeros(n, dtype=torch.long)
    u_rows = row_uniforms(seed, rows, index)  # one token index, many rows
    u_index = row_uniforms(seed, torch.zeros(n, dtype=torch.long), torch.arange(n))  # one row, many tokens
    u_seed = row_uniforms(seed + 1, rows, index)
    assert u_rows.dtype == torch.float32 and 0 < u_rows.min() and u_rows.max() < 1
    # KS critical value at alpha = 1e-4 for n samples: sqrt(-ln(alpha / 2) / (2n))
    critical = math.sqrt(-math.log(0.5e-4) / (2 * n))
    for u in (u_rows, u_index, u_seed):
        assert ks_statistic(u) < critical
    for a, b in ((u_rows[:-1], u_rows[1:]), (u_index[:-1], u_index[1:]), (u_rows, u_seed), (u_rows, u_index)):
        corr = torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), corr  # 5 sigma of the correlation of independent samples


def test_uniforms_depend_only_on_seed_row_and_index():
    seed = torch.tensor([7])
    rows, index = torch.tensor([0, 5, 2, 5]), torch.tensor([3, 3, 0, 4])
    u = row_uniforms(seed, rows, index)
    one_by_one = torch.cat([row_uniforms(seed, rows[i:i + 1], index[i:i + 1]) for i in range(4)])
    assert torch.equal(u, one_by_one) and u[1] != u[3] and u[0] != u[1]


def test_step_seed_comes_from_the_generator():
    a = draw_step_seed(torch.Generator().manual_seed(3), torch.device("cpu"))
    b = draw_step_seed(torch.Generator().manual_seed(3), torch.device("cpu"))
    c = draw_step_seed(torch.Generator().manual_seed(4), torch.device("cpu"))
    assert a.shape == (1,) and a.dtype == torch.long and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.item() < 2**32


def test_greedy_is_argmax():
    logits = torch.randn(5, 33)
    assert torch.equal(sample_tokens(logits), logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_p", [(1.0, None), (0.7, None), (1.3, 0.6)])
def test_sampled_token_frequencies_match_float64_probabilities(temperature, top_p):
    """20000 rows with the same logits and distinct uniforms: the token counts pass a chi-square test against the
    float64 distribution (softmax(logits / T), restricted to the nucleus and renormalised when top_p is given)."""
    vocab, n = 12, 20000
    logits = torch.randn(vocab) * 1.5
    probs = torch.softmax(logits.double() / temperature, 0)
    if top_p is not None:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]  # mass of the more likely tokens
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[order[before < top_p]] = True
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    uniforms = row_uniforms(torch.tensor([99]), torch.arange(n), torch.zeros(n, dtype=torch.long))
    tokens = sample_tokens(logits.expand(n, vocab).contiguous(), uniforms, torch.tensor([temperature]),
                           None if top_p is None else torch.tensor([top_p]))
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert (counts[probs == 0] == 0).all(), "a token outside the nucleus was sampled"
    expected = probs * n
    used = expected > 0
    chi2 = ((counts[used] - expected[used]) ** 2 / expected[used]).sum().item()
    dof = int(used.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # far in the tail of chi2(dof) only if biased


def test_inverse_cdf_edges():
    """A uniform at the edges still lands on a token of positive weight; one-hot rows always pick their token."""
    logits = torch.full((4, 6), -1e4)
    logits[torch.arange(4), torch.tensor([0, 5, 2, 3])] = 0.0
    uniforms = torch.tensor([2.0**-25, 1 - 2.0**-25, 0.5, 1e-3])
    tokens = sample_tokens(logits, uniforms, torch.tensor([1.0]))
    assert tokens.tolist() == [0, 5, 2, 3]
