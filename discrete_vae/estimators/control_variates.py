"""Learned control variates: NVIL corrects the score function with an input-dependent baseline network
trained alongside the model (it needs nothing of the latent type beyond the contract); REBAR and RELAX
with a relaxed, reparameterised control variate whose temperature, scale (and RELAX's network) are
trained to minimise the estimate's variance. These two need a relaxation and the noise given the
sample (`has_relaxation`, `has_conditional_noise`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from discrete_vae.errors import ConfigError, require_number
from discrete_vae.estimators.base import CostFn, Estimator, EstimatorOutput, Generator
from discrete_vae.latents import Latent


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

    needs = ("has_relaxation", "has_conditional_noise")
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

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        train_theta = self.training and any(p.requires_grad for p in self.parameters())
        if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation: the value alone
            f = cost(latent.sample(logits, generator=generator))
            return EstimatorOutput(f, f)
        z = latent.perturb(logits, generator=generator)  # (B, *param_shape), reparameterised
        b = latent.harden(z)
        z_tilde = latent.conditional_perturb(logits, b, generator=generator)  # (B, *param_shape), reparameterised given b
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


def fitted_network(net: nn.Module | None, width: int, hidden: int, activation: nn.Module, like: Tensor) -> nn.Module:
    """`net` if it takes `width` inputs, else a new one: width -> `hidden` units (`activation`) -> 1, on the
    device and dtype of `like` (where the estimator already is). RELAX's control network and NVIL's
    baseline are built so at start-up, when the latent type's size is known."""
    if net is not None and net[0].in_features == width:
        return net
    return nn.Sequential(nn.Linear(width, hidden), activation, nn.Linear(hidden, 1)).to(like.device, like.dtype)


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
        self.net = fitted_network(self.net, width, self.hidden, nn.LeakyReLU(0.3), self.scale)
        self.net.requires_grad_(self.scale.requires_grad)

    def control(self, f_soft: Tensor, z: Tensor, context: Tensor) -> Tensor:
        """c(z) = eta [f(sigma_lambda(z)) + r_rho(logits, z)].  # (B,)"""
        features = torch.cat([context.flatten(1), z.flatten(1)], dim=-1).to(self.net[0].weight.dtype)
        return self.scale * (f_soft + self.net(features).squeeze(-1))

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        if self.net is None:
            self.check(latent)
        return super().forward(logits, cost, latent, generator)


class NVIL(Estimator):
    """NVIL (Mnih & Gregor 2014, "Neural Variational Inference and Learning in Belief Networks", Sec. 3.2
    and 3.3, Alg. 1): the score function with the paper's three variance reductions,

        s = (f(z) - b_psi(x) - c) / max(1, sqrt(v)),    grad = s grad log q(z|x),

    - an input-dependent baseline b_psi(x): a network of one hidden layer of `hidden` tanh units (100),
      fed the encoder's logits standing for x (detached: a fixed function of x at this step, so the
      estimate stays unbiased), built at start-up (`check`) when the latent type's size is known;
    - c and v, running averages (decay `momentum`, the paper's alpha = 0.8) of the batch mean and
      variance of f - b_psi(x), which centre and normalise the learning signal;
    - b_psi trained by the same signal, its gradient -s grad b_psi (descending the squared error
      (f - c - b_psi)^2 / 2, scaled as the signal), injected as a term worth zero, so one backward and
      one optimizer train it with the model, and it checkpoints with the run.

    c and v move only in training mode, after each batch is seen and before it is used (the paper's
    order). For given c and v the estimate is the exact gradient scaled by 1 / max(1, sqrt(v)).

    `normalise=False` keeps the centring and drops the division by max(1, sqrt(v)). In the paper the
    learning signal is the whole log p(x, h) - log q(h|x), so the division scales all of the inference
    network's gradient alike (an adaptive step size, which Adam makes redundant). Where the KL is
    analytic, as in every VAE here, f is only the sampled part, and the division shrinks its gradient
    against the KL's: the posterior collapses to the prior (conf/estimator/nvil.yaml says what was
    measured). An SBN, with no analytic term, is unaffected either way.
    """

    def __init__(self, hidden: int = 100, momentum: float = 0.8, normalise: bool = True):
        super().__init__()
        self.hidden = int(require_number("estimator.hidden", hidden, positive=True, integer=True, high=MAX_HIDDEN,
                                         hint="the baseline network's width, 100 in the paper"))
        self.momentum = float(require_number("estimator.momentum", momentum, low=0.0, high=0.999999,
                                             hint="in [0, 1), the paper's alpha = 0.8"))
        if not isinstance(normalise, bool):
            raise ConfigError(f"estimator.normalise must be true or false, got {normalise!r}")
        self.normalise = normalise
        self.register_buffer("centre", torch.zeros(()))  # c
        self.register_buffer("variance", torch.zeros(()))  # v
        self.net: nn.Module | None = None

    def check(self, latent: Latent) -> None:
        super().check(latent)
        self.net = fitted_network(self.net, math.prod(latent.param_shape), self.hidden, nn.Tanh(), self.centre)

    def baseline(self, logits: Tensor) -> Tensor:
        """b_psi(x), from the encoder's logits standing for x.  # (B, *param_shape) -> (B,)"""
        return self.net(logits.detach().flatten(1).to(self.net[0].weight.dtype)).squeeze(-1)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        if self.net is None:
            self.check(latent)
        z = latent.sample(logits, generator=generator)  # (B, *event_shape)
        f = cost(z)  # (B,)
        b = self.baseline(logits)  # (B,), differentiable in psi
        if self.training:
            with torch.no_grad():
                residual = f - b
                self.centre.mul_(self.momentum).add_((1 - self.momentum) * residual.mean())
                spread = residual.var() if residual.numel() > 1 else torch.zeros_like(residual.sum())
                self.variance.mul_(self.momentum).add_((1 - self.momentum) * spread)
        scale = self.variance.sqrt().clamp_min(1.0) if self.normalise else 1.0
        signal = ((f.detach() - b.detach() - self.centre) / scale).detach()  # (B,)
        log_q = latent.log_prob(logits, z)  # (B,)
        fit = -signal * b  # its gradient: -s grad b_psi, the baseline's descent
        loss = f + signal * (log_q - log_q.detach()) + (fit - fit.detach())  # worth f
        return EstimatorOutput(loss, f)
