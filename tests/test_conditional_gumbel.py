"""sampling.conditional_gumbel: Gumbel noise given the argmax (Paulus et al. 2021, App. A).

Statistical tests with fixed seeds. Kolmogorov-Smirnov bounds use the asymptotic critical
value 1.63 / sqrt(n) (alpha = 0.01), correlations the bound 5 / sqrt(n); each bound is also
shown to reject a deliberately wrong distribution, so that no test passes vacuously.
"""

import math

import pytest
import torch

from discrete_vae import sampling

KS_ALPHA_01 = 1.63  # sup |F_n - F| <= 1.63 / sqrt(n) with probability 0.99 (Kolmogorov)


def gumbel_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-torch.exp(-x))


def ks_statistic(samples: torch.Tensor, cdf=gumbel_cdf) -> float:
    """sup_x |F_n(x) - F(x)| of one-dimensional samples against a continuous CDF."""
    x, _ = samples.double().sort()
    n = len(x)
    F = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - F
    lower = F - torch.arange(0, n, dtype=torch.float64) / n
    return max(upper.max().item(), lower.max().item())


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """sup_x |F_a(x) - F_b(x)| of two one-dimensional samples."""
    grid = torch.cat([a, b]).double().sort().values
    Fa = torch.searchsorted(a.double().sort().values, grid, right=True) / len(a)
    Fb = torch.searchsorted(b.double().sort().values, grid, right=True) / len(b)
    return (Fa - Fb).abs().max().item()


def correlation(e: torch.Tensor) -> torch.Tensor:
    """Correlation matrix of the columns.  # (n, K) -> (K, K)"""
    return torch.corrcoef(e.double().T)


