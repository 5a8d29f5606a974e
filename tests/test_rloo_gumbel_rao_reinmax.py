"""RLOO, Gumbel-Rao and ReinMax on the tiny problem (N=2, K=3): unbiasedness, equal means,
variance ordering and exactness claims, each against a Monte-Carlo standard error (fixed seeds)
and each shown to reject a deliberately wrong answer, plus their config errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import assert_mean_matches
from discrete_vae import estimators as E
from discrete_vae import sampling
from discrete_vae.errors import ConfigError, find_user_error

CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"


def total_variance(samples: torch.Tensor) -> tuple[float, float]:
    """tr Cov of gradient samples and its standard error.  # (M, N, K) -> (value, se)"""
    flat = samples.flatten(1)
    sq = (flat - flat.mean(0)).square().sum(1)  # (M,) squared distances to the mean
    M = len(flat)
    return (sq.sum() / (M - 1)).item(), (sq.std() / M**0.5).item()


def two_sample_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per coordinate, |mean(a) - mean(b)| in units of the combined standard error."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return (a.mean(0) - b.mean(0)).abs() / se


def fixed_samples(monkeypatch, z: torch.Tensor) -> None:
    """Make sampling.gumbel_max return `z` (the estimators look it up at call time)."""
    monkeypatch.setattr(sampling, "gumbel_max", lambda logits, sample_shape=(), generator=None: z)


# -- RLOO ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [2, 4])
def test_rloo_mean_gradient_is_the_exact_gradient(tiny, num_samples):
    torch.manual_seed(0)
    grads = tiny.sample_grads(E.RLOO(num_samples), 20_000)  # (M, N, K)
    exact = tiny.exact_grad()
    assert_mean_matches(grads, exact, z=5)
    # Not vacuous: a baseline that includes the sample itself (the mean of all S) scales the
    # expected gradient by (S - 1) / S; the bound tells that apart.
    with pytest.raises(AssertionError):
        assert_mean_matches(grads, (num_samples - 1) / num_samples * exact, z=5)


def test_rloo_is_the_leave_one_out_formula(tiny, monkeypatch):
    """grad = 1/S sum_i (f_i - 1/(S-1) sum_{j != i} f_j) (z_i - softmax(logits)) (Kool et al. 2019)."""
    idx = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 0]])  # S=4 samples of (z_1, z_2)
    z = F.one_hot(idx, 3).double()[:, None]  # (S, B=1, N, K)
    fixed_samples(monkeypatch, z)
    logits = tiny.logits[None].clone().requires_grad_()  # (1, N, K)
    out = E.RLOO(4)(logits, tiny.cost, tiny.latent)
    (grad,) = torch.autograd.grad(out.loss.sum(), logits)
    f = tiny.cost(z[:, 0])  # (S,)
    baseline = torch.stack([torch.cat([f[:i], f[i + 1 :]]).mean() for i in range(4)])
    score = z[:, 0] - torch.softmax(tiny.logits, -1)  # (S, N, K): grad of log q(z_i)
    expected = ((f - baseline)[:, None, None] * score).mean(0)
    torch.testing.assert_close(grad[0], expected)
    torch.testing.assert_close(out.value[0], f.mean())


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5])
def test_rloo_needs_two_samples(bad):
    with pytest.raises(ConfigError, match=r"num_samples must be an integer >= 2") as err:
        E.RLOO(num_samples=bad)
    assert str(bad) in str(err.value)


def test_rloo_config_error_through_hydra():
    node = OmegaConf.merge(OmegaConf.load(CONF / "rloo.yaml"), {"num_samples": 1})
    with pytest.raises(Exception) as err:
        instantiate(node)
    user_error = find_user_error(err.value)
    assert isinstance(user_error, ConfigError) and "estimator.num_samples" in str(user_error)


# -- Gumbel-Rao ---------------------------------------------------------------------------------
def test_gumbel_rao_with_one_draw_has_the_mean_of_st_gumbel(tiny):
    torch.manual_seed(1)
    M = 50_000
    st_gumbel = tiny.sample_grads(E.STGumbelSoftmax(tau=1.0), M).flatten(1)
    rao = tiny.sample_grads(E.GumbelRao(tau=1.0, num_mc=1), M).flatten(1)
    assert two_sample_z(rao, st_gumbel).max() < 5
    # Not vacuous: plain straight-through (no noise in the backward) has another mean.
    st = tiny.sample_grads(E.StraightThrough(tau=1.0), M).flatten(1)
    assert two_sample_z(st, st_gumbel).max() > 5


