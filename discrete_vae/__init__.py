"""discrete_vae: models with discrete latent variables, and the gradient estimators that train them.

The library part needs no Lightning and no Hydra: the estimators, the latent types, the sampling
functions (the one place noise is drawn) and the temperature schedule are all here, for a model
of your own (README, "Use an estimator in your own model"; examples/):

    from discrete_vae import RLOO, Categorical, anneal
    latent, estimator = Categorical(num_latents=8, num_categories=4), RLOO(num_samples=4)
    estimator.check(latent)                              # refuses a latent type lacking what it needs
    out = estimator(logits, cost, latent, generator=g)   # logits (B, 8, 4); cost(z) -> (*S, B)

Names are imported on first use, so that a script can check its config before torch is imported.
"""

from __future__ import annotations

import importlib

from discrete_vae.cli import register_resolvers
from discrete_vae.errors import ConfigError, DataError, UserError

register_resolvers()  # ${run_name:...} in conf/train.yaml, wherever a sweep job is resolved

ESTIMATORS = ("ARM", "DARN", "DisARM", "Exact", "MuProp", "NVIL", "GappedStraightThrough", "GumbelRao", "GumbelSoftmax", "IndeCateR", "REBAR",
              "RELAX", "RLOO", "ReinMax", "STGumbelSoftmax", "ScoreFunction", "StraightThrough", "VIMCO", "ZGR",
              "Estimator", "EstimatorOutput", "TemperatureEstimator")
LATENTS = ("Latent", "Categorical", "Bernoulli", "CAPABILITIES")
SAMPLING = ("gumbel_max", "gumbel_softmax", "straight_through", "categorical_straight_through", "gumbel",
            "conditional_gumbel", "conditional_gumbel_scores", "gumbel_scores", "enumerate_one_hot",
            "log_prob_categorical", "concrete_log_prob", "bernoulli", "antithetic_bernoulli", "logistic_scores",
            "conditional_logistic_scores", "enumerate_bits", "uniform")
TEMPERATURE = ("temperature_schedule", "anneal")
_HOMES = {**{n: "estimators" for n in ESTIMATORS}, **{n: "latents" for n in LATENTS},
          **{n: "sampling" for n in SAMPLING}, **{n: "temperature" for n in TEMPERATURE}}

__all__ = ["ConfigError", "DataError", "UserError", "sampling", *_HOMES]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`discrete_vae.RLOO`, `discrete_vae.gumbel_max`, `discrete_vae.sampling`, ...: imported on first use."""
    if name == "sampling":
        return importlib.import_module("discrete_vae.sampling")
    if name in _HOMES:
        return getattr(importlib.import_module(f"discrete_vae.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'discrete_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
