"""GST, ZGR and IndeCateR on the tiny problem (N=2, K=3), each checked against a formula written
independently here, or against the exact gradient within the Monte-Carlo standard error (fixed
seeds), with bounds that a wrong answer fails."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_mean_matches
from discrete_vae import estimators as E
from discrete_vae import sampling
from discrete_vae.errors import ConfigError


def one_sample(tiny, seed: int = 0):
    """The logits as a batch of one, and one categorical sample of them.  # (1, N, K) each"""
    logits = tiny.logits[None].clone().requires_grad_()
    z = sampling.gumbel_max(logits.detach(), generator=torch.Generator().manual_seed(seed))
    return logits, z


def grad_of_cost_at(tiny, z):
    """d f / d z at the one-hot z: the upstream gradient every straight-through estimator uses.  # (1, N, K)"""
    z = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(tiny.cost(z).sum(), z)
    return g


def use_sample(monkeypatch, z):
    monkeypatch.setattr(sampling, "gumbel_max", lambda logits, sample_shape=(), generator=None: z.expand(*sample_shape, *z.shape))


# -- GST -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gst_forward_is_the_sample_and_backward_is_its_formula(tiny, monkeypatch, seed):
    logits, z = one_sample(tiny, seed)
    use_sample(monkeypatch, z)
    seen = []
    estimator = E.GappedStraightThrough(tau=0.7, gap=1.0)
    out = estimator(logits, lambda y: seen.append(y) or tiny.cost(y), tiny.latent)
    assert torch.equal(seen[0].detach(), z), "the forward pass is exactly the one-hot sample"
    (grad,) = torch.autograd.grad(out.loss.sum(), logits)

    # written from the paper: the sampled logit at the maximum, the others at most max - gap
    theta = logits.detach()
    top = theta.max(-1, keepdim=True).values
    perturbed = torch.where(z.bool(), top, torch.minimum(theta, top - 1.0))
    p = torch.softmax(perturbed / 0.7, -1)  # (1, N, K)
    jacobian = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) / 0.7  # d p_i / d theta_j
    expected = torch.einsum("bni,bnij->bnj", grad_of_cost_at(tiny, z), jacobian)
    torch.testing.assert_close(grad, expected)
    sorted_scores = perturbed.sort(-1, descending=True).values
    assert (sorted_scores[..., 0] - sorted_scores[..., 1] >= 1.0 - 1e-12).all(), "the gap"


def test_gst_needs_a_non_negative_gap():
    with pytest.raises(ConfigError, match="estimator.gap"):
        E.GappedStraightThrough(gap=-1)


# -- ZGR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zgr_is_half_straight_through_plus_half_darn(tiny, monkeypatch, seed):
    logits, z = one_sample(tiny, seed)
    use_sample(monkeypatch, z)
    out = E.ZGR()(logits, tiny.cost, tiny.latent)
    (grad,) = torch.autograd.grad(out.loss.sum(), logits)

    g = grad_of_cost_at(tiny, z)  # (1, N, K)
    p = torch.softmax(logits.detach(), -1)
    straight_through = torch.einsum("bni,bnij->bnj", g, torch.diag_embed(p) - p[..., :, None] * p[..., None, :])
    # DARN (Gregor et al. 2014) for a categorical: (g . (z - p)) * d log p_z / d logits, d log p_z = z - p
    darn = (g * (z - p)).sum(-1, keepdim=True) * (z - p)
    torch.testing.assert_close(grad, 0.5 * straight_through + 0.5 * darn)
    assert torch.equal(out.value, tiny.cost(z))


def test_zgr_is_gumbel_rao_at_zero_temperature(tiny):
    torch.manual_seed(0)
    zgr = tiny.sample_grads(E.ZGR(), 40_000)
    torch.manual_seed(1)
    cold = tiny.sample_grads(E.GumbelRao(tau=0.02, num_mc=20), 40_000)  # num_mc moves the variance, not the mean
    se = (zgr.var(0) / len(zgr) + cold.var(0) / len(cold)).sqrt()
    assert ((zgr.mean(0) - cold.mean(0)).abs() <= 5 * se + 1e-3).all(), (zgr.mean(0), cold.mean(0), se)
    warm = tiny.sample_grads(E.GumbelRao(tau=1.0, num_mc=20), 40_000)
    assert ((zgr.mean(0) - warm.mean(0)).abs() > 5 * se).any(), "the comparison can fail: tau=1 differs"