def test_ks_statistic_helpers_are_sharp():
    torch.manual_seed(0)
    n = 20_000
    g = sampling.gumbel((n,), dtype=torch.float64)
    assert ks_statistic(g) < KS_ALPHA_01 / math.sqrt(n)
    assert ks_statistic(g + 0.05) > KS_ALPHA_01 / math.sqrt(n)  # a small shift is detected
    assert ks_two_sample(g[: n // 2], g[n // 2 :]) < KS_ALPHA_01 * math.sqrt(4 / n)
    assert ks_two_sample(g[: n // 2], g[n // 2 :] + 0.1) > KS_ALPHA_01 * math.sqrt(4 / n)


# logits with probabilities from ~1 down to 1e-30 (and 1e-20, 1e-10)
TINY_PROBS = torch.tensor([1.0, 0.5, 1e-10, 1e-20, 1e-30])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [0.0, 50.0])
def test_argmax_is_the_forced_category_even_at_probability_1e30(dtype, shift):
    torch.manual_seed(0)
    logits = (TINY_PROBS.log() + shift).to(dtype)  # (K,); the shift changes nothing but rounding
    K, n = len(logits), 20_000
    for k in range(K):
        hard = torch.nn.functional.one_hot(torch.tensor(k), K).to(dtype)
        e = sampling.conditional_gumbel(logits, hard, (n,))  # (n, K)
        assert e.shape == (n, K) and e.dtype == dtype and torch.isfinite(e).all()
        assert ((logits + e).argmax(-1) == k).all(), f"category {k} of probability {TINY_PROBS[k]:.0e}"


@pytest.mark.parametrize("shift", [0.0, 50.0])
def test_near_ties_in_float32_still_resolve_to_the_forced_category(shift):
    """D of probability 1e-30 against one dominant category: in about one draw in 1e5 the exact
    gap z_k - z_j is below float32 rounding of logits + e, and only the margin keeps argmax = D
    (with the margin removed, this seed gives several wrong argmaxes in 2e6 draws)."""
    torch.manual_seed(0)
    logits = torch.tensor([0.0, math.log(1e-30)]) + shift  # (2,)
    e = sampling.conditional_gumbel(logits, torch.tensor([0.0, 1.0]), (2_000_000,))
    assert ((logits + e).argmax(-1) == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmax_is_the_drawn_category_for_batched_logits(dtype):
    torch.manual_seed(1)
    logits = torch.stack([TINY_PROBS.log(), torch.randn(5) * 3, torch.zeros(5), TINY_PROBS.flip(0).log()]).to(dtype)
    n = 10_000
    logits = logits.expand(n, -1, -1)  # (n, B, K)
    hard = sampling.gumbel_max(logits)  # D ~ Cat(softmax(logits))
    e = sampling.conditional_gumbel(logits, hard)  # (n, B, K)
    assert torch.equal(sampling.one_hot_argmax(logits + e), hard)
    # and with sample dims added by conditional_gumbel itself: (S, n, B, K)
    e = sampling.conditional_gumbel(logits, hard, (3,))
    assert e.shape == (3, *logits.shape)
    assert torch.equal(sampling.one_hot_argmax(logits + e), hard.expand(3, -1, -1, -1))


def test_drawn_argmax_and_conditional_noise_give_independent_standard_gumbels():
    """D ~ Cat(softmax(logits)), then e ~ p(g | argmax(logits + g) = D): marginally, e is K
    independent standard Gumbels (the joint of (D, e) is that of (argmax(logits + g), g))."""
    torch.manual_seed(2)
    n = 40_000
    logits = torch.tensor([1.5, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    hard = sampling.gumbel_max(logits, (n,))  # (n, K)
    e = sampling.conditional_gumbel(logits.expand(n, -1), hard)  # (n, K)
    critical = KS_ALPHA_01 / math.sqrt(n)
    for k in range(len(logits)):
        assert ks_statistic(e[:, k]) < critical, f"coordinate {k}"
    corr = correlation(e)
    off_diagonal = corr - torch.eye(len(logits), dtype=torch.float64)
    assert off_diagonal.abs().max() < 5 / math.sqrt(n), corr

    # Not vacuous: given one fixed D the noise is neither Gumbel nor uncorrelated.
    fixed = torch.nn.functional.one_hot(torch.tensor(1), 5).to(torch.float64)
    e_fixed = sampling.conditional_gumbel(logits, fixed, (n,))
    assert max(ks_statistic(e_fixed[:, k]) for k in range(5)) > critical
    assert (correlation(e_fixed) - torch.eye(5, dtype=torch.float64)).abs().max() > 5 / math.sqrt(n)
    # nor is a D drawn from the wrong distribution (uniform) followed by the conditional noise
    wrong = sampling.gumbel_max(torch.zeros(5, dtype=torch.float64), (n,))
    e_wrong = sampling.conditional_gumbel(logits.expand(n, -1), wrong)
    assert max(ks_statistic(e_wrong[:, k]) for k in range(5)) > critical


def test_conditional_noise_matches_rejection_sampling():
    """Given D = k, the noise has the law of unconditional Gumbels g kept when argmax(logits + g) = k:
    a two-sample KS bound per coordinate, for a likely and an unlikely winner."""
    torch.manual_seed(3)
    logits = torch.tensor([1.0, 0.0, -1.5], dtype=torch.float64)
    g = sampling.gumbel((200_000, 3), dtype=torch.float64)
    winners = (logits + g).argmax(-1)
    for k in (0, 2):
        kept = g[winners == k]  # rejection sampling: about 200_000 * p_k rows
        e = sampling.conditional_gumbel(logits, torch.nn.functional.one_hot(torch.tensor(k), 3).double(), (20_000,))
        critical = KS_ALPHA_01 * math.sqrt(1 / len(kept) + 1 / len(e))
        for j in range(3):
            assert ks_two_sample(kept[:, j], e[:, j]) < critical, (k, j)
    # Not vacuous: the noise conditioned on the wrong winner is told apart.
    e_other = sampling.conditional_gumbel(logits, torch.nn.functional.one_hot(torch.tensor(1), 3).double(), (20_000,))
    kept = g[winners == 2]
    assert ks_two_sample(kept[:, 2], e_other[:, 2]) > KS_ALPHA_01 * math.sqrt(1 / len(kept) + 1 / len(e_other))


def test_the_maximum_is_gumbel_at_logsumexp_whatever_the_winner():
    """max_j (logits_j + e_j) = logits_k + e_k ~ Gumbel(lse(logits)), independent of k
    (Gumbel-max; Maddison et al. 2014): holds even for a winner of probability 1e-30."""
    torch.manual_seed(4)
    n = 20_000
    logits = TINY_PROBS.log().double()
    lse = torch.logsumexp(logits, -1)
    for k in (0, 4):
        hard = torch.nn.functional.one_hot(torch.tensor(k), 5).double()
        top = (logits + sampling.conditional_gumbel(logits, hard, (n,))).amax(-1)
        assert ks_statistic(top - lse) < KS_ALPHA_01 / math.sqrt(n), k
        assert ks_statistic(top - lse - 0.05) > KS_ALPHA_01 / math.sqrt(n)  # not vacuous


def test_no_gradient_and_a_private_generator_leaves_the_global_stream_alone():
    logits = torch.randn(4, 6, requires_grad=True)
    hard = sampling.gumbel_max(logits)
    state = torch.get_rng_state()
    a = sampling.conditional_gumbel(logits, hard, (2,), generator=torch.Generator().manual_seed(7))
    b = sampling.conditional_gumbel(logits, hard, (2,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not a.requires_grad and a.grad_fn is None
