"""Lightning callbacks: the temperature schedule (and, later, gradient diagnostics).

The schedule is a pure function of the global step, so a resumed run continues it
exactly: the callback recomputes tau from `trainer.global_step` before every batch.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from discrete_vae.errors import ConfigError


def temperature_schedule(step: int, tau_0: float, tau_min: float, rate: float, interval: int) -> float:
    """tau = max(tau_min, tau_0 * exp(-rate * t)), t = step rounded down to a multiple of `interval`
    (Jang et al. 2017, Sec. 4.2: tau = max(0.5, exp(-r t)), updated every N steps)."""
    t = (step // interval) * interval
    return max(tau_min, tau_0 * math.exp(-rate * t))


class TemperatureAnnealing(L.Callback):
    """Sets `estimator.tau` from `temperature_schedule` and logs `train/temperature`.

    Does nothing for estimators without a temperature. An estimator's own `tau_min`
    (ReinMax's, for instance) is a floor the schedule respects as well.
    """

    def __init__(self, tau_0: float = 1.0, tau_min: float = 0.5, rate: float = 1e-4, interval: int = 1000):
        if not (tau_0 > 0 and tau_min > 0 and rate >= 0 and interval >= 1):
            raise ConfigError(
                "callbacks.temperature needs tau_0 > 0, tau_min > 0, rate >= 0 and interval >= 1; "
                f"got tau_0={tau_0}, tau_min={tau_min}, rate={rate}, interval={interval}"
            )
        self.tau_0, self.tau_min, self.rate, self.interval = tau_0, tau_min, rate, interval
        self._synced = False  # set tau on the first batch of a fit, whatever its step

    def temperature(self, step: int, estimator) -> float:
        floor = max(self.tau_min, getattr(estimator, "tau_min", None) or 0.0)
        return temperature_schedule(step, self.tau_0, floor, self.rate, self.interval)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        estimator = pl_module.estimator
        tau = getattr(estimator, "tau", None)
        if not isinstance(tau, torch.Tensor):
            return
        step = trainer.global_step
        if step % self.interval == 0 or not self._synced:
            tau.fill_(self.temperature(step, estimator))  # host value, no device sync
            self._synced = True
        pl_module.log("train/temperature", tau, on_step=True, on_epoch=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._synced = False  # recompute on the first batch, also after a resume