# -- IndeCateR -----------------------------------------------------------------------------------
def test_indecater_mean_gradient_is_the_exact_gradient(tiny):
    torch.manual_seed(0)
    samples = tiny.sample_grads(E.IndeCateR(num_samples=1, chunk_size=4), 20_000)
    assert_mean_matches(samples, tiny.exact_grad())
    with pytest.raises(AssertionError):  # the bound rejects a wrong answer
        assert_mean_matches(samples, tiny.exact_grad() + 0.02)


def test_indecater_has_less_variance_than_rloo_at_equal_decoder_evaluations(tiny):
    """IndeCateR with one sample evaluates the decoder N (K - 1) + 1 = 5 times (the sample and its
    changes of one latent); RLOO gets as many samples, as each declares."""
    torch.manual_seed(0)
    estimator = E.IndeCateR(num_samples=1)
    evaluations = estimator.decoder_evaluations(tiny.latent)
    assert evaluations == tiny.N * (tiny.K - 1) + 1 == 5
    indecater = tiny.sample_grads(estimator, 20_000)
    rloo = tiny.sample_grads(E.RLOO(num_samples=evaluations), 20_000)
    ratio = indecater.var(0).sum() / rloo.var(0).sum()
    assert ratio < 0.5, f"measured variance ratio IndeCateR / RLOO = {ratio:.3f}"  # about 0.02 here


def test_indecater_is_the_rao_blackwellised_sum_for_a_fixed_sample(tiny, monkeypatch):
    logits, z = one_sample(tiny, 0)
    use_sample(monkeypatch, z)
    out = E.IndeCateR(num_samples=1, chunk_size=1)(logits, tiny.cost, tiny.latent)
    (grad,) = torch.autograd.grad(out.loss.sum(), logits)
    q = torch.softmax(logits.detach(), -1)[0]  # (N, K)
    expected = torch.zeros_like(q)
    for n in range(tiny.N):  # sum_k f(z[n <- k]) d q_n(k) / d logits_n, by loops
        costs = torch.stack([tiny.cost(torch.cat([z[0, :n], torch.eye(tiny.K, dtype=z.dtype)[k][None], z[0, n + 1 :]])) for k in range(tiny.K)])
        expected[n] = (torch.diag(q[n]) - q[n][:, None] * q[n][None, :]) @ costs
    torch.testing.assert_close(grad[0], expected)
    assert torch.equal(out.value, tiny.cost(z)) and torch.equal(out.loss.detach(), out.value.detach())


@pytest.mark.parametrize("bad", [{"num_samples": 0}, {"num_samples": "two"}, {"chunk_size": 0}])
def test_indecater_config_errors(bad):
    with pytest.raises(ConfigError):
        E.IndeCateR(**bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zgr_equals_reinmax_at_tau_1(tiny, monkeypatch, seed):
    """For a one-hot D, ReinMax's Jacobian at tau = 1 (Liu et al. 2023, Alg. 2) reduces to ZGR's,
    (diag(p) - p p^T + (D - p)(D - p)^T) / 2: same sample, same gradient."""
    logits, z = one_sample(tiny, seed)
    use_sample(monkeypatch, z)
    (zgr,) = torch.autograd.grad(E.ZGR()(logits, tiny.cost, tiny.latent).loss.sum(), logits)
    (reinmax,) = torch.autograd.grad(E.ReinMax(tau=1.0, tau_min=None)(logits, tiny.cost, tiny.latent).loss.sum(), logits)
    torch.testing.assert_close(zgr, reinmax)
    (warmer,) = torch.autograd.grad(E.ReinMax(tau=1.3)(logits, tiny.cost, tiny.latent).loss.sum(), logits)
    assert not torch.allclose(zgr, warmer), "the comparison can fail: ReinMax at tau 1.3 differs"


def test_one_latent_changes_moves_exactly_one_latent_to_each_other_category():
    z = sampling.gumbel_max(torch.zeros(2, 4, 3, 5), generator=torch.Generator().manual_seed(0))  # (S=2, B=4, N=3, K=5)
    changes = sampling.one_latent_changes(z)  # (S*N*(K-1), B, N, K)
    assert changes.shape == (2 * 3 * 4, 4, 3, 5) and ((changes.sum(-1) == 1).all())
    differs = (changes != z.repeat_interleave(3 * 4, 0)).any(-1)  # (C, B, N) which latent moved
    assert (differs.sum(-1) == 1).all(), "exactly one latent moved"
    chunks = torch.cat([sampling.one_latent_changes(z, s, s + 7) for s in range(0, 24, 7)])
    assert torch.equal(chunks, changes), "chunks are slices of the whole"
