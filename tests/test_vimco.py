"""VIMCO and the m-sample training objective: on tiny models small enough to enumerate every m-tuple
of configurations of every layer (a two-layer VAE of bits, a categorical VAE, a two-layer SBN), the
mean of VIMCO's estimates is the exact gradient of the expected m-sample bound E[log 1/m sum_j w_j]
for every parameter, within the Monte-Carlo bound (which rejects a wrong answer)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import assert_mean_matches
from discrete_vae import estimators as E
from discrete_vae.errors import ConfigError
from discrete_vae.latents import Bernoulli, Categorical
from discrete_vae.sbn import SBN
from discrete_vae.vae import VAE

X = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)


def expected_bound(model, x: torch.Tensor, m: int) -> torch.Tensor:
    """E[log 1/m sum_j w_j] over m independent draws through every layer, summed over every m-tuple of
    configurations of all layers (the draws held, so that autograd gives the exact gradient).  # x (1, D)"""
    configs = list(itertools.product(*[latent.enumerate(dtype=x.dtype) for latent in model.latents]))
    tuples = list(itertools.product(configs, repeat=m))  # T m-tuples of (z_1, ..., z_L)
    zs = [torch.stack([torch.stack([draw[level] for draw in t]) for t in tuples], 1)  # (m, T, *shape_l)
          for level in range(len(model.latents))]
    rows = x.expand(len(tuples), -1)
    drawn = [(model.encode(rows), zs[0])]
    for level in range(1, len(zs)):
        drawn.append((model.encode_above(level - 1, zs[level - 1]), zs[level]))
    log_w, _ = model.weights(rows, drawn)  # (m, T)
    log_q = sum(latent.log_prob(up, z) for latent, (up, z) in zip(model.latents, drawn))  # (m, T)
    assert torch.allclose(log_q.sum(0).exp().sum(), torch.ones((), dtype=x.dtype)), "the tuples' probabilities sum to 1"
    return (log_q.sum(0).exp() * (torch.logsumexp(log_w, 0) - math.log(m))).sum()


def models():
    torch.manual_seed(0)
    two_layer = VAE(Bernoulli(2), input_dim=4, hidden_dims=[], upper_latents=[Bernoulli(2)], output_bias_init="default")
    categorical = VAE(Categorical(1, 3), input_dim=4, hidden_dims=[], output_bias_init="default")
    sbn = SBN(Bernoulli(2), upper_latents=[Bernoulli(2)], input_dim=4, split=2)
    return {"vae_two_layers": (two_layer, 2), "vae_categorical": (categorical, 3), "sbn_two_layers": (sbn, 2)}


@pytest.mark.parametrize("name", ["vae_two_layers", "vae_categorical", "sbn_two_layers"])
def test_vimco_is_unbiased_for_the_m_sample_bound_of_every_parameter(name):
    model, m = models()[name]
    model = model.double()
    params = [p for p in model.parameters()]
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(-expected_bound(model, X, m), params)])
    estimators = model.layer_estimators(E.VIMCO(num_samples=m))
    torch.manual_seed(1)
    samples = []
    for _ in range(12):  # 12 means of 4,000 estimates
        out = model.objective(X.expand(4_000, -1), estimators)
        samples.append(torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, params)]))
    samples = torch.stack(samples)
    moving = exact != 0
    assert moving.sum() > 10
    assert_mean_matches(samples[:, moving], exact[moving], z=5.0)
    with pytest.raises(AssertionError):  # the bound rejects a wrong answer
        assert_mean_matches(samples[:, moving], exact[moving] + 0.05, z=5.0)


def test_the_objective_reports_the_bound_it_trains_and_the_elbo_as_the_others_do():
    model, _ = models()["vae_two_layers"]
    model = model.double()
    torch.manual_seed(0)
    out = model.objective(X.expand(20_000, -1), model.layer_estimators(E.VIMCO(num_samples=4)))
    torch.manual_seed(0)
    plain = model.objective(X.expand(20_000, -1), model.layer_estimators(E.ScoreFunction()))
    assert out.nll_iwae is not None and plain.nll_iwae is None
    assert torch.allclose(out.loss, out.nll_iwae)  # the surrogate is worth the negative bound
    assert out.nll_iwae < out.neg_elbo - 0.05, "the 4-sample bound is tighter than the ELBO"
    assert abs(float((out.neg_elbo - plain.neg_elbo).detach())) < 0.05 and torch.equal(out.kl, plain.kl)
    torch.testing.assert_close(out.nll_iwae, -expected_bound(model, X, 4).detach(), atol=0.05, rtol=0)


def test_vimco_is_refused_where_it_cannot_estimate():
    with pytest.raises(ConfigError, match=r"estimator.num_samples must be an integer >= 2 for vimco"):
        E.VIMCO(num_samples=1)
    model, _ = models()["vae_two_layers"]
    with pytest.raises(ConfigError, match="give it to every stochastic layer or to none"):
        model.layer_estimators([E.VIMCO(), E.ScoreFunction()])
    with pytest.raises(ConfigError, match=r"VIMCO.bound\(log_w, log_q\)"):
        E.VIMCO()(torch.zeros(2, 3), lambda z: z.sum(-1), Bernoulli(3))


class NoBaseline(E.VIMCO):
    """The m-sample score function without VIMCO's baselines: every sample's signal is the bound."""

    def bound(self, log_w, log_q):
        bound = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
        score = (bound.detach() * (log_q - log_q.detach())).sum(0)
        return E.EstimatorOutput(-(bound + score), -bound.detach())


def test_the_leave_one_out_signals_cut_the_variance_of_the_plain_multi_sample_score_function():
    model, m = models()["vae_two_layers"]
    model = model.double()
    encoder = list(model.encoder.parameters())
    variances = []
    for estimator in (E.VIMCO(num_samples=m), NoBaseline(num_samples=m)):
        torch.manual_seed(0)
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(  # 300 means of 20 estimates
            model.objective(X.expand(20, -1), model.layer_estimators(estimator)).loss, encoder)]) for _ in range(300)])
        variances.append(grads.var(0).sum())
    assert variances[0] < 0.5 * variances[1], variances  # about 0.03 here


def test_a_chain_counts_vimcos_draws_once_not_once_per_layer():
    """m draws go through every layer together: m decoder evaluations per example, not m^L, so m = 20 on
    three layers (20^3 = 8,000, over the chain's budget of 4,096 were it a product) is accepted."""
    model = VAE(Bernoulli(4), input_dim=4, hidden_dims=[], upper_latents=[Bernoulli(3), Bernoulli(2)],
                output_bias_init="default")
    estimators = model.layer_estimators(E.VIMCO(num_samples=20))
    assert model.layer_counts(estimators) == [20]
    assert model.layer_counts(model.layer_estimators(E.RLOO(num_samples=4))) == [4, 4, 4]
    torch.manual_seed(0)
    out = model.objective(X.float().expand(8, -1), estimators)
    assert torch.isfinite(out.loss) and out.nll_iwae is not None
