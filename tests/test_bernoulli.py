"""Bernoulli latents (discrete_vae.latents.Bernoulli) and the estimators made for them, ARM and
DisARM, and the binary forms of the others, on a tiny problem (N=3 bits, a fixed linear decoder to
D=6 pixels) small enough to enumerate: the latent type's terms against torch.distributions and
brute force, every unbiased estimator's mean against the exact gradient within its Monte-Carlo
standard error (with a wrong answer rejected), DisARM's variance against ARM's at equal decoder
evaluations, and the estimators written on categories against their K = 2 forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import kl_divergence

from conftest import REPO, assert_mean_matches
from discrete_vae import estimators as E
from discrete_vae import sampling
from discrete_vae.build import build_module
from discrete_vae.errors import ConfigError
from discrete_vae.evaluation import exact_nll, sample_bounds
from discrete_vae.latents import Bernoulli, Categorical


class TinyBits:
    N, D = 3, 6

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.latent = Bernoulli(self.N)
        self.logits = torch.randn(self.N, generator=g, dtype=torch.float64)  # (N,)
        self.weight = torch.randn(self.N, self.D, generator=g, dtype=torch.float64) * 1.5
        self.bias = torch.randn(self.D, generator=g, dtype=torch.float64)
        self.x = (torch.rand(self.D, generator=g) < 0.5).to(torch.float64)

    def cost(self, z: torch.Tensor) -> torch.Tensor:
        """-log p(x|z).  # (..., N) -> (...)"""
        logits_x = z @ self.weight + self.bias
        return F.binary_cross_entropy_with_logits(logits_x, self.x.expand_as(logits_x), reduction="none").sum(-1)

    def exact_grad(self) -> torch.Tensor:
        """d/dphi of sum over the 8 configurations of q(z) f(z), written with loops.  # (N,)"""
        phi = self.logits.clone().requires_grad_()
        total = 0.0
        for c in range(2**self.N):
            z = torch.tensor([(c >> (self.N - 1 - n)) & 1 for n in range(self.N)], dtype=torch.float64)
            q = torch.prod(torch.where(z == 1, torch.sigmoid(phi), torch.sigmoid(-phi)))
            total = total + q * self.cost(z)
        (grad,) = torch.autograd.grad(total, phi)
        return grad

    def sample_grads(self, estimator, num: int) -> torch.Tensor:  # (num, N)
        logits = self.logits.expand(num, self.N).clone().requires_grad_()
        (grad,) = torch.autograd.grad(estimator(logits, self.cost, self.latent).loss.sum(), logits)
        return grad


