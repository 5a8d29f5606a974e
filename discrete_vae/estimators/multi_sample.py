"""Estimators of a multi-sample objective: the m-sample bound of Burda et al. (2016) instead of the
ELBO. Why a family of its own: the bound log 1/m sum_j w_j does not split into a cost per sample plus
an analytic term, so these estimators do not take the one-layer contract `(logits, cost, latent)`.
They see the m importance log-weights log w_j of m draws through every stochastic layer and the
proposal's log-density log q(h_j|x) of each (`StochasticChain.multi_sample_objective` computes both),
and return the surrogate of the negative bound. They declare `multi_sample = True` and the m of
their draws as `num_samples`; a model trains with the m-sample objective exactly when its estimator
is one of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from discrete_vae.errors import ConfigError
from discrete_vae.estimators.base import CostFn, Estimator, EstimatorOutput, Generator
from discrete_vae.latents import Latent


class VIMCO(Estimator):
    """VIMCO (Mnih & Rezende 2016, "Variational Inference for Monte Carlo Objectives", Sec. 2-3): the
    gradient of the m-sample bound L = log 1/m sum_j w_j, w_j = p(x, h_j) / q(h_j|x), h_j ~ q(h|x),

        grad L = sum_j [L - L_{-j}] grad log q(h_j|x) + sum_j (w_j / sum_i w_i) grad log w_j,

    where the second sum is the bound's gradient with the samples held (the importance-weighted
    gradient of Burda et al. 2016, Sec. 3), and L_{-j}, the baseline of sample j, is the bound with
    w_j replaced by the geometric mean of the other weights, exp(1/(m-1) sum_{i != j} log w_i): the
    learning signal of each sample is its own, and the baseline is independent of h_j given the
    others, so the estimate is unbiased for grad E[L]. All in log space (logsumexp).

    In a chain of stochastic layers every layer's log q(h_j^l | h_j^{l-1}) gets the same signal of its
    sample j: h_j is the whole draw through the layers, as in Mnih & Rezende's multi-layer sigmoid
    belief networks. In an SBN (discrete_vae.sbn) q is the
    model's own p(h|x_upper) and w_j = p(x_lower | h_j). `num_samples` is m, the training objective's
    samples per example (m decoder evaluations, one backward); m >= 2.
    """

    needs = ()
    multi_sample = True

    def __init__(self, num_samples: int = 5):
        super().__init__()
        if not (isinstance(num_samples, int) and not isinstance(num_samples, bool)) or num_samples < 2:
            raise ConfigError(f"estimator.num_samples must be an integer >= 2 for vimco (the m of the m-sample "
                              f"bound; each sample's baseline needs the others), got {num_samples}")
        self.num_samples = int(num_samples)

    def decoder_evaluations(self, latent: Latent) -> int:
        return self.num_samples

    def bound(self, log_w: Tensor, log_q: Tensor) -> EstimatorOutput:
        """The surrogate and value of the negative m-sample bound.  # log_w, log_q (m, B) -> (B,) each

        `log_w` and `log_q` are differentiable in the parameters with the samples held fixed."""
        m = log_w.shape[0]
        bound = torch.logsumexp(log_w, dim=0) - math.log(m)  # (B,) L, its gradient the weighted one
        lw = log_w.detach()
        others = (lw.sum(0, keepdim=True) - lw) / (m - 1)  # (m, B) log of the others' geometric mean
        swapped = lw.unsqueeze(0).expand(m, m, -1).clone()  # (m, m, B): row j is log w with w_j ...
        index = torch.arange(m, device=lw.device)
        swapped[index, index] = others  # ... replaced by the geometric mean of the rest
        signal = bound.detach() - (torch.logsumexp(swapped, dim=1) - math.log(m))  # (m, B) L - L_{-j}
        score = (signal * (log_q - log_q.detach())).sum(0)  # (B,) worth zero
        return EstimatorOutput(-(bound + score), -bound.detach())

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        raise ConfigError("VIMCO estimates the m-sample bound, not E_q[cost]: a model trains with it through "
                          "its objective (model.objective), and your own code calls VIMCO.bound(log_w, log_q)")
