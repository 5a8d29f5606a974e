"""Gradient estimators for E_{q(z|x)}[f(z)], one small class each.

The contract (a strategy): an estimator is called with the encoder's logits
(B, *param_shape), a cost function `cost(z)` mapping latent samples (*S, B, *param_shape)
to per-example costs (*S, B) (here f(z) = -log p(x|z)), and the latent type
(discrete_vae.latents), which knows how to sample, score and enumerate z. It returns
`EstimatorOutput(loss, value)`, both (B,):
- `loss` is a surrogate whose gradient w.r.t. the logits is the estimate
  (the decoder, evaluated inside `cost`, always gets ordinary gradients), and whose value
  is `value`: its surrogate terms are worth zero (x - x.detach()). So one estimator's loss
  can be the cost that another estimator sees (a chain of stochastic layers), and the
  logged loss is the cost;
- `value` is the Monte-Carlo value of the cost to report.

Each estimator declares what it is, as class attributes (never guessed from its class or
its attributes' names): `deterministic` (no noise: one estimate stands for all),
`has_temperature` (a `tau` buffer that the annealing callback sets), `latent_types` (the
latent types' names it supports, or `ANY_LATENT`), and `decoder_evaluations(latent)` per
example. `check(latent)` refuses, at start-up, a latent type or size it cannot handle.

Adding an estimator means one subclass here and one YAML file in
conf/estimator/; the Hydra group is the registry. Estimators whose gradient
depends on a temperature derive from `TemperatureEstimator`, which keeps `tau`
as a (checkpointed) buffer for the annealing callback to set.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from discrete_vae import sampling
from discrete_vae.errors import MAX_CONFIGS, ConfigError, count, require_budget, require_number
from discrete_vae.latents import Latent

CostFn = Callable[[Tensor], Tensor]  # z (*S, B, *param_shape) -> cost (*S, B)
ANY_LATENT = ("*",)  # `latent_types` of an estimator written only against the Latent interface


class EstimatorOutput(NamedTuple):
    loss: Tensor  # (B,) surrogate: its gradient is the estimate
    value: Tensor  # (B,) the cost to report


class Estimator(nn.Module):
    """Base class. Subclasses implement `forward(logits, cost, latent) -> EstimatorOutput` and
    declare their capabilities (the defaults below are those of a one-sample categorical estimator)."""

    deterministic: bool = False  # the estimate has no noise (exact enumeration)
    has_temperature: bool = False  # keeps a `tau` buffer for the annealing callback
    latent_types: tuple[str, ...] = ("categorical",)  # Latent.name values supported, or ANY_LATENT
    shares_noise_above: bool = False  # in a chain, the layers above draw the same noise for each of
    # the samples this estimator evaluates at once (discrete_vae.chain): REBAR's and RELAX's form

    def check(self, latent: Latent) -> None:
        """Validate against the model's latent type at start-up; raise ConfigError if unusable."""
        if self.latent_types != ANY_LATENT and latent.name not in self.latent_types:
            raise ConfigError(
                f"estimator {type(self).__name__} supports {' and '.join(self.latent_types)} latents, "
                f"not {latent.name} ({latent.describe()}); choose another estimator or latent type"
            )

    def decoder_evaluations(self, latent: Latent) -> int:
        """Decoder evaluations per example in one estimate (what "equal evaluations" compares)."""
        return 1

    def decoder_rows(self, latent: Latent) -> int:
        """The most decoder evaluations per example in any one call of `cost` (a memory bound for
        callers that batch many estimates, such as discrete_vae.diagnostics)."""
        return self.decoder_evaluations(latent)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:  # pragma: no cover
        raise NotImplementedError


def as_categories(logits: Tensor, cost: CostFn, latent: Latent) -> tuple[Tensor, CostFn]:
    """The problem seen as N categorical latents of K categories (`Latent.categorical_view`): logits
    (B, N, K) and the cost of a one-hot z. For categorical latents it is the problem itself; a bit
    is two categories with logits (0, phi), so an estimator written on categories gets its binary
    form, K = 2, by calling this first (Liu et al. 2023 and Fan et al. 2022 treat a bit so)."""
    return latent.categorical_view(logits), lambda z: cost(latent.from_categorical(z))


