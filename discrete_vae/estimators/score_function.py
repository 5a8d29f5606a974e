"""The score function (REINFORCE) and its variance-reduced forms: an EMA baseline, leave-one-out
(RLOO), and MuProp's Taylor control variate, all unbiased; and DARN's learning signal, a Taylor
expansion whose correction term is dropped (biased). The first two need nothing of a latent type
beyond sampling and log q(z|x), MuProp its mean, DARN a categorical view."""

from __future__ import annotations

import torch
from torch import Tensor

from discrete_vae.errors import ConfigError, require_number
from discrete_vae import sampling
from discrete_vae.estimators.base import CostFn, Estimator, EstimatorOutput, Generator, as_categories
from discrete_vae.latents import Latent


class ScoreFunction(Estimator):
    """REINFORCE / score function with an exponential-moving-average baseline (Williams 1992, Eq. 11;
    Mnih & Gregor 2014, Sec. 3 for the baseline):

        surrogate = f(z) + stopgrad(f(z) - b) * (log q(z|x) - stopgrad(log q(z|x))),   z ~ q(z|x),
        grad = (f(z) - b) grad log q(z|x)   (unbiased: b does not depend on z).

    b is the bias-corrected EMA of the batch-mean cost over past steps (0 before the first
    step), updated after use and only in training mode; it is a buffer, saved in checkpoints.
    Written against the Latent interface alone: any latent type.
    """

    needs = ()

    def __init__(self, momentum: float = 0.99):
        super().__init__()
        require_number("estimator.momentum", momentum, low=0.0, high=0.999999, hint="in [0, 1), e.g. 0.99")
        self.momentum = momentum
        self.register_buffer("ema", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def baseline(self) -> Tensor:
        correction = 1.0 - self.momentum ** self.num_updates.clamp_min(1).to(self.ema.dtype)
        return torch.where(self.num_updates > 0, self.ema / correction, torch.zeros_like(self.ema))

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        z = latent.sample(logits, generator=generator)  # (B, *param_shape)
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

    needs = ()

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

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        S = self.num_samples
        z = latent.sample(logits, (S,), generator=generator)  # (S, B, *param_shape)
        f = cost(z)  # (S, B)
        log_q = latent.log_prob(logits, z)  # (S, B)
        baseline = (f.sum(0, keepdim=True) - f) / (S - 1)  # (S, B) mean of the others
        loss = (f + (f - baseline).detach() * (log_q - log_q.detach())).mean(0)  # worth mean f
        return EstimatorOutput(loss, f.mean(0))


class MuProp(Estimator):
    """MuProp (Gu, Levine, Sutskever & Mnih 2016, "MuProp: Unbiased Backpropagation for Stochastic
    Neural Networks", Sec. 3, the single-layer estimator): the score function with, as its control
    variate, the first-order Taylor expansion of the cost around the mean-field point mu = E_q[z]
    (`Latent.mean`), held fixed:

        h(z) = f(mu) + f'(mu)^T (z - mu),
        grad = [f(z) - h(z)] grad log q(z|x) + f'(mu)^T grad mu,

    unbiased: E_q[h(z)] = f(mu) + f'(mu)^T (E_q[z] - mu), whose gradient (mu and f' held) is the last
    term, computed exactly. The decoder is evaluated at z and at mu (2 evaluations, and one backward
    for f'(mu)); only f(z) gives the decoder its gradient, and f(z) is the reported value.

    In a chain of stochastic layers, `above` says what f(mu) and f'(mu) see of the layers above
    layer l: "mean_field" (the default) runs Gu et al.'s mean-field network (Sec. 3.3, Fig. 1
    left: "f-bar"), every layer above at its mean, so h is a deterministic function of z_l;
    "sampled" runs them as for f(z), with their own estimators and fresh draws, so h carries
    noise of its own. Both are unbiased (h never depends on the draws that f(z) uses above layer l);
    with one layer they are the same.
    """

    needs = ("has_mean",)
    ABOVE = ("sampled", "mean_field")

    def __init__(self, above: str = "mean_field"):
        super().__init__()
        if above not in self.ABOVE:
            raise ConfigError(f"estimator.above must be one of {', '.join(self.ABOVE)} for muprop, got {above!r}")
        self.above = above

    def decoder_evaluations(self, latent: Latent) -> int:
        return 2

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        z = latent.sample(logits, generator=generator)  # (B, *event_shape)
        f = cost(z)  # (B,)
        if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation: the value alone
            return EstimatorOutput(f, f)
        mu = latent.mean(logits)  # (B, *event_shape), differentiable in the logits
        point = mu.detach().requires_grad_()
        expand = getattr(cost, "mean_field", cost) if self.above == "mean_field" else cost  # a chain's f-bar
        f_mu = expand(point)  # (B,)
        (slope,) = torch.autograd.grad(f_mu.sum(), point)  # f'(mu), per example; no other gradient taken
        dims = tuple(range(1, z.dim()))
        h = f_mu.detach() + (slope * (z.detach() - point.detach())).sum(dims)  # (B,), the control variate
        log_q = latent.log_prob(logits, z)  # (B,)
        linear = (slope * mu).sum(dims)  # its gradient: f'(mu)^T grad mu
        loss = f + (f.detach() - h) * (log_q - log_q.detach()) + (linear - linear.detach())  # worth f
        return EstimatorOutput(loss, f)


class DARN(Estimator):
    """DARN's estimator (Gregor, Danihelka, Mnih, Blundell & Wierstra 2014, "Deep AutoRegressive
    Networks"; the form Jang et al. 2017, Sec. 3.2, compare against): the score function in which
    each latent variable n gets its own learning signal, the first-order Taylor expansion of the
    cost from the sample z to a fixed point zbar,

        grad = sum_n [ f'(z)_n^T (z_n - zbar_n) ] grad log q(z_n|x),     z ~ q(z|x),

    i.e. f(z) less the baseline f(z) + f'(z)^T (zbar - z), whose correction term is dropped: biased.
    On a bit (zbar = 1/2) it is exact in expectation for a quadratic cost, since
    E_b[f'(b) (b - 1/2) d log q(b)] = (f'(1) + f'(0)) / 2 = f(1) - f(0) when f' is linear in b.

    It works on the categorical view (z_n one-hot of K categories), so on bits it is the K = 2 form,
    which is the one above. `point` chooses zbar_n: "centre", the centre of the simplex 1/K (1/2 for
    a bit, Gregor et al.'s choice), or "mean", the probabilities p_n (Shekhovtsov 2023's DARN(p),
    the half of ZGR that is not straight-through). Jang et al. give no formula for
    categories; both points make it unbiased for a cost linear in z. One decoder evaluation, and
    one backward for f'(z); the decoder's gradient and the reported value are those of f(z).
    """

    needs = ("has_categorical_view",)
    POINTS = ("centre", "mean")

    def __init__(self, point: str = "centre"):
        super().__init__()
        if point not in self.POINTS:
            raise ConfigError(f"estimator.point must be one of {', '.join(self.POINTS)} for darn, got {point!r}")
        self.point = point

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        view, view_cost = as_categories(logits, cost, latent)  # (B, N, K)
        z = sampling.gumbel_max(view.detach(), generator=generator)  # (B, N, K) one-hot
        if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation: the value alone
            f = view_cost(z)
            return EstimatorOutput(f, f)
        point = z.requires_grad_()
        f = view_cost(point)  # (B,)
        (slope,) = torch.autograd.grad(f.sum(), point, retain_graph=True)  # f'(z), (B, N, K)
        log_p = torch.log_softmax(view, dim=-1)  # (B, N, K)
        zbar = log_p.detach().exp() if self.point == "mean" else torch.full_like(z, 1.0 / z.shape[-1])
        signal = (slope * (z.detach() - zbar)).sum(-1)  # (B, N): one learning signal per latent variable
        log_q = (log_p * z.detach()).sum(-1)  # (B, N): log q(z_n|x)
        loss = f + (signal * (log_q - log_q.detach())).sum(-1)  # worth f: the term is zero
        return EstimatorOutput(loss, f)
