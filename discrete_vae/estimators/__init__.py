"""Gradient estimators for E_{q(z|x)}[f(z)], one small class each, by family (one file each):

- score_function: `ScoreFunction` (REINFORCE with an EMA baseline), `RLOO` (leave-one-out), `MuProp`,
  `DARN`;
- antithetic: `ARM`, `DisARM` (pairs of bits from one uniform draw);
- relaxed: `GumbelSoftmax`, `STGumbelSoftmax`, `StraightThrough`, `GumbelRao`, `ReinMax`,
  `GappedStraightThrough`, `ZGR` (relaxations and straight-through);
- control_variates: `NVIL`, `REBAR`, `RELAX` (learned baselines and control variates);
- enumeration: `Exact`, `IndeCateR`;
- multi_sample: `VIMCO` (the m-sample bound's estimator: `VIMCO.bound(log_w, log_q)`).

The contract and the capability check are in `base` (read its docstring first). Every estimator
works in any model, with no Lightning and no Hydra:

    est = RLOO(num_samples=4)
    est.check(latent)                      # once: refuses a latent type lacking what it needs
    out = est(logits, cost, latent, generator=g)
    out.loss.mean().backward()             # the estimate, in the logits' gradient
"""

from discrete_vae.estimators.antithetic import ARM, DisARM
from discrete_vae.estimators.base import CostFn, Estimator, EstimatorOutput, TemperatureEstimator, as_categories
from discrete_vae.estimators.control_variates import MAX_HIDDEN, NVIL, REBAR, RELAX
from discrete_vae.estimators.enumeration import Exact, IndeCateR
from discrete_vae.estimators.relaxed import (
    ZGR,
    GappedStraightThrough,
    GumbelRao,
    GumbelSoftmax,
    ReinMax,
    STGumbelSoftmax,
    StraightThrough,
)
from discrete_vae.estimators.multi_sample import VIMCO
from discrete_vae.estimators.score_function import DARN, RLOO, MuProp, ScoreFunction

__all__ = [
    "ARM", "DARN", "MAX_HIDDEN", "MuProp", "NVIL", "REBAR", "RELAX", "RLOO", "ZGR", "CostFn", "DisARM", "Estimator", "EstimatorOutput", "Exact",
    "GappedStraightThrough", "GumbelRao", "GumbelSoftmax", "IndeCateR", "ReinMax", "STGumbelSoftmax",
    "ScoreFunction", "StraightThrough", "TemperatureEstimator", "VIMCO", "as_categories",
]
