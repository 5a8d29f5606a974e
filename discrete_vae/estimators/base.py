"""The estimator contract, and the base classes every estimator derives from.

An estimator (a strategy) is called as `estimator(logits, cost, latent, generator=None)`: the
encoder's logits (B, *param_shape), a function `cost(z)` mapping latent samples
(*S, B, *event_shape) to per-example costs (*S, B) (in a VAE f(z) = -log p(x|z)), the latent type
(discrete_vae.latents), and optionally the torch.Generator all its noise is drawn from (else
torch's global one). It returns `EstimatorOutput(loss, value)`, both (B,):
- `loss` is a surrogate whose gradient w.r.t. the logits is the estimate (what `cost` computes,
  a decoder for instance, always gets ordinary gradients), and whose value is `value`: its
  surrogate terms are worth zero (x - x.detach()). So one estimator's loss can be the cost that
  another estimator sees (a chain of stochastic layers), and the logged loss is the cost;
- `value` is the Monte-Carlo value of the cost to report.

Capabilities are declared on both sides, as class attributes, never guessed. A latent type says
what it offers (`Latent.has_relaxation`, `has_enumerate_support`, ...: discrete_vae.latents);
an estimator says what it needs (`needs`, names of those attributes), and `check(latent)` matches
the two at start-up, refusing in one line with the capability that is missing. An estimator
also declares `deterministic` (no noise: one estimate stands for all), `has_temperature` (a `tau`
buffer that the annealing callback sets), `shares_noise_above` (in a chain), `multi_sample` (VIMCO) and
`decoder_evaluations(latent)` per example.

Adding an estimator means one subclass (in this package or anywhere on the path) and one YAML
file in conf/estimator/; the Hydra group is the registry.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from discrete_vae.errors import ConfigError, require_number
from discrete_vae.latents import CAPABILITIES, Latent

CostFn = Callable[[Tensor], Tensor]  # z (*S, B, *event_shape) -> cost (*S, B)
# In a chain of stochastic layers (discrete_vae.chain) the cost also carries `cost.mean_field`, the same
# cost with every layer above at its mean instead of drawn (Gu et al. 2016's mean-field network); MuProp's
# `above="mean_field"` expands it. A cost without it has nothing above.
Generator = Optional[torch.Generator]  # where an estimator's noise comes from; None: torch's global generator


class EstimatorOutput(NamedTuple):
    loss: Tensor  # (B,) surrogate: its gradient is the estimate
    value: Tensor  # (B,) the cost to report


class Estimator(nn.Module):
    """Base class. Subclasses implement `forward(logits, cost, latent, generator=None) -> EstimatorOutput`
    and declare what they are and what they need (the defaults: a one-sample estimator that needs
    nothing beyond the Latent contract's sampling and log-probability)."""

    needs: tuple[str, ...] = ()  # the Latent capabilities (attribute names, CAPABILITIES) it relies on
    deterministic: bool = False  # the estimate has no noise (exact enumeration)
    has_temperature: bool = False  # keeps a `tau` buffer for the annealing callback
    shares_noise_above: bool = False  # in a chain, the layers above draw the same noise for each of
    # the samples this estimator evaluates at once (discrete_vae.chain): REBAR's and RELAX's form
    multi_sample: bool = False  # estimates the m-sample bound through `bound(log_w, log_q)` of its
    # `num_samples` draws, not E_q[cost] through the contract above (discrete_vae.estimators.multi_sample)

    def check(self, latent: Latent) -> None:
        """At start-up, before any step: a ConfigError, in one line, when the latent type lacks a
        capability this estimator needs (or, in subclasses, is of a size it cannot handle)."""
        for need in self.needs:
            if not getattr(latent, need, False):
                raise ConfigError(
                    f"estimator {type(self).__name__} needs a latent type with {CAPABILITIES[need]} ({need}); "
                    f"{type(latent).__name__} ({latent.describe()}) has none: choose another estimator or latent type"
                )

    def decoder_evaluations(self, latent: Latent) -> int:
        """Decoder evaluations per example in one estimate (what "equal evaluations" compares)."""
        return 1

    def decoder_rows(self, latent: Latent) -> int:
        """The most decoder evaluations per example in any one call of `cost` (a memory bound for
        callers that batch many estimates, such as discrete_vae.diagnostics)."""
        return self.decoder_evaluations(latent)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:  # pragma: no cover
        raise NotImplementedError


def as_categories(logits: Tensor, cost: CostFn, latent: Latent) -> tuple[Tensor, CostFn]:
    """The problem seen as N categorical latents of K categories (`Latent.categorical_view`): logits
    (B, N, K) and the cost of a one-hot z. For categorical latents it is the problem itself; a bit
    is two categories with logits (0, phi), so an estimator written on categories gets its binary
    form, K = 2, by calling this first (Liu et al. 2023 and Fan et al. 2022 treat a bit so)."""
    return latent.categorical_view(logits), lambda z: cost(latent.from_categorical(z))


class TemperatureEstimator(Estimator):
    """An estimator with a temperature `tau` (a buffer, so it is saved in checkpoints).

    `tau_min`, if given, is a floor the annealing never goes below (ReinMax uses it). `rate`, if
    given, is the estimator's own annealing rate, used in place of the schedule's: an estimator that
    is annealed by definition, as Jang et al. (2017)'s "Annealed ST" (conf/estimator/st_annealed.yaml),
    is annealed even where a preset holds the others' temperature fixed (callbacks.temperature.rate=0).
    """

    has_temperature = True

    def __init__(self, tau: float = 1.0, tau_min: float | None = None, rate: float | None = None):
        super().__init__()
        require_number("estimator.tau", tau, positive=True, hint="for example estimator.tau=1.0")
        if tau_min is not None:
            require_number("estimator.tau_min", tau_min, positive=True, hint="a positive number or null")
        if rate is not None:
            require_number("estimator.rate", rate, low=0.0, hint="an annealing rate such as 1e-4, or null")
        self.rate = rate
        self.register_buffer("tau", torch.tensor(float(tau)))  # the current tau, set by the annealing
        self.tau_0 = float(tau)  # the configured tau: where the annealing starts
        self.tau_min = tau_min