CATEGORIES = ("categorical", "bernoulli")  # `latent_types` of an estimator that calls `as_categories`


class TemperatureEstimator(Estimator):
    """An estimator with a temperature `tau` (a buffer, so it is saved in checkpoints).

    `tau_min`, if given, is a floor the annealing callback never goes below (ReinMax uses it).
    """

    has_temperature = True

    def __init__(self, tau: float = 1.0, tau_min: float | None = None):
        super().__init__()
        require_number("estimator.tau", tau, positive=True, hint="for example estimator.tau=1.0")
        if tau_min is not None:
            require_number("estimator.tau_min", tau_min, positive=True, hint="a positive number or null")
        self.register_buffer("tau", torch.tensor(float(tau)))  # the current tau, set by the annealing
        self.tau_0 = float(tau)  # the configured tau: where the annealing starts
        self.tau_min = tau_min


class ScoreFunction(Estimator):
    """REINFORCE / score function with an exponential-moving-average baseline (Williams 1992, Eq. 11;
    Mnih & Gregor 2014, Sec. 3 for the baseline):

        surrogate = f(z) + stopgrad(f(z) - b) * (log q(z|x) - stopgrad(log q(z|x))),   z ~ q(z|x),
        grad = (f(z) - b) grad log q(z|x)   (unbiased: b does not depend on z).

    b is the bias-corrected EMA of the batch-mean cost over past steps (0 before the first
    step), updated after use and only in training mode; it is a buffer, saved in checkpoints.
    Written against the Latent interface alone: any latent type.
    """

    latent_types = ANY_LATENT

    def __init__(self, momentum: float = 0.99):
        super().__init__()
        require_number("estimator.momentum", momentum, low=0.0, high=0.999999, hint="in [0, 1), e.g. 0.99")
        self.momentum = momentum
        self.register_buffer("ema", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def baseline(self) -> Tensor:
        correction = 1.0 - self.momentum ** self.num_updates.clamp_min(1).to(self.ema.dtype)
        return torch.where(self.num_updates > 0, self.ema / correction, torch.zeros_like(self.ema))

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        z = latent.sample(logits)  # (B, *param_shape)
        f = cost(z)  # (B,)
        log_q = latent.log_prob(logits, z)  # (B,)
        loss = f + (f - self.baseline()).detach() * (log_q - log_q.detach())  # worth f: the term is zero
        if self.training:
            with torch.no_grad():
                self.ema.mul_(self.momentum).add_((1.0 - self.momentum) * f.mean())
                self.num_updates.add_(1)
        return EstimatorOutput(loss, f)


class RLOO(Estimator):
    """REINFORCE leave-one-out (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples,
    get a baseline for free!", Sec. 2): S samples z_1..z_S ~ q(z|x), costs f_i,

        grad = 1/S sum_i (f_i - 1/(S-1) sum_{j != i} f_j) grad log q(z_i|x),

    unbiased. The decoder's gradient is the average over the S samples. Any latent type.
    """

    latent_types = ANY_LATENT

    def __init__(self, num_samples: int = 4):
        super().__init__()
        if not (isinstance(num_samples, int) and not isinstance(num_samples, bool)) or num_samples < 2:
            raise ConfigError(
                f"estimator.num_samples must be an integer >= 2 for rloo (the leave-one-out "
                f"baseline needs another sample), got {num_samples}"
            )
        self.num_samples = int(num_samples)

    def decoder_evaluations(self, latent: Latent) -> int:
        return self.num_samples

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        S = self.num_samples
        z = latent.sample(logits, (S,))  # (S, B, *param_shape)
        f = cost(z)  # (S, B)
        log_q = latent.log_prob(logits, z)  # (S, B)
        baseline = (f.sum(0, keepdim=True) - f) / (S - 1)  # (S, B) mean of the others
        loss = (f + (f - baseline).detach() * (log_q - log_q.detach())).mean(0)  # worth mean f
        return EstimatorOutput(loss, f.mean(0))


class GumbelSoftmax(TemperatureEstimator):
    """Gumbel-Softmax / Concrete relaxation (Jang et al. 2017, Eq. 1; Maddison et al. 2017):
    the decoder sees y = softmax((logits + g) / tau); on Bernoulli latents the binary Concrete
    y = sigmoid((logits + L) / tau), L logistic (Maddison et al. 2017, Sec. 3.3), the latent type's
    `relaxed_sample`. Biased for tau > 0; `value` is f(y).
    """

    latent_types = ("categorical", "bernoulli")

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        f = cost(latent.relaxed_sample(logits, self.tau))  # (B,)
        return EstimatorOutput(f, f)


class STGumbelSoftmax(TemperatureEstimator):
    """Straight-through Gumbel-Softmax (Jang et al. 2017, Sec. 2.2): forward the hard
    D = onehot(argmax(logits + g)), backward through softmax((logits + g) / tau); on Bernoulli
    latents forward 1[logits + L > 0], backward through sigmoid((logits + L) / tau).
    """

    latent_types = ("categorical", "bernoulli")

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        f = cost(latent.relaxed_sample(logits, self.tau, hard=True))
        return EstimatorOutput(f, f)


class StraightThrough(TemperatureEstimator):
    """Straight-through (Bengio et al. 2013; "ST" in Jang et al. 2017, Sec. 4): forward
    D ~ Cat(softmax(logits)), backward through softmax(logits / tau), noise-free; on Bernoulli
    latents forward z ~ Bernoulli(sigmoid(logits)), backward through sigmoid(logits / tau).
    """

    latent_types = ("categorical", "bernoulli")

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        f = cost(latent.straight_through_sample(logits, self.tau))
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

    latent_types = CATEGORIES

    def __init__(self, tau: float = 1.0, num_mc: int = 10, tau_min: float | None = None):
        super().__init__(tau, tau_min)
        require_number("estimator.num_mc", num_mc, positive=True, integer=True)
        self.num_mc = int(num_mc)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        hard = latent.sample(logits)  # (B, *param_shape), no gradient
        with torch.no_grad():
            noise = latent.conditional_perturb(logits, hard, (self.num_mc,)) - logits  # (M, B, *param_shape)
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

    latent_types = CATEGORIES  # on bits: two categories each (`as_categories`)

    def __init__(self, tau: float = 1.3, tau_min: float | None = 1.3):
        super().__init__(tau, tau_min)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        p0 = torch.softmax(logits, dim=-1)  # (B, N, K)
        hard = sampling.gumbel_max(logits)
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

    latent_types = CATEGORIES  # on bits: two categories each (`as_categories`)

    def __init__(self, tau: float = 1.0, gap: float = 1.0, tau_min: float | None = None):
        super().__init__(tau, tau_min)
        self.gap = float(require_number("estimator.gap", gap, low=0.0, hint="the paper's kappa, 1.0"))

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        hard = sampling.gumbel_max(logits)  # (B, N, K)
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

    latent_types = CATEGORIES  # on bits: two categories each (`as_categories`)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        hard = sampling.gumbel_max(logits)  # (B, N, K)
        log_p = torch.log_softmax(logits, dim=-1)
        p = log_p.exp()  # (B, N, K)
        log_p_hard = (log_p * hard).sum(-1, keepdim=True)  # (B, N, 1) log p of the sample
        surrogate = 0.5 * (p + (hard - p).detach() * log_p_hard)
        f = cost(sampling.straight_through(hard, surrogate))
        return EstimatorOutput(f, f)


class IndeCateR(Estimator):
    """IndeCateR (De Smet, Sansone & Zuidberg Dos Martires 2023, "Differentiable Sampling of
    Categorical Distributions Using the CatLog-Derivative Trick", Sec. 4): for independent
    latents, the CatLog-derivative trick (Sec. 3) Rao-Blackwellises REINFORCE per latent. With
    S samples z_1..z_S ~ q(z|x) and z_s^{n<-k} the sample s with latent n set to category k,

        grad = sum_n sum_k grad q_n(k) * 1/S sum_s f(z_s^{n<-k}),

    unbiased (z_s's other latents are a sample of q_{-n}); sum_k grad q_n(k) = 0 acts as a
    built-in baseline. Surrogate for the encoder: sum_n sum_k q_nk stopgrad(fbar_nk). The
    decoder gets the ordinary unbiased gradient of 1/S sum_s f(z_s) at the samples, and that is
    the reported `value` (as in the authors' DVAE code).

    Cost: f(z_s) once, plus the N (K - 1) changes with k != z_n (k = z_n is z_s itself), so
    S (N (K - 1) + 1) decoder evaluations per example: 181 on the 20x10 model. The changes are
    evaluated without a graph, `chunk_size` configurations (each for the whole batch) per
    decoder call, so memory stays bounded by one chunk.

    On bits (K = 2, `as_categories`) each change flips one bit: S (N + 1) evaluations, and the
    estimate is sum_n grad sigmoid(phi_n) 1/S sum_s (f(z_s^{n<-1}) - f(z_s^{n<-0})).
    """

    latent_types = CATEGORIES

    def __init__(self, num_samples: int = 1, chunk_size: int = 100):
        super().__init__()
        self.num_samples = int(require_number("estimator.num_samples", num_samples, positive=True, integer=True))
        self.chunk_size = int(require_number("estimator.chunk_size", chunk_size, positive=True, integer=True))

    def decoder_evaluations(self, latent: Latent) -> int:
        N, K = latent.categorical_shape
        return self.num_samples * (N * (K - 1) + 1)

    def decoder_rows(self, latent: Latent) -> int:
        N, K = latent.categorical_shape
        changes = self.num_samples * N * (K - 1)
        return max(self.num_samples, min(self.chunk_size, changes))

    @torch.no_grad()
    def changed_costs(self, z: Tensor, f: Tensor, cost: CostFn) -> Tensor:
        """fbar_nk = 1/S sum_s f(z_s^{n<-k}), from f = f(z_s) for k = z_n.  # z (S, B, N, K), f (S, B) -> (B, N, K)"""
        S, B, N, K = z.shape
        total = S * N * (K - 1)
        parts = [
            cost(sampling.one_latent_changes(z, start, start + self.chunk_size))  # (C, B)
            for start in range(0, total, self.chunk_size)
        ]
        changed = torch.cat(parts).view(S, N, K - 1, B).permute(0, 3, 1, 2)  # (S, B, N, K-1)
        fbar = f.detach()[..., None, None].expand(S, B, N, K).clone()  # k = z_n: the sample itself
        fbar.scatter_(-1, sampling.other_categories(z), changed.to(fbar.dtype))
        return fbar.mean(0)  # (B, N, K)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        z = sampling.gumbel_max(logits, (self.num_samples,))  # (S, B, N, K)
        f = cost(z)  # (S, B), decoder gradient
        fbar = self.changed_costs(z, f, cost)  # (B, N, K), no graph
        rao = (torch.softmax(logits, dim=-1) * fbar).sum(dim=(-2, -1))  # (B,)
        value = f.mean(0)
        return EstimatorOutput(value + (rao - rao.detach()), value)


class Exact(Estimator):
    """Exact enumeration: E_q[f(z)] = sum over all configurations c of the latent type (K^N of
    them for categorical latents) of q(c|x) f(c). Zero variance; its gradient is exact. Written
    against the Latent interface (`enumerate`, `log_prob`): any latent type.

    Configurations are evaluated `chunk_size` at a time, each chunk under activation
    checkpointing, so memory stays bounded by one chunk in the forward and the backward.
    More configurations than `max_configs` are refused at start-up (`check`).
    """

    deterministic = True
    latent_types = ANY_LATENT

    def __init__(self, max_configs: int = 4096, chunk_size: int = 256):
        super().__init__()
        require_budget("estimator.max_configs", max_configs)
        require_number("estimator.chunk_size", chunk_size, positive=True, integer=True)
        self.max_configs = int(max_configs)
        self.chunk_size = int(chunk_size)

    def check(self, latent: Latent) -> None:
        super().check(latent)
        total = latent.num_configs
        if total > self.max_configs:
            raise ConfigError(
                f"estimator=exact enumerates {count(total)} configurations of {latent.describe()}, over the "
                f"budget estimator.max_configs={self.max_configs}. Shrink the latent space (for example "
                f"latent.num_latents=2 latent.num_categories=10, or experiment=small_exact)"
                + (" or raise estimator.max_configs." if total <= MAX_CONFIGS else
                   f"; no budget reaches it: an enumeration here takes at most {MAX_CONFIGS:,} configurations.")
            )

    def decoder_evaluations(self, latent: Latent) -> int:
        return latent.num_configs

    def decoder_rows(self, latent: Latent) -> int:
        return min(self.chunk_size, latent.num_configs)

    @staticmethod
    def _chunk(logits: Tensor, configs: Tensor, cost: CostFn, latent: Latent) -> Tensor:
        log_q = latent.log_prob(logits, configs[:, None])  # (C, B)
        f = cost(configs[:, None])  # (C, B)
        return (log_q.exp() * f).sum(0)  # (B,)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        self.check(latent)
        expected = logits.new_zeros(logits.shape[0])  # (B,)
        for start in range(0, latent.num_configs, self.chunk_size):
            configs = latent.enumerate(start, start + self.chunk_size, device=logits.device, dtype=logits.dtype)
            if torch.is_grad_enabled():  # configs (C, *param_shape)
                expected = expected + checkpoint(self._chunk, logits, configs, cost, latent, use_reentrant=False)
            else:
                expected = expected + self._chunk(logits, configs, cost, latent)
        return EstimatorOutput(expected, expected)


class _Antithetic(Estimator):
    """Shared part of ARM and DisARM: one uniform u per unit gives the antithetic pair b, b~
    (sampling.antithetic_bernoulli), the decoder is evaluated at both (2 evaluations), and its
    gradient is that of the mean 1/2 (f(b) + f(b~)), also the reported value. The encoder's
    gradient is sum_n g_n phi_n with g the estimator's weight per unit (no gradient through g)."""

    latent_types = ("bernoulli",)

    def decoder_evaluations(self, latent: Latent) -> int:
        return 2

    def weights(self, logits: Tensor, b: Tensor, b_tilde: Tensor, u: Tensor) -> Tensor:  # pragma: no cover
        """The estimate of d E[f] / d phi divided by f(b) - f(b~).  # (B, N)"""
        raise NotImplementedError

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        b, b_tilde, u = sampling.antithetic_bernoulli(logits)  # (B, N) each
        f = cost(torch.stack([b, b_tilde]))  # (2, B)
        value = f.mean(0)  # decoder gradient: the mean of the pair
        signal = (f[0] - f[1]).detach()[:, None] * self.weights(logits.detach(), b, b_tilde, u)  # (B, N)
        surrogate = (signal * logits).sum(-1)
        return EstimatorOutput(value + (surrogate - surrogate.detach()), value)


class ARM(_Antithetic):
    """ARM, augment-REINFORCE-merge (Yin & Zhou 2019, Theorem 1 / Eq. 5), for Bernoulli latents:
    u ~ U(0, 1)^N, b = 1[u > sigmoid(-phi)], b~ = 1[u < sigmoid(phi)],

        grad_phi = (f(b) - f(b~)) (u - 1/2),

    unbiased, two decoder evaluations at one uniform draw (antithetic)."""

    def weights(self, logits: Tensor, b: Tensor, b_tilde: Tensor, u: Tensor) -> Tensor:
        return u - 0.5


class DisARM(_Antithetic):
    """DisARM (Dong, Mnih & Tucker 2020, Eq. 5 and its multivariate form, Sec. 4): ARM with u
    integrated out given the pair (b, b~),

        grad_phi_n = 1/2 (f(b) - f(b~)) (-1)^{b~_n} 1[b_n != b~_n] sigmoid(|phi_n|),

    unbiased, the same two decoder evaluations, never more variance than ARM (their Theorem 1);
    as the authors' code (google-research, disarm/, the `disarm_factor`)."""

    def weights(self, logits: Tensor, b: Tensor, b_tilde: Tensor, u: Tensor) -> Tensor:
        return 0.5 * (b != b_tilde).to(logits.dtype) * (1.0 - 2.0 * b_tilde) * torch.sigmoid(logits.abs())


class REBAR(Estimator):
    """REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017, Eq. 5 / Sec. 3): the score
    function with a relaxed, reparameterised control variate. With z = logits + noise
    (`Latent.perturb`: Gumbel for categories, logistic for bits), b = harden(z), z~ ~ p(z | b)
    (`conditional_perturb`) and the control variate c(z) = eta f(sigma_lambda(z)),
    sigma_lambda = `soften` at temperature lambda,

        grad = [f(b) - c(z~)] grad log q(b|x) + grad c(z) - grad c(z~),

    unbiased for every eta and lambda (E[grad c(z)] = E[c(z~) grad log q(b)] + E[grad c(z~)]).

    eta and log lambda are parameters trained, while the model trains, to minimise the variance
    of the estimate by its gradient (Tucker et al. 2017, Sec. 3.3; Grathwohl et al. 2018, Eq. 6):
    d Var / d theta = d E[g^2] / d theta, through the estimate itself (a double backward). Here g is
    the estimate for the encoder's logits, per example, the sum of its squares averaged over the
    batch (V): the batch's gradient for the encoder's weights is a fixed linear map of it. theta
    descends log V, whose gradient is d V / d theta divided by the batch's V: the same direction,
    with a size that does not grow with the cost's scale (V is of order 1e4 to 1e6 at the start
    of training), so it never dominates a gradient-norm clip of the model. The variance gradient
    is injected into the loss (`_inject`), so one backward trains the model
    (by g) and theta (by the variance) with the one optimizer; theta and its optimizer state
    checkpoint with the model. Only in training mode with gradients on; elsewhere theta is fixed.

    The decoder gets the gradient of f(b) alone; the reported value is f(b). Three decoder
    evaluations per example: b, sigma(z), sigma(z~) (in one call). In a chain of stochastic layers
    (discrete_vae.chain) the layers above draw the same noise for the three (`shares_noise_above`):
    the control variate then follows f through them as in the papers' multi-layer form (Tucker et
    al. 2017, App.; Grathwohl et al. 2018), which keeps it correlated with f(b).
    """

    latent_types = ("categorical", "bernoulli")
    shares_noise_above = True  # f(b), f(sigma(z)), f(sigma(z~)) with the same noise in the layers above

    def __init__(self, tau: float = 0.5, scale: float = 1.0, learn: bool = True):
        super().__init__()
        require_number("estimator.tau", tau, positive=True, hint="the initial relaxation temperature, e.g. 0.5")
        require_number("estimator.scale", scale, hint="the initial control-variate scale eta, e.g. 1.0")
        if not isinstance(learn, bool):
            raise ConfigError(f"estimator.learn must be true or false, got {learn!r}")
        self.log_tau = nn.Parameter(torch.tensor(math.log(float(tau))), requires_grad=learn)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn)

    def decoder_evaluations(self, latent: Latent) -> int:
        return 3

    def control(self, f_soft: Tensor, z: Tensor, context: Tensor) -> Tensor:
        """c(z) = eta f(sigma_lambda(z)).  # f_soft (B,) -> (B,)"""
        return self.scale * f_soft

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        train_theta = self.training and any(p.requires_grad for p in self.parameters())
        if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation: the value alone
            f = cost(latent.sample(logits))
            return EstimatorOutput(f, f)
        z = latent.perturb(logits)  # (B, *param_shape), reparameterised
        b = latent.harden(z)
        z_tilde = latent.conditional_perturb(logits, b)  # (B, *param_shape), reparameterised given b
        tau = self.log_tau.exp()
        f_b, f_z, f_zt = cost(torch.stack([b, latent.soften(z, tau), latent.soften(z_tilde, tau)]))  # (B,) each
        context = logits.detach()
        c_z, c_zt = self.control(f_z, z, context), self.control(f_zt, z_tilde, context)  # (B,) each
        (score,) = torch.autograd.grad(latent.log_prob(logits, b).sum(), logits, retain_graph=True)
        (grad_c,) = torch.autograd.grad((c_z - c_zt).sum(), logits, retain_graph=True, create_graph=train_theta)
        signal = (f_b.detach() - c_zt).reshape(-1, *[1] * (logits.dim() - 1))  # (B, 1, ...)
        estimate = signal * score + grad_c  # (B, *param_shape), the estimate for the logits
        dims = tuple(range(1, logits.dim()))
        surrogate = (logits * estimate.detach()).sum(dims)  # (B,): its gradient is the estimate
        loss = f_b + (surrogate - surrogate.detach())
        if train_theta:
            variance = estimate.pow(2).sum(dims).mean()  # V = E||g||^2 per example
            loss = loss + self._inject(torch.log(variance.clamp_min(torch.finfo(variance.dtype).tiny)))
        return EstimatorOutput(loss, f_b)

    def _inject(self, objective: Tensor) -> Tensor:
        """A term worth zero whose gradient is d objective / d theta for this estimator's parameters and
        nothing for any other tensor (the model's gradient stays the estimate's)."""
        params = [p for p in self.parameters() if p.requires_grad]
        grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
        term = sum((p * g.detach()).sum() for p, g in zip(params, grads) if g is not None)
        return term - term.detach() if torch.is_tensor(term) else objective.new_zeros(())


