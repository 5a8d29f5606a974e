"""A VAE with two stochastic layers (discrete_vae.vae, `upper_latents`): q(z1|x) q(z2|z1) and
p(z2) p(z1|z2) p(x|z1), on a tiny model (6 pixels, 2 + 2 bits: 16 configurations) written out by
brute force: the exact -ELBO and -log p(x), the sampled bounds, and every unbiased estimator's
mean against the exact gradient of both layers' encoders within a Monte-Carlo bound that can fail."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_mean_matches
from discrete_vae import estimators as E
from discrete_vae.evaluation import exact_nll, sample_bounds
from discrete_vae.latents import Bernoulli, Categorical
from discrete_vae.vae import VAE

D = 6


def tiny(seed: int = 0, upper=None) -> VAE:
    torch.manual_seed(seed)
    upper = upper if upper is not None else [Bernoulli(2, prior="learned")]
    model = VAE(Bernoulli(2), input_dim=D, hidden_dims=[], upper_latents=upper).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


X = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)


def bits(n):
    return [torch.tensor(c, dtype=torch.float64) for c in itertools.product([0.0, 1.0], repeat=n)]


def brute(model: VAE, x: torch.Tensor):
    """(-ELBO, -log p(x)) of one image, summing q(z1|x) q(z2|z1) and p(z2) p(z1|z2) p(x|z1) over the 16
    configurations with torch.distributions-free formulas."""
    layer = model.upper[0]

    def log_bern(logits, z):
        return -F.binary_cross_entropy_with_logits(logits, z, reduction="sum")

    neg_elbo, log_px = 0.0, []
    for z1 in bits(2):
        for z2 in bits(2):
            log_q = log_bern(model.encoder(x), z1) + log_bern(layer.encoder(z1), z2)
            log_p = (log_bern(model.decoder(z1), x) + log_bern(layer.decoder(z2), z1)
                     + log_bern(layer.latent.prior_logits, z2))
            neg_elbo = neg_elbo + log_q.exp() * (log_q - log_p)
            log_px.append(log_p)
    return neg_elbo, -torch.logsumexp(torch.stack(log_px), 0)


def test_exact_terms_equal_brute_force():
    model = tiny()
    estimators = model.layer_estimators(E.Exact())
    assert len(estimators) == 2 and estimators[1] is not estimators[0]
    for i in range(len(X)):
        want_elbo, want_nll = brute(model, X[i])
        torch.testing.assert_close(model.objective(X[i : i + 1], estimators).neg_elbo, want_elbo)
        torch.testing.assert_close(exact_nll(model, X[i : i + 1])[0], want_nll)
    assert model.num_configs == 16


def test_sampled_bounds_bracket_the_exact_likelihood():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bounds = sample_bounds(model, X, 20_000, g)
        nll = exact_nll(model, X)
        hard = torch.stack([model.neg_elbo(X, g) for _ in range(4000)])  # (4000, B)
    elbo = torch.stack([brute(model, X[i])[0] for i in range(len(X))])
    assert ((bounds.neg_elbo - elbo).abs() < 0.05).all(), (bounds.neg_elbo, elbo)  # m = 20,000 draws
    assert (bounds.nll_iwae > nll).all() and (bounds.nll_iwae < elbo).all()  # between, as it must be
    # the importance weights are unbiased for p(x): their mean, within its standard error
    with torch.no_grad():
        log_w, _ = model.sample_terms(X, model.encode(X), 200_000, g)  # (m, B)
    w = log_w.exp()
    assert ((w.mean(0) - (-nll).exp()).abs() < 5 * w.std(0) / len(w) ** 0.5).all()
    se = hard.std(0) / len(hard) ** 0.5
    assert ((hard.mean(0) - elbo).abs() < 5 * se).all()


def test_images_are_drawn_down_the_chain():
    model = tiny()
    images = model.sample_images(5, seed=1)
    assert images.shape == (5, D) and torch.equal(images, model.sample_images(5, seed=1))


@pytest.mark.parametrize("make", [E.ScoreFunction, lambda: E.RLOO(2), E.ARM, E.DisARM, E.REBAR, E.RELAX,
                                  E.IndeCateR, E.MuProp, lambda: E.MuProp(above="mean_field")],
                         ids=["sf", "rloo", "arm", "disarm", "rebar", "relax", "indecater", "muprop", "muprop_mean_field"])
def test_an_unbiased_estimator_is_unbiased_for_both_layers(make):
    model = tiny()
    encoders = [p for name, p in model.named_parameters() if "encoder" in name]
    x = X[:1]
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        model.objective(x, model.layer_estimators(E.Exact())).loss, encoders)])
    torch.manual_seed(0)
    estimators = [e.double().eval() for e in model.layer_estimators(make())]
    rows = x.expand(4_000, D)
    samples = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        model.objective(rows, estimators).loss, encoders)]) for _ in range(12)])  # 12 means of 4,000
    moving = exact != 0  # weights of x's zero pixels get no gradient, exactly
    assert torch.equal(samples[:, ~moving], torch.zeros_like(samples[:, ~moving]))
    assert_mean_matches(samples[:, moving], exact[moving])
    with pytest.raises(AssertionError):
        assert_mean_matches(samples[:, moving], exact[moving] + 0.05)


def test_a_categorical_layer_above_bits_and_one_estimator_for_two_layers_refused():
    model = tiny(upper=[Categorical(1, 3)])
    estimators = model.layer_estimators(E.GumbelSoftmax(tau=0.5))
    out = model.objective(X, estimators)
    assert torch.isfinite(out.loss) and out.neg_elbo > 0
    from discrete_vae.errors import ConfigError

    with pytest.raises(ConfigError, match="needs one estimator per layer"):
        model.objective(X, E.GumbelSoftmax())
    with pytest.raises(ConfigError, match="needs a latent type with a binary view"):
        model.layer_estimators(E.ARM())


def test_a_two_layer_run_trains_checkpoints_both_layers_and_resumes_exactly(data_root, tmp_path):
    """Through scripts/train.py: RELAX on 8 + 8 bits, each layer its own copy (its own control network
    and Adam state); killed at step 7 (last.ckpt every 3 steps) and resumed, it ends bit-for-bit as the
    run never interrupted."""
    from test_long_runs import kill_at, train, weights

    args = ["upper_latents=[{_target_:discrete_vae.latents.Bernoulli,num_latents:8,prior:learned}]",
            "latent=bernoulli", "latent.num_latents=8", "model.hidden_dims=[16]", "estimator=relax",
            "trainer.max_steps=10", "trainer.limit_val_batches=2", "trainer.limit_test_batches=1",
            "test_iwae_samples=5", "callbacks.latest.every_n_train_steps=3", "trainer.enable_progress_bar=false"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train([*args, f"hydra.run.dir={straight}"], data_root, tmp_path)
    proc = train([*args, kill_at(7), f"hydra.run.dir={broken}"], data_root, tmp_path, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train([*args, f"hydra.run.dir={broken}"], data_root, tmp_path)
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resuming"
    assert {"model.upper.0.encoder.net.0.weight", "model.upper.0.latent.prior_logits",
            "estimators_above.0.net.0.weight", "estimator.net.0.weight"} <= a.keys()
    assert a["estimators_above.0.net.0.weight"].shape == (137, 16) and a["estimator.net.0.weight"].shape == (137, 16)


def test_a_chain_too_costly_for_its_estimator_is_refused_with_each_layers_count():
    from discrete_vae.errors import ConfigError

    big = VAE(Bernoulli(100), input_dim=D, hidden_dims=[], upper_latents=[Bernoulli(100)])
    with pytest.raises(ConfigError, match=r"evaluates the decoder 101 x 101 = 1\.02e\+04 times per example"):
        big.layer_estimators(E.IndeCateR())
    assert len(big.layer_estimators(E.DisARM())) == 2  # 2 x 2 evaluations


def test_the_gradient_diagnostics_measure_bias_through_both_layers():
    """discrete_vae.diagnostics on a chain: the lowest encoder's gradient, each layer with its own copy of
    the estimator, against the exact gradient of the 16 configurations: ARM's bias is within its
    standard error, the relaxed estimator's (Gumbel-Softmax at tau = 1 on both layers) far outside it."""
    from discrete_vae.diagnostics import gradient_diagnostics

    model = tiny()
    torch.manual_seed(0)
    arm = gradient_diagnostics(model, X, E.ARM(), 2000, timing_repeats=0)
    gumbel = gradient_diagnostics(model, X, E.GumbelSoftmax(tau=1.0), 2000, timing_repeats=0)
    assert arm.reference.kind == "exact" and arm.bias < 4 * arm.bias_se
    assert gumbel.bias > 10 * gumbel.bias_se, (gumbel.bias, gumbel.bias_se)


def test_the_description_names_only_the_prior_the_model_uses():
    """z1's prior is p(z1 | z2), not its latent's own: only the top layer's is named."""
    assert tiny().describe() == "N=2 Bernoulli latents / N=2 Bernoulli latents (learned prior)"
    assert VAE(Bernoulli(3), input_dim=D, hidden_dims=[]).describe() == "N=3 Bernoulli latents (uniform prior)"
