"""The shared sampling module: exactness of Gumbel-max, finite noise at the edges,
straight-through values and gradients, enumeration, and the Concrete density."""

import math

import pytest
import torch

from discrete_vae import sampling


def test_gumbel_max_frequencies_match_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, -3.0])
    n = 200_000
    counts = sampling.gumbel_max(logits, (n,)).sum(0)
    p = torch.softmax(logits, -1)
    # Pearson chi-square with K-1 = 4 degrees of freedom; 99.9% quantile = 18.47.
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 18.47, f"chi2={chi2:.2f}, counts={counts}, expected={n * p}"
    # and the test has power: the same counts are far from a wrong distribution
    q = torch.softmax(logits * 1.05, -1)
    assert ((counts - n * q) ** 2 / (n * q)).sum() > 18.47


def test_gumbel_max_is_one_hot_with_batch_shapes():
    logits = torch.randn(4, 3, 7)
    z = sampling.gumbel_max(logits, (2,))
    assert z.shape == (2, 4, 3, 7)
    assert torch.equal(z.sum(-1), torch.ones(2, 4, 3))
    assert set(z.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gumbel_noise_is_finite_at_the_edges(dtype):
    one_minus = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    u = torch.tensor([0.0, torch.finfo(dtype).tiny, 1e-30, 0.5, one_minus.item(), 1.0], dtype=dtype)
    g = sampling.gumbel_from_uniform(u)
    assert torch.isfinite(g).all(), g
    assert (g[1:] >= g[:-1]).all(), "noise must stay monotone in u"
    assert g[0] == g[1] and g[-1] == g[-2], "u = 0 and u = 1 clamp to the nearest finite values"


def test_gumbel_noise_moments():
    torch.manual_seed(1)
    n = 400_000
    g = sampling.gumbel((n,))
    euler_gamma, var = 0.5772156649, math.pi**2 / 6
    assert abs(g.mean().item() - euler_gamma) < 5 * math.sqrt(var / n)
    assert abs(g.var().item() - var) < 0.02 * var


def test_straight_through_forward_is_exactly_one_hot_and_gradient_is_soft():
    logits = torch.randn(5, 4, 6, requires_grad=True)
    weights = torch.randn(5, 4, 6)
    g1 = torch.Generator().manual_seed(3)
    hard = sampling.gumbel_softmax(logits, 0.7, hard=True, generator=g1)
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.detach().sum(-1), torch.ones(5, 4))
    (grad_hard,) = torch.autograd.grad((hard * weights).sum(), logits)

    g2 = torch.Generator().manual_seed(3)  # the same noise
    soft = sampling.gumbel_softmax(logits, 0.7, hard=False, generator=g2)
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert torch.equal(grad_hard, grad_soft)
    # the hard sample is the argmax of the same perturbed logits as the soft one
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))


def test_categorical_straight_through_gradient_is_that_of_tempered_softmax():
    logits = torch.randn(3, 5, requires_grad=True)
    weights = torch.randn(3, 5)
    z = sampling.categorical_straight_through(logits, 2.0)
    assert torch.equal(z.detach().sum(-1), torch.ones(3))
    (grad,) = torch.autograd.grad((z * weights).sum(), logits)
    (expected,) = torch.autograd.grad((torch.softmax(logits / 2.0, -1) * weights).sum(), logits)
    assert torch.allclose(grad, expected)


def test_gumbel_softmax_tends_to_the_hard_sample_as_tau_falls():
    logits = torch.randn(1000, 4)
    soft = sampling.gumbel_softmax(logits, 1e-3, generator=torch.Generator().manual_seed(0))
    hard = sampling.gumbel_softmax(logits, 1e-3, hard=True, generator=torch.Generator().manual_seed(0))
    assert (soft - hard).abs().max() < 1e-3 or (soft.argmax(-1) == hard.argmax(-1)).float().mean() > 0.999


def test_enumeration_lists_every_configuration_once_and_chunks_agree():
    N, K = 3, 4
    full = sampling.enumerate_one_hot(N, K)
    assert full.shape == (K**N, N, K)
    assert torch.equal(full.sum(-1), torch.ones(K**N, N))
    assert len({tuple(row.argmax(-1).tolist()) for row in full}) == K**N
    chunks = torch.cat([sampling.enumerate_one_hot(N, K, s, s + 7) for s in range(0, K**N, 7)])
    assert torch.equal(chunks, full)


def test_concrete_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    for tau in (0.3, 1.0, 2.5):
        dist = torch.distributions.RelaxedOneHotCategorical(torch.tensor(tau, dtype=torch.float64), logits=logits)
        y = dist.sample()
        expected = dist.log_prob(y)
        assert torch.allclose(sampling.concrete_log_prob(y, logits, tau), expected, atol=1e-8)
        # invariant to a shift of the logits
        assert torch.allclose(sampling.concrete_log_prob(y, logits + 3.0, tau), expected, atol=1e-8)


def test_concrete_density_integrates_to_one_for_two_categories():
    # K = 2: y = (s, 1 - s); the density w.r.t. s over (0, 1) integrates to 1.
    logits, tau = torch.tensor([0.3, -0.4], dtype=torch.float64), 0.8
    s = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    y = torch.stack([s, 1 - s], -1)
    density = sampling.concrete_log_prob(y, logits, tau).exp()
    assert abs(torch.trapezoid(density, s).item() - 1.0) < 1e-3
