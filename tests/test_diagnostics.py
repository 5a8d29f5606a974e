"""Gradient diagnostics (discrete_vae.diagnostics), the GradientStats callback, and
scripts/gradient_study.py end to end, on a tiny model (N=2, K=3, one hidden layer of 32)."""

import copy
import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import run_script, tiny_module
from discrete_vae import diagnostics as D
from discrete_vae import estimators as E
from discrete_vae.callbacks import GradientStats
from discrete_vae.data import _TensorDataModule
from discrete_vae.errors import ConfigError
from discrete_vae.module import VAEModule


def tiny_model(estimator=None, seed=0) -> VAEModule:
    torch.manual_seed(seed)
    return tiny_module(estimator or E.RLOO(), hidden_dims=[32])


def batch(num=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num, 784, generator=g) < 0.2).float()  # (B, 784)


def flat_encoder_grad(model, loss) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, D.encoder_parameters(model.model))])


def test_exact_against_the_exact_reference_has_no_bias_and_no_variance():
    model, x = tiny_model(), batch()
    report = D.gradient_diagnostics(model.model, x, E.Exact(), num_estimates=5, timing_repeats=1)
    assert report.reference.kind == "exact" and report.reference.se == 0
    ref_norm = report.reference.grad.norm().item()
    assert ref_norm > 0.1
    assert report.bias <= 1e-6 * ref_norm and report.variance == 0 and report.mse <= 1e-12 * ref_norm**2
    assert report.cosine == pytest.approx(1.0, abs=1e-9) and math.isinf(report.snr)
    assert report.seconds_per_estimate > 0


def test_statistics_match_a_direct_computation_from_the_estimates():
    """The streamed float64 sums give what torch computes from all M estimates at once."""
    model, x = tiny_model(), batch()
    reference = D.reference_gradient(model.model, x)
    torch.manual_seed(0)
    grads = torch.cat(list(D.iter_gradients(model.model, x, E.RLOO(), 300, chunk_size=64))).double()  # (M, P)
    torch.manual_seed(0)
    report = D.gradient_diagnostics(model.model, x, E.RLOO(), 300, reference=reference, chunk_size=64, timing_repeats=0)
    mean = grads.mean(0)
    torch.testing.assert_close(report.mean, mean)
    assert report.variance == pytest.approx(grads.var(0).sum().item(), rel=1e-9)
    assert report.mse == pytest.approx((grads - reference.grad).square().sum(1).mean().item(), rel=1e-9)
    assert report.bias == pytest.approx((mean - reference.grad).norm().item(), rel=1e-9)
    assert report.bias_se == pytest.approx(math.sqrt(report.variance / 300), rel=1e-9)
    assert report.cosine == pytest.approx(torch.cosine_similarity(mean, reference.grad, 0).item(), rel=1e-9)
    assert report.snr == pytest.approx(mean.norm().item() / math.sqrt(report.variance), rel=1e-9)


@pytest.mark.parametrize(
    "make", [E.ScoreFunction, E.RLOO, E.STGumbelSoftmax, E.GumbelSoftmax, E.StraightThrough, E.GumbelRao, E.ReinMax]
)
def test_each_estimate_is_the_gradient_training_takes(make):
    """Same seed, same draws: estimate 1 equals d/d(encoder) of VAE.objective(x, model.estimator).loss."""
    estimator = make()
    model, x = tiny_model(estimator), batch()
    estimator.eval()
    torch.manual_seed(3)
    expected = flat_encoder_grad(model, model.model.objective(x, model.estimator).loss)
    torch.manual_seed(3)
    (got,) = D.iter_gradients(model.model, x, estimator, 1, chunk_size=1)
    torch.testing.assert_close(got[0], expected)


