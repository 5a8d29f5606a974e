"""The relaxed and straight-through family: the decoder sees a continuous relaxation of the sample
(Gumbel-Softmax) or the exact sample with a relaxation's gradient (straight-through and its kin:
Gumbel-Rao, ReinMax, GST, ZGR). Biased, one decoder evaluation, low variance. They need a
relaxation of the latent type (`has_relaxation`, `has_straight_through`) or its categorical view."""

from __future__ import annotations

import torch

from discrete_vae import sampling
from discrete_vae.errors import require_number
from discrete_vae.estimators.base import CostFn, EstimatorOutput, Estimator, Generator, TemperatureEstimator, as_categories
from discrete_vae.latents import Latent
from torch import Tensor


class GumbelSoftmax(TemperatureEstimator):
    """Gumbel-Softmax / Concrete relaxation (Jang et al. 2017, Eq. 1; Maddison et al. 2017):
    the decoder sees y = softmax((logits + g) / tau); on Bernoulli latents the binary Concrete
    y = sigmoid((logits + L) / tau), L logistic (Maddison et al. 2017, Sec. 3.3), the latent type's
    `relaxed_sample`. Biased for tau > 0; `value` is f(y).
    """

    needs = ("has_relaxation",)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        f = cost(latent.relaxed_sample(logits, self.tau, generator=generator))  # (B,)
        return EstimatorOutput(f, f)


class STGumbelSoftmax(TemperatureEstimator):
    """Straight-through Gumbel-Softmax (Jang et al. 2017, Sec. 2.2): forward the hard
    D = onehot(argmax(logits + g)), backward through softmax((logits + g) / tau); on Bernoulli
    latents forward 1[logits + L > 0], backward through sigmoid((logits + L) / tau).
    """

    needs = ("has_relaxation",)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        f = cost(latent.relaxed_sample(logits, self.tau, hard=True, generator=generator))
        return EstimatorOutput(f, f)


class StraightThrough(TemperatureEstimator):
    """Straight-through (Bengio et al. 2013; "ST" in Jang et al. 2017, Sec. 4): forward
    D ~ Cat(softmax(logits)), backward through softmax(logits / tau), noise-free; on Bernoulli
    latents forward z ~ Bernoulli(sigmoid(logits)), backward through sigmoid(logits / tau).
    """

    needs = ("has_straight_through",)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        f = cost(latent.straight_through_sample(logits, self.tau, generator=generator))
        return EstimatorOutput(f, f)


class GumbelRao(TemperatureEstimator):
    """Gumbel-Rao Monte Carlo (Paulus, Maddison & Krause 2021, Sec. 3): forward the hard sample
    D = harden(logits + g); backward through

        1/M sum_j relax((logits + e_j) / tau),   e_j ~ p(g | harden(logits + g) = D),

    the Rao-Blackwellisation of straight-through Gumbel-Softmax over the noise given D. On categories
    relax = softmax and e_j is the Gumbel noise given the argmax; on bits relax = sigmoid and e_j
    the logistic noise given the bit (the latent type's `conditional_perturb`). The noise has no
    gradient; the decoder is evaluated once, at D. With M = 1 its expectation equals ST-Gumbel's;
    its variance is never larger (Paulus et al. 2021, Prop. 1).
    """

    needs = ("has_relaxation", "has_conditional_noise")

    def __init__(self, tau: float = 1.0, num_mc: int = 10, tau_min: float | None = None, rate: float | None = None):
        super().__init__(tau, tau_min, rate)
        require_number("estimator.num_mc", num_mc, positive=True, integer=True)
        self.num_mc = int(num_mc)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        hard = latent.sample(logits, generator=generator)  # (B, *param_shape), no gradient
        with torch.no_grad():
            noise = latent.conditional_perturb(logits, hard, (self.num_mc,), generator) - logits  # (M, B, *param_shape)
        soft = latent.soften(logits + noise, self.tau).mean(0)  # (B, *param_shape)
        f = cost(sampling.straight_through(hard, soft))
        return EstimatorOutput(f, f)