def test_the_latent_types_terms_match_torch_distributions_and_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
    latent = Bernoulli(4, prior="learned")
    with torch.no_grad():
        latent.prior_logits.copy_(torch.randn(4, generator=g))
    q, p = TorchBernoulli(logits=logits), TorchBernoulli(logits=latent.prior_logits.double().expand(5, 4))
    torch.testing.assert_close(latent.kl(logits), kl_divergence(q, p).sum(-1))
    configs = latent.enumerate(dtype=torch.float64)  # (16, 4)
    assert configs.shape == (16, 4) and len({tuple(c.tolist()) for c in configs}) == 16
    assert torch.allclose(latent.log_prob(logits, configs[:, None]).exp().sum(0), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(latent.prior_log_prob(configs).exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(Bernoulli(4).kl(torch.zeros(1, 4)), torch.zeros(1), atol=1e-7)  # q = the uniform prior


def test_samples_and_the_antithetic_pair_have_the_right_marginals():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([-2.0, 0.0, 0.7, 3.0])
    n = 200_000
    rate = torch.sigmoid(logits)
    se = (rate * (1 - rate) / n).sqrt()
    assert ((sampling.bernoulli(logits, (n,), generator=g).mean(0) - rate).abs() <= 5 * se).all()
    b, b_tilde, u = sampling.antithetic_bernoulli(logits, (n,), generator=g)
    assert ((b.mean(0) - rate).abs() <= 5 * se).all() and ((b_tilde.mean(0) - rate).abs() <= 5 * se).all()
    assert torch.equal(b, (u > torch.sigmoid(-logits)).float()) and torch.equal(b_tilde, (u < rate).float())


@pytest.mark.parametrize("make", [E.ARM, E.DisARM, E.ScoreFunction, lambda: E.RLOO(4), E.Exact, E.IndeCateR, E.MuProp])
def test_the_unbiased_estimators_mean_is_the_exact_gradient(make):
    tiny = TinyBits()
    torch.manual_seed(0)
    samples = tiny.sample_grads(make(), 40_000)
    assert_mean_matches(samples, tiny.exact_grad())
    if samples.std(0).max() > 0:
        with pytest.raises(AssertionError):  # the bound rejects a wrong answer
            assert_mean_matches(samples, tiny.exact_grad() + 0.05)


class QuadraticBits(TinyBits):
    """TinyBits with a quadratic cost f(b) = b^T A b + w^T b, A with cross terms between bits."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.A = torch.randn(self.N, self.N, generator=g, dtype=torch.float64)
        self.w = torch.randn(self.N, generator=g, dtype=torch.float64)

    def cost(self, z: torch.Tensor) -> torch.Tensor:  # (..., N) -> (...)
        return ((z @ self.A) * z).sum(-1) + z @ self.w


def test_darn_on_bits_is_exact_in_expectation_for_a_quadratic_cost():
    """Gregor et al.'s learning signal f'(b)_n (b_n - 1/2), one per bit, has the exact gradient as its
    mean when f is quadratic; expanded to the probabilities instead of 1/2 it has not."""
    tiny = QuadraticBits()
    assert not torch.allclose(torch.sigmoid(tiny.logits), torch.full((tiny.N,), 0.5, dtype=torch.float64), atol=0.05)
    torch.manual_seed(0)
    samples = tiny.sample_grads(E.DARN(), 40_000)
    assert_mean_matches(samples, tiny.exact_grad())
    with pytest.raises(AssertionError):  # the bound rejects a wrong answer
        assert_mean_matches(samples, tiny.exact_grad() + 0.05)
    with pytest.raises(AssertionError):
        assert_mean_matches(tiny.sample_grads(E.DARN("mean"), 40_000), tiny.exact_grad())


def test_disarm_has_less_variance_than_arm_at_equal_decoder_evaluations():
    tiny = TinyBits()
    arm, disarm = E.ARM(), E.DisARM()
    assert arm.decoder_evaluations(tiny.latent) == disarm.decoder_evaluations(tiny.latent) == 2
    torch.manual_seed(0)
    ratio = tiny.sample_grads(disarm, 40_000).var(0).sum() / tiny.sample_grads(arm, 40_000).var(0).sum()
    assert ratio < 0.8, f"measured variance ratio DisARM / ARM = {ratio:.3f}"  # about 0.57 here


def test_the_antithetic_estimators_are_refused_by_a_latent_type_without_a_binary_view():
    for estimator in (E.ARM(), E.DisARM()):
        with pytest.raises(ConfigError, match=r"needs a latent type with a binary view .*\(has_binary_view\); Categorical"):
            estimator.check(Categorical(2, 3))
    with pytest.raises(ConfigError, match="latent.prior='flat' is not one of uniform, learned"):
        Bernoulli(3, prior="flat")


@pytest.mark.parametrize("make", [E.ReinMax, E.GappedStraightThrough, E.ZGR, E.IndeCateR])
def test_the_estimators_written_on_categories_see_a_bit_as_two(make):
    """On bits, ReinMax, GST, ZGR and IndeCateR are their K = 2 forms: with the same noise, their estimate
    for phi is that of the categorical estimator on logits (0, phi), pushed through d(0, phi)/dphi."""
    tiny = TinyBits()
    logits = tiny.logits.expand(500, tiny.N).clone().requires_grad_()
    pair = torch.stack([torch.zeros_like(logits), logits], -1)  # (B, N, 2)
    two = Categorical(tiny.N, 2)
    torch.manual_seed(3)
    (on_bits,) = torch.autograd.grad(make()(logits, tiny.cost, tiny.latent).loss.sum(), logits)
    torch.manual_seed(3)
    (on_pairs,) = torch.autograd.grad(make()(pair, lambda z: tiny.cost(z[..., 1]), two).loss.sum(), logits)
    torch.testing.assert_close(on_bits, on_pairs)
    assert on_bits.abs().sum() > 0
    assert make().decoder_evaluations(tiny.latent) == make().decoder_evaluations(two)


def test_gumbel_rao_on_bits_conditions_on_the_bit():
    """Gumbel-Rao on bits (Paulus et al. 2021): the logistic noise given the sampled bit. With M = 1 its
    mean is straight-through Gumbel's (the binary Concrete's straight-through form), and with M = 10
    its variance is smaller (their Prop. 1)."""
    tiny = TinyBits()
    torch.manual_seed(0)
    st = tiny.sample_grads(E.STGumbelSoftmax(tau=0.7), 100_000)
    rao_1 = tiny.sample_grads(E.GumbelRao(tau=0.7, num_mc=1), 100_000)
    rao_10 = tiny.sample_grads(E.GumbelRao(tau=0.7, num_mc=10), 100_000)
    se = (st.var(0) / len(st) + rao_1.var(0) / len(rao_1)).sqrt()
    assert ((st.mean(0) - rao_1.mean(0)).abs() <= 5 * se).all()
    assert rao_10.var(0).sum() < 0.9 * st.var(0).sum(), (rao_10.var(0).sum(), st.var(0).sum())


def test_the_binary_concrete_approaches_the_exact_direction_as_tau_shrinks():
    """Gumbel-Softmax on bits is the binary Concrete (Maddison et al. 2017, Sec. 3.3)."""
    tiny = TinyBits()
    torch.manual_seed(0)
    exact = tiny.exact_grad()
    cosines, biases, ses = [], [], []
    for tau in (2.0, 1.0, 0.5, 0.1):
        grads = tiny.sample_grads(E.GumbelSoftmax(tau=tau), 100_000)
        cosines.append(F.cosine_similarity(grads.mean(0), exact, dim=0).item())
        biases.append((grads.mean(0) - exact).norm().item())
        ses.append((grads.var(0).sum() / len(grads)).sqrt().item())
    assert all(a < b for a, b in zip(cosines, cosines[1:])), cosines
    assert cosines[-1] > 0.999, cosines  # 0.9999 here
    assert biases[0] > 20 * ses[0], "at tau=2 the relaxation is clearly biased"


@pytest.mark.parametrize("make", [lambda: E.STGumbelSoftmax(tau=0.7), lambda: E.StraightThrough(tau=0.7)])
def test_straight_through_on_bits_reports_the_cost_at_an_exact_sample(make):
    tiny, seen = TinyBits(), []
    logits = tiny.logits.expand(50_000, tiny.N).clone().requires_grad_()
    out = make()(logits, lambda z: seen.append(z) or tiny.cost(z), tiny.latent)
    (z,) = seen
    assert set(z.detach().unique().tolist()) == {0.0, 1.0} and torch.equal(out.value, tiny.cost(z.detach()))
    rate = torch.sigmoid(tiny.logits)
    assert ((z.detach().mean(0) - rate).abs() <= 5 * (rate * (1 - rate) / 50_000).sqrt()).all()
    (grad,) = torch.autograd.grad(out.loss.sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def compose_bernoulli(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["latent=bernoulli", *overrides])


def test_a_bernoulli_vae_trains_its_learned_prior_and_is_evaluated_exactly():
    torch.manual_seed(0)
    cfg = compose_bernoulli("estimator=disarm", "latent.num_latents=4", "latent.prior=learned",
                            "model.hidden_dims=[16]")
    model = build_module(cfg)
    assert "model.latent.prior_logits" in model.state_dict()  # trained and checkpointed with the model
    x = (torch.rand(8, 784) < 0.2).float()
    out = model.model.objective(x, model.estimator)
    out.loss.backward()
    assert model.model.latent.prior_logits.grad is not None and torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.model.encoder.parameters())
    with torch.no_grad():
        nll = exact_nll(model.model, x)  # 16 configurations
        bounds = sample_bounds(model.model, x, 2000, torch.Generator().manual_seed(0))
    assert (bounds.neg_elbo >= nll - 1e-3).all() and (bounds.nll_iwae - nll).abs().max() < 0.5
    uniform = build_module(compose_bernoulli("estimator=arm", "latent.num_latents=4", "model.hidden_dims=[16]"))
    assert not any("prior_logits" in k for k in uniform.state_dict()), "a uniform prior has no state"