def test_unbiased_estimators_show_bias_within_se_and_biased_ones_do_not():
    model, x = tiny_model(), batch()
    reference = D.reference_gradient(model.model, x)
    torch.manual_seed(1)
    rloo = D.gradient_diagnostics(model.model, x, E.RLOO(), 1000, reference=reference, timing_repeats=0)
    assert rloo.variance > 0 and rloo.bias <= 3 * rloo.bias_se, rloo
    assert rloo.cosine > 0.99
    sf = D.gradient_diagnostics(model.model, x, E.ScoreFunction(), 200, reference=reference, timing_repeats=0)
    assert sf.variance > rloo.variance > 0  # no baseline yet: far noisier than RLOO
    assert sf.mse == pytest.approx(sf.variance * 199 / 200 + sf.bias**2, rel=1e-6)
    st = D.gradient_diagnostics(model.model, x, E.STGumbelSoftmax(), 500, reference=reference, timing_repeats=0)
    assert st.bias > 5 * st.bias_se, st  # not vacuous: a biased estimator is flagged


def test_rloo_reference_when_the_model_is_over_the_enumeration_budget():
    model, x = tiny_model(), batch()
    exact = D.reference_gradient(model.model, x).grad
    torch.manual_seed(2)
    reference = D.reference_gradient(model.model, x, max_configs=4, num_estimates=500, num_samples=10)
    assert reference.kind == "rloo" and reference.num_estimates == 500 and "SE" in reference.describe()
    assert 0 < reference.se < 0.1 * exact.norm()
    assert (reference.grad - exact).norm() <= 3 * reference.se
    report = D.gradient_diagnostics(model.model, x, E.STGumbelSoftmax(), 50, reference=reference, timing_repeats=0)
    assert report.bias_se == pytest.approx(math.sqrt(report.variance / 50 + reference.se**2))


def test_diagnostics_leave_the_model_and_estimator_as_they_were():
    estimator = E.ScoreFunction()
    model, x = tiny_model(estimator), batch()
    estimator.ema.fill_(500.0), estimator.num_updates.fill_(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for training in (True, False):
        estimator.train(training)
        D.gradient_diagnostics(model.model, x, estimator, 4, timing_repeats=1)
        assert estimator.training is training and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_bad_settings_are_config_errors():
    model, x = tiny_model(), batch()
    with pytest.raises(ConfigError, match="num_estimates >= 2"):
        D.gradient_diagnostics(model.model, x, E.RLOO(), 1)
    with pytest.raises(ConfigError, match="every_n_steps"):
        GradientStats(every_n_steps=0)


# -- the callback -------------------------------------------------------------------------------
class Synthetic(_TensorDataModule):
    """Random binary images in place of MNIST: 64 train, 32 validation, 32 test."""

    def load(self):
        g = torch.Generator().manual_seed(0)
        return {k: (torch.rand(n, 784, generator=g) < 0.2).to(torch.uint8) for k, n in (("train", 64), ("val", 32), ("test", 32))}


class DrawsRandomNumbers(L.Callback):
    """A careless callback: one global draw per step (harmless: the model seeds each step's noise)."""

    def on_train_batch_start(self, *args):
        torch.rand(1)


class Meddles(L.Callback):
    """A callback that does change training: it moves the score function's baseline."""

    def on_train_batch_start(self, trainer, pl_module, *args):
        pl_module.estimator.ema.add_(1.0)


def fit(tmp_path, extra_callbacks, name):
    L.seed_everything(0)
    model = tiny_model(E.ScoreFunction())  # its EMA baseline moves in training mode only
    logger = TensorBoardLogger(tmp_path, name=name, version="")
    trainer = L.Trainer(
        max_steps=6, callbacks=extra_callbacks, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=1, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=Synthetic(batch_size=8, eval_batch_size=16))
    return model, tmp_path / name


def test_grad_stats_callback_logs_and_leaves_training_bitwise_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats = GradientStats(every_n_steps=2, num_estimates=8, batch_size=20)
    with_stats, logdir = fit(tmp_path, [stats], "with")
    without, _ = fit(tmp_path, [], "without")
    careless, _ = fit(tmp_path, [DrawsRandomNumbers()], "careless")
    meddled, _ = fit(tmp_path, [Meddles()], "meddled")
    a, b, c, d = with_stats.state_dict(), without.state_dict(), careless.state_dict(), meddled.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a), "each step's noise is seeded: stray draws change nothing"
    assert not all(torch.equal(a[k], d[k]) for k in a)  # the comparison can fail
    assert stats.batch.shape == (20, 784)  # the first 20 validation images (16 + 4)
    events = EventAccumulator(str(logdir)).Reload()
    for tag in ("grad/variance", "grad/bias", "grad/cosine", "grad/snr"):
        assert [e.step for e in events.Scalars(tag)] == [0, 2, 4], tag
    assert all(e.value > 0 for e in events.Scalars("grad/variance"))