class ReinMax(TemperatureEstimator):
    """ReinMax (Liu et al. 2023, "Bridging Discrete and Backpropagation: Straight-Through
    and Beyond", Algorithm 2), a second-order accurate straight-through estimator:

        p0 = softmax(logits),  D ~ Cat(p0),
        p1 = (D + softmax(logits / tau)) / 2,
        p1 = softmax(stopgrad(log p1 - logits) + logits),
        p2 = 2 p1 - p0 / 2,
        forward D, backward through p2  (p2 - stopgrad(p2) + D).

    Its authors find tau >= 1 works best: tau defaults to 1.3, and so does the floor tau_min
    that the annealing callback respects (pass tau_min=None to anneal ReinMax).
    """

    needs = ("has_categorical_view",)

    def __init__(self, tau: float = 1.3, tau_min: float | None = 1.3, rate: float | None = None):
        super().__init__(tau, tau_min, rate)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        p0 = torch.softmax(logits, dim=-1)  # (B, N, K)
        hard = sampling.gumbel_max(logits, generator=generator)
        p1 = 0.5 * (hard + torch.softmax(logits / self.tau, dim=-1))
        log_p1 = torch.log(p1.clamp_min(torch.finfo(p1.dtype).tiny))
        p1 = torch.softmax((log_p1 - logits).detach() + logits, dim=-1)
        p2 = 2.0 * p1 - 0.5 * p0
        f = cost(sampling.straight_through(hard, p2))
        return EstimatorOutput(f, f)


class GappedStraightThrough(TemperatureEstimator):
    """Gapped Straight-Through, GST (Fan, Chi, Rudnicky & Ramadge 2022, "Training Discrete Deep
    Generative Models via Gapped Straight-Through Estimator", Sec. 4): straight-through Gumbel-Softmax
    with its random noise replaced by a deterministic perturbation m of the logits, given the
    sample D ~ Cat(softmax(logits)), that makes D the argmax with a gap kappa:

        m1 = (max_j logits_j - logits) * D              (the sampled logit moves up to the maximum)
        m2 = relu(logits - max_j logits + kappa) * (1 - D)   (the others move down to max - kappa)
        forward D, backward through softmax((logits + stopgrad(m1 - m2)) / tau).

    So the perturbed logits are max_j logits_j at D and min(logits_i, max_j logits_j - kappa)
    elsewhere. kappa = `gap` = 1.0 as in the authors' experiments (their Sec. 5); one decoder
    evaluation, no noise in the backward pass.
    """

    needs = ("has_categorical_view",)

    def __init__(self, tau: float = 1.0, gap: float = 1.0, tau_min: float | None = None, rate: float | None = None):
        super().__init__(tau, tau_min, rate)
        self.gap = float(require_number("estimator.gap", gap, low=0.0, hint="the paper's kappa, 1.0"))

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        hard = sampling.gumbel_max(logits, generator=generator)  # (B, N, K)
        with torch.no_grad():
            top = logits.amax(-1, keepdim=True)  # (B, N, 1)
            m1 = (top - logits) * hard
            m2 = torch.relu(logits - top + self.gap) * (1.0 - hard)
        soft = torch.softmax((logits + (m1 - m2)) / self.tau, dim=-1)
        f = cost(sampling.straight_through(hard, soft))
        return EstimatorOutput(f, f)


class ZGR(Estimator):
    """ZGR, the zero-temperature limit of Gumbel-Rao (Shekhovtsov 2023, "Cold Analysis of
    Rao-Blackwellized Straight-Through Gumbel-Softmax Gradient Estimator", Sec. 4, Eq. 15):
    the average of the straight-through Jacobian and the DARN one (Gregor et al. 2014),

        D ~ Cat(p), p = softmax(logits),
        dD/dlogits := 1/2 [ dp/dlogits + (D - p) (d log p_D / dlogits)^T ],
        forward D, backward through 1/2 (p + stopgrad(D - p) log p_D).

    No temperature, one decoder evaluation. For two categories it equals DARN(1/2), the DARN
    estimator with its expansion point at 1/2 (Shekhovtsov 2023; the authors' `ZGR_binary`), not
    half of DARN: at K = 2, p = 0.3 (tests/test_gst_zgr_indecater.py). On bits it is that K = 2 form.
    """

    needs = ("has_categorical_view",)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        hard = sampling.gumbel_max(logits, generator=generator)  # (B, N, K)
        log_p = torch.log_softmax(logits, dim=-1)
        p = log_p.exp()  # (B, N, K)
        log_p_hard = (log_p * hard).sum(-1, keepdim=True)  # (B, N, 1) log p of the sample
        surrogate = 0.5 * (p + (hard - p).detach() * log_p_hard)
        f = cost(sampling.straight_through(hard, surrogate))
        return EstimatorOutput(f, f)