def test_gumbel_rao_variance_is_at_most_st_gumbel_and_falls_with_num_mc(tiny):
    """Paulus et al. 2021, Prop. 1: Rao-Blackwellisation does not increase the variance; with
    num_mc draws the conditional part of the variance shrinks like 1/num_mc."""
    torch.manual_seed(2)
    st_var, st_se = total_variance(tiny.sample_grads(E.STGumbelSoftmax(tau=1.0), 50_000))
    var, se = {}, {}
    for num_mc, M in ((1, 50_000), (10, 50_000), (100, 20_000)):
        var[num_mc], se[num_mc] = total_variance(tiny.sample_grads(E.GumbelRao(tau=1.0, num_mc=num_mc), M))
    assert var[1] <= st_var + 5 * (st_se**2 + se[1] ** 2) ** 0.5
    assert var[10] <= st_var + 5 * (st_se**2 + se[10] ** 2) ** 0.5
    for small, large in ((1, 10), (10, 100)):
        assert var[small] - var[large] > 5 * (se[small] ** 2 + se[large] ** 2) ** 0.5, (var, se)
    # Not vacuous: ST-Gumbel at a lower temperature is noisier, and the first bound rejects it.
    cold_var, cold_se = total_variance(tiny.sample_grads(E.STGumbelSoftmax(tau=0.5), 50_000))
    assert cold_var > st_var + 5 * (st_se**2 + cold_se**2) ** 0.5


def test_gumbel_rao_forward_is_the_hard_sample_and_noise_has_no_gradient(tiny, monkeypatch):
    seen = []
    real = sampling.conditional_gumbel_scores  # what the categorical latent's conditional_perturb draws

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(sampling, "conditional_gumbel_scores", spy)
    torch.manual_seed(3)
    logits = tiny.logits.expand(100, -1, -1).clone().requires_grad_()
    z_seen = []
    E.GumbelRao(tau=0.5, num_mc=7)(logits, lambda z: z_seen.append(z) or tiny.cost(z), tiny.latent)
    (z,) = z_seen
    assert torch.equal(z, sampling.one_hot_argmax(z.detach()))  # exactly one-hot
    (scores,) = seen
    noise = scores - logits.detach()
    assert noise.shape == (7, 100, 2, 3) and not scores.requires_grad
    assert torch.equal(sampling.one_hot_argmax(logits.detach() + noise), z.detach().expand(7, -1, -1, -1))


def test_gumbel_rao_needs_a_positive_num_mc():
    with pytest.raises(ConfigError, match="num_mc"):
        E.GumbelRao(num_mc=0)


# -- ReinMax ------------------------------------------------------------------------------------
def expected_gradient_over_d(tiny, estimator, cost, monkeypatch) -> torch.Tensor:
    """E_D[ReinMax gradient] exactly: its only randomness is D, so enumerate the K^N values of D."""
    configs = sampling.enumerate_one_hot(tiny.N, tiny.K, dtype=torch.float64)  # (C, N, K)
    fixed_samples(monkeypatch, configs)
    logits = tiny.logits.expand(len(configs), -1, -1).clone().requires_grad_()
    (grads,) = torch.autograd.grad(estimator(logits, cost, tiny.latent).loss.sum(), logits)  # (C, N, K)
    q = sampling.log_prob_categorical(tiny.logits, configs).exp()  # (C,)
    return (q[:, None, None] * grads).sum(0)


def test_reinmax_is_exact_in_expectation_for_quadratic_costs_at_tau_1(tiny, monkeypatch):
    """ReinMax approximates f(I_i) - f(D) with the trapezoid rule (Heun's method; Liu et al. 2023),
    exact when f is quadratic: at tau = 1 its expected gradient is then the true gradient."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)

    def quadratic(z):  # (..., N, K) -> (...)
        v = z.flatten(-2)
        return ((v @ A) * v).sum(-1) + v @ b

    tiny.cost = quadratic
    exact = tiny.exact_grad()
    torch.testing.assert_close(expected_gradient_over_d(tiny, E.ReinMax(tau=1.0), quadratic, monkeypatch), exact)
    # Not vacuous: straight-through (first order) is not exact, nor is ReinMax at tau = 1.3.
    st = expected_gradient_over_d(tiny, E.StraightThrough(tau=1.0), quadratic, monkeypatch)
    assert (st - exact).abs().max() > 0.1
    warm = expected_gradient_over_d(tiny, E.ReinMax(tau=1.3), quadratic, monkeypatch)
    assert (warm - exact).abs().max() > 0.01


def test_reinmax_sampled_gradient_has_its_enumerated_mean(tiny, monkeypatch):
    torch.manual_seed(4)
    grads = tiny.sample_grads(E.ReinMax(), 20_000)
    expected = expected_gradient_over_d(tiny, E.ReinMax(), tiny.cost, monkeypatch)
    assert_mean_matches(grads, expected, z=5)
    with pytest.raises(AssertionError):  # not vacuous: the exact gradient is another target
        assert_mean_matches(grads, tiny.exact_grad(), z=5)


def test_reinmax_defaults_and_configs():
    est = E.ReinMax()
    assert est.tau.item() == pytest.approx(1.3) and est.tau_min == pytest.approx(1.3)
    assert E.ReinMax(tau_min=None).tau_min is None
    yaml = {name: instantiate(OmegaConf.load(CONF / f"{name}.yaml")) for name in ("rloo", "gumbel_rao", "reinmax")}
    assert yaml["rloo"].num_samples == 4
    assert yaml["gumbel_rao"].num_mc == 10 and yaml["gumbel_rao"].tau.item() == 1.0
    assert yaml["reinmax"].tau.item() == pytest.approx(1.3) and yaml["reinmax"].tau_min == pytest.approx(1.3)