# -- the study script ---------------------------------------------------------------------------
def test_gradient_study_script_end_to_end(tmp_path, data_root):
    """Tiny budget; the exact estimator is refused by its own budget (a printed note) and the
    reference is then RLOO, as for the default N=20, K=10 model."""
    out = tmp_path / "study"
    result = run_script(
        "gradient_study.py", "latent.num_latents=2", "latent.num_categories=3", "model.hidden_dims=[32]", "batch_size=8",
        "num_estimates=4", "timing_repeats=1", "estimators=[exact,sf,rloo,gumbel_rao,reinmax]",
        "+estimator_options.exact.max_configs=4", "reference.max_configs=4",
        "reference.num_estimates=20", "temperature=0.7", f"hydra.run.dir={out}",
        env={"DISCRETE_VAE_DATA": str(data_root)}, cwd=tmp_path,
    )
    assert "skipping estimator exact" in result.stdout
    table = (out / "gradient_study.md").read_text()
    assert "mean of 20 RLOO estimates" in table and "tau = 0.7 for all" in table
    assert "reinmax: tau = 1.3, its floor tau_min, not temperature=0.7" in result.stdout + table
    with open(out / "gradient_study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["estimator"] for r in rows] == ["sf", "rloo", "gumbel_rao", "reinmax"]
    assert [r["tau"] for r in rows] == ["-", "-", "0.7", "1.3"]  # reinmax keeps its floor, as in training
    assert all(float(r["variance"]) > 0 and float(r["reference_se"]) > 0 for r in rows)
    assert (out / "gradient_study.png").read_bytes()[:4] == b"\x89PNG"


class Snapshot(L.Callback):
    """Keeps a copy of the model and the global RNG state as step `step` starts (runs before
    GradientStats: callbacks run in list order)."""

    def __init__(self, step):
        self.step, self.model, self.rng = step, None, None

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            self.model, self.rng = copy.deepcopy(pl_module), torch.get_rng_state()


def test_grad_stats_logs_the_diagnostics_of_the_weights_at_its_step(tmp_path):
    """The logged values are gradient_diagnostics of the model as it is at that step (not the
    initial one, not the previous step's), on the held-out batch: recomputed here from a snapshot."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    snapshot = Snapshot(step=4)
    stats = GradientStats(every_n_steps=2, num_estimates=8, batch_size=20)
    _, logdir = fit(tmp_path, [snapshot, stats], "snap")
    torch.set_rng_state(snapshot.rng)
    expected = D.gradient_diagnostics(
        snapshot.model.model, stats.batch, snapshot.model.estimator, 8, timing_repeats=0,
        reference_options=stats.reference_options,
    )
    events = EventAccumulator(str(logdir)).Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("grad/variance", "grad/bias", "grad/cosine")}
    assert logged["grad/variance"][4] == pytest.approx(expected.variance, rel=1e-5)
    assert logged["grad/bias"][4] == pytest.approx(expected.bias, rel=1e-5)
    assert logged["grad/cosine"][4] == pytest.approx(expected.cosine, rel=1e-5)
    assert logged["grad/variance"][0] != pytest.approx(expected.variance, rel=1e-3)  # the weights moved
