"""The annealed temperature of the relaxed estimators, as pure functions of the step: usable in any
training loop, and the schedule that discrete_vae.callbacks.TemperatureAnnealing applies in Lightning.
A pure function of the step is what lets a resumed run continue the schedule exactly."""

from __future__ import annotations

import math
from collections.abc import Iterable


def temperature_schedule(step: int, tau_0: float, tau_min: float, rate: float, interval: int) -> float:
    """tau = max(tau_min, tau_0 * exp(-rate * t)), t = step rounded down to a multiple of `interval`
    (Jang et al. 2017, Sec. 4.2: tau = max(0.5, exp(-r t)), updated every N steps)."""
    t = (step // interval) * interval
    return max(tau_min, tau_0 * math.exp(-rate * t))


def schedule_start(estimator, tau_0: float | None = None) -> float:
    """tau at step 0: `tau_0` if given, else the estimator's configured tau."""
    return float(tau_0 if tau_0 is not None else estimator.tau_0)


def schedule_floor(estimator, tau_min: float) -> float:
    """The floor: `tau_min`, raised to the estimator's own (ReinMax's 1.3)."""
    return max(tau_min, estimator.tau_min or 0.0)


def schedule_rate(estimator, rate: float) -> float:
    """`rate`, or the estimator's own where it has one (an estimator annealed by definition: st_annealed)."""
    return rate if getattr(estimator, "rate", None) is None else estimator.rate


def estimator_temperature(estimator, step: int, tau_min: float = 0.5, rate: float = 1e-4, interval: int = 1000,
                          tau_0: float | None = None) -> float:
    """The temperature of `estimator` at training step `step` under the schedule."""
    return temperature_schedule(step, schedule_start(estimator, tau_0), schedule_floor(estimator, tau_min),
                                schedule_rate(estimator, rate), interval)


def anneal(estimators, step: int, tau_min: float = 0.5, rate: float = 1e-4, interval: int = 1000,
           tau_0: float | None = None) -> None:
    """Set the temperature of each estimator that has one (`has_temperature`) for training step `step`:
    `temperature_schedule` from `tau_0` (default: the estimator's configured tau) down to the larger of
    `tau_min` and the estimator's own floor (ReinMax's 1.3), at `rate` unless the estimator has a rate of
    its own. Call it before each step of your own loop; estimators without a temperature are left alone."""
    for estimator in estimators if isinstance(estimators, Iterable) else [estimators]:
        if getattr(estimator, "has_temperature", False):
            estimator.tau.fill_(estimator_temperature(estimator, step, tau_min, rate, interval, tau_0))