MAX_HIDDEN = 16_384  # RELAX's network width: 137 in the papers; a checkpoint's 10^12 would exhaust memory


class RELAX(REBAR):
    """RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud 2018, Eq. 6 and Alg. 2 for discrete b): REBAR's
    estimator with the control variate made free-form,

        c(z) = eta [f(sigma_lambda(z)) + r_rho(x, z)],

    r_rho a small network (one hidden layer of `hidden` LeakyReLU(0.3) units, as the DisARM authors'
    RELAX: 137 units). It sees z and the encoder's logits for x (standing in for x, detached: a
    fixed function of x at this step, so the estimate stays unbiased). rho, eta and lambda are all
    trained by the variance gradient, as REBAR's (Grathwohl et al. 2018, Sec. 3.3). The network is
    built at start-up (`check`), when the latent type's size is known.
    """

    def __init__(self, tau: float = 0.5, scale: float = 1.0, hidden: int = 137, learn: bool = True):
        super().__init__(tau, scale, learn)
        self.hidden = int(require_number("estimator.hidden", hidden, positive=True, integer=True, high=MAX_HIDDEN,
                                         hint="the control variate network's width"))
        self.net: nn.Module | None = None

    def check(self, latent: Latent) -> None:
        super().check(latent)
        width = 2 * math.prod(latent.param_shape)  # [logits, z]
        if self.net is None or self.net[0].in_features != width:
            net = nn.Sequential(nn.Linear(width, self.hidden), nn.LeakyReLU(0.3), nn.Linear(self.hidden, 1))
            self.net = net.to(self.scale.device, self.scale.dtype)  # where the estimator already is
            self.net.requires_grad_(self.scale.requires_grad)

    def control(self, f_soft: Tensor, z: Tensor, context: Tensor) -> Tensor:
        """c(z) = eta [f(sigma_lambda(z)) + r_rho(logits, z)].  # (B,)"""
        features = torch.cat([context.flatten(1), z.flatten(1)], dim=-1).to(self.net[0].weight.dtype)
        return self.scale * (f_soft + self.net(features).squeeze(-1))

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent) -> EstimatorOutput:
        if self.net is None:
            self.check(latent)
        return super().forward(logits, cost, latent)
