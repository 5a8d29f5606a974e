"""Stochastic binary networks for structured output prediction (discrete_vae.sbn, Jang et al. 2017,
Sec. 4.1): the lower half of an image from its upper half through two stochastic layers. On a tiny
network (3 + 3 pixels, 2 + 2 bits) written out by brute force: the exact -log p(x_lower | x_upper),
the sampled bounds, and every unbiased estimator's mean against the exact gradient of both layers;
then the preset through scripts/train.py."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_mean_matches, run_script
from discrete_vae import estimators as E
from discrete_vae.evaluation import evaluate, exact_nll, sample_bounds
from discrete_vae.latents import Bernoulli, Categorical
from discrete_vae.sbn import SBN

X = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)


def tiny(seed: int = 0, latent=None, upper=None) -> SBN:
    torch.manual_seed(seed)
    model = SBN(latent or Bernoulli(2), upper or [Bernoulli(2)], input_dim=6, split=3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def brute_nll(model: SBN, x: torch.Tensor) -> torch.Tensor:
    """-log sum_{h1,h2} p(h1|x_u) p(h2|h1) p(x_l|h2), written out for one image."""
    def log_bern(logits, z):
        return -F.binary_cross_entropy_with_logits(logits, z, reduction="sum")

    upper, lower = x[:3], x[3:]
    terms = []
    for h1 in itertools.product([0.0, 1.0], repeat=2):
        h1 = torch.tensor(h1, dtype=torch.float64)
        for h2 in itertools.product([0.0, 1.0], repeat=2):
            h2 = torch.tensor(h2, dtype=torch.float64)
            terms.append(log_bern(model.encoder(upper), h1) + log_bern(model.upper[0].encoder(h1), h2)
                         + log_bern(model.decoder(h2), lower))
    return -torch.logsumexp(torch.stack(terms), 0)


def test_the_exact_likelihood_is_the_brute_force_sum_and_the_bounds_lie_above_it():
    model = tiny()
    nll = exact_nll(model, X)
    torch.testing.assert_close(nll, torch.stack([brute_nll(model, x) for x in X]))
    g = torch.Generator().manual_seed(0)
    bounds = sample_bounds(model, X, 50_000, g)
    assert (bounds.neg_elbo > bounds.nll_iwae).all() and (bounds.nll_iwae > nll - 0.01).all()  # a bound in expectation
    log_w, _ = model.sample_terms(X, model.encode(X), 200_000, g)  # p(x_l | h_i): unbiased for p(x_l | x_u)
    w = log_w.exp()
    assert ((w.mean(0) - (-nll).exp()).abs() < 5 * w.std(0) / len(w) ** 0.5).all()
    result = evaluate(model.float(), [X.float()], num_samples=100, seed=0)  # evaluate's float32 images
    assert result["nll_exact"] == pytest.approx(float(nll.mean()), rel=1e-5)


@pytest.mark.parametrize("make", [E.ScoreFunction, lambda: E.RLOO(2), E.ARM, E.DisARM, E.REBAR, E.RELAX,
                                  E.IndeCateR, E.MuProp, lambda: E.MuProp(above="mean_field")],
                         ids=["sf", "rloo", "arm", "disarm", "rebar", "relax", "indecater", "muprop", "muprop_mean_field"])
def test_an_unbiased_estimator_is_unbiased_for_both_layers(make):
    model = tiny()
    params = [model.encoder.net[0].weight, model.upper[0].encoder.net[0].weight]
    x = X[:1]
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        model.objective(x, model.layer_estimators(E.Exact())).loss, params)])
    torch.manual_seed(0)
    estimators = [e.double().eval() for e in model.layer_estimators(make())]
    rows = x.expand(4_000, 6)
    samples = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        model.objective(rows, estimators).loss, params)]) for _ in range(12)])
    moving = exact != 0
    assert torch.equal(samples[:, ~moving], torch.zeros_like(samples[:, ~moving]))
    assert_mean_matches(samples[:, moving], exact[moving])
    with pytest.raises(AssertionError):
        assert_mean_matches(samples[:, moving], exact[moving] + 0.05)


@pytest.mark.parametrize("make", [E.GumbelSoftmax, E.STGumbelSoftmax, E.StraightThrough, E.GumbelRao, E.ReinMax,
                                  E.GappedStraightThrough, E.ZGR])
def test_the_pathwise_estimators_differentiate_through_both_categorical_layers(make):
    model = tiny(latent=Categorical(1, 3), upper=[Categorical(1, 3)])
    out = model.objective(X, model.layer_estimators(make()))
    grads = torch.autograd.grad(out.loss, [model.encoder.net[0].weight, model.upper[0].encoder.net[0].weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(out.loss, out.neg_elbo)


def test_the_preset_trains_and_evaluates_through_the_scripts(data_root, tmp_path):
    """The preset validates by steps (every 2,500) and follows the validation bound: a run whose last
    epoch ends between two validations (3 steps here) still ends with one, and tests its checkpoint."""
    run = tmp_path / "run"
    args = ["experiment=jang2017_sbn", "estimator=st_gumbel", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=2", "trainer.limit_test_batches=1", "test_iwae_samples=5",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    run_script("train.py", *args, env={"DISCRETE_VAE_DATA": str(data_root)})
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 3
    assert record["best_checkpoint"].endswith("best-step3.ckpt")
    metrics = record["metrics"]
    assert metrics["val/nll_iwae"] <= metrics["val/neg_elbo"] + 1
    assert 100 < metrics["test/neg_elbo"] < 400 and metrics["test/nll_iwae"] <= metrics["test/neg_elbo"] + 1
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"]["model.encoder.net.0.weight"].shape == (200, 392)
    assert state["state_dict"]["model.upper.0.encoder.net.0.weight"].shape == (200, 200)
    assert state["state_dict"]["model.decoder.net.0.weight"].shape == (392, 200)


def test_the_best_checkpoint_can_follow_the_validation_bound(data_root, tmp_path):
    """val_iwae_samples logs val/nll_iwae at each validation; with it as the monitor, the best
    checkpoint is the one with the lowest m-sample bound, and the record keeps the final one."""
    run = tmp_path / "run"
    args = ["experiment=jang2017_sbn", "estimator=gumbel", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "test=false", "val_iwae_samples=3",
            "callbacks.checkpoint.monitor=val/nll_iwae", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    run_script("train.py", *args, env={"DISCRETE_VAE_DATA": str(data_root)})
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"val/neg_elbo", "val/nll_iwae"} and 100 < metrics["val/nll_iwae"] < 400
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    (best,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert best["monitor"] == "val/nll_iwae" and best["best_model_path"].split("/")[-1] in ("best-step2.ckpt",
                                                                                          "best-step4.ckpt")
    assert float(best["best_model_score"]) <= metrics["val/nll_iwae"] + 1e-6


def test_the_description_names_no_prior():
    """Every SBN layer is drawn given the one before (h1 given x_upper): no layer's prior is used."""
    assert tiny().describe() == "N=2 Bernoulli latents / N=2 Bernoulli latents"


