"""The temperature schedule: the pure formula, the callback inside a Trainer, and a resumed run."""

import math

import lightning as L
import pytest
import torch

from conftest import tiny_module
from discrete_vae import estimators as E
from discrete_vae.callbacks import TemperatureAnnealing
from discrete_vae.temperature import anneal, temperature_schedule
from discrete_vae.data import Batches
from discrete_vae.errors import ConfigError


def test_schedule_formula():
    assert temperature_schedule(0, 1.0, 0.5, 1e-4, 1000) == 1.0
    assert temperature_schedule(999, 1.0, 0.5, 1e-4, 1000) == 1.0  # held until the next interval
    assert temperature_schedule(1000, 1.0, 0.5, 1e-4, 1000) == pytest.approx(math.exp(-0.1))
    assert temperature_schedule(2500, 2.0, 0.5, 1e-4, 1000) == pytest.approx(2.0 * math.exp(-0.2))
    assert temperature_schedule(10_000, 1.0, 0.5, 1e-4, 1000) == 0.5  # exp(-1) = 0.37 < tau_min


class Recorder(L.Callback):
    """Records (global step, tau) as the training step sees it."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, pl_module.estimator.tau.item()))


def tiny_fit(estimator, max_steps, tmp_path, ckpt_path=None, anneal=None):
    torch.manual_seed(0)
    data = (torch.rand(64, 16) < 0.3).to(torch.uint8)
    model = tiny_module(estimator, input_dim=16)
    anneal = anneal or TemperatureAnnealing(tau_0=1.0, tau_min=0.5, rate=0.1, interval=3)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[anneal, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=Batches(data, 8, shuffle=True), ckpt_path=ckpt_path)
    return trainer, model, recorder.seen


def expected(step):
    return max(0.5, math.exp(-0.1 * (step // 3) * 3))


def test_callback_follows_the_schedule_and_resumes_exactly(tmp_path):
    trainer, model, seen = tiny_fit(E.GumbelSoftmax(tau=1.0), 7, tmp_path)
    assert [s for s, _ in seen] == list(range(7))
    assert [t for _, t in seen] == pytest.approx([expected(s) for s in range(7)])
    path = tmp_path / "step7.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"]["estimator.tau"].item() == pytest.approx(expected(6))

    _, _, resumed = tiny_fit(E.GumbelSoftmax(tau=1.0), 14, tmp_path, ckpt_path=path)
    assert [s for s, _ in resumed] == list(range(7, 14))
    assert [t for _, t in resumed] == pytest.approx([expected(s) for s in range(7, 14)])


def test_estimator_floor_is_respected_unless_lowered(tmp_path):
    free = TemperatureAnnealing(tau_min=0.5, rate=0.1, interval=3)  # tau_0=None: the estimator's own tau
    _, _, seen = tiny_fit(E.ReinMax(tau=1.3, tau_min=1.3), 8, tmp_path, anneal=free)
    assert all(t == pytest.approx(1.3) for _, t in seen)
    _, _, seen = tiny_fit(E.ReinMax(tau=1.3, tau_min=None), 8, tmp_path, anneal=free)
    assert [t for _, t in seen] == pytest.approx([max(0.5, 1.3 * math.exp(-0.1 * (s // 3) * 3)) for s in range(8)])


def test_the_schedule_starts_from_the_estimators_tau_unless_tau_0_is_given(tmp_path):
    _, _, seen = tiny_fit(E.GumbelSoftmax(tau=5.0), 4, tmp_path, anneal=TemperatureAnnealing(rate=0.1, interval=3))
    assert [t for _, t in seen] == pytest.approx([5.0, 5.0, 5.0, 5.0 * math.exp(-0.3)])
    _, _, seen = tiny_fit(E.GumbelSoftmax(tau=5.0), 2, tmp_path, anneal=TemperatureAnnealing(tau_0=2.0, rate=0.1, interval=3))
    assert [t for _, t in seen] == pytest.approx([2.0, 2.0])


def test_a_start_below_the_floor_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"estimator.tau=0.3 is below the temperature's floor 0.5"):
        tiny_fit(E.GumbelSoftmax(tau=0.3), 2, tmp_path, anneal=TemperatureAnnealing(tau_min=0.5))
    with pytest.raises(ConfigError, match=r"callbacks.temperature.tau_0=1 is below the temperature's floor 1.3"):
        tiny_fit(E.ReinMax(), 2, tmp_path, anneal=TemperatureAnnealing(tau_0=1.0))


def test_callback_ignores_estimators_without_temperature(tmp_path):
    torch.manual_seed(0)
    data = (torch.rand(32, 16) < 0.3).to(torch.uint8)
    model = tiny_module(E.ScoreFunction(), input_dim=16)
    trainer = L.Trainer(
        max_steps=3, callbacks=[TemperatureAnnealing()], logger=False, enable_checkpointing=False, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=Batches(data, 8, shuffle=True))
    assert trainer.global_step == 3
    assert "train/temperature" not in trainer.callback_metrics
    assert "train/loss" in trainer.callback_metrics


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="interval"):
        TemperatureAnnealing(interval=0)


def test_anneal_sets_what_the_callback_sets_in_a_loop_of_ones_own():
    """discrete_vae.temperature.anneal, for a training loop without Lightning: each estimator with a
    temperature gets the schedule from its own tau, floored at its own tau_min (ReinMax's 1.3); the
    others are left alone; the callback's value at the same step is the same."""
    gumbel, reinmax, sf = E.GumbelSoftmax(tau=2.0), E.ReinMax(), E.ScoreFunction()
    anneal([gumbel, reinmax, sf], step=5000, tau_min=0.5, rate=1e-4, interval=1000)
    assert float(gumbel.tau) == pytest.approx(2.0 * math.exp(-0.5))
    assert float(reinmax.tau) == pytest.approx(1.3) and not hasattr(sf, "tau")
    callback = TemperatureAnnealing(tau_min=0.5, rate=1e-4, interval=1000)
    assert callback.temperature(5000, gumbel) == pytest.approx(float(gumbel.tau))
    anneal(gumbel, step=10**6)
    assert float(gumbel.tau) == 0.5


def test_an_estimator_annealed_by_definition_keeps_its_rate_where_the_schedule_holds_tau():
    """estimator=st_annealed (Jang et al.'s "Annealed ST") under a preset whose schedule has rate 0 (the
    SBNs: tau fixed at 1): it anneals at its own rate, the others stay at their tau."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=jang2017_sbn", "estimator=st_annealed"])
    annealed, fixed = instantiate(cfg.estimator), E.StraightThrough(tau=1.0)
    callback = instantiate(cfg.callbacks.temperature)
    assert callback.rate == 0.0 and isinstance(annealed, E.StraightThrough) and annealed.rate == 1e-4
    assert callback.temperature(5000, annealed) == pytest.approx(math.exp(-0.5))
    assert callback.temperature(5000, fixed) == 1.0
    anneal([annealed, fixed], step=20_000, tau_min=0.5, rate=0.0)
    assert float(annealed.tau) == 0.5 and float(fixed.tau) == 1.0
    with pytest.raises(ConfigError, match="estimator.rate"):
        E.StraightThrough(rate=-1.0)
    # every estimator with a temperature can bring its own rate
    assert E.GumbelRao(rate=1e-4).rate == E.ReinMax(rate=1e-4).rate == E.GappedStraightThrough(rate=1e-4).rate == 1e-4