def test_muprop_mean_field_expands_around_the_deterministic_pass_through_the_layers_above():
    """`cost.mean_field`, what MuProp(above="mean_field") expands, is Gu et al.'s mean-field network:
    h1 given, h2 at its mean sigma(W2 h1 + b2), then -log p(x_lower | that mean); no draw, so it is
    the same every call. A layer above without a mean is refused in one line."""
    from discrete_vae.errors import ConfigError

    class Spy(E.ScoreFunction):
        def forward(self, logits, cost, latent, generator=None):
            point = latent.mean(logits)
            self.seen = [cost.mean_field(point) for _ in range(2)]
            return super().forward(logits, cost, latent, generator)

    model, spy = tiny(), Spy()
    model.objective(X, [spy, E.ScoreFunction()])
    upper, lower = X[:, :3], X[:, 3:]
    h2 = torch.sigmoid(model.upper[0].encoder(torch.sigmoid(model.encoder(upper))))
    want = F.binary_cross_entropy_with_logits(model.decoder(h2), lower, reduction="none").sum(-1)
    torch.testing.assert_close(spy.seen[0], want)
    assert torch.equal(spy.seen[0], spy.seen[1])

    class NoMean(Bernoulli):
        has_mean = False

    with pytest.raises(ConfigError, match="mean-field network needs every layer above to have a mean"):
        tiny(upper=[NoMean(2)]).objective(X, [E.MuProp(above="mean_field"), E.ScoreFunction()])
    with pytest.raises(ConfigError, match="estimator.above must be one of sampled, mean_field"):
        E.MuProp(above="mean")
